package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/jobbus"
	"github.com/stepwise-sd/stepwise/server"
)

// These tests run the real thing: `stepwise serve` and `stepwise worker` as
// processes of this test binary (it acts as the stepwise binary for its
// children, see bench_test.go), the real engine on the tiny model, a real
// NATS server.

// logBuffer collects a process's output for the test's log.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// process is a child process in a process group of its own, with the
// children it starts.
type process struct {
	cmd    *exec.Cmd
	out    *logBuffer
	exited chan struct{}
}

// startProcess starts this binary as stepwise with args; every process of
// its group is killed when the test ends.
func startProcess(t *testing.T, name string, env []string, args ...string) (*process, io.Reader) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p := &process{cmd: cmd, out: &logBuffer{}, exited: make(chan struct{})}
	cmd.Stderr = p.out
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	pr, pw := io.Pipe()
	go func() {
		io.Copy(io.MultiWriter(pw, p.out), stdout)
		pw.Close()
	}()
	go func() { cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		p.stop(60 * time.Second)
		if t.Failed() {
			t.Logf("%s's output:\n%s", name, p.out.String())
		}
	})
	return p, pr
}

// stop ends the process group: SIGTERM, then SIGKILL after grace.
func (p *process) stop(grace time.Duration) {
	pgid := p.cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(grace):
	}
	syscall.Kill(-pgid, syscall.SIGKILL) // workers left behind, if any
	<-p.exited
}

// gateway is a `stepwise serve` process.
type gateway struct {
	*process
	url string
}

// startGateway runs `stepwise serve` on the tiny models with args, and waits
// until it serves.
func startGateway(t *testing.T, data string, env []string, args ...string) *gateway {
	t.Helper()
	sd, seg := testenv.Tiny(t)
	p, stdout := startProcess(t, "serve", env, append([]string{"serve", "--lib", testenv.LibPath(), "--data", data,
		"--addr", "127.0.0.1:0", "--model", sd, "--seg-model", seg}, args...)...)
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if _, rest, ok := strings.Cut(sc.Text(), "serving on http://"); ok {
				addr <- strings.Fields(rest)[0]
			}
		}
		io.Copy(io.Discard, stdout)
	}()
	select {
	case a := <-addr:
		return &gateway{process: p, url: "http://" + a}
	case <-p.exited:
		t.Fatalf("serve exited: %s", p.out.String())
	case <-time.After(2 * time.Minute):
		t.Fatalf("serve did not start: %s", p.out.String())
	}
	return nil
}

func (g *gateway) get(t *testing.T, path string, out any) int {
	t.Helper()
	resp, err := http.Get(g.url + path)
	require.NoError(t, err)
	defer resp.Body.Close()
	if out != nil {
		require.NoError(t, json.NewDecoder(resp.Body).Decode(out))
	}
	return resp.StatusCode
}

// metric reads one unlabelled sample from the gateway's /metrics.
func (g *gateway) metric(t *testing.T, name string) float64 {
	t.Helper()
	resp, err := http.Get(g.url + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			require.NoError(t, err, line)
			return f
		}
	}
	require.Failf(t, "no such metric", "%s", name)
	return 0
}

func (g *gateway) post(t *testing.T, path string, body any) (int, map[string]any) {
	t.Helper()
	raw, _ := json.Marshal(body)
	resp, err := http.Post(g.url+path, "application/json", bytes.NewReader(raw))
	require.NoError(t, err)
	defer resp.Body.Close()
	var out map[string]any
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
	return resp.StatusCode, out
}

func (g *gateway) submit(t *testing.T, steps int) string {
	t.Helper()
	code, out := g.post(t, "/v1/jobs", map[string]any{"kind": "txt2img", "prompt": "a cat", "width": 64, "height": 64,
		"steps": steps, "seed": 3})
	require.Equal(t, http.StatusAccepted, code, out)
	return out["id"].(string)
}

// workers lists the workers the gateway knows, once it knows n.
func (g *gateway) workers(t *testing.T, n int) []jobbus.Announcement {
	t.Helper()
	var h struct {
		Workers []jobbus.Announcement `json:"workers"`
	}
	require.Eventually(t, func() bool {
		return g.get(t, "/healthz", &h) == http.StatusOK && len(h.Workers) == n
	}, 2*time.Minute, 100*time.Millisecond, "%d workers", n)
	return h.Workers
}

// watch is a websocket watching one job.
type watch struct {
	t    *testing.T
	conn *websocket.Conn
	id   string // the job whose events and previews count; set before the first read
	// events seen so far, and the step of each preview.
	events   []map[string]any
	previews []int
}

func (g *gateway) watch(t *testing.T, id string) *watch {
	t.Helper()
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(g.url, "http")+"/v1/jobs/"+id+"/events", nil)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return &watch{t: t, conn: c, id: id}
}

// watchAll is a websocket on every job's events, opened before the job it
// follows is submitted (set its id then): it sees that job from its first
// event, where a watch opened after submitting joins it at its current state
// (docs/protocol.md), after the first steps of a fast job.
func (g *gateway) watchAll(t *testing.T) *watch {
	t.Helper()
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(g.url, "http")+"/v1/events", nil)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return &watch{t: t, conn: c}
}

// next reads until an event; previews are counted on the way.
func (w *watch) next() map[string]any {
	w.t.Helper()
	w.conn.SetReadDeadline(time.Now().Add(3 * time.Minute))
	for {
		typ, data, err := w.conn.ReadMessage()
		require.NoError(w.t, err)
		if typ == websocket.BinaryMessage {
			require.GreaterOrEqual(w.t, len(data), 8)
			require.Equal(w.t, uint32(4), binary.BigEndian.Uint32(data), "a preview frame")
			n := int(binary.BigEndian.Uint32(data[4:]))
			require.GreaterOrEqual(w.t, len(data), 8+n)
			var meta server.PreviewMeta
			require.NoError(w.t, json.Unmarshal(data[8:8+n], &meta))
			if meta.JobID == w.id {
				w.previews = append(w.previews, meta.Step)
			}
			continue
		}
		var ev map[string]any
		require.NoError(w.t, json.Unmarshal(data, &ev))
		if ev["job_id"] != w.id {
			continue
		}
		w.events = append(w.events, ev)
		return ev
	}
}

// until reads events until one of type typ (or the job's end) and returns it.
func (w *watch) until(typ string) map[string]any {
	w.t.Helper()
	for {
		ev := w.next()
		switch ev["type"] {
		case typ, "completed", "failed", "cancelled":
			return ev
		}
	}
}

func (w *watch) count(typ string) int {
	n := 0
	for _, ev := range w.events {
		if ev["type"] == typ {
			n++
		}
	}
	return n
}

// jobView reads a job.
func (g *gateway) jobView(t *testing.T, id string) map[string]any {
	t.Helper()
	var v map[string]any
	require.Equal(t, http.StatusOK, g.get(t, "/v1/jobs/"+id, &v))
	return v
}

// The gateway with two local worker processes: a watcher gets every step's
// event and preview, two jobs run at once on the two workers, a cancel
// reaches a job in another process within a step, and a worker killed with
// SIGKILL in the middle of a job is restarted while its job is retried and
// the gateway goes on serving.
func TestGatewayWithWorkerProcesses(t *testing.T) {
	// One engine thread per worker: two workers share this machine's cores.
	g := startGateway(t, t.TempDir(), nil, "--workers", "2", "--ack-wait", "3s", "--threads", "1")
	g.workers(t, 2)

	t.Run("every step's event and preview", func(t *testing.T) {
		const n = 12
		w := g.watchAll(t)
		w.id = g.submit(t, n)
		assert.Equal(t, "completed", w.until("completed")["type"])
		assert.Equal(t, n, w.count("progress"), "events are never dropped")
		// Previews are newest-wins (docs/protocol.md): on a busy machine the
		// writer may skip one, which /metrics counts. The ones that come are
		// in step order, the last step's comes before the job's end, and
		// none is lost uncounted.
		require.NotEmpty(t, w.previews)
		assert.True(t, slices.IsSorted(w.previews) && len(slices.Compact(slices.Clone(w.previews))) == len(w.previews),
			"previews in step order, each once: %v", w.previews)
		assert.Equal(t, n, w.previews[len(w.previews)-1], "the last step's preview")
		assert.Equal(t, float64(n), float64(len(w.previews))+g.metric(t, "stepwise_previews_skipped_total"),
			"previews delivered %v + skipped", w.previews)
	})

	t.Run("two workers at once", func(t *testing.T) {
		a, b := g.submit(t, 60), g.submit(t, 60)
		wa, wb := g.watch(t, a), g.watch(t, b)
		require.Equal(t, "completed", wa.until("completed")["type"])
		require.Equal(t, "completed", wb.until("completed")["type"])
		va, vb := g.jobView(t, a), g.jobView(t, b)
		assert.NotEqual(t, va["worker"], vb["worker"], "each job on its own worker")
		parse := func(v map[string]any, k string) time.Time {
			ts, err := time.Parse(time.RFC3339Nano, v[k].(string))
			require.NoError(t, err)
			return ts
		}
		assert.True(t, parse(va, "started").Before(parse(vb, "finished")) && parse(vb, "started").Before(parse(va, "finished")),
			"the two jobs ran at the same time: %v %v", va, vb)
	})

	// At 1024² one step of even the tiny model takes minutes here: a cancel
	// sent during the first step ends the job before that step reports, in
	// the worker's process, however late this test's events arrive.
	t.Run("cancel within a step", func(t *testing.T) {
		code, out := g.post(t, "/v1/jobs", map[string]any{"kind": "txt2img", "prompt": "x", "width": 1024, "height": 1024,
			"steps": 2, "preview": "none"})
		require.Equal(t, http.StatusAccepted, code, out)
		id := out["id"].(string)
		w := g.watch(t, id)
		require.Equal(t, "started", w.until("started")["type"])
		time.Sleep(time.Second) // well inside the first step
		code, out = g.post(t, "/v1/jobs/"+id+"/cancel", nil)
		require.Equal(t, http.StatusAccepted, code, out)
		end := w.until("cancelled")
		require.Equal(t, "cancelled", end["type"], end)
		assert.Zero(t, w.count("progress"), "the job stopped inside its first step")
	})

	t.Run("kill -9 of a worker mid-job", func(t *testing.T) {
		const n = 60
		id := g.submit(t, n)
		w := g.watch(t, id)
		for {
			ev := w.until("progress")
			require.Equal(t, "progress", ev["type"], ev)
			if ev["step"].(float64) >= 2 {
				break
			}
		}
		worker := g.jobView(t, id)["worker"]
		var victim int
		for _, a := range g.workers(t, 2) {
			if a.ID == worker {
				victim = a.PID
			}
		}
		require.NotZero(t, victim, "the job's worker %v is listed", worker)
		require.NoError(t, syscall.Kill(victim, syscall.SIGKILL))
		assert.Equal(t, http.StatusOK, g.get(t, "/healthz", nil), "the gateway serves on")

		retried := w.until("retried")
		require.Equal(t, "retried", retried["type"], retried)
		assert.EqualValues(t, 2, retried["attempt"])
		end := w.until("completed")
		assert.Equal(t, "completed", end["type"], end)
		assert.EqualValues(t, 2, end["attempt"])
		assert.Equal(t, n, w.count("progress")-retriedAt(w), "the retry ran every step")

		// The killed worker was restarted, and the next job runs.
		require.Eventually(t, func() bool {
			for _, a := range g.workers(t, 2) {
				if a.PID == victim {
					return false
				}
			}
			return true
		}, 2*time.Minute, 100*time.Millisecond, "the killed worker is replaced")
		assert.Contains(t, g.out.String(), "killed by signal killed", "the gateway logged why its worker died")
		next := g.submit(t, 2)
		assert.Equal(t, "completed", g.watch(t, next).until("completed")["type"])
	})
}

// retriedAt is how many progress events came before the retry.
func retriedAt(w *watch) int {
	n := 0
	for _, ev := range w.events {
		switch ev["type"] {
		case "progress":
			n++
		case "retried":
			return n
		}
	}
	return n
}

// A job that crashes its worker every time (the engine aborts at step 2, for
// real) fails after --max-crashes crashes with a clear error, and is not run
// again; the worker is restarted each time and the gateway serves on.
func TestJobThatCrashesItsWorkerFailsAfterTheLimit(t *testing.T) {
	g := startGateway(t, t.TempDir(), []string{"STEPWISE_FAULT_ABORT_AT_STEP=2"},
		"--workers", "1", "--ack-wait", "3s", "--max-crashes", "2", "--threads", "1")
	g.workers(t, 1)
	id := g.submit(t, 10)
	w := g.watch(t, id)
	end := w.until("failed")
	require.Equal(t, "failed", end["type"], end)
	assert.Contains(t, end["error"], "ended its worker 2 times", end)
	assert.Contains(t, end["error"], "--max-crashes 2", end)
	assert.Equal(t, 1, w.count("retried"), "crashed on attempts 1 and 2; attempt 3 fails without running")
	assert.Equal(t, 2, strings.Count(g.out.String(), "a worker died; restarting it"), "one restart per crash")
	assert.Equal(t, http.StatusOK, g.get(t, "/healthz", nil))
	v := g.jobView(t, id)
	assert.Equal(t, "failed", v["state"])
}

// With an external NATS (here a second server started by the test), jobs
// queued while no worker runs survive a gateway restart: the next gateway
// shows them and a worker started later runs them; their results come from
// the results object store.
func TestExternalNATSKeepsQueuedJobsAcrossAGatewayRestart(t *testing.T) {
	ns, err := jobbus.StartEmbedded(t.TempDir())
	require.NoError(t, err)
	t.Cleanup(ns.Shutdown)
	env := []string{natsUserEnv + "=" + ns.Options.User, natsPasswordEnv + "=" + ns.Options.Password}

	first := startGateway(t, t.TempDir(), env, "--nats", ns.Options.URL)
	ids := []string{first.submit(t, 2), first.submit(t, 3)}
	assert.Empty(t, first.workers(t, 0), "an external NATS gets no local workers")
	first.stop(time.Minute)
	require.Equal(t, 0, first.cmd.ProcessState.ExitCode(), first.out.String())

	second := startGateway(t, t.TempDir(), env, "--nats", ns.Options.URL)
	p, stdout := startProcess(t, "worker", env, "worker", "--lib", testenv.LibPath(), "--data", t.TempDir(), "--nats", ns.Options.URL)
	go io.Copy(io.Discard, stdout)
	_ = p
	for i, id := range ids {
		var v map[string]any
		require.Eventually(t, func() bool {
			return second.get(t, "/v1/jobs/"+id, &v) == http.StatusOK && v["state"] == "completed"
		}, 3*time.Minute, 100*time.Millisecond, "job %d ran after the restart", i)
		assert.EqualValues(t, 2+i, v["steps"])
		files := v["files"].([]any)
		require.NotEmpty(t, files)
		resp, err := http.Get(second.url + files[0].(string))
		require.NoError(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
		assert.True(t, bytes.HasPrefix(body, []byte("\x89PNG")), "a PNG from the results store")
	}
}

// A worker built as another stepwise version refuses to join the gateway's
// queue, saying why, and exits with an error.
func TestWorkerOfAnotherVersionRefusesToJoin(t *testing.T) {
	other := filepath.Join(t.TempDir(), "stepwise-other")
	build := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "build", "-o", other,
		"-ldflags", "-X main.version=0.0.0-other", ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := build.CombinedOutput()
	require.NoError(t, err, string(out))

	ns, err := jobbus.StartEmbedded(t.TempDir())
	require.NoError(t, err)
	t.Cleanup(ns.Shutdown)
	env := []string{natsUserEnv + "=" + ns.Options.User, natsPasswordEnv + "=" + ns.Options.Password}
	startGateway(t, t.TempDir(), env, "--nats", ns.Options.URL)

	worker := exec.Command(other, "worker", "--lib", testenv.LibPath(), "--data", t.TempDir(), "--nats", ns.Options.URL)
	worker.Env = append(os.Environ(), append(env, runAsMainEnv+"=")...)
	var stderr bytes.Buffer
	worker.Stderr = &stderr
	done := make(chan error, 1)
	require.NoError(t, worker.Start())
	go func() { done <- worker.Wait() }()
	select {
	case err = <-done:
	case <-time.After(2 * time.Minute):
		worker.Process.Kill()
		t.Fatalf("the worker of another version did not exit: %s", stderr.String())
	}
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee, stderr.String())
	assert.Equal(t, exitError, ee.ExitCode())
	assert.Contains(t, stderr.String(), "the gateway is stepwise dev")
	assert.Contains(t, stderr.String(), "this worker stepwise 0.0.0-other")
}
