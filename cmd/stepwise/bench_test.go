package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/internal/testenv"
)

// runAsMainEnv makes this test binary act as the stepwise binary: bench
// re-executes os.Executable() — here the test binary — once per dtype.
const runAsMainEnv = "STEPWISE_TEST_RUN_AS_MAIN"

// init runs before testing's flag parsing, which would reject bench's flags.
func init() {
	if os.Getenv(runAsMainEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	// The test process itself: its children (and only they) run as main.
	_ = os.Setenv(runAsMainEnv, "1")
}

// benchRows reads bench --json's output: one row per line.
func benchRows(t *testing.T, out string) []benchRow {
	t.Helper()
	var rows []benchRow
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var r benchRow
		require.NoError(t, json.Unmarshal([]byte(line), &r), line)
		rows = append(rows, r)
	}
	return rows
}

func TestBenchMeasuresEachDTypeInItsOwnProcess(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	args := []string{"bench", "--lib", testenv.LibPath(), "--device", "cpu", "--model", sdDir, "--sizes", "64", "--steps", "2", "--threads", "1"}

	code, out, errOut := runCLI(append(args, "--dtypes", "f32,bf16", "--json")...)
	require.Equal(t, exitOK, code, errOut)
	rows := benchRows(t, out)
	require.Len(t, rows, 2)
	assert.Equal(t, "f32", rows[0].DType)
	assert.Equal(t, "bf16", rows[1].DType)
	for _, r := range rows {
		assert.Equal(t, sdDir, r.Model, "the flags reach the child")
		assert.Equal(t, 64, r.Size)
		assert.Equal(t, 2, r.Steps)
		assert.Equal(t, 1, r.Threads, "the engine's thread count, as --threads set it")
		assert.Positive(t, r.PeakRSS, "%s has its own peak RSS", r.DType)
		assert.NotZero(t, r.PID)
		assert.NotEqual(t, os.Getpid(), r.PID, "%s is measured in a child, not in bench's process", r.DType)
	}
	assert.NotEqual(t, rows[0].PID, rows[1].PID, "one process per dtype")

	// The table, from a child too.
	code, out, errOut = runCLI(args...)
	require.Equal(t, exitOK, code, errOut)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 2, out)
	assert.Contains(t, lines[0], "PEAK RSS")
	assert.Contains(t, lines[1], " f32 ")
	assert.Contains(t, lines[1], "64²")
	assert.Contains(t, lines[1], "MiB", "a peak RSS in the row")
	assert.Contains(t, errOut, " f32 64x64: ", "progress on stderr")

	// A child that fails fails bench, with the child's own message.
	code, _, errOut = runCLI("bench", "--lib", testenv.LibPath(), "--device", "cpu", "--model", filepath.Join(t.TempDir(), "none"),
		"--sizes", "64", "--steps", "2")
	assert.Equal(t, exitError, code)
	assert.Contains(t, errOut, "open model", "the child's own message")
	assert.Contains(t, errOut, "stepwise bench: bench process for f32: exit status 1")
}

// Bench JSON lines as 201b204 printed them, and as bench prints them now
// (with a pid, and a VAE encode time a later bench may add).
const (
	oldF32 = `{"model":"m","device":"cpu","dtype":"f32","size":256,"steps":4,"cfg":true,"load_seconds":10,"text_seconds":1,"step_seconds":5,"step_seconds_min":4.9,"vae_decode_seconds":4,"peak_rss_bytes":7516192768,"threads":2,"preview":"none"}`
	oldBF  = `{"model":"m","device":"cpu","dtype":"bf16","size":256,"steps":4,"cfg":true,"load_seconds":2,"text_seconds":1,"step_seconds":1.5,"step_seconds_min":1.4,"vae_decode_seconds":2.5,"peak_rss_bytes":5368709120,"threads":2,"preview":"none"}`
	newF32 = `{"model":"m","device":"cpu","dtype":"f32","size":256,"steps":4,"cfg":true,"load_seconds":5,"text_seconds":0.5,"step_seconds":3,"step_seconds_min":2.9,"vae_decode_seconds":2,"peak_rss_bytes":3758096384,"threads":2,"preview":"none","pid":41}`
	newBF  = `{"model":"m","device":"cpu","dtype":"bf16","size":256,"steps":4,"cfg":true,"load_seconds":2,"text_seconds":1,"step_seconds":0.75,"step_seconds_min":0.7,"vae_decode_seconds":2.5,"vae_encode_seconds":1,"peak_rss_bytes":2684354560,"threads":2,"preview":"none","pid":42}`
	newBFE = `{"model":"m","device":"cpu","dtype":"bf16","size":256,"steps":4,"cfg":true,"load_seconds":2,"text_seconds":1,"step_seconds":0.75,"step_seconds_min":0.7,"vae_decode_seconds":2.5,"vae_encode_seconds":0.5,"peak_rss_bytes":2684354560,"threads":2,"preview":"none","pid":43}`
)

func TestBenchCompare(t *testing.T) {
	tests := []struct {
		name      string
		base, cur string
		want      []string // lines or parts of lines, in order
		notWant   []string
	}{
		{
			name: "old baseline, new current",
			base: oldF32 + "\n" + oldBF + "\n", cur: newBF + "\n" + newF32 + "\n",
			want: []string{
				"DTYPE  SIZE  S/STEP", "LOAD", "TEXT ENCODE", "PEAK RSS",
				"bf16   256²  1.5 s -> 0.75 s (0.50×)  2.5 s -> 2.5 s (1.00×)  2 s -> 2 s (1.00×)",
				"5.0 GiB -> 2.5 GiB (0.50×)",
				"f32    256²  5 s -> 3 s (0.60×)       4 s -> 2 s (0.50×)      10 s -> 5 s (0.50×)  1 s -> 0.5 s (0.50×)  7.0 GiB -> 3.5 GiB (0.50×)",
				"current/baseline",
			},
			notWant: []string{"VAE ENCODE", "not compared"},
		},
		{
			name: "both measured VAE encode",
			base: newBFE, cur: newBF,
			want: []string{"VAE ENCODE", "bf16   256²", "0.5 s -> 1 s (2.00×)"},
		},
		{
			name: "rounds: the median of each side's",
			base: strings.Join([]string{oldF32, strings.Replace(oldF32, `"step_seconds":5`, `"step_seconds":7`, 1),
				strings.Replace(oldF32, `"step_seconds":5`, `"step_seconds":6`, 1)}, "\n"),
			cur: newF32 + "\n" + strings.Replace(newF32, `"step_seconds":3`, `"step_seconds":4`, 1),
			want: []string{"f32    256²  6 s -> 3.5 s (0.58×)", "medians of up to 3 rounds"},
		},
		{
			name: "a size only one measured",
			base: oldF32 + "\n" + oldBF, cur: newF32,
			want: []string{"f32", "(0.60×)", "not compared: bf16 256² (baseline only)"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			base, cur := filepath.Join(dir, "base.json"), filepath.Join(dir, "cur.json")
			require.NoError(t, os.WriteFile(base, []byte(tt.base), 0o644))
			require.NoError(t, os.WriteFile(cur, []byte(tt.cur), 0o644))
			code, out, errOut := runCLI("bench", "compare", base, cur)
			require.Equal(t, exitOK, code, errOut)
			rest := out
			for _, w := range tt.want {
				i := strings.Index(rest, w)
				require.GreaterOrEqual(t, i, 0, "%q in order in:\n%s", w, out)
				rest = rest[i+len(w):]
			}
			for _, w := range tt.notWant {
				assert.NotContains(t, out, w)
			}
		})
	}
}

func TestBenchCompareErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(text), 0o644))
		return p
	}
	otherSteps := strings.Replace(newF32, `"steps":4`, `"steps":3`, 1)
	tests := []struct {
		name      string
		base, cur string
		check     func(t *testing.T, err error)
	}{
		{"different steps", oldF32, otherSteps, func(t *testing.T, err error) {
			var m *benchMismatchError
			require.ErrorAs(t, err, &m)
			assert.Equal(t, "steps", m.Field)
			assert.Equal(t, "4", m.Base)
			assert.Equal(t, "3", m.Curr)
		}},
		{"nothing in common", oldF32, newBF, func(t *testing.T, err error) {
			assert.ErrorIs(t, err, errNoCommonRows)
		}},
		{"rounds of other work", oldF32 + "\n" + strings.Replace(oldF32, `"threads":2`, `"threads":4`, 1), newF32, func(t *testing.T, err error) {
			var f *benchFileError
			require.ErrorAs(t, err, &f)
			assert.Equal(t, 2, f.Line)
			var m *benchMismatchError
			require.ErrorAs(t, err, &m)
			assert.True(t, m.Rounds)
			assert.Equal(t, "threads", m.Field)
			assert.Contains(t, err.Error(), "the rounds differ in threads (first 2, this one 4)")
		}},
		{"not JSON", "size 256: 5 s/step", newF32, func(t *testing.T, err error) {
			var f *benchFileError
			require.ErrorAs(t, err, &f)
			assert.Equal(t, 1, f.Line)
		}},
		{"empty", "\n", newF32, func(t *testing.T, err error) {
			var f *benchFileError
			require.ErrorAs(t, err, &f)
			assert.Equal(t, 0, f.Line)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base, err := readBenchRows(write("base.json", tt.base))
			if err == nil {
				var cur map[compareKey][]compareRow
				cur, err = readBenchRows(write("cur.json", tt.cur))
				require.NoError(t, err)
				err = compareBench(new(strings.Builder), base, cur)
			}
			require.Error(t, err)
			tt.check(t, err)
		})
	}

	// Through the command: an error, and a usage error without two files.
	code, _, errOut := runCLI("bench", "compare", write("a.json", oldF32), write("b.json", otherSteps))
	assert.Equal(t, exitError, code)
	assert.Contains(t, errOut, "f32 256²: the runs differ in steps (baseline 4, current 3)")
	code, _, _ = runCLI("bench", "compare", write("c.json", oldF32))
	assert.Equal(t, exitUsage, code)
}

// TestBenchBackendsAndDTypes: every backend and dtype in its own process, the
// ones a backend cannot run skipped with a note, and each image compared with
// the first row's.
func TestBenchBackendsAndDTypes(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	args := []string{"bench", "--lib", testenv.LibPath(), "--device", "cpu", "--model", sdDir, "--sizes", "64", "--steps", "2",
		"--backends", "libtorch,sdcpp", "--dtypes", "f32,bf16,q8_0"}
	code, out, errOut := runCLI(append(args, "--json")...)
	require.Equal(t, exitOK, code, errOut)
	rows := benchRows(t, out)
	require.Len(t, rows, 6, "libtorch and sdcpp, each with f32, bf16, q8_0")
	pids := map[int]bool{}
	for i, r := range rows {
		assert.Equal(t, []string{"libtorch", "sdcpp"}[i/3], r.Backend, "row %d", i)
		assert.Equal(t, []string{"f32", "bf16", "q8_0"}[i%3], r.DType, "row %d", i)
		pids[r.PID] = true
	}
	assert.Len(t, pids, 6, "one process per backend and dtype")
	assert.Empty(t, rows[0].Skipped)
	assert.Empty(t, rows[0].ImageDiffs, "the first row is the reference")
	assert.Empty(t, rows[1].Skipped)
	require.Len(t, rows[1].ImageDiffs, 1, "the first row of the size is its backend's too")
	d := rows[1].ImageDiffs[0]
	assert.Equal(t, "libtorch f32", d.Vs)
	assert.Positive(t, d.MaxAbsDiff, "bf16 weights change the image a little")
	require.NotNil(t, d.PSNR)
	assert.Greater(t, *d.PSNR, 20.0, "a little")
	assert.NotEmpty(t, rows[2].Skipped, "libtorch has no q8_0")
	// The tiny model is not one stable-diffusion.cpp loads (and a library
	// without the backend cannot run it at all): skipped either way.
	for _, r := range rows[3:] {
		assert.NotEmpty(t, r.Skipped, "sdcpp %s", r.DType)
	}

	code, out, errOut = runCLI(args...)
	require.Equal(t, exitOK, code, errOut)
	assert.Contains(t, out, "IMAGE (MAX |Δ|, PSNR)")
	assert.Regexp(t, `(?m)^skipped libtorch q8_0: .*sdcpp backend only`, out)
	assert.Regexp(t, `(?m)^skipped sdcpp bf16: `, out)
	assert.Regexp(t, ` bf16 .*vs libtorch f32: [0-9]+, [0-9.]+ dB\n`, out, "the bf16 row's difference")
}

func TestImageDiff(t *testing.T) {
	a := []byte{0, 10, 20, 30}
	maxDiff, psnr, err := imageDiff(a, a)
	require.NoError(t, err)
	assert.Equal(t, 0, maxDiff)
	assert.True(t, math.IsInf(psnr, 1), "identical images")

	maxDiff, psnr, err = imageDiff(a, []byte{0, 10, 20, 40})
	require.NoError(t, err)
	assert.Equal(t, 10, maxDiff)
	assert.InDelta(t, 10*math.Log10(255*255/25.0), psnr, 1e-9, "MSE 100/4")

	maxDiff, _, err = imageDiff([]byte{255}, []byte{0})
	require.NoError(t, err)
	assert.Equal(t, 255, maxDiff)

	_, _, err = imageDiff(a, a[:3])
	assert.ErrorIs(t, err, errImageSizes)
}

func TestBenchMemory(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	code, out, errOut := runCLI("bench", "memory", "--lib", testenv.LibPath(), "--device", "cpu", "--model", sdDir,
		"--runs", "4", "--warmup", "2", "--json")
	require.Equal(t, exitOK, code, errOut)
	var rep memoryReport
	require.NoError(t, json.Unmarshal([]byte(out), &rep))
	assert.Equal(t, "libtorch", rep.Backend)
	assert.Equal(t, 64, rep.Size)
	assert.Equal(t, 1, rep.Steps)
	require.Len(t, rep.RSS, 4, "one sample per run")
	for _, n := range rep.RSS {
		assert.Positive(t, n)
		assert.LessOrEqual(t, n, rep.Peak)
	}
	assert.Equal(t, rep.RSS[3]-rep.RSS[1], rep.Growth, "the last run against the last warm-up run")

	code, out, errOut = runCLI("bench", "memory", "--lib", testenv.LibPath(), "--device", "cpu", "--model", sdDir, "--runs", "2", "--warmup", "1")
	require.Equal(t, exitOK, code, errOut)
	assert.Contains(t, out, "RSS after run   2: ")
	assert.Contains(t, out, "growth after the 1 warm-up runs: ")

	code, _, errOut = runCLI("bench", "memory", "--lib", testenv.LibPath(), "--model", sdDir, "--runs", "0")
	assert.Equal(t, exitError, code)
	assert.Contains(t, errOut, "--runs must be at least 1")
}

// TestImageRefs: each row is compared with the first of its size and the
// first of its backend there, each comparison once.
func TestImageRefs(t *testing.T) {
	dir := t.TempDir()
	rows := []benchRow{
		{Backend: "libtorch", DType: "f32", Size: 64},
		{Backend: "libtorch", DType: "bf16", Size: 64},
		{Backend: "sdcpp", DType: "q8_0", Skipped: "no"},
		{Backend: "sdcpp", DType: "bf16", Skipped: "no"},
		{Backend: "sdcpp", DType: "f32", Size: 64},
		{Backend: "sdcpp", DType: "f16", Size: 64},
		{Backend: "sdcpp", DType: "f32", Size: 128},
	}
	pix := map[string][]byte{"libtorch f32 64": {10, 10}, "libtorch bf16 64": {10, 12}, "sdcpp f32 64": {200, 10},
		"sdcpp f16 64": {200, 10}, "sdcpp f32 128": {1, 2, 3, 4}}
	for _, r := range rows {
		if r.Skipped == "" {
			require.NoError(t, os.WriteFile(benchImagePath(dir, r), pix[fmt.Sprintf("%s %d", r.label(), r.Size)], 0o600))
		}
	}
	refs := imageRefs{dir: dir, rows: map[imageRefKey]benchRow{}}
	var got [][]string
	for _, r := range rows {
		out, err := refs.compare(r)
		require.NoError(t, err)
		var line []string
		for _, d := range out.ImageDiffs {
			line = append(line, d.String())
		}
		got = append(got, line)
	}
	assert.Equal(t, [][]string{
		nil,
		{"vs libtorch f32: 2, " + fmt.Sprintf("%.1f dB", 10*math.Log10(255*255/2.0))},
		nil, // skipped
		nil, // skipped, and no reference for anything
		{"vs libtorch f32: 190, " + fmt.Sprintf("%.1f dB", 10*math.Log10(255*255/(190*190/2.0)))},
		{"vs libtorch f32: 190, " + fmt.Sprintf("%.1f dB", 10*math.Log10(255*255/(190*190/2.0))), "vs sdcpp f32: 0, identical"},
		nil, // the first of its size
	}, got)

	// An image that is missing is an error, not a row without a difference.
	_, err := refs.compare(benchRow{Backend: "sdcpp", DType: "q4_0", Size: 64})
	assert.ErrorIs(t, err, os.ErrNotExist)
}
