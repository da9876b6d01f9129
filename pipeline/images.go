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
	"os"
	"path/filepath"
	"strings"

	"github.com/disintegration/imaging"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/atomicfile"
)

// DefaultMaxPixels bounds the images a request may decode (about 64 MP).
const DefaultMaxPixels = 8192 * 8192

// ErrBadImage marks input that is not a usable image.
var ErrBadImage = errors.New("bad image")

// DecodeImage reads a PNG or JPEG, refusing images with more than maxPixels
// pixels before decoding them (0 means DefaultMaxPixels). JPEG EXIF
// orientation is applied.
func DecodeImage(data []byte, maxPixels int) (image.Image, error) {
	if maxPixels <= 0 {
		maxPixels = DefaultMaxPixels
	}
	cfg, format, err := image.DecodeConfig(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadImage, describeDecodeError(err))
	}
	if format != "png" && format != "jpeg" {
		return nil, fmt.Errorf("%w: %s images are not supported (want PNG or JPEG)", ErrBadImage, format)
	}
	if cfg.Width <= 0 || cfg.Height <= 0 {
		return nil, fmt.Errorf("%w: empty image", ErrBadImage)
	}
	if int64(cfg.Width)*int64(cfg.Height) > int64(maxPixels) {
		return nil, fmt.Errorf("%w: %dx%d is more than the %d pixels allowed", ErrBadImage, cfg.Width, cfg.Height, maxPixels)
	}
	img, err := imaging.Decode(bytes.NewReader(data), imaging.AutoOrientation(true))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadImage, describeDecodeError(err))
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

// ReadImageFile decodes the image at path with DecodeImage's limits.
func ReadImageFile(path string, maxPixels int) (image.Image, error) {
	data, err := os.ReadFile(path)
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
