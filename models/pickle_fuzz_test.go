package models_test

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/stepwise-sd/stepwise/models"
)

// FuzzPickleConverter: ReadPickleStateDict on any file never panics (a
// recovered panic counts as a failure: it means a bound is missing), fails
// only with ErrBadCheckpoint or ErrUnsafePickle, and allocates in proportion
// to the file: at most MaxCheckpointExpansion plus the unpickler's
// per-opcode overhead per byte, never what a size field claims. With
// asDataPkl the input becomes the data.pkl of a zip that holds a 6-element
// float storage "0", so that the fuzzer reaches the unpickler through the
// zip format without having to forge CRCs. Seeds:
// testdata/fuzz/FuzzPickleConverter.
func FuzzPickleConverter(f *testing.F) {
	// One file, rewritten for each input: inputs run one at a time in a
	// fuzzing process.
	path := filepath.Join(f.TempDir(), "m.pth")
	f.Fuzz(func(t *testing.T, data []byte, asDataPkl bool) {
		if asDataPkl {
			data = torchZip(data, map[string][]byte{"0": six})
		}
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		tensors, _, err := models.ReadPickleStateDict(path)
		runtime.ReadMemStats(&after)
		if err != nil {
			if !errors.Is(err, models.ErrBadCheckpoint) && !errors.Is(err, models.ErrUnsafePickle) {
				t.Fatalf("error of no known kind: %v", err)
			}
			if isRecovered(err) {
				t.Fatalf("a panic was recovered: %v", err)
			}
		}
		bound := uint64(4<<20 + (models.MaxCheckpointExpansion+maxPickleOverhead)*len(data))
		if got := after.TotalAlloc - before.TotalAlloc; got > bound {
			t.Fatalf("allocated %d bytes for a %d-byte file (bound %d)", got, len(data), bound)
		}
		for name, tensor := range tensors {
			if int64(len(tensor.Data)) > models.MaxCheckpointExpansion*int64(len(data)) {
				t.Fatalf("tensor %q of %d bytes from a %d-byte file", name, len(tensor.Data), len(data))
			}
		}
	})
}

// maxPickleOverhead is the most the unpickler allocates per byte of pickle:
// a MARK, one byte, costs a 16-slot slice.
const maxPickleOverhead = 512

// isRecovered tells the error ReadPickleStateDict makes of a recovered panic.
func isRecovered(err error) bool { return errors.Is(err, models.ErrPanicked) }
