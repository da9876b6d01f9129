package pipeline

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/stepwise-sd/stepwise/internal/atomicfile"
)

// DefaultRetention is how long finished runs are kept.
const DefaultRetention = 24 * time.Hour

// A run's ID starts with its UTC creation time, which cleanup reads.
const runTimeLayout = "20060102T150405Z"

// stagePrefix marks a run still being written; it becomes the run's folder by
// one rename when the run commits.
const stagePrefix = ".tmp-"

// Runs manages the run directories under one folder.
type Runs struct {
	dir       string
	retention time.Duration
	now       func() time.Time
	log       *slog.Logger
}

// RunsOptions configure OpenRuns.
type RunsOptions struct {
	Retention time.Duration    // 0: DefaultRetention
	Now       func() time.Time // the clock; nil: time.Now
	Logger    *slog.Logger
}

// OpenRuns creates dir if needed.
func OpenRuns(dir string, o RunsOptions) (*Runs, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("runs folder %s: %w", dir, err)
	}
	r := &Runs{dir: dir, retention: o.Retention, now: o.Now, log: o.Logger}
	if r.retention <= 0 {
		r.retention = DefaultRetention
	}
	if r.now == nil {
		r.now = time.Now
	}
	if r.log == nil {
		r.log = slog.Default()
	}
	return r, nil
}

// Dir is the runs folder.
func (r *Runs) Dir() string { return r.dir }

// Run is a run directory being written. Files go to a staging folder; Commit
// publishes them all at once, Abort removes them.
type Run struct {
	ID    string
	runs  *Runs
	stage string
	done  bool
}

// Begin starts a run.
func (r *Runs) Begin() (*Run, error) {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, err
	}
	id := r.now().UTC().Format(runTimeLayout) + "-" + hex.EncodeToString(b[:])
	stage := filepath.Join(r.dir, stagePrefix+id)
	if err := os.MkdirAll(stage, 0o755); err != nil {
		return nil, fmt.Errorf("create run %s: %w", id, err)
	}
	// The owner, so another process's cleanup knows the run is live.
	if err := os.WriteFile(filepath.Join(stage, ".owner"), []byte(ownerID(os.Getpid())), 0o644); err != nil {
		os.RemoveAll(stage)
		return nil, fmt.Errorf("create run %s: %w", id, err)
	}
	liveStages.Store(stage, true)
	return &Run{ID: id, runs: r, stage: stage}, nil
}

// validName refuses names that could leave the run's folder.
func validName(name string) error {
	if name == "" || name != filepath.Base(name) || strings.HasPrefix(name, ".") || strings.ContainsAny(name, `/\`) {
		return fmt.Errorf("bad run file name %q", name)
	}
	return nil
}

// WriteFile writes one file of the run atomically.
func (run *Run) WriteFile(name string, data []byte) error {
	if err := validName(name); err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(run.stage, name), data, 0o644)
}

// WritePNG writes img as a PNG at the best compression.
func (run *Run) WritePNG(name string, img image.Image) error {
	data, err := EncodePNG(img)
	if err != nil {
		return fmt.Errorf("encode %s: %w", name, err)
	}
	return run.WriteFile(name, data)
}

// WriteJSON writes v as indented JSON.
func (run *Run) WriteJSON(name string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", name, err)
	}
	return run.WriteFile(name, append(data, '\n'))
}

// Commit publishes the run as <dir>/<ID> and returns that path.
func (run *Run) Commit() (string, error) {
	if run.done {
		return "", errors.New("run already finished")
	}
	run.done = true
	defer run.runs.release(run.ID)
	os.Remove(filepath.Join(run.stage, ".owner"))
	final := filepath.Join(run.runs.dir, run.ID)
	if err := os.Rename(run.stage, final); err != nil {
		os.RemoveAll(run.stage)
		return "", fmt.Errorf("commit run %s: %w", run.ID, err)
	}
	return final, nil
}

// Abort removes everything the run wrote. It is safe after Commit (no-op).
func (run *Run) Abort() {
	if run.done {
		return
	}
	run.done = true
	os.RemoveAll(run.stage)
	run.runs.release(run.ID)
}

// liveStages holds the staging folders this process is writing, whichever
// Runs began them.
var liveStages sync.Map

func (r *Runs) release(id string) {
	liveStages.Delete(filepath.Join(r.dir, stagePrefix+id))
}

// Path returns the path of a committed run's file, refusing IDs and names
// that would leave the runs folder.
func (r *Runs) Path(id, name string) (string, error) {
	if _, ok := runTime(id); !ok || id != filepath.Base(id) {
		return "", fmt.Errorf("bad run id %q", id)
	}
	if err := validName(name); err != nil {
		return "", err
	}
	return filepath.Join(r.dir, id, name), nil
}

func runTime(id string) (time.Time, bool) {
	if len(id) < len(runTimeLayout) {
		return time.Time{}, false
	}
	t, err := time.Parse(runTimeLayout, id[:len(runTimeLayout)])
	return t, err == nil
}

// Cleanup removes runs older than the retention, and staging folders whose
// writer has died (a process killed mid-run) at any age. Runs in progress —
// staged by this process, or by another process that is still alive — are
// never touched.
func (r *Runs) Cleanup() ([]string, error) {
	ents, err := os.ReadDir(r.dir)
	if err != nil {
		return nil, err
	}
	cutoff := r.now().Add(-r.retention)
	var removed []string
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		name := e.Name()
		id := strings.TrimPrefix(name, stagePrefix)
		created, ok := runTime(id)
		if !ok {
			continue
		}
		staged := name != id
		if staged && r.inProgress(id, filepath.Join(r.dir, name)) {
			continue
		}
		if !staged && !created.Before(cutoff) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(r.dir, name)); err != nil {
			r.log.Warn("remove old run", "run", name, "err", err)
			continue
		}
		removed = append(removed, id)
	}
	sort.Strings(removed)
	if len(removed) > 0 {
		r.log.Info("removed old runs and abandoned staging folders", "count", len(removed), "older_than", r.retention)
	}
	return removed, nil
}

// ownerID names a process for as long as it lives: its pid and its start
// time, so a pid reused by a later process (a restarted container's pid 1)
// does not keep a dead process's staging folder alive.
func ownerID(pid int) string {
	return strconv.Itoa(pid) + " " + processStart(pid)
}

// processStart is the start time of pid in clock ticks since boot (field 22
// of /proc/PID/stat), or "" where /proc does not say.
func processStart(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ""
	}
	// The command name (field 2) may hold spaces; fields resume after its ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return ""
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return ""
	}
	return f[19]
}

func (r *Runs) inProgress(id, stage string) bool {
	if _, live := liveStages.Load(stage); live {
		return true
	}
	b, err := os.ReadFile(filepath.Join(stage, ".owner"))
	if err != nil {
		// No owner yet: a run being created this instant; leave it until old.
		created, ok := runTime(id)
		return ok && !created.Before(r.now().Add(-r.retention))
	}
	owner := strings.Fields(string(b))
	if len(owner) == 0 {
		return false
	}
	pid, err := strconv.Atoi(owner[0])
	if err != nil || pid <= 0 {
		return false
	}
	if pid == os.Getpid() {
		// Not being written by this process: an earlier process with our pid left it.
		return false
	}
	// Signal 0 checks that the process exists without touching it.
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	return len(owner) < 2 || owner[1] == processStart(pid)
}

// StartJanitor runs Cleanup now and then every interval until ctx ends.
func (r *Runs) StartJanitor(ctx context.Context, interval time.Duration) {
	if _, err := r.Cleanup(); err != nil {
		r.log.Warn("run cleanup", "err", err)
	}
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if _, err := r.Cleanup(); err != nil {
					r.log.Warn("run cleanup", "err", err)
				}
			}
		}
	}()
}
