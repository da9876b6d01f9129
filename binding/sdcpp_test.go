package binding_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/internal/testenv"
)

func sdcppRequest(steps int) binding.GenerateRequest {
	return binding.GenerateRequest{Prompt: "a cat sitting on a chair", Width: 64, Height: 64, Steps: steps,
		CFGScale: 7, Seed: 7, BatchSize: 1, Sampler: binding.Euler, Strength: 1, PreviewEvery: 1}
}

// TestSDCPPBackend runs the sdcpp backend on one SD 1.5-sized model, opened
// once, at 64x64 with 2 steps.
func TestSDCPPBackend(t *testing.T) {
	lib := testenv.SDCPP(t)
	dir := testenv.SD15Random(t, lib)
	m, err := lib.OpenSD(binding.SDOptions{Path: dir, Backend: binding.BackendSDCPP, DType: binding.F16})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	info := m.Info()
	assert.Contains(t, info.Arch, "stable-diffusion.cpp")
	assert.Equal(t, binding.F16, info.DType)
	assert.Greater(t, info.Params, int64(1_000_000_000), "SD 1.5 has about 1.07e9 parameters")
	assert.Equal(t, 2*info.Params, info.WeightBytes, "f16 weights from a float32 file")

	t.Run("steps report once each and images come back RGB", func(t *testing.T) {
		var steps []binding.Step
		r := sdcppRequest(2)
		r.OnStep = func(s binding.Step) { steps = append(steps, s) }
		res, err := m.Generate(context.Background(), r)
		require.NoError(t, err)
		require.Len(t, steps, 2)
		for i, s := range steps {
			assert.Equal(t, i+1, s.Step)
			assert.Equal(t, 2, s.Steps)
			assert.Empty(t, s.Previews, "no preview was asked for")
		}
		require.Len(t, res.Images, 1)
		img := res.Images[0]
		assert.Equal(t, [3]int{64, 64, 3}, [3]int{img.Width, img.Height, img.Channels})
		require.Len(t, img.Pix, 64*64*3)
		assert.Empty(t, res.Latents.Data, "stable-diffusion.cpp hands out no latents")
		assert.Equal(t, []int{1, 64, 64, 3}, res.Pixels.Shape)
		assert.Positive(t, res.Tokens)
		// The phases, as its progress reports mark them.
		assert.Positive(t, res.Text, "the call's start to the first step")
		assert.Positive(t, res.Denoise)
		assert.Positive(t, res.Decode, "the last step to the end")
		assert.Less(t, res.Denoise, steps[1].Elapsed, "the text encoding is not in the denoising")

		again, err := m.Generate(context.Background(), sdcppRequest(2))
		require.NoError(t, err)
		assert.True(t, bytes.Equal(img.Pix, again.Images[0].Pix), "the same seed gives the same image")
		r = sdcppRequest(2)
		r.Seed = 8
		other, err := m.Generate(context.Background(), r)
		require.NoError(t, err)
		assert.False(t, bytes.Equal(img.Pix, other.Images[0].Pix), "another seed gives another image")
	})

	t.Run("batch and previews", func(t *testing.T) {
		var steps []binding.Step
		r := sdcppRequest(2)
		r.BatchSize = 2
		r.Preview = binding.PreviewLatent2RGB
		r.OnStep = func(s binding.Step) { steps = append(steps, s) }
		res, err := m.Generate(context.Background(), r)
		require.NoError(t, err)
		require.Len(t, res.Images, 2)
		require.Len(t, steps, 4, "the batch items are sampled one after another")
		for i, s := range steps {
			assert.Equal(t, i+1, s.Step)
			assert.Equal(t, 4, s.Steps)
			require.Len(t, s.Previews, 1, "step %d", s.Step)
			p := s.Previews[0]
			assert.Equal(t, [3]int{64, 64, 3}, [3]int{p.Width, p.Height, p.Channels}, "previews come at the output size")
		}
	})

	t.Run("vae previews on the steps preview_every picks", func(t *testing.T) {
		var steps []binding.Step
		r := sdcppRequest(3)
		r.Preview, r.PreviewEvery = binding.PreviewVAE, 2
		r.OnStep = func(s binding.Step) { steps = append(steps, s) }
		_, err := m.Generate(context.Background(), r)
		require.NoError(t, err)
		require.Len(t, steps, 3)
		got := []int{len(steps[0].Previews), len(steps[1].Previews), len(steps[2].Previews)}
		assert.Equal(t, []int{0, 1, 1}, got, "step 2 (every 2nd) and the last step")
		p := steps[1].Previews[0]
		assert.Equal(t, [3]int{64, 64, 3}, [3]int{p.Width, p.Height, p.Channels})
	})

	t.Run("cancel after step k stops inside step k+1", func(t *testing.T) {
		for _, k := range []int{1, 2} {
			ctx, cancel := context.WithCancel(context.Background())
			var calls atomic.Int32
			r := sdcppRequest(4)
			r.OnStep = func(s binding.Step) {
				calls.Add(1)
				if s.Step == k {
					cancelSoonAfter(cancel)
				}
			}
			_, err := m.Generate(ctx, r)
			cancel()
			require.Error(t, err, "k=%d", k)
			assert.ErrorIs(t, err, binding.ErrCancelled)
			// The cancel reaches the engine while step k+1 computes (a step
			// takes far longer than cancelSoonAfter's pause): it aborts that
			// step's graph, so step k+1 is never reported.
			assert.Equal(t, int32(k), calls.Load(), "k=%d: step k+1 was stopped before it finished", k)
		}
		res, err := m.Generate(context.Background(), sdcppRequest(2))
		require.NoError(t, err, "the model works after a cancel")
		assert.Len(t, res.Images, 1)
	})

	t.Run("samplers it lacks are refused", func(t *testing.T) {
		for _, s := range []binding.Sampler{binding.DDIM, binding.PNDM} {
			r := sdcppRequest(2)
			r.Sampler = s
			_, err := m.Generate(context.Background(), r)
			require.Error(t, err, "%v", s)
			assert.ErrorIs(t, err, binding.ErrUnsupported)
		}
		for _, s := range []binding.Sampler{binding.EulerA, binding.DPMPP2MKarras} {
			r := sdcppRequest(1)
			r.Sampler = s
			_, err := m.Generate(context.Background(), r)
			require.NoError(t, err, "%v", s)
		}
	})

	t.Run("img2img and inpaint", func(t *testing.T) {
		init := &binding.Image{Width: 64, Height: 64, Channels: 3, Pix: make([]byte, 64*64*3)}
		for i := range init.Pix {
			init.Pix[i] = byte(i * 7 % 251)
		}
		gray := func(v byte) *binding.Image {
			m := &binding.Image{Width: 64, Height: 64, Channels: 1, Pix: make([]byte, 64*64)}
			for i := range m.Pix {
				m.Pix[i] = v
			}
			return m
		}
		run := func(mask *binding.Image) ([]binding.Step, *binding.GenerateResult) {
			var steps []binding.Step
			r := sdcppRequest(4)
			r.Init, r.Strength, r.Mask = init, 0.5, mask
			r.OnStep = func(s binding.Step) { steps = append(steps, s) }
			res, err := m.Generate(context.Background(), r)
			require.NoError(t, err)
			require.Len(t, res.Images, 1)
			return steps, res
		}
		steps, img2img := run(nil)
		require.NotEmpty(t, steps)
		assert.Less(t, steps[0].Steps, 4, "strength 0.5 runs fewer steps than asked for")
		assert.Len(t, steps, steps[0].Steps, "one event per step it runs")

		_, white := run(gray(255))
		assert.True(t, bytes.Equal(img2img.Images[0].Pix, white.Images[0].Pix), "a white mask repaints everything: img2img")
		_, black := run(gray(0))
		assert.False(t, bytes.Equal(img2img.Images[0].Pix, black.Images[0].Pix), "a black mask keeps the init image")

		r := sdcppRequest(2)
		r.Mask = gray(255)
		_, err := m.Generate(context.Background(), r)
		assert.ErrorIs(t, err, binding.ErrInvalidArgument, "a mask needs an init image")
	})
}

// truncatedCopy writes the first half of src to a new .safetensors file.
func truncatedCopy(t *testing.T, src string) string {
	t.Helper()
	in, err := os.Open(src)
	require.NoError(t, err)
	defer in.Close()
	st, err := in.Stat()
	require.NoError(t, err)
	dst := filepath.Join(t.TempDir(), "truncated.safetensors")
	out, err := os.Create(dst)
	require.NoError(t, err)
	_, err = io.CopyN(out, in, st.Size()/2)
	require.NoError(t, err)
	require.NoError(t, out.Close())
	return dst
}

// sd15Variant lays out a copy of the SD 1.5-sized folder sd15 whose files are
// links to the originals except those replace writes, by their path in the
// folder: a model that passes stepwise's checks and that
// stable-diffusion.cpp's own refuses.
func sd15Variant(t *testing.T, sd15 string, replace map[string]func(path string)) string {
	t.Helper()
	dir := t.TempDir()
	for _, rel := range []string{"model_index.json", "text_encoder/model.safetensors",
		"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"} {
		dst := filepath.Join(dir, rel)
		require.NoError(t, os.MkdirAll(filepath.Dir(dst), 0o755))
		if write, ok := replace[rel]; ok {
			write(dst)
			continue
		}
		require.NoError(t, os.Symlink(filepath.Join(sd15, rel), dst))
	}
	return dir
}

// withShape writes a safetensors file with src's header, tensor name's shape
// reversed, and src's data size in zeros (a sparse file: stable-diffusion.cpp
// refuses the header before it reads any data).
func withShape(t *testing.T, src, name string) func(string) {
	return func(dst string) {
		entries, start := stHeader(t, src)
		e, ok := entries[name]
		require.True(t, ok, "%s holds %s", src, name)
		e.Shape = slices.Clone(e.Shape)
		slices.Reverse(e.Shape)
		entries[name] = e
		st, err := os.Stat(src)
		require.NoError(t, err)
		h, err := json.Marshal(entries)
		require.NoError(t, err)
		f, err := os.Create(dst)
		require.NoError(t, err)
		require.NoError(t, binary.Write(f, binary.LittleEndian, uint64(len(h))))
		_, err = f.Write(h)
		require.NoError(t, err)
		require.NoError(t, f.Truncate(int64(8+len(h))+st.Size()-start))
		require.NoError(t, f.Close())
	}
}

// TestSDCPPOpenErrors: what stable-diffusion.cpp could abort on is refused
// with a typed error before it sees it, and what it refuses itself (it
// returns no context, measured: it aborts on none of these) is a typed error
// too.
func TestSDCPPOpenErrors(t *testing.T) {
	lib := testenv.SDCPP(t)
	sdDir, _ := testenv.Tiny(t)
	sd15 := testenv.SD15Random(t, lib) // a model it takes, for the checks that must refuse it anyway
	fifo := filepath.Join(t.TempDir(), "fifo.safetensors")
	require.NoError(t, syscall.Mkfifo(fifo, 0o644))
	for _, tc := range []struct {
		name  string
		opts  binding.SDOptions
		want  error
		input func() string
		names string // a part of the message, where it must name the culprit
	}{
		{name: "missing file", opts: binding.SDOptions{Path: filepath.Join(t.TempDir(), "none.safetensors")}, want: binding.ErrNotFound},
		{name: "truncated file", input: func() string {
			return truncatedCopy(t, filepath.Join(sdDir, "unet", "diffusion_pytorch_model.safetensors"))
		}, want: binding.ErrFormat},
		{name: "fifo", opts: binding.SDOptions{Path: fifo}, want: binding.ErrIO},
		{name: "not SD 1.5's sizes", opts: binding.SDOptions{Path: sdDir}, want: binding.ErrUnsupported},
		{name: "bf16", opts: binding.SDOptions{Path: sd15, DType: binding.BF16}, want: binding.ErrUnsupported},
		{name: "a device it lacks", opts: binding.SDOptions{Path: sd15, Device: "cuda:0"}, want: binding.ErrUnsupported},
		{name: "not a safetensors file", opts: binding.SDOptions{Path: filepath.Join(sdDir, "model_index.json")}, want: binding.ErrUnsupported},
		// Past stepwise's checks: stable-diffusion.cpp's own.
		{name: "a UNet with only the tensors stepwise checks", input: func() string {
			return sd15Variant(t, sd15, map[string]func(string){"unet/diffusion_pytorch_model.safetensors": func(p string) {
				require.NoError(t, safetensors.Write(p, map[string]safetensors.Tensor{
					"conv_in.weight":  safetensors.F32([]int64{320, 4, 3, 3}, make([]float32, 320*4*9)),
					"conv_out.weight": safetensors.F32([]int64{4, 320, 3, 3}, make([]float32, 4*320*9)),
				}, nil))
			}})
		}, want: binding.ErrFormat},
		{name: "a text-encoder tensor of another shape", input: func() string {
			te := "text_encoder/model.safetensors"
			return sd15Variant(t, sd15, map[string]func(string){
				te: withShape(t, filepath.Join(sd15, te), "text_model.encoder.layers.0.mlp.fc1.weight")})
		}, want: binding.ErrFormat, names: "layers.0.mlp.fc1.weight"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.opts
			if tc.input != nil {
				o.Path = tc.input()
			}
			o.Backend = binding.BackendSDCPP
			m, err := lib.OpenSD(o)
			require.Error(t, err)
			assert.Nil(t, m)
			assert.ErrorIs(t, err, tc.want, "%v", err)
			if tc.names != "" {
				assert.Contains(t, err.Error(), tc.names, "the error names what is wrong, not only that it is")
			}
		})
	}
}

// TestBackendsAndDTypes needs no stable-diffusion.cpp: the names parse, the
// libtorch backend is always there and refuses the quantised types, and an
// unknown backend number is refused.
func TestBackendsAndDTypes(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want binding.Backend
	}{{"", binding.BackendLibtorch}, {"libtorch", binding.BackendLibtorch}, {"SDCPP", binding.BackendSDCPP}, {"stable-diffusion.cpp", binding.BackendSDCPP}} {
		got, err := binding.ParseBackend(tc.in)
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, got, tc.in)
		if tc.in != "" && tc.in != "stable-diffusion.cpp" {
			again, err := binding.ParseBackend(got.String())
			require.NoError(t, err)
			assert.Equal(t, got, again)
		}
	}
	_, err := binding.ParseBackend("onnx")
	var ub *binding.UnknownBackendError
	require.True(t, errors.As(err, &ub))
	assert.Equal(t, "onnx", ub.Name)

	for _, s := range []string{"q8_0", "q5_0", "q4_0"} {
		d, err := binding.ParseDType(s)
		require.NoError(t, err)
		assert.Equal(t, s, d.String())
	}

	lib := testenv.Library(t)
	require.NoError(t, lib.BackendAvailable(binding.BackendLibtorch))
	assert.ErrorIs(t, lib.BackendAvailable(binding.Backend(7)), binding.ErrInvalidArgument)
	v := lib.Version()
	require.Len(t, v.Backends, 2)
	assert.True(t, v.Backends[0].Available)
	assert.Empty(t, v.Backends[0].Library, "libtorch is linked, not loaded")
	assert.Equal(t, v.Backends[1].Available, v.Backends[1].Reason == "")
	if v.Backends[1].Available {
		assert.FileExists(t, v.Backends[1].Library, "the stable-diffusion.cpp build it found")
	} else {
		assert.Empty(t, v.Backends[1].Library)
	}
	assert.Contains(t, v.Build, "backends: libtorch")

	sdDir, _ := testenv.Tiny(t)
	_, err = lib.OpenSD(binding.SDOptions{Path: sdDir, DType: binding.Q8_0})
	assert.ErrorIs(t, err, binding.ErrUnsupported, "q8_0 is for the sdcpp backend only")
	_, err = lib.OpenSD(binding.SDOptions{Path: sdDir, Backend: binding.Backend(7)})
	assert.ErrorIs(t, err, binding.ErrInvalidArgument)
}

// TestSDCPPQuantised opens the model converted to q8_0 on load and generates.
func TestSDCPPQuantised(t *testing.T) {
	lib := testenv.SDCPP(t)
	dir := testenv.SD15Random(t, lib)
	m, err := lib.OpenSD(binding.SDOptions{Path: dir, Backend: binding.BackendSDCPP, DType: binding.Q8_0})
	require.NoError(t, err)
	defer m.Close()
	info := m.Info()
	assert.Equal(t, binding.Q8_0, info.DType)
	assert.Equal(t, info.Params*34/32, info.WeightBytes, "q8_0 stores 32 weights in 34 bytes")
	res, err := m.Generate(context.Background(), sdcppRequest(1))
	require.NoError(t, err)
	require.Len(t, res.Images, 1)
	assert.Len(t, res.Images[0].Pix, 64*64*3)
}

// TestSDCPPMatchesLibtorch: the same request and seed give the same image in
// both backends, to a level or two of 255: the same initial latents (sd.cpp's
// CPU_RNG is torch's CPU generator), the same Euler sigmas for 4 steps, the
// same model computed twice. The model folder is the SD 1.5-sized one without
// its test tokenizer, so both tokenize with CLIP's vocabulary.
func TestSDCPPMatchesLibtorch(t *testing.T) {
	lib := testenv.SDCPP(t)
	sd15 := testenv.SD15Random(t, lib)
	dir := t.TempDir()
	for _, name := range []string{"model_index.json", "scheduler", "text_encoder", "unet", "vae"} {
		require.NoError(t, os.Symlink(filepath.Join(sd15, name), filepath.Join(dir, name)))
	}
	image := func(b binding.Backend) []byte {
		m, err := lib.OpenSD(binding.SDOptions{Path: dir, Backend: b, DType: binding.F32})
		require.NoError(t, err)
		defer m.Close() // before the other opens: one f32 SD 1.5 at a time
		r := sdcppRequest(4)
		r.CFGScale = 7.5
		res, err := m.Generate(context.Background(), r)
		require.NoError(t, err)
		return res.Images[0].Pix
	}
	torch, sdcpp := image(binding.BackendLibtorch), image(binding.BackendSDCPP)
	require.Len(t, sdcpp, len(torch))
	maxDiff, sq := 0, 0.0
	for i := range torch {
		d := int(torch[i]) - int(sdcpp[i])
		maxDiff = max(maxDiff, d, -d)
		sq += float64(d * d)
	}
	t.Logf("libtorch against sdcpp, f32, 64², 4 steps: max |Δ| %d, mean square %.3f", maxDiff, sq/float64(len(torch)))
	assert.LessOrEqual(t, maxDiff, 4, "the same image, to a few levels of 255")
	assert.Less(t, sq/float64(len(torch)), 1.0, "most pixels equal")
}
