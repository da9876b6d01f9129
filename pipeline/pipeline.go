package pipeline

import (
	"context"
	"errors"
	"fmt"
	"image"
	"math"
	"time"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/modelcache"
	"github.com/stepwise-sd/stepwise/models"
)

// Runner runs the pipelines: it acquires models from the cache, writes run
// directories, and is the only place that knows the order of the steps.
type Runner struct {
	Cache *modelcache.Cache
	Runs  *Runs
	// ConvertDir holds safetensors conversions of pickle checkpoints.
	ConvertDir string
	// MaxPixels bounds decoded inputs (0: DefaultMaxPixels).
	MaxPixels int
	// Version is recorded in params.json.
	Version string
}

// ModelRef names a model and how to load it.
type ModelRef struct {
	Path   string
	VAE    string        // a VAE that replaces the model's own; empty: its own
	Device string        // empty: the library's device
	DType  binding.DType // auto: the device's default
	// Backend runs an SD model (the zero value: libtorch).
	Backend binding.Backend
}

// ResolveModel is the one place a model reference becomes a cache key, for
// jobs and for the server's load and unload alike: a pickle checkpoint
// (.ckpt, .pth) becomes its safetensors conversion, made once under
// ConvertDir and found again by a stat, then the path, device and dtype are
// resolved, and the backend checked for this process.
func (e *Runner) ResolveModel(kind modelcache.Kind, m ModelRef) (modelcache.Key, error) {
	if err := e.Cache.BackendAvailable(m.Backend); err != nil {
		return modelcache.Key{}, err
	}
	path, err := models.Resolve(m.Path, e.ConvertDir)
	if err != nil {
		return modelcache.Key{}, err
	}
	device := m.Device
	if device == "" {
		device = m.Backend.DefaultDevice()
	}
	key, err := e.Cache.KeyFor(kind, path, device, m.DType)
	if err == nil {
		key, err = key.WithBackend(m.Backend)
	}
	if err != nil || m.VAE == "" {
		return key, err
	}
	vae, err := models.Resolve(m.VAE, e.ConvertDir) // a .ckpt/.pt VAE is converted like a model
	if err != nil {
		return modelcache.Key{}, fmt.Errorf("VAE: %w", err)
	}
	return key.WithVAE(vae)
}

func (e *Runner) acquire(ctx context.Context, kind modelcache.Kind, m ModelRef) (*modelcache.Ref, error) {
	key, err := e.ResolveModel(kind, m)
	if err != nil {
		return nil, err
	}
	return e.Cache.Acquire(ctx, key)
}

// SegmentOptions say how to find the subject.
type SegmentOptions struct {
	Model ModelRef
	// Scale resizes the image for the network (the segmentation project's
	// --scale; 0: DefaultSegmentScale). The mask comes back at the image's
	// full size.
	Scale float64
	// Classes are the subject's classes; empty: every class but 0.
	Classes []int
	// Threshold decides one-class models (0: DefaultSegmentThreshold).
	Threshold float32
}

// MinSegmentSide is the smallest side the segmentation U-Net accepts after
// scaling (four 2x poolings).
const MinSegmentSide = 16

// SegmentResult is a subject mask at the image's size.
type SegmentResult struct {
	Mask    *Mask // 255 subject
	Logits  binding.Tensor
	Classes int
	Elapsed time.Duration
	Model   binding.ModelInfo
}

// Segment finds the subject of img.
func (e *Runner) Segment(ctx context.Context, img image.Image, o SegmentOptions, logits bool) (*SegmentResult, error) {
	ref, err := e.acquire(ctx, modelcache.KindSeg, o.Model)
	if err != nil {
		return nil, err
	}
	defer ref.Release()
	return segmentWith(ctx, ref.Seg(), img, o, logits)
}

func segmentWith(ctx context.Context, m *binding.SegModel, img image.Image, o SegmentOptions, logits bool) (*SegmentResult, error) {
	o.normalize()
	scale := o.Scale
	if scale > 4 {
		return nil, fmt.Errorf("segmentation scale %g is out of range (0, 4]", scale)
	}
	b := img.Bounds()
	w, h := int(scale*float64(b.Dx())), int(scale*float64(b.Dy()))
	if w < MinSegmentSide || h < MinSegmentSide {
		return nil, fmt.Errorf("%w: %dx%d at scale %g is %dx%d; the segmentation model needs at least %dx%d",
			ErrBadImage, b.Dx(), b.Dy(), scale, w, h, MinSegmentSide, MinSegmentSide)
	}
	res, err := m.Segment(ctx, binding.SegmentRequest{
		Image: RGB(ResizeBicubic(img, w, h)), OutWidth: b.Dx(), OutHeight: b.Dy(),
		Threshold: o.Threshold, Subject: o.Classes, Logits: logits,
	})
	if err != nil {
		return nil, err
	}
	return &SegmentResult{
		Mask:   &Mask{Width: res.Mask.Width, Height: res.Mask.Height, Pix: res.Mask.Pix},
		Logits: res.Logits, Classes: res.Classes, Elapsed: res.Elapsed, Model: m.Info(),
	}, nil
}

// WorkingSize scales w x h so the long side is long (kept aspect), each side
// rounded to a multiple of 8 and at least 8.
func WorkingSize(w, h, long int) (int, int) {
	s := float64(long) / math.Max(float64(w), float64(h))
	round8 := func(v float64) int {
		n := int(math.Round(v/8)) * 8
		if n < 8 {
			n = 8
		}
		return n
	}
	return round8(float64(w) * s), round8(float64(h) * s)
}

// EditOptions describe one edit. Start from DefaultEditOptions: the zero
// value is no default.
type EditOptions struct {
	SD      ModelRef
	Segment SegmentOptions
	Prompt  string
	// NegativePrompt, Steps, CFGScale, Seed, Sampler as for generation.
	NegativePrompt string
	Steps          int
	CFGScale       float32
	Seed           uint64
	Sampler        binding.Sampler
	// WorkingSize is the long side the inpainting runs at (0: DefaultSize).
	WorkingSize int
	// RepaintSubject repaints the subject instead of the background.
	RepaintSubject bool
	// Grow dilates (> 0) or erodes (< 0) the repaint region, in pixels.
	Grow int
	// MaskBlur feathers the repaint region's edge, in pixels (sigma), inward only.
	MaskBlur     float64
	Preview      binding.Preview
	PreviewEvery int // 0: DefaultPreviewEvery
	OnStep       func(binding.Step)
	// OnRun, when set, learns the run's ID as soon as it exists.
	OnRun func(id string)
}

// EditResult is a finished edit.
type EditResult struct {
	RunID      string
	Dir        string
	Input      image.Image
	Mask       *Mask // the subject in the input
	Edited     image.Image
	EditedMask *Mask   // the subject in the edited image
	IoU        float64 // of Mask and EditedMask: how well the subject survived
	Params     EditParams
}

// RunParams are the params.json fields every run shares: enough, with the
// kind's own fields, to reproduce it.
type RunParams struct {
	Kind           string             `json:"kind"`
	Stepwise       string             `json:"stepwise"`
	Prompt         string             `json:"prompt"`
	NegativePrompt string             `json:"negative_prompt"`
	Seed           uint64             `json:"seed"`
	Sampler        string             `json:"sampler"`
	Steps          int                `json:"steps"`
	CFGScale       float32            `json:"cfg_scale"`
	SDModel        ModelIdentity      `json:"sd_model"`
	Timings        map[string]float64 `json:"seconds"`
	Created        string             `json:"created"`
}

// EditParams is params.json of an edit run.
type EditParams struct {
	RunParams
	Repaint      string        `json:"repaint"`
	Grow         int           `json:"grow"`
	MaskBlur     float64       `json:"mask_blur"`
	InputSize    [2]int        `json:"input_size"`
	WorkingSize  [2]int        `json:"working_size"`
	SegScale     float64       `json:"segment_scale"`
	SegClasses   []int         `json:"segment_classes,omitempty"`
	SegModel     ModelIdentity `json:"seg_model"`
	SubjectCover float64       `json:"subject_fraction"`
	IoU          float64       `json:"subject_iou"`
}

// ModelIdentity records which model ran.
type ModelIdentity struct {
	Path   string `json:"path"`
	Arch   string `json:"arch"`
	Params int64  `json:"params"`
	Device string `json:"device"`
	DType  string `json:"dtype"`
}

func (e *Runner) runParams(kind, prompt, negative string, seed uint64, sampler binding.Sampler, steps int, cfg float32,
	sdPath string, sdInfo binding.ModelInfo, timings map[string]float64) RunParams {
	return RunParams{
		Kind: kind, Stepwise: e.Version, Prompt: prompt, NegativePrompt: negative, Seed: seed, Sampler: sampler.String(),
		Steps: steps, CFGScale: cfg, SDModel: identity(sdPath, sdInfo), Timings: timings,
		Created: time.Now().UTC().Format(time.RFC3339),
	}
}

func identity(path string, info binding.ModelInfo) ModelIdentity {
	return ModelIdentity{Path: path, Arch: info.Arch, Params: info.Params, Device: info.Device, DType: info.DType.String()}
}

// ErrNoSubject is returned when the segmentation finds nothing to keep (or,
// when repainting the subject, nothing to repaint).
var ErrNoSubject = errors.New("the segmentation found no subject")

// Edit keeps the subject of input and repaints the rest from the prompt:
// segment → mask → invert → inpaint at working size → paste the untouched
// pixels back at full resolution → segment the result → IoU. It writes a run
// directory (input.png, mask.png, edited.png, edited_mask.png, params.json)
// that appears whole or not at all.
func (e *Runner) Edit(ctx context.Context, input []byte, o EditOptions) (*EditResult, error) {
	t0 := time.Now()
	img, err := DecodeImage(input, e.MaxPixels)
	if err != nil {
		return nil, err
	}
	if o.Prompt == "" {
		return nil, errors.New("edit: the prompt is empty")
	}
	o.normalize()
	src := toNRGBA(img)
	opaque(src)
	b := src.Rect
	seg, err := e.acquire(ctx, modelcache.KindSeg, o.Segment.Model)
	if err != nil {
		return nil, err
	}
	defer seg.Release()
	sd, err := e.acquire(ctx, modelcache.KindSD, o.SD)
	if err != nil {
		return nil, err
	}
	defer sd.Release()

	timings := map[string]float64{}
	subject, err := segmentWith(ctx, seg.Seg(), src, o.Segment, false)
	if err != nil {
		return nil, err
	}
	timings["segment"] = subject.Elapsed.Seconds()
	repaint := subject.Mask.Clone()
	if !o.RepaintSubject {
		repaint.Invert()
	}
	repaint.Grow(o.Grow)
	if cover := repaint.Covers(); cover == 0 || cover == 1 {
		what := "nothing to repaint"
		if cover == 1 {
			what = "everything to repaint"
		}
		return nil, fmt.Errorf("%w: %s (subject covers %.1f%% of the image)", ErrNoSubject, what, 100*subject.Mask.Covers())
	}

	ww, wh := WorkingSize(b.Dx(), b.Dy(), o.WorkingSize)
	run, err := e.Runs.Begin()
	if err != nil {
		return nil, err
	}
	defer run.Abort() // no-op once committed
	if o.OnRun != nil {
		o.OnRun(run.ID)
	}
	workMask := repaint.Resize(ww, wh)
	workMask.Threshold(128)
	t := time.Now()
	gen, err := sd.SD().Generate(ctx, binding.GenerateRequest{
		Prompt: o.Prompt, NegativePrompt: o.NegativePrompt, Width: ww, Height: wh, Steps: o.Steps, BatchSize: 1,
		CFGScale: o.CFGScale, Sampler: o.Sampler, Seed: o.Seed, Strength: DefaultInpaintStrength,
		Init: RGB(Resize(src, ww, wh)), Mask: &binding.Image{Width: ww, Height: wh, Channels: 1, Pix: workMask.Pix},
		Preview: o.Preview, PreviewEvery: o.PreviewEvery, OnStep: o.OnStep,
	})
	if err != nil {
		return nil, err
	}
	timings["inpaint"] = time.Since(t).Seconds()

	// Paste back: only the repaint region changes; its edge is feathered inward.
	alpha := repaint.Clone()
	if err := alpha.Feather(ctx, o.MaskBlur); err != nil {
		return nil, err
	}
	for i, v := range repaint.Pix {
		alpha.Pix[i] = min(alpha.Pix[i], v)
	}
	generated := Resize(ToImage(gen.Images[0]), b.Dx(), b.Dy())
	edited := composite(src, generated, alpha)

	after, err := segmentWith(ctx, seg.Seg(), edited, o.Segment, false)
	if err != nil {
		return nil, err
	}
	timings["resegment"] = after.Elapsed.Seconds()
	iou, err := IoU(subject.Mask, after.Mask)
	if err != nil {
		return nil, err
	}
	params := EditParams{
		RunParams: e.runParams("edit", o.Prompt, o.NegativePrompt, o.Seed, o.Sampler, o.Steps, o.CFGScale, o.SD.Path, sd.Info(), timings),
		Repaint:   "background", Grow: o.Grow, MaskBlur: o.MaskBlur, InputSize: [2]int{b.Dx(), b.Dy()},
		WorkingSize: [2]int{ww, wh}, SegScale: o.Segment.Scale, SegClasses: o.Segment.Classes,
		SegModel: identity(o.Segment.Model.Path, seg.Info()), SubjectCover: subject.Mask.Covers(), IoU: iou,
	}
	if o.RepaintSubject {
		params.Repaint = "subject"
	}
	timings["total"] = time.Since(t0).Seconds()
	for _, f := range []struct {
		name string
		img  image.Image
	}{{"input.png", src}, {"mask.png", subject.Mask.Image()}, {"edited.png", edited}, {"edited_mask.png", after.Mask.Image()}} {
		if err := run.WritePNG(f.name, f.img); err != nil {
			return nil, err
		}
	}
	if err := run.WriteJSON("params.json", params); err != nil {
		return nil, err
	}
	dir, err := run.Commit()
	if err != nil {
		return nil, err
	}
	return &EditResult{RunID: run.ID, Dir: dir, Input: src, Mask: subject.Mask, Edited: edited,
		EditedMask: after.Mask, IoU: iou, Params: params}, nil
}

// opaque drops any alpha: the engine works on RGB.
func opaque(img *image.NRGBA) {
	for i := 3; i < len(img.Pix); i += 4 {
		img.Pix[i] = 255
	}
}

// composite is base where alpha is 0, over where alpha is 255, blended between.
func composite(base, over *image.NRGBA, alpha *Mask) *image.NRGBA {
	out := image.NewNRGBA(base.Rect)
	copy(out.Pix, base.Pix)
	for i, a := range alpha.Pix {
		if a == 0 {
			continue
		}
		for c := 0; c < 3; c++ {
			p := 4*i + c
			v := (int(base.Pix[p])*(255-int(a)) + int(over.Pix[p])*int(a) + 127) / 255
			out.Pix[p] = byte(v)
		}
	}
	return out
}
