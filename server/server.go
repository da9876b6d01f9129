// Package server is stepwise's HTTP and websocket API: jobs on a bounded
// queue, per-step events and previews streamed to every watcher, the
// AUTOMATIC1111 API subset that existing clients speak, and a page to watch
// denoising live.
package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"image"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/catalog"
	"github.com/stepwise-sd/stepwise/modelcache"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// Config is the server's configuration; zero values take the defaults, which
// live in defaults() and nowhere else (docs/api.md lists them with their flags).
type Config struct {
	Model    string // Stable Diffusion model path: what requests that name no model get
	SegModel string // segmentation model path
	// VAE, when set, replaces the models' own VAE for requests that name none.
	VAE string
	// Catalog, when set, lists the models requests may name (--models-dir).
	Catalog *catalog.Catalog
	DType   binding.DType
	// Backend runs the jobs that name none (the zero value: libtorch).
	Backend binding.Backend
	// Token, when set, must come as "Authorization: Bearer <token>" (or
	// ?token= on websockets, which browsers cannot give headers).
	Token string
	// AllowedOrigins lists the origins, besides the server's own, whose pages
	// may open websockets and call the API.
	AllowedOrigins []string
	// AllowedHosts lists the Host names, besides loopback names and IP
	// addresses, that requests may name ("*": any). It defeats DNS rebinding:
	// a page on another domain that resolves to this server still sends its
	// own name as Host.
	AllowedHosts   []string
	MaxQueue       int   // waiting jobs (64)
	Concurrency    int   // jobs running at once on the device (1)
	MaxBodyBytes   int64 // request size (32 MiB)
	MaxPixels      int   // pixels of an uploaded image (16 M)
	MaxSide        int   // width/height of a generation (2048)
	MaxSteps       int   // denoising steps (150)
	MaxBatch       int   // images per job (8)
	MaxPromptBytes int   // bytes of a prompt or negative prompt (4096)
	MaxConns       int   // open HTTP connections (256)
	MaxWebsockets  int   // open websocket connections (128)
	// ReadTimeout bounds reading one request, body included (60 s).
	ReadTimeout time.Duration
	// CancelOnShutdown cancels running jobs at shutdown instead of letting them finish.
	CancelOnShutdown bool
	// KeepJobs is how many finished jobs stay listed (200); older ones are forgotten.
	KeepJobs int
	Logger   *slog.Logger
}

// DefaultConfig is the configuration with every default filled in: what the
// command line's flags start from.
func DefaultConfig() Config {
	var c Config
	c.defaults()
	return c
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
	def(&c.MaxPromptBytes, 4096)
	def(&c.MaxConns, 256)
	def(&c.MaxWebsockets, 128)
	def(&c.KeepJobs, 200)
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = 32 << 20
	}
	if c.ReadTimeout <= 0 {
		c.ReadTimeout = 60 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// cancelGrace is how long Shutdown waits for jobs it has cancelled before it
// returns without them.
const cancelGrace = 10 * time.Second

// concurrentDecodes bounds the images decoded at once while requests are
// validated, and so the memory that takes.
const concurrentDecodes = 2

// Server runs jobs and serves the API.
type Server struct {
	cfg     Config
	runner  *pipeline.Runner
	log     *slog.Logger
	hub     *hub
	queue   *queue
	metrics *metrics
	decodes chan struct{}
	// websockets counts open websocket connections against MaxWebsockets.
	websockets atomic.Int64

	catalog   *catalog.Catalog
	choice    modelChoice
	described struct {
		mu sync.Mutex
		m  map[string]catalog.Entry
	}

	segClassesOnce sync.Once
	segClassCount  int
	segClassesErr  error

	mu      sync.Mutex
	jobs    map[string]*Job
	order   []string // job IDs, oldest first
	wg      sync.WaitGroup
	baseCtx context.Context
	stop    context.CancelFunc
}

// New makes a server over runner and starts its workers.
func New(cfg Config, runner *pipeline.Runner) *Server {
	cfg.defaults()
	ctx, stop := context.WithCancel(context.Background())
	s := &Server{cfg: cfg, runner: runner, log: cfg.Logger, hub: newHub(cfg.Logger), jobs: map[string]*Job{},
		baseCtx: ctx, stop: stop, decodes: make(chan struct{}, concurrentDecodes), catalog: cfg.Catalog}
	s.metrics = newMetrics(s)
	s.described.m = map[string]catalog.Entry{}
	s.queue = newQueue(cfg.MaxQueue, func(j *Job) { s.hub.publish(j.event("queued")) })
	for i := 0; i < cfg.Concurrency; i++ {
		s.wg.Add(1)
		go s.worker()
	}
	return s
}

// segClasses is the segmentation model's class count, read once from its
// weights' header (no model is loaded for it).
func (s *Server) segClasses() (int, error) {
	s.segClassesOnce.Do(func() {
		key, err := s.runner.ResolveModel(modelcache.KindSeg, pipeline.ModelRef{Path: s.cfg.SegModel})
		if err == nil {
			s.segClassCount, err = pipeline.SegModelClasses(key.Path)
		}
		s.segClassesErr = err
	})
	return s.segClassCount, s.segClassesErr
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
	j := newJob(newID(), kind, p, d)
	j.Source, j.keepImages = source, keepImages
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
	s.hub.publish(j.event("queued"))
	return j, nil
}

// forgetOldLocked drops the oldest finished jobs beyond KeepJobs.
func (s *Server) forgetOldLocked() {
	for len(s.order) > s.cfg.KeepJobs {
		dropped := false
		for i, id := range s.order {
			if j := s.jobs[id]; j == nil || j.ended() {
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
		s.finish(j, StateCancelled, fmt.Errorf("%w while queued", errCancelled))
		return true
	}
	return j.requestCancel()
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

func (s *Server) finish(j *Job, state string, err error) {
	if !j.finish(state, err) {
		return
	}
	s.metrics.finished(state)
	typ := map[string]string{StateCompleted: "completed", StateFailed: "failed", StateCancelled: "cancelled"}[state]
	s.hub.publish(j.event(typ))
}

// output is what a finished job hands back.
type output struct {
	runID  string
	files  []string
	images []image.Image
	result map[string]any
}

// run executes one job on the worker's goroutine.
func (s *Server) run(j *Job) {
	ctx, cancel := context.WithCancel(s.baseCtx)
	defer cancel()
	p, d, ok := j.start(cancel)
	if !ok {
		return
	}
	s.metrics.running.Add(1)
	defer s.metrics.running.Add(-1)
	s.hub.publish(j.event("started"))

	previews := newPreviewEncoder(s, j)
	defer previews.close()
	onStep := func(st binding.Step) {
		s.metrics.observeStep(j.progress(st.Step, st.Steps, st.Elapsed))
		s.hub.publish(j.event("progress"))
		if len(st.Previews) > 0 {
			previews.offer(st)
		}
	}
	out, err := s.execute(ctx, j.Kind, p, d, onStep, j.setRun)
	switch {
	case err == nil:
		j.complete(out.runID, out.files, out.result, out.images)
		s.finish(j, StateCompleted, nil)
	case errors.Is(err, binding.ErrCancelled) || errors.Is(err, context.Canceled):
		s.finish(j, StateCancelled, errCancelled)
	default:
		s.log.Warn("job failed", "job", j.ID, "kind", j.Kind, "err", err)
		s.finish(j, StateFailed, err)
	}
}

// execute runs one job's work through the pipeline.
func (s *Server) execute(ctx context.Context, kind string, p JobParams, d *decoded, onStep func(binding.Step),
	onRun func(string)) (*output, error) {
	sdRef := s.sdRef(d.sdPath, d.vaePath, d.backend)
	segOpts := pipeline.SegmentOptions{Model: pipeline.ModelRef{Path: s.cfg.SegModel}, Scale: p.SegmentScale, Classes: p.Classes}
	out := &output{result: map[string]any{"seed": d.seed}}
	switch kind {
	case "txt2img", "img2img", "inpaint":
		mask := d.mask
		if mask != nil && p.InvertMask {
			var err error
			if mask, err = invertMask(mask, s.cfg.MaxPixels); err != nil {
				return nil, err
			}
		}
		res, err := s.runner.Generate(ctx, pipeline.GenerateOptions{
			SD: sdRef, Prompt: p.Prompt, NegativePrompt: p.NegativePrompt, Width: p.Width, Height: p.Height,
			Steps: p.Steps, CFGScale: p.CFGScale, Seed: d.seed, Sampler: d.sampler, BatchSize: p.BatchSize,
			Init: d.image, Mask: mask, Strength: p.DenoisingStrength, MaskBlur: p.MaskBlur,
			Preview: d.preview, PreviewEvery: p.PreviewEvery, OnStep: onStep, OnRun: onRun,
		})
		if err != nil {
			return nil, err
		}
		out.files, out.images = res.Files, res.Images
		if res.Params.Truncated {
			out.result["warning"] = fmt.Sprintf("the prompt has %d tokens; only the first 75 were used", res.Params.Tokens)
		}
		out.result["width"], out.result["height"] = res.Params.Width, res.Params.Height
	case "edit":
		res, err := s.runner.Edit(ctx, d.image, pipeline.EditOptions{
			SD: sdRef, Segment: segOpts, Prompt: p.Prompt, NegativePrompt: p.NegativePrompt, Steps: p.Steps,
			CFGScale: p.CFGScale, Seed: d.seed, Sampler: d.sampler, WorkingSize: p.WorkingSize,
			RepaintSubject: p.RepaintSubject, Grow: p.Grow, MaskBlur: p.MaskBlur,
			Preview: d.preview, PreviewEvery: p.PreviewEvery, OnStep: onStep, OnRun: onRun,
		})
		if err != nil {
			return nil, err
		}
		out.files = []string{"edited.png", "mask.png", "edited_mask.png", "input.png", "params.json"}
		out.images = []image.Image{res.Edited, res.Mask.Image(), res.EditedMask.Image()}
		out.result["subject_iou"] = res.IoU
	case "segment":
		runID, images, err := s.segmentJob(ctx, d.image, segOpts)
		if err != nil {
			return nil, err
		}
		out.runID, out.images = runID, images
		out.files = []string{"mask.png", "input.png", "params.json"}
	}
	return out, nil
}

// invertMask swaps a mask's inside and outside (inpainting_mask_invert). It
// runs on a worker, after the mask passed the limits at submission.
func invertMask(data []byte, maxPixels int) ([]byte, error) {
	decoded, err := pipeline.DecodeImage(data, maxPixels)
	if err != nil {
		return nil, err
	}
	m := pipeline.MaskFromImage(decoded, 0)
	m.Invert()
	return pipeline.EncodePNG(m.Image())
}

func (s *Server) segmentJob(ctx context.Context, input []byte, o pipeline.SegmentOptions) (string, []image.Image, error) {
	img, err := pipeline.DecodeImage(input, s.cfg.MaxPixels)
	if err != nil {
		return "", nil, err
	}
	res, err := s.runner.Segment(ctx, img, o, false)
	if err != nil {
		return "", nil, err
	}
	run, err := s.runner.Runs.Begin()
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
		"seconds": res.Elapsed.Seconds(), "stepwise": s.runner.Version,
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
// to ctx's deadline. Then it cancels what is left and waits at most
// cancelGrace more: it returns whatever a job does, so the process can exit.
func (s *Server) Shutdown(ctx context.Context) error {
	for _, j := range s.queue.drain() {
		s.finish(j, StateCancelled, fmt.Errorf("%w: the server is shutting down", errCancelled))
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
	}
	s.stop()
	select {
	case <-done:
		return ctx.Err()
	case <-time.After(cancelGrace):
		s.log.Error("running jobs did not stop within the grace after being cancelled; leaving them", "grace", cancelGrace)
		return fmt.Errorf("shutdown: running jobs did not stop %s after cancel: %w", cancelGrace, ctx.Err())
	}
}
