package safetensors_test

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/internal/regfile"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
)

// file builds a safetensors file from a header text and data bytes, with the
// header length written as given (so that it can lie).
func file(headerLen uint64, header string, data []byte) []byte {
	b := make([]byte, 8, 8+len(header)+len(data))
	binary.LittleEndian.PutUint64(b, headerLen)
	b = append(b, header...)
	return append(b, data...)
}

// honest builds a file whose header length is the header's.
func honest(header string, data []byte) []byte {
	return file(uint64(len(header)), header, data)
}

func sample() map[string]safetensors.Tensor {
	return map[string]safetensors.Tensor{
		"w":      safetensors.F32([]int64{2, 3}, []float32{1, 2, 3, 4, 5, 6}),
		"b":      safetensors.F32([]int64{3}, []float32{-1, 0.5, 7}),
		"scalar": safetensors.F32([]int64{}, []float32{42}),
		"empty":  {DType: "F32", Shape: []int64{0, 5}, Data: []byte{}},
		"steps":  {DType: "I64", Shape: []int64{1}, Data: []byte{9, 0, 0, 0, 0, 0, 0, 0}},
		"mask":   {DType: "BOOL", Shape: []int64{2}, Data: []byte{1, 0}},
	}
}

func TestEncodeParseRoundTrip(t *testing.T) {
	tensors := sample()
	meta := map[string]string{"format": "pt", "mask_values": "[0,1]"}
	b, err := safetensors.Encode(tensors, meta)
	require.NoError(t, err)
	headerLen := binary.LittleEndian.Uint64(b)
	assert.Zero(t, (8+headerLen)%8, "the data section starts 8-byte aligned")

	f, err := safetensors.Parse(b, "x")
	require.NoError(t, err)
	assert.Equal(t, meta, f.Metadata)
	require.Len(t, f.Tensors, len(tensors))
	for k, want := range tensors {
		got := f.Tensors[k]
		assert.Equal(t, want.DType, got.DType, k)
		assert.Equal(t, want.Shape, got.Shape, k)
		assert.Equal(t, want.Data, got.Data, k)
	}
	v, err := f.Tensors["w"].Float32s()
	require.NoError(t, err)
	assert.Equal(t, []float32{1, 2, 3, 4, 5, 6}, v)
	i, err := f.Tensors["steps"].Int64s()
	require.NoError(t, err)
	assert.Equal(t, []int64{9}, i)

	path := filepath.Join(t.TempDir(), "sub", "m.safetensors")
	require.NoError(t, safetensors.Write(path, tensors, meta))
	r, err := safetensors.Read(path)
	require.NoError(t, err)
	assert.Equal(t, f, r)
}

func TestEncodeRefusesInconsistentTensors(t *testing.T) {
	for name, tensor := range map[string]safetensors.Tensor{
		"short data":     {DType: "F32", Shape: []int64{2}, Data: make([]byte, 4)},
		"long data":      {DType: "F32", Shape: []int64{1}, Data: make([]byte, 8)},
		"unknown dtype":  {DType: "F31", Shape: []int64{1}, Data: make([]byte, 4)},
		"negative shape": {DType: "U8", Shape: []int64{-1}, Data: nil},
	} {
		_, err := safetensors.Encode(map[string]safetensors.Tensor{"t": tensor}, nil)
		assert.Error(t, err, name)
	}
}

func TestParseRefusesMalformedFiles(t *testing.T) {
	eight := make([]byte, 8)
	cases := map[string][]byte{
		"empty":                           {},
		"shorter than a length":           {1, 0, 0},
		"header past the end":             file(1000, `{}`, nil),
		"header over the max":             file(safetensors.MaxHeaderBytes+1, `{}`, nil),
		"huge header length":              file(1<<63, `{}`, nil),
		"not JSON":                        honest(`{"a":`, nil),
		"JSON array":                      honest(`[1,2]`, nil),
		"JSON null":                       honest(`null`, nil),
		"not UTF-8":                       honest("{\"\xff\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", []byte{0}),
		"entry not an object":             honest(`{"a":5}`, nil),
		"entry null":                      honest(`{"a":null}`, nil),
		"no shape":                        honest(`{"a":{"dtype":"U8","data_offsets":[0,0]}}`, nil),
		"no offsets":                      honest(`{"a":{"dtype":"U8","shape":[0]}}`, nil),
		"three offsets":                   honest(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}`, []byte{0}),
		"unknown dtype":                   honest(`{"a":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}}`, eight),
		"no dtype":                        honest(`{"a":{"shape":[8],"data_offsets":[0,8]}}`, eight),
		"negative dim":                    honest(`{"a":{"dtype":"U8","shape":[-2,-4],"data_offsets":[0,8]}}`, eight),
		"fractional dim":                  honest(`{"a":{"dtype":"U8","shape":[8.5],"data_offsets":[0,8]}}`, eight),
		"numel overflows":                 honest(`{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}`, eight),
		"element count wraps to the span": honest(`{"a":{"dtype":"U8","shape":[4611686018427387905,4],"data_offsets":[0,4]}}`, make([]byte, 4)),
		"bytes overflow":                  honest(`{"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}}`, eight),
		"span shorter":                    honest(`{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}`, eight),
		"span longer":                     honest(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}`, eight),
		"negative offset":                 honest(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}`, eight),
		"reversed offsets":                honest(`{"a":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}}`, eight),
		"past the data":                   honest(`{"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}`, eight),
		"huge offsets":                    honest(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[9223372036854775806,9223372036854775807]}}`, eight),
		"overlap":                         honest(`{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}`, eight),
		"same span twice":                 honest(`{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}`, eight),
		"gap":                             honest(`{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}`, eight),
		"trailing bytes":                  honest(`{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}`, eight),
		"metadata not strings":            honest(`{"__metadata__":{"a":1}}`, nil),
		"metadata a list":                 honest(`{"__metadata__":["a"]}`, nil),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := safetensors.Parse(b, "m.safetensors")
			require.Error(t, err)
			assert.ErrorIs(t, err, safetensors.ErrMalformed)
		})
	}
}

// The header limit holds even for a file long enough to hold the header.
func TestParseRefusesAHeaderOverTheLimit(t *testing.T) {
	header := append([]byte(`{}`), bytes.Repeat([]byte{' '}, safetensors.MaxHeaderBytes-1)...)
	_, err := safetensors.Parse(honest(string(header), nil), "m.safetensors")
	require.ErrorIs(t, err, safetensors.ErrMalformed)
	_, err = safetensors.Parse(honest(string(header[:len(header)-1]), nil), "m.safetensors")
	require.NoError(t, err, "a header of exactly MaxHeaderBytes is allowed")
}

func TestParseAcceptsTheEdges(t *testing.T) {
	cases := map[string][]byte{
		"no tensors":          honest(`{}`, nil),
		"padded header":       honest(`{}      `, nil),
		"zero-size tensor":    honest(`{"a":{"dtype":"F32","shape":[0,7],"data_offsets":[0,0]}}`, nil),
		"zero dim beats huge": honest(`{"a":{"dtype":"F64","shape":[0,9223372036854775807],"data_offsets":[0,0]}}`, nil),
		"scalar":              honest(`{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}`, []byte{7}),
		"unsorted offsets":    honest(`{"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, []byte{1, 2}),
		"null metadata":       honest(`{"__metadata__":null}`, nil),
	}
	for name, b := range cases {
		_, err := safetensors.Parse(b, "m.safetensors")
		assert.NoError(t, err, name)
	}
}

func TestReadRefusesAFIFOAtOnce(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "m.safetensors")
	require.NoError(t, syscall.Mkfifo(fifo, 0o644))
	done := make(chan error, 1)
	go func() { _, err := safetensors.Read(fifo); done <- err }()
	select {
	case err := <-done:
		require.ErrorIs(t, err, regfile.ErrNotRegular)
	case <-time.After(30 * time.Second): // a hang guard, not a timing
		t.Fatal("Read blocks on a FIFO")
	}
	_, err := safetensors.Read(t.TempDir())
	require.ErrorIs(t, err, regfile.ErrNotRegular)
}

func TestReadReportsMalformedFilesByPath(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bad.safetensors")
	require.NoError(t, os.WriteFile(path, file(99, `{}`, nil), 0o644))
	_, err := safetensors.Read(path)
	require.ErrorIs(t, err, safetensors.ErrMalformed)
}

// ReadShapes reads the header alone: the shapes of a written file, and the
// same refusals as Parse for a header that lies about its length.
func TestReadShapesReadsTheHeaderAlone(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "m.safetensors")
	require.NoError(t, safetensors.Write(p, map[string]safetensors.Tensor{
		"outc.conv.weight": safetensors.F32([]int64{3, 2, 1, 1}, make([]float32, 6)),
		"b":                safetensors.F32([]int64{4}, make([]float32, 4)),
	}, map[string]string{"format": "pt"}))
	shapes, err := safetensors.ReadShapes(p)
	require.NoError(t, err)
	assert.Equal(t, map[string][]int64{"outc.conv.weight": {3, 2, 1, 1}, "b": {4}}, shapes)

	for name, data := range map[string][]byte{
		"short":          {1, 2, 3},
		"length lies":    file(1<<20, `{}`, nil),
		"over the limit": file(safetensors.MaxHeaderBytes+1, `{}`, make([]byte, 16)),
		"not an object":  file(2, `[]`, nil),
		"bad entry":      file(14, `{"a":{"shape":1}}`[:14], nil),
	} {
		bad := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(bad, data, 0o644))
		_, err := safetensors.ReadShapes(bad)
		assert.ErrorIs(t, err, safetensors.ErrMalformed, name)
	}
	fifo := filepath.Join(dir, "fifo")
	require.NoError(t, syscall.Mkfifo(fifo, 0o644))
	_, err = safetensors.ReadShapes(fifo)
	assert.ErrorIs(t, err, regfile.ErrNotRegular)
}
