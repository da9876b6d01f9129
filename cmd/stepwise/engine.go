package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/modelcache"
	"github.com/stepwise-sd/stepwise/models"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// engineFlags are the flags of every command that loads the engine.
type engineFlags struct {
	lib     string
	device  string
	threads int
	verbose bool
	log     *slog.Logger // set by load
}

func (f *engineFlags) register(cmd *cobra.Command) {
	fs := cmd.Flags()
	fs.StringVar(&f.lib, "lib", "", "path to libstepwise.so (default: $STEPWISE_LIB, next to the binary, ./build, system paths)")
	fs.StringVar(&f.device, "device", "", "device: auto, cpu, cuda, cuda:N, mps (default: $STEPWISE_DEVICE, then auto)")
	fs.IntVar(&f.threads, "threads", 0, "CPU threads for the engine (0: $STEPWISE_THREADS, else every CPU)")
	fs.BoolVarP(&f.verbose, "verbose", "v", false, "verbose logs")
	_ = cmd.MarkFlagFilename("lib", "so", "dylib")
	completeWords(cmd, "device", "auto", "cpu", "cuda", "cuda:0", "mps")
}

func (f *engineFlags) load(stderr io.Writer) (*binding.Library, error) {
	lg := f.logger(stderr)
	return binding.Load(binding.Options{Path: f.lib, Device: f.device, Threads: f.threads, Logger: lg})
}

// logger is the command's logger (set as f.log), for commands that load no engine too.
func (f *engineFlags) logger(stderr io.Writer) *slog.Logger {
	level := slog.LevelWarn
	if f.verbose {
		level = slog.LevelDebug
	}
	f.log = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	return f.log
}

// completeWords completes flag's value from a fixed list.
func completeWords(cmd *cobra.Command, flag string, words ...string) {
	_ = cmd.RegisterFlagCompletionFunc(flag, cobra.FixedCompletions(words, cobra.ShellCompDirectiveNoFileComp))
}

// completeSamplers and completeDTypes complete the shared value lists.
func completeSamplers(cmd *cobra.Command, flag string) {
	names := make([]string, len(binding.Samplers))
	for i, s := range binding.Samplers {
		names[i] = s.Name
	}
	completeWords(cmd, flag, names...)
}

func completeDTypes(cmd *cobra.Command, flag string) {
	completeWords(cmd, flag, "auto", "f32", "f16", "bf16", "int8", "q8_0", "q5_0", "q4_0")
}

func completeBackends(cmd *cobra.Command, flag string) {
	var names []string
	for _, b := range binding.Backends() {
		names = append(names, b.String())
	}
	completeWords(cmd, flag, names...)
}

// The help of the --dtype and --backend flags generate, edit and serve share.
const (
	dtypeHelp   = "weights dtype: auto, f32, f16, bf16, int8 (libtorch; int8: the UNet's linear layers, cpu); auto, f32, f16, q8_0, q5_0, q4_0 (sdcpp)"
	backendHelp = "engine: libtorch, or sdcpp (stable-diffusion.cpp, when built in: stepwise version lists them)"
)

// defaultDataDir is $STEPWISE_DATA, else ~/.local/share/stepwise.
func defaultDataDir() string {
	if d := os.Getenv("STEPWISE_DATA"); d != "" {
		return d
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "share", "stepwise")
	}
	return "stepwise-data"
}

// demoModels returns the tiny random-weight models under data/models, making
// them the first time.
func demoModels(lib *binding.Library, data string, stderr io.Writer) (sd, seg string, err error) {
	dir, sd, seg, ok := demoModelPaths(data)
	if ok {
		return sd, seg, nil
	}
	fmt.Fprintf(stderr, "making the tiny demo models in %s (random weights: the images are noise)\n", dir)
	return models.MakeTiny(lib, dir)
}

// demoModelPaths are where the demo models live under data; ok says they are there.
func demoModelPaths(data string) (dir, sd, seg string, ok bool) {
	dir = filepath.Join(data, "models")
	sd, seg = filepath.Join(dir, models.TinySDDir), filepath.Join(dir, models.TinySegFile)
	_, err1 := os.Stat(filepath.Join(sd, "unet", "diffusion_pytorch_model.safetensors"))
	_, err2 := os.Stat(seg)
	return dir, sd, seg, err1 == nil && err2 == nil
}

// newRunner is the pipeline runner over lib: conversions of pickle checkpoints are
// kept in data/cache; runs is nil for commands that write no run folders.
func newRunner(lib *binding.Library, data, tokenizer string, runs *pipeline.Runs, lg *slog.Logger) *pipeline.Runner {
	return &pipeline.Runner{
		Cache: modelcache.New(modelcache.LibraryLoader{Lib: lib, TokenizerDir: tokenizer}, modelcache.Options{Logger: lg}),
		Runs:  runs, ConvertDir: filepath.Join(data, "cache"), Version: version,
	}
}

func formatBytes(n int64) string {
	if n < 0 {
		return "unknown"
	}
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
