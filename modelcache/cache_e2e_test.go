package modelcache_test

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/modelcache"
)

// These tests run the cache over the real engine and the tiny models; the
// policy itself is pinned, with a fake loader, in cache_test.go.

func TestMain(m *testing.M) { testenv.Main(m) }

func newCache(t *testing.T, budget int64) *modelcache.Cache {
	t.Helper()
	c := modelcache.New(modelcache.LibraryLoader{Lib: testenv.Library(t)}, modelcache.Options{Budget: budget})
	t.Cleanup(c.Close)
	return c
}

// segModels writes n distinct tiny segmentation models and returns their paths
// and the weight bytes of one of them.
func segModels(t *testing.T, lib *binding.Library, n int) []string {
	t.Helper()
	dir := t.TempDir()
	var paths []string
	for i := 0; i < n; i++ {
		p := filepath.Join(dir, "seg"+string(rune('a'+i))+".safetensors")
		require.NoError(t, lib.WriteRandomSeg(p, binding.SegArch{InChannels: 3, Classes: 2, BaseWidth: 8}, uint64(i+1)))
		paths = append(paths, p)
	}
	return paths
}

func segKey(t *testing.T, c *modelcache.Cache, path string) modelcache.Key {
	t.Helper()
	k, err := c.KeyFor(modelcache.KindSeg, path, "", binding.DTypeAuto)
	require.NoError(t, err)
	return k
}

// tinySD is a cache with no budget and the key of the tiny SD model.
func tinySD(t *testing.T) (*modelcache.Cache, modelcache.Key, string) {
	t.Helper()
	sdDir, _ := testenv.Tiny(t)
	c := newCache(t, -1)
	key, err := c.KeyFor(modelcache.KindSD, sdDir, "", binding.DTypeAuto)
	require.NoError(t, err)
	return c, key, sdDir
}

func TestCacheReturnsLoadedModelWithoutReloading(t *testing.T) {
	c, key, sdDir := tinySD(t)
	assert.Equal(t, binding.F32, key.DType, "auto resolves to f32 on the cpu")

	r1, err := c.Acquire(context.Background(), key)
	require.NoError(t, err)
	r1.Release()
	r2, err := c.Acquire(context.Background(), key)
	require.NoError(t, err)
	defer r2.Release()
	assert.Same(t, r1.SD(), r2.SD())
	s := c.Stats()
	assert.Equal(t, int64(1), s.Loads)
	assert.Equal(t, int64(1), s.Hits)
	assert.Equal(t, 1, s.Loaded)
	assert.Equal(t, r2.Info().WeightBytes, s.BytesInUse)

	// A relative path to the same folder is the same model.
	wd, _ := os.Getwd()
	rel, err := filepath.Rel(wd, sdDir)
	require.NoError(t, err)
	key2, err := c.KeyFor(modelcache.KindSD, rel, "cpu", binding.F32)
	require.NoError(t, err)
	assert.Equal(t, key, key2)
}

func TestCacheEvictsLeastRecentlyUsedIdleModel(t *testing.T) {
	lib := testenv.Library(t)
	paths := segModels(t, lib, 3)
	probe, err := lib.OpenSeg(binding.SegOptions{Path: paths[0]})
	require.NoError(t, err)
	size := probe.Info().WeightBytes
	probe.Close()

	// Room for two models.
	c := newCache(t, 2*size+size/2)
	ctx := context.Background()
	a, b, cc := segKey(t, c, paths[0]), segKey(t, c, paths[1]), segKey(t, c, paths[2])

	ra, err := c.Acquire(ctx, a)
	require.NoError(t, err)
	ra.Release()
	rb, err := c.Acquire(ctx, b)
	require.NoError(t, err)
	rb.Release()
	// Touch a, so b is the least recently used.
	ra, err = c.Acquire(ctx, a)
	require.NoError(t, err)
	ra.Release()

	rc, err := c.Acquire(ctx, cc)
	require.NoError(t, err)
	defer rc.Release()
	s := c.Stats()
	assert.Equal(t, int64(1), s.Evictions)
	assert.Equal(t, 2, s.Loaded)
	loaded := map[string]bool{}
	for _, m := range c.Loaded() {
		loaded[m.Path] = true
	}
	assert.True(t, loaded[a.Path], "recently used model stays")
	assert.False(t, loaded[b.Path], "least recently used model goes")
	assert.True(t, loaded[cc.Path])
}

func TestCacheNeverEvictsModelInUse(t *testing.T) {
	lib := testenv.Library(t)
	paths := segModels(t, lib, 2)
	// A budget smaller than one model: everything idle must go, nothing in use may.
	c := newCache(t, 1024)
	ctx := context.Background()
	a, b := segKey(t, c, paths[0]), segKey(t, c, paths[1])

	ra, err := c.Acquire(ctx, a)
	require.NoError(t, err)
	rb, err := c.Acquire(ctx, b)
	require.NoError(t, err)
	assert.Equal(t, int64(0), c.Stats().Evictions, "both are in use")
	assert.Equal(t, 2, c.Stats().Loaded)
	// The model in use still works.
	assert.Contains(t, ra.Seg().Info().Arch, "seg-unet")
	unloaded, err := c.Unload(a)
	assert.ErrorIs(t, err, modelcache.ErrInUse, "unloading a model in use is refused")
	assert.False(t, unloaded)

	rb.Release() // idle and over budget: freed at once
	assert.Equal(t, int64(1), c.Stats().Evictions)
	assert.Equal(t, 1, c.Stats().Loaded)
	ra.Release()
	ra.Release() // a second release is a no-op
	assert.Equal(t, int64(2), c.Stats().Evictions)
	assert.Equal(t, 0, c.Stats().Loaded)
}

func TestCacheLoadsOnceForConcurrentRequests(t *testing.T) {
	c, key, _ := tinySD(t)

	const n = 8
	refs := make([]*modelcache.Ref, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			refs[i], errs[i] = c.Acquire(context.Background(), key)
		}(i)
	}
	close(start)
	wg.Wait()
	for i := 0; i < n; i++ {
		require.NoError(t, errs[i])
		assert.Same(t, refs[0].SD(), refs[i].SD())
		refs[i].Release()
	}
	s := c.Stats()
	assert.Equal(t, int64(1), s.Loads)
	assert.Equal(t, int64(n-1), s.Hits)
}

func TestCacheLoadErrorsReachEveryWaiterAndAreNotCached(t *testing.T) {
	lib := testenv.Library(t)
	c := newCache(t, -1)
	missing := filepath.Join(t.TempDir(), "missing.safetensors")
	key := segKey(t, c, missing)
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := c.Acquire(context.Background(), key)
			assert.ErrorIs(t, err, binding.ErrNotFound)
		}()
	}
	wg.Wait()
	assert.Equal(t, 0, c.Stats().Loaded)

	// Once the file exists the same key loads.
	require.NoError(t, lib.WriteRandomSeg(missing, binding.SegArch{InChannels: 3, Classes: 1, BaseWidth: 8}, 9))
	r, err := c.Acquire(context.Background(), key)
	require.NoError(t, err)
	assert.Contains(t, r.Info().Arch, "3->1")
	r.Release()
}

func TestCacheAcquireHonoursContextAndClose(t *testing.T) {
	_, segPath := testenv.Tiny(t)
	c := newCache(t, -1)
	key := segKey(t, c, segPath)
	r, err := c.Acquire(context.Background(), key)
	require.NoError(t, err)

	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	<-ctx.Done()
	// Loaded models are returned even to a cancelled context: no wait happens.
	r2, err := c.Acquire(ctx, key)
	require.NoError(t, err)
	r2.Release()
	c.Close()
	_, err = c.Acquire(context.Background(), key)
	assert.ErrorIs(t, err, modelcache.ErrClosed)
	// The model in use survives Close until released.
	assert.Contains(t, r.Seg().Info().Arch, "seg-unet")
	r.Release()
	assert.Equal(t, 0, c.Stats().Loaded)
}
