// Package server is stepwise's gateway and worker. The gateway (Server) is
// the HTTP and websocket API: jobs on a bounded queue, per-step events and
// previews streamed to every watcher, the AUTOMATIC1111 API subset that
// existing clients speak, and a page to watch denoising live. It runs no
// engine: jobs go to workers (Worker) over NATS JetStream (package jobbus),
// whose events it fans out to its watchers.
package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/catalog"
	"github.com/stepwise-sd/stepwise/jobbus"
	"github.com/stepwise-sd/stepwise/models"
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
	// Runs is the local runs folder (required): run files are served from it
	// first (workers on this host write there), then from the results object store.
	Runs *pipeline.Runs
	// ConvertDir holds safetensors conversions of pickle checkpoints (the
	// segmentation model's class count is read from them).
	ConvertDir string
	// KeepQueuedOnShutdown leaves queued jobs in the stream at shutdown, for
	// workers and the next gateway (an external NATS); otherwise they are cancelled.
	KeepQueuedOnShutdown bool
	// Version is the gateway's stepwise version; workers of another refuse to join.
	Version string
	// Bus holds the JetStream settings (ack wait, retention).
	Bus    jobbus.SetupOptions
	Logger *slog.Logger
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
	if c.Version == "" {
		c.Version = "dev"
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

// Server is the gateway: it validates and queues jobs, hands them to workers
// over the bus and serves the API over their events.
type Server struct {
	cfg     Config
	log     *slog.Logger
	bus     *jobbus.Bus
	subs    []*nats.Subscription
	hub     *hub
	queue   *queue
	metrics *metrics
	workers *workers
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

	mu    sync.Mutex
	jobs  map[string]*Job
	order []string // job IDs, oldest first
}

// busTimeout bounds one request to NATS (a publish, a bucket operation).
const busTimeout = 30 * time.Second

// New makes a gateway over bus: it sets up the stream, consumer and buckets
// (and publishes its version for workers to check) and subscribes to the
// jobs' events and the workers' announcements.
func New(cfg Config, bus *jobbus.Bus) (*Server, error) {
	cfg.defaults()
	if cfg.Runs == nil {
		return nil, errors.New("the gateway needs a runs folder (Config.Runs)")
	}
	s := &Server{cfg: cfg, log: cfg.Logger, bus: bus, hub: newHub(cfg.Logger), jobs: map[string]*Job{},
		decodes: make(chan struct{}, concurrentDecodes), catalog: cfg.Catalog}
	s.workers = newWorkers()
	s.metrics = newMetrics(s)
	s.described.m = map[string]catalog.Entry{}
	s.queue = newQueue(cfg.MaxQueue, func(j *Job) { s.hub.publish(j.event("queued")) })
	ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
	defer cancel()
	if err := bus.Setup(ctx, cfg.Bus, s.meta()); err != nil {
		return nil, err
	}
	// One subscription for every job's events: a job's events are handled in
	// the order its worker sent them (a preview before the completion).
	events, err := bus.NC.Subscribe(jobbus.EventsWildcard, s.onEvent)
	if err != nil {
		return nil, fmt.Errorf("subscribe to job events: %w", err)
	}
	announce, err := bus.NC.Subscribe(jobbus.AnnounceSubject, s.onAnnounce)
	if err != nil {
		events.Unsubscribe()
		return nil, fmt.Errorf("subscribe to worker announcements: %w", err)
	}
	for _, sub := range []*nats.Subscription{events, announce} {
		// Previews are a few hundred KB at most; a burst must not be dropped
		// as a slow consumer's.
		sub.SetPendingLimits(1<<20, 1<<30)
	}
	s.subs = []*nats.Subscription{events, announce}
	if err := bus.NC.Flush(); err != nil {
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	return s, nil
}

// meta is what workers must match to join.
func (s *Server) meta() jobbus.Meta {
	return jobbus.Meta{Protocol: jobbus.Protocol, Version: s.cfg.Version, ABI: binding.ABIVersion}
}

// segClasses is the segmentation model's class count, read once from its
// weights' header (no model is loaded for it).
func (s *Server) segClasses() (int, error) {
	s.segClassesOnce.Do(func() {
		path, err := models.Resolve(s.cfg.SegModel, s.cfg.ConvertDir)
		if err == nil {
			s.segClassCount, err = pipeline.SegModelClasses(path)
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

// ErrBus is a job the gateway could not hand to the bus.
var ErrBus = errors.New("the job bus (NATS) did not take the job")

// Submit validates and queues a job. keepImages keeps its final images for
// the caller (Server.resultPNGs) besides its run.
func (s *Server) Submit(kind string, p JobParams, source string, keepImages bool) (*Job, error) {
	d, err := s.validate(kind, &p)
	if err != nil {
		return nil, err
	}
	p.Image, p.Mask = "", "" // decoded into d; the base64 need not travel twice
	j := newJob(newID(), kind, p, d.sdPath)
	j.Source, j.keepImages = source, keepImages
	s.mu.Lock()
	s.jobs[j.ID] = j
	s.order = append(s.order, j.ID)
	s.forgetOldLocked()
	s.mu.Unlock()
	forget := func() {
		s.mu.Lock()
		delete(s.jobs, j.ID)
		s.mu.Unlock()
	}
	if err := s.queue.push(j); err != nil {
		forget()
		return nil, err
	}
	seq, err := s.publish(j, p, d)
	if err != nil {
		s.queue.remove(j)
		forget()
		s.log.Error("could not queue a job on the bus", "job", j.ID, "err", err)
		return nil, fmt.Errorf("%w: %v", ErrBus, err)
	}
	j.setSeq(seq)
	s.metrics.submitted.Add(1)
	s.hub.publish(j.event("queued"))
	return j, nil
}

// publish puts the job on the work queue; it returns its stream sequence.
func (s *Server) publish(j *Job, p JobParams, d *decoded) (uint64, error) {
	spec, err := json.Marshal(jobSpec{Params: p, SDPath: d.sdPath, VAEPath: d.vaePath, SegModel: s.cfg.SegModel,
		DType: s.cfg.DType.String(), Backend: d.backend.String(), Image: d.image, Mask: d.mask, Seed: d.seed, MaxPixels: s.cfg.MaxPixels})
	if err != nil {
		return 0, err
	}
	m := s.meta()
	msg, err := json.Marshal(jobbus.Job{ID: j.ID, Kind: j.Kind, Spec: spec, Created: j.created,
		Protocol: m.Protocol, Version: m.Version, ABI: m.ABI})
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
	defer cancel()
	ack, err := s.bus.JS.Publish(ctx, jobbus.JobSubject, msg, jetstream.WithMsgID(j.ID))
	if err != nil {
		return 0, err
	}
	return ack.Sequence, nil
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

// Cancel cancels a queued or running job; it reports whether the job could
// be. A queued job ends at once; a running one when its worker says so,
// within a step.
func (s *Server) Cancel(j *Job) bool {
	if s.queue.remove(j) {
		s.withdraw(j)
		s.finish(j, StateCancelled, fmt.Errorf("%w while queued", errCancelled))
		return true
	}
	if j.State() != StateRunning {
		return false
	}
	s.sendCancel(j.ID)
	return true
}

// withdraw takes a queued job back from the bus: out of the stream, and
// marked cancelled for a worker that took it a moment before.
func (s *Server) withdraw(j *Job) {
	s.sendCancel(j.ID)
	if seq := j.getSeq(); seq > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
		defer cancel()
		// Not found: a worker has it already, and the cancel mark stops it.
		if err := s.bus.Stream.DeleteMsg(ctx, seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			s.log.Debug("withdraw a queued job", "job", j.ID, "err", err)
		}
	}
}

// sendCancel marks the job cancelled in the cancels bucket, read by a worker
// before it starts a job, then tells a worker running it. In that order, a
// worker that starts the job at the same moment sees one or the other.
func (s *Server) sendCancel(id string) {
	ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
	defer cancel()
	if _, err := s.bus.Cancels.Put(ctx, id, []byte("1")); err != nil {
		s.log.Warn("mark a job cancelled", "job", id, "err", err)
	}
	if err := s.bus.NC.Publish(jobbus.CancelSubject(id), nil); err != nil {
		s.log.Warn("send a job's cancel", "job", id, "err", err)
	}
}

func (s *Server) finish(j *Job, state string, err error) {
	was, ok := j.finish(state, err)
	if !ok {
		return
	}
	if was == StateRunning {
		s.metrics.running.Add(-1)
	}
	s.metrics.finished(state)
	typ := map[string]string{StateCompleted: "completed", StateFailed: "failed", StateCancelled: "cancelled"}[state]
	s.hub.publish(j.event(typ))
}

// Shutdown stops taking jobs and cancels the queued ones (or leaves them to
// the workers and the next gateway with KeepQueuedOnShutdown), lets running
// jobs finish (or cancels them when CancelOnShutdown is set) and waits for
// them up to ctx's deadline. Then it cancels what is left and waits at most
// cancelGrace more: it returns whatever a worker does, so the process can exit.
func (s *Server) Shutdown(ctx context.Context) error {
	for _, j := range s.queue.drain() {
		if !s.cfg.KeepQueuedOnShutdown {
			s.withdraw(j)
			s.finish(j, StateCancelled, fmt.Errorf("%w: the server is shutting down", errCancelled))
		}
	}
	var running []*Job
	for _, j := range s.Jobs() {
		if j.State() == StateRunning {
			running = append(running, j)
		}
	}
	cancelAll := func() {
		for _, j := range running {
			if !j.ended() {
				s.sendCancel(j.ID)
			}
		}
	}
	if s.cfg.CancelOnShutdown {
		cancelAll()
	}
	done := make(chan struct{})
	go func() {
		for _, j := range running {
			<-j.Done()
		}
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	cancelAll()
	select {
	case <-done:
		return ctx.Err()
	case <-time.After(cancelGrace):
		s.log.Error("running jobs did not stop within the grace after being cancelled; leaving them", "grace", cancelGrace)
		return fmt.Errorf("shutdown: running jobs did not stop %s after cancel: %w", cancelGrace, ctx.Err())
	}
}

// Close stops listening to the bus; the caller closes the bus.
func (s *Server) Close() {
	for _, sub := range s.subs {
		sub.Unsubscribe()
	}
}
