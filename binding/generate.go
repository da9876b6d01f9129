package binding

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/ebitengine/purego"
)

// Sampler is a denoising sampler, as in sw_sampler.
type Sampler int32

// The samplers.
const (
	DDIM          Sampler = 0
	Euler         Sampler = 1
	EulerA        Sampler = 2
	DPMPP2M       Sampler = 3
	DPMPP2MKarras Sampler = 4
	PNDM          Sampler = 5
)

// SamplerInfo names a sampler as the engine does (sw_sampler). Other
// vocabularies, such as AUTOMATIC1111's display names, belong to their adapters.
type SamplerInfo struct {
	Sampler Sampler
	Name    string // e.g. "dpmpp_2m_karras"
}

// Samplers lists every sampler, in a stable order.
var Samplers = []SamplerInfo{
	{Euler, "euler"}, {EulerA, "euler_a"}, {DPMPP2M, "dpmpp_2m"}, {DPMPP2MKarras, "dpmpp_2m_karras"}, {DDIM, "ddim"}, {PNDM, "pndm"},
}

// ErrUnknownSampler is returned for a name that names no sampler.
var ErrUnknownSampler = errors.New("unknown sampler")

// ParseSampler accepts a sampler's name, case-insensitively.
func ParseSampler(s string) (Sampler, error) {
	key := strings.ToLower(strings.TrimSpace(s))
	names := make([]string, len(Samplers))
	for i, si := range Samplers {
		if key == si.Name {
			return si.Sampler, nil
		}
		names[i] = si.Name
	}
	return 0, fmt.Errorf("%w %q (want one of %s)", ErrUnknownSampler, s, strings.Join(names, ", "))
}

func (s Sampler) String() string {
	for _, si := range Samplers {
		if si.Sampler == s {
			return si.Name
		}
	}
	return fmt.Sprintf("sampler(%d)", int32(s))
}

// Preview is how per-step previews are made, as in sw_preview.
type Preview int32

// Preview modes.
const (
	PreviewNone       Preview = 0
	PreviewLatent2RGB Preview = 1 // a linear projection of the predicted clean latents, every step
	PreviewVAE        Preview = 2 // a VAE decode of the predicted clean latents, every PreviewEvery steps
)

// ParsePreview reads "none", "latent2rgb" or "vae".
func ParsePreview(s string) (Preview, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "none":
		return PreviewNone, nil
	case "latent2rgb":
		return PreviewLatent2RGB, nil
	case "vae":
		return PreviewVAE, nil
	}
	return 0, fmt.Errorf("unknown preview mode %q (want none, latent2rgb or vae)", s)
}

func (p Preview) String() string {
	switch p {
	case PreviewLatent2RGB:
		return "latent2rgb"
	case PreviewVAE:
		return "vae"
	}
	return "none"
}

// Image is a plain 8-bit image: Channels is 3 (RGB) or 1 (gray); pixel (x, y)
// channel c is Pix[(y*Width+x)*Channels+c].
type Image struct {
	Width, Height, Channels int
	Pix                     []byte
}

// Step reports one finished denoising step.
type Step struct {
	Step, Steps int // Step is 1-based
	Timestep    float64
	Sigma       float64
	Elapsed     time.Duration // since the first step began
	Previews    []Image       // one per batch image when a preview was made this step
}

// GenerateRequest is one txt2img, img2img (Init) or inpaint (Init + Mask) run.
// Every field goes to the engine as given, zeros included (the engine refuses
// those it cannot use, e.g. 0 steps or a PreviewEvery of 0): the defaults are
// the caller's, in one place (package pipeline).
type GenerateRequest struct {
	Prompt, NegativePrompt string
	Width, Height          int
	Steps                  int
	BatchSize              int
	CFGScale               float32
	Sampler                Sampler
	Seed                   uint64
	Init                   *Image  // RGB, Width x Height
	Strength               float32 // img2img / inpaint, (0, 1]
	Mask                   *Image  // gray, Width x Height, >= 128 repaints
	ClipSkip               int
	Preview                Preview
	PreviewEvery           int
	// OnStep is called after every step on the engine's thread: it must return
	// quickly (copy, hand off, return). Cancel through the context.
	OnStep func(Step)
}

// Tensor is a float32 tensor on the host.
type Tensor struct {
	Shape []int
	Data  []float32
}

// GenerateResult holds a run's outputs.
type GenerateResult struct {
	Images    []Image // RGB
	Latents   Tensor  // [B, 4, H/8, W/8], final, before the VAE scaling
	Pixels    Tensor  // [B, H, W, 3] in 0..1, before 8-bit quantisation
	Tokens    int     // BPE tokens of the prompt
	Truncated bool    // the prompt was cut to the text encoder's length
	Text      time.Duration
	Denoise   time.Duration
	Decode    time.Duration
}

type cImage struct {
	Width, Height, Channels, Stride int32
	Data                            *byte
}

type cStepInfo struct {
	Step, Steps    int32
	Timestep       float64
	Sigma          float64
	ElapsedSeconds float64
	PreviewCount   int32
	Previews       *cImage
}

type cGenerateParams struct {
	Prompt         *byte
	NegativePrompt *byte
	Width          int32
	Height         int32
	Steps          int32
	BatchSize      int32
	CFGScale       float32
	Sampler        int32
	Seed           uint64
	InitImage      *cImage
	Strength       float32
	Mask           *cImage
	ClipSkip       int32
	Preview        int32
	PreviewEvery   int32
	Callback       uintptr
	UserData       uintptr
}

type cGenerateResult struct {
	Count          int32
	Images         *cImage
	LatentShape    [4]int32
	Latents        *float32
	Pixels         *float32
	Tokens         int32
	Truncated      int32
	SecondsText    float64
	SecondsDenoise float64
	SecondsDecode  float64
}

// generation is the Go side of one sw_sd_generate call, found by its id from
// the step callback.
type generation struct {
	ctx    context.Context
	onStep func(Step)
	panic  any
}

var (
	generations sync.Map // uintptr id -> *generation
	nextGenID   atomic.Uintptr
	// stepCallback is the one trampoline for every generation's steps.
	stepCallback = sync.OnceValue(func() uintptr { return purego.NewCallback(onStep) })
)

func onStep(info *cStepInfo, id uintptr) (cancel int32) {
	v, ok := generations.Load(id)
	if !ok {
		return 1
	}
	g := v.(*generation)
	defer func() {
		if r := recover(); r != nil {
			g.panic = r
			cancel = 1
		}
	}()
	if g.onStep != nil {
		s := Step{
			Step: int(info.Step), Steps: int(info.Steps), Timestep: info.Timestep, Sigma: info.Sigma,
			Elapsed: time.Duration(info.ElapsedSeconds * float64(time.Second)),
		}
		if info.PreviewCount > 0 && info.Previews != nil {
			for _, ci := range unsafe.Slice(info.Previews, int(info.PreviewCount)) {
				s.Previews = append(s.Previews, copyImage(&ci))
			}
		}
		g.onStep(s)
	}
	if g.ctx.Err() != nil {
		return 1
	}
	return 0
}

func copyImage(ci *cImage) Image {
	w, h, c := int(ci.Width), int(ci.Height), int(ci.Channels)
	img := Image{Width: w, Height: h, Channels: c, Pix: make([]byte, w*h*c)}
	src := unsafe.Slice(ci.Data, int(ci.Stride)*h)
	for y := 0; y < h; y++ {
		copy(img.Pix[y*w*c:(y+1)*w*c], src[y*int(ci.Stride):])
	}
	return img
}

func (img *Image) c(pin *runtime.Pinner, what string, channels int) (*cImage, error) {
	if img.Channels != channels {
		return nil, fmt.Errorf("%s must have %d channels, has %d", what, channels, img.Channels)
	}
	if img.Width <= 0 || img.Height <= 0 || len(img.Pix) != img.Width*img.Height*img.Channels {
		return nil, fmt.Errorf("%s: %dx%dx%d does not match %d bytes of pixels", what, img.Width, img.Height, img.Channels, len(img.Pix))
	}
	pin.Pin(&img.Pix[0])
	ci := &cImage{Width: int32(img.Width), Height: int32(img.Height), Channels: int32(img.Channels),
		Stride: int32(img.Width * img.Channels), Data: &img.Pix[0]}
	pin.Pin(ci)
	return ci, nil
}

// ErrModelClosed is returned by calls on a closed model.
var ErrModelClosed = errors.New("model is closed")

// Generate runs one generation. Cancelling ctx stops it inside the step (or
// decode) in progress, between network blocks; the error then matches
// ErrCancelled and the model stays usable. A prompt containing a NUL byte is
// refused (ErrInvalidArgument): the engine reads C strings and would see
// only what comes before it.
func (m *SDModel) Generate(ctx context.Context, r GenerateRequest) (*GenerateResult, error) {
	for _, f := range []struct{ name, text string }{{"prompt", r.Prompt}, {"negative prompt", r.NegativePrompt}} {
		if i := strings.IndexByte(f.text, 0); i >= 0 {
			return nil, fmt.Errorf("generate: %w: the %s has a NUL byte at offset %d", ErrInvalidArgument, f.name, i)
		}
	}
	return call(ctx, m.model, func(h uintptr, pin *runtime.Pinner) (*GenerateResult, error) {
		return m.generate(ctx, h, pin, r)
	})
}

func (m *SDModel) generate(ctx context.Context, h uintptr, pin *runtime.Pinner, r GenerateRequest) (*GenerateResult, error) {
	var p cGenerateParams
	m.lib.fn.genDefaultParams(&p)
	p.Prompt, p.NegativePrompt = pinStr(pin, r.Prompt), pinStr(pin, r.NegativePrompt)
	p.Width, p.Height, p.Steps, p.BatchSize = int32(r.Width), int32(r.Height), int32(r.Steps), int32(r.BatchSize)
	p.CFGScale, p.Sampler, p.Seed = r.CFGScale, int32(r.Sampler), r.Seed
	p.Strength, p.ClipSkip, p.Preview, p.PreviewEvery = r.Strength, int32(r.ClipSkip), int32(r.Preview), int32(r.PreviewEvery)
	var err error
	if r.Init != nil {
		if p.InitImage, err = r.Init.c(pin, "init image", 3); err != nil {
			return nil, fmt.Errorf("generate: %w", err)
		}
	}
	if r.Mask != nil {
		if p.Mask, err = r.Mask.c(pin, "mask", 1); err != nil {
			return nil, fmt.Errorf("generate: %w", err)
		}
	}
	g := &generation{ctx: ctx, onStep: r.OnStep}
	id := nextGenID.Add(1)
	generations.Store(id, g)
	defer generations.Delete(id)
	p.Callback, p.UserData = stepCallback(), id

	var res *cGenerateResult
	var ce cError
	status := m.lib.fn.generate(h, &p, &res, &ce)
	if g.panic != nil {
		if res != nil {
			m.lib.fn.genResultFree(res)
		}
		return nil, fmt.Errorf("generate: step callback panicked: %v", g.panic)
	}
	if err := check("sw_sd_generate", status, &ce); err != nil {
		return nil, fmt.Errorf("generate: %w", err)
	}
	defer m.lib.fn.genResultFree(res)
	out := &GenerateResult{
		Tokens: int(res.Tokens), Truncated: res.Truncated != 0,
		Text:    time.Duration(res.SecondsText * float64(time.Second)),
		Denoise: time.Duration(res.SecondsDenoise * float64(time.Second)),
		Decode:  time.Duration(res.SecondsDecode * float64(time.Second)),
	}
	for _, ci := range unsafe.Slice(res.Images, int(res.Count)) {
		out.Images = append(out.Images, copyImage(&ci))
	}
	shape := []int{int(res.LatentShape[0]), int(res.LatentShape[1]), int(res.LatentShape[2]), int(res.LatentShape[3])}
	out.Latents = Tensor{Shape: shape, Data: append([]float32(nil), unsafe.Slice(res.Latents, shape[0]*shape[1]*shape[2]*shape[3])...)}
	if len(out.Images) > 0 {
		h, w := out.Images[0].Height, out.Images[0].Width
		out.Pixels = Tensor{Shape: []int{len(out.Images), h, w, 3},
			Data: append([]float32(nil), unsafe.Slice(res.Pixels, len(out.Images)*h*w*3)...)}
	}
	return out, nil
}

// Tokenize returns the BPE ids of text (no BOS/EOS, untruncated).
func (m *SDModel) Tokenize(text string) ([]int64, error) {
	if strings.IndexByte(text, 0) >= 0 {
		return nil, fmt.Errorf("tokenize: %w: the text has a NUL byte", ErrInvalidArgument)
	}
	return call(context.Background(), m.model, func(h uintptr, _ *runtime.Pinner) ([]int64, error) {
		var count int32
		var ce cError
		ids := make([]int64, 256)
		if err := check("sw_sd_tokenize", m.lib.fn.tokenize(h, text, &ids[0], int32(len(ids)), &count, &ce), &ce); err != nil {
			return nil, err
		}
		if int(count) > len(ids) {
			ids = make([]int64, count)
			if err := check("sw_sd_tokenize", m.lib.fn.tokenize(h, text, &ids[0], count, &count, &ce), &ce); err != nil {
				return nil, err
			}
		}
		return ids[:count], nil
	})
}
