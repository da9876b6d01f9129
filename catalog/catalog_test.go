package catalog_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/catalog"
	"github.com/stepwise-sd/stepwise/internal/testenv"
)

// modelsFolder holds the tiny fixtures as a user keeps checkpoints: a
// diffusers folder, an inpainting folder in a subfolder, a single file with
// its yaml.
func modelsFolder(t *testing.T) string {
	fx := testenv.Fixtures(t)
	dir := t.TempDir()
	testenv.CopyTree(t, filepath.Join(fx, "sd", "tiny-sd15"), filepath.Join(dir, "tiny-sd15"))
	testenv.CopyTree(t, filepath.Join(fx, "sd", "tiny-inpaint"), filepath.Join(dir, "inpaint", "tiny-inpaint"))
	testenv.CopyTree(t, filepath.Join(fx, "sd", "tiny-sd15.safetensors"), filepath.Join(dir, "single.safetensors"))
	testenv.CopyTree(t, filepath.Join(fx, "sd", "tiny-sd15.yaml"), filepath.Join(dir, "single.yaml"))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("not a model"), 0o644))
	testenv.CopyTree(t, filepath.Join(fx, "seg", "seg-unet-w8", "model.safetensors"), filepath.Join(dir, "seg", "unet.safetensors"))
	return dir
}

func sha256sum(t *testing.T, path string) string {
	out, err := exec.Command("sha256sum", path).Output()
	require.NoError(t, err)
	return strings.Fields(string(out))[0]
}

func TestListsEveryModelWithArchitectureAndHashes(t *testing.T) {
	dir := modelsFolder(t)
	c, err := catalog.Open(dir, t.TempDir())
	require.NoError(t, err)
	names := []string{}
	for _, e := range c.List(catalog.KindCheckpoint) {
		names = append(names, e.Name)
	}
	require.Equal(t, []string{"inpaint/tiny-inpaint", "single", "tiny-sd15"}, names)
	segs := c.List(catalog.KindSeg)
	require.Len(t, segs, 1, "the segmentation U-Net is listed as one, not as a checkpoint")

	single, err := c.Find(catalog.KindCheckpoint, "single")
	require.NoError(t, err)
	assert.Equal(t, "safetensors", single.Format)
	assert.Equal(t, "sd1", single.Arch)
	assert.False(t, single.Inpaint)
	assert.False(t, single.VPred)
	sum := sha256sum(t, filepath.Join(dir, "single.safetensors"))
	assert.Equal(t, sum, single.SHA256)
	assert.Equal(t, sum[:10], single.Hash)
	assert.Equal(t, "single.safetensors ["+sum[:10]+"]", single.Title)

	inp, err := c.Find(catalog.KindCheckpoint, "inpaint/tiny-inpaint")
	require.NoError(t, err)
	assert.Equal(t, "diffusers", inp.Format)
	assert.True(t, inp.Inpaint)
	folder, err := c.Find(catalog.KindCheckpoint, "tiny-sd15")
	require.NoError(t, err)
	assert.False(t, folder.Inpaint)
	assert.Len(t, folder.SHA256, 64)
	assert.NotEqual(t, folder.SHA256, inp.SHA256)
	assert.Greater(t, folder.Bytes, int64(1<<20))

	// Every way A1111 clients name a checkpoint finds it.
	for _, name := range []string{"single", "single.safetensors", single.Title, single.Hash, single.SHA256, single.Path} {
		e, err := c.Find(catalog.KindCheckpoint, name)
		require.NoError(t, err, name)
		assert.Equal(t, single.Path, e.Path, name)
	}
	_, err = c.Find(catalog.KindCheckpoint, "sd-v1-5")
	require.ErrorIs(t, err, catalog.ErrUnknownModel)
	assert.Contains(t, err.Error(), "inpaint/tiny-inpaint, single, tiny-sd15")
}

func TestAVPredictionYamlAndAStandaloneVAE(t *testing.T) {
	dir := modelsFolder(t)
	y, err := os.ReadFile(filepath.Join(dir, "single.yaml"))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "single.yaml"),
		append([]byte("model:\n  params:\n    parameterization: \"v\"\n"), y...), 0o644))
	// A VAE file: the decoder's keys alone (LDM layout, as vae-ft-mse files are).
	vae := filepath.Join(dir, "VAE", "my-vae.safetensors")
	require.NoError(t, os.MkdirAll(filepath.Dir(vae), 0o755))
	header := `{"decoder.conv_in.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},` +
		`"encoder.conv_in.weight":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`
	b := make([]byte, 8, 8+len(header)+8)
	b[0] = byte(len(header))
	b = append(append(b, header...), make([]byte, 8)...)
	require.NoError(t, os.WriteFile(vae, b, 0o644))
	c, err := catalog.Open(dir, "")
	require.NoError(t, err)
	single, err := c.Find(catalog.KindCheckpoint, "single")
	require.NoError(t, err)
	assert.True(t, single.VPred)
	v, err := c.Find(catalog.KindVAE, "my-vae")
	require.NoError(t, err)
	assert.Equal(t, "VAE/my-vae", v.Name)
	_, err = c.Find(catalog.KindCheckpoint, "my-vae")
	assert.ErrorIs(t, err, catalog.ErrUnknownModel, "a VAE is not a checkpoint")
	assert.Len(t, c.List(catalog.KindCheckpoint), 3)
}

// Hashes are computed once and kept by size + mtime: a second catalog reads
// them from the cache, and a changed file is hashed again.
func TestHashesAreCachedBySizeAndModTime(t *testing.T) {
	dir := modelsFolder(t)
	cache := t.TempDir()
	_, err := catalog.Open(dir, cache)
	require.NoError(t, err)
	path := filepath.Join(dir, "single.safetensors")
	// Plant a marker in the cache: if it is read back, the file was not rehashed.
	file := filepath.Join(cache, "model-hashes.json")
	var recs map[string]map[string]json.RawMessage
	b, err := os.ReadFile(file)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &recs))
	require.Contains(t, recs, path)
	recs[path]["sha256"] = json.RawMessage(`"` + strings.Repeat("ab", 32) + `"`)
	b, _ = json.Marshal(recs)
	require.NoError(t, os.WriteFile(file, b, 0o644))

	c, err := catalog.Open(dir, cache)
	require.NoError(t, err)
	e, err := c.Find(catalog.KindCheckpoint, "single")
	require.NoError(t, err)
	assert.Equal(t, strings.Repeat("ab", 32), e.SHA256, "the cached hash is used while size and mtime hold")

	later := time.Now().Add(time.Minute)
	require.NoError(t, os.Chtimes(path, later, later))
	require.NoError(t, c.Refresh())
	e, err = c.Find(catalog.KindCheckpoint, "single")
	require.NoError(t, err)
	assert.Equal(t, sha256sum(t, path), e.SHA256, "a touched file is hashed again")
}

func TestRefreshFindsNewFiles(t *testing.T) {
	dir := modelsFolder(t)
	c, err := catalog.Open(dir, "")
	require.NoError(t, err)
	_, err = c.Find(catalog.KindCheckpoint, "later")
	require.ErrorIs(t, err, catalog.ErrUnknownModel)
	testenv.CopyTree(t, filepath.Join(dir, "single.safetensors"), filepath.Join(dir, "later.safetensors"))
	require.NoError(t, c.Refresh())
	e, err := c.Find(catalog.KindCheckpoint, "later")
	require.NoError(t, err)
	assert.Equal(t, "sd1", e.Arch)
}

func TestMain(m *testing.M) { os.Exit(m.Run()) }
