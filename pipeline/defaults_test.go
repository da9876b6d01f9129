package pipeline

import (
	"image"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/stepwise-sd/stepwise/binding"
)

// Every default, pinned: a change here is a change users see.
func TestDefaults(t *testing.T) {
	g := DefaultGenerateOptions()
	e := DefaultEditOptions()
	tests := []struct {
		name      string
		got, want any
	}{
		{"generate steps", g.Steps, 20},
		{"generate cfg scale", g.CFGScale, float32(7.5)},
		{"generate sampler", g.Sampler, binding.EulerA},
		{"generate batch size", g.BatchSize, 1},
		{"generate mask blur", g.MaskBlur, 4.0},
		{"generate preview", g.Preview, binding.PreviewNone},
		{"generate preview every", g.PreviewEvery, 1},
		{"generate size: from normalize", [2]int{g.Width, g.Height}, [2]int{0, 0}},
		{"generate strength: from normalize", g.Strength, float32(0)},
		{"edit steps", e.Steps, 20},
		{"edit cfg scale", e.CFGScale, float32(7.5)},
		{"edit sampler", e.Sampler, binding.EulerA},
		{"edit working size", e.WorkingSize, 512},
		{"edit mask blur", e.MaskBlur, 4.0},
		{"edit grow", e.Grow, 0},
		{"edit repaints the background", e.RepaintSubject, false},
		{"edit preview every", e.PreviewEvery, 1},
		{"edit segment scale", e.Segment.Scale, 0.5},
		{"edit segment threshold", e.Segment.Threshold, float32(0.5)},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, tt.got, tt.name)
	}
}

func TestNormalizeFillsOnlyZerosThatMeanNothing(t *testing.T) {
	init := image.Rect(0, 0, 100, 70)
	tests := []struct {
		name string
		in   GenerateOptions
		init image.Rectangle
		mask bool
		want GenerateOptions
	}{
		{"txt2img", GenerateOptions{}, image.Rectangle{}, false,
			GenerateOptions{Width: 512, Height: 512, BatchSize: 1, PreviewEvery: 1}},
		{"txt2img drops a strength", GenerateOptions{Strength: 0.3}, image.Rectangle{}, false,
			GenerateOptions{Width: 512, Height: 512, BatchSize: 1, PreviewEvery: 1}},
		{"img2img: the init's size, rounded down to 8", GenerateOptions{}, init, false,
			GenerateOptions{Width: 96, Height: 64, Strength: 0.75, BatchSize: 1, PreviewEvery: 1}},
		{"inpaint: full strength", GenerateOptions{}, init, true,
			GenerateOptions{Width: 96, Height: 64, Strength: 1, BatchSize: 1, PreviewEvery: 1}},
		{"given values stay", GenerateOptions{Width: 64, Height: 40, Strength: 0.5, BatchSize: 3, PreviewEvery: 2}, init, true,
			GenerateOptions{Width: 64, Height: 40, Strength: 0.5, BatchSize: 3, PreviewEvery: 2}},
		{"zeros that mean something stay", GenerateOptions{Sampler: binding.DDIM}, image.Rectangle{}, false,
			GenerateOptions{Width: 512, Height: 512, BatchSize: 1, PreviewEvery: 1, Sampler: binding.DDIM}},
	}
	for _, tt := range tests {
		o := tt.in
		o.normalize(tt.init, tt.mask)
		assert.Equal(t, tt.want, o, tt.name)
	}

	e := EditOptions{}
	e.normalize()
	assert.Equal(t, EditOptions{WorkingSize: 512, PreviewEvery: 1, Segment: SegmentOptions{Scale: 0.5, Threshold: 0.5}}, e)
}
