package pipeline

import (
	"context"
	"errors"
	"fmt"
	"image"
	"time"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/modelcache"
)

// GenerateOptions describe a txt2img, img2img or inpaint run. Start from
// DefaultGenerateOptions: the zero value is no default.
type GenerateOptions struct {
	SD             ModelRef
	Prompt         string
	NegativePrompt string
	Width, Height  int // multiples of 8; 0: the init image's size (rounded down to 8), else DefaultSize
	Steps          int
	CFGScale       float32
	Seed           uint64
	Sampler        binding.Sampler
	BatchSize      int     // 0: DefaultBatchSize
	ClipSkip       int     // skip the text encoder's last N layers
	Init           []byte  // img2img / inpaint: an encoded PNG or JPEG
	Mask           []byte  // inpaint: white repaints; the init image's size
	Strength       float32 // img2img (0: DefaultImg2ImgStrength) / inpaint (0: DefaultInpaintStrength)
	MaskBlur       float64 // inpaint: feather the mask edge before inpainting (sigma, px)
	Preview        binding.Preview
	PreviewEvery   int // 0: DefaultPreviewEvery
	OnStep         func(binding.Step)
	OnRun          func(id string)
}

// GenerateResult is a finished run.
type GenerateResult struct {
	RunID  string
	Dir    string
	Images []image.Image
	Files  []string // image-0.png, ...
	Params GenerateParams
}

// GenerateParams is params.json of a generation run.
type GenerateParams struct {
	RunParams
	Width     int     `json:"width"`
	Height    int     `json:"height"`
	BatchSize int     `json:"batch_size"`
	Strength  float32 `json:"denoising_strength,omitempty"`
	MaskBlur  float64 `json:"mask_blur,omitempty"`
	Tokens    int     `json:"tokens"`
	Truncated bool    `json:"prompt_truncated,omitempty"`
}

// Txt2Img draws images from a prompt.
func (e *Runner) Txt2Img(ctx context.Context, o GenerateOptions) (*GenerateResult, error) {
	o.Init, o.Mask = nil, nil
	return e.Generate(ctx, o)
}

// Img2Img redraws an init image.
func (e *Runner) Img2Img(ctx context.Context, o GenerateOptions) (*GenerateResult, error) {
	if len(o.Init) == 0 {
		return nil, errors.New("img2img needs an init image")
	}
	o.Mask = nil
	return e.Generate(ctx, o)
}

// Inpaint repaints the masked part of an init image.
func (e *Runner) Inpaint(ctx context.Context, o GenerateOptions) (*GenerateResult, error) {
	if len(o.Init) == 0 || len(o.Mask) == 0 {
		return nil, errors.New("inpaint needs an init image and a mask")
	}
	return e.Generate(ctx, o)
}

// prepared is a generation's decoded inputs and its engine request.
type prepared struct {
	o     GenerateOptions // normalized
	kind  string
	input *image.NRGBA // the init image, opaque; nil for txt2img
	mask  *Mask        // the mask as given; nil unless inpainting
	req   binding.GenerateRequest
}

// prepare decodes the inputs, fills the defaults and builds the request:
// every field of the request is explicit.
func (e *Runner) prepare(ctx context.Context, o GenerateOptions) (*prepared, error) {
	if len(o.Mask) > 0 && len(o.Init) == 0 {
		return nil, errors.New("a mask needs an init image")
	}
	p := &prepared{kind: "txt2img"}
	var bounds image.Rectangle
	if len(o.Init) > 0 {
		p.kind = "img2img"
		img, err := DecodeImage(o.Init, e.MaxPixels)
		if err != nil {
			return nil, fmt.Errorf("init image: %w", err)
		}
		p.input = toNRGBA(img)
		opaque(p.input)
		bounds = p.input.Rect
		if bounds.Dx() < 8 || bounds.Dy() < 8 {
			return nil, fmt.Errorf("%w: the init image is %dx%d, smaller than 8x8", ErrBadImage, bounds.Dx(), bounds.Dy())
		}
	}
	if len(o.Mask) > 0 {
		p.kind = "inpaint"
		mimg, err := DecodeImage(o.Mask, e.MaxPixels)
		if err != nil {
			return nil, fmt.Errorf("mask: %w", err)
		}
		if mimg.Bounds().Size() != bounds.Size() {
			return nil, fmt.Errorf("%w: the mask is %dx%d, the init image %dx%d", ErrBadImage,
				mimg.Bounds().Dx(), mimg.Bounds().Dy(), bounds.Dx(), bounds.Dy())
		}
		p.mask = MaskFromImage(mimg, 0)
	}
	o.normalize(bounds, p.mask != nil)
	p.o = o
	p.req = binding.GenerateRequest{
		Prompt: o.Prompt, NegativePrompt: o.NegativePrompt, Width: o.Width, Height: o.Height, Steps: o.Steps,
		CFGScale: o.CFGScale, Seed: o.Seed, Sampler: o.Sampler, BatchSize: o.BatchSize, Strength: o.Strength,
		ClipSkip: o.ClipSkip, Preview: o.Preview, PreviewEvery: o.PreviewEvery, OnStep: o.OnStep,
	}
	if p.input != nil {
		p.req.Init = RGB(Resize(p.input, o.Width, o.Height))
	}
	if p.mask != nil {
		work := p.mask.Resize(o.Width, o.Height)
		if err := work.Feather(ctx, o.MaskBlur); err != nil {
			return nil, err
		}
		p.req.Mask = &binding.Image{Width: o.Width, Height: o.Height, Channels: 1, Pix: work.Pix}
	}
	return p, nil
}

// drawn is a finished engine run with what it was asked for.
type drawn struct {
	*prepared
	res  *binding.GenerateResult
	info binding.ModelInfo
}

// draw is the one generation path: prepare o, acquire the model, run the
// engine. begin, when set, runs once the model is loaded, before the engine
// starts (Generate opens its run folder there, so OnRun comes early).
func (e *Runner) draw(ctx context.Context, o GenerateOptions, begin func() error) (*drawn, error) {
	p, err := e.prepare(ctx, o)
	if err != nil {
		return nil, err
	}
	sd, err := e.acquire(ctx, modelcache.KindSD, o.SD)
	if err != nil {
		return nil, err
	}
	defer sd.Release()
	if begin != nil {
		if err := begin(); err != nil {
			return nil, err
		}
	}
	res, err := sd.SD().Generate(ctx, p.req)
	if err != nil {
		return nil, err
	}
	return &drawn{prepared: p, res: res, info: sd.Info()}, nil
}

// params is the run's params.json.
func (e *Runner) params(d *drawn, t0 time.Time) GenerateParams {
	p, res, info := d.prepared, d.res, d.info
	o := p.o
	timings := map[string]float64{"text": res.Text.Seconds(), "denoise": res.Denoise.Seconds(),
		"decode": res.Decode.Seconds(), "total": time.Since(t0).Seconds()}
	gp := GenerateParams{
		RunParams: e.runParams(p.kind, o.Prompt, o.NegativePrompt, o.Seed, o.Sampler, o.Steps, o.CFGScale, o.SD.Path,
			info, timings),
		Width: o.Width, Height: o.Height, BatchSize: o.BatchSize, Strength: o.Strength, Tokens: res.Tokens,
		Truncated: res.Truncated,
	}
	if p.mask != nil {
		gp.MaskBlur = o.MaskBlur
	}
	return gp
}

// Generate runs txt2img, img2img (Init) or inpaint (Init and Mask) and writes
// a run directory: input.png and mask.png when given, image-N.png, params.json.
func (e *Runner) Generate(ctx context.Context, o GenerateOptions) (*GenerateResult, error) {
	t0 := time.Now()
	var run *Run
	d, err := e.draw(ctx, o, func() error {
		var err error
		if run, err = e.Runs.Begin(); err != nil {
			return err
		}
		if o.OnRun != nil {
			o.OnRun(run.ID)
		}
		return nil
	})
	if run != nil {
		defer run.Abort() // no-op once committed
	}
	if err != nil {
		return nil, err
	}
	p, res := d.prepared, d.res
	out := &GenerateResult{RunID: run.ID}
	if p.input != nil {
		if err := run.WritePNG("input.png", p.input); err != nil {
			return nil, err
		}
	}
	if p.mask != nil {
		if err := run.WritePNG("mask.png", p.mask.Image()); err != nil {
			return nil, err
		}
	}
	for i, img := range res.Images {
		name := fmt.Sprintf("image-%d.png", i)
		gi := ToImage(img)
		if err := run.WritePNG(name, gi); err != nil {
			return nil, err
		}
		out.Images = append(out.Images, gi)
		out.Files = append(out.Files, name)
	}
	out.Params = e.params(d, t0)
	if err := run.WriteJSON("params.json", out.Params); err != nil {
		return nil, err
	}
	if out.Dir, err = run.Commit(); err != nil {
		return nil, err
	}
	return out, nil
}

// Rendered is a generation kept in memory: the images, the engine's float
// outputs and what params.json would say.
type Rendered struct {
	Images  []image.Image
	Latents binding.Tensor // [B, 4, H/8, W/8]
	Pixels  binding.Tensor // [B, H, W, 3] in 0..1
	Params  GenerateParams
}

// Render is Generate without a run directory, for callers that write the
// images where they were asked to (the CLI's --out). It takes the same path:
// the same defaults, mask handling and model resolution.
func (e *Runner) Render(ctx context.Context, o GenerateOptions) (*Rendered, error) {
	t0 := time.Now()
	d, err := e.draw(ctx, o, nil)
	if err != nil {
		return nil, err
	}
	out := &Rendered{Latents: d.res.Latents, Pixels: d.res.Pixels, Params: e.params(d, t0)}
	for _, img := range d.res.Images {
		out.Images = append(out.Images, ToImage(img))
	}
	return out, nil
}
