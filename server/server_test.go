package server_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	_ "image/jpeg"
	"image/png"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/jobbus"
	"github.com/stepwise-sd/stepwise/modelcache"
	"github.com/stepwise-sd/stepwise/pipeline"
	"github.com/stepwise-sd/stepwise/server"
)

func TestMain(m *testing.M) { testenv.Main(m) }

type env struct {
	srv  *server.Server
	http *httptest.Server
	runs string
	nats jobbus.ConnectOptions
	// runner is the worker's, for a second worker on the same models.
	runner *pipeline.Runner
	// stopWorker stops the worker as SIGTERM stops `stepwise worker`, and
	// returns what its Run returned.
	stopWorker func() error
}

// start runs a gateway and one worker over a real embedded NATS server: the
// worker on a goroutine of the test process (the same code as `stepwise
// worker`, on the real engine), for speed; the process tests in cmd/stepwise
// run it in real child processes. It returns once the worker has announced
// itself to the gateway.
func start(t testing.TB, cfg server.Config) *env {
	t.Helper()
	return startEnv(t, cfg, nil, server.WorkerConfig{})
}

// startWith is start with the worker's model cache over loader.
func startWith(t testing.TB, cfg server.Config, loader modelcache.Loader) *env {
	t.Helper()
	return startEnv(t, cfg, loader, server.WorkerConfig{})
}

// startEnv is start with the worker's loader (nil: the library's) and configuration.
func startEnv(t testing.TB, cfg server.Config, loader modelcache.Loader, wcfg server.WorkerConfig) *env {
	t.Helper()
	if loader == nil {
		loader = modelcache.LibraryLoader{Lib: testenv.Library(t)}
	}
	sdDir, segPath := testenv.Tiny(t)
	dir := t.TempDir()
	runs, err := pipeline.OpenRuns(filepath.Join(dir, "runs"), pipeline.RunsOptions{})
	require.NoError(t, err)
	nats, err := jobbus.StartEmbedded(dir)
	require.NoError(t, err)
	t.Cleanup(nats.Shutdown)
	gwBus, err := jobbus.Connect(nats.Options)
	require.NoError(t, err)
	t.Cleanup(gwBus.Close)
	if cfg.Model == "" {
		cfg.Model = sdDir
	}
	if cfg.SegModel == "" {
		cfg.SegModel = segPath
	}
	cfg.Runs, cfg.ConvertDir, cfg.Version = runs, filepath.Join(dir, "cache"), "test"
	s, err := server.New(cfg, gwBus)
	require.NoError(t, err)
	t.Cleanup(s.Close)

	c := modelcache.New(loader, modelcache.Options{Budget: -1})
	e := &pipeline.Runner{Cache: c, Runs: runs, ConvertDir: filepath.Join(dir, "cache"), Version: "test"}
	wBus, err := jobbus.Connect(nats.Options)
	require.NoError(t, err)
	t.Cleanup(wBus.Close)
	if wcfg.ID == "" {
		wcfg.ID = "test-worker"
	}
	if wcfg.StopGrace == 0 {
		wcfg.StopGrace = 10 * time.Second
	}
	wcfg.Version, wcfg.Device = "test", "cpu"
	w := server.NewWorker(wcfg, e, wBus)
	ctx, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- w.Run(ctx) }()

	var once sync.Once
	var stopErr error
	stopWorker := func() error {
		once.Do(func() {
			stop()
			stopErr = <-stopped
		})
		return stopErr
	}
	hs := httptest.NewServer(s.Handler())
	t.Cleanup(func() {
		hs.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		s.Shutdown(ctx)
		assert.NoError(t, stopWorker(), "the worker stops cleanly")
		c.Close()
	})
	env := &env{srv: s, http: hs, runs: runs.Dir(), nats: nats.Options, runner: e, stopWorker: stopWorker}
	require.Eventually(t, func() bool {
		var h struct {
			Workers []json.RawMessage `json:"workers"`
		}
		return env.get(t, "/healthz", &h) == http.StatusOK && len(h.Workers) == 1
	}, time.Minute, 5*time.Millisecond, "the worker joins")
	return env
}

func (e *env) post(t testing.TB, path string, body any) (int, map[string]any) {
	t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case string:
		r = strings.NewReader(b)
	default:
		data, _ := json.Marshal(b)
		r = bytes.NewReader(data)
	}
	resp, err := http.Post(e.http.URL+path, "application/json", r)
	require.NoError(t, err)
	defer resp.Body.Close()
	var out map[string]any
	raw, _ := io.ReadAll(resp.Body)
	require.NoError(t, json.Unmarshal(raw, &out), string(raw))
	return resp.StatusCode, out
}

func (e *env) get(t testing.TB, path string, out any) int {
	t.Helper()
	resp, err := http.Get(e.http.URL + path)
	require.NoError(t, err)
	defer resp.Body.Close()
	if out != nil {
		require.NoError(t, json.NewDecoder(resp.Body).Decode(out))
	}
	return resp.StatusCode
}

func (e *env) dial(t testing.TB, path string) *websocket.Conn {
	t.Helper()
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.http.URL, "http")+path, nil)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

type seen struct {
	events   []map[string]any
	previews []server.PreviewMeta
}

// collect reads a job's stream until it ends (completed, failed, cancelled).
func collect(t testing.TB, c *websocket.Conn, jobID string) seen {
	t.Helper()
	return read(t, c, jobID, true)
}

// collectOf reads the all-jobs stream (/v1/events), keeping jobID's frames,
// until that job ends. Opened before the job is submitted, it sees the job
// from its first step, where a job's own stream opened after submitting joins
// it at its current state (docs/protocol.md).
func collectOf(t testing.TB, c *websocket.Conn, jobID string) seen {
	t.Helper()
	return read(t, c, jobID, false)
}

// read reads frames until jobID ends; only says whether every frame must be
// jobID's (a job's own stream) or others are skipped (the all-jobs stream).
func read(t testing.TB, c *websocket.Conn, jobID string, only bool) seen {
	t.Helper()
	var s seen
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	for {
		typ, data, err := c.ReadMessage()
		require.NoError(t, err)
		if typ == websocket.BinaryMessage {
			require.GreaterOrEqual(t, len(data), 8)
			require.Equal(t, uint32(4), binary.BigEndian.Uint32(data))
			n := binary.BigEndian.Uint32(data[4:])
			var meta server.PreviewMeta
			require.NoError(t, json.Unmarshal(data[8:8+n], &meta))
			_, _, err := image.Decode(bytes.NewReader(data[8+n:]))
			require.NoError(t, err, "the frame carries a decodable image")
			if only || meta.JobID == jobID {
				s.previews = append(s.previews, meta)
			}
			continue
		}
		var ev map[string]any
		require.NoError(t, json.Unmarshal(data, &ev))
		if !only && ev["job_id"] != jobID {
			continue
		}
		require.Equal(t, jobID, ev["job_id"])
		s.events = append(s.events, ev)
		switch ev["type"] {
		case "completed", "failed", "cancelled":
			return s
		}
	}
}

// assertEveryPreview checks one client's previews of an n-step job against
// what newest-wins promises (docs/protocol.md): in step order, each once, the
// last step's among them, and every step's unless /metrics counts a skip (a
// busy machine may let two previews reach the hub before its writer takes
// the first).
func assertEveryPreview(t *testing.T, e *env, previews []server.PreviewMeta, n int) {
	t.Helper()
	require.NotEmpty(t, previews)
	steps := make([]int, len(previews))
	for i, p := range previews {
		steps[i] = p.Step
	}
	for i := 1; i < len(steps); i++ {
		assert.Less(t, steps[i-1], steps[i], "previews in step order, each once: %v", steps)
	}
	assert.Equal(t, n, steps[len(steps)-1], "the last step's preview: %v", steps)
	if len(steps) != n {
		skipped := scrape(t, e)["stepwise_previews_skipped_total"].GetMetric()[0].GetCounter().GetValue()
		assert.Positive(t, skipped, "%d of %d previews and none skipped: %v", len(steps), n, steps)
	}
}

func count(events []map[string]any, typ string) int {
	n := 0
	for _, e := range events {
		if e["type"] == typ {
			n++
		}
	}
	return n
}

func submit(t testing.TB, e *env, body map[string]any) string {
	t.Helper()
	code, out := e.post(t, "/v1/jobs", body)
	require.Equal(t, http.StatusAccepted, code, out)
	return out["id"].(string)
}

func txt(steps int) map[string]any {
	return map[string]any{"kind": "txt2img", "prompt": "a cat", "width": 64, "height": 64, "steps": steps, "seed": 3}
}

func TestJobStreamsEveryStepToEveryClient(t *testing.T) {
	e := start(t, server.Config{})
	// Hold the worker with a first job so the watchers connect before the second starts.
	first := submit(t, e, txt(40))
	id := submit(t, e, txt(12))
	a, b := e.dial(t, "/v1/jobs/"+id+"/events"), e.dial(t, "/v1/jobs/"+id+"/events")
	all := e.dial(t, "/v1/events")
	_ = first
	var sa, sb seen
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); sa = collect(t, a, id) }()
	go func() { defer wg.Done(); sb = collect(t, b, id) }()
	wg.Wait()
	for _, s := range []seen{sa, sb} {
		assert.Equal(t, 12, count(s.events, "progress"), "one progress event per step")
		assertEveryPreview(t, e, s.previews, 12)
		assert.Equal(t, "queued", s.events[0]["type"])
		assert.Equal(t, 1, count(s.events, "started"))
		last := s.events[len(s.events)-1]
		assert.Equal(t, "completed", last["type"])
		files := last["files"].([]any)
		require.NotEmpty(t, files)
		resp, err := http.Get(e.http.URL + files[0].(string))
		require.NoError(t, err)
		img, err := png.Decode(resp.Body)
		resp.Body.Close()
		require.NoError(t, err)
		assert.Equal(t, 64, img.Bounds().Dx())
	}
	for _, p := range sa.previews {
		assert.Equal(t, 12, p.Steps)
		assert.Equal(t, "jpeg", p.Format)
		assert.Equal(t, id, p.JobID)
	}
	// The all-jobs stream saw both jobs.
	all.SetReadDeadline(time.Now().Add(5 * time.Second))
	jobs := map[string]bool{}
	for len(jobs) < 2 {
		typ, data, err := all.ReadMessage()
		require.NoError(t, err)
		if typ == websocket.TextMessage {
			var ev map[string]any
			json.Unmarshal(data, &ev)
			jobs[ev["job_id"].(string)] = true
		}
	}
}

// smallBuffers shrinks the send buffer of every connection the server
// accepts, so a client that stops reading fills it after a few frames, as on a
// slow link.
type smallBuffers struct{ net.Listener }

func (l smallBuffers) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetWriteBuffer(4096)
	}
	return c, err
}

// dialStalled connects to path and never reads, with a small receive buffer
// so that the server's writes back up at once.
func dialStalled(t *testing.T, base, path string) *websocket.Conn {
	t.Helper()
	d := websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetReadBuffer(4096)
		}
		return c, err
	}}
	c, _, err := d.Dial("ws"+strings.TrimPrefix(base, "http")+path, nil)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// A client that connects and never reads overflows its event queue: the
// server drops it instead of waiting, keeps accepting and cancelling jobs,
// and the client that reads gets every event.
func TestStalledClientIsDroppedAndServingGoesOn(t *testing.T) {
	const jobs = 400 // each queued and cancelled: far past the client's queue (256) and socket buffers
	e := start(t, server.Config{MaxQueue: jobs + 1})
	hs := httptest.NewUnstartedServer(e.srv.Handler())
	hs.Listener = smallBuffers{hs.Listener}
	hs.Start()
	t.Cleanup(hs.Close)
	stalled := dialStalled(t, hs.URL, "/v1/events")
	reader := e.dial(t, "/v1/events")
	// With no worker the jobs stay queued: no job's progress events compete
	// with the reader's, so only the stalled client can fall behind.
	require.NoError(t, e.stopWorker())

	// A publish that waited for the stalled client would hang a request: bound them.
	client := &http.Client{Timeout: 30 * time.Second}
	do := func(path string, body any) map[string]any {
		data, _ := json.Marshal(body)
		resp, err := client.Post(e.http.URL+path, "application/json", bytes.NewReader(data))
		require.NoError(t, err, "POST %s", path)
		defer resp.Body.Close()
		var out map[string]any
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
		require.Equal(t, http.StatusAccepted, resp.StatusCode, out)
		return out
	}
	// The reader reads from the start, as a live client does: only the
	// stalled client may fall behind.
	type event struct{ id, typ string }
	events := make(chan event, 4*jobs)
	readErr := make(chan error, 1)
	go func() {
		reader.SetReadDeadline(time.Now().Add(120 * time.Second))
		for {
			typ, data, err := reader.ReadMessage()
			if err != nil {
				readErr <- err
				return
			}
			if typ != websocket.TextMessage {
				continue
			}
			var ev map[string]any
			if err := json.Unmarshal(data, &ev); err != nil {
				readErr <- err
				return
			}
			events <- event{ev["job_id"].(string), ev["type"].(string)}
		}
	}()

	ids := make([]string, jobs)
	for i := range ids {
		ids[i] = do("/v1/jobs", txt(1))["id"].(string)
	}
	for i := len(ids) - 1; i >= 0; i-- { // from the back, so no other job moves up
		do("/v1/jobs/"+ids[i]+"/cancel", "")
	}

	// The reader sees each job queued, then cancelled.
	got := map[string][]string{}
	for first := ids[0]; len(got[first]) == 0 || got[first][len(got[first])-1] != "cancelled"; {
		select {
		case ev := <-events:
			got[ev.id] = append(got[ev.id], ev.typ)
		case err := <-readErr:
			require.NoError(t, err, "the reading client")
		}
	}
	for _, id := range ids {
		assert.Equal(t, []string{"queued", "cancelled"}, got[id], id)
	}

	m := scrape(t, e)
	assert.Equal(t, 1.0, m["stepwise_websocket_clients_dropped_total"].GetMetric()[0].GetCounter().GetValue(),
		"the stalled client was dropped for not reading")
	assert.Equal(t, 1.0, m["stepwise_websocket_clients"].GetMetric()[0].GetGauge().GetValue(), "only the reader is left")
	// Dropped while the jobs were being queued, it reads at last what was
	// queued for it, never a cancellation, and then the connection ends.
	stalled.SetReadDeadline(time.Now().Add(30 * time.Second))
	cancellations := 0
	for {
		typ, data, err := stalled.ReadMessage()
		if err != nil {
			var ne net.Error
			assert.False(t, errors.As(err, &ne) && ne.Timeout(), "the server ended the connection: %v", err)
			break
		}
		if typ == websocket.TextMessage && strings.Contains(string(data), `"type":"cancelled"`) {
			cancellations++
		}
	}
	assert.Zero(t, cancellations, "events published after the drop do not reach the dropped client")

	// And the server still runs jobs, once a worker is there to take them.
	bus, err := jobbus.Connect(e.nats)
	require.NoError(t, err)
	defer bus.Close()
	w := server.NewWorker(server.WorkerConfig{ID: "after", Version: "test", Device: "cpu"}, e.runner, bus)
	ctx, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- w.Run(ctx) }()
	defer func() { stop(); assert.NoError(t, <-stopped) }()
	id := submit(t, e, txt(2))
	assert.Equal(t, "completed", last(collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id))["type"])
}

func last(s seen) map[string]any { return s.events[len(s.events)-1] }

func TestLateJoinerGetsStateAndLatestPreviewAtOnce(t *testing.T) {
	e := start(t, server.Config{})
	id := submit(t, e, txt(150))
	first := e.dial(t, "/v1/jobs/"+id+"/events")
	// Wait until a few steps have run.
	first.SetReadDeadline(time.Now().Add(30 * time.Second))
	for previews := 0; previews < 3; {
		typ, _, err := first.ReadMessage()
		require.NoError(t, err)
		if typ == websocket.BinaryMessage {
			previews++
		}
	}
	late := e.dial(t, "/v1/jobs/"+id+"/events")
	late.SetReadDeadline(time.Now().Add(5 * time.Second))
	typ, data, err := late.ReadMessage()
	require.NoError(t, err)
	require.Equal(t, websocket.TextMessage, typ)
	var ev map[string]any
	require.NoError(t, json.Unmarshal(data, &ev))
	// The first listener saw three previews, so the job is at step 3 or later.
	require.Equal(t, "progress", ev["type"], ev)
	assert.GreaterOrEqual(t, ev["step"].(float64), 3.0)
	typ, _, err = late.ReadMessage()
	require.NoError(t, err)
	assert.Equal(t, websocket.BinaryMessage, typ, "the latest preview follows the state at once")
	e.post(t, "/v1/jobs/"+id+"/cancel", "")
}

func TestCancelMidRunThenNextJobRuns(t *testing.T) {
	e := start(t, server.Config{})
	a := submit(t, e, txt(150))
	ws := e.dial(t, "/v1/jobs/"+a+"/events")
	waitForEvent(t, ws, "started")
	b := submit(t, e, txt(3))
	var v map[string]any
	e.get(t, "/v1/jobs/"+b, &v)
	assert.EqualValues(t, 0, v["position"], "the second job knows it is next")
	ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	cancelledAt := 0.0
	for {
		_, data, err := ws.ReadMessage()
		require.NoError(t, err)
		var ev map[string]any
		if json.Unmarshal(data, &ev) != nil {
			continue
		}
		if ev["type"] == "progress" && ev["step"].(float64) == 2 && cancelledAt == 0 {
			code, _ := e.post(t, "/v1/jobs/"+a+"/cancel", "")
			assert.Equal(t, http.StatusAccepted, code)
			cancelledAt = 2
		}
		if ev["type"] == "cancelled" {
			assert.LessOrEqual(t, ev["step"].(float64), cancelledAt+1, "ends within one step")
			break
		}
	}
	wb := e.dial(t, "/v1/jobs/"+b+"/events")
	s := collect(t, wb, b)
	assert.Equal(t, "completed", s.events[len(s.events)-1]["type"])
	// A finished job cannot be cancelled.
	code, out := e.post(t, "/v1/jobs/"+b+"/cancel", "")
	assert.Equal(t, http.StatusConflict, code)
	assert.Contains(t, out["error"], "completed")
	// Cancelling a queued job.
	c1 := submit(t, e, txt(100))
	c2 := submit(t, e, txt(2))
	code, out = e.post(t, "/v1/jobs/"+c2+"/cancel", "")
	assert.Equal(t, http.StatusAccepted, code)
	e.get(t, "/v1/jobs/"+c2, &v)
	assert.Equal(t, "cancelled", v["state"])
	e.post(t, "/v1/jobs/"+c1+"/cancel", "")
}

func pngB64(t *testing.T, w, h int, fill byte) string {
	t.Helper()
	img := image.NewGray(image.Rect(0, 0, w, h))
	for i := range img.Pix {
		img.Pix[i] = fill + byte(i%7)
	}
	var buf bytes.Buffer
	require.NoError(t, png.Encode(&buf, img))
	return base64.StdEncoding.EncodeToString(buf.Bytes())
}

func TestA1111API(t *testing.T) {
	e := start(t, server.Config{})
	// txt2img with the documented request and response shapes.
	code, out := e.post(t, "/sdapi/v1/txt2img", map[string]any{
		"prompt": "a red fox", "negative_prompt": "blurry", "width": 64, "height": 48, "steps": 4,
		"cfg_scale": 7, "seed": 1234, "sampler_name": "DPM++ 2M Karras", "batch_size": 2,
	})
	require.Equal(t, http.StatusOK, code, out)
	images := out["images"].([]any)
	require.Len(t, images, 2)
	raw, err := base64.StdEncoding.DecodeString(images[0].(string))
	require.NoError(t, err)
	img, err := png.Decode(bytes.NewReader(raw))
	require.NoError(t, err)
	assert.Equal(t, 64, img.Bounds().Dx())
	assert.Equal(t, 48, img.Bounds().Dy())
	var info map[string]any
	require.NoError(t, json.Unmarshal([]byte(out["info"].(string)), &info))
	assert.EqualValues(t, 1234, info["seed"])
	assert.EqualValues(t, 1234, out["parameters"].(map[string]any)["seed"])

	// img2img with a mask, strength and blur.
	code, out = e.post(t, "/sdapi/v1/img2img", map[string]any{
		"init_images": []string{pngB64(t, 64, 64, 90)}, "mask": pngB64(t, 64, 64, 200), "prompt": "a wall",
		"denoising_strength": 0.8, "mask_blur": 2, "steps": 3, "seed": 5,
	})
	require.Equal(t, http.StatusOK, code, out)
	require.Len(t, out["images"], 1)
	code, out = e.post(t, "/sdapi/v1/img2img", map[string]any{"init_images": []string{pngB64(t, 64, 64, 90)},
		"prompt": "a wall", "denoising_strength": 0.5, "steps": 4})
	require.Equal(t, http.StatusOK, code, out)

	// progress with current_image while a job runs.
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.post(t, "/sdapi/v1/txt2img", map[string]any{"prompt": "a slow one", "width": 64, "height": 64, "steps": 150})
	}()
	var prog map[string]any
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		e.get(t, "/sdapi/v1/progress", &prog)
		if prog["current_image"] != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	require.NotNil(t, prog["current_image"], "progress carries the current preview")
	_, err = base64.StdEncoding.DecodeString(prog["current_image"].(string))
	require.NoError(t, err)
	st := prog["state"].(map[string]any)
	assert.Greater(t, st["sampling_step"].(float64), 0.0)
	assert.EqualValues(t, 150, st["sampling_steps"])
	assert.Greater(t, prog["progress"].(float64), 0.0)
	assert.Contains(t, prog, "eta_relative")
	// interrupt stops it.
	code, _ = e.post(t, "/sdapi/v1/interrupt", "")
	assert.Equal(t, http.StatusOK, code)
	<-done

	var models []map[string]any
	require.Equal(t, http.StatusOK, e.get(t, "/sdapi/v1/sd-models", &models))
	require.Len(t, models, 1)
	for _, k := range []string{"title", "model_name", "hash", "sha256", "filename"} {
		assert.Contains(t, models[0], k)
	}
	var samplers []map[string]any
	require.Equal(t, http.StatusOK, e.get(t, "/sdapi/v1/samplers", &samplers))
	names := map[string]bool{}
	for _, s := range samplers {
		names[s["name"].(string)] = true
		assert.Contains(t, s, "aliases")
		assert.Contains(t, s, "options")
	}
	assert.True(t, names["Euler a"] && names["DPM++ 2M Karras"] && names["DDIM"])
}

func TestSynchronousSegmentAndEdit(t *testing.T) {
	e := start(t, server.Config{})
	photo := pngB64(t, 96, 80, 40)
	code, out := e.post(t, "/v1/segment", map[string]any{"image": photo, "segment_scale": 1})
	require.Equal(t, http.StatusOK, code, out)
	raw, err := base64.StdEncoding.DecodeString(out["mask"].(string))
	require.NoError(t, err)
	m, err := png.Decode(bytes.NewReader(raw))
	require.NoError(t, err)
	assert.Equal(t, 96, m.Bounds().Dx())

	code, out = e.post(t, "/v1/edit", map[string]any{"image": photo, "prompt": "a beach", "steps": 2,
		"segment_scale": 1, "working_size": 64})
	require.Equal(t, http.StatusOK, code, out) // the tiny models are deterministic: this photo has a subject
	for _, k := range []string{"edited", "mask", "edited_mask"} {
		_, err := base64.StdEncoding.DecodeString(out[k].(string))
		assert.NoError(t, err, k)
	}
	assert.Contains(t, out, "subject_iou")
}

func TestBadRequestsGetJSON4xxAndServingGoesOn(t *testing.T) {
	e := start(t, server.Config{Token: "sesame", AllowedOrigins: []string{"http://trusted.example"}})
	do := func(method, path, body string, hdr map[string]string) (int, map[string]any) {
		req, _ := http.NewRequest(method, e.http.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer sesame")
		req.Header.Set("Content-Type", "application/json")
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		var out map[string]any
		raw, _ := io.ReadAll(resp.Body)
		require.NoError(t, json.Unmarshal(raw, &out), "%s %s: %s", method, path, raw)
		assert.NotEmpty(t, out["error"], "%s %s", method, path)
		return resp.StatusCode, out
	}
	job := func(fields string) string { return `{"kind":"txt2img","prompt":"x"` + fields + `}` }
	tests := []struct {
		name, method, path, body string
		hdr                      map[string]string
		status                   int
		want                     string
	}{
		{"invalid JSON", "POST", "/v1/jobs", `{"kind": "txt2img", `, nil, 400, "invalid JSON"},
		{"unknown kind", "POST", "/v1/jobs", `{"kind":"paint"}`, nil, 400, "unknown kind"},
		{"unknown sampler", "POST", "/v1/jobs", job(`,"sampler_name":"k_lms_turbo"`), nil, 400, "unknown sampler"},
		{"width 100000", "POST", "/v1/jobs", job(`,"width":100000,"height":64`), nil, 400, "width must be a multiple of 8"},
		{"steps 0", "POST", "/v1/jobs", job(`,"steps":0`), nil, 400, "steps must be between"},
		{"steps 10000", "POST", "/v1/jobs", job(`,"steps":10000`), nil, 400, "steps must be between"},
		{"non-image upload", "POST", "/v1/jobs", `{"kind":"img2img","prompt":"x","image":"` + base64.StdEncoding.EncodeToString([]byte("hello world")) + `"}`, nil, 400, "not a PNG or JPEG"},
		{"bad base64", "POST", "/v1/jobs", `{"kind":"img2img","prompt":"x","image":"%%%"}`, nil, 400, "base64"},
		{"empty prompt", "POST", "/v1/jobs", `{"kind":"txt2img","prompt":" "}`, nil, 400, "prompt is empty"},
		{"dotdot run file", "GET", "/v1/runs/20261125T000000Z-abcd/..%2f..%2fetc%2fpasswd", "", nil, 400, "bad run file name"},
		{"unknown run", "GET", "/v1/runs/20261125T000000Z-abcd/edited.png", "", nil, 404, "no such run file"},
		{"unknown job", "GET", "/v1/jobs/nope", "", nil, 404, "no job"},
		{"wrong token", "GET", "/v1/jobs", "", map[string]string{"Authorization": "Bearer nope"}, 401, "token"},
		{"foreign origin", "POST", "/v1/jobs", job(""), map[string]string{"Origin": "http://evil.example"}, 403, "not allowed"},
		{"unknown endpoint", "GET", "/v2/nothing", "", nil, 404, "no such endpoint"},
		{"too large", "POST", "/v1/jobs", `{"kind":"txt2img","prompt":"` + strings.Repeat("a", 33<<20) + `"}`, nil, 413, "larger than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, out := do(tt.method, tt.path, tt.body, tt.hdr)
			assert.Equal(t, tt.status, code, out)
			assert.Contains(t, fmt.Sprint(out["error"]), tt.want)
		})
	}
	// Websockets from a foreign origin are refused; the page's own origin and configured ones are not.
	url := "ws" + strings.TrimPrefix(e.http.URL, "http") + "/v1/events?token=sesame"
	_, resp, err := websocket.DefaultDialer.Dial(url, http.Header{"Origin": {"http://evil.example"}})
	require.Error(t, err)
	require.NotNil(t, resp)
	assert.Equal(t, http.StatusForbidden, resp.StatusCode)
	body, _ := io.ReadAll(resp.Body)
	assert.Contains(t, string(body), `"error"`)
	c, _, err := websocket.DefaultDialer.Dial(url, http.Header{"Origin": {"http://trusted.example"}})
	require.NoError(t, err)
	c.Close()
	c, _, err = websocket.DefaultDialer.Dial(url, http.Header{"Origin": {e.http.URL}})
	require.NoError(t, err)
	c.Close()
	// Without the token the websocket is refused too.
	_, resp, err = websocket.DefaultDialer.Dial(strings.TrimSuffix(url, "?token=sesame"), nil)
	require.Error(t, err)
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)

	// Still serving.
	req, _ := http.NewRequest("POST", e.http.URL+"/v1/jobs", strings.NewReader(job(`,"width":64,"height":64,"steps":1`)))
	req.Header.Set("Authorization", "Bearer sesame")
	resp2, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp2.Body.Close()
	assert.Equal(t, http.StatusAccepted, resp2.StatusCode)
}

func TestQueueLimitAndGracefulShutdown(t *testing.T) {
	e := start(t, server.Config{MaxQueue: 2})
	running := submit(t, e, txt(80))
	waitForEvent(t, e.dial(t, "/v1/jobs/"+running+"/events"), "started") // out of the queue
	q1 := submit(t, e, txt(2))
	submit(t, e, txt(2))
	code, out := e.post(t, "/v1/jobs", txt(2))
	assert.Equal(t, http.StatusTooManyRequests, code)
	assert.Contains(t, out["error"], "queue is full")

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	require.NoError(t, e.srv.Shutdown(ctx))
	var v map[string]any
	e.get(t, "/v1/jobs/"+q1, &v)
	assert.Equal(t, "cancelled", v["state"], "queued jobs are cancelled at shutdown")
	e.get(t, "/v1/jobs/"+running, &v)
	assert.Equal(t, "completed", v["state"], "the running job finished")
	code, out = e.post(t, "/v1/jobs", txt(2))
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Contains(t, out["error"], "shutting down")
	// Run directories are whole: no staging folders left.
	ents, _ := os.ReadDir(e.runs)
	for _, d := range ents {
		assert.False(t, strings.HasPrefix(d.Name(), ".tmp-"), d.Name())
	}
}

func TestMultipartUpload(t *testing.T) {
	e := start(t, server.Config{})
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	mw.WriteField("kind", "img2img")
	mw.WriteField("prompt", "a garden")
	mw.WriteField("steps", "3")
	mw.WriteField("denoising_strength", "0.5")
	fw, err := mw.CreateFormFile("image", "photo.png")
	require.NoError(t, err)
	raw, _ := base64.StdEncoding.DecodeString(pngB64(t, 64, 48, 30))
	fw.Write(raw)
	require.NoError(t, mw.Close())
	resp, err := http.Post(e.http.URL+"/v1/jobs", mw.FormDataContentType(), &body)
	require.NoError(t, err)
	var out map[string]any
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
	resp.Body.Close()
	require.Equal(t, http.StatusAccepted, resp.StatusCode, out)
	id := out["id"].(string)
	s := collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id)
	last := s.events[len(s.events)-1]
	require.Equal(t, "completed", last["type"], last)
	assert.EqualValues(t, 64, last["result"].(map[string]any)["width"])
	assert.EqualValues(t, 48, last["result"].(map[string]any)["height"])
}

// scrape reads /metrics, parsed.
func scrape(t *testing.T, e *env) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(e.http.URL + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	return families
}

func TestMetricsCountEveryStep(t *testing.T) {
	e := start(t, server.Config{})
	var elapsed float64
	for _, steps := range []int{3, 4} {
		id := submit(t, e, txt(steps))
		collect(t, e.dial(t, "/v1/jobs/"+id+"/events"), id)
		var v map[string]any
		require.Equal(t, http.StatusOK, e.get(t, "/v1/jobs/"+id, &v))
		elapsed += v["elapsed"].(float64)
	}
	m := scrape(t, e)
	h := m["stepwise_step_seconds"].GetMetric()[0].GetHistogram()
	assert.EqualValues(t, 7, h.GetSampleCount(), "every step counted once")
	assert.InDelta(t, elapsed, h.GetSampleSum(), 1e-9, "the steps' own durations add up to the jobs' elapsed time")
	finished := map[string]float64{}
	for _, mt := range m["stepwise_jobs_finished_total"].GetMetric() {
		finished[mt.GetLabel()[0].GetValue()] = mt.GetCounter().GetValue()
	}
	assert.Equal(t, map[string]float64{"completed": 2, "failed": 0, "cancelled": 0}, finished)
	assert.Equal(t, 2.0, m["stepwise_jobs_submitted_total"].GetMetric()[0].GetCounter().GetValue())
	assert.Greater(t, m["stepwise_preview_bytes_sent_total"].GetMetric()[0].GetCounter().GetValue(), 0.0)
	assert.Greater(t, m["stepwise_model_bytes"].GetMetric()[0].GetGauge().GetValue(), 0.0, "the model stays loaded")
	for _, name := range []string{"stepwise_queue_length", "stepwise_jobs_running", "stepwise_previews_skipped_total",
		"stepwise_websocket_clients", "stepwise_websocket_clients_dropped_total", "stepwise_models_loaded",
		"go_goroutines", "process_resident_memory_bytes"} {
		assert.Contains(t, m, name)
	}
}
