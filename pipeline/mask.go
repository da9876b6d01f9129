package pipeline

import (
	"fmt"
	"image"

	"github.com/disintegration/imaging"
)

// Mask is an 8-bit single-channel mask: 255 inside, 0 outside, values in
// between after feathering. Pix[y*Width+x].
type Mask struct {
	Width, Height int
	Pix           []byte
}

// NewMask makes an empty (all 0) mask.
func NewMask(w, h int) *Mask { return &Mask{Width: w, Height: h, Pix: make([]byte, w*h)} }

// MaskFromImage takes the gray level of img (any image), thresholded at
// threshold (1..255: >= threshold is 255, else 0; 0 keeps gray levels).
func MaskFromImage(img image.Image, threshold int) *Mask {
	g := Gray(img)
	m := &Mask{Width: g.Width, Height: g.Height, Pix: g.Pix}
	if threshold > 0 {
		m.Threshold(threshold)
	}
	return m
}

// Threshold makes the mask binary: values >= t become 255, the rest 0.
func (m *Mask) Threshold(t int) {
	for i, v := range m.Pix {
		if int(v) >= t {
			m.Pix[i] = 255
		} else {
			m.Pix[i] = 0
		}
	}
}

// Invert swaps inside and outside.
func (m *Mask) Invert() {
	for i, v := range m.Pix {
		m.Pix[i] = 255 - v
	}
}

// Clone copies the mask.
func (m *Mask) Clone() *Mask {
	return &Mask{Width: m.Width, Height: m.Height, Pix: append([]byte(nil), m.Pix...)}
}

// Grow dilates (r > 0) or erodes (r < 0) the mask by |r| pixels with a square
// structuring element, as two separable max/min passes.
func (m *Mask) Grow(r int) {
	if r == 0 {
		return
	}
	dilate := r > 0
	if r < 0 {
		r = -r
	}
	pick := func(a, b byte) byte {
		if (a > b) == dilate {
			return a
		}
		return b
	}
	tmp := make([]byte, len(m.Pix))
	w, h := m.Width, m.Height
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			v := m.Pix[y*w+x]
			for dx := -r; dx <= r; dx++ {
				if xx := x + dx; xx >= 0 && xx < w {
					v = pick(v, m.Pix[y*w+xx])
				}
			}
			tmp[y*w+x] = v
		}
	}
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			v := tmp[y*w+x]
			for dy := -r; dy <= r; dy++ {
				if yy := y + dy; yy >= 0 && yy < h {
					v = pick(v, tmp[yy*w+x])
				}
			}
			m.Pix[y*w+x] = v
		}
	}
}

// Feather blurs the mask's edges with a Gaussian of the given sigma (pixels).
// Pixels farther than 3 sigma from any edge keep their value exactly.
func (m *Mask) Feather(sigma float64) {
	if sigma <= 0 {
		return
	}
	blurred := imaging.Blur(m.Image(), sigma)
	for i := range m.Pix {
		m.Pix[i] = blurred.Pix[4*i]
	}
}

// Image returns the mask as a gray image.
func (m *Mask) Image() *image.Gray {
	g := image.NewGray(image.Rect(0, 0, m.Width, m.Height))
	copy(g.Pix, m.Pix)
	return g
}

// Resize scales the mask to w x h (Lanczos; not re-thresholded).
func (m *Mask) Resize(w, h int) *Mask {
	if w == m.Width && h == m.Height {
		return m.Clone()
	}
	return MaskFromImage(imaging.Resize(m.Image(), w, h, imaging.Lanczos), 0)
}

// Covers reports the fraction of pixels at or above 128.
func (m *Mask) Covers() float64 {
	n := 0
	for _, v := range m.Pix {
		if v >= 128 {
			n++
		}
	}
	if len(m.Pix) == 0 {
		return 0
	}
	return float64(n) / float64(len(m.Pix))
}

// IoU is the intersection over union of two binary masks of one size
// (pixels >= 128 are inside). Two empty masks have an IoU of 1.
func IoU(a, b *Mask) (float64, error) {
	if a.Width != b.Width || a.Height != b.Height {
		return 0, fmt.Errorf("IoU of a %dx%d and a %dx%d mask", a.Width, a.Height, b.Width, b.Height)
	}
	inter, union := 0, 0
	for i := range a.Pix {
		ia, ib := a.Pix[i] >= 128, b.Pix[i] >= 128
		if ia && ib {
			inter++
		}
		if ia || ib {
			union++
		}
	}
	if union == 0 {
		return 1, nil
	}
	return float64(inter) / float64(union), nil
}
