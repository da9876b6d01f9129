package pipeline_test

import (
	"errors"
	"image"
	"testing"

	"github.com/stepwise-sd/stepwise/pipeline"
)

// fuzzMaxPixels is the pixel limit FuzzDecodeImage decodes under: small, so
// that a header the fuzzer grows is refused rather than decoded.
const fuzzMaxPixels = 64 * 64

// FuzzDecodeImage: DecodeImage with a small pixel limit never panics, fails
// only with ErrBadImage, and returns nothing over the limit: the header's
// size (or its transpose after EXIF rotation), as CheckImage reports it.
// Seeds: testdata/fuzz/FuzzDecodeImage.
func FuzzDecodeImage(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		img, err := pipeline.DecodeImage(data, fuzzMaxPixels)
		if err != nil {
			if !errors.Is(err, pipeline.ErrBadImage) {
				t.Fatalf("error of no known kind: %v", err)
			}
			return
		}
		size := img.Bounds().Size()
		if size.X <= 0 || size.Y <= 0 || size.X*size.Y > fuzzMaxPixels {
			t.Fatalf("decoded %v under a limit of %d pixels", size, fuzzMaxPixels)
		}
		cfg, _, err := pipeline.CheckImage(data, fuzzMaxPixels)
		if err != nil {
			t.Fatalf("DecodeImage accepted what CheckImage refuses: %v", err)
		}
		if size != image.Pt(cfg.Width, cfg.Height) && size != image.Pt(cfg.Height, cfg.Width) {
			t.Fatalf("decoded %v, the header says %dx%d", size, cfg.Width, cfg.Height)
		}
	})
}
