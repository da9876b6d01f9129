// Command stepwise is the one binary of the stepwise engine: it serves the API,
// runs generations and edits from the command line, benchmarks and manages models.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strings"

	"github.com/stepwise-sd/stepwise/binding"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type command struct {
	summary string
	run     func(args []string, stdout, stderr io.Writer) error
}

var commands = map[string]command{
	"edit":     {"keep the subject of a photo and repaint the rest from a prompt; writes a run folder", runEdit},
	"serve":    {"serve the HTTP + websocket API and the page (127.0.0.1:7860)", runServe},
	"segment":  {"find the subject of an image with a segmentation U-Net; writes its mask", runSegment},
	"bench":    {"time text encoding, denoising steps and VAE decoding per size and dtype", runBench},
	"generate": {"txt2img, img2img (--init) or inpaint (--init --mask) with a Stable Diffusion model", runGenerate},
	"version":  {"print versions of stepwise, the engine ABI, libtorch and the devices", runVersion},
	"models":   {"list models, or make the tiny demo models (models ls|make-tiny)", runModels},
}

// errUsage marks an error already explained by a usage message.
var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "stepwise: unknown command %q\n\n", args[0])
		usage(stderr)
		return 2
	}
	if err := cmd.run(args[1:], stdout, stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		if !errors.Is(err, errUsage) {
			fmt.Fprintf(stderr, "stepwise %s: %v\n", args[0], err)
		}
		return 1
	}
	return 0
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: stepwise <command> [flags]\n\ncommands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-9s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'stepwise <command> -h' for a command's flags.")
}

// engineFlags are the flags of every command that loads the engine.
type engineFlags struct {
	lib     string
	device  string
	threads int
	verbose bool
	log     *slog.Logger // set by load
}

func (f *engineFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.lib, "lib", "", "path to libstepwise.so (default: $STEPWISE_LIB, next to the binary, ./build, system paths)")
	fs.StringVar(&f.device, "device", "", "device: auto, cpu, cuda, cuda:N, mps (default: $STEPWISE_DEVICE, then auto)")
	fs.IntVar(&f.threads, "threads", 0, "CPU threads for the engine (0: $STEPWISE_THREADS, else every CPU)")
	fs.BoolVar(&f.verbose, "v", false, "verbose logs")
}

func (f *engineFlags) load(stderr io.Writer) (*binding.Library, error) {
	level := slog.LevelWarn
	if f.verbose {
		level = slog.LevelDebug
	}
	lg := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	f.log = lg
	return binding.Load(binding.Options{Path: f.lib, Device: f.device, Threads: f.threads, Logger: lg})
}

func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("stepwise "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
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

func joinNonEmpty(parts ...string) string {
	var out []string
	for _, p := range parts {
		if p != "" {
			out = append(out, p)
		}
	}
	return strings.Join(out, " ")
}
