package server

import (
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
	// keepImages marks jobs whose handler answers with their images.
	keepImages bool
	// sdPath is the checkpoint the job runs with, resolved at submission.
	sdPath string

	mu       sync.Mutex
	seq      uint64 // the job's message in the stream, while queued
	worker   string // the worker running it
	run      string // the worker's run of it (jobbus.State.Run)
	attempt  int    // 1, then 2... after a worker died with it or handed it back
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
	images   []string // the run files a synchronous answer returns
	// preview is the latest encoded preview (JPEG) for /sdapi/v1/progress, and
	// previewFrame the same as a websocket frame for late joiners.
	preview      []byte
	previewFrame []byte
	done         chan struct{}
}

func newJob(id, kind string, p JobParams, sdPath string) *Job {
	return &Job{ID: id, Kind: kind, Params: p, sdPath: sdPath, state: StateQueued, created: time.Now(), position: -1,
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
	Worker     string         `json:"worker,omitempty"`
	Attempt    int            `json:"attempt,omitempty"`
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
		RunID: j.runID, Result: j.result, Created: j.created, Worker: j.worker, Attempt: j.attempt,
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
		Worker: v.Worker, Attempt: v.Attempt, Time: time.Now()}
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

// What start did.
type startResult int

const (
	startedNone  startResult = iota // the job had ended, or this is an old attempt
	startedFirst                    // queued → running
	startedAgain                    // a new attempt after its worker died
)

// start records that worker began a run of the job.
func (j *Job) start(worker, run string) startResult {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.endedLocked() || run == j.run {
		return startedNone
	}
	first := j.state == StateQueued
	j.state, j.worker, j.run, j.attempt, j.position, j.seq = StateRunning, worker, run, j.attempt+1, -1, 0
	j.step, j.elapsed, j.preview, j.previewFrame = 0, 0, nil, nil
	if first {
		j.started = time.Now()
		return startedFirst
	}
	return startedAgain
}

func (j *Job) setSeq(seq uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.state == StateQueued {
		j.seq = seq
	}
}

func (j *Job) getSeq() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.seq
}

// progress records a step; it returns the time the step itself took.
func (j *Job) progress(step, steps int, elapsed time.Duration) time.Duration {
	j.mu.Lock()
	defer j.mu.Unlock()
	took := elapsed - j.elapsed
	j.step, j.steps, j.elapsed = step, steps, elapsed
	return took
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

// complete records a successful job's outputs; finish must follow.
func (j *Job) complete(runID string, files []string, result map[string]any, images []string) {
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

// finish ends the job in state with err (nil when completed); ok is false
// when the job had already ended; was is the state it ended from.
func (j *Job) finish(state string, err error) (was string, ok bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.endedLocked() {
		return j.state, false
	}
	was = j.state
	j.state, j.err, j.finished, j.position, j.seq = state, err, time.Now(), -1, 0
	close(j.done)
	return was, true
}

// modelPath is the checkpoint the job was resolved to at submission.
func (j *Job) modelPath() string { return j.sdPath }

// imageFiles are the run and the files of a synchronous answer's images.
func (j *Job) imageFiles() (run string, files []string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.runID, j.images
}
