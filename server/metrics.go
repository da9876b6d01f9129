package server

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// metrics are the counters /metrics exposes in Prometheus' text format.
type metrics struct {
	submitted atomic.Int64
	running   atomic.Int64

	mu       sync.Mutex
	byState  map[string]int64
	steps    int64
	stepSecs float64
}

func newMetrics() *metrics { return &metrics{byState: map[string]int64{}} }

func (m *metrics) finished(state string) {
	m.mu.Lock()
	m.byState[state]++
	m.mu.Unlock()
}

// observeStep records one step's duration.
func (m *metrics) observeStep(d time.Duration) {
	m.mu.Lock()
	m.steps++
	m.stepSecs += d.Seconds()
	m.mu.Unlock()
}

func (s *Server) writeMetrics(w io.Writer) {
	m := s.metrics
	m.mu.Lock()
	defer m.mu.Unlock()
	fmt.Fprintln(w, "# HELP stepwise_queue_length Jobs waiting in the queue.")
	fmt.Fprintln(w, "# TYPE stepwise_queue_length gauge")
	fmt.Fprintf(w, "stepwise_queue_length %d\n", s.queue.length())
	fmt.Fprintln(w, "# HELP stepwise_jobs_running Jobs running now.")
	fmt.Fprintln(w, "# TYPE stepwise_jobs_running gauge")
	fmt.Fprintf(w, "stepwise_jobs_running %d\n", m.running.Load())
	fmt.Fprintln(w, "# HELP stepwise_jobs_submitted_total Jobs accepted.")
	fmt.Fprintln(w, "# TYPE stepwise_jobs_submitted_total counter")
	fmt.Fprintf(w, "stepwise_jobs_submitted_total %d\n", m.submitted.Load())
	fmt.Fprintln(w, "# HELP stepwise_jobs_finished_total Jobs finished, by final state.")
	fmt.Fprintln(w, "# TYPE stepwise_jobs_finished_total counter")
	for _, st := range []string{StateCompleted, StateFailed, StateCancelled} {
		fmt.Fprintf(w, "stepwise_jobs_finished_total{state=%q} %d\n", st, m.byState[st])
	}
	fmt.Fprintln(w, "# HELP stepwise_step_seconds Seconds per denoising step.")
	fmt.Fprintln(w, "# TYPE stepwise_step_seconds summary")
	fmt.Fprintf(w, "stepwise_step_seconds_sum %g\nstepwise_step_seconds_count %d\n", m.stepSecs, m.steps)
	fmt.Fprintln(w, "# HELP stepwise_preview_bytes_sent_total Bytes of preview frames written to websocket clients.")
	fmt.Fprintln(w, "# TYPE stepwise_preview_bytes_sent_total counter")
	fmt.Fprintf(w, "stepwise_preview_bytes_sent_total %d\n", s.hub.previewBytes.Load())
	fmt.Fprintln(w, "# HELP stepwise_previews_skipped_total Previews a slow client never received (a newer one replaced them).")
	fmt.Fprintln(w, "# TYPE stepwise_previews_skipped_total counter")
	fmt.Fprintf(w, "stepwise_previews_skipped_total %d\n", s.hub.dropped.Load())
	fmt.Fprintln(w, "# HELP stepwise_websocket_clients Connected websocket clients.")
	fmt.Fprintln(w, "# TYPE stepwise_websocket_clients gauge")
	fmt.Fprintf(w, "stepwise_websocket_clients %d\n", s.hub.count())
	cs := s.engine.Cache.Stats()
	fmt.Fprintln(w, "# HELP stepwise_models_loaded Models loaded.")
	fmt.Fprintln(w, "# TYPE stepwise_models_loaded gauge")
	fmt.Fprintf(w, "stepwise_models_loaded %d\n", cs.Loaded)
	fmt.Fprintln(w, "# HELP stepwise_model_bytes Bytes of loaded model weights.")
	fmt.Fprintln(w, "# TYPE stepwise_model_bytes gauge")
	fmt.Fprintf(w, "stepwise_model_bytes %d\n", cs.BytesInUse)
}
