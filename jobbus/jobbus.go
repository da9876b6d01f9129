// Package jobbus is the protocol between stepwise's gateway (stepwise serve)
// and its workers (stepwise worker) over NATS JetStream: every stream,
// subject, bucket and message shape lives here, and nowhere else.
//
// Jobs wait on a work-queue stream and are acked by the worker that ran them.
// Per-job events (state, progress, preview frames) are fire-and-forget core
// NATS messages on the job's own subjects, so a watcher sees every step with no
// storage in between; cancel is a core message too, backed by a key in a KV
// bucket so a cancel that races a worker's start is never lost. Results go to
// an object store whose TTL is the runs' retention. Workers announce
// themselves on a heartbeat subject.
package jobbus

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/stepwise-sd/stepwise/modelcache"
)

// Protocol is the version of the messages in this package; a gateway and a
// worker of different protocols never exchange jobs.
const Protocol = 1

// Names of the JetStream objects and core subjects.
const (
	// Stream is the work-queue stream of jobs; JobSubject is its only subject.
	Stream     = "STEPWISE_JOBS"
	JobSubject = "stepwise.jobs"
	// Consumer is the durable pull consumer every worker shares: each job
	// goes to one worker.
	Consumer = "workers"
	// ResultsBucket is the object store of run files, named "<run>/<file>".
	ResultsBucket = "stepwise-results"
	// MetaBucket holds the gateway's Meta under MetaKey.
	MetaBucket = "stepwise-meta"
	MetaKey    = "gateway"
	// CancelBucket holds a key per cancelled job (its ID), expiring with the retention.
	CancelBucket = "stepwise-cancels"
	// AnnounceSubject carries every worker's Announcement, each heartbeat.
	AnnounceSubject = "stepwise.workers"
	// EventsWildcard matches every job's events: one subscription, so the
	// events of a job reach the gateway in the order the worker sent them.
	EventsWildcard = "stepwise.job.>"
	eventsPrefix   = "stepwise.job."
	cancelPrefix   = "stepwise.cancel."
)

// Event kinds: the last token of a job's event subject.
const (
	KindState    = "state"
	KindProgress = "progress"
	KindPreview  = "preview" // the body is a websocket preview frame, as is
)

// EventSubject is the subject of job id's events of kind.
func EventSubject(id, kind string) string { return eventsPrefix + id + "." + kind }

// ParseEventSubject splits an event subject into its job and kind.
func ParseEventSubject(subject string) (id, kind string, ok bool) {
	if len(subject) <= len(eventsPrefix) || subject[:len(eventsPrefix)] != eventsPrefix {
		return "", "", false
	}
	rest := subject[len(eventsPrefix):]
	for i := len(rest) - 1; i > 0; i-- {
		if rest[i] == '.' {
			return rest[:i], rest[i+1:], true
		}
	}
	return "", "", false
}

// CancelSubject is where job id's cancel is published.
func CancelSubject(id string) string { return cancelPrefix + id }

// ResultName is a run file's name in the results object store.
func ResultName(run, file string) string { return run + "/" + file }

// Job is a job message on the work queue.
type Job struct {
	ID   string `json:"id"`
	Kind string `json:"kind"`
	// Spec is the gateway's validated job (parameters, resolved model paths,
	// decoded inputs) as the gateway encodes it; the worker decodes the same type.
	Spec    json.RawMessage `json:"spec"`
	Created time.Time       `json:"created"`
	// Protocol, Version and ABI say who made the job; a worker refuses jobs of
	// another making as it refuses to join.
	Protocol int    `json:"protocol"`
	Version  string `json:"version"`
	ABI      int    `json:"abi"`
}

// State types.
const (
	StateStarted   = "started"
	StateCompleted = "completed"
	StateFailed    = "failed"
	StateCancelled = "cancelled"
)

// Error codes a State may carry.
const (
	// CodeCrashLimit: the job killed its worker MaxCrashes times and is not run again.
	CodeCrashLimit = "crash_limit"
	// CodeBadRequest: the job's input was refused by the engine (a 4xx).
	CodeBadRequest = "bad_request"
	// CodeCancelled: the job was cancelled.
	CodeCancelled = "cancelled"
)

// State is a job's state change, on its state subject.
type State struct {
	Type    string `json:"type"`
	Worker  string `json:"worker"`
	Attempt int    `json:"attempt"` // the message's delivery: 1 for the first
	// Run names one start of the job (a worker's handling of a delivery):
	// a new run is a retry.
	Run string `json:"run,omitempty"`
	// Kind and Params describe the job on "started", so that a gateway that
	// did not submit it (it restarted) can show it.
	Kind   string          `json:"kind,omitempty"`
	Params json.RawMessage `json:"params,omitempty"`
	RunID  string          `json:"run_id,omitempty"`
	Files  []string        `json:"files,omitempty"`
	// Images are the files, in order, that a synchronous answer returns.
	Images []string       `json:"images,omitempty"`
	Result map[string]any `json:"result,omitempty"`
	Error  string         `json:"error,omitempty"`
	Code   string         `json:"code,omitempty"`
	// Worker's announcement after the job, so its memory shows at once.
	Announcement *Announcement `json:"announcement,omitempty"`
}

// Progress is one denoising step, on the job's progress subject.
type Progress struct {
	Step    int           `json:"step"`
	Steps   int           `json:"steps"`
	Elapsed time.Duration `json:"elapsed"`
	// Time is when the step ended, on the worker's clock.
	Time time.Time `json:"time"`
}

// Announcement is a worker saying who it is and what it holds.
type Announcement struct {
	ID         string                   `json:"id"`
	Host       string                   `json:"host"`
	PID        int                      `json:"pid"`
	Device     string                   `json:"device"`
	DeviceName string                   `json:"device_name,omitempty"`
	Backends   []BackendStatus          `json:"backends,omitempty"`
	Loaded     []modelcache.LoadedModel `json:"loaded"`
	Memory     modelcache.Stats         `json:"memory"`
	Running    int                      `json:"running"`
	Version    string                   `json:"version"`
	ABI        int                      `json:"abi"`
	Protocol   int                      `json:"protocol"`
	Time       time.Time                `json:"time"`
	// Every is the interval of the worker's announcements.
	Every time.Duration `json:"every"`
	// Leaving is set on a worker's last announcement.
	Leaving bool `json:"leaving,omitempty"`
}

// BackendStatus is whether a worker can run one backend (binding.BackendStatus
// by the backend's name).
type BackendStatus struct {
	Name      string `json:"name"`
	Available bool   `json:"available"`
	Reason    string `json:"reason,omitempty"`
	Library   string `json:"library,omitempty"`
}

// Meta is what the gateway publishes about itself for workers to check.
type Meta struct {
	Protocol int    `json:"protocol"`
	Version  string `json:"version"`
	ABI      int    `json:"abi"`
}

// ErrMismatch is a worker's refusal to join a gateway of another protocol,
// version or ABI.
var ErrMismatch = errors.New("the worker and the gateway differ")

// Check compares a worker's making with the gateway's.
func (m Meta) Check(worker Meta) error {
	if m != worker {
		return fmt.Errorf("%w: the gateway is stepwise %s (ABI %d, protocol %d), this worker stepwise %s (ABI %d, protocol %d): "+
			"run the same release on every host", ErrMismatch, m.Version, m.ABI, m.Protocol, worker.Version, worker.ABI, worker.Protocol)
	}
	return nil
}

// ControlSubject is where a worker answers requests addressed to it alone.
func ControlSubject(worker string) string { return "stepwise.control." + worker }

// Model operations of a ModelRequest.
const (
	OpLoad   = "load"
	OpUnload = "unload"
)

// ModelRequest asks a worker to load or unload a model.
type ModelRequest struct {
	Op      string `json:"op"`
	Kind    string `json:"kind"` // "sd" or "seg"
	Path    string `json:"path"`
	VAE     string `json:"vae,omitempty"`
	DType   string `json:"dtype,omitempty"`
	Backend string `json:"backend,omitempty"`
}

// ModelReply is a worker's answer to a ModelRequest.
type ModelReply struct {
	Worker   string           `json:"worker"`
	Info     json.RawMessage  `json:"info,omitempty"`
	Unloaded bool             `json:"unloaded,omitempty"`
	Memory   modelcache.Stats `json:"memory"`
	Error    string           `json:"error,omitempty"`
	// Code is CodeBadRequest for a model the request got wrong, CodeInUse
	// for one that cannot be unloaded now.
	Code string `json:"code,omitempty"`
}

// CodeInUse: the model is in use and cannot be unloaded now.
const CodeInUse = "in_use"
