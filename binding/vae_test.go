package binding_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/models"
)

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
	copyDir(t, sdDir, mixed)
	require.NoError(t, os.RemoveAll(filepath.Join(mixed, "vae")))
	copyDir(t, otherVAE, filepath.Join(mixed, "vae"))
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
