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

	code, out, errOut = runCLI("version", "--json", "--lib", testenv.LibPath())
	require.Equal(t, 0, code, errOut)
	var v map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	assert.EqualValues(t, binding.ABIVersion, v["abi"])
	assert.NotEmpty(t, v["devices"])
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
		{nil, 2, "usage: stepwise"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"models"}, 1, "usage: stepwise models"},
		{[]string{"models", "rm"}, 1, `unknown subcommand "rm"`},
		{[]string{"models", "make-tiny"}, 1, "usage: stepwise models make-tiny DIR"},
		{[]string{"models", "ls", "/nonexistent/models"}, 1, "no such file"},
		{[]string{"version", "--lib", "/nonexistent/libstepwise.so"}, 1, "/nonexistent/libstepwise.so: no such file"},
		{[]string{"version", "--lib", testenv.LibPath(), "--device", "cuda:9"}, 1, "not present"},
		{[]string{"version", "--bogus"}, 1, "flag provided but not defined"},
	}
	for _, tt := range tests {
		code, _, errOut := runCLI(tt.args...)
		assert.Equal(t, tt.code, code, "%v", tt.args)
		assert.Contains(t, errOut, tt.want, "%v", tt.args)
	}
}
