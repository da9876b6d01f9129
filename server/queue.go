package server

import "sync"

// queue is the gateway's bounded FIFO of the jobs it queued on the bus and
// no worker has started yet: it bounds them and numbers their positions.
type queue struct {
	mu      sync.Mutex
	pending []*Job
	max     int
	closed  bool
	onMove  func(*Job) // told when a waiting job's position changes
}

func newQueue(max int, onMove func(*Job)) *queue {
	return &queue{max: max, onMove: onMove}
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
	j.setPosition(len(q.pending) - 1)
	return nil
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
		if p.setPosition(i) {
			moved = append(moved, p)
		}
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
	q.mu.Unlock()
	return rest
}
