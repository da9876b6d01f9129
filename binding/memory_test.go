package binding_test

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/models"
)

// procStatus reads a "Vm…: N kB" line of /proc/self/status, in bytes.
func procStatus(t *testing.T, key string) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	require.NoError(t, err)
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), key+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			require.NoError(t, err)
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/self/status", key)
	return 0
}

// Loading a model holds its weights once: the file's pages are given back as
// each tensor is copied out, so the peak while loading is the weights plus
// about one tensor, not the weights plus the mapped file.
func TestLoadingHoldsTheWeightsOnce(t *testing.T) {
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		t.Skipf("cannot reset the peak RSS here (%v)", err)
	}
	lib := testenv.Library(t)
	arch := models.TinyArch()
	// SD 1.5's text encoder: 123 M parameters, ~470 MiB in the float32 file.
	// Opened in bfloat16 every tensor is converted out of the mapping (in
	// float32 most are used from it) except the token table, which stays in
	// the file: ~160 MiB of weights held.
	arch.TextEncoder = models.SD15Arch().TextEncoder
	arch.UNet["cross_attention_dim"] = 768
	dir := filepath.Join(t.TempDir(), "sd")
	require.NoError(t, models.MakeRandomSD(lib, dir, arch, 3))

	before := procStatus(t, "VmRSS")
	require.NoError(t, os.WriteFile("/proc/self/clear_refs", []byte("5"), 0))
	m, err := lib.OpenSD(binding.SDOptions{Path: dir, DType: binding.BF16})
	require.NoError(t, err)
	defer m.Close()
	peak := procStatus(t, "VmHWM")
	weights := m.Info().WeightBytes
	require.Greater(t, weights, int64(150<<20))
	grew := peak - before
	t.Logf("weights %d MiB, peak grew %d MiB while loading", weights>>20, grew>>20)
	require.Less(t, grew, weights+weights/4+(64<<20), "the mapped file and the weights were resident together")
}
