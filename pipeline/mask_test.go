package pipeline

import (
	"math/rand"
	"testing"

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
