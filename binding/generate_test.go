package binding_test

import (
	"context"
	"image"
	"image/draw"
	_ "image/png"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/internal/testenv"
)

func openSD(t *testing.T, dir string) *binding.SDModel {
	t.Helper()
	m, err := testenv.Library(t).OpenSD(binding.SDOptions{Path: dir})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

func loadPNG(t *testing.T, path string, gray bool) *binding.Image {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	src, _, err := image.Decode(f)
	require.NoError(t, err)
	b := src.Bounds()
	rgba := image.NewNRGBA(b)
	draw.Draw(rgba, b, src, b.Min, draw.Src)
	img := &binding.Image{Width: b.Dx(), Height: b.Dy(), Channels: 3}
	if gray {
		img.Channels = 1
	}
	for y := 0; y < b.Dy(); y++ {
		for x := 0; x < b.Dx(); x++ {
			o := rgba.PixOffset(x, y)
			if gray {
				// PIL's L conversion: (299 R + 587 G + 114 B) / 1000.
				r, g, bb := int(rgba.Pix[o]), int(rgba.Pix[o+1]), int(rgba.Pix[o+2])
				img.Pix = append(img.Pix, byte((r*299+g*587+bb*114+500)/1000))
			} else {
				img.Pix = append(img.Pix, rgba.Pix[o:o+3]...)
			}
		}
	}
	return img
}

func maxAbsDiff(t *testing.T, got []float32, want safetensors.Tensor) float64 {
	t.Helper()
	w, err := want.Float32s()
	require.NoError(t, err)
	require.Equal(t, len(w), len(got))
	var d float64
	for i := range w {
		d = math.Max(d, math.Abs(float64(got[i])-float64(w[i])))
	}
	return d
}

// The goldens were made by the reference pipelines; through the ABI the same
// inputs must give the same image.
func TestGenerateMatchesReferencePipelines(t *testing.T) {
	fx := testenv.Fixtures(t)
	sd15 := openSD(t, filepath.Join(fx, "sd/tiny-sd15"))
	inpaint := openSD(t, filepath.Join(fx, "sd/tiny-inpaint"))
	golden := func(rel string) *safetensors.File {
		f, err := safetensors.Read(filepath.Join(fx, "sd", rel))
		require.NoError(t, err)
		return f
	}
	txt := binding.GenerateRequest{
		Prompt:         "a photograph of an astronaut riding a horse on the moon, highly detailed",
		NegativePrompt: "blurry, low quality, watermark",
		Width:          64, Height: 64, Steps: 4, CFGScale: 7.5, Seed: 1234, BatchSize: 1, PreviewEvery: 1,
	}
	tests := []struct {
		name   string
		model  *binding.SDModel
		golden string
		req    func() binding.GenerateRequest
	}{
		{"txt2img ddim", sd15, "tiny-sd15/golden/txt2img_ddim.safetensors", func() binding.GenerateRequest { r := txt; r.Sampler = binding.DDIM; return r }},
		{"txt2img euler", sd15, "tiny-sd15/golden/txt2img_euler.safetensors", func() binding.GenerateRequest { r := txt; r.Sampler = binding.Euler; return r }},
		{"txt2img euler a", sd15, "tiny-sd15/golden/txt2img_euler_a.safetensors", func() binding.GenerateRequest { r := txt; r.Sampler = binding.EulerA; return r }},
		{"txt2img dpm++ 2m karras", sd15, "tiny-sd15/golden/txt2img_dpmpp_2m_karras.safetensors", func() binding.GenerateRequest {
			r := txt
			r.Sampler = binding.DPMPP2MKarras
			return r
		}},
		{"txt2img plms", sd15, "tiny-sd15/golden/txt2img_pndm.safetensors", func() binding.GenerateRequest { r := txt; r.Sampler = binding.PNDM; return r }},
		{"img2img ddim", sd15, "tiny-sd15/golden/img2img_ddim.safetensors", func() binding.GenerateRequest {
			return binding.GenerateRequest{
				Prompt: "a watercolor painting of a sunny garden", NegativePrompt: "dark, gloomy",
				Width: 64, Height: 64, Steps: 5, CFGScale: 7.5, Seed: 99, BatchSize: 1, Sampler: binding.DDIM,
				Init: loadPNG(t, filepath.Join(fx, "sd/tiny-sd15/golden/img2img_ddim_image.png"), false), Strength: 0.6,
				PreviewEvery: 1,
			}
		}},
		{"inpaint ddim", inpaint, "tiny-inpaint/golden/inpaint_ddim.safetensors", func() binding.GenerateRequest {
			return binding.GenerateRequest{
				Prompt: "a red brick wall with a wooden door", NegativePrompt: "blurry, low quality",
				Width: 64, Height: 64, Steps: 5, CFGScale: 7.5, Seed: 502, BatchSize: 1, Sampler: binding.DDIM,
				Init:     loadPNG(t, filepath.Join(fx, "sd/tiny-inpaint/golden/inpaint_ddim_image.png"), false),
				Mask:     loadPNG(t, filepath.Join(fx, "sd/tiny-inpaint/golden/inpaint_ddim_mask.png"), true),
				Strength: 1, PreviewEvery: 1,
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := golden(tt.golden)
			res, err := tt.model.Generate(context.Background(), tt.req())
			require.NoError(t, err)
			require.Len(t, res.Images, 1)
			assert.Equal(t, []int{1, 64, 64, 3}, res.Pixels.Shape)
			assert.LessOrEqual(t, maxAbsDiff(t, res.Pixels.Data, g.Tensors["image"]), 1e-3, "image")
			// The final latents are the last step of the trajectory.
			steps := g.Tensors["latents_steps"]
			n := int(steps.Shape[0])
			per := len(steps.Data) / n
			last := safetensors.Tensor{DType: "F32", Shape: steps.Shape[1:], Data: steps.Data[(n-1)*per:]}
			assert.LessOrEqual(t, maxAbsDiff(t, res.Latents.Data, last), 1e-3*100, "latents")
			// The 8-bit image is the float image rounded.
			for i, v := range res.Pixels.Data {
				require.Equal(t, byte(math.RoundToEven(float64(v*255))), res.Images[0].Pix[i], "pixel %d", i)
			}
		})
	}
}

func tinyRequest(steps int) binding.GenerateRequest {
	return binding.GenerateRequest{Prompt: "a cat sitting on a chair", Width: 64, Height: 64, Steps: steps,
		CFGScale: 7, Seed: 7, BatchSize: 1, Sampler: binding.EulerA, Strength: 1, PreviewEvery: 1}
}

func TestStepCallbacksAndPreviews(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	m := openSD(t, sdDir)

	var steps []binding.Step
	r := tinyRequest(6)
	r.Preview = binding.PreviewLatent2RGB
	r.BatchSize = 2
	r.OnStep = func(s binding.Step) { steps = append(steps, s) }
	res, err := m.Generate(context.Background(), r)
	require.NoError(t, err)
	require.Len(t, steps, 6, "one callback per step")
	for i, s := range steps {
		assert.Equal(t, i+1, s.Step)
		assert.Equal(t, 6, s.Steps)
		require.Len(t, s.Previews, 2, "one preview per batch image")
		assert.Equal(t, 64, s.Previews[0].Width, "previews have the output's size")
		assert.Equal(t, 64, s.Previews[0].Height)
		assert.Len(t, s.Previews[0].Pix, 64*64*3)
		if i > 0 {
			assert.Less(t, s.Sigma, steps[i-1].Sigma, "noise falls")
			assert.GreaterOrEqual(t, s.Elapsed, steps[i-1].Elapsed)
		}
	}
	require.Len(t, res.Images, 2)
	assert.NotEqual(t, res.Images[0].Pix, res.Images[1].Pix, "batch images differ")

	// VAE previews every 2 steps (and at the last).
	steps = nil
	r = tinyRequest(5)
	r.Preview, r.PreviewEvery = binding.PreviewVAE, 2
	r.OnStep = func(s binding.Step) { steps = append(steps, s) }
	_, err = m.Generate(context.Background(), r)
	require.NoError(t, err)
	require.Len(t, steps, 5)
	var with []int
	for _, s := range steps {
		if len(s.Previews) > 0 {
			with = append(with, s.Step)
			assert.Equal(t, 64, s.Previews[0].Width)
		}
	}
	assert.Equal(t, []int{2, 4, 5}, with)

	// No preview asked, none made.
	steps = nil
	r = tinyRequest(3)
	r.OnStep = func(s binding.Step) { steps = append(steps, s) }
	_, err = m.Generate(context.Background(), r)
	require.NoError(t, err)
	for _, s := range steps {
		assert.Empty(t, s.Previews)
	}
}

func TestSameSeedSameImage(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	m := openSD(t, sdDir)
	a, err := m.Generate(context.Background(), tinyRequest(3))
	require.NoError(t, err)
	b, err := m.Generate(context.Background(), tinyRequest(3))
	require.NoError(t, err)
	assert.Equal(t, a.Images[0].Pix, b.Images[0].Pix)
	r := tinyRequest(3)
	r.Seed++
	c, err := m.Generate(context.Background(), r)
	require.NoError(t, err)
	assert.NotEqual(t, a.Images[0].Pix, c.Images[0].Pix)
}

func TestCancelStopsWithinOneStepAndModelStaysUsable(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	m := openSD(t, sdDir)
	for _, k := range []int{1, 3} {
		ctx, cancel := context.WithCancel(context.Background())
		var calls atomic.Int32
		r := tinyRequest(10)
		r.OnStep = func(s binding.Step) {
			calls.Add(1)
			if s.Step == k {
				cancel()
			}
		}
		_, err := m.Generate(ctx, r)
		cancel()
		require.Error(t, err)
		assert.ErrorIs(t, err, binding.ErrCancelled)
		assert.ErrorIs(t, err, context.Canceled)
		assert.Equal(t, int32(k), calls.Load(), "no step runs after the one that cancelled")
	}
	res, err := m.Generate(context.Background(), tinyRequest(2))
	require.NoError(t, err, "the model works after a cancel")
	assert.Len(t, res.Images, 1)

	// An already-cancelled context does not start.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = m.Generate(ctx, tinyRequest(2))
	assert.ErrorIs(t, err, context.Canceled)
}

func TestMalformedGenerationRequests(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	m := openSD(t, sdDir)
	gray := &binding.Image{Width: 64, Height: 64, Channels: 1, Pix: make([]byte, 64*64)}
	rgb := &binding.Image{Width: 64, Height: 64, Channels: 3, Pix: make([]byte, 64*64*3)}
	smallMask := &binding.Image{Width: 32, Height: 32, Channels: 1, Pix: make([]byte, 32*32)}
	tests := []struct {
		name string
		edit func(r *binding.GenerateRequest)
		want string
	}{
		{"size not a multiple of 8", func(r *binding.GenerateRequest) { r.Width = 100 }, "multiples of 8"},
		{"zero steps", func(r *binding.GenerateRequest) { r.Steps = 0 }, "steps must be between 1 and 1000"},
		{"too many steps", func(r *binding.GenerateRequest) { r.Steps = 10000 }, "steps must be between 1 and 1000"},
		{"unknown sampler", func(r *binding.GenerateRequest) { r.Sampler = binding.Sampler(42) }, "unknown sampler 42"},
		{"zero batch", func(r *binding.GenerateRequest) { r.BatchSize = 0 }, "batch size"},
		{"mask without image", func(r *binding.GenerateRequest) { r.Mask = gray }, "a mask needs an init image"},
		{"mask of the wrong size", func(r *binding.GenerateRequest) { r.Init, r.Mask = rgb, smallMask }, "mask is 32x32"},
		{"init of the wrong size", func(r *binding.GenerateRequest) { r.Width, r.Height, r.Init = 128, 128, rgb }, "init image is 64x64"},
		{"gray init", func(r *binding.GenerateRequest) { r.Init = gray }, "init image must have 3 channels"},
		{"pixels missing", func(r *binding.GenerateRequest) {
			r.Init = &binding.Image{Width: 64, Height: 64, Channels: 3, Pix: make([]byte, 10)}
		}, "does not match"},
		{"strength out of range", func(r *binding.GenerateRequest) { r.Init, r.Strength = rgb, 1.5 }, "strength"},
		// Zeros reach the engine as zeros: the binding fills no defaults of its own.
		{"zero strength", func(r *binding.GenerateRequest) { r.Init, r.Strength = rgb, 0 }, "strength must be in (0, 1]"},
		{"zero preview interval", func(r *binding.GenerateRequest) { r.PreviewEvery = 0 }, "preview_every must be at least 1"},
		{"bad preview", func(r *binding.GenerateRequest) { r.Preview = binding.Preview(9) }, "unknown preview"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := tinyRequest(2)
			tt.edit(&r)
			_, err := m.Generate(context.Background(), r)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
	_, err := binding.ParseSampler("k_lms_turbo")
	assert.ErrorIs(t, err, binding.ErrUnknownSampler)
	assert.ErrorContains(t, err, `unknown sampler "k_lms_turbo"`)
	for _, si := range binding.Samplers {
		got, err := binding.ParseSampler(strings.ToUpper(si.Name))
		require.NoError(t, err, si.Name)
		assert.Equal(t, si.Sampler, got)
		assert.Equal(t, si.Name, got.String())
	}
	res, err := m.Generate(context.Background(), tinyRequest(1))
	require.NoError(t, err, "still healthy")
	assert.Len(t, res.Images, 1)
}

func TestTokenizeAndLongPrompts(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	m := openSD(t, sdDir)
	ids, err := m.Tokenize("a cat sitting on a chair")
	require.NoError(t, err)
	assert.NotEmpty(t, ids)
	long := ""
	for i := 0; i < 100; i++ {
		long += "cat "
	}
	ids, err = m.Tokenize(long)
	require.NoError(t, err)
	assert.Len(t, ids, 100)
	r := tinyRequest(1)
	r.Prompt = long
	res, err := m.Generate(context.Background(), r)
	require.NoError(t, err)
	assert.True(t, res.Truncated)
	assert.Equal(t, 100, res.Tokens)
}
