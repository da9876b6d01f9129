package models_test

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/flate"
	"encoding/binary"
	"hash/crc32"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/internal/regfile"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/models"
)

// six is a 2×3 float tensor's storage.
var six = f32s(1, 2, 3, 4, 5, 6)

func writeFile(t testing.TB, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(p, data, 0o644))
	return p
}

// zipWith is a zip checkpoint holding one tensor view on storage "0".
func zipWith(v view, storage []byte) []byte {
	return torchZip(stateDict(false, tensorEntry("t", v)), map[string][]byte{"0": storage})
}

// pushList is raw opcodes pushing the list [0, 1].
var pushList = []byte{']', '(', 'K', 0, 'K', 1, 'e'}

func f16s(vs ...uint16) []byte {
	b := make([]byte, 2*len(vs))
	for i, v := range vs {
		binary.LittleEndian.PutUint16(b[2*i:], v)
	}
	return b
}

func TestReadPickleConvertsViewsAndFormats(t *testing.T) {
	transposed := view{class: "FloatStorage", key: "0", numel: 6, shape: []int64{3, 2}, stride: []int64{1, 3}}
	strided := view{class: "FloatStorage", key: "0", numel: 6, offset: 1, shape: []int64{2}, stride: []int64{3}}
	broadcast := view{class: "FloatStorage", key: "0", numel: 6, offset: 5, shape: []int64{2, 2}, stride: []int64{0, 0}}
	scalar := view{class: "FloatStorage", key: "0", numel: 6, offset: 2, shape: []int64{}, stride: []int64{}}
	empty := view{class: "FloatStorage", key: "0", numel: 6, offset: 6, shape: []int64{0, 3}, stride: []int64{3, 1}}
	legacyPkl := stateDict(true, tensorEntry("t", transposed), entry{key: "mask_values", raw: pushList})
	wrapped := newPickle().op('}').str("state_dict").Bytes()
	wrapped = append(wrapped, stateDict(false, tensorEntry("t", contiguous("FloatStorage", "0", 2, 3)))[2:]...)
	wrapped = append(wrapped[:len(wrapped)-1], 's', '.')

	cases := []struct {
		name  string
		file  []byte
		dtype string
		shape []int64
		want  []byte
	}{
		{"contiguous", zipWith(contiguous("FloatStorage", "0", 2, 3), six), "F32", []int64{2, 3}, six},
		{"transposed", zipWith(transposed, six), "F32", []int64{3, 2}, f32s(1, 4, 2, 5, 3, 6)},
		{"offset and stride", zipWith(strided, six), "F32", []int64{2}, f32s(2, 5)},
		{"stride 0", zipWith(broadcast, six), "F32", []int64{2, 2}, f32s(6, 6, 6, 6)},
		{"scalar", zipWith(scalar, six), "F32", []int64{}, f32s(3)},
		{"zero elements", zipWith(empty, six), "F32", []int64{0, 3}, []byte{}},
		{"half", zipWith(contiguous("HalfStorage", "0", 5), f16s(0x3c00, 0xc000, 0x3800, 0x0001, 0x7c00)),
			"F32", []int64{5}, f32s(1, -2, 0.5, float32(math.Ldexp(1, -24)), float32(math.Inf(1)))},
		{"bfloat16", zipWith(contiguous("BFloat16Storage", "0", 2), f16s(0x3f80, 0xc040)), "F32", []int64{2}, f32s(1, -3)},
		{"double", zipWith(contiguous("DoubleStorage", "0", 1), binary.LittleEndian.AppendUint64(nil, math.Float64bits(2.5))), "F32", []int64{1}, f32s(2.5)},
		{"long", zipWith(contiguous("LongStorage", "0", 1), binary.LittleEndian.AppendUint64(nil, uint64(0xFFFFFFFFFFFFFFFE))),
			"I64", []int64{1}, binary.LittleEndian.AppendUint64(nil, uint64(0xFFFFFFFFFFFFFFFE))},
		{"int8", zipWith(contiguous("CharStorage", "0", 1), []byte{0xff}), "I64", []int64{1}, binary.LittleEndian.AppendUint64(nil, math.MaxUint64)},
		{"uint8", zipWith(contiguous("ByteStorage", "0", 1), []byte{0xff}), "I64", []int64{1}, binary.LittleEndian.AppendUint64(nil, 255)},
		{"bool", zipWith(contiguous("BoolStorage", "0", 3), []byte{0, 1, 7}), "BOOL", []int64{3}, []byte{0, 1, 1}},
		{"legacy", legacyFile(legacyPkl, []string{"0"}, []int64{6}, [][]byte{six}), "F32", []int64{3, 2}, f32s(1, 4, 2, 5, 3, 6)},
		{"wrapped in state_dict", torchZip(wrapped, map[string][]byte{"0": six}), "F32", []int64{2, 3}, six},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tensors, _, err := models.ReadPickleStateDict(writeFile(t, "m.pth", c.file))
			require.NoError(t, err)
			require.Contains(t, tensors, "t")
			assert.Equal(t, safetensors.Tensor{DType: c.dtype, Shape: c.shape, Data: c.want}, tensors["t"])
		})
	}
	_, extra, err := models.ReadPickleStateDict(writeFile(t, "m.pth", cases[13].file))
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"mask_values": "[0,1]"}, extra)
}

// rawDict is a checkpoint whose state dict holds one tensor and, under
// "x", whatever the raw opcodes push.
func rawDict(raw []byte) []byte {
	pkl := stateDict(false, tensorEntry("t", contiguous("FloatStorage", "0", 6)), entry{key: "x", raw: raw})
	return torchZip(pkl, map[string][]byte{"0": six})
}

// rawPickle is a checkpoint whose data.pkl is exactly prog.
func rawPickle(prog []byte) []byte { return torchZip(prog, map[string][]byte{"0": six}) }

func u32(n uint32) []byte { return binary.LittleEndian.AppendUint32(nil, n) }
func u64(n uint64) []byte { return binary.LittleEndian.AppendUint64(nil, n) }
func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// nestedLists pushes n lists, each inside the one before, without marks.
func nestedLists(n int) []byte {
	return append(bytes.Repeat([]byte{']'}, n), bytes.Repeat([]byte{'a'}, n-1)...)
}

// doublingDAG pushes Ln of the lists L0 = [], Lk = [Lk-1, Lk-1]: 2^n
// leaves as a tree. The others live only in the memo.
func doublingDAG(n int) []byte {
	b := []byte{']', 'q', 0}
	for i := 1; i <= n; i++ {
		b = append(b, '0', '(', 'h', byte(i-1), 'h', byte(i-1), 'l', 'q', byte(i))
	}
	return b
}

// rawZip writes one zip entry with the given header fields and raw bytes,
// so that sizes and checksums can lie.
func rawZip(entries []zipEntry, hdr *zip.FileHeader, raw []byte) []byte {
	var buf bytes.Buffer
	w := zip.NewWriter(&buf)
	for _, e := range entries {
		f, _ := w.CreateHeader(&zip.FileHeader{Name: e.name, Method: zip.Store})
		f.Write(e.data)
	}
	f, err := w.CreateRaw(hdr)
	if err != nil {
		panic(err)
	}
	f.Write(raw)
	if err := w.Close(); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

func deflated(data []byte) []byte {
	var buf bytes.Buffer
	w, _ := flate.NewWriter(&buf, flate.BestCompression)
	w.Write(data)
	w.Close()
	return buf.Bytes()
}

func tarFile() []byte {
	var buf bytes.Buffer
	w := tar.NewWriter(&buf)
	w.WriteHeader(&tar.Header{Name: "pickle", Mode: 0o644, Size: 1})
	w.Write([]byte{'.'})
	w.Close()
	return buf.Bytes()
}

func TestReadPickleRefusesCraftedCheckpoints(t *testing.T) {
	f32 := func(numel, offset int64, shape, stride []int64) view {
		return view{class: "FloatStorage", key: "0", numel: numel, offset: offset, shape: shape, stride: stride}
	}
	goodPkl := stateDict(false, tensorEntry("t", contiguous("FloatStorage", "0", 6)))
	sixEntry := zipEntry{name: "archive/data/0", data: six}
	pklEntry := zipEntry{name: "archive/data.pkl", data: goodPkl}
	legacyPkl := stateDict(true, tensorEntry("t", contiguous("FloatStorage", "0", 6)))
	legacyView := newPickle().orderedDict().mark().str("t").global("torch._utils", "_rebuild_tensor_v2").mark().
		mark().str("storage").global("torch", "FloatStorage").str("0").str("cpu").int(6).str("0").int(0).int(6).tuple().op('Q').
		int(0).ints(6).ints(1).op(0x89).orderedDict().tuple().op('R').op('u').stop()
	bigEndian := bytes.Replace(legacyFile(legacyPkl, []string{"0"}, []int64{6}, [][]byte{six}), []byte("little_endian\x88"), []byte("little_endian\x89"), 1)
	noneSize := newPickle().orderedDict().mark().str("t").global("torch._utils", "_rebuild_tensor_v2").mark().
		mark().str("storage").global("torch", "FloatStorage").str("0").str("cpu").int(6).tuple().op('Q').
		int(0).mark().op('N').tuple().ints(1).op(0x89).orderedDict().tuple().op('R').op('u').stop()
	moduleID := newPickle().orderedDict().mark().str("t").mark().str("module").int(1).tuple().op('Q').op('u').stop()
	twiceDiffering := stateDict(false, tensorEntry("a", contiguous("FloatStorage", "0", 6)), tensorEntry("b", contiguous("FloatStorage", "0", 3)))
	bomb := make([]byte, 64<<20)
	tooManyDims := make([]int64, models.MaxTensorDims+1)
	for i := range tooManyDims {
		tooManyDims[i] = 1
	}

	cases := []struct {
		name string
		file []byte
		want error
	}{
		// The file as a whole.
		{"empty file", nil, models.ErrBadCheckpoint},
		{"garbage", []byte("not a pickle at all"), models.ErrBadCheckpoint},
		{"tar (gopickle panicked)", tarFile(), models.ErrBadCheckpoint},
		{"zip without data.pkl", zipOf(sixEntry), models.ErrBadCheckpoint},
		{"TorchScript archive", zipOf(pklEntry, sixEntry, zipEntry{name: "archive/constants.pkl", data: goodPkl}), models.ErrBadCheckpoint},
		{"big-endian zip", zipOf(pklEntry, sixEntry, zipEntry{name: "archive/byteorder", data: []byte("big")}), models.ErrBadCheckpoint},
		{"bytes after STOP", rawPickle(append(goodPkl, 'N', '.')), models.ErrBadCheckpoint},
		{"zip bomb storage", torchZip(stateDict(false, tensorEntry("t", contiguous("FloatStorage", "0", 16<<20))),
			nil, zipEntry{name: "archive/data/0", data: bomb, deflate: true}), models.ErrBadCheckpoint},
		{"zip bomb storage under a 1-element view", torchZip(stateDict(false, tensorEntry("t", f32(16<<20, 0, []int64{1}, []int64{1}))),
			nil, zipEntry{name: "archive/data/0", data: bomb, deflate: true}), models.ErrBadCheckpoint},
		{"zip bomb data.pkl", zipOf(zipEntry{name: "archive/data.pkl", data: make([]byte, models.MaxPickleBytes+1), deflate: true}), models.ErrBadCheckpoint},
		{"entry inflates past its size", rawZip([]zipEntry{pklEntry},
			&zip.FileHeader{Name: "archive/data/0", Method: zip.Deflate, CRC32: crc32.ChecksumIEEE(six),
				UncompressedSize64: 24, CompressedSize64: uint64(len(deflated(append(six, six...))))}, deflated(append(six, six...))), models.ErrBadCheckpoint},
		{"bad CRC", rawZip([]zipEntry{pklEntry},
			&zip.FileHeader{Name: "archive/data/0", Method: zip.Store, CRC32: 12345, UncompressedSize64: 24, CompressedSize64: 24}, six), models.ErrBadCheckpoint},
		{"storage entry missing", torchZip(goodPkl, nil), models.ErrBadCheckpoint},
		{"top level not a dict", rawPickle(newPickle().op('N').stop()), models.ErrBadCheckpoint},
		{"no tensors", rawPickle(newPickle().op('}').stop()), models.ErrBadCheckpoint},

		// Storages and views.
		{"negative storage size", zipWith(f32(-1, 0, []int64{1}, []int64{1}), six), models.ErrBadCheckpoint},
		{"storage of 1e15 elements", zipWith(f32(1e15, 0, []int64{1e15}, []int64{1}), six), models.ErrBadCheckpoint},
		{"storage shorter than its id", zipWith(f32(6, 0, []int64{6}, []int64{1}), six[:16]), models.ErrBadCheckpoint},
		{"negative size", zipWith(f32(6, 0, []int64{-1}, []int64{1}), six), models.ErrBadCheckpoint},
		{"negative stride", zipWith(f32(6, 5, []int64{2}, []int64{-1}), six), models.ErrBadCheckpoint},
		{"negative offset", zipWith(f32(6, -1, []int64{1}, []int64{1}), six), models.ErrBadCheckpoint},
		{"offset past the storage", zipWith(f32(6, 6, []int64{1}, []int64{1}), six), models.ErrBadCheckpoint},
		{"empty view past the storage", zipWith(f32(6, 7, []int64{0}, []int64{1}), six), models.ErrBadCheckpoint},
		{"view past the storage", zipWith(f32(6, 0, []int64{7}, []int64{1}), six), models.ErrBadCheckpoint},
		{"stride past the storage", zipWith(f32(6, 0, []int64{2, 2}, []int64{3, 3}), six), models.ErrBadCheckpoint},
		{"element count overflows", zipWith(f32(6, 0, []int64{1 << 40, 1 << 40}, []int64{0, 0}), six), models.ErrBadCheckpoint},
		{"last index overflows", zipWith(f32(6, 0, []int64{3}, []int64{1 << 62}), six), models.ErrBadCheckpoint},
		{"stride 0 of 1e12 elements", zipWith(f32(6, 0, []int64{1e6, 1e6}, []int64{0, 0}), six), models.ErrBadCheckpoint},
		{"too many dimensions", zipWith(f32(6, 0, tooManyDims, tooManyDims), six), models.ErrBadCheckpoint},
		{"size not ints", rawPickle(noneSize), models.ErrBadCheckpoint},
		{"storage named twice differently", torchZip(twiceDiffering, map[string][]byte{"0": six}), models.ErrBadCheckpoint},
		{"unknown storage class", zipWith(view{class: "QInt8Storage", key: "0", numel: 6, shape: []int64{6}, stride: []int64{1}}, six), models.ErrUnsafePickle},
		{"persistent id of a module", rawPickle(moduleID), models.ErrUnsafePickle},

		// The pickle program.
		{"BINUNICODE of 4 GiB", rawDict(cat([]byte{'X'}, u32(0xFFFFFFF0), []byte("abc"))), models.ErrBadCheckpoint},
		{"BINUNICODE8 of 2^62", rawDict(cat([]byte{0x8d}, u64(1<<62), []byte("abc"))), models.ErrBadCheckpoint},
		{"negative BINSTRING", rawDict(cat([]byte{'T'}, u32(0xFFFFFFFB), []byte("abc"))), models.ErrBadCheckpoint},
		{"LONG4 of 1 GiB", rawDict(cat([]byte{0x8b}, u32(1<<30), []byte{1})), models.ErrBadCheckpoint},
		{"empty LONG1 (gopickle panicked)", rawDict([]byte{0x8a, 0}), models.ErrBadCheckpoint},
		{"huge FRAME", rawPickle(cat([]byte{0x80, 4, 0x95}, u64(1<<40), []byte{'N', '.'})), models.ErrBadCheckpoint},
		{"100 000-digit LONG", rawDict(cat([]byte{'L'}, bytes.Repeat([]byte{'9'}, 100000), []byte("L\n"))), models.ErrBadCheckpoint},
		{"opcode 0xff (gopickle panicked)", rawDict([]byte{0xff}), models.ErrBadCheckpoint},
		{"DICT of odd items (gopickle panicked)", rawDict([]byte{'(', 'K', 1, 'd'}), models.ErrBadCheckpoint},
		{"SETITEMS of odd items (gopickle panicked)", rawPickle(newPickle().op('}', '(', 'K', 1, 'u').stop()), models.ErrBadCheckpoint},
		{"pop from an empty stack", rawPickle([]byte{0x80, 2, 'R', '.'}), models.ErrBadCheckpoint},
		{"no STOP", rawPickle(goodPkl[:len(goodPkl)-1]), models.ErrBadCheckpoint},
		{"marks nested 100 000 deep", rawDict(append(bytes.Repeat([]byte{'('}, 100000), bytes.Repeat([]byte{'t'}, 100000)...)), models.ErrBadCheckpoint},
		{"2^10 paths through shared lists, within the depth", rawDict(doublingDAG(10)), models.ErrBadCheckpoint},
		{"lists nested 100 000 deep", rawDict(nestedLists(100000)), models.ErrBadCheckpoint},
		{"list inside itself", rawDict([]byte{']', 'q', 0, 'h', 0, 'a'}), models.ErrBadCheckpoint},
		{"2^40 paths through shared lists", rawDict(doublingDAG(40)), models.ErrBadCheckpoint},
		{"bytes key (gopickle panicked)", rawPickle(newPickle().orderedDict().op('C', 1, 'k', 'N', 's').stop()), models.ErrUnsafePickle},
		{"set", rawDict([]byte{0x8f}), models.ErrUnsafePickle},
		{"INST", rawDict([]byte("(ios\nsystem\n")), models.ErrUnsafePickle},
		{"arbitrary class", rawDict([]byte("cos\nsystem\n")), models.ErrUnsafePickle},

		// The legacy format.
		{"legacy storage view (gopickle panicked)", legacyFile(legacyView, []string{"0"}, []int64{6}, [][]byte{six}), models.ErrBadCheckpoint},
		{"legacy storage truncated", legacyFile(legacyPkl, []string{"0"}, []int64{6}, [][]byte{six[:20]}), models.ErrBadCheckpoint},
		{"legacy count differs", legacyFile(legacyPkl, []string{"0"}, []int64{1 << 60}, [][]byte{six}), models.ErrBadCheckpoint},
		{"legacy unused key", legacyFile(legacyPkl, []string{"0", "9"}, []int64{6, 0}, [][]byte{six, nil}), models.ErrBadCheckpoint},
		{"legacy big-endian", bigEndian, models.ErrBadCheckpoint},
		{"legacy without storages", legacyFile(legacyPkl, nil, nil, nil), models.ErrBadCheckpoint},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := writeFile(t, "m.pth", c.file)
			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, _, err := models.ReadPickleStateDict(path)
			runtime.ReadMemStats(&after)
			require.Error(t, err)
			assert.ErrorIs(t, err, c.want)
			assert.NotErrorIs(t, err, models.ErrPanicked, "refused by a check, not by a recovered panic")
			// What a crafted size claims is never allocated: the reader
			// allocates in proportion to the bytes that are there.
			assert.LessOrEqual(t, after.TotalAlloc-before.TotalAlloc, uint64(4<<20+512*len(c.file)), "bytes allocated")
		})
	}
}

// A FIFO, socket or folder given as a checkpoint fails at once; before, the
// open blocked until a writer came.
func TestPickleReadersRefuseSpecialFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "seg.pth")
	require.NoError(t, syscall.Mkfifo(fifo, 0o644))
	fifoST := filepath.Join(dir, "sd.safetensors")
	require.NoError(t, syscall.Mkfifo(fifoST, 0o644))
	folder := filepath.Join(dir, "folder.ckpt")
	require.NoError(t, os.Mkdir(folder, 0o755))

	calls := map[string]func() error{
		"ReadPickleStateDict fifo": func() error { _, _, err := models.ReadPickleStateDict(fifo); return err },
		"ReadPickleStateDict dir":  func() error { _, _, err := models.ReadPickleStateDict(folder); return err },
		"ConvertPickle fifo":       func() error { return models.ConvertPickle(fifo, filepath.Join(dir, "out.safetensors")) },
		"Resolve fifo pickle":      func() error { _, err := models.Resolve(fifo, dir); return err },
		"Resolve fifo safetensors": func() error { _, err := models.Resolve(fifoST, dir); return err },
		"Resolve dir as pickle":    func() error { _, err := models.Resolve(folder, dir); return err },
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			done := make(chan error, 1)
			go func() { done <- call() }()
			select {
			case err := <-done:
				require.ErrorIs(t, err, regfile.ErrNotRegular)
			case <-time.After(30 * time.Second): // a hang guard, not a timing
				t.Fatal("blocked on a special file")
			}
		})
	}
}

func TestScanSkipsSpecialFilesWithoutOpeningThem(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, syscall.Mkfifo(filepath.Join(dir, "fifo.safetensors"), 0o644))
	require.NoError(t, syscall.Mkfifo(filepath.Join(dir, "fifo.pth"), 0o644))
	sd := filepath.Join(dir, "sd")
	require.NoError(t, os.Mkdir(sd, 0o755))
	require.NoError(t, syscall.Mkfifo(filepath.Join(sd, "model_index.json"), 0o644))
	real := writeFile(t, "x", zipWith(contiguous("FloatStorage", "0", 6), six))
	require.NoError(t, os.Rename(real, filepath.Join(dir, "real.pth")))
	require.NoError(t, os.Symlink(filepath.Join(dir, "real.pth"), filepath.Join(dir, "link.pth")))

	done := make(chan []models.Found, 1)
	go func() {
		found, err := models.Scan(dir)
		assert.NoError(t, err)
		done <- found
	}()
	select {
	case found := <-done:
		var names []string
		for _, f := range found {
			names = append(names, filepath.Base(f.Path))
		}
		assert.Equal(t, []string{"link.pth", "real.pth"}, names)
		assert.Equal(t, found[0].Bytes, found[1].Bytes, "a symlink counts its target's size")
	case <-time.After(30 * time.Second): // a hang guard, not a timing
		t.Fatal("Scan blocked on a FIFO")
	}
}
