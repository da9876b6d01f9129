package models

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"

	"github.com/nlpodyssey/gopickle/pickle"
	"github.com/nlpodyssey/gopickle/pytorch"
	"github.com/nlpodyssey/gopickle/types"

	"github.com/stepwise-sd/stepwise/internal/safetensors"
)

// IsPickle reports whether path names a PyTorch pickle checkpoint by its extension.
func IsPickle(path string) bool {
	switch strings.ToLower(filepath.Ext(path)) {
	case ".pth", ".pt", ".ckpt", ".bin":
		return true
	}
	return false
}

// ErrUnsafePickle is returned for a checkpoint that holds anything but
// tensors, dicts, lists and scalars.
var ErrUnsafePickle = errors.New("checkpoint holds objects other than tensors, dicts, lists and scalars")

// safeFindClass resolves only the classes a state_dict needs; torch's tensor
// and storage classes are resolved by gopickle's torch layer before this.
func safeFindClass(module, name string) (any, error) {
	if module == "collections" && name == "OrderedDict" {
		return &types.OrderedDictClass{}, nil
	}
	return nil, fmt.Errorf("%w: refusing class %s.%s", ErrUnsafePickle, module, name)
}

// ReadPickleStateDict reads a state_dict saved with torch.save (zip or legacy
// format) without running any code from it. Tensors come back in safetensors
// form; other top-level entries (lists, numbers, strings — e.g. the
// segmentation project's mask_values) come back as JSON. A checkpoint that
// wraps its weights in "state_dict" is unwrapped.
func ReadPickleStateDict(path string) (map[string]safetensors.Tensor, map[string]string, error) {
	obj, err := pytorch.LoadWithUnpickler(path, func(r io.Reader) pickle.Unpickler {
		u := pickle.NewUnpickler(r)
		u.FindClass = safeFindClass
		return u
	})
	if err != nil {
		return nil, nil, fmt.Errorf("read %s: %w", path, err)
	}
	entries, err := dictEntries(obj)
	if err != nil {
		return nil, nil, fmt.Errorf("read %s: %w", path, err)
	}
	if inner, ok := entries["state_dict"]; ok {
		if e, err := dictEntries(inner); err == nil {
			entries = e
		}
	}
	tensors := map[string]safetensors.Tensor{}
	extra := map[string]string{}
	for k, v := range entries {
		switch t := v.(type) {
		case *pytorch.Tensor:
			st, err := convertTensor(t)
			if err != nil {
				return nil, nil, fmt.Errorf("read %s: tensor %s: %w", path, k, err)
			}
			tensors[k] = st
		default:
			j, err := plainJSON(v)
			if err != nil {
				return nil, nil, fmt.Errorf("read %s: entry %s: %w", path, k, err)
			}
			extra[k] = j
		}
	}
	if len(tensors) == 0 {
		return nil, nil, fmt.Errorf("read %s: no tensors in the checkpoint", path)
	}
	return tensors, extra, nil
}

func dictEntries(obj any) (map[string]any, error) {
	out := map[string]any{}
	switch d := obj.(type) {
	case *types.OrderedDict:
		for el := d.List.Front(); el != nil; el = el.Next() {
			e, ok := el.Value.(*types.OrderedDictEntry)
			if !ok {
				return nil, fmt.Errorf("malformed OrderedDict")
			}
			k, ok := e.Key.(string)
			if !ok {
				return nil, fmt.Errorf("non-string key %v", e.Key)
			}
			out[k] = e.Value
		}
	case *types.Dict:
		for _, e := range *d {
			k, ok := e.Key.(string)
			if !ok {
				return nil, fmt.Errorf("non-string key %v", e.Key)
			}
			out[k] = e.Value
		}
	default:
		return nil, fmt.Errorf("top level is %T, not a dict", obj)
	}
	return out, nil
}

// plainJSON encodes lists, tuples, numbers, strings and booleans.
func plainJSON(v any) (string, error) {
	var conv func(any) (any, error)
	conv = func(v any) (any, error) {
		switch t := v.(type) {
		case nil, bool, int, int64, float64, string:
			return t, nil
		case *types.List:
			out := make([]any, 0, len(*t))
			for _, e := range *t {
				c, err := conv(e)
				if err != nil {
					return nil, err
				}
				out = append(out, c)
			}
			return out, nil
		case *types.Tuple:
			out := make([]any, 0, t.Len())
			for i := 0; i < t.Len(); i++ {
				c, err := conv(t.Get(i))
				if err != nil {
					return nil, err
				}
				out = append(out, c)
			}
			return out, nil
		}
		return nil, fmt.Errorf("%w: %T", ErrUnsafePickle, v)
	}
	c, err := conv(v)
	if err != nil {
		return "", err
	}
	b, err := json.Marshal(c)
	return string(b), err
}

// convertTensor gathers a (possibly strided) tensor into contiguous
// little-endian bytes: float tensors as F32, integers as I64, bools as BOOL.
func convertTensor(t *pytorch.Tensor) (safetensors.Tensor, error) {
	shape := make([]int64, len(t.Size))
	numel := 1
	for i, s := range t.Size {
		shape[i] = int64(s)
		numel *= s
	}
	// Element index of every position, honouring strides and the offset.
	index := func(flat int) int {
		off := t.StorageOffset
		for d := len(t.Size) - 1; d >= 0; d-- {
			off += (flat % t.Size[d]) * t.Stride[d]
			flat /= t.Size[d]
		}
		return off
	}
	check := func(n int) error {
		if numel > 0 && index(numel-1) >= n {
			return fmt.Errorf("tensor reaches past its storage")
		}
		return nil
	}
	f32 := func(get func(int) float32, n int) (safetensors.Tensor, error) {
		if err := check(n); err != nil {
			return safetensors.Tensor{}, err
		}
		b := make([]byte, 4*numel)
		for i := 0; i < numel; i++ {
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(get(index(i))))
		}
		return safetensors.Tensor{DType: "F32", Shape: shape, Data: b}, nil
	}
	i64 := func(get func(int) int64, n int) (safetensors.Tensor, error) {
		if err := check(n); err != nil {
			return safetensors.Tensor{}, err
		}
		b := make([]byte, 8*numel)
		for i := 0; i < numel; i++ {
			binary.LittleEndian.PutUint64(b[8*i:], uint64(get(index(i))))
		}
		return safetensors.Tensor{DType: "I64", Shape: shape, Data: b}, nil
	}
	switch s := t.Source.(type) {
	case *pytorch.FloatStorage:
		return f32(func(i int) float32 { return s.Data[i] }, len(s.Data))
	case *pytorch.HalfStorage:
		return f32(func(i int) float32 { return s.Data[i] }, len(s.Data))
	case *pytorch.BFloat16Storage:
		return f32(func(i int) float32 { return s.Data[i] }, len(s.Data))
	case *pytorch.DoubleStorage:
		return f32(func(i int) float32 { return float32(s.Data[i]) }, len(s.Data))
	case *pytorch.LongStorage:
		return i64(func(i int) int64 { return s.Data[i] }, len(s.Data))
	case *pytorch.IntStorage:
		return i64(func(i int) int64 { return int64(s.Data[i]) }, len(s.Data))
	}
	return safetensors.Tensor{}, fmt.Errorf("unsupported storage %T", t.Source)
}

// ConvertPickle converts a pickle checkpoint to safetensors at dst; non-tensor
// entries go to the metadata as JSON (mask_values included).
func ConvertPickle(src, dst string) error {
	tensors, extra, err := ReadPickleStateDict(src)
	if err != nil {
		return err
	}
	meta := map[string]string{"converted_from": filepath.Base(src)}
	for k, v := range extra {
		meta[k] = v
	}
	return safetensors.Write(dst, tensors, meta)
}

// Resolve returns a safetensors path for path: path itself, or for a pickle
// checkpoint its conversion, made once under cacheDir. A conversion is named
// by the checkpoint's absolute path, size and modification time, so finding
// it again costs a stat, not a read of a multi-gigabyte file.
func Resolve(path, cacheDir string) (string, error) {
	if !IsPickle(path) {
		return path, nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("model path %s: %w", path, err)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%d\x00%d", abs, fi.Size(), fi.ModTime().UnixNano())
	sum := hex.EncodeToString(h.Sum(nil))[:16]
	stem := strings.TrimSuffix(filepath.Base(path), filepath.Ext(path))
	dst := filepath.Join(cacheDir, "converted", stem+"-"+sum+".safetensors")
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return "", err
	}
	if err := ConvertPickle(abs, dst); err != nil {
		return "", err
	}
	return dst, nil
}
