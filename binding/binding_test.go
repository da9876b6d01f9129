package binding_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ebitengine/purego"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func TestLoadReportsVersionsAndDevices(t *testing.T) {
	lib := testenv.Library(t)
	v := lib.Version()
	assert.Equal(t, int32(binding.ABIVersion), v.ABI)
	assert.NotEmpty(t, v.Stepwise)
	assert.Regexp(t, `^\d+\.\d+`, v.Torch)
	assert.Contains(t, v.Build, "libtorch")

	devices, err := lib.Devices()
	require.NoError(t, err)
	require.NotEmpty(t, devices)
	assert.Equal(t, "cpu", devices[0].ID)
	assert.Equal(t, binding.CPU, devices[0].Kind)
	assert.Greater(t, devices[0].TotalMemory, int64(0))
	assert.Equal(t, "cpu", lib.Device().ID)
}

// A CUDA libtorch's own late-loaded libraries need libtorch in the global
// scope (library.go): the engine's symbols, and so its dependencies', are
// visible to a lookup that names no library.
func TestLoadMakesTheEngineGlobal(t *testing.T) {
	testenv.Library(t)
	sym, err := purego.Dlsym(purego.RTLD_DEFAULT, "sw_abi_version")
	require.NoError(t, err, "the engine was loaded RTLD_LOCAL")
	assert.NotZero(t, sym)
}

func TestSelectDevice(t *testing.T) {
	cpu := binding.Device{Kind: binding.CPU, ID: "cpu"}
	cuda0 := binding.Device{Kind: binding.CUDA, ID: "cuda:0"}
	cuda1 := binding.Device{Kind: binding.CUDA, Index: 1, ID: "cuda:1"}
	mps := binding.Device{Kind: binding.MPS, ID: "mps"}
	tests := []struct {
		name    string
		devices []binding.Device
		want    string
		got     string
		err     string
	}{
		{"auto on cpu only", []binding.Device{cpu}, "", "cpu", ""},
		{"auto prefers cuda", []binding.Device{cpu, cuda0, cuda1}, "auto", "cuda:0", ""},
		{"auto prefers mps over cpu", []binding.Device{cpu, mps}, "", "mps", ""},
		{"cuda means cuda:0", []binding.Device{cpu, cuda0}, "cuda", "cuda:0", ""},
		{"explicit index", []binding.Device{cpu, cuda0, cuda1}, "cuda:1", "cuda:1", ""},
		{"override to cpu", []binding.Device{cpu, cuda0}, "CPU", "cpu", ""},
		{"missing cuda", []binding.Device{cpu}, "cuda", "", `"cuda:0": not present (available: cpu)`},
		{"nonsense", []binding.Device{cpu}, "tpu", "", `"tpu": not present`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := binding.SelectDevice(tt.devices, tt.want)
			if tt.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.got, d.ID)
		})
	}
}

func TestDeviceFromEnvironment(t *testing.T) {
	t.Setenv("STEPWISE_DEVICE", "cuda:7")
	_, err := binding.Load(binding.Options{Path: testenv.LibPath()})
	require.Error(t, err)
	assert.Contains(t, err.Error(), `"cuda:7": not present`)

	t.Setenv("STEPWISE_DEVICE", "cpu")
	lib, err := binding.Load(binding.Options{Path: testenv.LibPath()})
	require.NoError(t, err)
	assert.Equal(t, "cpu", lib.Device().ID)
}

func TestLoadErrorListsEveryPlaceTried(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nowhere", binding.LibraryName)
	t.Setenv("STEPWISE_LIB", missing)
	notALib := filepath.Join(t.TempDir(), "libstepwise.so")
	require.NoError(t, os.WriteFile(notALib, []byte("not an ELF file"), 0o644))

	_, err := binding.Load(binding.Options{Path: notALib})
	require.Error(t, err)
	assert.Contains(t, err.Error(), notALib)

	// The search order, when no explicit path is given, starts at $STEPWISE_LIB.
	cands := binding.Candidates()
	require.GreaterOrEqual(t, len(cands), 3)
	assert.Equal(t, missing, cands[0])
	assert.Equal(t, binding.LibraryName, cands[len(cands)-1])

	// A fresh process, where no stepwise library is loaded yet, run from a
	// folder with no build/ in it, must list every candidate.
	cmd := exec.Command(os.Args[0], "-test.run", "^TestLoadHelper$", "-test.v")
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "STEPWISE_LOAD_HELPER=1", "STEPWISE_LIB="+missing)
	out, _ := cmd.CombinedOutput()
	text := string(out)
	assert.Contains(t, text, "no usable library found")
	assert.Contains(t, text, missing+": no such file")
	assert.Contains(t, text, filepath.Join(cmd.Dir, "build", binding.LibraryName)+": no such file")
	assert.Contains(t, text, binding.LibraryName+" (system library path): ")
}

// TestLoadHelper runs only inside TestLoadErrorListsEveryPlaceTried's child process.
func TestLoadHelper(t *testing.T) {
	if os.Getenv("STEPWISE_LOAD_HELPER") != "1" {
		t.Skip("helper process only")
	}
	_, err := binding.Load(binding.Options{})
	require.Error(t, err)
	t.Log(err.Error())
}

func TestABIMismatchIsRefused(t *testing.T) {
	cc, err := exec.LookPath("cc")
	if err != nil {
		cc, err = exec.LookPath("gcc")
	}
	require.NoError(t, err, "a C compiler builds the mismatching library")
	dir := t.TempDir()
	src := filepath.Join(dir, "old.c")
	lib := filepath.Join(dir, "libstepwise.so")
	require.NoError(t, os.WriteFile(src, []byte("int sw_abi_version(void) { return 999; }\n"), 0o644))
	out, err := exec.Command(cc, "-shared", "-fPIC", "-o", lib, src).CombinedOutput()
	require.NoError(t, err, string(out))

	_, err = binding.Load(binding.Options{Path: lib})
	require.Error(t, err)
	var mismatch *binding.ABIMismatchError
	require.ErrorAs(t, err, &mismatch)
	assert.Equal(t, int32(999), mismatch.Library)
	assert.Equal(t, int32(binding.ABIVersion), mismatch.Want)
	assert.Contains(t, err.Error(), "ABI version 999")
	assert.Contains(t, err.Error(), fmt.Sprintf("needs ABI version %d", binding.ABIVersion))
}

func TestParseDType(t *testing.T) {
	for in, want := range map[string]binding.DType{"": binding.DTypeAuto, "auto": binding.DTypeAuto, "f32": binding.F32,
		"float32": binding.F32, "fp16": binding.F16, "F16": binding.F16, "bf16": binding.BF16, "bfloat16": binding.BF16, "int8": binding.INT8, "INT8": binding.INT8} {
		got, err := binding.ParseDType(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	assert.Equal(t, "int8", binding.INT8.String())
	_, err := binding.ParseDType("int4")
	require.Error(t, err)
	assert.Contains(t, err.Error(), `unknown dtype "int4"`)
}

func TestErrorsMatchTheirStatus(t *testing.T) {
	lib := testenv.Library(t)
	_, err := lib.OpenSD(binding.SDOptions{Path: filepath.Join(t.TempDir(), "missing")})
	require.Error(t, err)
	assert.ErrorIs(t, err, binding.ErrNotFound)
	var be *binding.Error
	require.ErrorAs(t, err, &be)
	assert.Equal(t, binding.StatusNotFound, be.Status)
	assert.True(t, strings.HasPrefix(err.Error(), "open model "))
}
