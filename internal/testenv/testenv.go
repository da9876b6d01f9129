// Package testenv gives tests the real engine library, the project's tiny
// models and the shared reference fixtures.
package testenv

import (
	"bytes"
	"image"
	"image/color"
	"image/png"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/models"
)

// Root is the repository's root folder.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// LibPath is $STEPWISE_LIB, else build/libstepwise.so in the repository.
func LibPath() string {
	if p := os.Getenv("STEPWISE_LIB"); p != "" {
		return p
	}
	return filepath.Join(Root(), "build", binding.LibraryName)
}

var (
	libOnce sync.Once
	lib     *binding.Library
	libErr  error

	tinyOnce        sync.Once
	tinySD, tinySeg string
	tinyErr         error
	tinyDir         string
)

// Library loads the engine once per test binary, on the cpu.
func Library(t testing.TB) *binding.Library {
	t.Helper()
	libOnce.Do(func() {
		slog.SetLogLoggerLevel(slog.LevelWarn) // engine and cache chatter stays out of test output
		lib, libErr = binding.Load(binding.Options{Path: LibPath(), Device: "cpu"})
	})
	if libErr != nil {
		t.Fatalf("the engine library is needed (run `make build`): %v", libErr)
	}
	return lib
}

// Tiny makes the tiny models once per test binary and returns the SD folder
// and the segmentation file. Callers must not modify them.
func Tiny(t testing.TB) (sdDir, segPath string) {
	t.Helper()
	l := Library(t)
	tinyOnce.Do(func() {
		tinyDir, tinyErr = os.MkdirTemp("", "stepwise-tiny-")
		if tinyErr == nil {
			tinySD, tinySeg, tinyErr = models.MakeTiny(l, tinyDir)
		}
	})
	if tinyErr != nil {
		t.Fatalf("make tiny models: %v", tinyErr)
	}
	return tinySD, tinySeg
}

// Main runs a package's tests and then removes what Tiny made; every test
// package that uses Tiny has func TestMain(m *testing.M) { testenv.Main(m) }.
func Main(m *testing.M) {
	code := m.Run()
	if tinyDir != "" {
		os.RemoveAll(tinyDir)
	}
	os.Exit(code)
}

// Fixtures is ../shared/fixtures beside the repository, or $STEPWISE_FIXTURES.
// Tests that need it skip, saying so, when it is absent.
func Fixtures(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("STEPWISE_FIXTURES")
	if dir == "" {
		dir = filepath.Join(Root(), "..", "shared", "fixtures")
	}
	if _, err := os.Stat(dir); err != nil {
		t.Skipf("reference fixtures not found at %s (set STEPWISE_FIXTURES): skipping parity check", dir)
	}
	return dir
}

// Photo is a test picture as a PNG: a bright disc on a dark gradient. The
// tiny segmentation model finds a subject in it that is neither nothing nor
// everything, so edits of it succeed.
func Photo(t testing.TB, w, h int) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			dx, dy := float64(x-w/2), float64(y-h/2)
			c := color.NRGBA{uint8(40 + x), uint8(30 + y), 90, 255}
			if math.Hypot(dx, dy) < float64(min(w, h))/3 {
				c = color.NRGBA{230, 200, uint8(100 + x%50), 255}
			}
			img.Set(x, y, c)
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatalf("encode test photo: %v", err)
	}
	return buf.Bytes()
}

// ReadPNG decodes the PNG file at path.
func ReadPNG(t testing.TB, path string) image.Image {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("read PNG: %v", err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("decode %s: %v", path, err)
	}
	return img
}
