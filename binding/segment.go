package binding

import (
	"context"
	"fmt"
	"runtime"
	"time"
	"unsafe"
)

// SegmentRequest is one segmentation run.
type SegmentRequest struct {
	Image *Image // RGB, at the network's working size
	// OutWidth x OutHeight is the size of the mask and logits (bilinear resize
	// of the logits before the decision); 0 means the input's size.
	OutWidth, OutHeight int
	// Threshold decides one-class models: sigmoid(logit) > Threshold (0: 0.5).
	Threshold float32
	// Subject lists the classes that are the subject; empty: every class but 0.
	Subject []int
	// Logits asks for the float logits in the result.
	Logits bool
}

// SegmentResult holds a segmentation's outputs at the output size.
type SegmentResult struct {
	Mask    Image  // gray: 255 subject, 0 not
	Labels  Image  // gray: each pixel's class
	Classes int    // classes of the model
	Logits  Tensor // [1, Classes, H, W] when asked for
	Elapsed time.Duration
}

type cSegmentParams struct {
	Image             *cImage
	OutWidth          int32
	OutHeight         int32
	Threshold         float32
	SubjectClasses    *int32
	SubjectClassCount int32
	WantLogits        int32
}

type cSegmentResult struct {
	Mask    cImage
	Labels  cImage
	Classes int32
	Logits  *float32
	Seconds float64
}

// Segment runs the U-Net on one image. Cancelling ctx stops it between the
// network's blocks; the error then matches ErrCancelled.
func (m *SegModel) Segment(ctx context.Context, r SegmentRequest) (*SegmentResult, error) {
	if r.Image == nil {
		return nil, fmt.Errorf("segment: %w: no image", ErrInvalidArgument)
	}
	return call(ctx, m.model, func(h uintptr, pin *runtime.Pinner) (*SegmentResult, error) {
		return m.segment(h, pin, r)
	})
}

func (m *SegModel) segment(h uintptr, pin *runtime.Pinner, r SegmentRequest) (*SegmentResult, error) {
	var p cSegmentParams
	m.lib.fn.segDefaultSegParams(&p)
	img, err := r.Image.c(pin, "image", 3)
	if err != nil {
		return nil, fmt.Errorf("segment: %w", err)
	}
	p.Image, p.OutWidth, p.OutHeight = img, int32(r.OutWidth), int32(r.OutHeight)
	if r.Threshold > 0 {
		p.Threshold = r.Threshold
	}
	if len(r.Subject) > 0 {
		classes := make([]int32, len(r.Subject))
		for i, c := range r.Subject {
			classes[i] = int32(c)
		}
		pin.Pin(&classes[0])
		p.SubjectClasses, p.SubjectClassCount = &classes[0], int32(len(classes))
	}
	if r.Logits {
		p.WantLogits = 1
	}
	var res *cSegmentResult
	var ce cError
	if err := check("sw_seg_segment", m.lib.fn.segment(h, &p, &res, &ce), &ce); err != nil {
		return nil, fmt.Errorf("segment: %w", err)
	}
	defer m.lib.fn.segResultFree(res)
	out := &SegmentResult{
		Mask: copyImage(&res.Mask), Labels: copyImage(&res.Labels), Classes: int(res.Classes),
		Elapsed: time.Duration(res.Seconds * float64(time.Second)),
	}
	if res.Logits != nil {
		h, w := out.Mask.Height, out.Mask.Width
		n := out.Classes * h * w
		out.Logits = Tensor{Shape: []int{1, out.Classes, h, w}, Data: append([]float32(nil), unsafe.Slice(res.Logits, n)...)}
	}
	return out, nil
}
