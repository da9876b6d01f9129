package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/jobbus"
	"github.com/stepwise-sd/stepwise/server"
)

// records is a slog handler that keeps what it is given.
type records struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (r *records) Enabled(context.Context, slog.Level) bool { return true }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, rec.Clone())
	return nil
}
func (r *records) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *records) WithGroup(string) slog.Handler      { return r }

// errors are the error attributes of the records at level.
func (r *records) errors(level slog.Level) []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []error
	for _, rec := range r.recs {
		if rec.Level != level {
			continue
		}
		rec.Attrs(func(a slog.Attr) bool {
			if err, ok := a.Value.Any().(error); ok && a.Key == "err" {
				out = append(out, err)
			}
			return true
		})
	}
	return out
}

// A message on the job subject that is no job is terminated and logged as
// such; the worker goes on to the next job, and the stream keeps nothing.
func TestMalformedJobIsRejectedAndTheWorkerGoesOn(t *testing.T) {
	logs := &records{}
	e := startEnv(t, server.Config{}, nil, server.WorkerConfig{Logger: slog.New(logs)})
	bus, err := jobbus.Connect(e.nats)
	require.NoError(t, err)
	defer bus.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, garbage := range []string{`not json`, `{"id":"x","kind":"paint"}`, `{"id":"y","kind":"txt2img","spec":"nope"}`} {
		_, err := bus.JS.Publish(ctx, jobbus.JobSubject, []byte(garbage))
		require.NoError(t, err)
	}
	id := submit(t, e, txt(2))
	assert.Equal(t, "completed", last(collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id))["type"], "the worker went on")
	var rejected int
	for _, err := range logs.errors(slog.LevelError) {
		if errors.Is(err, server.ErrMalformedJob) {
			rejected++
		}
	}
	assert.Equal(t, 3, rejected, "each malformed message is logged as such")
	st, err := bus.JS.Stream(ctx, jobbus.Stream)
	require.NoError(t, err)
	// Acks are asynchronous: the job's own may land just after its end.
	// Messages left unacked would stay until the ack wait (15 s) and beyond.
	assert.Eventually(t, func() bool {
		info, err := st.Info(ctx)
		return err == nil && info.State.Msgs == 0
	}, 10*time.Second, 20*time.Millisecond, "the malformed messages were terminated, not left to come back")
}

// A worker of another version or ABI refuses to join, saying why.
func TestWorkerOfAnotherMakingRefusesToJoin(t *testing.T) {
	e := start(t, server.Config{})
	for _, wc := range []server.WorkerConfig{{Version: "other"}, {Version: "test", ABI: 999}} {
		bus, err := jobbus.Connect(e.nats)
		require.NoError(t, err)
		wc.ID = "intruder"
		w := server.NewWorker(wc, e.runner, bus)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err = w.Run(ctx)
		cancel()
		bus.Close()
		require.ErrorIs(t, err, jobbus.ErrMismatch)
	}
	// And it never showed up as a worker.
	var h map[string]any
	require.Equal(t, http.StatusOK, e.get(t, "/healthz", &h))
	for _, w := range h["workers"].([]any) {
		assert.NotEqual(t, "intruder", w.(map[string]any)["id"])
	}
}

// Every worker is listed by /healthz, /v1/models and /metrics, with what it
// holds; a worker that leaves is no longer listed.
func TestWorkersAnnounceThemselves(t *testing.T) {
	e := start(t, server.Config{})
	bus, err := jobbus.Connect(e.nats)
	require.NoError(t, err)
	defer bus.Close()
	// Its heartbeat outlives the test, so only its leaving announcement can
	// take it off the list.
	second := server.NewWorker(server.WorkerConfig{ID: "second", Version: "test", Device: "cpu:1", Heartbeat: time.Hour}, e.runner, bus)
	ctx, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- second.Run(ctx) }()

	id := submit(t, e, txt(2))
	collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id)
	ids := func() map[string]bool {
		var h struct {
			Workers []jobbus.Announcement `json:"workers"`
		}
		require.Equal(t, http.StatusOK, e.get(t, "/healthz", &h))
		out := map[string]bool{}
		for _, w := range h.Workers {
			out[w.ID] = true
		}
		return out
	}
	require.Eventually(t, func() bool { return len(ids()) == 2 }, time.Minute, 50*time.Millisecond)
	assert.Equal(t, map[string]bool{"test-worker": true, "second": true}, ids())
	var models struct {
		Workers []jobbus.Announcement `json:"workers"`
		Memory  map[string]any        `json:"memory"`
	}
	require.Equal(t, http.StatusOK, e.get(t, "/v1/models", &models))
	assert.Len(t, models.Workers, 2)
	assert.Greater(t, models.Memory["bytes"], 0.0, "the model a worker loaded counts")
	m := scrape(t, e)
	assert.Equal(t, 2.0, m["stepwise_workers"].GetMetric()[0].GetGauge().GetValue())
	labels := map[string]bool{}
	for _, mt := range m["stepwise_worker_model_bytes"].GetMetric() {
		for _, l := range mt.GetLabel() {
			if l.GetName() == "worker" {
				labels[l.GetValue()] = true
			}
		}
	}
	assert.Equal(t, map[string]bool{"test-worker": true, "second": true}, labels)

	stop()
	require.NoError(t, <-stopped)
	// The gateway hears of the leaving on its own subscription, a moment later.
	assert.Eventually(t, func() bool { return len(ids()) == 1 }, 30*time.Second, 20*time.Millisecond,
		"a worker that left is no longer listed")
	assert.Equal(t, map[string]bool{"test-worker": true}, ids())
}

// A model load goes to every worker; one a worker cannot load is the
// request's error.
func TestModelLoadReachesTheWorkers(t *testing.T) {
	e := start(t, server.Config{})
	require.Eventually(t, func() bool {
		var h struct {
			Workers []json.RawMessage `json:"workers"`
		}
		e.get(t, "/healthz", &h)
		return len(h.Workers) == 1
	}, time.Minute, 50*time.Millisecond)
	code, out := e.post(t, "/v1/models/load", map[string]any{"kind": "sd"})
	require.Equal(t, http.StatusOK, code, out)
	var models struct {
		Loaded []map[string]any `json:"loaded"`
	}
	require.Eventually(t, func() bool {
		e.get(t, "/v1/models", &models)
		return len(models.Loaded) == 1
	}, time.Minute, 50*time.Millisecond, "the worker announced the model it loaded")
	code, out = e.post(t, "/v1/models/unload", map[string]any{"kind": "sd"})
	require.Equal(t, http.StatusOK, code, out)
	assert.Equal(t, true, out["workers"].([]any)[0].(map[string]any)["unloaded"])
}

// A stopping worker takes no new job and finishes its running one within
// its grace; one still running when the grace ends goes back to the queue,
// where another worker takes it (the watchers see it retried).
func TestStoppingWorkerFinishesOrHandsBackItsJob(t *testing.T) {
	t.Run("finishes within the grace", func(t *testing.T) {
		e := start(t, server.Config{})
		id := submit(t, e, txt(20))
		c := e.dial(t, "/v1/jobs/"+id+"/events")
		waitForEvent(t, c, "progress")
		queued := submit(t, e, txt(2))
		require.NoError(t, e.stopWorker())
		s := collect(t, c, id)
		assert.Equal(t, "completed", last(s)["type"], "the running job finished")
		var v map[string]any
		e.get(t, "/v1/jobs/"+queued, &v)
		assert.Equal(t, "queued", v["state"], "the stopped worker took no new job")
	})
	t.Run("hands back after the grace", func(t *testing.T) {
		e := startEnv(t, server.Config{}, nil, server.WorkerConfig{StopGrace: time.Millisecond})
		id := submit(t, e, txt(150))
		c := e.dial(t, "/v1/jobs/"+id+"/events")
		waitForEvent(t, c, "progress")
		require.NoError(t, e.stopWorker())
		bus, err := jobbus.Connect(e.nats)
		require.NoError(t, err)
		defer bus.Close()
		next := server.NewWorker(server.WorkerConfig{ID: "next", Version: "test"}, e.runner, bus)
		ctx, stop := context.WithCancel(context.Background())
		stopped := make(chan error, 1)
		go func() { stopped <- next.Run(ctx) }()
		defer func() { stop(); <-stopped }()
		s := collect(t, c, id)
		assert.Equal(t, 1, count(s.events, "retried"))
		assert.Equal(t, "completed", last(s)["type"])
		assert.Equal(t, "next", last(s)["worker"], "the other worker ran it")
	})
}
