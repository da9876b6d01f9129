package regfile_test

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/internal/regfile"
)

// hangGuard is how long a call may take before the test calls it a hang: far
// above any real time, only there so that a blocked open fails the test
// instead of stalling the run.
const hangGuard = 30 * time.Second

// returns runs fn in a goroutine and fails the test if it does not return
// within hangGuard.
func returns(t *testing.T, fn func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err
	case <-time.After(hangGuard):
		t.Fatalf("did not return within %s: it blocks", hangGuard)
		return nil
	}
}

func specialFiles(t *testing.T) map[string]string {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "weights.safetensors")
	require.NoError(t, syscall.Mkfifo(fifo, 0o644))
	sock := filepath.Join(dir, "s.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	link := filepath.Join(dir, "link.pth")
	require.NoError(t, os.Symlink(fifo, link))
	return map[string]string{
		"fifo":              fifo,
		"symlink to a fifo": link,
		"socket":            sock,
		"directory":         dir,
		"character device":  "/dev/zero",
	}
}

func TestOpenRefusesSpecialFilesAtOnce(t *testing.T) {
	for name, path := range specialFiles(t) {
		t.Run(name, func(t *testing.T) {
			err := returns(t, func() error {
				f, _, err := regfile.Open(path)
				if err == nil {
					f.Close()
				}
				return err
			})
			require.ErrorIs(t, err, regfile.ErrNotRegular)
			err = returns(t, func() error { _, err := regfile.ReadFile(path, 0); return err })
			require.ErrorIs(t, err, regfile.ErrNotRegular)
			_, err = regfile.Check(path)
			require.ErrorIs(t, err, regfile.ErrNotRegular)
		})
	}
}

func TestReadFileReadsRegularFilesWithinTheLimit(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.bin")
	require.NoError(t, os.WriteFile(p, []byte("0123456789"), 0o644))
	link := filepath.Join(dir, "link.bin")
	require.NoError(t, os.Symlink(p, link))

	for _, path := range []string{p, link} {
		b, err := regfile.ReadFile(path, 10)
		require.NoError(t, err)
		assert.Equal(t, "0123456789", string(b))
		b, err = regfile.ReadFile(path, 0)
		require.NoError(t, err)
		assert.Equal(t, "0123456789", string(b))
	}
	_, err := regfile.ReadFile(p, 9)
	require.ErrorIs(t, err, regfile.ErrTooLarge)

	_, err = regfile.ReadFile(filepath.Join(dir, "missing"), 0)
	require.ErrorIs(t, err, os.ErrNotExist)
}
