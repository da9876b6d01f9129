package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
)

func runCLI(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestVersion(t *testing.T) {
	code, out, errOut := runCLI("version", "--lib", testenv.LibPath(), "--device", "cpu")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "engine   ")
	assert.Contains(t, out, fmt.Sprintf("(ABI %d)", binding.ABIVersion))
	assert.Contains(t, out, "libtorch ")
	assert.Contains(t, out, "* cpu")
	assert.Regexp(t, `(?m)^   libtorch +available$`, out, "version lists the backends")
	assert.Regexp(t, `(?m)^   sdcpp +(available \(.+libstable-diffusion\.so\)|unavailable: .+)$`, out, "with the build it found")

	code, out, errOut = runCLI("version", "--json", "--lib", testenv.LibPath())
	require.Equal(t, 0, code, errOut)
	var v map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	assert.EqualValues(t, binding.ABIVersion, v["abi"])
	assert.EqualValues(t, binding.ABIVersion, v["abi_expected"])
	assert.NotEmpty(t, v["devices"])
	require.Len(t, v["backends"], 2)
	assert.Equal(t, "libtorch", v["backends"].([]any)[0].(map[string]any)["backend"])
}

func TestHelpAndCompletion(t *testing.T) {
	code, out, errOut := runCLI("--help")
	require.Equal(t, exitOK, code, errOut)
	for _, name := range []string{"serve", "generate", "segment", "edit", "bench", "models", "version", "completion"} {
		assert.Contains(t, out, "\n  "+name+" ", "the root's help lists %s", name)
	}
	code, out, _ = runCLI("generate", "-h")
	require.Equal(t, exitOK, code)
	assert.Contains(t, out, "--cfg-scale float32")
	assert.Contains(t, out, `(default "euler_a")`)

	code, out, errOut = runCLI("completion", "bash")
	require.Equal(t, exitOK, code, errOut)
	assert.Contains(t, out, "__start_stepwise")
	// Flag values complete from the engine's own lists.
	code, out, _ = runCLI("__complete", "generate", "--sampler", "dpm")
	require.Equal(t, exitOK, code)
	assert.Contains(t, out, "dpmpp_2m_karras")
	for _, cmd := range []string{"generate", "edit", "serve"} {
		code, out, _ = runCLI("__complete", cmd, "--backend", "")
		require.Equal(t, exitOK, code)
		assert.Contains(t, out, "libtorch\nsdcpp\n", "%s --backend", cmd)
	}
}

func TestModelsMakeTinyThenList(t *testing.T) {
	dir := t.TempDir()
	code, out, errOut := runCLI("models", "make-tiny", "--lib", testenv.LibPath(), dir)
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, filepath.Join(dir, "tiny-sd"))

	code, out, errOut = runCLI("models", "ls", "--json", dir)
	require.Equal(t, 0, code, errOut)
	var found []map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &found))
	require.Len(t, found, 2)
	assert.Equal(t, "sd", found[0]["kind"])
	assert.Equal(t, "seg", found[1]["kind"])
}

func TestBadInvocations(t *testing.T) {
	tests := []struct {
		args []string
		code int
		want string
	}{
		{nil, exitUsage, "stepwise: a command is needed"},
		{[]string{"frobnicate"}, exitUsage, `stepwise: unknown command "frobnicate" for "stepwise"`},
		{[]string{"models"}, exitUsage, "stepwise models: a command is needed"},
		{[]string{"models", "rm"}, exitUsage, `stepwise models: unknown command "rm" for "stepwise models"`},
		{[]string{"models", "make-tiny"}, exitUsage, "stepwise models make-tiny: accepts 1 arg(s), received 0"},
		{[]string{"models", "convert"}, exitUsage, "stepwise models convert: accepts between 1 and 2 arg(s), received 0"},
		{[]string{"models", "ls", "/nonexistent/models"}, exitError, "no such file"},
		{[]string{"version", "--lib", "/nonexistent/libstepwise.so"}, exitError, "/nonexistent/libstepwise.so: no such file"},
		{[]string{"version", "--lib", testenv.LibPath(), "--device", "cuda:9"}, exitError, "not present"},
		{[]string{"version", "--bogus"}, exitUsage, "stepwise version: unknown flag: --bogus"},
		// An address it cannot listen on: were the flag ignored, serve would fail there, not serve.
		{[]string{"serve", "--lib", testenv.LibPath(), "--addr", "256.0.0.1:0", "--backend", "nope"}, exitError, `unknown backend "nope"`},
	}
	for _, tt := range tests {
		code, _, errOut := runCLI(tt.args...)
		assert.Equal(t, tt.code, code, "%v", tt.args)
		assert.Contains(t, errOut, tt.want, "%v", tt.args)
	}
}

func TestBenchOnTheTinyModel(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	code, out, errOut := runCLI("bench", "--lib", testenv.LibPath(), "--model", sdDir, "--sizes", "64", "--steps", "2", "--json")
	require.Equal(t, exitOK, code, errOut)
	var row map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &row))
	assert.Equal(t, sdDir, row["model"])
	assert.EqualValues(t, 64, row["size"])
	assert.EqualValues(t, 2, row["steps"])
	assert.Equal(t, "f32", row["dtype"])
	assert.Equal(t, true, row["cfg"], "the default CFG scale guides")

	code, _, errOut = runCLI("bench", "--lib", testenv.LibPath(), "--model", sdDir, "--steps", "1")
	assert.Equal(t, exitError, code)
	assert.Contains(t, errOut, "stepwise bench: --steps must be at least 2")
}

func TestServeReportsAnAddressItCannotListenOn(t *testing.T) {
	dir := t.TempDir()
	code, _, errOut := runCLI("serve", "--lib", testenv.LibPath(), "--data", dir, "--addr", "256.0.0.1:0",
		"--allow-origin", "http://a.example, http://b.example")
	assert.Equal(t, exitError, code)
	assert.Contains(t, errOut, "stepwise serve: listen tcp: ")
	assert.FileExists(t, filepath.Join(dir, "models", "tiny-seg.safetensors"), "the demo models were made first")
}
