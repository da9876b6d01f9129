package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// benchMemoryFlags are `bench memory`'s flags.
type benchMemoryFlags struct {
	engine                       engineFlags
	model, cache, backend, dtype string
	size, steps, runs, warmup    int
	asJSON                       bool
}

// memoryReport is what `bench memory` measured: the resident memory after
// each generation, on one model opened once.
type memoryReport struct {
	Model   string `json:"model"`
	Backend string `json:"backend"`
	DType   string `json:"dtype"`
	Size    int    `json:"size"`
	Steps   int    `json:"steps"`
	// RSS is VmRSS after each run, Go's garbage returned to the system first.
	RSS []int64 `json:"rss_bytes"`
	// Warmup runs are left out of Growth: allocators and caches settle.
	Warmup int `json:"warmup"`
	// Growth is the last run's RSS less the warm-up's last (0 when every run
	// was warm-up).
	Growth int64 `json:"growth_bytes"`
	Peak   int64 `json:"peak_rss_bytes"`
}

func newBenchMemoryCommand() *cobra.Command {
	return newFlaggedCommand("memory",
		"generate many times on one model in this process and report its resident memory after each run (a leak grows it)",
		cobra.NoArgs, &benchMemoryFlags{})
}

func (f *benchMemoryFlags) register(cmd *cobra.Command) {
	f.engine.register(cmd)
	fs := cmd.Flags()
	fs.StringVar(&f.model, "model", "", "model (default: bench's random-weight SD 1.5-sized model, made once in --cache)")
	fs.StringVar(&f.cache, "cache", filepath.Join(os.TempDir(), "stepwise-bench"), "where the random SD 1.5-sized model is kept")
	fs.StringVar(&f.backend, "backend", binding.BackendLibtorch.String(), backendHelp)
	fs.StringVar(&f.dtype, "dtype", "auto", dtypeHelp)
	fs.IntVar(&f.size, "size", 64, "square image size")
	fs.IntVar(&f.steps, "steps", 1, "denoising steps per run")
	fs.IntVar(&f.runs, "runs", 100, "generations")
	fs.IntVar(&f.warmup, "warmup", 10, "first runs left out of the growth")
	fs.BoolVar(&f.asJSON, "json", false, "print JSON")
	completeBackends(cmd, "backend")
	completeDTypes(cmd, "dtype")
}

func (f *benchMemoryFlags) run(cmd *cobra.Command, _ []string) error {
	backend, err := binding.ParseBackend(f.backend)
	if err != nil {
		return err
	}
	dtype, err := binding.ParseDType(f.dtype)
	if err != nil {
		return err
	}
	if f.runs < 1 || f.warmup < 0 {
		return fmt.Errorf("--runs must be at least 1 and --warmup at least 0")
	}
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	lib, path, name, err := f.engine.loadBenchModel(f.model, f.cache, stderr)
	if err != nil {
		return err
	}
	m, err := lib.OpenSD(binding.SDOptions{Path: path, DType: dtype, Backend: backend})
	if err != nil {
		return err
	}
	defer m.Close()
	rep := memoryReport{Model: name, Backend: backend.String(), DType: m.Info().DType.String(), Size: f.size, Steps: f.steps,
		Warmup: min(f.warmup, f.runs)}
	for i := 0; i < f.runs; i++ {
		_, err := m.Generate(cmd.Context(), binding.GenerateRequest{
			Prompt: "a photograph of an astronaut riding a horse", Width: f.size, Height: f.size, Steps: f.steps,
			BatchSize: 1, CFGScale: pipeline.DefaultCFGScale, Sampler: binding.Euler, Seed: uint64(i), PreviewEvery: 1,
		})
		if err != nil {
			return fmt.Errorf("run %d: %w", i+1, err)
		}
		debug.FreeOSMemory() // Go's own garbage is not the engine's
		rep.RSS = append(rep.RSS, procStatusBytes("VmRSS"))
	}
	rep.Peak = peakRSS()
	if rep.Warmup > 0 {
		rep.Growth = rep.RSS[len(rep.RSS)-1] - rep.RSS[rep.Warmup-1]
	}
	if f.asJSON {
		return json.NewEncoder(stdout).Encode(rep)
	}
	fmt.Fprintf(stdout, "%s, %s %s, %d² %d step(s), %d runs\n", rep.Model, rep.Backend, rep.DType, rep.Size, rep.Steps, f.runs)
	for _, i := range []int{0, rep.Warmup - 1, len(rep.RSS)/2 - 1, len(rep.RSS) - 1} {
		if i >= 0 && i < len(rep.RSS) {
			fmt.Fprintf(stdout, "RSS after run %3d: %s\n", i+1, formatBytes(rep.RSS[i]))
		}
	}
	fmt.Fprintf(stdout, "growth after the %d warm-up runs: %+.1f MiB; peak RSS %s\n", rep.Warmup, float64(rep.Growth)/(1<<20),
		formatBytes(rep.Peak))
	return nil
}
