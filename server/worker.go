package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/jobbus"
	"github.com/stepwise-sd/stepwise/modelcache"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// WorkerConfig configures a Worker; zero values take the defaults.
type WorkerConfig struct {
	// ID names the worker in announcements and job views (host-pid).
	ID string
	// Device and DeviceName are the engine's device, which the worker
	// announces with the backends its model cache can load.
	Device, DeviceName string
	// Version and ABI must equal the gateway's (stepwise version, binding.ABIVersion).
	Version string
	ABI     int
	// MaxCrashes is how many times a job may end its worker (the process
	// died with it) before it fails instead of running again (2).
	MaxCrashes int
	// Concurrency is how many jobs the worker runs at once (1).
	Concurrency int
	// Heartbeat is the interval of the worker's announcements (2 s).
	Heartbeat time.Duration
	// StopGrace is how long a stopping worker lets its running jobs finish
	// before it cancels them and hands them back to the queue (forever: 0).
	StopGrace time.Duration
	Logger    *slog.Logger
}

// DefaultMaxCrashes is WorkerConfig.MaxCrashes's default.
const DefaultMaxCrashes = 2

func (c *WorkerConfig) defaults() {
	if c.ID == "" {
		host, _ := os.Hostname()
		c.ID = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	if c.Version == "" {
		c.Version = "dev"
	}
	if c.ABI == 0 {
		c.ABI = binding.ABIVersion
	}
	if c.MaxCrashes <= 0 {
		c.MaxCrashes = DefaultMaxCrashes
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 1
	}
	if c.Heartbeat <= 0 {
		c.Heartbeat = 2 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Worker takes jobs from the bus and runs them with its Runner and the model
// cache the Runner owns.
type Worker struct {
	cfg    WorkerConfig
	runner *pipeline.Runner
	bus    *jobbus.Bus
	log    *slog.Logger
	// jobs is cancelled when a stopping worker's grace runs out.
	jobs       context.Context
	cancelJobs context.CancelFunc
	nrunning   int64
	mu         sync.Mutex
}

// NewWorker makes a worker over runner and bus.
func NewWorker(cfg WorkerConfig, runner *pipeline.Runner, bus *jobbus.Bus) *Worker {
	cfg.defaults()
	jobs, cancel := context.WithCancel(context.Background())
	return &Worker{cfg: cfg, runner: runner, bus: bus, log: cfg.Logger.With("worker", cfg.ID), jobs: jobs, cancelJobs: cancel}
}

// ID is the worker's name.
func (w *Worker) ID() string { return w.cfg.ID }

func (w *Worker) meta() jobbus.Meta {
	return jobbus.Meta{Protocol: jobbus.Protocol, Version: w.cfg.Version, ABI: w.cfg.ABI}
}

// Run joins the bus (refusing a gateway of another making: jobbus.ErrMismatch)
// and runs jobs until ctx ends; then it stops taking jobs, lets the running
// ones finish within StopGrace and returns.
func (w *Worker) Run(ctx context.Context) error {
	jctx, cancel := context.WithTimeout(ctx, busTimeout)
	cons, err := w.bus.Join(jctx, w.meta())
	cancel()
	if err != nil && ctx.Err() != nil {
		return nil // stopped before it joined
	}
	if err != nil {
		return err
	}
	control, err := w.bus.NC.Subscribe(jobbus.ControlSubject(w.cfg.ID), w.onControl)
	if err != nil {
		return fmt.Errorf("subscribe to the worker's control subject: %w", err)
	}
	defer control.Unsubscribe()
	w.announce(false)
	w.log.Info("worker joined", "device", w.cfg.Device, "version", w.cfg.Version)
	var loops sync.WaitGroup
	for i := 0; i < w.cfg.Concurrency; i++ {
		loops.Add(1)
		go func() {
			defer loops.Done()
			w.loop(ctx, cons)
		}()
	}
	tick := time.NewTicker(w.cfg.Heartbeat)
	defer tick.Stop()
	for done := false; !done; {
		select {
		case <-tick.C:
			w.announce(false)
		case <-ctx.Done():
			done = true
		}
	}
	// No loop takes a job now; the running ones have StopGrace to finish.
	if w.cfg.StopGrace > 0 {
		t := time.AfterFunc(w.cfg.StopGrace, w.cancelJobs)
		defer t.Stop()
	}
	loops.Wait()
	w.cancelJobs()
	w.announce(true)
	w.bus.NC.Flush()
	return nil
}

// announcement is the worker as it announces itself now.
func (w *Worker) announcement(leaving bool) jobbus.Announcement {
	host, _ := os.Hostname()
	w.mu.Lock()
	running := w.nrunning
	w.mu.Unlock()
	return jobbus.Announcement{ID: w.cfg.ID, Host: host, PID: os.Getpid(), Device: w.cfg.Device, DeviceName: w.cfg.DeviceName,
		Backends: w.backends(), Loaded: w.runner.Cache.Loaded(), Memory: w.runner.Cache.Stats(), Running: int(running),
		Version: w.cfg.Version, ABI: w.cfg.ABI, Protocol: jobbus.Protocol, Time: time.Now(), Every: w.cfg.Heartbeat, Leaving: leaving}
}

// backends are the backends the worker's cache can load, and why not.
func (w *Worker) backends() []jobbus.BackendStatus {
	var out []jobbus.BackendStatus
	for _, b := range w.runner.Cache.Backends() {
		out = append(out, jobbus.BackendStatus{Name: b.Backend.String(), Available: b.Available, Reason: b.Reason, Library: b.Library})
	}
	return out
}

func (w *Worker) announce(leaving bool) {
	raw, _ := json.Marshal(w.announcement(leaving))
	if err := w.bus.NC.Publish(jobbus.AnnounceSubject, raw); err != nil {
		w.log.Warn("announce", "err", err)
	}
}

// fetchWait bounds one wait for a job, so a stopping worker notices soon.
const fetchWait = 2 * time.Second

func (w *Worker) loop(ctx context.Context, cons jetstream.Consumer) {
	for ctx.Err() == nil {
		fctx, cancel := context.WithTimeout(ctx, fetchWait)
		msg, err := cons.Next(jetstream.FetchContext(fctx))
		cancel()
		if err == nil && ctx.Err() != nil {
			w.handBack(msg) // it came as the worker stopped
			return
		}
		if err != nil {
			if errors.Is(err, nats.ErrTimeout) || errors.Is(err, jetstream.ErrNoMessages) ||
				errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				continue
			}
			if ctx.Err() == nil {
				w.log.Warn("waiting for a job", "err", err)
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
			continue
		}
		w.handle(msg)
	}
}

// ErrMalformedJob is a message on the job subject that is not a job.
var ErrMalformedJob = errors.New("malformed job message")

// decodeJob reads a job message and its spec.
func decodeJob(data []byte) (jobbus.Job, jobSpec, error) {
	var job jobbus.Job
	var spec jobSpec
	if err := json.Unmarshal(data, &job); err != nil {
		return job, spec, fmt.Errorf("%w: %v", ErrMalformedJob, err)
	}
	if job.ID == "" || !jobKinds[job.Kind] {
		return job, spec, fmt.Errorf("%w: no job ID or an unknown kind %q", ErrMalformedJob, job.Kind)
	}
	if err := json.Unmarshal(job.Spec, &spec); err != nil {
		return job, spec, fmt.Errorf("%w: spec: %v", ErrMalformedJob, err)
	}
	return job, spec, nil
}

// handle runs one delivered job message to its end: acked when its results
// are stored, terminated when it is no job or may not run again.
func (w *Worker) handle(msg jetstream.Msg) {
	job, spec, err := decodeJob(msg.Data())
	if err != nil {
		w.log.Error("rejecting a message on the job subject", "err", err, "bytes", len(msg.Data()))
		if job.ID != "" {
			w.state(job.ID, jobbus.State{Type: jobbus.StateFailed, Error: err.Error()})
		}
		msg.TermWithReason("malformed job")
		return
	}
	if err := w.meta().Check(jobbus.Meta{Protocol: job.Protocol, Version: job.Version, ABI: job.ABI}); err != nil {
		w.log.Error("refusing a job of another making", "job", job.ID, "err", err)
		w.state(job.ID, jobbus.State{Type: jobbus.StateFailed, Error: err.Error()})
		msg.TermWithReason("version mismatch")
		return
	}
	attempt := 1
	if md, err := msg.Metadata(); err == nil {
		attempt = int(md.NumDelivered)
	}
	lg := w.log.With("job", job.ID, "kind", job.Kind, "attempt", attempt)
	if crashes := attempt - 1; crashes >= w.cfg.MaxCrashes {
		err := fmt.Sprintf("the job ended its worker %d times without finishing (a crash in the engine?); "+
			"it is not run again (--max-crashes %d)", crashes, w.cfg.MaxCrashes)
		lg.Error("failing a job that crashed its workers", "crashes", crashes)
		w.state(job.ID, jobbus.State{Type: jobbus.StateFailed, Attempt: attempt, Error: err, Code: jobbus.CodeCrashLimit})
		msg.TermWithReason("crash limit")
		return
	}

	ctx, cancel := context.WithCancel(w.jobs)
	defer cancel()
	var cancelled bool
	var cmu sync.Mutex
	sub, err := w.bus.NC.Subscribe(jobbus.CancelSubject(job.ID), func(*nats.Msg) {
		cmu.Lock()
		cancelled = true
		cmu.Unlock()
		cancel()
	})
	if err == nil {
		defer sub.Unsubscribe()
		err = w.bus.NC.Flush() // the subscription is live before the cancel mark is read
	}
	if err != nil {
		lg.Warn("subscribe to the job's cancel; handing the job back", "err", err)
		msg.Nak()
		return
	}
	if w.cancelMarked(ctx, job.ID) {
		w.state(job.ID, jobbus.State{Type: jobbus.StateCancelled, Attempt: attempt, Error: "cancelled while queued"})
		msg.Ack()
		return
	}

	w.mu.Lock()
	w.nrunning++
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.nrunning--
		w.mu.Unlock()
	}()
	params, _ := json.Marshal(spec.Params)
	w.state(job.ID, jobbus.State{Type: jobbus.StateStarted, Attempt: attempt, Run: newID(), Kind: job.Kind, Params: params})

	// The job is in progress as long as the worker lives: every step says so,
	// and a ticker too, for model loads and steps longer than the ack wait.
	stopBeat := make(chan struct{})
	beatDone := make(chan struct{})
	go func() {
		defer close(beatDone)
		t := time.NewTicker(w.progressEvery())
		defer t.Stop()
		for {
			select {
			case <-t.C:
				msg.InProgress()
			case <-stopBeat:
				return
			}
		}
	}()
	previews := newPreviewEncoder(job.ID, func(frame []byte) {
		w.bus.NC.Publish(jobbus.EventSubject(job.ID, jobbus.KindPreview), frame)
	})
	onStep := func(st binding.Step) {
		msg.InProgress()
		raw, _ := json.Marshal(jobbus.Progress{Step: st.Step, Steps: st.Steps, Elapsed: st.Elapsed, Time: time.Now()})
		w.bus.NC.Publish(jobbus.EventSubject(job.ID, jobbus.KindProgress), raw)
		if len(st.Previews) > 0 {
			previews.offer(st)
		}
	}
	out, err := w.execute(ctx, job.Kind, spec, onStep)
	previews.close() // every preview is out before the job's end
	if err == nil {
		err = w.store(ctx, out)
	}
	close(stopBeat)
	<-beatDone
	cmu.Lock()
	byClient := cancelled
	cmu.Unlock()
	switch {
	case err == nil:
		a := w.announcement(false)
		w.state(job.ID, jobbus.State{Type: jobbus.StateCompleted, Attempt: attempt, RunID: out.runID, Files: out.files,
			Images: out.images, Result: out.result, Announcement: &a})
		msg.Ack()
	case (errors.Is(err, binding.ErrCancelled) || errors.Is(err, context.Canceled)) && !byClient:
		lg.Warn("handing a running job back: the worker is stopping")
		w.handBack(msg)
	case errors.Is(err, binding.ErrCancelled) || errors.Is(err, context.Canceled):
		w.state(job.ID, jobbus.State{Type: jobbus.StateCancelled, Attempt: attempt, Error: errCancelled.Error()})
		msg.Ack()
	default:
		lg.Warn("job failed", "err", err)
		st := jobbus.State{Type: jobbus.StateFailed, Attempt: attempt, Error: err.Error()}
		if statusOf(err) == http.StatusBadRequest {
			st.Code = jobbus.CodeBadRequest
		}
		a := w.announcement(false)
		st.Announcement = &a
		w.state(job.ID, st)
		msg.Ack()
	}
}

// handBack returns a job to the queue for another worker. It goes back as a
// new message: a Nak would count as a delivery, and deliveries count the
// crashes a job caused (a worker stopping in good order is none).
func (w *Worker) handBack(msg jetstream.Msg) {
	ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
	defer cancel()
	if _, err := w.bus.JS.Publish(ctx, jobbus.JobSubject, msg.Data()); err != nil {
		w.log.Warn("hand a job back as a new message; nak it instead", "err", err)
		msg.Nak()
		return
	}
	msg.Ack()
}

// progressEvery is how often a running job tells the stream it is alive: a
// fifth of the consumer's ack wait.
func (w *Worker) progressEvery() time.Duration {
	ackWait := jobbus.DefaultAckWait
	ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
	defer cancel()
	if c, err := w.bus.Stream.Consumer(ctx, jobbus.Consumer); err == nil {
		if info := c.CachedInfo(); info != nil && info.Config.AckWait > 0 {
			ackWait = info.Config.AckWait
		}
	}
	return ackWait / 5
}

// cancelMarked reports whether the gateway cancelled the job before it started.
func (w *Worker) cancelMarked(ctx context.Context, id string) bool {
	ctx, cancel := context.WithTimeout(ctx, busTimeout)
	defer cancel()
	_, err := w.bus.Cancels.Get(ctx, id)
	return err == nil
}

// state publishes a job's state change.
func (w *Worker) state(id string, st jobbus.State) {
	st.Worker = w.cfg.ID
	raw, _ := json.Marshal(st)
	if err := w.bus.NC.Publish(jobbus.EventSubject(id, jobbus.KindState), raw); err != nil {
		w.log.Warn("publish a job's state", "job", id, "err", err)
	}
	// Flushed, so a state is out before the message is acked and the worker
	// takes (or dies in) the next job.
	w.bus.NC.Flush()
}

// store copies a finished job's run folder (images, masks, inputs,
// params.json) to the results object store.
func (w *Worker) store(ctx context.Context, out *output) error {
	path, err := w.runner.Runs.Path(out.runID, "params.json")
	if err != nil {
		return err
	}
	ents, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		return fmt.Errorf("read the run's folder: %w", err)
	}
	ctx = context.WithoutCancel(ctx) // a cancel after the last step does not lose the results
	for _, e := range ents {
		if !e.Type().IsRegular() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(filepath.Dir(path), e.Name()))
		if err != nil {
			return fmt.Errorf("read result %s: %w", e.Name(), err)
		}
		if _, err := w.bus.Results.PutBytes(ctx, jobbus.ResultName(out.runID, e.Name()), data); err != nil {
			return fmt.Errorf("store result %s: %w", e.Name(), err)
		}
	}
	return nil
}

// onControl answers a model load or unload request from a gateway.
func (w *Worker) onControl(m *nats.Msg) {
	reply := jobbus.ModelReply{Worker: w.cfg.ID}
	var req jobbus.ModelRequest
	err := json.Unmarshal(m.Data, &req)
	if err == nil {
		err = w.modelOp(req, &reply)
	}
	if err != nil {
		reply.Error = err.Error()
		switch {
		case errors.Is(err, modelcache.ErrInUse):
			reply.Code = jobbus.CodeInUse
		case statusOf(err) == http.StatusBadRequest:
			reply.Code = jobbus.CodeBadRequest
		}
	}
	reply.Memory = w.runner.Cache.Stats()
	raw, _ := json.Marshal(reply)
	m.Respond(raw)
}

func (w *Worker) modelOp(req jobbus.ModelRequest, reply *jobbus.ModelReply) error {
	kind := modelcache.KindSD
	if req.Kind == "seg" {
		kind = modelcache.KindSeg
	}
	dtype, err := binding.ParseDType(req.DType)
	if err != nil {
		return badRequest("%v", err)
	}
	ref := pipeline.ModelRef{Path: req.Path, VAE: req.VAE, DType: dtype}
	if kind == modelcache.KindSD {
		if ref.Backend, err = binding.ParseBackend(req.Backend); err != nil {
			return badRequestErr(err)
		}
	}
	key, err := w.runner.ResolveModel(kind, ref)
	if err != nil {
		return err
	}
	switch req.Op {
	case jobbus.OpLoad:
		ctx, cancel := context.WithCancel(w.jobs)
		defer cancel()
		ref, err := w.runner.Cache.Acquire(ctx, key)
		if err != nil {
			return err
		}
		reply.Info, _ = json.Marshal(ref.Info())
		ref.Release()
	case jobbus.OpUnload:
		reply.Unloaded, err = w.runner.Cache.Unload(key)
		return err
	default:
		return badRequest("unknown model operation %q", req.Op)
	}
	w.announce(false)
	return nil
}

// output is what a finished job hands back.
type output struct {
	runID  string
	files  []string
	images []string // the files a synchronous answer returns, in order
	result map[string]any
}

// execute runs one job's work through the pipeline.
func (w *Worker) execute(ctx context.Context, kind string, spec jobSpec, onStep func(binding.Step)) (*output, error) {
	p := spec.Params
	sampler, err := ParseSampler(p.SamplerName)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	preview, err := binding.ParsePreview(p.Preview)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	dtype, err := binding.ParseDType(spec.DType)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	backend, err := binding.ParseBackend(spec.Backend)
	if err != nil {
		return nil, badRequestErr(err)
	}
	sdRef := pipeline.ModelRef{Path: spec.SDPath, VAE: spec.VAEPath, DType: dtype, Backend: backend}
	segOpts := pipeline.SegmentOptions{Model: pipeline.ModelRef{Path: spec.SegModel}, Scale: p.SegmentScale, Classes: p.Classes}
	out := &output{result: map[string]any{"seed": spec.Seed}}
	onRun := func(id string) { out.runID = id }
	switch kind {
	case "txt2img", "img2img", "inpaint":
		mask := spec.Mask
		if mask != nil && p.InvertMask {
			if mask, err = invertMask(mask, spec.MaxPixels); err != nil {
				return nil, err
			}
		}
		res, err := w.runner.Generate(ctx, pipeline.GenerateOptions{
			SD: sdRef, Prompt: p.Prompt, NegativePrompt: p.NegativePrompt, Width: p.Width, Height: p.Height,
			Steps: p.Steps, CFGScale: p.CFGScale, Seed: spec.Seed, Sampler: sampler, BatchSize: p.BatchSize,
			Init: spec.Image, Mask: mask, Strength: p.DenoisingStrength, MaskBlur: p.MaskBlur,
			Preview: preview, PreviewEvery: p.PreviewEvery, OnStep: onStep, OnRun: onRun,
		})
		if err != nil {
			return nil, err
		}
		out.files, out.images = res.Files, res.Files
		if res.Params.Truncated {
			out.result["warning"] = fmt.Sprintf("the prompt has %d tokens; only the first 75 were used", res.Params.Tokens)
		}
		out.result["width"], out.result["height"] = res.Params.Width, res.Params.Height
	case "edit":
		res, err := w.runner.Edit(ctx, spec.Image, pipeline.EditOptions{
			SD: sdRef, Segment: segOpts, Prompt: p.Prompt, NegativePrompt: p.NegativePrompt, Steps: p.Steps,
			CFGScale: p.CFGScale, Seed: spec.Seed, Sampler: sampler, WorkingSize: p.WorkingSize,
			RepaintSubject: p.RepaintSubject, Grow: p.Grow, MaskBlur: p.MaskBlur,
			Preview: preview, PreviewEvery: p.PreviewEvery, OnStep: onStep, OnRun: onRun,
		})
		if err != nil {
			return nil, err
		}
		out.files = []string{"edited.png", "mask.png", "edited_mask.png", "input.png", "params.json"}
		out.images = out.files[:3]
		out.result["subject_iou"] = res.IoU
	case "segment":
		runID, err := w.segmentJob(ctx, spec.Image, segOpts, spec.MaxPixels)
		if err != nil {
			return nil, err
		}
		out.runID = runID
		out.files = []string{"mask.png", "input.png", "params.json"}
		out.images = out.files[:1]
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

func (w *Worker) segmentJob(ctx context.Context, input []byte, o pipeline.SegmentOptions, maxPixels int) (string, error) {
	img, err := pipeline.DecodeImage(input, maxPixels)
	if err != nil {
		return "", err
	}
	res, err := w.runner.Segment(ctx, img, o, false)
	if err != nil {
		return "", err
	}
	run, err := w.runner.Runs.Begin()
	if err != nil {
		return "", err
	}
	defer run.Abort()
	if err := run.WritePNG("input.png", img); err != nil {
		return "", err
	}
	if err := run.WritePNG("mask.png", res.Mask.Image()); err != nil {
		return "", err
	}
	if err := run.WriteJSON("params.json", map[string]any{
		"kind": "segment", "seg_model": o.Model.Path, "segment_scale": o.Scale, "segment_classes": o.Classes,
		"input_size": [2]int{img.Bounds().Dx(), img.Bounds().Dy()}, "subject_fraction": res.Mask.Covers(),
		"seconds": res.Elapsed.Seconds(), "stepwise": w.runner.Version,
	}); err != nil {
		return "", err
	}
	if _, err := run.Commit(); err != nil {
		return "", err
	}
	return run.ID, nil
}
