package models

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"

	"github.com/nlpodyssey/gopickle/types"

	"github.com/stepwise-sd/stepwise/internal/regfile"
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

// ErrBadCheckpoint is returned for a checkpoint that is malformed or past one
// of the limits below: truncated or inconsistent pickles, sizes, strides or
// offsets that reach outside their storage, a zip that inflates past the
// budget, nesting past MaxPickleDepth.
var ErrBadCheckpoint = errors.New("malformed or oversized checkpoint")

// errPanicked marks a panic recovered while reading: a bound that is missing.
var errPanicked = errors.New("the reader failed on it")

// The limits a pickle checkpoint is read under. A crafted .pth/.ckpt must
// fail with ErrBadCheckpoint, never crash the process or make it allocate
// what a size field claims.
const (
	// MaxCheckpointExpansion bounds the memory a conversion may take, as a
	// multiple of the file's size: the storages read plus the tensors
	// converted (float16 doubles to float32, uint8 grows 8× to int64) plus
	// the pickle program. A storage or a view (stride 0 repeats elements)
	// claiming more is refused before anything is allocated; so is a zip
	// entry inflating past it.
	MaxCheckpointExpansion = 16
	// MaxPickleBytes bounds the pickle program (data.pkl, or the pickles at
	// the head of a legacy file), which is read into memory whole. A state
	// dict's pickle takes about 150 bytes per tensor.
	MaxPickleBytes = 64 << 20
	// MaxPickleDepth bounds how deeply marks nest in the pickle program and
	// containers nest in the non-tensor entries: the entries are walked
	// recursively, and a Go stack overflow cannot be recovered.
	MaxPickleDepth = 100
	// MaxPickleLine bounds a newline-terminated text argument (protocol 0
	// strings, class names).
	MaxPickleLine = 4096
	// MaxPickleNumber bounds the digits of a text number and the bytes of a
	// LONG4: parsing big integers costs the square of their length.
	MaxPickleNumber = 64
	// MaxTensorDims bounds a tensor's dimensions.
	MaxTensorDims = 64
)

// ReadPickleStateDict reads a state_dict saved with torch.save (zip or legacy
// format) without running any code from it. Tensors come back in safetensors
// form (floats as F32, integers as I64, bools as BOOL); other top-level
// entries (lists, numbers, strings — e.g. the segmentation project's
// mask_values) come back as JSON. A checkpoint that wraps its weights in
// "state_dict" is unwrapped. path must name a regular file. Errors wrap
// ErrBadCheckpoint or ErrUnsafePickle (or regfile.ErrNotRegular).
func ReadPickleStateDict(path string) (tensors map[string]safetensors.Tensor, extra map[string]string, err error) {
	// Every bound is checked explicitly; this only turns a bug in the
	// unpickler into an error instead of a dead server.
	defer func() {
		if r := recover(); r != nil {
			tensors, extra = nil, nil
			err = fmt.Errorf("read %s: %w: %w: %v", path, ErrBadCheckpoint, errPanicked, r)
		}
	}()
	f, info, err := regfile.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	c := newCheckpoint(f, info.Size())
	obj, err := c.load()
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
	tensors = map[string]safetensors.Tensor{}
	extra = map[string]string{}
	for k, v := range entries {
		switch t := v.(type) {
		case *tensorRef:
			st, err := c.convert(t)
			if err != nil {
				return nil, nil, fmt.Errorf("read %s: tensor %.200s: %w", path, k, err)
			}
			tensors[k] = st
		default:
			j, err := plainJSON(v)
			if err != nil {
				return nil, nil, fmt.Errorf("read %s: entry %.200s: %w", path, k, err)
			}
			extra[k] = j
		}
	}
	if len(tensors) == 0 {
		return nil, nil, fmt.Errorf("read %s: %w: no tensors in the checkpoint", path, ErrBadCheckpoint)
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
				return nil, fmt.Errorf("%w: malformed OrderedDict", ErrBadCheckpoint)
			}
			k, ok := e.Key.(string)
			if !ok {
				return nil, fmt.Errorf("%w: a key is a %T, not a string", ErrBadCheckpoint, e.Key)
			}
			out[k] = e.Value
		}
	case *types.Dict:
		for _, e := range *d {
			k, ok := e.Key.(string)
			if !ok {
				return nil, fmt.Errorf("%w: a key is a %T, not a string", ErrBadCheckpoint, e.Key)
			}
			out[k] = e.Value
		}
	default:
		return nil, fmt.Errorf("%w: top level is a %T, not a dict", ErrBadCheckpoint, obj)
	}
	return out, nil
}

// plainJSON encodes lists, tuples, numbers, strings and booleans. Containers
// may nest MaxPickleDepth deep and appear once: the memo lets a pickle share
// a list or put it inside itself, which a tree walk would follow forever.
func plainJSON(v any) (string, error) {
	seen := map[any]bool{}
	var conv func(any, int) (any, error)
	items := func(container any, n int, get func(int) any, depth int) (any, error) {
		if depth >= MaxPickleDepth {
			return nil, fmt.Errorf("%w: containers nest more than %d deep", ErrBadCheckpoint, MaxPickleDepth)
		}
		if seen[container] {
			return nil, fmt.Errorf("%w: a container appears twice (shared or inside itself)", ErrBadCheckpoint)
		}
		seen[container] = true
		out := make([]any, 0, n)
		for i := 0; i < n; i++ {
			c, err := conv(get(i), depth+1)
			if err != nil {
				return nil, err
			}
			out = append(out, c)
		}
		return out, nil
	}
	conv = func(v any, depth int) (any, error) {
		switch t := v.(type) {
		case nil, bool, int, int64, float64, string, *big.Int:
			return t, nil
		case *types.List:
			return items(t, t.Len(), t.Get, depth)
		case *types.Tuple:
			return items(t, t.Len(), t.Get, depth)
		}
		return nil, fmt.Errorf("%w: %T", ErrUnsafePickle, v)
	}
	c, err := conv(v, 0)
	if err != nil {
		return "", err
	}
	b, err := json.Marshal(c)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrBadCheckpoint, err)
	}
	return string(b), nil
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
// it again costs a stat, not a read of a multi-gigabyte file. path must be a
// regular file or a folder (a diffusers model): a FIFO, device or socket is
// refused at once (regfile.ErrNotRegular).
func Resolve(path, cacheDir string) (string, error) {
	if !IsPickle(path) {
		info, err := os.Stat(path)
		if err != nil {
			return "", err
		}
		if !info.IsDir() {
			if _, err := regfile.Check(path); err != nil {
				return "", err
			}
		}
		return path, nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("model path %s: %w", path, err)
	}
	fi, err := regfile.Check(abs)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%d\x00%d", abs, fi.Size(), fi.ModTime().UnixNano())
	sum := hex.EncodeToString(h.Sum(nil))[:16]
	stem := strings.TrimSuffix(filepath.Base(path), filepath.Ext(path))
	dst := filepath.Join(cacheDir, "converted", stem+"-"+sum+".safetensors")
	if _, err := regfile.Check(dst); err == nil {
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
