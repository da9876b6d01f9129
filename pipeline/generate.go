package pipeline

import (
	"context"
	"errors"
	"fmt"
	"image"
	"time"

	"github.com/stepwise-sd/stepwise/binding"
)

// GenerateOptions describe a txt2img, img2img or inpaint run.
type GenerateOptions struct {
	SD             ModelRef
	Prompt         string
	NegativePrompt string
	Width, Height  int // multiples of 8; 0: the init image's size (rounded down to 8), else 512
	Steps          int
	CFGScale       float32
	Seed           uint64
	Sampler        binding.Sampler
	BatchSize      int
	Init           []byte  // img2img / inpaint: an encoded PNG or JPEG
	Mask           []byte  // inpaint: white repaints; the init image's size
	Strength       float32 // img2img (0: 0.75) / inpaint (0: 1)
	MaskBlur       float64 // inpaint: feather the mask edge before inpainting (sigma, px)
	Preview        binding.Preview
	PreviewEvery   int
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
func (e *Engine) Txt2Img(ctx context.Context, o GenerateOptions) (*GenerateResult, error) {
	o.Init, o.Mask = nil, nil
	return e.Generate(ctx, o)
}

// Img2Img redraws an init image.
func (e *Engine) Img2Img(ctx context.Context, o GenerateOptions) (*GenerateResult, error) {
	if len(o.Init) == 0 {
		return nil, errors.New("img2img needs an init image")
	}
	o.Mask = nil
	return e.Generate(ctx, o)
}

// Inpaint repaints the masked part of an init image.
func (e *Engine) Inpaint(ctx context.Context, o GenerateOptions) (*GenerateResult, error) {
	if len(o.Init) == 0 || len(o.Mask) == 0 {
		return nil, errors.New("inpaint needs an init image and a mask")
	}
	return e.Generate(ctx, o)
}

// Generate runs txt2img, img2img (Init) or inpaint (Init and Mask) and writes
// a run directory: input.png and mask.png when given, image-N.png, params.json.
func (e *Engine) Generate(ctx context.Context, o GenerateOptions) (*GenerateResult, error) {
	t0 := time.Now()
	kind := "txt2img"
	req := binding.GenerateRequest{
		Prompt: o.Prompt, NegativePrompt: o.NegativePrompt, Width: o.Width, Height: o.Height, Steps: o.Steps,
		CFGScale: o.CFGScale, Seed: o.Seed, Sampler: o.Sampler, BatchSize: o.BatchSize, Strength: o.Strength,
		Preview: o.Preview, PreviewEvery: o.PreviewEvery, OnStep: o.OnStep,
	}
	if req.Steps == 0 {
		req.Steps = 20
	}
	if req.CFGScale == 0 {
		req.CFGScale = 7.5
	}
	if req.BatchSize == 0 {
		req.BatchSize = 1
	}
	if len(o.Mask) > 0 && len(o.Init) == 0 {
		return nil, errors.New("a mask needs an init image")
	}
	var input *image.NRGBA
	var mask *Mask
	if len(o.Init) > 0 {
		kind = "img2img"
		img, err := DecodeImage(o.Init, e.MaxPixels)
		if err != nil {
			return nil, fmt.Errorf("init image: %w", err)
		}
		input = toNRGBA(img)
		opaque(input)
		b := input.Rect
		if req.Width == 0 {
			req.Width = b.Dx() / 8 * 8
		}
		if req.Height == 0 {
			req.Height = b.Dy() / 8 * 8
		}
		if req.Width < 8 || req.Height < 8 {
			return nil, fmt.Errorf("%w: the init image is %dx%d, smaller than 8x8", ErrBadImage, b.Dx(), b.Dy())
		}
		if len(o.Mask) > 0 {
			kind = "inpaint"
			mimg, err := DecodeImage(o.Mask, e.MaxPixels)
			if err != nil {
				return nil, fmt.Errorf("mask: %w", err)
			}
			if mimg.Bounds().Size() != b.Size() {
				return nil, fmt.Errorf("%w: the mask is %dx%d, the init image %dx%d", ErrBadImage,
					mimg.Bounds().Dx(), mimg.Bounds().Dy(), b.Dx(), b.Dy())
			}
			mask = MaskFromImage(mimg, 0)
			work := mask.Resize(req.Width, req.Height)
			work.Feather(o.MaskBlur)
			req.Mask = &binding.Image{Width: req.Width, Height: req.Height, Channels: 1, Pix: work.Pix}
			if req.Strength == 0 {
				req.Strength = DefaultStrength(true)
			}
		} else if req.Strength == 0 {
			req.Strength = DefaultStrength(false)
		}
		req.Init = RGB(Resize(input, req.Width, req.Height))
	} else {
		if req.Width == 0 {
			req.Width = 512
		}
		if req.Height == 0 {
			req.Height = 512
		}
		req.Strength = 0
	}
	sd, err := e.acquire(ctx, binding.KindSD, o.SD)
	if err != nil {
		return nil, err
	}
	defer sd.Release()
	run, err := e.Runs.Begin()
	if err != nil {
		return nil, err
	}
	defer run.Abort()
	if o.OnRun != nil {
		o.OnRun(run.ID)
	}
	res, err := sd.SD().Generate(ctx, req)
	if err != nil {
		return nil, err
	}
	out := &GenerateResult{RunID: run.ID}
	if input != nil {
		if err := run.WritePNG("input.png", input); err != nil {
			return nil, err
		}
	}
	if mask != nil {
		if err := run.WritePNG("mask.png", mask.Image()); err != nil {
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
	timings := map[string]float64{"text": res.Text.Seconds(), "denoise": res.Denoise.Seconds(),
		"decode": res.Decode.Seconds(), "total": time.Since(t0).Seconds()}
	out.Params = GenerateParams{
		RunParams: e.runParams(kind, o.Prompt, o.NegativePrompt, o.Seed, o.Sampler, req.Steps, req.CFGScale, o.SD.Path,
			sd.Info(), timings),
		Width: req.Width, Height: req.Height, BatchSize: req.BatchSize, Strength: req.Strength, MaskBlur: o.MaskBlur,
		Tokens: res.Tokens, Truncated: res.Truncated,
	}
	if err := run.WriteJSON("params.json", out.Params); err != nil {
		return nil, err
	}
	if out.Dir, err = run.Commit(); err != nil {
		return nil, err
	}
	return out, nil
}

// DefaultStrength is the denoising strength when none is given: inpainting
// repaints its region whole, img2img keeps a quarter of the image.
func DefaultStrength(inpaint bool) float32 {
	if inpaint {
		return 1
	}
	return 0.75
}
