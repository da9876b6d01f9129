package binding_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/models"
)

func TestTinyModelsOpenAndClose(t *testing.T) {
	lib := testenv.Library(t)
	sdDir, segPath := testenv.Tiny(t)

	sd, err := lib.OpenSD(binding.SDOptions{Path: sdDir})
	require.NoError(t, err)
	info := sd.Info()
	assert.Greater(t, info.Params, int64(1_000_000))
	assert.Zero(t, info.WeightBytes%4, "float32 on the cpu")
	assert.Less(t, info.WeightBytes, info.Params*4, "the token table, left in the file, is not counted")
	assert.Equal(t, binding.F32, info.DType)
	assert.Equal(t, "cpu", info.Device)
	assert.Contains(t, info.Arch, "sd1")
	require.NoError(t, sd.Close())
	require.NoError(t, sd.Close(), "closing twice is harmless")

	seg, err := lib.OpenSeg(binding.SegOptions{Path: segPath})
	require.NoError(t, err)
	assert.Contains(t, seg.Info().Arch, "seg-unet 3->2 width 8")
	require.NoError(t, seg.Close())
}

func TestHalfPrecisionLoadHalvesMemory(t *testing.T) {
	lib := testenv.Library(t)
	sdDir, _ := testenv.Tiny(t)
	f32, err := lib.OpenSD(binding.SDOptions{Path: sdDir, DType: binding.F32})
	require.NoError(t, err)
	full := f32.Info()
	require.NoError(t, f32.Close())
	// Every counted weight takes 4 bytes in float32 and 2 in half precision;
	// the token table, left in the file, is not counted in either.
	require.Zero(t, full.WeightBytes%4)
	inFile := full.Params - full.WeightBytes/4
	require.Positive(t, inFile, "the token table is left in the file, not counted")
	for _, dt := range []binding.DType{binding.F16, binding.BF16} {
		m, err := lib.OpenSD(binding.SDOptions{Path: sdDir, DType: dt})
		if dt == binding.F16 && err != nil {
			// A libtorch without half-precision CPU kernels (1.13) refuses
			// f16 on the cpu at open, rather than failing at the first step.
			assert.ErrorIs(t, err, binding.ErrUnsupported)
			continue
		}
		require.NoError(t, err, dt.String())
		assert.Equal(t, dt, m.Info().DType)
		assert.Equal(t, (m.Info().Params-inFile)*2, m.Info().WeightBytes)
		if dt == binding.F16 {
			// It opened, so it runs.
			_, err := m.Generate(context.Background(), binding.GenerateRequest{Prompt: "x", Width: 64, Height: 64, Steps: 1,
				BatchSize: 1, CFGScale: 7, Sampler: binding.Euler, Strength: 1, PreviewEvery: 1})
			assert.NoError(t, err, "f16 opened on the cpu, so it generates")
		}
		m.Close()
	}
}

func TestTinyModelsAreDeterministic(t *testing.T) {
	lib := testenv.Library(t)
	sdDir, segPath := testenv.Tiny(t)
	sd2, seg2, err := models.MakeTiny(lib, t.TempDir())
	require.NoError(t, err)
	for _, rel := range []string{"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
		"text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"} {
		a, err := os.ReadFile(filepath.Join(sdDir, rel))
		require.NoError(t, err)
		b, err := os.ReadFile(filepath.Join(sd2, rel))
		require.NoError(t, err)
		assert.Equal(t, a, b, rel)
	}
	a, _ := os.ReadFile(segPath)
	b, _ := os.ReadFile(seg2)
	assert.Equal(t, a, b)
}

func TestReferenceFixturesOpen(t *testing.T) {
	lib := testenv.Library(t)
	fx := testenv.Fixtures(t)
	for _, dir := range []string{"sd/tiny-sd15", "sd/tiny-inpaint"} {
		m, err := lib.OpenSD(binding.SDOptions{Path: filepath.Join(fx, dir)})
		require.NoError(t, err, dir)
		assert.Greater(t, m.Info().Params, int64(1_900_000), dir)
		m.Close()
	}
	for _, f := range []string{"seg/seg-unet-w8/model.safetensors", "seg/seg-unet-w8-bilinear/model.safetensors"} {
		m, err := lib.OpenSeg(binding.SegOptions{Path: filepath.Join(fx, f)})
		require.NoError(t, err, f)
		assert.Contains(t, m.Info().Arch, "seg-unet 3->2 width 8")
		m.Close()
	}
}

// rawSafetensors splits a file into its header map and data section.
func rawSafetensors(t *testing.T, path string) (map[string]json.RawMessage, []byte) {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	n := binary.LittleEndian.Uint64(b)
	var h map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(b[8:8+n], &h))
	return h, b[8+n:]
}

func writeRaw(t *testing.T, path string, header map[string]json.RawMessage, data []byte) {
	t.Helper()
	hb, err := json.Marshal(header)
	require.NoError(t, err)
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(hb)))
	out = append(append(out, hb...), data...)
	require.NoError(t, os.WriteFile(path, out, 0o644))
}

func TestCorruptSegmentationFilesGiveClearErrors(t *testing.T) {
	lib := testenv.Library(t)
	_, segPath := testenv.Tiny(t)
	orig, err := os.ReadFile(segPath)
	require.NoError(t, err)
	dir := t.TempDir()

	setEntry := func(h map[string]json.RawMessage, name string, f func(e map[string]any)) {
		var e map[string]any
		require.NoError(t, json.Unmarshal(h[name], &e))
		f(e)
		b, _ := json.Marshal(e)
		h[name] = b
	}
	const victim = "outc.conv.weight"
	tests := []struct {
		name   string
		make   func(path string)
		status binding.Status
		want   []string
	}{
		{"missing file", func(string) {}, binding.StatusNotFound, []string{"No such file"}},
		{"empty file", func(p string) { os.WriteFile(p, nil, 0o644) }, binding.StatusFormat, []string{"truncated"}},
		{"truncated data", func(p string) { os.WriteFile(p, orig[:len(orig)/2], 0o644) }, binding.StatusFormat,
			[]string{"truncated", "tensor "}},
		{"truncated header", func(p string) { os.WriteFile(p, orig[:40], 0o644) }, binding.StatusFormat,
			[]string{"truncated", "header"}},
		{"garbage header", func(p string) {
			b := binary.LittleEndian.AppendUint64(nil, 12)
			os.WriteFile(p, append(b, []byte("{not json!!}")...), 0o644)
		}, binding.StatusFormat, []string{"bad safetensors header"}},
		{"absurd header length", func(p string) {
			b := binary.LittleEndian.AppendUint64(nil, 1<<40)
			os.WriteFile(p, append(b, orig[8:]...), 0o644)
		}, binding.StatusFormat, []string{"header length"}},
		{"offsets past the end", func(p string) {
			h, data := rawSafetensors(t, segPath)
			setEntry(h, victim, func(e map[string]any) {
				off := e["data_offsets"].([]any)
				e["data_offsets"] = []any{off[0], off[1].(float64) + 4096}
			})
			writeRaw(t, p, h, data)
		}, binding.StatusFormat, []string{victim, "data_offsets span"}},
		{"offsets shifted", func(p string) {
			h, data := rawSafetensors(t, segPath)
			setEntry(h, victim, func(e map[string]any) {
				off := e["data_offsets"].([]any)
				e["data_offsets"] = []any{off[0].(float64) + 4, off[1].(float64) + 4}
			})
			writeRaw(t, p, h, data)
		}, binding.StatusFormat, []string{"data_offsets"}},
		{"missing tensor", func(p string) {
			f, err := safetensors.Read(segPath)
			require.NoError(t, err)
			delete(f.Tensors, "up2.conv.double_conv.4.running_var")
			require.NoError(t, safetensors.Write(p, f.Tensors, f.Metadata))
		}, binding.StatusNotFound, []string{"missing tensor up2.conv.double_conv.4.running_var"}},
		{"integer weights", func(p string) {
			f, err := safetensors.Read(segPath)
			require.NoError(t, err)
			tt := f.Tensors["inc.double_conv.0.weight"]
			tt.DType = "I32"
			f.Tensors["inc.double_conv.0.weight"] = tt
			require.NoError(t, safetensors.Write(p, f.Tensors, f.Metadata))
		}, binding.StatusFormat, []string{"inc.double_conv.0.weight", "dtype I32"}},
		{"unknown dtype", func(p string) {
			h, data := rawSafetensors(t, segPath)
			setEntry(h, victim, func(e map[string]any) { e["dtype"] = "F8_E4M3" })
			writeRaw(t, p, h, data)
		}, binding.StatusUnsupported, []string{victim, "unsupported dtype F8_E4M3"}},
		{"wrong shape", func(p string) {
			f, err := safetensors.Read(segPath)
			require.NoError(t, err)
			tt := f.Tensors["up1.conv.double_conv.1.weight"]
			tt.Shape = []int64{tt.Shape[0] / 2, 2}
			f.Tensors["up1.conv.double_conv.1.weight"] = tt
			require.NoError(t, safetensors.Write(p, f.Tensors, f.Metadata))
		}, binding.StatusFormat, []string{"up1.conv.double_conv.1.weight", "has shape"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, tt.name+".safetensors")
			tt.make(p)
			m, err := lib.OpenSeg(binding.SegOptions{Path: p})
			assert.Nil(t, m)
			requireStatus(t, err, tt.status)
			assert.Contains(t, err.Error(), p, "the error names the file")
			for _, w := range tt.want {
				assert.Contains(t, err.Error(), w)
			}
		})
	}
	// The library is still healthy.
	m, err := lib.OpenSeg(binding.SegOptions{Path: segPath})
	require.NoError(t, err)
	m.Close()
}

func TestBrokenSDFoldersGiveClearErrors(t *testing.T) {
	lib := testenv.Library(t)
	sdDir, _ := testenv.Tiny(t)
	tests := []struct {
		name   string
		breakF func(dir string)
		status binding.Status
		want   string
	}{
		{"no model_index.json", func(d string) { os.Remove(filepath.Join(d, "model_index.json")) },
			binding.StatusUnsupported, "not a diffusers folder"},
		{"tokenizer folder without vocab.json", func(d string) { os.Remove(filepath.Join(d, "tokenizer/vocab.json")) },
			binding.StatusNotFound, "vocab.json"},
		// Without a tokenizer folder the built-in CLIP vocabulary is used, and
		// the tiny text encoder is too small for it.
		{"no tokenizer folder, text encoder smaller than CLIP's vocabulary", func(d string) { os.RemoveAll(filepath.Join(d, "tokenizer")) },
			binding.StatusFormat, "the built-in CLIP vocabulary has 49408 tokens"},
		{"missing unet weights", func(d string) { os.Remove(filepath.Join(d, "unet/diffusion_pytorch_model.safetensors")) },
			binding.StatusNotFound, "diffusion_pytorch_model.safetensors"},
		{"bad unet config", func(d string) { os.WriteFile(filepath.Join(d, "unet/config.json"), []byte("{"), 0o644) },
			binding.StatusFormat, "unet/config.json"},
		{"config disagrees with weights", func(d string) {
			b, _ := os.ReadFile(filepath.Join(d, "unet/config.json"))
			var c map[string]any
			json.Unmarshal(b, &c)
			c["block_out_channels"] = []int{32, 96}
			b, _ = json.Marshal(c)
			os.WriteFile(filepath.Join(d, "unet/config.json"), b, 0o644)
		}, binding.StatusFormat, "has shape"},
		{"unsupported block", func(d string) {
			b, _ := os.ReadFile(filepath.Join(d, "unet/config.json"))
			var c map[string]any
			json.Unmarshal(b, &c)
			c["addition_embed_type"] = "text_time"
			b, _ = json.Marshal(c)
			os.WriteFile(filepath.Join(d, "unet/config.json"), b, 0o644)
		}, binding.StatusUnsupported, "addition_embed_type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := t.TempDir()
			testenv.CopyTree(t, sdDir, d)
			tt.breakF(d)
			m, err := lib.OpenSD(binding.SDOptions{Path: d})
			assert.Nil(t, m)
			requireStatus(t, err, tt.status)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
	_, err := lib.OpenSD(binding.SDOptions{Path: sdDir, Device: "cuda:3"})
	require.Error(t, err)
	assert.ErrorIs(t, err, binding.ErrDevice)
	_, err = lib.OpenSD(binding.SDOptions{Path: sdDir, DType: binding.DType(42)})
	require.Error(t, err)
	assert.ErrorIs(t, err, binding.ErrInvalidArgument)
	assert.Contains(t, err.Error(), "unknown dtype 42")
}

func TestSingleFileCheckpoint(t *testing.T) {
	lib := testenv.Library(t)
	fx := testenv.Fixtures(t)
	file := filepath.Join(fx, "sd/tiny-sd15.safetensors")
	tok := filepath.Join(fx, "sd/tiny-sd15/tokenizer")

	m, err := lib.OpenSD(binding.SDOptions{Path: file, TokenizerDir: tok})
	require.NoError(t, err)
	defer m.Close()
	assert.Contains(t, m.Info().Arch, "single file")
	folder, err := lib.OpenSD(binding.SDOptions{Path: filepath.Join(fx, "sd/tiny-sd15")})
	require.NoError(t, err)
	defer folder.Close()
	assert.Equal(t, folder.Info().Params, m.Info().Params)

	// Without --tokenizer the built-in CLIP vocabulary is tried; this tiny
	// model's text encoder has its own small vocabulary.
	_, err = lib.OpenSD(binding.SDOptions{Path: file})
	assert.ErrorIs(t, err, binding.ErrFormat)
	assert.ErrorContains(t, err, "--tokenizer")

	// A segmentation U-Net is not a Stable Diffusion checkpoint.
	_, segPath := testenv.Tiny(t)
	_, err = lib.OpenSD(binding.SDOptions{Path: segPath, TokenizerDir: tok})
	assert.ErrorIs(t, err, binding.ErrUnsupported)
	assert.ErrorContains(t, err, "not a Stable Diffusion 1.x/2.x checkpoint")

	ckpt := filepath.Join(t.TempDir(), "model.ckpt")
	require.NoError(t, os.WriteFile(ckpt, []byte("PK"), 0o644))
	_, err = lib.OpenSD(binding.SDOptions{Path: ckpt, TokenizerDir: tok})
	assert.ErrorIs(t, err, binding.ErrUnsupported)
	assert.ErrorContains(t, err, "convert it to .safetensors")
}

// requireStatus asserts that err is the engine's error with status.
func requireStatus(t *testing.T, err error, status binding.Status) {
	t.Helper()
	require.Error(t, err)
	var be *binding.Error
	require.ErrorAs(t, err, &be)
	assert.Equal(t, status, be.Status, err.Error())
}
