package pipeline

import (
	"image"

	"github.com/stepwise-sd/stepwise/binding"
)

// The values a request that leaves a field out gets, in one place: the CLI's
// flag defaults and the server's DefaultParams are these. (The A1111 adapter
// keeps A1111's own defaults.)
const (
	DefaultSteps                    = 20
	DefaultCFGScale         float32 = 7.5
	DefaultSampler                  = binding.EulerA
	DefaultSize                     = 512 // txt2img width and height; an edit's working size (long side)
	DefaultBatchSize                = 1
	DefaultImg2ImgStrength  float32 = 0.75
	DefaultInpaintStrength  float32 = 1
	DefaultMaskBlur                 = 4.0
	DefaultPreviewEvery             = 1
	DefaultSegmentScale             = 0.5
	DefaultSegmentThreshold float32 = 0.5
)

// DefaultGenerateOptions are generation options with every default set.
// Steps, CFGScale, Sampler and MaskBlur are used as given (a CFG scale or mask
// blur of 0 means something, and 0 steps is refused), so a caller starts from
// these and overwrites what it was asked for; the rest is filled by normalize.
func DefaultGenerateOptions() GenerateOptions {
	return GenerateOptions{Steps: DefaultSteps, CFGScale: DefaultCFGScale, Sampler: DefaultSampler,
		BatchSize: DefaultBatchSize, MaskBlur: DefaultMaskBlur, PreviewEvery: DefaultPreviewEvery}
}

// DefaultEditOptions are edit options with every default set; see
// DefaultGenerateOptions.
func DefaultEditOptions() EditOptions {
	return EditOptions{Steps: DefaultSteps, CFGScale: DefaultCFGScale, Sampler: DefaultSampler,
		WorkingSize: DefaultSize, MaskBlur: DefaultMaskBlur, PreviewEvery: DefaultPreviewEvery,
		Segment: SegmentOptions{Scale: DefaultSegmentScale, Threshold: DefaultSegmentThreshold}}
}

// DefaultStrength is the denoising strength when none is given: inpainting
// repaints its region whole, img2img keeps a quarter of the image.
func DefaultStrength(inpaint bool) float32 {
	if inpaint {
		return DefaultInpaintStrength
	}
	return DefaultImg2ImgStrength
}

// normalize fills the fields whose zero cannot mean anything: the size (the
// init image's, rounded down to 8, else DefaultSize), the strength (by mode),
// the batch size and the preview interval. init is the init image's bounds,
// empty for txt2img; mask says whether the run inpaints.
func (o *GenerateOptions) normalize(init image.Rectangle, mask bool) {
	w, h := DefaultSize, DefaultSize
	if !init.Empty() {
		w, h = init.Dx()/8*8, init.Dy()/8*8
	}
	if o.Width == 0 {
		o.Width = w
	}
	if o.Height == 0 {
		o.Height = h
	}
	switch {
	case init.Empty():
		o.Strength = 0 // txt2img has none; params.json leaves it out
	case o.Strength == 0:
		o.Strength = DefaultStrength(mask)
	}
	if o.BatchSize == 0 {
		o.BatchSize = DefaultBatchSize
	}
	if o.PreviewEvery == 0 {
		o.PreviewEvery = DefaultPreviewEvery
	}
}

// normalize fills the edit's fields whose zero cannot mean anything: the
// working size, the segmentation scale and threshold, the preview interval.
func (o *EditOptions) normalize() {
	if o.WorkingSize <= 0 {
		o.WorkingSize = DefaultSize
	}
	o.Segment.normalize()
	if o.PreviewEvery == 0 {
		o.PreviewEvery = DefaultPreviewEvery
	}
}

func (o *SegmentOptions) normalize() {
	if o.Scale <= 0 {
		o.Scale = DefaultSegmentScale
	}
	if o.Threshold <= 0 {
		o.Threshold = DefaultSegmentThreshold
	}
}
