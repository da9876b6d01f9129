package server

import (
	"context"
	"errors"
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

// Job is one request's life: queued, running, then completed, failed or cancelled.
type Job struct {
	ID     string
	Kind   string
	Params JobParams
	// Source marks jobs from the A1111-compatible API, which /sdapi/v1/interrupt cancels.
	Source string
	// keepImages holds the final images in memory for a handler that answers
	// with them; other jobs' results live only in their run directory.
	keepImages bool
	// inputs are the parameters as validated and decoded at submission.
	inputs *decoded

	mu           sync.Mutex
	state        string
	position     int // in the queue, 0 = next; -1 when not queued
	created      time.Time
	started      time.Time
	finished     time.Time
	step         int
	steps        int
	elapsed      time.Duration
	err          string
	runID        string
	files        []string
	result       map[string]any
	images       []image.Image // the final images, for synchronous answers
	preview      []byte        // the latest encoded preview (JPEG), for /sdapi/v1/progress
	previewFrame []byte        // the same as a websocket frame, for late joiners
	cancel       context.CancelFunc
	done         chan struct{}
}

func newJob(id, kind string, p JobParams) *Job {
	return &Job{ID: id, Kind: kind, Params: p, state: StateQueued, created: time.Now(), position: -1, done: make(chan struct{})}
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
	v := JobView{
		ID: j.ID, Kind: j.Kind, State: j.state, Step: j.step, Steps: j.steps, Elapsed: j.elapsed.Seconds(),
		Error: j.err, RunID: j.runID, Result: j.result, Created: j.created,
		EventsURL: "/v1/jobs/" + j.ID + "/events", CancelURL: "/v1/jobs/" + j.ID + "/cancel", Parameters: j.Params,
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

// takeImages hands the final images over once and forgets them.
func (j *Job) takeImages() []image.Image {
	j.mu.Lock()
	defer j.mu.Unlock()
	imgs := j.images
	j.images = nil
	return imgs
}

// State reports the job's state.
func (j *Job) State() string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.state
}

// Done is closed when the job has finished, however it ended.
func (j *Job) Done() <-chan struct{} { return j.done }

func (j *Job) ended() bool {
	return j.state == StateCompleted || j.state == StateFailed || j.state == StateCancelled
}

// ErrQueueFull is returned when the queue holds its maximum.
var ErrQueueFull = errors.New("the job queue is full")

// ErrShuttingDown is returned for jobs submitted during shutdown.
var ErrShuttingDown = errors.New("the server is shutting down")

// queue is a bounded FIFO of jobs served by a fixed number of workers.
type queue struct {
	mu      sync.Mutex
	cond    *sync.Cond
	pending []*Job
	max     int
	closed  bool
	onMove  func(*Job) // told when a waiting job's position changes
}

func newQueue(max int, onMove func(*Job)) *queue {
	q := &queue{max: max, onMove: onMove}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *queue) push(j *Job) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrShuttingDown
	}
	if len(q.pending) >= q.max {
		return ErrQueueFull
	}
	q.pending = append(q.pending, j)
	j.mu.Lock()
	j.position = len(q.pending) - 1
	j.mu.Unlock()
	q.cond.Signal()
	return nil
}

// pop waits for the next job; nil once the queue is closed and empty.
func (q *queue) pop() *Job {
	q.mu.Lock()
	for len(q.pending) == 0 && !q.closed {
		q.cond.Wait()
	}
	if len(q.pending) == 0 {
		q.mu.Unlock()
		return nil
	}
	j := q.pending[0]
	q.pending = q.pending[1:]
	moved := q.renumber()
	q.mu.Unlock()
	for _, m := range moved {
		q.onMove(m)
	}
	return j
}

// remove takes a queued job out (cancel); it reports whether it was queued.
func (q *queue) remove(j *Job) bool {
	q.mu.Lock()
	idx := -1
	for i, p := range q.pending {
		if p == j {
			idx = i
			break
		}
	}
	if idx < 0 {
		q.mu.Unlock()
		return false
	}
	q.pending = append(q.pending[:idx], q.pending[idx+1:]...)
	moved := q.renumber()
	q.mu.Unlock()
	for _, m := range moved {
		q.onMove(m)
	}
	return true
}

// renumber sets every waiting job's position; it returns the ones that moved.
func (q *queue) renumber() []*Job {
	var moved []*Job
	for i, p := range q.pending {
		p.mu.Lock()
		if p.position != i {
			p.position = i
			moved = append(moved, p)
		}
		p.mu.Unlock()
	}
	return moved
}

func (q *queue) length() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.pending)
}

// drain closes the queue and returns what was still waiting.
func (q *queue) drain() []*Job {
	q.mu.Lock()
	q.closed = true
	rest := q.pending
	q.pending = nil
	q.cond.Broadcast()
	q.mu.Unlock()
	return rest
}
