package server

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/stepwise-sd/stepwise/jobbus"
	"github.com/stepwise-sd/stepwise/modelcache"
)

// jobSpec is a validated job as it travels to a worker (jobbus.Job.Spec):
// the parameters whole, so a new field reaches the worker with no code here,
// and what the gateway resolved and decoded at submission.
type jobSpec struct {
	Params    JobParams `json:"params"`
	SDPath    string    `json:"sd_path,omitempty"`
	VAEPath   string    `json:"vae_path,omitempty"`
	SegModel  string    `json:"seg_model,omitempty"`
	DType     string    `json:"dtype,omitempty"`
	Backend   string    `json:"backend,omitempty"`
	Image     []byte    `json:"image,omitempty"`
	Mask      []byte    `json:"mask,omitempty"`
	Seed      uint64    `json:"seed"`
	MaxPixels int       `json:"max_pixels"`
}

// ErrWorkerCrashed fails a job that ended its worker --max-crashes times.
var ErrWorkerCrashed = errors.New("the job crashed its worker too many times")

// onEvent handles one job event from a worker. It runs on the events
// subscription's goroutine, one event at a time, in the order sent.
func (s *Server) onEvent(m *nats.Msg) {
	id, kind, ok := jobbus.ParseEventSubject(m.Subject)
	if !ok {
		return
	}
	switch kind {
	case jobbus.KindState:
		var st jobbus.State
		if err := json.Unmarshal(m.Data, &st); err != nil {
			s.log.Warn("unreadable job state from a worker", "job", id, "err", err)
			return
		}
		s.onState(id, st)
	case jobbus.KindProgress:
		var p jobbus.Progress
		j := s.Job(id)
		if j == nil || json.Unmarshal(m.Data, &p) != nil || j.State() != StateRunning {
			return
		}
		s.metrics.observeStep(j.progress(p.Step, p.Steps, p.Elapsed))
		ev := j.event("progress")
		if !p.Time.IsZero() {
			ev.Time = p.Time // when the step happened, not when the gateway heard of it
		}
		s.hub.publish(ev)
	case jobbus.KindPreview:
		j := s.Job(id)
		if j == nil || j.State() != StateRunning {
			return
		}
		// The first image of a batch is the job's preview for late joiners
		// and /sdapi/v1/progress.
		if meta, img, ok := parseFrame(m.Data); ok && meta.Index == 0 {
			j.setPreview(img, m.Data)
		}
		s.hub.publishPreview(id, m.Data)
	}
}

// parseFrame splits a preview frame into its metadata and image.
func parseFrame(frame []byte) (PreviewMeta, []byte, bool) {
	var meta PreviewMeta
	if len(frame) < 8 || binary.BigEndian.Uint32(frame) != previewFrameType {
		return meta, nil, false
	}
	n := uint64(binary.BigEndian.Uint32(frame[4:]))
	if 8+n > uint64(len(frame)) || json.Unmarshal(frame[8:8+n], &meta) != nil {
		return meta, nil, false
	}
	return meta, frame[8+n:], true
}

func (s *Server) onState(id string, st jobbus.State) {
	if st.Announcement != nil {
		s.workers.update(*st.Announcement)
	}
	j := s.Job(id)
	if j == nil {
		if st.Type != jobbus.StateStarted {
			return
		}
		if j = s.adopt(id, st); j == nil {
			return
		}
	}
	switch st.Type {
	case jobbus.StateStarted:
		s.queue.remove(j) // renumbers the jobs behind it
		switch j.start(st.Worker, st.Run) {
		case startedFirst:
			s.metrics.running.Add(1)
			s.hub.publish(j.event("started"))
		case startedAgain:
			s.hub.publish(j.event("retried"))
			s.hub.publish(j.event("started"))
		}
	case jobbus.StateCompleted:
		j.complete(st.RunID, st.Files, st.Result, st.Images)
		s.finish(j, StateCompleted, nil)
	case jobbus.StateCancelled:
		s.finish(j, StateCancelled, errCancelled)
	case jobbus.StateFailed:
		s.finish(j, StateFailed, wireError(st))
	}
}

// wireError turns a worker's failure back into an error the API maps to a status.
func wireError(st jobbus.State) error {
	switch st.Code {
	case jobbus.CodeCrashLimit:
		return fmt.Errorf("%w: %s", ErrWorkerCrashed, st.Error)
	case jobbus.CodeBadRequest:
		return badRequest("%s", st.Error)
	case jobbus.CodeCancelled:
		return fmt.Errorf("%w: %s", errCancelled, st.Error)
	}
	return errors.New(st.Error)
}

// adopt takes on a job another gateway submitted (this one restarted, or
// several share the bus), from its start event.
func (s *Server) adopt(id string, st jobbus.State) *Job {
	if st.Kind == "" || !jobKinds[st.Kind] {
		return nil
	}
	var p JobParams
	if len(st.Params) > 0 {
		if err := json.Unmarshal(st.Params, &p); err != nil {
			return nil
		}
	}
	j := newJob(id, st.Kind, p, "")
	s.mu.Lock()
	defer s.mu.Unlock()
	if k := s.jobs[id]; k != nil {
		return k
	}
	s.jobs[id] = j
	s.order = append(s.order, id)
	s.forgetOldLocked()
	s.metrics.submitted.Add(1)
	return j
}

func (s *Server) onAnnounce(m *nats.Msg) {
	var a jobbus.Announcement
	if err := json.Unmarshal(m.Data, &a); err != nil || a.ID == "" {
		return
	}
	s.workers.update(a)
}

// workerTTL is how long a worker stays listed after its last announcement
// when it announced no interval.
const workerTTL = 10 * time.Second

// workers are the workers that announced themselves lately.
type workers struct {
	mu   sync.Mutex
	m    map[string]jobbus.Announcement
	seen map[string]time.Time
}

func newWorkers() *workers {
	return &workers{m: map[string]jobbus.Announcement{}, seen: map[string]time.Time{}}
}

func (w *workers) update(a jobbus.Announcement) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if a.Leaving {
		delete(w.m, a.ID)
		delete(w.seen, a.ID)
		return
	}
	w.m[a.ID] = a
	w.seen[a.ID] = time.Now()
}

// list is the workers heard from within three heartbeats, by ID.
func (w *workers) list() []jobbus.Announcement {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := []jobbus.Announcement{}
	for id, a := range w.m {
		ttl := workerTTL
		if a.Every > 0 {
			ttl = 3 * a.Every
		}
		if time.Since(w.seen[id]) > ttl {
			delete(w.m, id)
			delete(w.seen, id)
			continue
		}
		out = append(out, a)
	}
	sort.Slice(out, func(i, k int) bool { return out[i].ID < out[k].ID })
	return out
}

// backend reports whether some listed worker can run the backend named
// name, or no worker is listed; reason is a worker's why not.
func (w *workers) backend(name string) (reason string, ok bool) {
	list := w.list()
	if len(list) == 0 {
		return "", true
	}
	reason = "no worker has it"
	for _, a := range list {
		for _, st := range a.Backends {
			if st.Name == name {
				if st.Available {
					return "", true
				}
				reason = st.Reason
			}
		}
	}
	return reason, false
}

// memory sums the workers' model caches.
func (w *workers) memory() (modelcache.Stats, []modelcache.LoadedModel) {
	var st modelcache.Stats
	var loaded []modelcache.LoadedModel
	for _, a := range w.list() {
		st = addStats(st, a.Memory)
		loaded = append(loaded, a.Loaded...)
	}
	if loaded == nil {
		loaded = []modelcache.LoadedModel{}
	}
	return st, loaded
}

// addStats sums two caches' counters (several workers as one).
func addStats(a, b modelcache.Stats) modelcache.Stats {
	a.Loads += b.Loads
	a.Hits += b.Hits
	a.Evictions += b.Evictions
	a.Loaded += b.Loaded
	a.BytesInUse += b.BytesInUse
	a.Budget += b.Budget
	return a
}
