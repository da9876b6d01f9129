// Package safetensors reads and writes the safetensors format on the Go side:
// an 8-byte little-endian header length, a JSON header, then raw little-endian
// tensor bytes. The engine has its own reader; this one serves tools, tests and
// files the Go side writes (saved latents, converted checkpoints).
package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"sort"

	"github.com/stepwise-sd/stepwise/internal/atomicfile"
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
	DType       string   `json:"dtype"`
	Shape       []int64  `json:"shape"`
	DataOffsets [2]int64 `json:"data_offsets"`
}

var elemSize = map[string]int64{"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

// Read parses a whole file.
func Read(path string) (*File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(b, path)
}

// Parse parses the bytes of a file; name is used in errors.
func Parse(b []byte, name string) (*File, error) {
	if len(b) < 8 {
		return nil, fmt.Errorf("%s: truncated safetensors file", name)
	}
	n := binary.LittleEndian.Uint64(b)
	if n > uint64(len(b)-8) {
		return nil, fmt.Errorf("%s: truncated safetensors header", name)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b[8:8+n], &raw); err != nil {
		return nil, fmt.Errorf("%s: bad safetensors header: %w", name, err)
	}
	data := b[8+n:]
	f := &File{Tensors: map[string]Tensor{}, Metadata: map[string]string{}}
	for k, v := range raw {
		if k == "__metadata__" {
			if err := json.Unmarshal(v, &f.Metadata); err != nil {
				return nil, fmt.Errorf("%s: bad __metadata__: %w", name, err)
			}
			continue
		}
		var e headerEntry
		if err := json.Unmarshal(v, &e); err != nil {
			return nil, fmt.Errorf("%s: tensor %s: %w", name, k, err)
		}
		size, ok := elemSize[e.DType]
		if !ok {
			return nil, fmt.Errorf("%s: tensor %s: unsupported dtype %s", name, k, e.DType)
		}
		numel := int64(1)
		for _, d := range e.Shape {
			numel *= d
		}
		lo, hi := e.DataOffsets[0], e.DataOffsets[1]
		if lo < 0 || hi < lo || hi > int64(len(data)) || hi-lo != numel*size {
			return nil, fmt.Errorf("%s: tensor %s: bad data_offsets", name, k)
		}
		f.Tensors[k] = Tensor{DType: e.DType, Shape: e.Shape, Data: data[lo:hi]}
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
		header[k] = headerEntry{DType: t.DType, Shape: t.Shape, DataOffsets: [2]int64{off, off + int64(len(t.Data))}}
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
