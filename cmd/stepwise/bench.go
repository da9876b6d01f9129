package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/models"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// benchRow is one measured configuration.
type benchRow struct {
	Model       string  `json:"model"`
	Device      string  `json:"device"`
	DType       string  `json:"dtype"`
	Size        int     `json:"size"`
	Steps       int     `json:"steps"`
	CFG         bool    `json:"cfg"`
	LoadSeconds float64 `json:"load_seconds"`
	TextSeconds float64 `json:"text_seconds"`
	StepSeconds float64 `json:"step_seconds"` // median over the timed steps
	StepMin     float64 `json:"step_seconds_min"`
	DecodeSec   float64 `json:"vae_decode_seconds"`
	PeakRSS     int64   `json:"peak_rss_bytes"`
	Threads     int     `json:"threads"`
	Preview     string  `json:"preview"`
}

// benchFlags are bench's flags.
type benchFlags struct {
	engine                                          engineFlags
	model, tokenizer, cache, sizes, dtypes, preview string
	steps                                           int
	cfg                                             float32
	asJSON                                          bool
}

func newBenchCommand() *cobra.Command {
	return newFlaggedCommand("bench", "time text encoding, denoising steps and VAE decoding per size and dtype", cobra.NoArgs, &benchFlags{})
}

func (f *benchFlags) register(cmd *cobra.Command) {
	f.engine.register(cmd)
	fs := cmd.Flags()
	fs.StringVar(&f.model, "model", "", "model to time (default: a random-weight SD 1.5-sized model, made once in --cache)")
	fs.StringVar(&f.tokenizer, "tokenizer", "", "tokenizer folder (default: the model's own, else the built-in CLIP vocabulary)")
	fs.StringVar(&f.cache, "cache", filepath.Join(os.TempDir(), "stepwise-bench"), "where the random SD 1.5-sized model is kept")
	fs.StringVar(&f.sizes, "sizes", "256,512", "square image sizes to time")
	fs.StringVar(&f.dtypes, "dtypes", "f32", "weight dtypes to compare, e.g. f32,bf16")
	fs.IntVar(&f.steps, "steps", 3, "denoising steps per size (the first is a warm-up and not timed)")
	fs.Float32Var(&f.cfg, "cfg-scale", pipeline.DefaultCFGScale, "guidance scale (> 1: classifier-free guidance, two UNet passes per step)")
	fs.StringVar(&f.preview, "preview", "none", "preview mode during the timed steps: none, latent2rgb, vae")
	fs.BoolVar(&f.asJSON, "json", false, "print JSON lines instead of a table")
	completeWords(cmd, "preview", "none", "latent2rgb", "vae")
}

// runBench calls the engine directly, not the pipeline: it times the engine.
func (f *benchFlags) run(cmd *cobra.Command, _ []string) error {
	ef, stdout, stderr := &f.engine, cmd.OutOrStdout(), cmd.ErrOrStderr()
	if f.steps < 2 {
		return fmt.Errorf("--steps must be at least 2 (one warm-up, one timed)")
	}
	var sizeList []int
	for _, s := range strings.Split(f.sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 || n%8 != 0 {
			return fmt.Errorf("bad size %q: want positive multiples of 8", s)
		}
		sizeList = append(sizeList, n)
	}
	preview, err := binding.ParsePreview(f.preview)
	if err != nil {
		return err
	}
	var dtypeList []binding.DType
	for _, s := range strings.Split(f.dtypes, ",") {
		d, err := binding.ParseDType(s)
		if err != nil {
			return err
		}
		dtypeList = append(dtypeList, d)
	}
	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	path, name := f.model, f.model
	if path == "" {
		path, name = filepath.Join(f.cache, "sd15-random"), "sd15-sized (random)"
		if _, err := os.Stat(filepath.Join(path, "unet", "diffusion_pytorch_model.safetensors")); err != nil {
			fmt.Fprintf(stderr, "making a random-weight SD 1.5-sized model in %s (once)...\n", path)
			if err := models.MakeRandomSD(lib, path, models.SD15Arch(), 1); err != nil {
				return err
			}
		}
	}
	threads := ef.threads
	if threads <= 0 {
		threads = runtime.NumCPU()
		if n, err := strconv.Atoi(os.Getenv("STEPWISE_THREADS")); err == nil && n > 0 {
			threads = n
		}
	}
	var rows []benchRow
	for _, dt := range dtypeList {
		t0 := time.Now()
		m, err := lib.OpenSD(binding.SDOptions{Path: path, TokenizerDir: f.tokenizer, DType: dt})
		if err != nil {
			return err
		}
		load := time.Since(t0).Seconds()
		for _, size := range sizeList {
			var stepTimes []float64
			var last time.Duration
			req := binding.GenerateRequest{
				Prompt: "a photograph of an astronaut riding a horse", Width: size, Height: size, Steps: f.steps,
				BatchSize: 1, CFGScale: f.cfg, Sampler: binding.Euler, Seed: 1, Preview: preview, PreviewEvery: 1,
				OnStep: func(s binding.Step) {
					if s.Step > 1 {
						stepTimes = append(stepTimes, (s.Elapsed - last).Seconds())
					}
					last = s.Elapsed
				},
			}
			res, err := m.Generate(context.Background(), req)
			if err != nil {
				m.Close()
				return err
			}
			sort.Float64s(stepTimes)
			row := benchRow{
				Model: name, Device: m.Info().Device, DType: m.Info().DType.String(), Size: size, Steps: f.steps,
				CFG: f.cfg > 1, LoadSeconds: load, TextSeconds: res.Text.Seconds(), StepSeconds: stepTimes[len(stepTimes)/2],
				StepMin: stepTimes[0], DecodeSec: res.Decode.Seconds(), PeakRSS: peakRSS(), Threads: threads,
				Preview: preview.String(),
			}
			rows = append(rows, row)
			if f.asJSON {
				if err := json.NewEncoder(stdout).Encode(row); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(stderr, "%s %s %dx%d: %.2f s/step\n", row.Model, row.DType, size, size, row.StepSeconds)
			}
		}
		m.Close()
	}
	if f.asJSON {
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MODEL\tDEVICE\tDTYPE\tSIZE\tPREVIEW\tS/STEP (median)\tS/STEP (min)\tTEXT S\tVAE DECODE S\tLOAD S\tPEAK RSS\tTHREADS")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d²\t%s\t%.2f\t%.2f\t%.3f\t%.2f\t%.1f\t%s\t%d\n", r.Model, r.Device, r.DType, r.Size,
			r.Preview, r.StepSeconds, r.StepMin, r.TextSeconds, r.DecodeSec, r.LoadSeconds, formatBytes(r.PeakRSS), r.Threads)
	}
	return tw.Flush()
}

// peakRSS is the process's peak resident memory so far.
func peakRSS() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return -1
	}
	return ru.Maxrss * 1024 // Linux reports KiB
}
