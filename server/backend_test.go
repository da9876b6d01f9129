package server_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/modelcache"
	"github.com/stepwise-sd/stepwise/server"
)

// withoutSDCPP is the real loader of a process whose sdcpp backend cannot be
// loaded: what a server built without stable-diffusion.cpp (or missing its
// library) sees, on a library that may have it.
type withoutSDCPP struct{ modelcache.LibraryLoader }

func (l withoutSDCPP) BackendAvailable(b binding.Backend) error {
	if b == binding.BackendSDCPP {
		return fmt.Errorf("%w: stable-diffusion.cpp library not found (test)", binding.ErrUnsupported)
	}
	return l.LibraryLoader.BackendAvailable(b)
}

func (l withoutSDCPP) Backends() []binding.BackendStatus {
	var out []binding.BackendStatus
	for _, b := range binding.Backends() {
		st := binding.BackendStatus{Backend: b, Available: true}
		if err := l.BackendAvailable(b); err != nil {
			st.Available, st.Reason = false, err.Error()
		}
		out = append(out, st)
	}
	return out
}

// backendsOf reads /v1/models' backends by name.
func backendsOf(t *testing.T, e *env) map[string]map[string]any {
	t.Helper()
	var models map[string]any
	require.Equal(t, http.StatusOK, e.get(t, "/v1/models", &models))
	out := map[string]map[string]any{}
	for _, b := range models["backends"].([]any) {
		m := b.(map[string]any)
		out[m["name"].(string)] = m
	}
	return out
}

func TestModelsListEveryBackend(t *testing.T) {
	lib := testenv.Library(t)
	e := start(t, server.Config{})
	got := backendsOf(t, e)
	require.Len(t, got, 2, "libtorch and sdcpp, available or not")
	assert.Equal(t, true, got["libtorch"]["available"])
	assert.Equal(t, true, got["libtorch"]["default"])
	assert.Equal(t, false, got["sdcpp"]["default"])
	sdcppErr := lib.BackendAvailable(binding.BackendSDCPP)
	assert.Equal(t, sdcppErr == nil, got["sdcpp"]["available"], "what the library says: %v", sdcppErr)
	if sdcppErr != nil {
		assert.Equal(t, sdcppErr.Error(), got["sdcpp"]["reason"])
	} else {
		assert.FileExists(t, fmt.Sprint(got["sdcpp"]["library"]), "the stable-diffusion.cpp build it found")
	}

	missing := startWith(t, server.Config{}, withoutSDCPP{modelcache.LibraryLoader{Lib: lib}})
	got = backendsOf(t, missing)
	assert.Equal(t, false, got["sdcpp"]["available"])
	assert.NotEmpty(t, got["sdcpp"]["reason"], "an unavailable backend says why")
	assert.Equal(t, true, got["libtorch"]["available"])
}

func TestJobBackendIsValidatedAtSubmission(t *testing.T) {
	lib := testenv.Library(t)
	e := startWith(t, server.Config{}, withoutSDCPP{modelcache.LibraryLoader{Lib: lib}})
	job := func(backend string) map[string]any {
		b := txt(1)
		b["backend"] = backend
		return b
	}
	for _, tt := range []struct {
		backend string
		code    int
	}{
		{"nope", http.StatusBadRequest},  // unknown
		{"sdcpp", http.StatusBadRequest}, // unavailable in this process
		{"stable-diffusion.cpp", http.StatusBadRequest},
		{"libtorch", http.StatusAccepted},
		{"", http.StatusAccepted}, // the server's
	} {
		code, out := e.post(t, "/v1/jobs", job(tt.backend))
		assert.Equal(t, tt.code, code, "backend %q: %v", tt.backend, out)
		if code == http.StatusAccepted {
			id := out["id"].(string)
			assert.Equal(t, "completed", last(collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id))["type"])
		}
	}
	code, out := e.post(t, "/v1/models/load", map[string]any{"kind": "sd", "backend": "sdcpp"})
	assert.Equal(t, http.StatusBadRequest, code, out)
	code, out = e.post(t, "/v1/models/load", map[string]any{"kind": "sd", "backend": "nope"})
	assert.Equal(t, http.StatusBadRequest, code, out)
}

// A server whose default backend is sdcpp runs jobs that name none with it,
// and a job may still ask for libtorch. The tiny model is not one
// stable-diffusion.cpp can load: the job fails, clearly, before the library
// sees the model, and the server goes on.
func TestServerDefaultBackend(t *testing.T) {
	lib := testenv.Library(t)
	if err := lib.BackendAvailable(binding.BackendSDCPP); err != nil {
		t.Skipf("sdcpp backend unavailable: %v", err)
	}
	e := start(t, server.Config{Backend: binding.BackendSDCPP})
	assert.Equal(t, true, backendsOf(t, e)["sdcpp"]["default"])

	id := submit(t, e, txt(1))
	end := last(collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id))
	require.Equal(t, "failed", end["type"], end)
	assert.Contains(t, end["error"], "the sdcpp backend takes SD 1.x models")

	b := txt(1)
	b["backend"] = "libtorch"
	id = submit(t, e, b)
	assert.Equal(t, "completed", last(collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id))["type"])
	var models map[string]any
	e.get(t, "/v1/models", &models)
	assert.Len(t, models["loaded"], 1, "only the libtorch model loaded")
}

// TestSDCPPJobs runs jobs on the sdcpp backend through the server, on the
// SD 1.5-sized random model at 64x64: every step streams a progress event and
// a preview, a cancel stops within a step and the model works next, and what
// the backend refuses fails the job and leaves the server serving.
func TestSDCPPJobs(t *testing.T) {
	lib := testenv.SDCPP(t)
	sd15 := testenv.SD15Random(t, lib)
	e := start(t, server.Config{Model: sd15, Backend: binding.BackendSDCPP, DType: binding.F16})
	job := func(steps int) map[string]any {
		return map[string]any{"kind": "txt2img", "prompt": "a cat", "width": 64, "height": 64, "steps": steps, "seed": 3,
			"sampler_name": "euler", "cfg_scale": 7, "backend": "sdcpp"}
	}

	// Loaded first (and through the server's backend): the load, 10-30 s,
	// is no part of a job's stream.
	code, out := e.post(t, "/v1/models/load", map[string]any{"kind": "sd"})
	require.Equal(t, http.StatusOK, code, out)
	assert.Contains(t, fmt.Sprint(out["info"]), "stable-diffusion.cpp", "the model was opened by sd.cpp")

	t.Run("N steps stream N progress events and N previews", func(t *testing.T) {
		all := e.dial(t, "/v1/events") // before the job: it sees the job's first step
		id := submit(t, e, job(3))
		s := collectOf(t, all, id)
		require.Equal(t, "completed", last(s)["type"], last(s))
		assert.Equal(t, 3, count(s.events, "progress"))
		assertEveryPreview(t, e, s.previews, 3)
		for _, p := range s.previews {
			assert.Equal(t, 3, p.Steps)
		}
		var models map[string]any
		e.get(t, "/v1/models", &models)
		assert.Len(t, models["loaded"], 1, "the job ran on the model loaded with the server's backend")
	})

	t.Run("cancel at step k stops by k+1 and the model works next", func(t *testing.T) {
		const k = 1
		id := submit(t, e, job(6))
		ws := e.dial(t, "/v1/jobs/"+id+"/events")
		ws.SetReadDeadline(time.Now().Add(5 * time.Minute))
		for {
			_, data, err := ws.ReadMessage()
			require.NoError(t, err)
			var ev map[string]any
			if json.Unmarshal(data, &ev) != nil {
				continue // a preview frame
			}
			if ev["type"] == "progress" && ev["step"].(float64) == k {
				code, _ := e.post(t, "/v1/jobs/"+id+"/cancel", "")
				assert.Equal(t, http.StatusAccepted, code)
			}
			if ev["type"] == "cancelled" {
				assert.LessOrEqual(t, ev["step"].(float64), float64(k+1), "ends within one step")
				break
			}
			require.NotEqual(t, "completed", ev["type"], "the job was not cancelled")
		}
		id = submit(t, e, job(1))
		assert.Equal(t, "completed", last(collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id))["type"])
	})

	t.Run("what it refuses fails the job, and the server goes on", func(t *testing.T) {
		b := job(1)
		b["sampler_name"] = "nope"
		code, out := e.post(t, "/v1/jobs", b)
		assert.Equal(t, http.StatusBadRequest, code, out)

		b["sampler_name"] = "ddim" // stepwise has it, stable-diffusion.cpp does not
		id := submit(t, e, b)
		end := last(collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id))
		require.Equal(t, "failed", end["type"], end)
		assert.Contains(t, end["error"], "sampler ddim")

		id = submit(t, e, job(1))
		assert.Equal(t, "completed", last(collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id))["type"])
	})

	t.Run("a dtype it cannot run fails the job", func(t *testing.T) {
		bf := start(t, server.Config{Model: sd15, Backend: binding.BackendSDCPP, DType: binding.BF16})
		id := submit(t, bf, job(1))
		end := last(collect(t, bf.dial(t, "/v1/jobs/"+id+"/events"), id))
		require.Equal(t, "failed", end["type"], end)
		assert.Contains(t, end["error"], "dtype bf16")
	})
}
