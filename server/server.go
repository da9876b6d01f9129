// Package server is stepwise's HTTP and websocket API: jobs on a bounded
// queue, per-step events and previews streamed to every watcher, the
// AUTOMATIC1111 API subset that existing clients speak, and a page to watch
// denoising live.
package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"image"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// Config is the server's configuration; zero values take the defaults.
type Config struct {
	Model    string // Stable Diffusion model path
	SegModel string // segmentation model path
	DType    binding.DType
	// Token, when set, must come as "Authorization: Bearer <token>" (or
	// ?token= on websockets, which browsers cannot give headers).
	Token string
	// AllowedOrigins lists the origins, besides the server's own, whose pages
	// may open websockets and call the API.
	AllowedOrigins []string
	MaxQueue       int   // waiting jobs (64)
	Concurrency    int   // jobs running at once on the device (1)
	MaxBodyBytes   int64 // request size (32 MiB)
	MaxPixels      int   // pixels of an uploaded image (16 M)
	MaxSide        int   // width/height of a generation (2048)
	MaxSteps       int   // denoising steps (150)
	MaxBatch       int   // images per job (8)
	// CancelOnShutdown cancels running jobs at shutdown instead of letting them finish.
	CancelOnShutdown bool
	// KeepJobs is how many finished jobs stay listed (200).
	KeepJobs int
	Logger   *slog.Logger
}

func (c *Config) defaults() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.MaxQueue, 64)
	def(&c.Concurrency, 1)
	def(&c.MaxPixels, 16<<20)
	def(&c.MaxSide, 2048)
	def(&c.MaxSteps, 150)
	def(&c.MaxBatch, 8)
	def(&c.KeepJobs, 200)
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = 32 << 20
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Server runs jobs and serves the API.
type Server struct {
	cfg     Config
	engine  *pipeline.Engine
	log     *slog.Logger
	hub     *hub
	queue   *queue
	metrics *metrics

	mu      sync.Mutex
	jobs    map[string]*Job
	order   []string // job IDs, oldest first
	wg      sync.WaitGroup
	baseCtx context.Context
	stop    context.CancelFunc
}

// New makes a server over engine and starts its workers.
func New(cfg Config, engine *pipeline.Engine) *Server {
	cfg.defaults()
	ctx, stop := context.WithCancel(context.Background())
	s := &Server{cfg: cfg, engine: engine, log: cfg.Logger, hub: newHub(cfg.Logger), jobs: map[string]*Job{},
		baseCtx: ctx, stop: stop, metrics: newMetrics()}
	s.queue = newQueue(cfg.MaxQueue, func(j *Job) { s.publishState(j, "queued") })
	for i := 0; i < cfg.Concurrency; i++ {
		s.wg.Add(1)
		go s.worker()
	}
	return s
}

// JobParams are a job's parameters; names follow the A1111 API where it has one.
type JobParams struct {
	Prompt            string  `json:"prompt"`
	NegativePrompt    string  `json:"negative_prompt"`
	Width             int     `json:"width"`
	Height            int     `json:"height"`
	Steps             int     `json:"steps"`
	CFGScale          float32 `json:"cfg_scale"`
	Seed              int64   `json:"seed"`
	SamplerName       string  `json:"sampler_name"`
	DenoisingStrength float32 `json:"denoising_strength"`
	BatchSize         int     `json:"batch_size"`
	MaskBlur          float64 `json:"mask_blur"`
	Preview           string  `json:"preview"`
	PreviewEvery      int     `json:"preview_every"`
	// Image and Mask are base64 (optionally a data: URL); multipart uploads fill them too.
	Image string `json:"image,omitempty"`
	Mask  string `json:"mask,omitempty"`
	// Edit and segment.
	RepaintSubject bool    `json:"repaint_subject,omitempty"`
	Grow           int     `json:"grow,omitempty"`
	SegmentScale   float64 `json:"segment_scale,omitempty"`
	Classes        []int   `json:"classes,omitempty"`
	WorkingSize    int     `json:"working_size,omitempty"`
}

// DefaultParams are what a request leaves out: requests are decoded on top
// of them, so an explicit 0 stays 0 (and is refused where it is invalid).
// The values are the pipeline's defaults; previews default on for the page.
func DefaultParams() JobParams {
	d := pipeline.DefaultGenerateOptions()
	return JobParams{Steps: d.Steps, CFGScale: d.CFGScale, Seed: -1, SamplerName: d.Sampler.String(),
		BatchSize: d.BatchSize, Preview: binding.PreviewLatent2RGB.String(), PreviewEvery: d.PreviewEvery, MaskBlur: d.MaskBlur}
}

// Kinds of job.
var jobKinds = map[string]bool{"txt2img": true, "img2img": true, "inpaint": true, "segment": true, "edit": true}

// apiError is an error with its HTTP status.
type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func badRequest(format string, a ...any) error {
	return &apiError{status: http.StatusBadRequest, msg: fmt.Sprintf(format, a...)}
}

// decoded holds a validated job's decoded inputs.
type decoded struct {
	sampler binding.Sampler
	preview binding.Preview
	image   []byte
	mask    []byte
	seed    uint64
}

func decodeB64(name, s string) ([]byte, error) {
	if i := strings.Index(s, ";base64,"); strings.HasPrefix(s, "data:") && i >= 0 {
		s = s[i+len(";base64,"):]
	}
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, badRequest("%s is not valid base64", name)
	}
	return b, nil
}

// validate checks a job's parameters against the server's limits and fills
// defaults; its errors are 400s.
func (s *Server) validate(kind string, p *JobParams) (*decoded, error) {
	if !jobKinds[kind] {
		return nil, badRequest("unknown kind %q (want txt2img, img2img, inpaint, segment or edit)", kind)
	}
	d := &decoded{}
	var err error
	if p.Image != "" {
		if d.image, err = decodeB64("image", p.Image); err != nil {
			return nil, err
		}
	}
	if p.Mask != "" {
		if d.mask, err = decodeB64("mask", p.Mask); err != nil {
			return nil, err
		}
	}
	for _, img := range [][]byte{d.image, d.mask} {
		if img == nil {
			continue
		}
		cfg, format, err := image.DecodeConfig(bytes.NewReader(img))
		if err != nil || (format != "png" && format != "jpeg") {
			return nil, badRequest("uploaded file is not a PNG or JPEG image")
		}
		if int64(cfg.Width)*int64(cfg.Height) > int64(s.cfg.MaxPixels) {
			return nil, badRequest("image is %dx%d, more than the %d pixels allowed", cfg.Width, cfg.Height, s.cfg.MaxPixels)
		}
	}
	switch kind {
	case "img2img", "segment", "edit":
		if d.image == nil {
			return nil, badRequest("%s needs an image", kind)
		}
	case "inpaint":
		if d.image == nil || d.mask == nil {
			return nil, badRequest("inpaint needs an image and a mask")
		}
	}
	if kind == "edit" || kind == "segment" {
		if s.cfg.SegModel == "" {
			return nil, badRequest("no segmentation model is configured (stepwise serve --seg-model)")
		}
	}
	if kind != "segment" && strings.TrimSpace(p.Prompt) == "" {
		return nil, badRequest("prompt is empty")
	}
	if p.Width < 0 || p.Height < 0 || p.Width > s.cfg.MaxSide || p.Height > s.cfg.MaxSide || p.Width%8 != 0 || p.Height%8 != 0 {
		return nil, badRequest("width and height must be multiples of 8 up to %d (got %dx%d)", s.cfg.MaxSide, p.Width, p.Height)
	}
	if p.Steps < 1 || p.Steps > s.cfg.MaxSteps {
		return nil, badRequest("steps must be between 1 and %d (got %d)", s.cfg.MaxSteps, p.Steps)
	}
	if p.BatchSize < 1 || p.BatchSize > s.cfg.MaxBatch {
		return nil, badRequest("batch_size must be between 1 and %d", s.cfg.MaxBatch)
	}
	if p.CFGScale < 0 || p.CFGScale > 30 {
		return nil, badRequest("cfg_scale must be between 0 and 30")
	}
	if p.DenoisingStrength < 0 || p.DenoisingStrength > 1 {
		return nil, badRequest("denoising_strength must be in (0, 1]")
	}
	if p.MaskBlur < 0 || p.MaskBlur > 64 {
		return nil, badRequest("mask_blur must be between 0 and 64")
	}
	if p.WorkingSize < 0 || p.WorkingSize > s.cfg.MaxSide || p.WorkingSize%8 != 0 {
		return nil, badRequest("working_size must be a multiple of 8 up to %d", s.cfg.MaxSide)
	}
	if d.sampler, err = binding.ParseSampler(p.SamplerName); err != nil {
		return nil, badRequest("%v", err)
	}
	if d.preview, err = binding.ParsePreview(p.Preview); err != nil {
		return nil, badRequest("%v", err)
	}
	if p.PreviewEvery < 1 || p.PreviewEvery > 1000 {
		return nil, badRequest("preview_every must be between 1 and 1000")
	}
	if p.Seed < 0 {
		var b [4]byte
		rand.Read(b[:])
		p.Seed = int64(b[0])<<24 | int64(b[1])<<16 | int64(b[2])<<8 | int64(b[3])
	}
	d.seed = uint64(p.Seed)
	return d, nil
}

func newID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Submit validates and queues a job. keepImages keeps its final images in
// memory for the caller (Job.takeImages) besides writing them to its run.
func (s *Server) Submit(kind string, p JobParams, source string, keepImages bool) (*Job, error) {
	d, err := s.validate(kind, &p)
	if err != nil {
		return nil, err
	}
	p.Image, p.Mask = "", "" // decoded into d; the base64 need not wait in the queue too
	j := newJob(newID(), kind, p)
	j.Source, j.keepImages, j.inputs = source, keepImages, d
	s.mu.Lock()
	s.jobs[j.ID] = j
	s.order = append(s.order, j.ID)
	s.forgetOldLocked()
	s.mu.Unlock()
	if err := s.queue.push(j); err != nil {
		s.mu.Lock()
		delete(s.jobs, j.ID)
		s.mu.Unlock()
		return nil, err
	}
	s.metrics.submitted.Add(1)
	s.publishState(j, "queued")
	return j, nil
}

// forgetOldLocked drops the oldest finished jobs beyond KeepJobs.
func (s *Server) forgetOldLocked() {
	for len(s.order) > s.cfg.KeepJobs {
		dropped := false
		for i, id := range s.order {
			j := s.jobs[id]
			if j == nil || func() bool { j.mu.Lock(); defer j.mu.Unlock(); return j.ended() }() {
				delete(s.jobs, id)
				s.order = append(s.order[:i], s.order[i+1:]...)
				dropped = true
				break
			}
		}
		if !dropped {
			return
		}
	}
}

// Job looks a job up.
func (s *Server) Job(id string) *Job {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.jobs[id]
}

// Jobs lists the known jobs, newest first.
func (s *Server) Jobs() []*Job {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*Job, 0, len(s.order))
	for i := len(s.order) - 1; i >= 0; i-- {
		if j := s.jobs[s.order[i]]; j != nil {
			out = append(out, j)
		}
	}
	return out
}

// Cancel cancels a queued or running job; it reports whether the job could be.
func (s *Server) Cancel(j *Job) bool {
	if s.queue.remove(j) {
		s.finish(j, StateCancelled, "cancelled while queued")
		return true
	}
	j.mu.Lock()
	cancel, state := j.cancel, j.state
	j.mu.Unlock()
	if state == StateRunning && cancel != nil {
		cancel()
		return true
	}
	return false
}

func (s *Server) worker() {
	defer s.wg.Done()
	for {
		j := s.queue.pop()
		if j == nil {
			return
		}
		s.run(j)
	}
}

func (s *Server) publishState(j *Job, typ string) {
	v := j.View()
	ev := Event{Type: typ, JobID: j.ID, Kind: j.Kind, State: v.State, Position: v.Position, Step: v.Step, Steps: v.Steps,
		Progress: v.Progress, Elapsed: v.Elapsed, ETA: v.ETA, Files: v.Files, Result: v.Result, Error: v.Error, Time: time.Now()}
	s.hub.publish(ev)
}

func (s *Server) finish(j *Job, state, msg string) {
	j.mu.Lock()
	if j.ended() {
		j.mu.Unlock()
		return
	}
	j.state, j.err, j.finished, j.cancel, j.inputs = state, msg, time.Now(), nil, nil
	j.mu.Unlock()
	s.metrics.finished(state)
	typ := map[string]string{StateCompleted: "completed", StateFailed: "failed", StateCancelled: "cancelled"}[state]
	s.publishState(j, typ)
	close(j.done)
}

// run executes one job on the worker's goroutine.
func (s *Server) run(j *Job) {
	ctx, cancel := context.WithCancel(s.baseCtx)
	defer cancel()
	j.mu.Lock()
	if j.ended() {
		j.mu.Unlock()
		return
	}
	j.state, j.started, j.cancel, j.position = StateRunning, time.Now(), cancel, -1
	p, d := j.Params, j.inputs
	j.mu.Unlock()
	s.metrics.running.Add(1)
	defer s.metrics.running.Add(-1)
	s.publishState(j, "started")

	var err error
	previews := newPreviewEncoder(s, j)
	defer previews.close()
	onStep := func(st binding.Step) {
		j.mu.Lock()
		previous := j.elapsed
		j.step, j.steps, j.elapsed = st.Step, st.Steps, st.Elapsed
		j.mu.Unlock()
		s.metrics.observeStep(st.Elapsed - previous)
		s.publishState(j, "progress")
		if len(st.Previews) > 0 {
			previews.offer(st)
		}
	}
	onRun := func(id string) {
		j.mu.Lock()
		j.runID = id
		j.mu.Unlock()
	}
	sdRef := pipeline.ModelRef{Path: s.cfg.Model, DType: s.cfg.DType}
	segOpts := pipeline.SegmentOptions{Model: pipeline.ModelRef{Path: s.cfg.SegModel}, Scale: p.SegmentScale, Classes: p.Classes}
	var files []string
	var images []image.Image
	result := map[string]any{"seed": d.seed}
	switch j.Kind {
	case "txt2img", "img2img", "inpaint":
		o := pipeline.GenerateOptions{
			SD: sdRef, Prompt: p.Prompt, NegativePrompt: p.NegativePrompt, Width: p.Width, Height: p.Height,
			Steps: p.Steps, CFGScale: p.CFGScale, Seed: d.seed, Sampler: d.sampler, BatchSize: p.BatchSize,
			Init: d.image, Mask: d.mask, Strength: p.DenoisingStrength, MaskBlur: p.MaskBlur,
			Preview: d.preview, PreviewEvery: p.PreviewEvery, OnStep: onStep, OnRun: onRun,
		}
		var res *pipeline.GenerateResult
		res, err = s.engine.Generate(ctx, o)
		if err == nil {
			files, images = res.Files, res.Images
			if res.Params.Truncated {
				result["warning"] = fmt.Sprintf("the prompt has %d tokens; only the first 75 were used", res.Params.Tokens)
			}
			result["width"], result["height"] = res.Params.Width, res.Params.Height
		}
	case "edit":
		var res *pipeline.EditResult
		res, err = s.engine.Edit(ctx, d.image, pipeline.EditOptions{
			SD: sdRef, Segment: segOpts, Prompt: p.Prompt, NegativePrompt: p.NegativePrompt, Steps: p.Steps,
			CFGScale: p.CFGScale, Seed: d.seed, Sampler: d.sampler, WorkingSize: p.WorkingSize,
			RepaintSubject: p.RepaintSubject, Grow: p.Grow, MaskBlur: p.MaskBlur,
			Preview: d.preview, PreviewEvery: p.PreviewEvery, OnStep: onStep, OnRun: onRun,
		})
		if err == nil {
			files = []string{"edited.png", "mask.png", "edited_mask.png", "input.png", "params.json"}
			images = []image.Image{res.Edited, res.Mask.Image(), res.EditedMask.Image()}
			result["subject_iou"] = res.IoU
		}
	case "segment":
		var runID string
		runID, images, err = s.segmentJob(ctx, d.image, segOpts)
		if err == nil {
			onRun(runID)
			files = []string{"mask.png", "input.png", "params.json"}
		}
	}
	switch {
	case err == nil:
		j.mu.Lock()
		j.files, j.result = files, result
		if j.keepImages {
			j.images = images
		}
		j.mu.Unlock()
		s.finish(j, StateCompleted, "")
	case errors.Is(err, binding.ErrCancelled) || errors.Is(err, context.Canceled):
		s.finish(j, StateCancelled, "cancelled")
	default:
		s.log.Warn("job failed", "job", j.ID, "kind", j.Kind, "err", err)
		s.finish(j, StateFailed, err.Error())
	}
}

func (s *Server) segmentJob(ctx context.Context, input []byte, o pipeline.SegmentOptions) (string, []image.Image, error) {
	img, err := pipeline.DecodeImage(input, s.cfg.MaxPixels)
	if err != nil {
		return "", nil, err
	}
	res, err := s.engine.Segment(ctx, img, o, false)
	if err != nil {
		return "", nil, err
	}
	run, err := s.engine.Runs.Begin()
	if err != nil {
		return "", nil, err
	}
	defer run.Abort()
	if err := run.WritePNG("input.png", img); err != nil {
		return "", nil, err
	}
	if err := run.WritePNG("mask.png", res.Mask.Image()); err != nil {
		return "", nil, err
	}
	if err := run.WriteJSON("params.json", map[string]any{
		"kind": "segment", "seg_model": o.Model.Path, "segment_scale": o.Scale, "segment_classes": o.Classes,
		"input_size": [2]int{img.Bounds().Dx(), img.Bounds().Dy()}, "subject_fraction": res.Mask.Covers(),
		"seconds": res.Elapsed.Seconds(), "stepwise": s.engine.Version,
	}); err != nil {
		return "", nil, err
	}
	if _, err := run.Commit(); err != nil {
		return "", nil, err
	}
	return run.ID, []image.Image{res.Mask.Image()}, nil
}

// Shutdown stops taking jobs, cancels the queued ones, lets running jobs finish
// (or cancels them when CancelOnShutdown is set) and waits for the workers up
// to ctx's deadline, then cancels what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	for _, j := range s.queue.drain() {
		s.finish(j, StateCancelled, "server shutting down")
	}
	if s.cfg.CancelOnShutdown {
		s.stop()
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.stop()
		<-done
		return ctx.Err()
	}
}
