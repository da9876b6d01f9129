package pipeline_test

import (
	"bytes"
	"encoding/binary"
	"image"
	"image/color"
	"image/jpeg"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/pipeline"
)

// withOrientation inserts an EXIF APP1 segment with the given orientation tag
// right after a JPEG's SOI marker.
func withOrientation(jpg []byte, orientation uint16) []byte {
	var tiff bytes.Buffer
	tiff.WriteString("MM\x00\x2a")                       // big-endian TIFF
	binary.Write(&tiff, binary.BigEndian, uint32(8))     // IFD offset
	binary.Write(&tiff, binary.BigEndian, uint16(1))     // one entry
	binary.Write(&tiff, binary.BigEndian, uint16(0x112)) // Orientation
	binary.Write(&tiff, binary.BigEndian, uint16(3))     // SHORT
	binary.Write(&tiff, binary.BigEndian, uint32(1))     // count
	binary.Write(&tiff, binary.BigEndian, orientation)
	binary.Write(&tiff, binary.BigEndian, uint16(0))
	binary.Write(&tiff, binary.BigEndian, uint32(0)) // no next IFD
	payload := append([]byte("Exif\x00\x00"), tiff.Bytes()...)
	var out bytes.Buffer
	out.Write(jpg[:2])
	out.Write([]byte{0xFF, 0xE1})
	binary.Write(&out, binary.BigEndian, uint16(len(payload)+2))
	out.Write(payload)
	out.Write(jpg[2:])
	return out.Bytes()
}

func TestDecodeAppliesExifOrientation(t *testing.T) {
	img := image.NewNRGBA(image.Rect(0, 0, 40, 20))
	for x := 0; x < 20; x++ {
		for y := 0; y < 20; y++ {
			img.Set(x, y, color.NRGBA{255, 0, 0, 255}) // left half red
		}
	}
	var buf bytes.Buffer
	require.NoError(t, jpeg.Encode(&buf, img, &jpeg.Options{Quality: 95}))
	plain, err := pipeline.DecodeImage(buf.Bytes(), 0)
	require.NoError(t, err)
	assert.Equal(t, image.Pt(40, 20), plain.Bounds().Size())

	rotated, err := pipeline.DecodeImage(withOrientation(buf.Bytes(), 6), 0) // rotate 90° clockwise to view
	require.NoError(t, err)
	assert.Equal(t, image.Pt(20, 40), rotated.Bounds().Size())
	r, _, _, _ := rotated.At(10, 5).RGBA()
	assert.Greater(t, r>>8, uint32(200), "the red half is now on top")
	r, _, _, _ = rotated.At(10, 35).RGBA()
	assert.Less(t, r>>8, uint32(60))
}

func TestDecodeRefusesOtherFormats(t *testing.T) {
	_, err := pipeline.DecodeImage([]byte("GIF89a\x01\x00\x01\x00\x00\x00\x00;"), 0)
	require.Error(t, err)
	assert.ErrorIs(t, err, pipeline.ErrBadImage)
}
