package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// supervisor keeps the gateway's local worker processes running: a worker
// that dies (a native crash, the OOM killer, kill -9) is started again after
// a backoff, and why it died is logged.
type supervisor struct {
	exe  string   // this binary
	args []string // "worker" and its flags
	env  []string // added to this process's environment
	// devices has one entry per worker: the --device it is given, or "" for
	// the one in args (or the engine's choice).
	devices []string
	grace   time.Duration // how long a stopping worker may take before it is killed
	stderr  io.Writer
	log     *slog.Logger
	// started is told each child's PID (tests and logs).
	started func(i, pid int)
}

// Restart backoff: doubling from backoffMin to backoffMax, back to the
// minimum after a worker lived backoffReset.
const (
	backoffMin   = 500 * time.Millisecond
	backoffMax   = 30 * time.Second
	backoffReset = time.Minute
)

// run supervises one worker per device until ctx ends, then stops them (SIGTERM, then
// SIGKILL after the grace) and returns when all have exited.
func (s *supervisor) run(ctx context.Context) {
	var wg sync.WaitGroup
	for i := range s.devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.keep(ctx, i)
		}()
	}
	wg.Wait()
}

func (s *supervisor) keep(ctx context.Context, i int) {
	backoff := backoffMin
	for ctx.Err() == nil {
		began := time.Now()
		err := s.once(ctx, i)
		if ctx.Err() != nil {
			return
		}
		if time.Since(began) > backoffReset {
			backoff = backoffMin
		}
		s.log.Error("a worker died; restarting it", "worker", i, "why", exitReason(err), "ran", time.Since(began).Round(time.Millisecond), "restart_in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, backoffMax)
	}
}

// once runs one worker process to its end.
func (s *supervisor) once(ctx context.Context, i int) error {
	args := s.args
	if d := s.devices[i]; d != "" {
		args = append(append([]string(nil), args...), "--device", d)
	}
	cmd := exec.CommandContext(ctx, s.exe, args...)
	cmd.Env = append(os.Environ(), s.env...)
	cmd.Stdout, cmd.Stderr = s.stderr, s.stderr
	cmd.SysProcAttr = childAttr()
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = s.grace
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start: %w", err)
	}
	if s.started != nil {
		s.started(i, cmd.Process.Pid)
	}
	return cmd.Wait()
}

// exitReason says how a worker process ended, for the log.
func exitReason(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return "killed by signal " + ws.Signal().String()
		}
		return fmt.Sprintf("exit status %d", ee.ExitCode())
	}
	if err == nil {
		return "exited with status 0"
	}
	return err.Error()
}

// autoWorkers is serve's --workers default: one local worker per GPU found,
// else one.
const autoWorkers = -1

// planWorkers gives the device of each local worker ("" for the engine
// flags' own): n of them when n is given, none for 0, and for autoWorkers one
// per GPU that gpus (asked only then) lists — unless --device names one —,
// else one.
func planWorkers(n int, device string, gpus func() []string) []string {
	switch {
	case n >= 0:
		return make([]string, n)
	case device == "":
		if found := gpus(); len(found) > 0 {
			return found
		}
	}
	return []string{""}
}

// probeTimeout bounds the child that lists the devices.
const probeTimeout = 2 * time.Minute

// probeGPUs lists this host's GPUs (cuda:N) as `stepwise version --json`
// finds them in a child process, so the gateway itself never loads the
// engine. A probe that fails is logged and counts as no GPU.
func (f *serveFlags) probeGPUs(ctx context.Context, lg *slog.Logger) []string {
	exe, err := os.Executable()
	if err != nil {
		lg.Warn("cannot list the GPUs: one local worker", "err", err)
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	args := []string{"version", "--json"}
	if f.engine.lib != "" {
		args = append(args, "--lib", f.engine.lib)
	}
	out, err := exec.CommandContext(ctx, exe, args...).Output()
	if err != nil {
		lg.Warn("cannot list the GPUs: one local worker", "err", err)
		return nil
	}
	var v struct {
		Devices []struct {
			ID string `json:"id"`
		} `json:"devices"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		lg.Warn("cannot list the GPUs: one local worker", "err", err)
		return nil
	}
	var gpus []string
	for _, d := range v.Devices {
		if strings.HasPrefix(d.ID, "cuda:") {
			gpus = append(gpus, d.ID)
		}
	}
	return gpus
}
