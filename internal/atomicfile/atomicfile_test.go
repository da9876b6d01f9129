package atomicfile_test

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/internal/atomicfile"
)

// names lists a folder's entries.
func names(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func TestWriteFileCreatesAndReplaces(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a", "b", "out.bin")
	require.NoError(t, atomicfile.WriteFile(path, []byte("first"), 0o600))
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "first", string(b))
	info, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), info.Mode().Perm())

	require.NoError(t, atomicfile.WriteFile(path, []byte("second, longer"), 0o644))
	b, err = os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "second, longer", string(b))
	info, err = os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o644), info.Mode().Perm())
	assert.Equal(t, []string{"out.bin"}, names(t, filepath.Dir(path)), "no temporary file left")
}

// A rename that fails (the target is a non-empty folder) leaves the target
// as it was and no temporary file.
func TestWriteFileFailedRenameLeavesNoTemp(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "out")
	require.NoError(t, os.MkdirAll(filepath.Join(target, "keep"), 0o755))
	err := atomicfile.WriteFile(target, []byte("data"), 0o644)
	require.Error(t, err)
	assert.Equal(t, []string{"out"}, names(t, dir))
	assert.Equal(t, []string{"keep"}, names(t, target))
}

// A write that fails part-way (the file-size limit stands in for a full
// disk) leaves the old file whole and no temporary file.
func TestWriteFileFailedWriteKeepsTheOldFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "out.bin")
	require.NoError(t, atomicfile.WriteFile(path, []byte("old content"), 0o644))

	var old syscall.Rlimit
	require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_FSIZE, &old))
	lim := old
	lim.Cur = 4096
	require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim))
	err := atomicfile.WriteFile(path, make([]byte, 1<<20), 0o644)
	require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_FSIZE, &old))
	require.Error(t, err)

	b, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "old content", string(b))
	assert.Equal(t, []string{"out.bin"}, names(t, dir))
}
