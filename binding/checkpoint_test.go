// Tests of how a checkpoint is opened as users keep them: with the built-in
// CLIP vocabulary, and with a VAE of its own.
package binding_test

import (
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/models"
)

// clipVocabSize is OpenAI CLIP's vocabulary, which the engine has built in.
const clipVocabSize = 49408

type tokenizerGolden struct {
	Prompt   string   `json:"prompt"`
	InputIDs []int64  `json:"input_ids"`
	Tokens   []string `json:"tokens"`
}

func readTokenizerGoldens(t *testing.T, fx string) []tokenizerGolden {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fx, "clip/tokenizer_golden.json"))
	require.NoError(t, err)
	var g []tokenizerGolden
	require.NoError(t, json.Unmarshal(b, &g))
	require.NotEmpty(t, g)
	return g
}

func gunzipTo(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	require.NoError(t, err)
	defer in.Close()
	zr, err := gzip.NewReader(in)
	require.NoError(t, err)
	out, err := os.Create(dst)
	require.NoError(t, err)
	defer out.Close()
	_, err = io.Copy(out, zr)
	require.NoError(t, err)
}

// clipTokenizerDir writes OpenAI CLIP's tokenizer files from the fixtures into
// a folder, padding with pad, as a diffusers SD 1.x (pad "<|endoftext|>") or
// SD 2.x (pad "!") tokenizer/ folder holds them.
func clipTokenizerDir(t *testing.T, fx, pad string) string {
	t.Helper()
	dir := t.TempDir()
	gunzipTo(t, filepath.Join(fx, "clip/vocab.json.gz"), filepath.Join(dir, "vocab.json"))
	gunzipTo(t, filepath.Join(fx, "clip/merges.txt.gz"), filepath.Join(dir, "merges.txt"))
	cfg, err := json.Marshal(map[string]any{
		"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad,
	})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tokenizer_config.json"), cfg, 0o644))
	return dir
}

// clipSizedTiny makes a random tiny model whose text encoder takes CLIP's
// vocabulary, as a diffusers folder without a tokenizer/ folder; sd2 gives
// its UNet SD 2.x's linear projections.
func clipSizedTiny(t *testing.T, sd2 bool) string {
	t.Helper()
	arch := models.TinyArch()
	arch.TextEncoder["vocab_size"] = clipVocabSize
	if sd2 {
		arch.UNet["use_linear_projection"] = true
	}
	dir := filepath.Join(t.TempDir(), "model")
	require.NoError(t, models.MakeRandomSD(testenv.Library(t), dir, arch, 5))
	require.NoError(t, os.RemoveAll(filepath.Join(dir, "tokenizer")))
	return dir
}

func openWith(t *testing.T, o binding.SDOptions) *binding.SDModel {
	t.Helper()
	m, err := testenv.Library(t).OpenSD(o)
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

func generate(t *testing.T, m *binding.SDModel, r binding.GenerateRequest) *binding.GenerateResult {
	t.Helper()
	res, err := m.Generate(context.Background(), r)
	require.NoError(t, err)
	return res
}

// smallRequest runs with guidance, so the unconditional prompt's padding counts too.
var smallRequest = binding.GenerateRequest{
	Prompt: "a cat sitting on a chair", Width: 64, Height: 64, Steps: 2, CFGScale: 7.5,
	Seed: 42, BatchSize: 1, Sampler: binding.Euler, PreviewEvery: 1,
}

// A model without a tokenizer folder tokenizes with the built-in CLIP
// vocabulary: the goldens' ids, and the family's padding, which is what a
// tokenizer folder padded that way gives and not what the other padding gives.
func TestBuiltinTokenizer(t *testing.T) {
	fx := testenv.Fixtures(t)
	golden := readTokenizerGoldens(t, fx)
	tests := []struct {
		name       string
		sd2        bool
		pad, other string
	}{
		{"sd1 pads with endoftext", false, "<|endoftext|>", "!"},
		{"sd2 pads with exclamation mark", true, "!", "<|endoftext|>"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := clipSizedTiny(t, tt.sd2)
			builtin := openWith(t, binding.SDOptions{Path: dir})
			for _, g := range golden {
				ids, err := builtin.Tokenize(g.Prompt)
				require.NoError(t, err)
				// Tokenize is untruncated: all of the golden's tokens but BOS and
				// EOS, whose first 75 are the golden's padded ids.
				require.Len(t, ids, len(g.Tokens)-2, g.Prompt)
				kept := min(len(ids), 75)
				assert.Equal(t, g.InputIDs[1:1+kept], ids[:kept], g.Prompt)
			}

			same := openWith(t, binding.SDOptions{Path: dir, TokenizerDir: clipTokenizerDir(t, fx, tt.pad)})
			other := openWith(t, binding.SDOptions{Path: dir, TokenizerDir: clipTokenizerDir(t, fx, tt.other)})
			got := generate(t, builtin, smallRequest)
			assert.Equal(t, generate(t, same, smallRequest).Pixels.Data, got.Pixels.Data)
			assert.NotEqual(t, generate(t, other, smallRequest).Pixels.Data, got.Pixels.Data)
		})
	}
}

// A single-file checkpoint with SD 1.5's text encoder (CLIP ViT-L/14, 123 M
// parameters, the 49408-token vocabulary) opens and generates with no
// tokenizer, exactly as its diffusers folder does. The UNet and VAE are tiny
// (with SD 1.5's 768-wide context) to spare this test 4 GB of random weights;
// STEPWISE_SD15_FULL=1 makes every component SD 1.5's size.
func TestSingleFileCheckpointNeedsNoTokenizer(t *testing.T) {
	lib := testenv.Library(t)
	arch := models.TinyArch()
	arch.TextEncoder = models.SD15Arch().TextEncoder
	arch.UNet["cross_attention_dim"] = 768
	if os.Getenv("STEPWISE_SD15_FULL") != "" {
		arch = models.SD15Arch()
	}
	dir := filepath.Join(t.TempDir(), "folder")
	require.NoError(t, models.MakeRandomSD(lib, dir, arch, 11))
	require.NoError(t, os.RemoveAll(filepath.Join(dir, "tokenizer")))
	file := filepath.Join(t.TempDir(), "sd15.safetensors")
	writeLDM(t, dir, file, ldmParts{unet: true, textEncoder: true, vae: true, vaePrefix: "first_stage_model."})

	r := binding.GenerateRequest{
		Prompt: "a photograph of an astronaut riding a horse", Width: 64, Height: 64, Steps: 1, CFGScale: 7.5,
		Seed: 7, BatchSize: 1, Sampler: binding.Euler, PreviewEvery: 1,
	}
	single, err := lib.OpenSD(binding.SDOptions{Path: file})
	require.NoError(t, err)
	info := single.Info()
	assert.Contains(t, info.Arch, "sd1")
	assert.Contains(t, info.Arch, "single file")
	ids, err := single.Tokenize(r.Prompt)
	require.NoError(t, err)
	assert.Equal(t, []int64{320, 8853, 539, 550, 18376, 6765, 320, 4558}, ids)
	got, err := single.Generate(context.Background(), r)
	require.NoError(t, err)
	require.NoError(t, single.Close()) // one model in memory at a time

	folder, err := lib.OpenSD(binding.SDOptions{Path: dir})
	require.NoError(t, err)
	defer folder.Close()
	assert.Equal(t, info.Params, folder.Info().Params)
	want, err := folder.Generate(context.Background(), r)
	require.NoError(t, err)
	assert.Equal(t, want.Pixels.Data, got.Pixels.Data)
}

// A VAE given beside the model replaces the model's own: in every form a user
// has one, it gives exactly the image of a model folder holding that VAE.
func TestVAEOverride(t *testing.T) {
	lib := testenv.Library(t)
	sdDir, _ := testenv.Tiny(t)
	tmp := t.TempDir()
	other := filepath.Join(tmp, "other")
	require.NoError(t, models.MakeRandomSD(lib, other, models.TinyArch(), 77))
	otherVAE := filepath.Join(other, "vae")
	mixed := filepath.Join(tmp, "mixed")
	testenv.CopyTree(t, sdDir, mixed)
	require.NoError(t, os.RemoveAll(filepath.Join(mixed, "vae")))
	testenv.CopyTree(t, otherVAE, filepath.Join(mixed, "vae"))
	ldmPrefixed := filepath.Join(tmp, "vae-ldm.safetensors")
	writeLDM(t, other, ldmPrefixed, ldmParts{vae: true, vaePrefix: "first_stage_model."})
	ldmBare := filepath.Join(tmp, "vae-ldm-bare.safetensors")
	writeLDM(t, other, ldmBare, ldmParts{vae: true})

	own := openWith(t, binding.SDOptions{Path: sdDir})
	ownRes := generate(t, own, smallRequest)
	want := generate(t, openWith(t, binding.SDOptions{Path: mixed}), smallRequest)
	require.NotEqual(t, ownRes.Pixels.Data, want.Pixels.Data, "the other VAE must decode differently")

	tests := []struct{ name, vae string }{
		{"diffusers folder", otherVAE},
		{"diffusers single file", filepath.Join(otherVAE, "diffusion_pytorch_model.safetensors")},
		{"LDM file under first_stage_model", ldmPrefixed},
		{"LDM file with bare keys", ldmBare},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := openWith(t, binding.SDOptions{Path: sdDir, VAEPath: tt.vae})
			assert.Contains(t, m.Info().Arch, "external VAE")
			assert.Equal(t, own.Info().Params, m.Info().Params)
			got := generate(t, m, smallRequest)
			assert.Equal(t, ownRes.Latents.Data, got.Latents.Data, "only the decode changes")
			assert.Equal(t, want.Pixels.Data, got.Pixels.Data)
			assert.Equal(t, want.Images[0].Pix, got.Images[0].Pix)
		})
	}
}

func TestVAEOverrideErrors(t *testing.T) {
	lib := testenv.Library(t)
	sdDir, segPath := testenv.Tiny(t)
	tmp := t.TempDir()
	// A VAE of another architecture: two levels instead of four.
	arch := models.TinyArch()
	arch.VAE["block_out_channels"] = []int{32, 64}
	arch.VAE["down_block_types"] = []string{"DownEncoderBlock2D", "DownEncoderBlock2D"}
	arch.VAE["up_block_types"] = []string{"UpDecoderBlock2D", "UpDecoderBlock2D"}
	wrong := filepath.Join(tmp, "wrong")
	require.NoError(t, models.MakeRandomSD(lib, wrong, arch, 3))
	wrongLDM := filepath.Join(tmp, "wrong-vae.safetensors")
	writeLDM(t, wrong, wrongLDM, ldmParts{vae: true, vaePrefix: "first_stage_model."})
	ckpt := filepath.Join(tmp, "vae.ckpt")
	require.NoError(t, os.WriteFile(ckpt, []byte("PK"), 0o644))

	tests := []struct {
		name, vae string
		want      error
		message   string
	}{
		{"folder of another architecture", filepath.Join(wrong, "vae"), binding.ErrInvalidArgument, "block_out_channels [32, 64] (the model's: [32, 32, 32, 64])"},
		{"LDM file of another architecture", wrongLDM, binding.ErrInvalidArgument, "does not fit the model"},
		{"diffusers file of another architecture", filepath.Join(wrong, "vae/diffusion_pytorch_model.safetensors"), binding.ErrInvalidArgument, "does not fit the model"},
		{"missing", filepath.Join(tmp, "nope.safetensors"), binding.ErrNotFound, "no such VAE"},
		{"not a VAE", segPath, binding.ErrUnsupported, "not a VAE checkpoint"},
		{"pickle", ckpt, binding.ErrUnsupported, "convert it to .safetensors"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := lib.OpenSD(binding.SDOptions{Path: sdDir, VAEPath: tt.vae})
			require.Error(t, err)
			assert.Nil(t, m)
			assert.ErrorIs(t, err, tt.want)
			assert.ErrorContains(t, err, tt.message)
		})
	}
}
