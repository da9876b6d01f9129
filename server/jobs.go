package server

import (
	"context"
	"image"
	"sync"
	"time"
)

// Job states.
const (
	StateQueued    = "queued"
	StateRunning   = "running"
	StateCompleted = "completed"
	StateFailed    = "failed"
	StateCancelled = "cancelled"
)

// Job is one request's life: queued, running, then completed, failed or
// cancelled. Its state changes only through the methods in this file, each
// under the job's lock.
type Job struct {
	ID     string
	Kind   string
	Params JobParams
	// Source marks jobs from the A1111-compatible API, which /sdapi/v1/interrupt cancels.
	Source string
	// keepImages holds the final images in memory for a handler that answers
	// with them; other jobs' results live only in their run directory.
	keepImages bool
	// sdPath is the checkpoint the job runs with, resolved at submission.
	sdPath string

	mu       sync.Mutex
	inputs   *decoded // as validated and decoded at submission; dropped when the job ends
	state    string
	position int // in the queue, 0 = next; -1 when not queued
	created  time.Time
	started  time.Time
	finished time.Time
	step     int
	steps    int
	elapsed  time.Duration
	err      error
	runID    string
	files    []string
	result   map[string]any
	images   []image.Image // the final images, for synchronous answers
	// preview is the latest encoded preview (JPEG) for /sdapi/v1/progress, and
	// previewFrame the same as a websocket frame for late joiners.
	preview      []byte
	previewFrame []byte
	cancel       context.CancelFunc
	done         chan struct{}
}

func newJob(id, kind string, p JobParams, d *decoded) *Job {
	return &Job{ID: id, Kind: kind, Params: p, inputs: d, sdPath: d.sdPath, state: StateQueued, created: time.Now(), position: -1,
		done: make(chan struct{})}
}

// JobView is a job as the API shows it.
type JobView struct {
	ID         string         `json:"id"`
	Kind       string         `json:"kind"`
	State      string         `json:"state"`
	Position   *int           `json:"position,omitempty"`
	Step       int            `json:"step"`
	Steps      int            `json:"steps"`
	Progress   float64        `json:"progress"`
	Elapsed    float64        `json:"elapsed"`
	ETA        *float64       `json:"eta,omitempty"`
	Error      string         `json:"error,omitempty"`
	RunID      string         `json:"run_id,omitempty"`
	Files      []string       `json:"files,omitempty"`
	Result     map[string]any `json:"result,omitempty"`
	Created    time.Time      `json:"created"`
	Started    *time.Time     `json:"started,omitempty"`
	Finished   *time.Time     `json:"finished,omitempty"`
	EventsURL  string         `json:"events_url"`
	CancelURL  string         `json:"cancel_url"`
	Parameters JobParams      `json:"parameters"`
}

// View snapshots the job.
func (j *Job) View() JobView {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.viewLocked()
}

func (j *Job) viewLocked() JobView {
	v := JobView{
		ID: j.ID, Kind: j.Kind, State: j.state, Step: j.step, Steps: j.steps, Elapsed: j.elapsed.Seconds(),
		RunID: j.runID, Result: j.result, Created: j.created,
		EventsURL: "/v1/jobs/" + j.ID + "/events", CancelURL: "/v1/jobs/" + j.ID + "/cancel", Parameters: j.Params,
	}
	if j.err != nil {
		v.Error = j.err.Error()
	}
	for _, f := range j.files {
		v.Files = append(v.Files, "/v1/runs/"+j.runID+"/"+f)
	}
	if j.state == StateQueued {
		p := j.position
		v.Position = &p
	}
	if j.steps > 0 {
		v.Progress = float64(j.step) / float64(j.steps)
	}
	if j.state == StateCompleted {
		v.Progress = 1
	}
	if j.state == StateRunning && j.step > 0 {
		eta := j.elapsed.Seconds() / float64(j.step) * float64(j.steps-j.step)
		v.ETA = &eta
	}
	if !j.started.IsZero() {
		t := j.started
		v.Started = &t
	}
	if !j.finished.IsZero() {
		t := j.finished
		v.Finished = &t
	}
	return v
}

// event is the job as an event of type typ; with typ "" the type says the
// job's state as a late joiner sees it.
func (j *Job) event(typ string) Event {
	v := j.View()
	if typ == "" {
		typ = v.State
		if typ == StateRunning {
			typ = "progress"
			if v.Step == 0 {
				typ = "started"
			}
		}
	}
	return Event{Type: typ, JobID: j.ID, Kind: j.Kind, State: v.State, Position: v.Position, Step: v.Step, Steps: v.Steps,
		Progress: v.Progress, Elapsed: v.Elapsed, ETA: v.ETA, Files: v.Files, Result: v.Result, Error: v.Error,
		Time: time.Now()}
}

// State reports the job's state.
func (j *Job) State() string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.state
}

// Err is why the job failed or was cancelled; nil otherwise.
func (j *Job) Err() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.err
}

// Done is closed when the job has finished, however it ended.
func (j *Job) Done() <-chan struct{} { return j.done }

func (j *Job) endedLocked() bool {
	return j.state == StateCompleted || j.state == StateFailed || j.state == StateCancelled
}

func (j *Job) ended() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.endedLocked()
}

// setPosition records the job's place in the queue; it reports whether it moved.
func (j *Job) setPosition(i int) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	moved := j.position != i
	j.position = i
	return moved
}

// start moves a queued job to running and hands over its inputs; ok is false
// when the job ended while it waited.
func (j *Job) start(cancel context.CancelFunc) (p JobParams, d *decoded, ok bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.endedLocked() {
		return p, nil, false
	}
	j.state, j.started, j.cancel, j.position = StateRunning, time.Now(), cancel, -1
	return j.Params, j.inputs, true
}

// progress records a step; it returns the time the step itself took.
func (j *Job) progress(step, steps int, elapsed time.Duration) time.Duration {
	j.mu.Lock()
	defer j.mu.Unlock()
	took := elapsed - j.elapsed
	j.step, j.steps, j.elapsed = step, steps, elapsed
	return took
}

func (j *Job) setRun(id string) {
	j.mu.Lock()
	j.runID = id
	j.mu.Unlock()
}

func (j *Job) setPreview(jpeg, frame []byte) {
	j.mu.Lock()
	j.preview, j.previewFrame = jpeg, frame
	j.mu.Unlock()
}

// latestPreview returns the newest preview as JPEG and as a websocket frame.
func (j *Job) latestPreview() (jpeg, frame []byte) {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.preview, j.previewFrame
}

// requestCancel cancels a running job's context; it reports whether the job
// was running.
func (j *Job) requestCancel() bool {
	j.mu.Lock()
	cancel, running := j.cancel, j.state == StateRunning
	j.mu.Unlock()
	if running && cancel != nil {
		cancel()
	}
	return running && cancel != nil
}

// complete records a successful job's outputs; finish must follow.
func (j *Job) complete(runID string, files []string, result map[string]any, images []image.Image) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if runID != "" {
		j.runID = runID
	}
	j.files, j.result = files, result
	if j.keepImages {
		j.images = images
	}
}

// finish ends the job in state with err (nil when completed); it reports
// false when the job had already ended. A finished job keeps no inputs.
func (j *Job) finish(state string, err error) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.endedLocked() {
		return false
	}
	j.state, j.err, j.finished, j.cancel, j.inputs, j.position = state, err, time.Now(), nil, nil, -1
	close(j.done)
	return true
}

// modelPath is the checkpoint the job was resolved to at submission.
func (j *Job) modelPath() string { return j.sdPath }

// takeImages hands the final images over once and forgets them.
func (j *Job) takeImages() []image.Image {
	j.mu.Lock()
	defer j.mu.Unlock()
	imgs := j.images
	j.images = nil
	return imgs
}
