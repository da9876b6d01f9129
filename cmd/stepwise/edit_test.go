package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/pipeline"
)

func TestSegmentAndEditCommands(t *testing.T) {
	sdDir, segPath := testenv.Tiny(t)
	dir := t.TempDir()
	photo := filepath.Join(dir, "photo.png")
	require.NoError(t, os.WriteFile(photo, testenv.Photo(t, 80, 64), 0o644))

	mask := filepath.Join(dir, "mask.png")
	logits := filepath.Join(dir, "logits.safetensors")
	code, stdout, stderr := runCLI("segment", "--lib", testenv.LibPath(), "--model", segPath, photo, "--out", mask,
		"--scale", "1", "--save-logits", logits, "--data", dir)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "of 80x64, 2 classes")
	assert.FileExists(t, mask)
	f, err := safetensors.Read(logits)
	require.NoError(t, err)
	assert.Equal(t, []int64{1, 2, 64, 80}, f.Tensors["logits"].Shape)

	// The tiny models are deterministic: this edit finds a subject and succeeds.
	code, stdout, stderr = runCLI("edit", photo, "--lib", testenv.LibPath(), "--prompt", "a beach",
		"--model", sdDir, "--seg-model", segPath, "--steps", "2", "--size", "64", "--scale", "1", "--seed", "3",
		"--data", dir, "--json", "--classes", "1", "--grow", "-1")
	require.Equal(t, 0, code, stderr)
	var res struct {
		Dir    string         `json:"dir"`
		IoU    float64        `json:"subject_iou"`
		Params map[string]any `json:"params"`
	}
	require.NoError(t, json.Unmarshal([]byte(stdout), &res))
	assert.Equal(t, filepath.Join(dir, "runs"), filepath.Dir(res.Dir))
	for _, name := range []string{"input.png", "mask.png", "edited.png", "edited_mask.png", "params.json"} {
		assert.FileExists(t, filepath.Join(res.Dir, name))
	}
	assert.Equal(t, "background", res.Params["repaint"])
	assert.EqualValues(t, 3, res.Params["seed"])
	assert.EqualValues(t, 2, res.Params["steps"])
	assert.EqualValues(t, -1, res.Params["grow"])
	assert.Equal(t, []any{1.0}, res.Params["segment_classes"])
	assert.Equal(t, []any{64.0, 48.0}, res.Params["working_size"])
	// Left out: the pipeline's defaults.
	assert.Equal(t, pipeline.DefaultSampler.String(), res.Params["sampler"])
	assert.EqualValues(t, pipeline.DefaultCFGScale, res.Params["cfg_scale"])
	assert.EqualValues(t, pipeline.DefaultMaskBlur, res.Params["mask_blur"])
}

func TestEditUsesDemoModelsByDefault(t *testing.T) {
	dir := t.TempDir()
	photo := filepath.Join(dir, "photo.png")
	require.NoError(t, os.WriteFile(photo, testenv.Photo(t, 96, 80), 0o644))
	code, stdout, stderr := runCLI("edit", photo, "--lib", testenv.LibPath(), "--prompt", "a beach", "--steps", "1",
		"--size", "64", "--scale", "1", "--data", dir)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, filepath.Join(dir, "runs"))
	assert.Contains(t, stdout, "subject preserved: IoU")
	assert.Contains(t, stderr, "making the tiny demo models in "+filepath.Join(dir, "models"))
	assert.FileExists(t, filepath.Join(dir, "models", "tiny-seg.safetensors"))
	assert.FileExists(t, filepath.Join(dir, "models", "tiny-sd", "unet", "diffusion_pytorch_model.safetensors"))
}

func TestSegmentAndEditBadInput(t *testing.T) {
	_, segPath := testenv.Tiny(t)
	dir := t.TempDir()
	text := filepath.Join(dir, "notes.png")
	require.NoError(t, os.WriteFile(text, []byte("not an image"), 0o644))
	small := filepath.Join(dir, "small.png")
	require.NoError(t, os.WriteFile(small, whitePNG(t, 10, 10), 0o644))
	tests := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"segment", "--model", segPath}, exitUsage, "stepwise segment: accepts 1 arg(s), received 0"},
		{[]string{"segment", "--model", segPath, small}, exitUsage, `stepwise segment: required flag(s) "out" not set`},
		{[]string{"segment", "--lib", testenv.LibPath(), "--model", segPath, text, "--out", filepath.Join(dir, "m.png")}, exitError, "not a PNG or JPEG"},
		{[]string{"segment", "--lib", testenv.LibPath(), "--model", segPath, small, "--out", filepath.Join(dir, "m.png"), "--data", dir}, exitError, "needs at least 16x16"},
		{[]string{"segment", "--lib", testenv.LibPath(), "--model", segPath, small, "--out", "x.png", "--classes", "a"}, exitUsage, `invalid argument "a" for "--classes"`},
		{[]string{"edit", text}, exitUsage, `stepwise edit: required flag(s) "prompt" not set`},
		{[]string{"edit", text, "--prompt", "x", "--lib", testenv.LibPath(), "--data", dir}, exitError, "not a PNG or JPEG"},
		{[]string{"edit", text, "--prompt", "x", "--sampler", "bogus"}, exitError, `stepwise edit: unknown sampler "bogus"`},
	}
	for _, tt := range tests {
		code, _, stderr := runCLI(tt.args...)
		assert.Equal(t, tt.code, code, "%v", tt.args)
		assert.Contains(t, stderr, tt.want, "%v", tt.args)
		if tt.code == exitUsage {
			assert.Contains(t, stderr, "Usage:\n  stepwise "+tt.args[0], "a usage error prints the usage")
		} else {
			assert.NotContains(t, stderr, "Usage:", "an error that is no usage error prints no usage")
		}
	}
	runs, _ := os.ReadDir(filepath.Join(dir, "runs"))
	assert.Empty(t, runs, "no partial run directories")
}
