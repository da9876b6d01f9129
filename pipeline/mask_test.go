package pipeline

import (
	"context"
	"math/rand"
	"testing"

	"github.com/disintegration/imaging"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// growNaive is the definition: each pixel takes the max (dilate) or min
// (erode) of the (2r+1)² square around it, clipped to the mask.
func growNaive(m *Mask, r int) *Mask {
	dilate := r > 0
	if r < 0 {
		r = -r
	}
	out := m.Clone()
	for y := 0; y < m.Height; y++ {
		for x := 0; x < m.Width; x++ {
			v := m.Pix[y*m.Width+x]
			for yy := max(0, y-r); yy <= min(m.Height-1, y+r); yy++ {
				for xx := max(0, x-r); xx <= min(m.Width-1, x+r); xx++ {
					if p := m.Pix[yy*m.Width+xx]; (p > v) == dilate && p != v {
						v = p
					}
				}
			}
			out.Pix[y*m.Width+x] = v
		}
	}
	return out
}

func TestGrowEqualsTheSquareWindowDefinition(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for _, size := range [][2]int{{1, 1}, {7, 3}, {16, 16}, {33, 20}} {
		for _, r := range []int{-40, -5, -2, -1, 1, 2, 3, 6, 40} {
			m := NewMask(size[0], size[1])
			for i := range m.Pix {
				if rng.Intn(5) == 0 {
					m.Pix[i] = byte(rng.Intn(256))
				}
			}
			want := growNaive(m, r)
			got := m.Clone()
			got.Grow(r)
			require.Equal(t, want.Pix, got.Pix, "size %v r %d", size, r)
		}
	}
}

// An absurd radius costs what a radius of the mask's size costs: the call
// returns (a hang here is the bug the test names), and the result is right.
func TestGrowWithAnEnormousRadiusFinishes(t *testing.T) {
	m := NewMask(512, 384)
	m.Pix[100*512+200] = 255
	m.Grow(1 << 40)
	for _, v := range m.Pix {
		require.Equal(t, byte(255), v)
	}
	m.Grow(-(1 << 40))
	m.Pix[0] = 0
	m.Grow(-(1 << 40))
	for _, v := range m.Pix {
		require.Equal(t, byte(0), v)
	}
}

// Feather equals imaging.Blur (its kernel, rounding and edges), which it
// replaced to skip flat regions and to be cancellable.
func TestFeatherEqualsImagingBlur(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	for _, size := range [][2]int{{1, 1}, {5, 3}, {40, 33}, {97, 64}} {
		for _, sigma := range []float64{0.3, 1, 2.5, 4, 9.7} {
			m := NewMask(size[0], size[1])
			// Flat regions with edges, and some noise: both paths of blurLine.
			for y := 0; y < m.Height; y++ {
				for x := 0; x < m.Width; x++ {
					if (x/7+y/5)%2 == 0 {
						m.Pix[y*m.Width+x] = 255
					}
					if rng.Intn(9) == 0 {
						m.Pix[y*m.Width+x] = byte(rng.Intn(256))
					}
				}
			}
			want := imaging.Blur(m.Image(), sigma)
			got := m.Clone()
			require.NoError(t, got.Feather(context.Background(), sigma))
			for i := range got.Pix {
				require.Equal(t, want.Pix[4*i], got.Pix[i], "size %v sigma %g pixel %d", size, sigma, i)
			}
		}
	}
}

// A wide blur of a large mask stops when its context does.
func TestFeatherStopsWhenCancelled(t *testing.T) {
	m := NewMask(2048, 2048)
	for i := range m.Pix {
		m.Pix[i] = byte(i % 251) // no flat runs: every pixel is computed
	}
	before, lines := m.Clone(), linesBlurred.Load()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, m.Feather(ctx, 64), context.Canceled)
	require.Equal(t, before.Pix, m.Pix)
	require.Equal(t, lines, linesBlurred.Load(), "no line was blurred after the cancel")
	// The largest blur the server allows on a mostly flat mask finishes.
	big := NewMask(4096, 4096)
	for y := 1000; y < 3000; y++ {
		for x := 1000; x < 3000; x++ {
			big.Pix[y*4096+x] = 255
		}
	}
	require.NoError(t, big.Feather(context.Background(), 64))
	assert.Equal(t, byte(255), big.Pix[2000*4096+2000], "inside, far from the edge")
	assert.Equal(t, byte(0), big.Pix[10*4096+10], "outside, far from the edge")
	assert.Less(t, big.Pix[1000*4096+2000], byte(255), "on the edge")
}
