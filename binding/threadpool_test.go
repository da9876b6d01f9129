package binding_test

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/ebitengine/purego"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
)

// The thread pools read their settings from the C environment when the engine
// library loads, so each case is a fresh process.
func TestLoadGivesTheThreadPoolsShortSpins(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  []string
		want map[string]string
	}{
		{"unset", nil, map[string]string{"GOMP_SPINCOUNT": "10000", "OPENBLAS_THREAD_TIMEOUT": "4"}},
		{"the user's value stays", []string{"GOMP_SPINCOUNT=123"},
			map[string]string{"GOMP_SPINCOUNT": "123", "OPENBLAS_THREAD_TIMEOUT": "4"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run", "^TestThreadPoolEnvHelper$", "-test.v")
			for _, kv := range os.Environ() {
				if !strings.HasPrefix(kv, "GOMP_SPINCOUNT=") && !strings.HasPrefix(kv, "OPENBLAS_THREAD_TIMEOUT=") {
					cmd.Env = append(cmd.Env, kv)
				}
			}
			cmd.Env = append(cmd.Env, "STEPWISE_THREADPOOL_HELPER=1")
			cmd.Env = append(cmd.Env, tc.env...)
			out, err := cmd.CombinedOutput()
			require.NoError(t, err, "%s", out)
			for name, value := range tc.want {
				assert.Contains(t, string(out), fmt.Sprintf("libc %s=%q\n", name, value))
			}
		})
	}
}

// TestThreadPoolEnvHelper runs only inside TestLoadGivesTheThreadPoolsShortSpins's
// child processes: it loads the engine and prints what the C library's getenv
// — the one libgomp and OpenBLAS call — returns.
func TestThreadPoolEnvHelper(t *testing.T) {
	if os.Getenv("STEPWISE_THREADPOOL_HELPER") != "1" {
		t.Skip("helper process only")
	}
	_, err := binding.Load(binding.Options{Path: testenv.LibPath(), Device: "cpu"})
	require.NoError(t, err)
	libc, err := purego.Dlopen("libc.so.6", purego.RTLD_NOW|purego.RTLD_GLOBAL)
	require.NoError(t, err)
	var getenv func(string) string
	purego.RegisterLibFunc(&getenv, libc, "getenv")
	for _, name := range []string{"GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT"} {
		fmt.Printf("libc %s=%q\n", name, getenv(name))
	}
}
