// Package safetensors reads and writes the safetensors format on the Go side:
// an 8-byte little-endian header length, a JSON header, then raw little-endian
// tensor bytes. The engine has its own reader; this one serves tools, tests and
// files the Go side writes (saved latents, converted checkpoints).
package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"unicode/utf8"

	"github.com/stepwise-sd/stepwise/internal/atomicfile"
	"github.com/stepwise-sd/stepwise/internal/regfile"
)

// Tensor is one named tensor: its dtype name ("F32", "I64", ...), shape and
// raw little-endian bytes.
type Tensor struct {
	DType string
	Shape []int64
	Data  []byte
}

// File is a parsed safetensors file.
type File struct {
	Tensors  map[string]Tensor
	Metadata map[string]string
}

type headerEntry struct {
	DType       string  `json:"dtype"`
	Shape       []int64 `json:"shape"`
	DataOffsets []int64 `json:"data_offsets"`
}

// MaxHeaderBytes bounds the JSON header, as the reference implementation
// does: a header is a few hundred bytes per tensor, and a length read from
// the file must not decide how much is allocated.
const MaxHeaderBytes = 100_000_000

// ErrMalformed marks a file that is not valid safetensors: a header length
// past the file or over MaxHeaderBytes, a header that is not the expected
// JSON, an unknown dtype, a negative dimension, or data offsets that do not
// match the shape or do not tile the data section exactly.
var ErrMalformed = errors.New("malformed safetensors file")

// elemSize is every dtype the format defines, with its size in bytes.
var elemSize = map[string]int64{
	"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E5M2": 1, "F8_E4M3": 1,
	"I64": 8, "I32": 4, "I16": 2, "I8": 1,
	"U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

// ElemSize returns the size in bytes of one element of dtype, and whether
// the dtype is known.
func ElemSize(dtype string) (int64, bool) {
	n, ok := elemSize[dtype]
	return n, ok
}

// ByteSize returns how many bytes a tensor of dtype and shape holds, or an
// error for an unknown dtype, a negative dimension or a size past int64.
func ByteSize(dtype string, shape []int64) (int64, error) {
	size, ok := elemSize[dtype]
	if !ok {
		return 0, fmt.Errorf("unknown dtype %q", dtype)
	}
	n := size
	for _, d := range shape {
		if d < 0 {
			return 0, fmt.Errorf("negative dimension %d in shape %v", d, shape)
		}
	}
	for _, d := range shape {
		if d == 0 {
			return 0, nil
		}
		if n > math.MaxInt64/d {
			return 0, fmt.Errorf("shape %v is too large", shape)
		}
		n *= d
	}
	return n, nil
}

// Read parses a whole file; path must name a regular file.
func Read(path string) (*File, error) {
	b, err := regfile.ReadFile(path, 0)
	if err != nil {
		return nil, err
	}
	return Parse(b, path)
}

// Parse parses the bytes of a file; name is used in errors. Every error
// wraps ErrMalformed. The tensors' Data alias b.
func Parse(b []byte, name string) (*File, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%s: %w: %s", name, ErrMalformed, fmt.Sprintf(format, args...))
	}
	if len(b) < 8 {
		return nil, bad("%d bytes, shorter than the header length", len(b))
	}
	n := binary.LittleEndian.Uint64(b)
	if n > MaxHeaderBytes {
		return nil, bad("header of %d bytes, over the %d allowed", n, MaxHeaderBytes)
	}
	if n > uint64(len(b)-8) {
		return nil, bad("header of %d bytes past the end of the file (%d bytes)", n, len(b))
	}
	header := b[8 : 8+n]
	if !utf8.Valid(header) {
		return nil, bad("header is not UTF-8")
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(header, &raw); err != nil {
		return nil, bad("header is not a JSON object: %v", err)
	}
	if raw == nil {
		return nil, bad("header is not a JSON object")
	}
	data := b[8+n:]
	f := &File{Tensors: map[string]Tensor{}, Metadata: map[string]string{}}
	type span struct {
		name   string
		lo, hi int64
	}
	spans := make([]span, 0, len(raw))
	for k, v := range raw {
		if k == "__metadata__" {
			if err := json.Unmarshal(v, &f.Metadata); err != nil {
				return nil, bad("__metadata__ is not an object of strings: %v", err)
			}
			if f.Metadata == nil {
				f.Metadata = map[string]string{}
			}
			continue
		}
		var e headerEntry
		if err := json.Unmarshal(v, &e); err != nil {
			return nil, bad("tensor %q: %v", k, err)
		}
		if e.Shape == nil || len(e.DataOffsets) != 2 {
			return nil, bad("tensor %q: needs dtype, shape and two data_offsets", k)
		}
		size, err := ByteSize(e.DType, e.Shape)
		if err != nil {
			return nil, bad("tensor %q: %v", k, err)
		}
		lo, hi := e.DataOffsets[0], e.DataOffsets[1]
		if lo < 0 || hi < lo || hi > int64(len(data)) {
			return nil, bad("tensor %q: data_offsets [%d, %d] outside the %d data bytes", k, lo, hi, len(data))
		}
		if hi-lo != size {
			return nil, bad("tensor %q: data_offsets span %d bytes, its dtype and shape need %d", k, hi-lo, size)
		}
		spans = append(spans, span{k, lo, hi})
		f.Tensors[k] = Tensor{DType: e.DType, Shape: e.Shape, Data: data[lo:hi:hi]}
	}
	// The tensors tile the data section: in offset order, each starts where
	// the previous one ended and the last ends at the end of the file. No
	// overlap (one write changing two tensors), no hidden bytes.
	sort.Slice(spans, func(i, j int) bool {
		if spans[i].lo != spans[j].lo {
			return spans[i].lo < spans[j].lo
		}
		return spans[i].hi < spans[j].hi
	})
	var end int64
	for _, s := range spans {
		if s.lo != end {
			return nil, bad("tensor %q starts at %d, the previous data ends at %d (overlap or gap)", s.name, s.lo, end)
		}
		end = s.hi
	}
	if end != int64(len(data)) {
		return nil, bad("the tensors end at %d, the data section holds %d bytes", end, len(data))
	}
	return f, nil
}

// Encode serialises tensors (in name order) and metadata.
func Encode(tensors map[string]Tensor, metadata map[string]string) ([]byte, error) {
	names := make([]string, 0, len(tensors))
	for k := range tensors {
		names = append(names, k)
	}
	sort.Strings(names)
	header := map[string]any{}
	if len(metadata) > 0 {
		header["__metadata__"] = metadata
	}
	var off int64
	for _, k := range names {
		t := tensors[k]
		if k == "__metadata__" {
			return nil, fmt.Errorf("a tensor cannot be named __metadata__")
		}
		size, err := ByteSize(t.DType, t.Shape)
		if err != nil {
			return nil, fmt.Errorf("tensor %q: %w", k, err)
		}
		if size != int64(len(t.Data)) {
			return nil, fmt.Errorf("tensor %q: %d bytes of data, its dtype and shape need %d", k, len(t.Data), size)
		}
		shape := t.Shape
		if shape == nil {
			shape = []int64{} // a scalar: the header needs [] not null
		}
		header[k] = headerEntry{DType: t.DType, Shape: shape, DataOffsets: []int64{off, off + int64(len(t.Data))}}
		off += int64(len(t.Data))
	}
	h, err := json.Marshal(header)
	if err != nil {
		return nil, err
	}
	for (len(h)+8)%8 != 0 {
		h = append(h, ' ')
	}
	out := make([]byte, 8, 8+len(h)+int(off))
	binary.LittleEndian.PutUint64(out, uint64(len(h)))
	out = append(out, h...)
	for _, k := range names {
		out = append(out, tensors[k].Data...)
	}
	return out, nil
}

// Write writes tensors and metadata to path atomically (temp file + rename).
func Write(path string, tensors map[string]Tensor, metadata map[string]string) error {
	b, err := Encode(tensors, metadata)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, b, 0o644)
}

// F32 makes a float32 tensor.
func F32(shape []int64, values []float32) Tensor {
	b := make([]byte, 4*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return Tensor{DType: "F32", Shape: shape, Data: b}
}

// Float32s decodes an F32 tensor.
func (t Tensor) Float32s() ([]float32, error) {
	if t.DType != "F32" {
		return nil, fmt.Errorf("tensor is %s, not F32", t.DType)
	}
	out := make([]float32, len(t.Data)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.Data[4*i:]))
	}
	return out, nil
}

// Int64s decodes an I64 tensor.
func (t Tensor) Int64s() ([]int64, error) {
	if t.DType != "I64" {
		return nil, fmt.Errorf("tensor is %s, not I64", t.DType)
	}
	out := make([]int64, len(t.Data)/8)
	for i := range out {
		out[i] = int64(binary.LittleEndian.Uint64(t.Data[8*i:]))
	}
	return out, nil
}

// ReadShapes reads a file's header alone — not its tensor data — and returns
// each tensor's shape by name: enough to tell a model's architecture without
// loading it. Only regular files are read; the header length is checked
// against MaxHeaderBytes and the file before it is allocated.
func ReadShapes(path string) (map[string][]int64, error) {
	f, info, err := regfile.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%s: %w: %s", path, ErrMalformed, fmt.Sprintf(format, a...))
	}
	var n uint64
	if err := binary.Read(f, binary.LittleEndian, &n); err != nil {
		return nil, bad("truncated file")
	}
	if n > MaxHeaderBytes || n > uint64(info.Size()-8) {
		return nil, bad("header of %d bytes in a file of %d", n, info.Size())
	}
	head := make([]byte, n)
	if _, err := io.ReadFull(f, head); err != nil {
		return nil, bad("truncated header")
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(head, &raw); err != nil {
		return nil, bad("header is not a JSON object: %v", err)
	}
	shapes := make(map[string][]int64, len(raw))
	for name, v := range raw {
		if name == "__metadata__" {
			continue
		}
		var e headerEntry
		if err := json.Unmarshal(v, &e); err != nil {
			return nil, bad("tensor %s: %v", name, err)
		}
		shapes[name] = e.Shape
	}
	return shapes, nil
}
