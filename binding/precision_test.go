package binding_test

import (
	"context"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
)

// psnr is the peak signal-to-noise ratio of b against a, 8-bit pixels, in dB.
func psnr(a, b []byte) float64 {
	var se float64
	for i := range a {
		d := float64(a[i]) - float64(b[i])
		se += d * d
	}
	if se == 0 {
		return math.Inf(1)
	}
	return 10 * math.Log10(255*255/(se/float64(len(a))))
}

// bf16 and int8 change the numbers; the bounds catch a reduced-precision path
// that has gone wrong rather than merely lost bits. Measured on the tiny model
// (random weights, same seed, 4 Euler a steps at 64²; norms in float32,
// prepacked convolutions): bf16 max |Δ| of the latents 3.12 (4.7% of their
// largest value, 66.7), image PSNR 38.9 dB (with bfloat16 norms, before they
// computed in float32: 4.94 and 34.1 dB); int8 4.03 (6.0%), 33.8 dB.
// The bounds allow about twice the error: twice the latents' difference and
// 6 dB less.
func TestReducedPrecisionStaysNearFloat32(t *testing.T) {
	lib := testenv.Library(t)
	sdDir, _ := testenv.Tiny(t)
	generate := func(dt binding.DType) (*binding.GenerateResult, binding.ModelInfo) {
		m, err := lib.OpenSD(binding.SDOptions{Path: sdDir, DType: dt})
		require.NoError(t, err, dt.String())
		defer m.Close()
		assert.Equal(t, dt, m.Info().DType)
		res, err := m.Generate(context.Background(), tinyRequest(4))
		require.NoError(t, err, dt.String())
		return res, m.Info()
	}
	ref, refInfo := generate(binding.F32)
	tests := []struct {
		dtype     binding.DType
		maxLatent float64 // max |Δ| of the final latents against float32, relative to their largest value
		minPSNR   float64 // of the image against float32's, dB
	}{
		{binding.BF16, 0.1, 33},
		{binding.INT8, 0.12, 28},
	}
	for _, tt := range tests {
		t.Run(tt.dtype.String(), func(t *testing.T) {
			got, info := generate(tt.dtype)
			assert.Less(t, info.WeightBytes, refInfo.WeightBytes, "fewer bytes per weight than float32")
			require.Len(t, got.Latents.Data, len(ref.Latents.Data))
			var d, peak float64
			for i, v := range got.Latents.Data {
				require.False(t, math.IsNaN(float64(v)) || math.IsInf(float64(v), 0), "latent %d is %v", i, v)
				d = math.Max(d, math.Abs(float64(v)-float64(ref.Latents.Data[i])))
				peak = math.Max(peak, math.Abs(float64(ref.Latents.Data[i])))
			}
			p := psnr(ref.Images[0].Pix, got.Images[0].Pix)
			t.Logf("%s: max |Δ latents| %.4g (largest |latent| %.3g), image PSNR %.1f dB", tt.dtype, d, peak, p)
			assert.Greater(t, d, 0.0, "a reduced precision changes the numbers")
			assert.LessOrEqual(t, d, tt.maxLatent*peak, "max |Δ| of the latents")
			assert.GreaterOrEqual(t, p, tt.minPSNR, "PSNR against float32")
		})
	}
}

// The segmentation model has no int8 path: asking for one is an error, not a
// float32 model that reports int8.
func TestInt8IsRefusedWhereItDoesNotApply(t *testing.T) {
	lib := testenv.Library(t)
	_, segPath := testenv.Tiny(t)
	_, err := lib.OpenSeg(binding.SegOptions{Path: segPath, DType: binding.INT8})
	require.ErrorIs(t, err, binding.ErrUnsupported)
	assert.Contains(t, err.Error(), "int8 is for Stable Diffusion models")
}
