package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/pipeline"
)

func runGenerate(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("generate", stderr)
	var ef engineFlags
	ef.register(fs)
	model := fs.String("model", "", "Stable Diffusion model: a diffusers folder or a single-file .safetensors checkpoint (required)")
	tokenizer := fs.String("tokenizer", "", "tokenizer folder (vocab.json, merges.txt), for single-file checkpoints")
	var g genFlags
	g.register(fs, "what to draw (required)", "euler")
	width := fs.Int("width", 0, "image width, a multiple of 8 (default 512, or the init image's)")
	height := fs.Int("height", 0, "image height, a multiple of 8 (default 512, or the init image's)")
	initPath := fs.String("init", "", "init image (PNG or JPEG) for img2img / inpaint")
	strength := fs.Float64("strength", 0.75, "img2img denoising strength in (0, 1]; inpaint defaults to 1")
	maskPath := fs.String("mask", "", "inpaint mask (white = repaint), the init image's size")
	batch := fs.Int("batch-size", 1, "images per run")
	clipSkip := fs.Int("clip-skip", 0, "skip the last N text-encoder layers")
	previewName := fs.String("preview", "none", "per-step previews: none, latent2rgb, vae")
	previewEvery := fs.Int("preview-every", 1, "with --preview vae: decode every N steps")
	previewDir := fs.String("preview-dir", "", "write each preview here as step-NNN[-i].png")
	out := fs.String("out", "", "output PNG (batches: NAME-0.png, NAME-1.png, ...) (required)")
	saveLatents := fs.String("save-latents", "", "also write float32 tensors 'latents' and 'image' to this .safetensors file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	var missing []string
	for _, f := range []struct{ name, value string }{{"--model", *model}, {"--prompt", g.prompt}, {"--out", *out}} {
		if f.value == "" {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s (see stepwise generate -h)", strings.Join(missing, ", "))
	}
	sampler, dtype, seed, err := g.resolve()
	if err != nil {
		return err
	}
	preview, err := binding.ParsePreview(*previewName)
	if err != nil {
		return err
	}
	strengthSet := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "strength" {
			strengthSet = true
		}
	})

	req := binding.GenerateRequest{
		Prompt: g.prompt, NegativePrompt: g.negative, Steps: g.steps, BatchSize: *batch, CFGScale: float32(g.cfg),
		Sampler: sampler, Seed: seed, ClipSkip: *clipSkip, Preview: preview, PreviewEvery: *previewEvery,
		Width: *width, Height: *height, Strength: float32(*strength),
	}
	if *maskPath != "" && *initPath == "" {
		return errors.New("--mask needs --init")
	}
	if *initPath != "" {
		img, err := pipeline.ReadImageFile(*initPath, 0)
		if err != nil {
			return err
		}
		b := img.Bounds()
		if req.Width == 0 {
			req.Width = b.Dx() / 8 * 8
		}
		if req.Height == 0 {
			req.Height = b.Dy() / 8 * 8
		}
		if req.Width == 0 || req.Height == 0 {
			return fmt.Errorf("%s: %dx%d is smaller than 8x8", *initPath, b.Dx(), b.Dy())
		}
		req.Init = pipeline.RGB(pipeline.Resize(img, req.Width, req.Height))
		if *maskPath != "" {
			mask, err := pipeline.ReadImageFile(*maskPath, 0)
			if err != nil {
				return err
			}
			if mask.Bounds().Size() != b.Size() {
				return fmt.Errorf("mask %s is %dx%d, the init image is %dx%d", *maskPath,
					mask.Bounds().Dx(), mask.Bounds().Dy(), b.Dx(), b.Dy())
			}
			req.Mask = pipeline.Gray(pipeline.Resize(mask, req.Width, req.Height))
			if !strengthSet {
				req.Strength = 1
			}
		}
	} else {
		if req.Width == 0 {
			req.Width = 512
		}
		if req.Height == 0 {
			req.Height = 512
		}
	}

	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	m, err := lib.OpenSD(binding.SDOptions{Path: *model, TokenizerDir: *tokenizer, DType: dtype})
	if err != nil {
		return err
	}
	defer m.Close()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	bar := newProgressBar(stderr)
	var previewErr error
	req.OnStep = func(s binding.Step) {
		bar.update(s)
		if *previewDir != "" && len(s.Previews) > 0 && previewErr == nil {
			for i, p := range s.Previews {
				name := fmt.Sprintf("step-%03d.png", s.Step)
				if len(s.Previews) > 1 {
					name = fmt.Sprintf("step-%03d-%d.png", s.Step, i)
				}
				previewErr = pipeline.WriteImageFile(filepath.Join(*previewDir, name), pipeline.ToImage(p))
			}
		}
	}
	res, err := m.Generate(ctx, req)
	bar.done()
	if err != nil {
		return err
	}
	if previewErr != nil {
		return fmt.Errorf("write preview: %w", previewErr)
	}
	var written []string
	for i, img := range res.Images {
		path := *out
		if len(res.Images) > 1 {
			ext := filepath.Ext(path)
			path = fmt.Sprintf("%s-%d%s", strings.TrimSuffix(path, ext), i, ext)
		}
		if err := pipeline.WriteImageFile(path, pipeline.ToImage(img)); err != nil {
			return err
		}
		written = append(written, path)
	}
	if *saveLatents != "" {
		if err := writeLatents(*saveLatents, res); err != nil {
			return err
		}
	}
	if res.Truncated {
		fmt.Fprintf(stderr, "warning: the prompt has %d tokens; only the first 75 were used\n", res.Tokens)
	}
	fmt.Fprintf(stdout, "%s (seed %d, %s, %d steps: text %.2fs, denoise %.2fs, decode %.2fs)\n",
		strings.Join(written, ", "), req.Seed, sampler, req.Steps, res.Text.Seconds(), res.Denoise.Seconds(), res.Decode.Seconds())
	return nil
}

func writeLatents(path string, res *binding.GenerateResult) error {
	shape := func(s []int) []int64 {
		out := make([]int64, len(s))
		for i, v := range s {
			out[i] = int64(v)
		}
		return out
	}
	err := safetensors.Write(path, map[string]safetensors.Tensor{
		"latents": safetensors.F32(shape(res.Latents.Shape), res.Latents.Data),
		"image":   safetensors.F32(shape(res.Pixels.Shape), res.Pixels.Data),
	}, map[string]string{"format": "stepwise"})
	if err != nil {
		return fmt.Errorf("save latents to %s: %w", path, err)
	}
	return nil
}

// progressBar draws one line on a terminal and nothing elsewhere.
type progressBar struct {
	w     io.Writer
	tty   bool
	drawn bool
}

func newProgressBar(w io.Writer) *progressBar {
	f, ok := w.(*os.File)
	tty := false
	if ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	return &progressBar{w: w, tty: tty}
}

func (p *progressBar) update(s binding.Step) {
	if !p.tty {
		return
	}
	const width = 30
	filled := width * s.Step / s.Steps
	per := s.Elapsed.Seconds() / float64(s.Step)
	eta := per * float64(s.Steps-s.Step)
	fmt.Fprintf(p.w, "\r%3d/%-3d [%s%s] %.2fs/step, ETA %.0fs ", s.Step, s.Steps,
		strings.Repeat("=", filled), strings.Repeat(" ", width-filled), per, eta)
	p.drawn = true
}

func (p *progressBar) done() {
	if p.drawn {
		fmt.Fprintln(p.w)
	}
}
