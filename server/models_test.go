package server_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/catalog"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/server"
)

// modelsDir holds two different SD models (the project's tiny model and the
// reference fixture), an inpainting model and a single file.
func modelsDir(t *testing.T) string {
	sdDir, _ := testenv.Tiny(t)
	fx := testenv.Fixtures(t)
	dir := t.TempDir()
	testenv.CopyTree(t, sdDir, filepath.Join(dir, "tiny"))
	testenv.CopyTree(t, filepath.Join(fx, "sd", "tiny-sd15"), filepath.Join(dir, "tiny-sd15"))
	testenv.CopyTree(t, filepath.Join(fx, "sd", "tiny-inpaint"), filepath.Join(dir, "inpaint", "tiny-inpaint"))
	testenv.CopyTree(t, filepath.Join(fx, "sd", "tiny-sd15.safetensors"), filepath.Join(dir, "single.safetensors"))
	return dir
}

func withCatalog(t *testing.T, dir string) *env {
	cat, err := catalog.Open(dir, t.TempDir())
	require.NoError(t, err)
	return start(t, server.Config{Catalog: cat, Model: filepath.Join(dir, "tiny")})
}

// runImage runs a job and returns its first image's PNG bytes.
func runImage(t *testing.T, e *env, body map[string]any) []byte {
	t.Helper()
	id := submit(t, e, body)
	s := collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id)
	last := s.events[len(s.events)-1]
	require.Equal(t, "completed", last["type"], last)
	files := last["files"].([]any)
	resp, err := http.Get(e.http.URL + files[0].(string))
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	return b
}

func a1111Image(t *testing.T, e *env, body map[string]any) ([]byte, map[string]any) {
	t.Helper()
	code, out := e.post(t, "/sdapi/v1/txt2img", body)
	require.Equal(t, http.StatusOK, code, out)
	img, err := base64.StdEncoding.DecodeString(out["images"].([]any)[0].(string))
	require.NoError(t, err)
	var info map[string]any
	require.NoError(t, json.Unmarshal([]byte(out["info"].(string)), &info))
	return img, info
}

func TestJobsNameTheirModel(t *testing.T) {
	dir := modelsDir(t)
	e := withCatalog(t, dir)
	job := func(model string) map[string]any {
		b := txt(2)
		if model != "" {
			b["model"] = model
		}
		return b
	}
	viaFolder := map[string][]byte{}
	for _, name := range []string{"tiny", "tiny-sd15"} {
		viaFolder[name] = runImage(t, e, job(name))
		direct := start(t, server.Config{Model: filepath.Join(dir, name)})
		assert.Equal(t, runImage(t, direct, job("")), viaFolder[name], "%s through the models folder equals a direct run", name)
	}
	assert.NotEqual(t, viaFolder["tiny"], viaFolder["tiny-sd15"], "the two models make different images")
	assert.Equal(t, viaFolder["tiny"], runImage(t, e, job("")), "a job naming no model gets the server's")

	code, out := e.post(t, "/v1/jobs", job("sd-v1-5"))
	assert.Equal(t, http.StatusBadRequest, code, out)
	assert.Contains(t, out["error"], `unknown model "sd-v1-5"`)
	assert.Contains(t, out["error"], "inpaint/tiny-inpaint, single, tiny, tiny-sd15", "the error names the choices")
	// Only names from the folder: a path the server has not listed is not a model.
	code, out = e.post(t, "/v1/jobs", job(testenv.Fixtures(t)+"/sd/tiny-sd15"))
	assert.Equal(t, http.StatusBadRequest, code, out)
}

func TestA1111ClientsListAndSwitchCheckpoints(t *testing.T) {
	dir := modelsDir(t)
	e := withCatalog(t, dir)
	var list []map[string]any
	require.Equal(t, http.StatusOK, e.get(t, "/sdapi/v1/sd-models", &list))
	byName := map[string]map[string]any{}
	for _, m := range list {
		byName[m["model_name"].(string)] = m
	}
	require.Len(t, byName, 4)
	out, err := exec.Command("sha256sum", filepath.Join(dir, "single.safetensors")).Output()
	require.NoError(t, err)
	sum := strings.Fields(string(out))[0]
	single := byName["single"]
	assert.Equal(t, sum, single["sha256"])
	assert.Equal(t, sum[:10], single["hash"])
	assert.Equal(t, "single.safetensors ["+sum[:10]+"]", single["title"])
	assert.Equal(t, filepath.Join(dir, "single.safetensors"), single["filename"])

	req := map[string]any{"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 5, "sampler_name": "Euler"}
	direct := map[string][]byte{}
	for _, name := range []string{"tiny", "tiny-sd15"} {
		d := start(t, server.Config{Model: filepath.Join(dir, name)})
		direct[name], _ = a1111Image(t, d, req)
	}
	require.NotEqual(t, direct["tiny"], direct["tiny-sd15"])

	// Through the options, as the web UI's model dropdown does.
	title := byName["tiny-sd15"]["title"].(string)
	code, resp := e.post(t, "/sdapi/v1/options", map[string]any{"sd_model_checkpoint": title, "CLIP_stop_at_last_layers": 1})
	require.Equal(t, http.StatusOK, code, resp)
	var opts map[string]any
	e.get(t, "/sdapi/v1/options", &opts)
	assert.Equal(t, title, opts["sd_model_checkpoint"])
	img, info := a1111Image(t, e, req)
	assert.Equal(t, direct["tiny-sd15"], img)
	assert.Equal(t, "tiny-sd15", info["sd_model_name"])

	// override_settings switches one request and leaves the option alone.
	over := map[string]any{"override_settings": map[string]any{"sd_model_checkpoint": "tiny"}}
	for k, v := range req {
		over[k] = v
	}
	img, info = a1111Image(t, e, over)
	assert.Equal(t, direct["tiny"], img)
	assert.Equal(t, "tiny", info["sd_model_name"])
	img, _ = a1111Image(t, e, req)
	assert.Equal(t, direct["tiny-sd15"], img, "the option still holds")

	// Unknown names are 4xx naming the choices, in both places.
	code, resp = e.post(t, "/sdapi/v1/options", map[string]any{"sd_model_checkpoint": "nope.safetensors"})
	assert.Equal(t, http.StatusBadRequest, code, resp)
	assert.Contains(t, fmt.Sprint(resp), "tiny-sd15")
	over["override_settings"] = map[string]any{"sd_model_checkpoint": "nope"}
	code, resp = e.post(t, "/sdapi/v1/txt2img", over)
	assert.Equal(t, http.StatusBadRequest, code, resp)
	assert.Contains(t, fmt.Sprint(resp), "tiny-sd15")
}

func TestRefreshFindsCheckpointsAddedAfterStart(t *testing.T) {
	dir := modelsDir(t)
	e := withCatalog(t, dir)
	code, out := e.post(t, "/v1/jobs", map[string]any{"kind": "txt2img", "prompt": "x", "model": "later"})
	require.Equal(t, http.StatusBadRequest, code, out)
	testenv.CopyTree(t, filepath.Join(dir, "tiny-sd15"), filepath.Join(dir, "later"))
	resp, err := http.Post(e.http.URL+"/sdapi/v1/refresh-checkpoints", "application/json", bytes.NewReader(nil))
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var list []map[string]any
	e.get(t, "/sdapi/v1/sd-models", &list)
	names := []string{}
	for _, m := range list {
		names = append(names, m["model_name"].(string))
	}
	assert.Contains(t, names, "later")
	b := txt(2)
	b["model"] = "later"
	assert.Equal(t, runImage(t, e, map[string]any{"kind": "txt2img", "prompt": "a cat", "width": 64, "height": 64,
		"steps": 2, "seed": 3, "model": "tiny-sd15"}), runImage(t, e, b))
	var models map[string]any
	e.get(t, "/v1/models", &models)
	assert.Len(t, models["checkpoints"], 5)
}

// A VAE from the models folder replaces the model's own: the image changes,
// and equals a direct run of a model folder that has that VAE in it.
func TestVAEOverridePerJobAndThroughA1111(t *testing.T) {
	dir := modelsDir(t)
	fx := testenv.Fixtures(t)
	testenv.CopyTree(t, filepath.Join(fx, "sd", "tiny-sd15", "vae", "diffusion_pytorch_model.safetensors"),
		filepath.Join(dir, "VAE", "alt.safetensors"))
	withVAE := filepath.Join(t.TempDir(), "tiny-alt-vae")
	testenv.CopyTree(t, filepath.Join(dir, "tiny"), withVAE)
	testenv.CopyTree(t, filepath.Join(fx, "sd", "tiny-sd15", "vae"), filepath.Join(withVAE, "vae"))

	e := withCatalog(t, dir)
	direct := start(t, server.Config{Model: withVAE})
	job := func(vae string) map[string]any {
		b := txt(2)
		b["model"] = "tiny"
		if vae != "" {
			b["vae"] = vae
		}
		return b
	}
	own := runImage(t, e, job(""))
	alt := runImage(t, e, job("alt"))
	assert.NotEqual(t, own, alt, "the VAE changes the decoded image")
	assert.Equal(t, runImage(t, direct, txt(2)), alt, "equals a direct run of a model with that VAE")
	assert.Equal(t, alt, runImage(t, e, job("VAE/alt")), "named by its path in the folder too")

	var vaes []map[string]any
	e.get(t, "/sdapi/v1/sd-vae", &vaes)
	require.Len(t, vaes, 1)
	assert.Equal(t, "VAE/alt", vaes[0]["model_name"])

	req := map[string]any{"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 5, "sampler_name": "Euler"}
	want, _ := a1111Image(t, direct, req)
	over := map[string]any{"override_settings": map[string]any{"sd_vae": "alt"}}
	for k, v := range req {
		over[k] = v
	}
	img, _ := a1111Image(t, e, over)
	assert.Equal(t, want, img, "override_settings.sd_vae")
	code, out := e.post(t, "/sdapi/v1/options", map[string]any{"sd_vae": "alt.safetensors"})
	require.Equal(t, http.StatusOK, code, out)
	img, _ = a1111Image(t, e, req)
	assert.Equal(t, want, img, "the sd_vae option")
	var opts map[string]any
	e.get(t, "/sdapi/v1/options", &opts)
	assert.Equal(t, "VAE/alt", opts["sd_vae"])
	code, out = e.post(t, "/sdapi/v1/options", map[string]any{"sd_vae": "Automatic"})
	require.Equal(t, http.StatusOK, code, out)
	img, _ = a1111Image(t, e, req)
	assert.NotEqual(t, want, img, "Automatic is the model's own VAE again")

	code, out = e.post(t, "/v1/jobs", job("nope"))
	assert.Equal(t, http.StatusBadRequest, code, out)
	assert.Contains(t, out["error"], "VAE/alt", "the error names the choices")
}
