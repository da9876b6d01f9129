package server

import (
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
)

// A job's life on the gateway: started once per attempt, a later attempt
// (its worker died) starts it again, an old attempt's word is ignored, and it
// ends once.
func TestJobStartsPerAttemptAndEndsOnce(t *testing.T) {
	for _, state := range []string{StateCompleted, StateFailed, StateCancelled} {
		j := newJob("j", "img2img", JobParams{Prompt: "x"}, "")
		require.Equal(t, startedFirst, j.start("w1", "r1"))
		require.Equal(t, startedNone, j.start("w1", "r1"), "the same run twice")
		assert.Equal(t, 1, j.View().Attempt)
		j.progress(3, 10, 3)
		require.Equal(t, startedAgain, j.start("w2", "r2"))
		assert.Equal(t, 0, j.View().Step, "a new attempt starts from step 0")
		assert.Equal(t, "w2", j.View().Worker)
		assert.Equal(t, 2, j.View().Attempt)
		was, ok := j.finish(state, errors.New("x"))
		require.True(t, ok)
		assert.Equal(t, StateRunning, was)
		_, ok = j.finish(StateCompleted, nil)
		assert.False(t, ok, "a job ends once")
		assert.Equal(t, startedNone, j.start("w3", "r3"), "an ended job does not start again")
	}
}

// validationServer is a server with the default limits and no engine: enough
// to decode and validate requests.
func validationServer() *Server {
	cfg := Config{}
	cfg.defaults()
	// No worker: validation asks the workers which backends they can run,
	// and with none connected every known backend is taken.
	return &Server{cfg: cfg, workers: newWorkers(), decodes: make(chan struct{}, concurrentDecodes)}
}

// FuzzDecodeJob feeds arbitrary request bodies through decoding and
// validation: neither panics, and whatever is accepted is within every limit.
func FuzzDecodeJob(f *testing.F) {
	for _, seed := range []string{
		`{"kind":"txt2img","prompt":"a cat","width":64,"height":64,"steps":4}`,
		`{"kind":"img2img","prompt":"x","image":"iVBORw0KGgo="}`,
		`{"kind":"inpaint","prompt":"x","image":"","mask":"%%"}`,
		`{"kind":"edit","prompt":"x","grow":-99999999999,"segment_scale":1e308,"classes":[1,2,-3]}`,
		`{"kind":"txt2img","prompt":"x","width":0}`,
		`{"kind":"txt2img","prompt":"x\u0000y","seed":9007199254740993}`,
		`{"kind":"txt2img","prompt":"x","cfg_scale":"NaN","preview":"vae","preview_every":0}`,
		`[1,2,3]`, `null`, `{"kind":7}`,
	} {
		f.Add([]byte(seed))
	}
	s := validationServer()
	f.Fuzz(func(t *testing.T, body []byte) {
		kind, p, err := decodeJobJSON(body)
		if err != nil {
			require.Equal(t, 400, statusOf(err), "decode errors are the client's: %v", err)
			return
		}
		d, err := s.validate(kind, &p)
		if err != nil {
			require.Less(t, statusOf(err), 500, "validation errors are the client's: %v", err)
			return
		}
		require.True(t, jobKinds[kind])
		require.LessOrEqual(t, len(p.Prompt), s.cfg.MaxPromptBytes)
		require.NotContains(t, p.Prompt, "\x00")
		require.True(t, p.Width == 0 || (p.Width%8 == 0 && p.Width <= s.cfg.MaxSide))
		require.True(t, p.Height == 0 || (p.Height%8 == 0 && p.Height <= s.cfg.MaxSide))
		require.True(t, p.Steps >= 1 && p.Steps <= s.cfg.MaxSteps)
		require.True(t, p.BatchSize >= 1 && p.BatchSize <= s.cfg.MaxBatch)
		require.LessOrEqual(t, p.Grow, s.cfg.MaxSide)
		require.GreaterOrEqual(t, p.Grow, -s.cfg.MaxSide)
		require.LessOrEqual(t, len(p.Classes), maxClasses)
		require.GreaterOrEqual(t, p.Seed, int64(0))
		require.NotNil(t, d)
		if kind == "txt2img" {
			require.Nil(t, d.image)
		}
		require.False(t, strings.ContainsRune(p.NegativePrompt, 0))
	})
}

// The job API and the CLI take the engine's sampler names and A1111's names;
// the binding knows only the engine's.
func TestParseSamplerTakesA1111Names(t *testing.T) {
	for _, tt := range []struct {
		name string
		want binding.Sampler
	}{
		{"euler_a", binding.EulerA}, {"Euler a", binding.EulerA}, {"k_euler_ancestral", binding.EulerA},
		{"DPM++ 2M Karras", binding.DPMPP2MKarras}, {"dpm++ 2m karras", binding.DPMPP2MKarras},
		{"PLMS", binding.PNDM}, {"pndm", binding.PNDM}, {" DDIM ", binding.DDIM}, {"Euler", binding.Euler},
		{"DPM++ 2M", binding.DPMPP2M},
	} {
		got, err := ParseSampler(tt.name)
		require.NoError(t, err, tt.name)
		assert.Equal(t, tt.want, got, tt.name)
	}
	_, err := ParseSampler("k_lms")
	assert.ErrorIs(t, err, binding.ErrUnknownSampler)
	_, err = binding.ParseSampler("Euler a")
	assert.ErrorIs(t, err, binding.ErrUnknownSampler, "A1111's names stay in the A1111 adapter")
	// Every engine sampler has an A1111 name.
	for _, si := range binding.Samplers {
		found := false
		for _, n := range a1111SamplerNames {
			found = found || n.sampler == si.Sampler
		}
		assert.True(t, found, si.Name)
	}
}
