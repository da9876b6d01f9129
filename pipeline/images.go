// Package pipeline turns requests into calls on models: it decodes and
// preprocesses images, builds masks, runs the steps in order and writes the
// results.
package pipeline

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"image"
	"image/draw"
	"image/jpeg"
	"image/png"
	"io"
	"math"
	"path/filepath"
	"strings"

	"github.com/disintegration/imaging"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/atomicfile"
	"github.com/stepwise-sd/stepwise/internal/regfile"
)

// DefaultMaxPixels bounds the images a request may decode (about 64 MP).
const DefaultMaxPixels = 8192 * 8192

// MaxImageSide bounds each side of an image, whatever the pixel limit: the
// most JPEG can encode. It keeps a 1-pixel-high sliver of a million columns
// out, and with int64 arithmetic the product of two sides cannot overflow.
const MaxImageSide = 65535

// MaxJPEGScans bounds the scans of a JPEG. Each progressive scan costs a
// pass over the whole image however few bytes it takes, so a small file of
// many scans would cost hours; real encoders write about ten.
const MaxJPEGScans = 256

// ErrBadImage marks input that is not a usable image.
var ErrBadImage = errors.New("bad image")

// CheckImage reads only the header of an encoded image and checks it against
// the limits, decoding nothing: it must be PNG or JPEG (by its signature —
// other decoders that imported packages register are never consulted), each
// side at most MaxImageSide, at most maxPixels pixels (0 means
// DefaultMaxPixels), and a JPEG at most MaxJPEGScans scans. It returns the
// size from the header and the format, "png" or "jpeg". Errors wrap
// ErrBadImage.
func CheckImage(data []byte, maxPixels int) (image.Config, string, error) {
	if maxPixels <= 0 {
		maxPixels = DefaultMaxPixels
	}
	var cfg image.Config
	var err error
	format := sniffFormat(data)
	switch format {
	case "png":
		cfg, err = png.DecodeConfig(bytes.NewReader(data))
	case "jpeg":
		if err = checkJPEGScans(data); err == nil {
			cfg, err = jpeg.DecodeConfig(bytes.NewReader(data))
		}
	case "":
		return image.Config{}, "", fmt.Errorf("%w: not a PNG or JPEG image", ErrBadImage)
	default:
		return image.Config{}, "", fmt.Errorf("%w: %s images are not supported (want PNG or JPEG)", ErrBadImage, format)
	}
	if err != nil {
		return image.Config{}, "", fmt.Errorf("%w: %s", ErrBadImage, describeDecodeError(err))
	}
	if err := checkSize(cfg.Width, cfg.Height, int64(maxPixels)); err != nil {
		return image.Config{}, "", err
	}
	return cfg, format, nil
}

// checkSize checks a header's size in int64: two sides under MaxImageSide
// multiply past a 32-bit int.
func checkSize(w, h int, maxPixels int64) error {
	if w <= 0 || h <= 0 {
		return fmt.Errorf("%w: empty image (%dx%d)", ErrBadImage, w, h)
	}
	if w > MaxImageSide || h > MaxImageSide {
		return fmt.Errorf("%w: %dx%d has a side over %d pixels", ErrBadImage, w, h, MaxImageSide)
	}
	if px := int64(w) * int64(h); px > maxPixels || px > math.MaxInt/8 {
		// math.MaxInt/8: a 16-bit RGBA buffer of that many pixels must
		// be addressable (it is not, on 32-bit, past 256 M pixels).
		return fmt.Errorf("%w: %dx%d is more than the %d pixels allowed", ErrBadImage, w, h, maxPixels)
	}
	return nil
}

// sniffFormat names an encoded image's format by its signature: "png",
// "jpeg", the name of a format that is refused, or "".
func sniffFormat(data []byte) string {
	has := func(p string) bool { return bytes.HasPrefix(data, []byte(p)) }
	switch {
	case has("\x89PNG\r\n\x1a\n"):
		return "png"
	case has("\xff\xd8"):
		return "jpeg"
	case has("GIF87a"), has("GIF89a"):
		return "gif"
	case has("BM"):
		return "bmp"
	case has("II*\x00"), has("MM\x00*"):
		return "tiff"
	case len(data) >= 12 && has("RIFF") && string(data[8:12]) == "WEBP":
		return "webp"
	}
	return ""
}

// checkJPEGScans walks a JPEG's markers (not its pixels) and refuses more
// than MaxJPEGScans scans.
func checkJPEGScans(data []byte) error {
	scans := 0
	i := 2 // after SOI
	for i < len(data) {
		for i < len(data) && data[i] != 0xff { // extraneous bytes, skipped as the decoder does
			i++
		}
		for i < len(data) && data[i] == 0xff { // fill bytes
			i++
		}
		if i >= len(data) {
			break
		}
		m := data[i]
		i++
		switch {
		case m == 0xd9: // EOI
			return nil
		case m >= 0xd0 && m <= 0xd7, m == 0x01: // RSTn, TEM: no length
			continue
		}
		if i+2 > len(data) {
			break
		}
		n := int(data[i])<<8 | int(data[i+1])
		if n < 2 {
			return fmt.Errorf("%w: malformed JPEG segment", ErrBadImage)
		}
		i += n
		if m != 0xda { // not SOS
			continue
		}
		if scans++; scans > MaxJPEGScans {
			return fmt.Errorf("%w: JPEG of more than %d scans", ErrBadImage, MaxJPEGScans)
		}
		// Entropy-coded data runs to the next marker that is neither a
		// stuffed 0xff00 nor a restart marker.
		for i < len(data) {
			if data[i] == 0xff && i+1 < len(data) && data[i+1] != 0 && (data[i+1] < 0xd0 || data[i+1] > 0xd7) {
				break
			}
			i++
		}
	}
	return nil // truncated: the decoder says so
}

// DecodeImage decodes a PNG or JPEG that passes CheckImage (so nothing past
// the limits is ever allocated) and applies JPEG EXIF orientation. The
// result is the header's size, or its transpose after rotation; anything
// else is refused. Errors wrap ErrBadImage.
func DecodeImage(data []byte, maxPixels int) (image.Image, error) {
	cfg, _, err := CheckImage(data, maxPixels)
	if err != nil {
		return nil, err
	}
	img, err := imaging.Decode(bytes.NewReader(data), imaging.AutoOrientation(true))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadImage, describeDecodeError(err))
	}
	got := img.Bounds().Size()
	if got != image.Pt(cfg.Width, cfg.Height) && got != image.Pt(cfg.Height, cfg.Width) {
		return nil, fmt.Errorf("%w: decoded %v, the header says %dx%d", ErrBadImage, got, cfg.Width, cfg.Height)
	}
	return img, nil
}

func describeDecodeError(err error) string {
	switch {
	case errors.Is(err, image.ErrFormat):
		return "not a PNG or JPEG image"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "truncated image"
	}
	return err.Error()
}

// ReadImageFile decodes the image at path with DecodeImage's limits; path
// must name a regular file.
func ReadImageFile(path string, maxPixels int) (image.Image, error) {
	data, err := regfile.ReadFile(path, 0)
	if err != nil {
		return nil, err
	}
	img, err := DecodeImage(data, maxPixels)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return img, nil
}

// Resize scales img to exactly w x h with a Lanczos filter.
func Resize(img image.Image, w, h int) *image.NRGBA {
	if img.Bounds().Dx() == w && img.Bounds().Dy() == h {
		return toNRGBA(img)
	}
	return imaging.Resize(img, w, h, imaging.Lanczos)
}

// ResizeBicubic scales img to exactly w x h with a Catmull-Rom (bicubic)
// filter, close to PIL's BICUBIC that segmentation models are trained with.
func ResizeBicubic(img image.Image, w, h int) *image.NRGBA {
	if img.Bounds().Dx() == w && img.Bounds().Dy() == h {
		return toNRGBA(img)
	}
	return imaging.Resize(img, w, h, imaging.CatmullRom)
}

// toNRGBA returns img as an NRGBA starting at (0, 0); a new image unless img
// already is one.
func toNRGBA(img image.Image) *image.NRGBA {
	if n, ok := img.(*image.NRGBA); ok && n.Rect.Min == (image.Point{}) {
		return n
	}
	b := img.Bounds()
	out := image.NewNRGBA(image.Rect(0, 0, b.Dx(), b.Dy()))
	draw.Draw(out, out.Rect, img, b.Min, draw.Src)
	return out
}

// RGB converts img to the engine's 3-channel image.
func RGB(img image.Image) *binding.Image {
	n := toNRGBA(img)
	w, h := n.Rect.Dx(), n.Rect.Dy()
	out := &binding.Image{Width: w, Height: h, Channels: 3, Pix: make([]byte, 0, w*h*3)}
	for y := 0; y < h; y++ {
		row := n.Pix[y*n.Stride : y*n.Stride+w*4]
		for x := 0; x < w; x++ {
			out.Pix = append(out.Pix, row[4*x], row[4*x+1], row[4*x+2])
		}
	}
	return out
}

// Gray converts img to the engine's 1-channel image with the ITU-R 601 luma
// weights (as PIL's "L" mode).
func Gray(img image.Image) *binding.Image {
	n := toNRGBA(img)
	w, h := n.Rect.Dx(), n.Rect.Dy()
	out := &binding.Image{Width: w, Height: h, Channels: 1, Pix: make([]byte, 0, w*h)}
	for y := 0; y < h; y++ {
		row := n.Pix[y*n.Stride : y*n.Stride+w*4]
		for x := 0; x < w; x++ {
			r, g, b := int(row[4*x]), int(row[4*x+1]), int(row[4*x+2])
			out.Pix = append(out.Pix, byte((r*299+g*587+b*114+500)/1000))
		}
	}
	return out
}

// ToImage converts an engine image to a Go image (RGB as NRGBA, gray as Gray).
func ToImage(img binding.Image) image.Image {
	if img.Channels == 1 {
		g := image.NewGray(image.Rect(0, 0, img.Width, img.Height))
		copy(g.Pix, img.Pix)
		return g
	}
	n := image.NewNRGBA(image.Rect(0, 0, img.Width, img.Height))
	for i := 0; i < img.Width*img.Height; i++ {
		n.Pix[4*i], n.Pix[4*i+1], n.Pix[4*i+2], n.Pix[4*i+3] = img.Pix[3*i], img.Pix[3*i+1], img.Pix[3*i+2], 255
	}
	return n
}

// EncodePNG encodes img as a PNG at the best compression.
func EncodePNG(img image.Image) ([]byte, error) {
	var buf bytes.Buffer
	enc := png.Encoder{CompressionLevel: png.BestCompression}
	if err := enc.Encode(&buf, img); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// EncodeJPEG encodes img as a JPEG of the given quality.
func EncodeJPEG(img image.Image, quality int) ([]byte, error) {
	var buf bytes.Buffer
	w := bufio.NewWriter(&buf)
	if err := jpeg.Encode(w, img, &jpeg.Options{Quality: quality}); err != nil {
		return nil, err
	}
	if err := w.Flush(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteImageFile writes img atomically as PNG, or JPEG when path ends in .jpg/.jpeg.
func WriteImageFile(path string, img image.Image) error {
	var data []byte
	var err error
	switch strings.ToLower(filepath.Ext(path)) {
	case ".jpg", ".jpeg":
		data, err = EncodeJPEG(img, 95)
	default:
		data, err = EncodePNG(img)
	}
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return atomicfile.WriteFile(path, data, 0o644)
}
