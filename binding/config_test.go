package binding_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/internal/testenv"
)

// The config files of a diffusers folder, by the short names the tests use.
var configFiles = map[string]string{
	"unet":      "unet/config.json",
	"vae":       "vae/config.json",
	"text":      "text_encoder/config.json",
	"scheduler": "scheduler/scheduler_config.json",
}

// modelCopy makes a folder that reads as the tiny model: configs copied (so a
// test may rewrite them), weights and tokenizer linked.
func modelCopy(t *testing.T) string {
	t.Helper()
	src, _ := testenv.Tiny(t)
	dst := t.TempDir()
	require.NoError(t, os.Symlink(filepath.Join(src, "tokenizer"), filepath.Join(dst, "tokenizer")))
	for _, rel := range []string{"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
		"scheduler/scheduler_config.json"} {
		b, err := os.ReadFile(filepath.Join(src, rel))
		require.NoError(t, err)
		require.NoError(t, os.MkdirAll(filepath.Dir(filepath.Join(dst, rel)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dst, rel), b, 0o644))
	}
	for _, rel := range []string{"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
		"text_encoder/model.safetensors"} {
		require.NoError(t, os.Symlink(filepath.Join(src, rel), filepath.Join(dst, rel)))
	}
	return dst
}

// setConfig sets key in one of the copy's configs to value (raw JSON).
func setConfig(t *testing.T, dir, file, key, value string) {
	t.Helper()
	path := filepath.Join(dir, configFiles[file])
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var m map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(b, &m))
	m[key] = json.RawMessage(value)
	b, err = json.Marshal(m)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, b, 0o644))
}

// TestEveryConfigValueIsChecked writes each config field of the tiny model at
// bad values (zero, negative, huge, wrong type, inconsistent with another
// field) and opens the model: every open fails with a typed error whose
// message names the file and the key, and the process lives on.
func TestEveryConfigValueIsChecked(t *testing.T) {
	lib := testenv.Library(t)
	const (
		huge    = "1099511627776"        // 2^40
		tooBig  = "18446744073709551615" // 2^64 - 1: wraps to -1 as int64
		str     = `"32"`
		format  = binding.StatusFormat
		unsupp  = binding.StatusUnsupported
		float   = "32.5"
		notList = "7"
	)
	tests := []struct {
		file, key string
		values    []string
		status    binding.Status
		mentions  string // what the message names besides the key; "" for the key itself
	}{
		// UNet
		{"unet", "in_channels", []string{"0", "-1", huge, tooBig, str, float}, format, ""},
		{"unet", "in_channels", []string{"3", "5"}, unsupp, "input channels"},
		{"unet", "out_channels", []string{"0", "-4", huge, str}, format, ""},
		{"unet", "out_channels", []string{"8"}, unsupp, "4-channel latents"},
		{"unet", "sample_size", []string{"0", "-64", huge, str}, format, ""},
		{"unet", "block_out_channels", []string{"[]", "[0, 64]", "[32, -64]", "[33, 64]", "[32, " + huge + "]",
			"[32, 64, 64, 64, 64, 64, 64, 64, 64]", str, `["32", "64"]`}, format, ""},
		{"unet", "layers_per_block", []string{"0", "-1", "1000", huge, str}, format, ""},
		{"unet", "norm_num_groups", []string{"0", "-32", "7", "3", huge, str, float}, format, ""},
		{"unet", "norm_eps", []string{"0", "-1", "2", "1e308", str}, format, ""},
		{"unet", "cross_attention_dim", []string{"0", "-768", huge}, format, ""},
		{"unet", "cross_attention_dim", []string{"64"}, format, "hidden_size"},
		{"unet", "attention_head_dim", []string{"0", "-8", "3", "[8]", "[8, 8, 8]", "[8, 0]", huge, str}, format, ""},
		{"unet", "num_attention_heads", []string{"0", "5", "[8, -8]"}, format, ""},
		{"unet", "transformer_layers_per_block", []string{"0", "-1", "[1]", "[1, 0]", huge}, format, ""},
		{"unet", "freq_shift", []string{"-1", "16", "1e300", str}, format, ""},
		{"unet", "time_embedding_dim", []string{"0", "-128", huge}, format, ""},
		{"unet", "flip_sin_to_cos", []string{"1", `"yes"`}, format, ""},
		{"unet", "use_linear_projection", []string{"0", `"no"`}, format, ""},
		{"unet", "upcast_attention", []string{"2"}, format, ""},
		{"unet", "down_block_types", []string{`["CrossAttnDownBlock2D"]`, "[]", notList, `[1, 2]`}, format, ""},
		{"unet", "down_block_types", []string{`["CrossAttnDownBlock2D", "Conv3DBlock"]`}, unsupp, "Conv3DBlock"},
		{"unet", "up_block_types", []string{`["UpBlock2D"]`, "[]", notList}, format, ""},
		{"unet", "up_block_types", []string{`["UpBlock2D", "Mystery"]`}, unsupp, "Mystery"},
		{"unet", "mid_block_type", []string{`"UNetMidBlock2DSimpleCrossAttn"`}, unsupp, "mid_block_type"},
		{"unet", "time_embedding_type", []string{`"fourier"`}, unsupp, "time_embedding_type"},
		// VAE
		{"vae", "in_channels", []string{"0", "-3", huge, str}, format, ""},
		{"vae", "in_channels", []string{"4"}, unsupp, "RGB"},
		{"vae", "out_channels", []string{"0", huge}, format, ""},
		{"vae", "latent_channels", []string{"0", "-4", huge, str}, format, ""},
		{"vae", "latent_channels", []string{"8"}, unsupp, "4-channel latents"},
		{"vae", "layers_per_block", []string{"0", "-1", "99", str}, format, ""},
		{"vae", "norm_num_groups", []string{"0", "-32", "5", huge, str}, format, ""},
		{"vae", "block_out_channels", []string{"[]", "[32, 32, 32, 0]", "[32, 32, 33, 64]", "[32, -32, 32, 64]", str}, format, ""},
		{"vae", "scaling_factor", []string{"0", "-0.18", "1e9", str}, format, ""},
		{"vae", "down_block_types", []string{`["DownEncoderBlock2D"]`, notList}, format, ""},
		{"vae", "down_block_types", []string{`["DownEncoderBlock2D", "A", "B", "C"]`}, unsupp, "down block type A"},
		{"vae", "up_block_types", []string{`["UpDecoderBlock2D"]`, notList}, format, ""},
		// Text encoder
		{"text", "vocab_size", []string{"0", "-1", huge, str}, format, ""},
		{"text", "vocab_size", []string{"10"}, format, "tokenizer"},
		{"text", "hidden_size", []string{"0", "-32", "33", huge, str}, format, ""},
		{"text", "intermediate_size", []string{"0", "-37", huge, str}, format, ""},
		{"text", "num_attention_heads", []string{"0", "-4", "5", "64", huge, str}, format, ""},
		{"text", "num_hidden_layers", []string{"0", "-1", "100000", str}, format, ""},
		{"text", "max_position_embeddings", []string{"0", "1", "-77", "100000", str}, format, ""},
		{"text", "layer_norm_eps", []string{"0", "-1e-5", "10", str}, format, ""},
		{"text", "hidden_act", []string{"7"}, format, ""},
		{"text", "hidden_act", []string{`"relu"`}, unsupp, ""},
		// Scheduler
		{"scheduler", "num_train_timesteps", []string{"0", "1", "-1000", huge, tooBig, str, "1000.5"}, format, ""},
		{"scheduler", "steps_offset", []string{"-1", "1000", huge, str}, format, ""},
		{"scheduler", "beta_start", []string{"0", "1", "-0.1", "2", "1e308", str}, format, ""},
		{"scheduler", "beta_start", []string{"0.5"}, format, "beta_end"},
		{"scheduler", "beta_end", []string{"0", "1", "1.5", "0.0001", str}, format, "beta_end"},
		{"scheduler", "beta_schedule", []string{`"squaredcos_cap_v2"`}, unsupp, ""},
		{"scheduler", "beta_schedule", []string{"3"}, format, ""},
		{"scheduler", "trained_betas", []string{"[0.1, 0.2]", `"x"`, "7"}, format, ""},
		{"scheduler", "prediction_type", []string{`"sample"`}, unsupp, ""},
		{"scheduler", "timestep_spacing", []string{`"sideways"`}, unsupp, ""},
		{"scheduler", "set_alpha_to_one", []string{`"no"`, "0"}, format, ""},
	}
	for _, tt := range tests {
		for _, v := range tt.values {
			t.Run(fmt.Sprintf("%s %s=%s", tt.file, tt.key, v), func(t *testing.T) {
				dir := modelCopy(t)
				setConfig(t, dir, tt.file, tt.key, v)
				m, err := lib.OpenSD(binding.SDOptions{Path: dir})
				if err == nil {
					m.Close()
				}
				require.Error(t, err)
				var e *binding.Error
				require.True(t, errors.As(err, &e), "a typed engine error: %v", err)
				assert.Equal(t, tt.status, e.Status, "%v", err)
				want := tt.mentions
				if want == "" {
					want = tt.key
				}
				assert.Contains(t, err.Error(), want)
				if tt.status == format && tt.mentions == "" {
					assert.Contains(t, err.Error(), configFiles[tt.file], "the message names the file")
				}
			})
		}
	}
	// The copy itself opens: every failure above is the value's.
	m, err := lib.OpenSD(binding.SDOptions{Path: modelCopy(t)})
	require.NoError(t, err)
	m.Close()
}

// TestConfigsThatDisagreeWithTheWeights gives valid configs whose sizes are
// not those of the weights: the open fails on the first tensor whose shape
// differs, before anything of the config's size is allocated (a 2^36-element
// time embedding would not fit in memory).
func TestConfigsThatDisagreeWithTheWeights(t *testing.T) {
	lib := testenv.Library(t)
	tests := []struct {
		file, key, value, tensor string
	}{
		{"text", "intermediate_size", "64", "fc1"},
		{"text", "num_hidden_layers", "6", "layers.5"},
		{"unet", "block_out_channels", "[32, 96]", "down_blocks.1"},
		{"unet", "time_embedding_dim", "262144", "time_embedding"},
		{"unet", "layers_per_block", "3", "resnets.2"},
		{"vae", "block_out_channels", "[32, 32, 32, 32]", "down_blocks.3"},
		{"vae", "layers_per_block", "2", "resnets.1"},
	}
	for _, tt := range tests {
		t.Run(tt.file+" "+tt.key, func(t *testing.T) {
			dir := modelCopy(t)
			setConfig(t, dir, tt.file, tt.key, tt.value)
			m, err := lib.OpenSD(binding.SDOptions{Path: dir})
			if err == nil {
				m.Close()
			}
			require.Error(t, err)
			assert.True(t, errors.Is(err, binding.ErrFormat) || errors.Is(err, binding.ErrNotFound), "%v", err)
			assert.Contains(t, err.Error(), tt.tensor)
		})
	}
}

// openWithin runs open in a goroutine and fails the test if it does not
// return: a hang guard, not a timing assertion.
func openWithin(t *testing.T, open func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- open() }()
	wait := 60 * time.Second
	if d, ok := t.Deadline(); ok && time.Until(d) < wait {
		wait = time.Until(d) / 2
	}
	select {
	case err := <-done:
		return err
	case <-time.After(wait):
		t.Fatalf("open did not return: it blocks on a non-regular file")
		return nil
	}
}

// TestOnlyRegularFilesAreRead puts a FIFO, a folder or a device where the
// engine expects a file: each open fails at once with ErrIO, never blocks.
func TestOnlyRegularFilesAreRead(t *testing.T) {
	lib := testenv.Library(t)
	fifo := func(t *testing.T, path string) {
		require.NoError(t, os.Remove(path))
		require.NoError(t, syscall.Mkfifo(path, 0o644))
	}
	folder := func(t *testing.T, path string) {
		require.NoError(t, os.Remove(path))
		require.NoError(t, os.Mkdir(path, 0o755))
	}
	device := func(t *testing.T, path string) {
		require.NoError(t, os.Remove(path))
		require.NoError(t, os.Symlink("/dev/zero", path))
	}
	sdFiles := []string{"unet/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/model.safetensors",
		"scheduler/scheduler_config.json", "model_index.json"}
	for _, rel := range sdFiles {
		for name, replace := range map[string]func(*testing.T, string){"fifo": fifo, "folder": folder, "device": device} {
			t.Run(name+" as "+rel, func(t *testing.T) {
				dir := modelCopy(t)
				replace(t, filepath.Join(dir, rel))
				err := openWithin(t, func() error {
					m, err := lib.OpenSD(binding.SDOptions{Path: dir})
					if err == nil {
						m.Close()
					}
					return err
				})
				require.Error(t, err)
				assert.ErrorIs(t, err, binding.ErrIO)
				assert.Contains(t, err.Error(), rel)
			})
		}
	}
	t.Run("fifo as the tokenizer vocabulary", func(t *testing.T) {
		dir := modelCopy(t)
		src, _ := testenv.Tiny(t)
		tok := filepath.Join(dir, "tokenizer")
		require.NoError(t, os.Remove(tok))
		require.NoError(t, os.Mkdir(tok, 0o755))
		for _, f := range []string{"merges.txt", "tokenizer_config.json"} {
			require.NoError(t, os.Symlink(filepath.Join(src, "tokenizer", f), filepath.Join(tok, f)))
		}
		require.NoError(t, syscall.Mkfifo(filepath.Join(tok, "vocab.json"), 0o644))
		err := openWithin(t, func() error {
			m, err := lib.OpenSD(binding.SDOptions{Path: dir})
			if err == nil {
				m.Close()
			}
			return err
		})
		assert.ErrorIs(t, err, binding.ErrIO)
		assert.Contains(t, err.Error(), "vocab.json")
	})
	t.Run("fifo as the model", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "model.safetensors")
		require.NoError(t, syscall.Mkfifo(path, 0o644))
		for _, open := range []func() error{
			func() error { _, err := lib.OpenSD(binding.SDOptions{Path: path}); return err },
			func() error { _, err := lib.OpenSeg(binding.SegOptions{Path: path}); return err },
		} {
			err := openWithin(t, open)
			assert.ErrorIs(t, err, binding.ErrIO)
			assert.Contains(t, err.Error(), path)
		}
	})
	t.Run("folder and device as the segmentation model", func(t *testing.T) {
		for _, path := range []string{t.TempDir(), "/dev/zero"} {
			err := openWithin(t, func() error { _, err := lib.OpenSeg(binding.SegOptions{Path: path}); return err })
			assert.ErrorIs(t, err, binding.ErrIO, path)
		}
	})
}

// TestSegmentationWidthsAreChecked rewrites weight shapes of the tiny
// segmentation U-Net (with data to match, so the file itself is well formed):
// the widths read from them must be positive, bounded and chain from block to
// block, or the open fails naming the file.
func TestSegmentationWidthsAreChecked(t *testing.T) {
	lib := testenv.Library(t)
	_, segPath := testenv.Tiny(t)
	tests := []struct {
		name, tensor string
		shape        []int64
		want         string
	}{
		{"no classes", "outc.conv.weight", []int64{0, 8, 1, 1}, "0 classes"},
		{"too many classes", "outc.conv.weight", []int64{300, 8, 1, 1}, "300 classes"},
		{"zero width", "inc.double_conv.0.weight", []int64{0, 3, 3, 3}, "inc mid has 0 channels"},
		{"huge width", "inc.double_conv.0.weight", []int64{100000, 3, 1, 1}, "inc mid has 100000 channels"},
		{"no input channels", "inc.double_conv.0.weight", []int64{8, 0, 3, 3}, "input has 0 channels"},
		{"broken chain", "down1.maxpool_conv.1.double_conv.0.weight", []int64{16, 9, 3, 3}, "down1 takes 9 channels"},
		{"skip mismatch", "up4.conv.double_conv.0.weight", []int64{8, 15, 3, 3}, "up4 takes 15 channels"},
		{"odd upsampling", "up1.up.weight", []int64{127, 64, 2, 2}, "up1 upsamples 127 channels"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := safetensors.Read(segPath)
			require.NoError(t, err)
			n := int64(1)
			for _, d := range tt.shape {
				n *= d
			}
			require.Contains(t, f.Tensors, tt.tensor)
			f.Tensors[tt.tensor] = safetensors.F32(tt.shape, make([]float32, n))
			path := filepath.Join(t.TempDir(), "seg.safetensors")
			require.NoError(t, safetensors.Write(path, f.Tensors, f.Metadata))
			m, err := lib.OpenSeg(binding.SegOptions{Path: path})
			if err == nil {
				m.Close()
			}
			require.Error(t, err)
			assert.ErrorIs(t, err, binding.ErrFormat)
			assert.Contains(t, err.Error(), path)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

// TestSingleFileHintsAreChecked opens the reference single-file checkpoint
// with its LDM yaml rewritten: a setting the yaml gets wrong fails the open
// with an error naming the yaml or the setting it feeds, and a FIFO as the
// yaml does not block.
func TestSingleFileHintsAreChecked(t *testing.T) {
	lib := testenv.Library(t)
	fx := filepath.Join(testenv.Fixtures(t), "sd")
	yaml, err := os.ReadFile(filepath.Join(fx, "tiny-sd15.yaml"))
	require.NoError(t, err)
	open := func(t *testing.T, writeYAML func(path string)) error {
		dir := t.TempDir()
		ckpt := filepath.Join(dir, "model.safetensors")
		require.NoError(t, os.Symlink(filepath.Join(fx, "tiny-sd15.safetensors"), ckpt))
		writeYAML(filepath.Join(dir, "model.yaml"))
		return openWithin(t, func() error {
			m, err := lib.OpenSD(binding.SDOptions{Path: ckpt, TokenizerDir: filepath.Join(fx, "tiny-sd15", "tokenizer")})
			if err == nil {
				m.Close()
			}
			return err
		})
	}
	replace := func(old, new string) func(string) {
		return func(path string) {
			s := string(yaml)
			require.Contains(t, s, old)
			require.NoError(t, os.WriteFile(path, []byte(strings.Replace(s, old, new, 1)), 0o644))
		}
	}
	tests := []struct {
		name, old, new, want string
		status               binding.Status
	}{
		{"heads not a number", "num_heads: 8", "num_heads: eight", "num_heads", binding.StatusFormat},
		{"heads beyond range", "num_heads: 8", "num_heads: 1e400", "num_heads", binding.StatusFormat},
		{"heads not dividing", "num_heads: 8", "num_heads: 3", "attention_head_dim", binding.StatusFormat},
		{"head width too wide", "num_heads: 8", "num_head_channels: 64", "attention_head_dim", binding.StatusFormat},
		{"negative scale", "scale_factor: 0.18215", "scale_factor: -1", "scaling_factor", binding.StatusFormat},
		{"beta above one", "linear_start: 0.00085", "linear_start: 2", "beta_start", binding.StatusFormat},
		{"betas reversed", "linear_end: 0.0120", "linear_end: 0.0001", "beta_end", binding.StatusFormat},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := open(t, replace(tt.old, tt.new))
			require.Error(t, err)
			var e *binding.Error
			require.ErrorAs(t, err, &e)
			assert.Equal(t, tt.status, e.Status, "%v", err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
	t.Run("the yaml as it is", func(t *testing.T) {
		require.NoError(t, open(t, func(path string) { require.NoError(t, os.WriteFile(path, yaml, 0o644)) }))
	})
	t.Run("fifo as the yaml", func(t *testing.T) {
		err := open(t, func(path string) { require.NoError(t, syscall.Mkfifo(path, 0o644)) })
		assert.ErrorIs(t, err, binding.ErrIO)
		assert.Contains(t, err.Error(), "model.yaml")
	})
}
