package models_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/models"
)

// The .pth the segmentation project's training script writes holds the same
// weights as the reference's safetensors file, plus mask_values.
func TestReadPickleStateDictMatchesSafetensors(t *testing.T) {
	fx := testenv.Fixtures(t)
	for _, name := range []string{"seg-unet-w8", "seg-unet-w8-bilinear"} {
		dir := filepath.Join(fx, "seg", name)
		tensors, extra, err := models.ReadPickleStateDict(filepath.Join(dir, "model.pth"))
		require.NoError(t, err, name)
		ref, err := safetensors.Read(filepath.Join(dir, "model.safetensors"))
		require.NoError(t, err)
		require.Equal(t, len(ref.Tensors), len(tensors), name)
		for k, want := range ref.Tensors {
			got, ok := tensors[k]
			require.True(t, ok, k)
			assert.Equal(t, want.Shape, got.Shape, k)
			assert.Equal(t, want.DType, got.DType, k)
			assert.Equal(t, want.Data, got.Data, k)
		}
		assert.Equal(t, "[0,1]", extra["mask_values"])
	}
}

func TestResolveConvertsOnceAndRefusesUnsafePickles(t *testing.T) {
	fx := testenv.Fixtures(t)
	cache := t.TempDir()
	src := filepath.Join(fx, "seg/seg-unet-w8/model.pth")
	dst, err := models.Resolve(src, cache)
	require.NoError(t, err)
	assert.Equal(t, ".safetensors", filepath.Ext(dst))
	st1, err := os.Stat(dst)
	require.NoError(t, err)
	again, err := models.Resolve(src, cache)
	require.NoError(t, err)
	assert.Equal(t, dst, again)
	st2, _ := os.Stat(again)
	assert.Equal(t, st1.ModTime(), st2.ModTime(), "converted once")
	f, err := safetensors.Read(dst)
	require.NoError(t, err)
	assert.Equal(t, "[0,1]", f.Metadata["mask_values"])

	same, err := models.Resolve(filepath.Join(fx, "seg/seg-unet-w8/model.safetensors"), cache)
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(fx, "seg/seg-unet-w8/model.safetensors"), same)

	// A legacy-format pickle that names an arbitrary class is refused.
	evil := filepath.Join(t.TempDir(), "evil.pth")
	// A legacy torch.save file: the magic number, protocol version 1001 and
	// an empty sys_info, each a protocol-2 pickle, then the payload: GLOBAL
	// os.system.
	legacy := "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19." + "\x80\x02M\xe9\x03." + "\x80\x02}."
	require.NoError(t, os.WriteFile(evil, []byte(legacy+"\x80\x02cos\nsystem\nq\x00."), 0o644))
	_, err = models.Resolve(evil, cache)
	require.ErrorIs(t, err, models.ErrUnsafePickle)
	assert.ErrorContains(t, err, "os.system")

	// A conversion is found by the file's size and time: a changed file is
	// converted again, an unchanged one is not.
	moved := filepath.Join(t.TempDir(), "model.pth")
	b, err := os.ReadFile(src)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(moved, b, 0o644))
	first, err := models.Resolve(moved, cache)
	require.NoError(t, err)
	unchanged, err := models.Resolve(moved, cache)
	require.NoError(t, err)
	assert.Equal(t, first, unchanged)
	later := time.Now().Add(time.Hour)
	require.NoError(t, os.Chtimes(moved, later, later))
	changed, err := models.Resolve(moved, cache)
	require.NoError(t, err)
	assert.NotEqual(t, first, changed)
	assert.FileExists(t, changed)

	garbage := filepath.Join(t.TempDir(), "garbage.pth")
	require.NoError(t, os.WriteFile(garbage, []byte("not a pickle"), 0o644))
	_, err = models.Resolve(garbage, cache)
	require.ErrorIs(t, err, models.ErrBadCheckpoint)
}
