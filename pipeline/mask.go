package pipeline

import (
	"context"
	"fmt"
	"image"
	"math"
	"runtime"
	"sync"
	"sync/atomic"

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
// structuring element, as two separable max/min passes. Each pass costs the
// same whatever r is (van Herk/Gil-Werman), and a radius past the mask's size
// is the same as one that just covers it.
func (m *Mask) Grow(r int) {
	if r == 0 || m.Width == 0 || m.Height == 0 {
		return
	}
	dilate := r > 0
	if r < 0 {
		r = -r
	}
	r = min(r, max(m.Width, m.Height))
	w, h := m.Width, m.Height
	f := newLineFilter(max(w, h), r, dilate)
	line := make([]byte, max(w, h))
	for y := 0; y < h; y++ {
		row := m.Pix[y*w : (y+1)*w]
		f.apply(row, line[:w])
		copy(row, line[:w])
	}
	col := make([]byte, h)
	for x := 0; x < w; x++ {
		for y := 0; y < h; y++ {
			col[y] = m.Pix[y*w+x]
		}
		f.apply(col, line[:h])
		for y := 0; y < h; y++ {
			m.Pix[y*w+x] = line[y]
		}
	}
}

// lineFilter is a running max (dilate) or min (erode) over windows of 2r+1.
type lineFilter struct {
	r         int
	dilate    bool
	pad       byte // the identity of the operation, beyond the line's ends
	buf, g, h []byte
}

func newLineFilter(n, r int, dilate bool) *lineFilter {
	pad := byte(255)
	if dilate {
		pad = 0
	}
	size := n + 2*r
	return &lineFilter{r: r, dilate: dilate, pad: pad, buf: make([]byte, size), g: make([]byte, size), h: make([]byte, size)}
}

func (f *lineFilter) op(a, b byte) byte {
	if (a > b) == f.dilate {
		return a
	}
	return b
}

// apply writes to dst the filter of src (same length).
func (f *lineFilter) apply(src, dst []byte) {
	n, r, k := len(src), f.r, 2*f.r+1
	size := n + 2*r
	buf, g, h := f.buf[:size], f.g[:size], f.h[:size]
	for i := range buf {
		buf[i] = f.pad
	}
	copy(buf[r:], src)
	// g: running op from each block's start; h: from each block's end.
	for i := 0; i < size; i++ {
		if i%k == 0 {
			g[i] = buf[i]
		} else {
			g[i] = f.op(g[i-1], buf[i])
		}
	}
	for i := size - 1; i >= 0; i-- {
		if i == size-1 || (i+1)%k == 0 {
			h[i] = buf[i]
		} else {
			h[i] = f.op(h[i+1], buf[i])
		}
	}
	// The window [i, i+k-1] of buf spans at most two blocks.
	for i := 0; i < n; i++ {
		dst[i] = f.op(h[i], g[i+k-1])
	}
}

// Feather blurs the mask's edges with a Gaussian of the given sigma (pixels),
// exactly as imaging.Blur does (the same kernel, rounding and edge handling).
// Pixels farther than 3 sigma from any edge keep their value and cost nothing,
// so a mask's cost is its edges', and ctx is checked on every line: a large
// mask with a wide blur can be cancelled.
func (m *Mask) Feather(ctx context.Context, sigma float64) error {
	if sigma <= 0 || m.Width == 0 || m.Height == 0 {
		return nil
	}
	radius := int(math.Ceil(sigma * 3))
	kernel := make([]float64, radius+1)
	for i := range kernel {
		x := float64(i)
		kernel[i] = math.Exp(-(x*x)/(2*sigma*sigma)) / (sigma * math.Sqrt(2*math.Pi))
	}
	w, h := m.Width, m.Height
	tmp := make([]byte, len(m.Pix))
	// Rows into tmp, then columns back into m.Pix.
	err := parallelLines(ctx, h, func(y int, line, out []byte) {
		copy(line[:w], m.Pix[y*w:(y+1)*w])
		blurLine(line[:w], out[:w], kernel)
		copy(tmp[y*w:(y+1)*w], out[:w])
	}, max(w, h))
	if err != nil {
		return err
	}
	return parallelLines(ctx, w, func(x int, line, out []byte) {
		for y := 0; y < h; y++ {
			line[y] = tmp[y*w+x]
		}
		blurLine(line[:h], out[:h], kernel)
		for y := 0; y < h; y++ {
			m.Pix[y*w+x] = out[y]
		}
	}, max(w, h))
}

// linesBlurred counts the lines parallelLines has run, for tests.
var linesBlurred atomic.Int64

// parallelLines runs f on lines 0..n-1 from a few goroutines, each with its
// own buffers of size, checking ctx before every line.
func parallelLines(ctx context.Context, n int, f func(i int, line, out []byte), size int) error {
	workers := min(runtime.GOMAXPROCS(0), max(1, n/16))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			line, out := make([]byte, size), make([]byte, size)
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				f(i, line, out)
				linesBlurred.Add(1)
			}
		}()
	}
	wg.Wait()
	return ctx.Err()
}

// blurLine is imaging's one-dimensional pass for an opaque gray line: a
// window that holds one value only gives that value back and is skipped.
func blurLine(src, dst []byte, kernel []float64) {
	n, radius := len(src), len(kernel)-1
	// runEnd[i] is the first index after i whose value differs from src[i].
	runEnd := make([]int32, n)
	runEnd[n-1] = int32(n)
	for i := n - 2; i >= 0; i-- {
		if src[i] == src[i+1] {
			runEnd[i] = runEnd[i+1]
		} else {
			runEnd[i] = int32(i + 1)
		}
	}
	for x := 0; x < n; x++ {
		lo, hi := max(x-radius, 0), min(x+radius, n-1)
		if int(runEnd[lo]) > hi {
			dst[x] = src[x]
			continue
		}
		var r, a float64
		for ix := lo; ix <= hi; ix++ {
			wa := 255 * kernel[absInt(x-ix)]
			r += float64(src[ix]) * wa
			a += wa
		}
		dst[x] = clampByte(r * (1 / a))
	}
}

func absInt(v int) int {
	if v < 0 {
		return -v
	}
	return v
}

// clampByte rounds as imaging does.
func clampByte(x float64) uint8 {
	v := int64(x + 0.5)
	if v > 255 {
		return 255
	}
	if v > 0 {
		return uint8(v)
	}
	return 0
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
