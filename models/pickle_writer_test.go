package models_test

import (
	"archive/zip"
	"bytes"
	"encoding/binary"
	"math"
	"strconv"
)

// pk writes pickle programs by hand, opcode by opcode, so that tests can say
// exactly what a crafted checkpoint holds.
type pk struct{ bytes.Buffer }

func newPickle() *pk {
	p := &pk{}
	p.op(0x80, 2) // PROTO 2
	return p
}

func (p *pk) op(b ...byte) *pk { p.Write(b); return p }
func (p *pk) mark() *pk        { return p.op('(') }
func (p *pk) tuple() *pk       { return p.op('t') }
func (p *pk) stop() []byte     { p.op('.'); return p.Bytes() }

func (p *pk) str(s string) *pk {
	p.op('X')
	binary.Write(p, binary.LittleEndian, uint32(len(s)))
	p.WriteString(s)
	return p
}

// int writes n as BININT when it fits, else as LONG1.
func (p *pk) int(n int64) *pk {
	if n >= math.MinInt32 && n <= math.MaxInt32 {
		p.op('J')
		binary.Write(p, binary.LittleEndian, int32(n))
		return p
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(n))
	p.op(0x8a, 8)
	p.Write(b[:])
	return p
}

func (p *pk) ints(ns ...int64) *pk {
	p.mark()
	for _, n := range ns {
		p.int(n)
	}
	return p.tuple()
}

func (p *pk) global(module, name string) *pk {
	p.op('c')
	p.WriteString(module + "\n" + name + "\n")
	return p
}

// orderedDict pushes collections.OrderedDict().
func (p *pk) orderedDict() *pk {
	return p.global("collections", "OrderedDict").op(')', 'R')
}

// view is one tensor as torch.save writes it: a storage (its class, key,
// element count) and a view of it.
type view struct {
	class  string // "FloatStorage", ...
	key    string
	numel  int64
	offset int64
	shape  []int64
	stride []int64
}

// contiguous is the view of a whole storage in row-major order.
func contiguous(class, key string, shape ...int64) view {
	stride := make([]int64, len(shape))
	n := int64(1)
	for i := len(shape) - 1; i >= 0; i-- {
		stride[i] = n
		n *= shape[i]
	}
	return view{class: class, key: key, numel: n, shape: shape, stride: stride}
}

// tensor writes _rebuild_tensor_v2(storage, offset, size, stride, False,
// OrderedDict()); legacy ids carry a sixth, None, view field.
func (p *pk) tensor(v view, legacy bool) *pk {
	p.global("torch._utils", "_rebuild_tensor_v2").mark()
	p.mark().str("storage").global("torch", v.class).str(v.key).str("cpu").int(v.numel)
	if legacy {
		p.op('N')
	}
	p.tuple().op('Q')
	p.int(v.offset).ints(v.shape...).ints(v.stride...).op(0x89).orderedDict()
	return p.tuple().op('R')
}

// entry is one state-dict entry: a tensor, or raw pickle opcodes pushing a
// value.
type entry struct {
	key    string
	tensor *view
	raw    []byte
}

// stateDict writes an OrderedDict of entries.
func stateDict(legacy bool, entries ...entry) []byte {
	p := newPickle().orderedDict().mark()
	for _, e := range entries {
		p.str(e.key)
		if e.tensor != nil {
			p.tensor(*e.tensor, legacy)
		} else {
			p.Write(e.raw)
		}
	}
	return p.op('u').stop()
}

func tensorEntry(key string, v view) entry { return entry{key: key, tensor: &v} }

// zipEntry is one file in a torch.save zip.
type zipEntry struct {
	name    string
	data    []byte
	deflate bool
}

// torchZip writes data.pkl and the storages as torch.save's zip format does.
func torchZip(pkl []byte, storages map[string][]byte, extra ...zipEntry) []byte {
	entries := []zipEntry{{name: "archive/data.pkl", data: pkl}, {name: "archive/byteorder", data: []byte("little")}}
	for k, v := range storages {
		entries = append(entries, zipEntry{name: "archive/data/" + k, data: v})
	}
	return zipOf(append(entries, extra...)...)
}

func zipOf(entries ...zipEntry) []byte {
	var buf bytes.Buffer
	w := zip.NewWriter(&buf)
	for _, e := range entries {
		method := zip.Store
		if e.deflate {
			method = zip.Deflate
		}
		f, err := w.CreateHeader(&zip.FileHeader{Name: e.name, Method: method})
		if err != nil {
			panic(err)
		}
		if _, err := f.Write(e.data); err != nil {
			panic(err)
		}
	}
	if err := w.Close(); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

// legacyFile writes torch's pre-1.6 format: magic, version, system info,
// the state dict, the storage keys, then each storage's count and bytes.
func legacyFile(pkl []byte, keys []string, counts []int64, storages [][]byte) []byte {
	var out bytes.Buffer
	magic := []byte{0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, '.'}
	out.Write(magic)
	out.Write(newPickle().op('M', 0xe9, 0x03).stop())
	out.Write(newPickle().op('}').mark().str("little_endian").op(0x88).op('u').stop())
	out.Write(pkl)
	kp := newPickle().op(']').mark()
	for _, k := range keys {
		kp.str(k)
	}
	out.Write(kp.op('e').stop())
	for i, s := range storages {
		binary.Write(&out, binary.LittleEndian, counts[i])
		out.Write(s)
	}
	return out.Bytes()
}

func f32s(vs ...float32) []byte {
	b := make([]byte, 4*len(vs))
	for i, v := range vs {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}

func key(i int) string { return strconv.Itoa(i) }
