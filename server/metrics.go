package server

import (
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// stepBuckets span a tiny test model's milliseconds to SD 1.5 on a slow CPU
// (tens of seconds per step).
var stepBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 25, 60}

// metrics are what /metrics exposes. Each Server owns its registry, so several
// servers in one process (the tests) do not collide on the global one.
type metrics struct {
	// submitted and running are plain counters because /healthz reads running
	// too; the registry reads them through CounterFunc and GaugeFunc.
	submitted atomic.Int64
	running   atomic.Int64

	registry *prometheus.Registry
	finishes *prometheus.CounterVec
	steps    prometheus.Histogram
}

// newMetrics registers s's series, the Go runtime's and the process's on a
// registry of their own. The funcs read s when scraped, so s's queue, hub and
// runner may be set after this call.
func newMetrics(s *Server) *metrics {
	m := &metrics{registry: prometheus.NewRegistry()}
	m.finishes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "stepwise_jobs_finished_total", Help: "Jobs finished, by final state.",
	}, []string{"state"})
	for _, st := range []string{StateCompleted, StateFailed, StateCancelled} {
		m.finishes.WithLabelValues(st) // every state shows, at 0 until it happens
	}
	m.steps = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "stepwise_step_seconds", Help: "Seconds per denoising step.", Buckets: stepBuckets,
	})
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	counter := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, f)
	}
	m.registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.finishes, m.steps,
		gauge("stepwise_queue_length", "Jobs waiting in the queue.",
			func() float64 { return float64(s.queue.length()) }),
		gauge("stepwise_jobs_running", "Jobs running now.",
			func() float64 { return float64(m.running.Load()) }),
		counter("stepwise_jobs_submitted_total", "Jobs accepted.",
			func() float64 { return float64(m.submitted.Load()) }),
		counter("stepwise_preview_bytes_sent_total", "Bytes of preview frames written to websocket clients.",
			func() float64 { return float64(s.hub.previewBytes.Load()) }),
		counter("stepwise_previews_skipped_total", "Previews a slow client never received (a newer one replaced them).",
			func() float64 { return float64(s.hub.dropped.Load()) }),
		gauge("stepwise_websocket_clients", "Connected websocket clients.",
			func() float64 { return float64(s.hub.count()) }),
		counter("stepwise_websocket_clients_dropped_total", "Websocket clients disconnected because they did not read their events.",
			func() float64 { return float64(s.hub.slowClients.Load()) }),
		gauge("stepwise_models_loaded", "Models loaded, on every worker.",
			func() float64 { st, _ := s.workers.memory(); return float64(st.Loaded) }),
		gauge("stepwise_model_bytes", "Bytes of loaded model weights, on every worker.",
			func() float64 { st, _ := s.workers.memory(); return float64(st.BytesInUse) }),
		gauge("stepwise_workers", "Workers that announced themselves lately.",
			func() float64 { return float64(len(s.workers.list())) }),
		workerCollector{s.workers},
	)
	return m
}

func (m *metrics) finished(state string) { m.finishes.WithLabelValues(state).Inc() }

// observeStep records one step's duration.
func (m *metrics) observeStep(d time.Duration) { m.steps.Observe(d.Seconds()) }

// handler serves the registry in whichever exposition format the scraper asks for.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{Registry: m.registry})
}

// workerCollector exposes each worker's state with its ID as a label.
type workerCollector struct{ w *workers }

var (
	workerRunningDesc = prometheus.NewDesc("stepwise_worker_jobs_running", "Jobs running on a worker.",
		[]string{"worker", "host", "device"}, nil)
	workerBytesDesc = prometheus.NewDesc("stepwise_worker_model_bytes", "Bytes of model weights loaded on a worker.",
		[]string{"worker", "host", "device"}, nil)
)

// Describe sends the descriptors of the per-worker series.
func (c workerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- workerRunningDesc
	ch <- workerBytesDesc
}

// Collect sends each listed worker's series.
func (c workerCollector) Collect(ch chan<- prometheus.Metric) {
	for _, a := range c.w.list() {
		ch <- prometheus.MustNewConstMetric(workerRunningDesc, prometheus.GaugeValue, float64(a.Running), a.ID, a.Host, a.Device)
		ch <- prometheus.MustNewConstMetric(workerBytesDesc, prometheus.GaugeValue, float64(a.Memory.BytesInUse), a.ID, a.Host, a.Device)
	}
}
