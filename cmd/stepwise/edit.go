package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/models"
	"github.com/stepwise-sd/stepwise/pipeline"
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
	dir := filepath.Join(data, "models")
	sd, seg = filepath.Join(dir, models.TinySDDir), filepath.Join(dir, models.TinySegFile)
	if _, err1 := os.Stat(filepath.Join(sd, "unet", "diffusion_pytorch_model.safetensors")); err1 == nil {
		if _, err2 := os.Stat(seg); err2 == nil {
			return sd, seg, nil
		}
	}
	fmt.Fprintf(stderr, "making the tiny demo models in %s (random weights: the images are noise)\n", dir)
	return models.MakeTiny(lib, dir)
}

func parseClasses(s string) ([]int, error) {
	if s == "" {
		return nil, nil
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 {
			return nil, fmt.Errorf("bad class %q in --classes (want non-negative integers, e.g. 1,3)", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func newEngine(lib *binding.Library, data string, lg *slog.Logger) (*pipeline.Engine, error) {
	runs, err := pipeline.OpenRuns(filepath.Join(data, "runs"), pipeline.RunsOptions{Logger: lg})
	if err != nil {
		return nil, err
	}
	return &pipeline.Engine{
		Cache: binding.NewCache(lib, binding.CacheOptions{Logger: lg}), Runs: runs,
		ConvertDir: filepath.Join(data, "cache"), Version: version,
	}, nil
}

func runSegment(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("segment", stderr)
	var ef engineFlags
	ef.register(fs)
	model := fs.String("model", "", "segmentation U-Net: .safetensors or the training script's .pth (required)")
	out := fs.String("out", "", "mask PNG to write, subject white (required)")
	scale := fs.Float64("scale", 0.5, "resize factor for the network's input (the mask keeps the image's size)")
	classes := fs.String("classes", "", "classes that are the subject, e.g. 1,3 (default: every class but 0)")
	threshold := fs.Float64("threshold", 0.5, "one-class models: sigmoid threshold")
	saveLogits := fs.String("save-logits", "", "also write float32 logits [1,C,H,W] at the image's size to this .safetensors")
	data := fs.String("data", defaultDataDir(), "data folder (conversions of .pth files are cached here)")
	if err := fs.Parse(reorder(args, fs)); err != nil {
		return err
	}
	if fs.NArg() != 1 || *model == "" || *out == "" {
		fmt.Fprintln(stderr, "usage: stepwise segment --model PATH IMAGE --out MASK.png [--scale F] [--classes LIST] [--save-logits FILE]")
		return errUsage
	}
	cls, err := parseClasses(*classes)
	if err != nil {
		return err
	}
	img, err := pipeline.ReadImageFile(fs.Arg(0), 0)
	if err != nil {
		return err
	}
	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	e, err := newEngine(lib, *data, ef.log)
	if err != nil {
		return err
	}
	defer e.Cache.Close()
	res, err := e.Segment(context.Background(), img, pipeline.SegmentOptions{
		Model: pipeline.ModelRef{Path: *model}, Scale: *scale, Classes: cls, Threshold: float32(*threshold),
	}, *saveLogits != "")
	if err != nil {
		return err
	}
	if err := pipeline.WriteImageFile(*out, res.Mask.Image()); err != nil {
		return err
	}
	if *saveLogits != "" {
		shape := make([]int64, len(res.Logits.Shape))
		for i, v := range res.Logits.Shape {
			shape[i] = int64(v)
		}
		if err := safetensors.Write(*saveLogits, map[string]safetensors.Tensor{"logits": safetensors.F32(shape, res.Logits.Data)}, nil); err != nil {
			return fmt.Errorf("save logits: %w", err)
		}
	}
	fmt.Fprintf(stdout, "%s (subject %.1f%% of %dx%d, %d classes, %.2fs)\n", *out, 100*res.Mask.Covers(),
		res.Mask.Width, res.Mask.Height, res.Classes, res.Elapsed.Seconds())
	return nil
}

func runEdit(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("edit", stderr)
	var ef engineFlags
	ef.register(fs)
	model := fs.String("model", "", "Stable Diffusion model (default: the tiny demo model)")
	segModel := fs.String("seg-model", "", "segmentation U-Net (default: the tiny demo model)")
	var g genFlags
	g.register(fs, "what to paint around the subject (required)", "euler_a")
	size := fs.Int("size", 512, "working size: the long side the inpainting runs at")
	scale := fs.Float64("scale", 0.5, "segmentation input scale")
	classes := fs.String("classes", "", "subject classes (default: every class but 0)")
	subject := fs.Bool("repaint-subject", false, "repaint the subject instead of the background")
	grow := fs.Int("grow", 0, "grow (> 0) or shrink (< 0) the repainted region, in pixels")
	blur := fs.Float64("mask-blur", 4, "feather the repainted region's edge (pixels)")
	data := fs.String("data", defaultDataDir(), "data folder: runs/ and cache/ live here")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := fs.Parse(reorder(args, fs)); err != nil {
		return err
	}
	if fs.NArg() != 1 || g.prompt == "" {
		fmt.Fprintln(stderr, "usage: stepwise edit IMAGE --prompt TEXT [--model PATH] [--seg-model PATH] [--seed S] ...")
		return errUsage
	}
	sampler, dtype, s, err := g.resolve()
	if err != nil {
		return err
	}
	cls, err := parseClasses(*classes)
	if err != nil {
		return err
	}
	input, err := os.ReadFile(fs.Arg(0))
	if err != nil {
		return err
	}
	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	if *model == "" || *segModel == "" {
		sd, seg, err := demoModels(lib, *data, stderr)
		if err != nil {
			return err
		}
		if *model == "" {
			*model = sd
		}
		if *segModel == "" {
			*segModel = seg
		}
	}
	e, err := newEngine(lib, *data, ef.log)
	if err != nil {
		return err
	}
	defer e.Cache.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	bar := newProgressBar(stderr)
	res, err := e.Edit(ctx, input, pipeline.EditOptions{
		SD:      pipeline.ModelRef{Path: *model, DType: dtype},
		Segment: pipeline.SegmentOptions{Model: pipeline.ModelRef{Path: *segModel}, Scale: *scale, Classes: cls},
		Prompt:  g.prompt, NegativePrompt: g.negative, Steps: g.steps, CFGScale: float32(g.cfg), Seed: s, Sampler: sampler,
		WorkingSize: *size, RepaintSubject: *subject, Grow: *grow, MaskBlur: *blur, OnStep: bar.update,
	})
	bar.done()
	if err != nil {
		return err
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(map[string]any{"run": res.RunID, "dir": res.Dir, "subject_iou": res.IoU, "params": res.Params})
	}
	fmt.Fprintf(stdout, "%s\n(subject preserved: IoU %.3f; seed %d)\n", res.Dir, res.IoU, s)
	return nil
}

// reorder moves positional arguments after the flags, so flags may follow
// them (stepwise edit IMAGE --prompt ...), as the flag package does not.
func reorder(args []string, fs *flag.FlagSet) []string {
	var flags, positional []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			positional = append(positional, args[i+1:]...)
			break
		}
		if !strings.HasPrefix(a, "-") || a == "-" {
			positional = append(positional, a)
			continue
		}
		flags = append(flags, a)
		name := strings.TrimLeft(a, "-")
		if strings.Contains(name, "=") {
			continue
		}
		f := fs.Lookup(name)
		if f == nil {
			continue
		}
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
			continue
		}
		if i+1 < len(args) {
			flags = append(flags, args[i+1])
			i++
		}
	}
	return append(flags, positional...)
}
