package pipeline_test

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"image"
	"image/jpeg"
	"image/png"
	"math"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/pipeline"
)

func encodePNG(t testing.TB, w, h int) []byte {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for i := range img.Pix {
		img.Pix[i] = byte(i * 7)
	}
	var buf bytes.Buffer
	require.NoError(t, png.Encode(&buf, img))
	return buf.Bytes()
}

func encodeJPEG(t testing.TB, w, h int) []byte {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for i := range img.Pix {
		img.Pix[i] = byte(i * 13)
	}
	var buf bytes.Buffer
	require.NoError(t, jpeg.Encode(&buf, img, &jpeg.Options{Quality: 80}))
	return buf.Bytes()
}

// withPNGSize rewrites a PNG's IHDR to claim w×h (with a valid CRC): the
// header lies about the data behind it.
func withPNGSize(b []byte, w, h uint32) []byte {
	out := append([]byte(nil), b...)
	binary.BigEndian.PutUint32(out[16:], w)
	binary.BigEndian.PutUint32(out[20:], h)
	binary.BigEndian.PutUint32(out[29:], crc32.ChecksumIEEE(out[12:29]))
	return out
}

// withScans repeats a baseline JPEG's scan until it has n scans.
func withScans(b []byte, n int) []byte {
	sos := bytes.Index(b, []byte{0xff, 0xda})
	scan := b[sos : len(b)-2]
	out := append([]byte(nil), b[:len(b)-2]...)
	for i := 1; i < n; i++ {
		out = append(out, scan...)
	}
	return append(out, 0xff, 0xd9)
}

func TestCheckImageReadsTheHeaderOnly(t *testing.T) {
	// A 33-byte header claiming 8192×8192 and no pixel data.
	header := withPNGSize(encodePNG(t, 2, 2), 8192, 8192)[:33]
	cfg, format, err := pipeline.CheckImage(header, 0)
	require.NoError(t, err)
	assert.Equal(t, "png", format)
	assert.Equal(t, image.Config{ColorModel: cfg.ColorModel, Width: 8192, Height: 8192}, cfg)

	cfg, format, err = pipeline.CheckImage(encodeJPEG(t, 30, 20), 600)
	require.NoError(t, err)
	assert.Equal(t, "jpeg", format)
	assert.Equal(t, image.Pt(30, 20), image.Pt(cfg.Width, cfg.Height))

	_, _, err = pipeline.CheckImage(header, 8192*8192-1)
	assert.ErrorIs(t, err, pipeline.ErrBadImage)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, err = pipeline.DecodeImage(header, 0)
	runtime.ReadMemStats(&after)
	assert.ErrorIs(t, err, pipeline.ErrBadImage, "no pixel data")
	assert.Less(t, after.TotalAlloc-before.TotalAlloc, uint64(64<<20), "the 256 MB the header claims is not allocated")
}

func TestDecodeImageRefusesWhatIsPastTheLimits(t *testing.T) {
	png2 := encodePNG(t, 2, 2)
	png4 := encodePNG(t, 4, 4)
	jpg := encodeJPEG(t, 16, 16)
	// header: CheckImage, which decodes nothing, refuses it too.
	cases := []struct {
		name      string
		data      []byte
		maxPixels int
		header    bool
	}{
		{"empty", nil, 0, true},
		{"garbage", []byte("hello, world"), 0, true},
		{"gif", []byte("GIF89a\x01\x00\x01\x00\x00\x00\x00;"), 0, true},
		{"bmp", append([]byte("BM"), make([]byte, 60)...), 0, true},
		{"webp", []byte("RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00\x2f\x00\x00\x00\x10\x07\x10\x11\x11\x88\x88\xfe\x07\x00"), 0, true},
		{"tiff", []byte("II*\x00\x08\x00\x00\x00"), 0, true},
		{"zero width", withPNGSize(png2, 0, 2), 0, true},
		{"over the pixel limit", png4, 15, true},
		{"side over MaxImageSide", withPNGSize(png2, pipeline.MaxImageSide+1, 1), math.MaxInt32, true},
		{"product past a 32-bit int", withPNGSize(png2, 65535, 65535), math.MaxInt32, true},
		{"header smaller than the data", withPNGSize(png4, 2, 2), 0, false},
		{"header larger than the data", withPNGSize(png2, 4, 4), 0, false},
		{"truncated png", png4[:len(png4)-20], 0, false},
		{"truncated jpeg", jpg[:len(jpg)/2], 0, false},
		{"jpeg of too many scans", withScans(jpg, pipeline.MaxJPEGScans+1), 0, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := pipeline.DecodeImage(c.data, c.maxPixels)
			require.Error(t, err)
			assert.ErrorIs(t, err, pipeline.ErrBadImage)
			if c.header {
				_, _, err := pipeline.CheckImage(c.data, c.maxPixels)
				assert.ErrorIs(t, err, pipeline.ErrBadImage)
			}
		})
	}
}

func TestDecodeImageAcceptsTheEdges(t *testing.T) {
	png4 := encodePNG(t, 4, 4)
	img, err := pipeline.DecodeImage(png4, 16)
	require.NoError(t, err)
	assert.Equal(t, image.Pt(4, 4), img.Bounds().Size())

	jpg := encodeJPEG(t, 16, 8)
	img, err = pipeline.DecodeImage(withScans(jpg, 3), 0)
	require.NoError(t, err, "a few scans are normal")
	assert.Equal(t, image.Pt(16, 8), img.Bounds().Size())
}

// exifJPEG inserts an APP1 EXIF segment with raw TIFF bytes after SOI.
func exifJPEG(jpg, tiff []byte) []byte {
	payload := append([]byte("Exif\x00\x00"), tiff...)
	var out bytes.Buffer
	out.Write(jpg[:2])
	out.Write([]byte{0xff, 0xe1})
	binary.Write(&out, binary.BigEndian, uint16(len(payload)+2))
	out.Write(payload)
	out.Write(jpg[2:])
	return out.Bytes()
}

// EXIF is read from the bytes that are there: offsets and counts that point
// far past them change nothing.
func TestDecodeImageSurvivesHostileExif(t *testing.T) {
	jpg := encodeJPEG(t, 40, 20)
	cases := map[string][]byte{
		"IFD offset past the end": append([]byte("MM\x00\x2a"), 0xff, 0xff, 0xff, 0xf0),
		"IFD offset too small":    append([]byte("MM\x00\x2a"), 0, 0, 0, 1),
		"65535 tags, none there":  append([]byte("II\x2a\x00\x08\x00\x00\x00"), 0xff, 0xff),
		"orientation 200":         []byte("MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\xc8\x00\x00"),
		"bad byte order":          []byte("XX\x00\x2a\x00\x00\x00\x08"),
	}
	for name, tiff := range cases {
		img, err := pipeline.DecodeImage(exifJPEG(jpg, tiff), 0)
		require.NoError(t, err, name)
		assert.Equal(t, image.Pt(40, 20), img.Bounds().Size(), name)
	}
}
