package modelcache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
)

// The cache's policy, pinned with a fake loader: these run in milliseconds
// and need no engine. cache_e2e_test.go runs the same cache on the engine.

type fakeModel struct {
	path   string
	bytes  int64
	mu     sync.Mutex
	closed bool
}

func (m *fakeModel) Info() binding.ModelInfo {
	return binding.ModelInfo{WeightBytes: m.bytes, Arch: "fake " + filepath.Base(m.path)}
}

func (m *fakeModel) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}

func (m *fakeModel) isClosed() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closed
}

// fakeLoader makes models of a fixed size; a held loader keeps every load
// waiting until open is called; fail makes the loads of a path fail.
type fakeLoader struct {
	device   binding.Device
	bytes    int64
	gate     chan struct{}
	openGate sync.Once

	mu      sync.Mutex
	fail    map[string]error
	started int // loads begun, held ones included
	loads   map[string]int
	models  map[string]*fakeModel // the latest model loaded for each path
	// alive lists, at each load, the paths whose models were loaded and not closed.
	alive [][]string
}

func newFakeLoader(bytes int64) *fakeLoader {
	return &fakeLoader{device: binding.Device{Kind: binding.CPU, ID: "cpu", TotalMemory: -1}, bytes: bytes,
		fail: map[string]error{}, loads: map[string]int{}, models: map[string]*fakeModel{}}
}

// held makes a loader whose loads wait for open; the test's end opens it, so
// a failing test never leaves a load hanging.
func held(t *testing.T, bytes int64) *fakeLoader {
	l := newFakeLoader(bytes)
	l.gate = make(chan struct{})
	t.Cleanup(l.open)
	return l
}

func (l *fakeLoader) open() { l.openGate.Do(func() { close(l.gate) }) }

func (l *fakeLoader) startedLoads() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.started
}

func (l *fakeLoader) Device(name string) (binding.Device, error) {
	if name == "" || name == l.device.ID {
		return l.device, nil
	}
	return binding.Device{}, binding.ErrDevice
}

func (l *fakeLoader) Load(k Key) (Model, error) {
	l.mu.Lock()
	l.started++
	l.mu.Unlock()
	if l.gate != nil {
		<-l.gate
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.loads[k.Path]++
	var open []string
	for p, m := range l.models {
		if !m.isClosed() {
			open = append(open, p)
		}
	}
	l.alive = append(l.alive, open)
	if err := l.fail[k.Path]; err != nil {
		return nil, err
	}
	m := &fakeModel{path: k.Path, bytes: l.bytes}
	l.models[k.Path] = m
	return m, nil
}

func (l *fakeLoader) loadsOf(path string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.loads[path]
}

func (l *fakeLoader) model(path string) *fakeModel {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.models[path]
}

// refsOf counts the references to key's entry, requests waiting for its load
// included.
func (c *Cache) refsOf(key Key) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[key]; ok {
		return e.refs
	}
	return 0
}

// newQuiet is a cache over l that logs nothing.
func newQuiet(l Loader, budget int64) *Cache {
	return New(l, Options{Budget: budget, Logger: slog.New(slog.DiscardHandler)})
}

func key(t *testing.T, c *Cache, path string) Key {
	t.Helper()
	k, err := c.KeyFor(KindSD, path, "", binding.DTypeAuto)
	require.NoError(t, err)
	return k
}

func acquire(t *testing.T, c *Cache, k Key) *Ref {
	t.Helper()
	r, err := c.Acquire(context.Background(), k)
	require.NoError(t, err)
	return r
}

func loadedPaths(c *Cache) []string {
	var out []string
	for _, m := range c.Loaded() {
		out = append(out, m.Path)
	}
	return out
}

func TestKeyForResolvesPathDeviceAndDType(t *testing.T) {
	wd, err := os.Getwd()
	require.NoError(t, err)
	cuda := binding.Device{Kind: binding.CUDA, ID: "cuda:0", TotalMemory: 1 << 30}
	tests := []struct {
		name   string
		device binding.Device
		kind   Kind
		path   string
		dtype  binding.DType
		want   Key
	}{
		{"relative path, cpu auto", binding.Device{ID: "cpu"}, KindSD, "m/../m/sd", binding.DTypeAuto,
			Key{Kind: KindSD, Path: filepath.Join(wd, "m", "sd"), Device: "cpu", DType: binding.F32}},
		{"sd auto on cuda is f16", cuda, KindSD, "/x/sd", binding.DTypeAuto, Key{Kind: KindSD, Path: "/x/sd", Device: "cuda:0", DType: binding.F16}},
		{"seg auto is f32 everywhere", cuda, KindSeg, "/x/seg.safetensors", binding.DTypeAuto,
			Key{Kind: KindSeg, Path: "/x/seg.safetensors", Device: "cuda:0", DType: binding.F32}},
		{"explicit dtype stays", cuda, KindSD, "/x/sd", binding.BF16, Key{Kind: KindSD, Path: "/x/sd", Device: "cuda:0", DType: binding.BF16}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newFakeLoader(1)
			l.device = tt.device
			c := newQuiet(l, -1)
			k, err := c.KeyFor(tt.kind, tt.path, "", tt.dtype)
			require.NoError(t, err)
			assert.Equal(t, tt.want, k)
		})
	}
	c := newQuiet(newFakeLoader(1), -1)
	_, err = c.KeyFor(KindSD, "/x", "cuda:7", binding.DTypeAuto)
	assert.ErrorIs(t, err, binding.ErrDevice)
}

func TestDefaultBudgetIsThreeQuartersOfTheDevice(t *testing.T) {
	tests := []struct {
		name         string
		total, asked int64
		want         int64
	}{
		{"known memory", 1000, 0, 750},
		{"unknown memory: no limit", -1, 0, 0},
		{"explicit budget", 1000, 300, 300},
		{"negative: no limit", 1000, -1, 0},
	}
	for _, tt := range tests {
		l := newFakeLoader(1)
		l.device.TotalMemory = tt.total
		assert.Equal(t, tt.want, newQuiet(l, tt.asked).Stats().Budget, tt.name)
	}
}

func TestAcquireReturnsTheLoadedModelWithoutReloading(t *testing.T) {
	l := newFakeLoader(100)
	c := newQuiet(l, -1)
	k := key(t, c, "/m/a")
	r1 := acquire(t, c, k)
	r1.Release()
	r2 := acquire(t, c, k)
	defer r2.Release()
	assert.Same(t, r1.Model(), r2.Model())
	assert.Equal(t, 1, l.loadsOf("/m/a"))
	assert.Equal(t, Stats{Loads: 1, Hits: 1, Loaded: 1, BytesInUse: 100}, c.Stats())
	assert.Nil(t, r2.SD(), "a fake model is no engine model")
}

func TestEvictsTheLeastRecentlyUsedIdleModel(t *testing.T) {
	l := newFakeLoader(100)
	c := newQuiet(l, 250) // room for two
	a, b, d := key(t, c, "/m/a"), key(t, c, "/m/b"), key(t, c, "/m/d")
	acquire(t, c, a).Release()
	acquire(t, c, b).Release()
	acquire(t, c, a).Release() // b is now the least recently used
	rd := acquire(t, c, d)
	defer rd.Release()
	assert.ElementsMatch(t, []string{"/m/a", "/m/d"}, loadedPaths(c))
	assert.True(t, l.model("/m/b").isClosed(), "the evicted model is freed")
	assert.False(t, l.model("/m/a").isClosed())
	assert.Equal(t, int64(1), c.Stats().Evictions)
	assert.Equal(t, int64(200), c.Stats().BytesInUse)
}

func TestMakesRoomBeforeLoadingFromTheFilesSize(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"a", "b", "d"} {
		require.NoError(t, os.MkdirAll(filepath.Join(dir, name, "unet"), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dir, name, "unet", "w.safetensors"), make([]byte, 100), 0o644))
	}
	l := newFakeLoader(100)
	c := newQuiet(l, 250)
	acquire(t, c, key(t, c, filepath.Join(dir, "a"))).Release()
	acquire(t, c, key(t, c, filepath.Join(dir, "b"))).Release()
	r := acquire(t, c, key(t, c, filepath.Join(dir, "d")))
	defer r.Release()
	// The third load began with a already freed: its files said it would not fit.
	require.Len(t, l.alive, 3)
	assert.Equal(t, []string{filepath.Join(dir, "b")}, l.alive[2])
}

func TestNeverEvictsAModelInUse(t *testing.T) {
	l := newFakeLoader(100)
	c := newQuiet(l, 10) // smaller than one model
	a, b := key(t, c, "/m/a"), key(t, c, "/m/b")
	ra, rb := acquire(t, c, a), acquire(t, c, b)
	assert.Equal(t, int64(0), c.Stats().Evictions, "both are in use")
	assert.Equal(t, 2, c.Stats().Loaded)
	assert.False(t, l.model("/m/a").isClosed())
	assert.False(t, l.model("/m/b").isClosed())
	freed, err := c.Unload(a)
	assert.ErrorIs(t, err, ErrInUse)
	assert.False(t, freed)

	rb.Release() // idle and over budget: freed at once
	assert.True(t, l.model("/m/b").isClosed())
	assert.False(t, l.model("/m/a").isClosed())
	assert.Equal(t, []string{"/m/a"}, loadedPaths(c))
	ra.Release()
	ra.Release() // a second release is a no-op
	assert.True(t, l.model("/m/a").isClosed())
	assert.Equal(t, Stats{Loads: 2, Evictions: 2, Budget: 10}, c.Stats())
}

func TestUnloadFreesAnIdleModel(t *testing.T) {
	l := newFakeLoader(100)
	c := newQuiet(l, -1)
	a := key(t, c, "/m/a")
	acquire(t, c, a).Release()
	freed, err := c.Unload(a)
	require.NoError(t, err)
	assert.True(t, freed)
	assert.True(t, l.model("/m/a").isClosed())
	freed, err = c.Unload(a)
	require.NoError(t, err)
	assert.False(t, freed, "nothing left to free")
}

// waitForWaiters starts n Acquires of k while loads are held at the gate and
// returns once all n wait on the cache (or a second load has begun).
func waitForWaiters(t *testing.T, c *Cache, l *fakeLoader, k Key, n int) ([]*Ref, []error, func()) {
	t.Helper()
	refs, errs := make([]*Ref, n), make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			refs[i], errs[i] = c.Acquire(context.Background(), k)
		}(i)
	}
	// A second load begun means the requests did not share one: stop waiting.
	require.Eventually(t, func() bool { return c.refsOf(k) == n || l.startedLoads() > 1 },
		10*time.Second, time.Millisecond)
	require.Equal(t, 1, l.startedLoads(), "every request waits for the one load")
	return refs, errs, wg.Wait
}

func TestConcurrentRequestsShareOneLoad(t *testing.T) {
	l := held(t, 100)
	c := newQuiet(l, -1)
	k := key(t, c, "/m/a")
	const n = 8
	refs, errs, wait := waitForWaiters(t, c, l, k, n)
	l.open()
	wait()
	for i := 0; i < n; i++ {
		require.NoError(t, errs[i])
		assert.Same(t, refs[0].Model(), refs[i].Model())
		refs[i].Release()
	}
	assert.Equal(t, 1, l.loadsOf("/m/a"))
	assert.Equal(t, int64(n-1), c.Stats().Hits)
}

func TestALoadErrorReachesEveryWaiterAndIsNotKept(t *testing.T) {
	errBroken := errors.New("broken file")
	l := held(t, 100)
	l.fail["/m/a"] = errBroken
	c := newQuiet(l, -1)
	k := key(t, c, "/m/a")
	_, errs, wait := waitForWaiters(t, c, l, k, 4)
	l.open()
	wait()
	for _, err := range errs {
		assert.ErrorIs(t, err, errBroken)
	}
	assert.Equal(t, 1, l.loadsOf("/m/a"))
	assert.Equal(t, Stats{}, c.Stats())

	// Once the file is fixed the same key loads.
	l.mu.Lock()
	delete(l.fail, "/m/a")
	l.mu.Unlock()
	r := acquire(t, c, k)
	defer r.Release()
	assert.Equal(t, 2, l.loadsOf("/m/a"))
}

func TestAcquireHonoursTheContextWhileWaiting(t *testing.T) {
	l := held(t, 100)
	c := newQuiet(l, -1)
	k := key(t, c, "/m/a")
	first := make(chan error, 1)
	go func() {
		r, err := c.Acquire(context.Background(), k)
		if err == nil {
			r.Release()
		}
		first <- err
	}()
	require.Eventually(t, func() bool { return c.refsOf(k) == 1 }, 10*time.Second, time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	second := make(chan error, 1)
	go func() {
		_, err := c.Acquire(ctx, k)
		second <- err
	}()
	var err error
	require.Eventually(t, func() bool {
		select {
		case err = <-second:
			return true
		default:
			return l.startedLoads() > 1
		}
	}, 10*time.Second, time.Millisecond)
	require.Equal(t, 1, l.startedLoads(), "the second request waited for the first load")
	assert.ErrorIs(t, err, context.Canceled)
	assert.Equal(t, 1, c.refsOf(k), "the cancelled request gave its reference back")
	l.open()
	require.NoError(t, <-first)

	// A loaded model is returned even to a cancelled context: nothing waits.
	r, err := c.Acquire(ctx, k)
	require.NoError(t, err)
	r.Release()
}

func TestCloseFreesIdleModelsAndModelsInUseOnRelease(t *testing.T) {
	l := newFakeLoader(100)
	c := newQuiet(l, -1)
	a, b := key(t, c, "/m/a"), key(t, c, "/m/b")
	ra := acquire(t, c, a)
	acquire(t, c, b).Release()
	c.Close()
	assert.True(t, l.model("/m/b").isClosed(), "idle: freed at Close")
	assert.False(t, l.model("/m/a").isClosed(), "in use: kept")
	_, err := c.Acquire(context.Background(), b)
	assert.ErrorIs(t, err, ErrClosed)
	ra.Release()
	assert.True(t, l.model("/m/a").isClosed(), "freed with its last reference")
	assert.Equal(t, 0, c.Stats().Loaded)
}

// checkingLoader is a fakeLoader that says which backends it can run.
type checkingLoader struct {
	*fakeLoader
	unavailable map[binding.Backend]error
}

func (l checkingLoader) BackendAvailable(b binding.Backend) error { return l.unavailable[b] }

func (l checkingLoader) Backends() []binding.BackendStatus {
	var out []binding.BackendStatus
	for _, b := range binding.Backends() {
		out = append(out, binding.BackendStatus{Backend: b, Available: l.unavailable[b] == nil})
	}
	return out
}

func TestBackendIsPartOfTheKey(t *testing.T) {
	l := newFakeLoader(1)
	c := newQuiet(l, -1)
	torch := key(t, c, "/x/sd")
	sdcpp, err := torch.WithBackend(binding.BackendSDCPP)
	require.NoError(t, err)
	assert.NotEqual(t, torch, sdcpp)
	assert.Equal(t, binding.BackendSDCPP, sdcpp.Backend)
	assert.Contains(t, sdcpp.String(), "+sdcpp")
	same, err := torch.WithBackend(binding.BackendLibtorch)
	require.NoError(t, err)
	assert.Equal(t, torch, same)

	// The same file through two backends is two models.
	r1 := acquire(t, c, torch)
	defer r1.Release()
	r2 := acquire(t, c, sdcpp)
	defer r2.Release()
	assert.Equal(t, 2, l.loadsOf("/x/sd"))
	assert.NotSame(t, r1.e, r2.e)

	seg, err := c.KeyFor(KindSeg, "/x/seg.safetensors", "", binding.DTypeAuto)
	require.NoError(t, err)
	_, err = seg.WithBackend(binding.BackendSDCPP)
	assert.ErrorIs(t, err, binding.ErrInvalidArgument, "segmentation models have one engine")
}

func TestCacheAsksTheLoaderWhichBackendsItCanRun(t *testing.T) {
	// A loader that cannot tell lets the load decide.
	assert.NoError(t, newQuiet(newFakeLoader(1), -1).BackendAvailable(binding.BackendSDCPP))

	missing := fmt.Errorf("%w: not built in", binding.ErrUnsupported)
	c := newQuiet(checkingLoader{newFakeLoader(1), map[binding.Backend]error{binding.BackendSDCPP: missing}}, -1)
	assert.NoError(t, c.BackendAvailable(binding.BackendLibtorch))
	assert.ErrorIs(t, c.BackendAvailable(binding.BackendSDCPP), binding.ErrUnsupported)
	assert.Equal(t, []binding.BackendStatus{{Backend: binding.BackendLibtorch, Available: true}, {Backend: binding.BackendSDCPP}},
		c.Backends(), "the loader's list")
	assert.Equal(t, []binding.BackendStatus{{Backend: binding.BackendLibtorch, Available: true},
		{Backend: binding.BackendSDCPP, Available: true}}, newQuiet(newFakeLoader(1), -1).Backends(), "a loader that cannot tell")
}
