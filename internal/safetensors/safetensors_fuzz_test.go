package safetensors_test

import (
	"bytes"
	"testing"
	"unsafe"

	"github.com/stepwise-sd/stepwise/internal/safetensors"
)

// FuzzSafetensorsHeader: Parse never panics on any bytes; what it accepts has
// every tensor's data inside the buffer, sized by its dtype and shape, and
// survives Encode then Parse unchanged. Seeds: testdata/fuzz/FuzzSafetensorsHeader.
func FuzzSafetensorsHeader(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		parsed, err := safetensors.Parse(b, "fuzz")
		if err != nil {
			return
		}
		lo := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
		hi := lo + uintptr(len(b))
		for name, tensor := range parsed.Tensors {
			size, err := safetensors.ByteSize(tensor.DType, tensor.Shape)
			if err != nil || size != int64(len(tensor.Data)) {
				t.Fatalf("tensor %q: %d bytes for %s %v (%v)", name, len(tensor.Data), tensor.DType, tensor.Shape, err)
			}
			if len(tensor.Data) > 0 {
				p := uintptr(unsafe.Pointer(unsafe.SliceData(tensor.Data)))
				if p < lo || p+uintptr(len(tensor.Data)) > hi {
					t.Fatalf("tensor %q lies outside the buffer", name)
				}
			}
		}
		again, err := safetensors.Encode(parsed.Tensors, parsed.Metadata)
		if err != nil {
			t.Fatalf("Encode refuses what Parse accepted: %v", err)
		}
		round, err := safetensors.Parse(again, "again")
		if err != nil {
			t.Fatalf("Parse refuses what Encode wrote: %v", err)
		}
		if len(round.Tensors) != len(parsed.Tensors) || len(round.Metadata) != len(parsed.Metadata) {
			t.Fatalf("round trip changed the counts")
		}
		for k, v := range parsed.Metadata {
			if round.Metadata[k] != v {
				t.Fatalf("metadata %q changed", k)
			}
		}
		for name, want := range parsed.Tensors {
			got, ok := round.Tensors[name]
			if !ok || got.DType != want.DType || !bytes.Equal(got.Data, want.Data) || len(got.Shape) != len(want.Shape) {
				t.Fatalf("tensor %q changed in the round trip", name)
			}
			for i := range want.Shape {
				if got.Shape[i] != want.Shape[i] {
					t.Fatalf("tensor %q changed shape in the round trip", name)
				}
			}
		}
	})
}
