package server

import "sync"

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
	j.setPosition(len(q.pending) - 1)
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
	q.cond.Broadcast()
	q.mu.Unlock()
	return rest
}
