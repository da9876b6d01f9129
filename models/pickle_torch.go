package models

import (
	"archive/zip"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/big"
	"os"
	"path"
	"strings"

	"github.com/nlpodyssey/gopickle/pickle"
	"github.com/nlpodyssey/gopickle/types"

	"github.com/stepwise-sd/stepwise/internal/safetensors"
)

// storageClass is a torch.<Kind>Storage class named in a checkpoint: how
// one element is stored and what it becomes in safetensors.
type storageClass struct {
	name   string
	size   int64  // bytes per element in the checkpoint
	out    string // safetensors dtype it converts to
	decode func(b []byte, out []byte)
}

func putF32(out []byte, v float32) { binary.LittleEndian.PutUint32(out, math.Float32bits(v)) }
func putI64(out []byte, v int64)   { binary.LittleEndian.PutUint64(out, uint64(v)) }

// storageClasses are the storages a state dict may hold: floats convert to
// F32, integers to I64, bools to BOOL.
var storageClasses = map[string]*storageClass{
	"FloatStorage": {"FloatStorage", 4, "F32", func(b, o []byte) { copy(o, b[:4]) }},
	"DoubleStorage": {"DoubleStorage", 8, "F32", func(b, o []byte) {
		putF32(o, float32(math.Float64frombits(binary.LittleEndian.Uint64(b))))
	}},
	"HalfStorage": {"HalfStorage", 2, "F32", func(b, o []byte) { putF32(o, halfToFloat32(binary.LittleEndian.Uint16(b))) }},
	"BFloat16Storage": {"BFloat16Storage", 2, "F32", func(b, o []byte) {
		putF32(o, math.Float32frombits(uint32(binary.LittleEndian.Uint16(b))<<16))
	}},
	"LongStorage":  {"LongStorage", 8, "I64", func(b, o []byte) { copy(o, b[:8]) }},
	"IntStorage":   {"IntStorage", 4, "I64", func(b, o []byte) { putI64(o, int64(int32(binary.LittleEndian.Uint32(b)))) }},
	"ShortStorage": {"ShortStorage", 2, "I64", func(b, o []byte) { putI64(o, int64(int16(binary.LittleEndian.Uint16(b)))) }},
	"CharStorage":  {"CharStorage", 1, "I64", func(b, o []byte) { putI64(o, int64(int8(b[0]))) }},
	"ByteStorage":  {"ByteStorage", 1, "I64", func(b, o []byte) { putI64(o, int64(b[0])) }},
	"BoolStorage": {"BoolStorage", 1, "BOOL", func(b, o []byte) {
		o[0] = 0
		if b[0] != 0 {
			o[0] = 1
		}
	}},
}

// halfToFloat32 widens an IEEE 754 half exactly.
func halfToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch exp {
	case 0x1f: // inf, nan
		return math.Float32frombits(sign | 0xff<<23 | mant<<13)
	case 0: // zero, subnormal: mant × 2⁻²⁴
		f := float32(mant) / (1 << 24)
		if sign != 0 {
			f = -f
		}
		return f
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// storageRef is a storage a checkpoint refers to. Its bytes are read only
// when a tensor is converted, after every bound is checked.
type storageRef struct {
	class *storageClass
	key   string
	numel int64
	data  []byte
	read  func() ([]byte, error) // set by the format once it knows where the bytes are
}

// tensorRef is a tensor view checked against its storage: every element it
// reaches lies inside the storage.
type tensorRef struct {
	storage       *storageRef
	offset        int64
	shape, stride []int64
	numel         int64
}

// rebuildTensor is torch._utils._rebuild_tensor_v2(storage, storage_offset,
// size, stride, ...): it checks the view and builds a tensorRef.
type rebuildTensor struct{}

var _ types.Callable = (*rebuildTensor)(nil)

func (*rebuildTensor) Call(args ...any) (any, error) {
	if len(args) < 4 {
		return nil, fmt.Errorf("%w: _rebuild_tensor_v2 with %d arguments", ErrBadCheckpoint, len(args))
	}
	s, ok := args[0].(*storageRef)
	if !ok {
		return nil, fmt.Errorf("%w: tensor built on a %T, not a storage", ErrBadCheckpoint, args[0])
	}
	offset, ok := args[1].(int)
	if !ok || offset < 0 {
		return nil, fmt.Errorf("%w: tensor storage offset is not a non-negative int", ErrBadCheckpoint)
	}
	shape, err := intTuple(args[2], "size")
	if err != nil {
		return nil, err
	}
	stride, err := intTuple(args[3], "stride")
	if err != nil {
		return nil, err
	}
	if len(stride) != len(shape) {
		return nil, fmt.Errorf("%w: tensor has %d sizes and %d strides", ErrBadCheckpoint, len(shape), len(stride))
	}
	t := &tensorRef{storage: s, offset: int64(offset), shape: shape, stride: stride, numel: 1}
	for _, d := range shape {
		if d == 0 {
			t.numel = 0
			break
		}
		if t.numel > math.MaxInt64/d {
			return nil, fmt.Errorf("%w: tensor of size %v has more elements than int64 counts", ErrBadCheckpoint, shape)
		}
		t.numel *= d
	}
	if t.numel == 0 {
		if t.offset > s.numel {
			return nil, fmt.Errorf("%w: tensor offset %d past its storage of %d elements", ErrBadCheckpoint, t.offset, s.numel)
		}
		return t, nil
	}
	// The last element the view reaches; strides are non-negative, so it
	// is the largest.
	last := t.offset
	for i, d := range shape {
		if stride[i] != 0 && d-1 > (math.MaxInt64-last)/stride[i] {
			return nil, fmt.Errorf("%w: tensor of size %v and stride %v reaches past int64", ErrBadCheckpoint, shape, stride)
		}
		last += (d - 1) * stride[i]
	}
	if last >= s.numel {
		return nil, fmt.Errorf("%w: tensor of size %v, stride %v, offset %d reaches element %d of a storage of %d",
			ErrBadCheckpoint, shape, stride, t.offset, last, s.numel)
	}
	return t, nil
}

// intTuple reads a tuple of non-negative ints (a size or a stride).
func intTuple(v any, what string) ([]int64, error) {
	t, ok := v.(*types.Tuple)
	if !ok {
		return nil, fmt.Errorf("%w: tensor %s is a %T, not a tuple", ErrBadCheckpoint, what, v)
	}
	if t.Len() > MaxTensorDims {
		return nil, fmt.Errorf("%w: tensor %s has %d dimensions, over the %d allowed", ErrBadCheckpoint, what, t.Len(), MaxTensorDims)
	}
	out := make([]int64, t.Len())
	for i := range out {
		n, ok := t.Get(i).(int)
		if !ok || n < 0 {
			return nil, fmt.Errorf("%w: tensor %s has an entry that is not a non-negative int", ErrBadCheckpoint, what)
		}
		out[i] = int64(n)
	}
	return out, nil
}

// findClass resolves only what a state dict needs: torch's storage classes,
// _rebuild_tensor_v2 and OrderedDict. (gopickle itself answers
// __builtin__.object and copy_reg._reconstructor with inert stand-ins.)
func findClass(module, name string) (any, error) {
	switch {
	case module == "torch._utils" && name == "_rebuild_tensor_v2":
		return &rebuildTensor{}, nil
	case module == "torch" && storageClasses[name] != nil:
		return storageClasses[name], nil
	case module == "collections" && name == "OrderedDict":
		return &types.OrderedDictClass{}, nil
	}
	return nil, fmt.Errorf("%w: refusing class %.200s.%.200s", ErrUnsafePickle, module, name)
}

// checkpoint is one file being read: what it may still allocate and the
// storages its pickle named.
type checkpoint struct {
	file     *os.File
	size     int64
	budget   int64 // bytes it may still allocate; see MaxCheckpointExpansion
	storages map[string]*storageRef
	// locate checks that the storage of key can hold nbytes and tells
	// how to read them (zip: an entry of that size; legacy: later).
	locate func(key string, nbytes int64) (func() ([]byte, error), error)
}

func newCheckpoint(f *os.File, size int64) *checkpoint {
	return &checkpoint{file: f, size: size, budget: MaxCheckpointExpansion * size, storages: map[string]*storageRef{}}
}

// charge takes n bytes from the budget before they are allocated.
func (c *checkpoint) charge(n int64, what string) error {
	if n < 0 || n > c.budget {
		return fmt.Errorf("%w: %s needs %d bytes, more than %d× the file's %d bytes allow",
			ErrBadCheckpoint, what, n, MaxCheckpointExpansion, c.size)
	}
	c.budget -= n
	return nil
}

func (c *checkpoint) load() (any, error) {
	var magic [4]byte
	if _, err := c.file.ReadAt(magic[:], 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if string(magic[:]) == "PK\x03\x04" {
		return c.loadZip()
	}
	return c.loadLegacy()
}

// unpickle runs one pickle program that scanPickle has accepted.
func (c *checkpoint) unpickle(prog []byte, legacy bool) (any, error) {
	u := pickle.NewUnpickler(bytes.NewReader(prog))
	u.FindClass = findClass
	u.PersistentLoad = func(id any) (any, error) { return c.persistentLoad(id, legacy) }
	v, err := u.Load()
	if err != nil && !errors.Is(err, ErrBadCheckpoint) && !errors.Is(err, ErrUnsafePickle) {
		// gopickle's own complaints: an opcode applied to the wrong type.
		err = fmt.Errorf("%w: %v", ErrBadCheckpoint, err)
	}
	return v, err
}

// nextPickle returns the pickle program at the start of b.
func nextPickle(b []byte) ([]byte, error) {
	n, err := scanPickle(b)
	if err != nil {
		return nil, err
	}
	return b[:n], nil
}

// persistentLoad resolves torch's ('storage', class, key, location, numel
// [, view]) ids. Nothing is read here; the size is checked against the
// budget (a storage claiming 10¹⁵ elements stops here) and, for zip files,
// against the entry that holds it.
func (c *checkpoint) persistentLoad(id any, legacy bool) (any, error) {
	t, ok := id.(*types.Tuple)
	if !ok || t.Len() == 0 {
		return nil, fmt.Errorf("%w: persistent id is not a storage tuple", ErrBadCheckpoint)
	}
	if kind, _ := t.Get(0).(string); kind != "storage" {
		return nil, fmt.Errorf("%w: persistent id of kind %.100q", ErrUnsafePickle, kind)
	}
	if t.Len() < 5 {
		return nil, fmt.Errorf("%w: storage id of %d fields", ErrBadCheckpoint, t.Len())
	}
	class, ok1 := t.Get(1).(*storageClass)
	key, ok2 := t.Get(2).(string)
	_, ok3 := t.Get(3).(string)
	numel, ok4 := t.Get(4).(int)
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return nil, fmt.Errorf("%w: storage id of the wrong types", ErrBadCheckpoint)
	}
	if legacy && (t.Len() < 6 || t.Get(5) != nil) {
		return nil, fmt.Errorf("%w: legacy storage views are not supported", ErrBadCheckpoint)
	}
	if numel < 0 {
		return nil, fmt.Errorf("%w: storage %.100q of %d elements", ErrBadCheckpoint, key, numel)
	}
	if s, ok := c.storages[key]; ok {
		if s.class != class || s.numel != int64(numel) {
			return nil, fmt.Errorf("%w: storage %.100q named twice with different types or sizes", ErrBadCheckpoint, key)
		}
		return s, nil
	}
	if int64(numel) > c.budget/class.size {
		return nil, fmt.Errorf("%w: storage %.100q of %d elements is larger than %d× the file's %d bytes allow",
			ErrBadCheckpoint, key, numel, MaxCheckpointExpansion, c.size)
	}
	s := &storageRef{class: class, key: key, numel: int64(numel)}
	if c.locate != nil {
		read, err := c.locate(key, s.numel*class.size)
		if err != nil {
			return nil, err
		}
		s.read = read
	}
	c.storages[key] = s
	return s, nil
}

// loadZip reads torch.save's zip format: <prefix>/data.pkl, the storages in
// <prefix>/data/<key>.
func (c *checkpoint) loadZip() (any, error) {
	zr, err := zip.NewReader(c.file, c.size)
	if err != nil && !errors.Is(err, zip.ErrInsecurePath) {
		return nil, fmt.Errorf("%w: %v", ErrBadCheckpoint, err)
	}
	if zr == nil {
		return nil, fmt.Errorf("%w: unreadable zip", ErrBadCheckpoint)
	}
	entries := make(map[string]*zip.File, len(zr.File))
	var pkl *zip.File
	for _, zf := range zr.File {
		if _, dup := entries[zf.Name]; dup {
			return nil, fmt.Errorf("%w: two zip entries named %.200q", ErrBadCheckpoint, zf.Name)
		}
		entries[zf.Name] = zf
		switch path.Base(zf.Name) {
		case "constants.pkl":
			return nil, fmt.Errorf("%w: a TorchScript archive, not a state dict", ErrBadCheckpoint)
		case "data.pkl":
			if strings.Count(zf.Name, "/") != 1 {
				continue
			}
			if pkl != nil {
				return nil, fmt.Errorf("%w: two data.pkl entries", ErrBadCheckpoint)
			}
			pkl = zf
		}
	}
	if pkl == nil {
		return nil, fmt.Errorf("%w: no data.pkl in the zip", ErrBadCheckpoint)
	}
	prefix := path.Dir(pkl.Name) + "/"
	if bo, ok := entries[prefix+"byteorder"]; ok {
		if bo.UncompressedSize64 > 16 {
			return nil, fmt.Errorf("%w: byteorder entry of %d bytes", ErrBadCheckpoint, bo.UncompressedSize64)
		}
		b, err := c.readEntry(bo, "byteorder")
		if err != nil {
			return nil, err
		}
		if string(b) != "little" {
			return nil, fmt.Errorf("%w: byte order %.16q (only little-endian is supported)", ErrBadCheckpoint, b)
		}
	}
	if pkl.UncompressedSize64 > MaxPickleBytes {
		return nil, fmt.Errorf("%w: data.pkl of %d bytes, over the %d allowed", ErrBadCheckpoint, pkl.UncompressedSize64, MaxPickleBytes)
	}
	prog, err := c.readEntry(pkl, "data.pkl")
	if err != nil {
		return nil, err
	}
	c.locate = func(key string, nbytes int64) (func() ([]byte, error), error) {
		zf, ok := entries[prefix+"data/"+key]
		if !ok {
			return nil, fmt.Errorf("%w: no zip entry for storage %.100q", ErrBadCheckpoint, key)
		}
		if zf.UncompressedSize64 != uint64(nbytes) {
			return nil, fmt.Errorf("%w: storage %.100q holds %d bytes, its id needs %d",
				ErrBadCheckpoint, key, zf.UncompressedSize64, nbytes)
		}
		return func() ([]byte, error) { return c.readEntry(zf, "storage "+key) }, nil
	}
	p, err := nextPickle(prog)
	if err != nil {
		return nil, fmt.Errorf("data.pkl: %w", err)
	}
	if len(p) != len(prog) {
		return nil, fmt.Errorf("%w: data.pkl has %d bytes after its pickle", ErrBadCheckpoint, len(prog)-len(p))
	}
	return c.unpickle(p, false)
}

// readEntry reads a zip entry whole, exactly its declared size (charged to
// the budget first), and checks its CRC.
func (c *checkpoint) readEntry(zf *zip.File, what string) ([]byte, error) {
	n := zf.UncompressedSize64
	if n > math.MaxInt64 {
		return nil, fmt.Errorf("%w: %s of %d bytes", ErrBadCheckpoint, what, n)
	}
	if err := c.charge(int64(n), what); err != nil {
		return nil, err
	}
	rc, err := zf.Open()
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrBadCheckpoint, what, err)
	}
	defer rc.Close()
	b := make([]byte, n)
	if _, err := io.ReadFull(rc, b); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrBadCheckpoint, what, err)
	}
	// Reading on to the end makes archive/zip check the CRC, and catches
	// an entry that inflates to more than it declared.
	var one [1]byte
	if m, err := rc.Read(one[:]); m != 0 || !errors.Is(err, io.EOF) {
		if err == nil || errors.Is(err, io.EOF) {
			err = errors.New("more data than declared")
		}
		return nil, fmt.Errorf("%w: %s: %v", ErrBadCheckpoint, what, err)
	}
	return b, nil
}

// legacyMagic is the number torch's legacy format starts with.
const legacyMagic = "1950a86a20f9469cfc6c"

// loadLegacy reads torch's pre-1.6 format: pickles of the magic number, the
// protocol version, system info, the object and the storage keys, then each
// storage as an 8-byte element count and its bytes.
func (c *checkpoint) loadLegacy() (any, error) {
	head := min(c.size, MaxPickleBytes)
	if err := c.charge(head, "the pickles"); err != nil {
		return nil, err
	}
	buf := make([]byte, head)
	if _, err := io.ReadFull(io.NewSectionReader(c.file, 0, head), buf); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadCheckpoint, err)
	}
	off := 0
	next := func(what string) (any, error) {
		p, err := nextPickle(buf[off:])
		if err != nil {
			if head < c.size {
				return nil, fmt.Errorf("%s: %w (the pickles may take at most %d bytes)", what, err, MaxPickleBytes)
			}
			return nil, fmt.Errorf("%s: %w", what, err)
		}
		off += len(p)
		return c.unpickle(p, true)
	}
	magic, err := next("magic number")
	if err != nil {
		return nil, err
	}
	if n, ok := magic.(*big.Int); !ok || n.Text(16) != legacyMagic {
		return nil, fmt.Errorf("%w: neither a zip nor a legacy PyTorch file", ErrBadCheckpoint)
	}
	version, err := next("protocol version")
	if err != nil {
		return nil, err
	}
	if version != 1001 {
		return nil, fmt.Errorf("%w: legacy protocol version %v", ErrBadCheckpoint, version)
	}
	info, err := next("system info")
	if err != nil {
		return nil, err
	}
	if d, ok := info.(*types.Dict); ok {
		for _, e := range *d {
			if e.Key == "little_endian" && e.Value == false {
				return nil, fmt.Errorf("%w: a big-endian checkpoint", ErrBadCheckpoint)
			}
		}
	}
	obj, err := next("state dict")
	if err != nil {
		return nil, err
	}
	rawKeys, err := next("storage keys")
	if err != nil {
		return nil, err
	}
	keys, ok := rawKeys.(*types.List)
	if !ok {
		return nil, fmt.Errorf("%w: storage keys are a %T, not a list", ErrBadCheckpoint, rawKeys)
	}
	pos := int64(off)
	for _, k := range *keys {
		key, ok := k.(string)
		if !ok {
			return nil, fmt.Errorf("%w: a storage key is a %T", ErrBadCheckpoint, k)
		}
		s, ok := c.storages[key]
		if !ok || s.read != nil {
			return nil, fmt.Errorf("%w: storage key %.100q unused or listed twice", ErrBadCheckpoint, key)
		}
		var count [8]byte
		if _, err := c.file.ReadAt(count[:], pos); err != nil {
			return nil, fmt.Errorf("%w: storage %.100q: truncated", ErrBadCheckpoint, key)
		}
		if n := int64(binary.LittleEndian.Uint64(count[:])); n != s.numel {
			return nil, fmt.Errorf("%w: storage %.100q holds %d elements, its id says %d", ErrBadCheckpoint, key, n, s.numel)
		}
		nbytes := s.numel * s.class.size
		start := pos + 8
		if nbytes > c.size-start {
			return nil, fmt.Errorf("%w: storage %.100q: truncated", ErrBadCheckpoint, key)
		}
		s.read = func() ([]byte, error) {
			if err := c.charge(nbytes, "storage "+key); err != nil {
				return nil, err
			}
			b := make([]byte, nbytes)
			if _, err := c.file.ReadAt(b, start); err != nil {
				return nil, fmt.Errorf("%w: storage %.100q: %v", ErrBadCheckpoint, key, err)
			}
			return b, nil
		}
		pos = start + nbytes
	}
	return obj, nil
}

// convert gathers a (possibly strided) tensor into contiguous little-endian
// bytes of its safetensors dtype.
func (c *checkpoint) convert(t *tensorRef) (safetensors.Tensor, error) {
	s := t.storage
	outSize, _ := safetensors.ElemSize(s.class.out)
	if t.numel > c.budget/outSize {
		return safetensors.Tensor{}, fmt.Errorf("%w: a tensor of %d elements is larger than %d× the file's %d bytes allow",
			ErrBadCheckpoint, t.numel, MaxCheckpointExpansion, c.size)
	}
	if err := c.charge(t.numel*outSize, "the tensor"); err != nil {
		return safetensors.Tensor{}, err
	}
	if s.data == nil && t.numel > 0 {
		if s.read == nil {
			return safetensors.Tensor{}, fmt.Errorf("%w: storage %.100q has no data", ErrBadCheckpoint, s.key)
		}
		data, err := s.read()
		if err != nil {
			return safetensors.Tensor{}, err
		}
		s.data = data
	}
	out := make([]byte, t.numel*outSize)
	idx := make([]int64, len(t.shape))
	at := t.offset
	size := s.class.size
	for i := int64(0); i < t.numel; i++ {
		s.class.decode(s.data[at*size:], out[i*outSize:])
		for d := len(idx) - 1; d >= 0; d-- {
			idx[d]++
			at += t.stride[d]
			if idx[d] < t.shape[d] {
				break
			}
			at -= t.stride[d] * t.shape[d]
			idx[d] = 0
		}
	}
	return safetensors.Tensor{DType: s.class.out, Shape: t.shape, Data: out}, nil
}
