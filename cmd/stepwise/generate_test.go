package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/internal/testenv"
)

func TestGenerateWritesImagesAndLatents(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	dir := t.TempDir()
	out := filepath.Join(dir, "cat.png")
	lat := filepath.Join(dir, "cat.safetensors")
	prev := filepath.Join(dir, "previews")
	code, stdout, stderr := runCLI("generate", "--lib", testenv.LibPath(), "--model", sdDir, "--prompt", "a cat",
		"--width", "64", "--height", "48", "--steps", "3", "--seed", "5", "--batch-size", "2", "--sampler", "Euler a",
		"--preview", "latent2rgb", "--preview-dir", prev, "--out", out, "--save-latents", lat)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "seed 5, euler_a, 3 steps")
	for _, name := range []string{"cat-0.png", "cat-1.png"} {
		assert.Equal(t, [2]int{64, 48}, pngSize(t, filepath.Join(dir, name)), name)
	}
	previews, _ := filepath.Glob(filepath.Join(prev, "step-*.png"))
	assert.Len(t, previews, 6, "3 steps x 2 images")
	f, err := safetensors.Read(lat)
	require.NoError(t, err)
	assert.Equal(t, []int64{2, 4, 6, 8}, f.Tensors["latents"].Shape)
	assert.Equal(t, []int64{2, 48, 64, 3}, f.Tensors["image"].Shape)
	assert.Equal(t, "F32", f.Tensors["image"].DType)

	// img2img from the image just made, and inpaint with a mask.
	mask := filepath.Join(dir, "mask.png")
	require.NoError(t, os.WriteFile(mask, whitePNG(t, 64, 48), 0o644))
	code, stdout, stderr = runCLI("generate", "--lib", testenv.LibPath(), "--model", sdDir, "--prompt", "a dog",
		"--init", filepath.Join(dir, "cat-0.png"), "--strength", "0.5", "--steps", "4", "--seed", "2", "--out", filepath.Join(dir, "dog.png"))
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "seed 2, euler_a, 4 steps", "the sampler left out is the pipeline's default")
	code, _, stderr = runCLI("generate", "--lib", testenv.LibPath(), "--model", sdDir, "--prompt", "a dog",
		"--init", filepath.Join(dir, "cat-0.png"), "--mask", mask, "--steps", "2", "--out", filepath.Join(dir, "dog2.png"))
	require.Equal(t, 0, code, stderr)
	for _, name := range []string{"dog.png", "dog2.png"} {
		assert.Equal(t, [2]int{64, 48}, pngSize(t, filepath.Join(dir, name)), "%s has the init image's size", name)
	}
}

// pngSize is the width and height of the PNG at path.
func pngSize(t *testing.T, path string) [2]int {
	b := testenv.ReadPNG(t, path).Bounds()
	return [2]int{b.Dx(), b.Dy()}
}

func TestGenerateBadInput(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	dir := t.TempDir()
	notImage := filepath.Join(dir, "x.png")
	require.NoError(t, os.WriteFile(notImage, []byte("hello"), 0o644))
	base := []string{"generate", "--lib", testenv.LibPath(), "--model", sdDir, "--out", filepath.Join(dir, "o.png")}
	tests := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"generate", "--prompt", "x"}, exitUsage, `required flag(s) "model", "out" not set`},
		{append(base, "--prompt", "x", "extra"), exitUsage, `unknown command "extra" for "stepwise generate"`},
		{append(base, "--prompt", "x", "--steps", "many"), exitUsage, `invalid argument "many" for "--steps"`},
		{append(base, "--prompt", "x", "--sampler", "nope"), exitError, `unknown sampler "nope"`},
		{append(base, "--prompt", "x", "--width", "100", "--height", "64", "--steps", "1"), exitError, "multiples of 8"},
		{append(base, "--prompt", "x", "--width", "64", "--height", "64", "--steps", "0"), exitError, "steps must be between"},
		{append(base, "--prompt", "x", "--dtype", "int4"), exitError, `unknown dtype "int4"`},
		// Small and short: were the flag ignored, the run would succeed at once.
		{append(base, "--prompt", "x", "--backend", "nope", "--width", "64", "--height", "64", "--steps", "1"), exitError, `unknown backend "nope"`},
		{append(base, "--prompt", "x", "--dtype", "q8_0", "--width", "64", "--height", "64", "--steps", "1"), exitError, "dtype q8_0 is for the sdcpp backend only"},
		// Built with it: the tiny model is refused by its shapes; without: the backend is unavailable.
		{append(base, "--prompt", "x", "--backend", "sdcpp", "--width", "64", "--height", "64", "--steps", "1"), exitError, "sdcpp backend"},
		{append(base, "--prompt", "x", "--init", notImage), exitError, "not a PNG or JPEG"},
		{append(base, "--prompt", "x", "--mask", notImage), exitError, "a mask needs an init image"},
		{append(base[:4], "/nonexistent/model", "--out", "o.png", "--prompt", "x"), exitError, "no such file"},
	}
	for _, tt := range tests {
		code, _, stderr := runCLI(tt.args...)
		assert.Equal(t, tt.code, code, "%v", tt.args)
		assert.Contains(t, stderr, tt.want, "%v", tt.args)
	}
}
