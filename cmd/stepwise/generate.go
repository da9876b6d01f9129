package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// generateFlags are generate's own flags.
type generateFlags struct {
	engine                           engineFlags
	gen                              genFlags
	model, tokenizer, init, mask     string
	preview, previewDir, out, latent string
	data                             string
	width, height, batch, clipSkip   int
	previewEvery                     int
	strength                         float32
	maskBlur                         float64
}

func (f *generateFlags) register(cmd *cobra.Command) {
	f.engine.register(cmd)
	fs := cmd.Flags()
	fs.StringVar(&f.model, "model", "", "Stable Diffusion model: a diffusers folder, a single-file .safetensors or a .ckpt checkpoint, or its name in --models-dir (required)")
	fs.StringVar(&f.tokenizer, "tokenizer", "", "tokenizer folder (vocab.json, merges.txt); default: the model's own, else the built-in CLIP vocabulary")
	f.gen.register(cmd, "what to draw")
	fs.IntVar(&f.width, "width", 0, fmt.Sprintf("image width, a multiple of 8 (default %d, or the init image's)", pipeline.DefaultSize))
	fs.IntVar(&f.height, "height", 0, fmt.Sprintf("image height, a multiple of 8 (default %d, or the init image's)", pipeline.DefaultSize))
	fs.StringVar(&f.init, "init", "", "init image (PNG or JPEG) for img2img / inpaint")
	fs.Float32Var(&f.strength, "strength", 0, fmt.Sprintf("denoising strength in (0, 1] (default %g for img2img, %g for inpaint)",
		pipeline.DefaultImg2ImgStrength, pipeline.DefaultInpaintStrength))
	fs.StringVar(&f.mask, "mask", "", "inpaint mask (white = repaint), the init image's size; needs --init")
	fs.Float64Var(&f.maskBlur, "mask-blur", pipeline.DefaultMaskBlur, "inpaint: feather the mask's edge (pixels)")
	fs.IntVar(&f.batch, "batch-size", pipeline.DefaultBatchSize, "images per run")
	fs.IntVar(&f.clipSkip, "clip-skip", 0, "skip the last N text-encoder layers")
	fs.StringVar(&f.preview, "preview", "none", "per-step previews: none, latent2rgb, vae")
	fs.IntVar(&f.previewEvery, "preview-every", pipeline.DefaultPreviewEvery, "with --preview vae: decode every N steps")
	fs.StringVar(&f.previewDir, "preview-dir", "", "write each preview here as step-NNN[-i].png")
	fs.StringVar(&f.out, "out", "", "output PNG (batches: NAME-0.png, NAME-1.png, ...) (required)")
	fs.StringVar(&f.latent, "save-latents", "", "also write float32 tensors 'latents' and 'image' to this .safetensors file")
	fs.StringVar(&f.data, "data", defaultDataDir(), "data folder (conversions of .ckpt files are cached here)")
	for _, name := range []string{"model", "out"} {
		_ = cmd.MarkFlagRequired(name)
	}
	_ = cmd.MarkFlagDirname("preview-dir")
	_ = cmd.MarkFlagDirname("tokenizer")
	_ = cmd.MarkFlagDirname("data")
	_ = cmd.MarkFlagFilename("init", "png", "jpg", "jpeg")
	_ = cmd.MarkFlagFilename("mask", "png", "jpg", "jpeg")
	completeWords(cmd, "preview", "none", "latent2rgb", "vae")
}

// options are the pipeline's options for the flags; the init image and mask
// are read by the caller.
func (f *generateFlags) options() (pipeline.GenerateOptions, error) {
	r, err := f.gen.resolve()
	if err != nil {
		return pipeline.GenerateOptions{}, err
	}
	preview, err := binding.ParsePreview(f.preview)
	if err != nil {
		return pipeline.GenerateOptions{}, err
	}
	model := f.model
	vae, err := f.gen.pickModels(f.data, &model, nil)
	if err != nil {
		return pipeline.GenerateOptions{}, err
	}
	o := pipeline.DefaultGenerateOptions()
	o.SD = pipeline.ModelRef{Path: model, VAE: vae, DType: r.dtype, Backend: r.backend}
	o.Prompt, o.NegativePrompt, o.Steps, o.CFGScale = f.gen.prompt, f.gen.negative, f.gen.steps, f.gen.cfg
	o.Seed, o.Sampler, o.Width, o.Height, o.BatchSize = r.seed, r.sampler, f.width, f.height, f.batch
	o.ClipSkip, o.Strength, o.MaskBlur, o.Preview, o.PreviewEvery = f.clipSkip, f.strength, f.maskBlur, preview, f.previewEvery
	return o, nil
}

func newGenerateCommand() *cobra.Command {
	return newFlaggedCommand("generate --model PATH --prompt TEXT --out FILE.png",
		"txt2img, img2img (--init) or inpaint (--init --mask) with a Stable Diffusion model", cobra.NoArgs, &generateFlags{})
}

func (f *generateFlags) run(cmd *cobra.Command, _ []string) error {
	ef, stdout, stderr := &f.engine, cmd.OutOrStdout(), cmd.ErrOrStderr()
	o, err := f.options()
	if err != nil {
		return err
	}
	for _, in := range []struct {
		path string
		dst  *[]byte
	}{{f.init, &o.Init}, {f.mask, &o.Mask}} {
		if in.path == "" {
			continue
		}
		if *in.dst, err = readInput(in.path); err != nil {
			return err
		}
	}
	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	e := newRunner(lib, f.data, f.tokenizer, nil, ef.log)
	defer e.Cache.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	bar := newProgressBar(stderr)
	var previewErr error
	o.OnStep = func(s binding.Step) {
		bar.update(s)
		if f.previewDir != "" && previewErr == nil {
			previewErr = writePreviews(f.previewDir, s)
		}
	}
	res, err := e.Render(ctx, o)
	bar.done()
	if err != nil {
		return err
	}
	if previewErr != nil {
		return fmt.Errorf("write preview: %w", previewErr)
	}
	var written []string
	for i, img := range res.Images {
		path := f.out
		if len(res.Images) > 1 {
			ext := filepath.Ext(path)
			path = fmt.Sprintf("%s-%d%s", strings.TrimSuffix(path, ext), i, ext)
		}
		if err := pipeline.WriteImageFile(path, img); err != nil {
			return err
		}
		written = append(written, path)
	}
	if f.latent != "" {
		if err := writeLatents(f.latent, res); err != nil {
			return err
		}
	}
	p := res.Params
	if p.Truncated {
		fmt.Fprintf(stderr, "warning: the prompt has %d tokens; only the first 75 were used\n", p.Tokens)
	}
	fmt.Fprintf(stdout, "%s (seed %d, %s, %d steps: text %.2fs, denoise %.2fs, decode %.2fs)\n",
		strings.Join(written, ", "), p.Seed, p.Sampler, p.Steps, p.Timings["text"], p.Timings["denoise"], p.Timings["decode"])
	return nil
}

// writePreviews writes a step's previews, if it has any, as step-NNN[-i].png.
func writePreviews(dir string, s binding.Step) error {
	for i, p := range s.Previews {
		name := fmt.Sprintf("step-%03d.png", s.Step)
		if len(s.Previews) > 1 {
			name = fmt.Sprintf("step-%03d-%d.png", s.Step, i)
		}
		if err := pipeline.WriteImageFile(filepath.Join(dir, name), pipeline.ToImage(p)); err != nil {
			return err
		}
	}
	return nil
}

func writeLatents(path string, res *pipeline.Rendered) error {
	err := safetensors.Write(path, map[string]safetensors.Tensor{
		"latents": tensor(res.Latents), "image": tensor(res.Pixels),
	}, map[string]string{"format": "stepwise"})
	if err != nil {
		return fmt.Errorf("save latents to %s: %w", path, err)
	}
	return nil
}

// tensor is t for a safetensors file.
func tensor(t binding.Tensor) safetensors.Tensor {
	shape := make([]int64, len(t.Shape))
	for i, v := range t.Shape {
		shape[i] = int64(v)
	}
	return safetensors.F32(shape, t.Data)
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
