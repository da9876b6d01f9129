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
)

func TestSegmentAndEditCommands(t *testing.T) {
	sdDir, segPath := testenv.Tiny(t)
	dir := t.TempDir()
	photo := filepath.Join(dir, "photo.png")
	require.NoError(t, os.WriteFile(photo, whitePNG(t, 80, 64), 0o644))

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

	code, stdout, stderr = runCLI("edit", filepath.Join(dir, "photo.png"), "--lib", testenv.LibPath(), "--prompt", "a beach",
		"--model", sdDir, "--seg-model", segPath, "--steps", "2", "--size", "64", "--scale", "1", "--seed", "3",
		"--data", dir, "--json", "--classes", "0,1", "--repaint-subject", "--grow", "-1")
	if code != 0 {
		// A random segmentation can find everything or nothing: that is a clear error, not a crash.
		assert.Contains(t, stderr, "the segmentation found no subject")
		return
	}
	var res map[string]any
	require.NoError(t, json.Unmarshal([]byte(stdout), &res))
	for _, name := range []string{"input.png", "mask.png", "edited.png", "edited_mask.png", "params.json"} {
		assert.FileExists(t, filepath.Join(res["dir"].(string), name))
	}
}

func TestEditUsesDemoModelsByDefault(t *testing.T) {
	dir := t.TempDir()
	photo := filepath.Join(dir, "photo.png")
	require.NoError(t, os.WriteFile(photo, whitePNG(t, 96, 80), 0o644))
	code, stdout, stderr := runCLI("edit", photo, "--lib", testenv.LibPath(), "--prompt", "a beach", "--steps", "1",
		"--size", "64", "--scale", "1", "--data", dir)
	if code == 0 {
		assert.Contains(t, stdout, filepath.Join(dir, "runs"))
	} else {
		assert.Contains(t, stderr, "the segmentation found no subject")
	}
	assert.FileExists(t, filepath.Join(dir, "models", "tiny-seg.safetensors"))
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
		want string
	}{
		{[]string{"segment", "--model", segPath}, "usage: stepwise segment"},
		{[]string{"segment", "--lib", testenv.LibPath(), "--model", segPath, text, "--out", filepath.Join(dir, "m.png")}, "not a PNG or JPEG"},
		{[]string{"segment", "--lib", testenv.LibPath(), "--model", segPath, small, "--out", filepath.Join(dir, "m.png"), "--data", dir}, "needs at least 16x16"},
		{[]string{"segment", "--lib", testenv.LibPath(), "--model", segPath, small, "--out", "x.png", "--classes", "a"}, "bad class"},
		{[]string{"edit", text}, "usage: stepwise edit"},
		{[]string{"edit", text, "--prompt", "x", "--lib", testenv.LibPath(), "--data", dir}, "not a PNG or JPEG"},
		{[]string{"edit", text, "--prompt", "x", "--sampler", "bogus"}, `unknown sampler "bogus"`},
	}
	for _, tt := range tests {
		code, _, stderr := runCLI(tt.args...)
		assert.Equal(t, 1, code, "%v", tt.args)
		assert.Contains(t, stderr, tt.want, "%v", tt.args)
	}
	runs, _ := os.ReadDir(filepath.Join(dir, "runs"))
	assert.Empty(t, runs, "no partial run directories")
}
