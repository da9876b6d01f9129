package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// supervisor keeps the gateway's local worker processes running: a worker
// that dies (a native crash, the OOM killer, kill -9) is started again after
// a backoff, and why it died is logged.
type supervisor struct {
	exe    string   // this binary
	args   []string // "worker" and its flags
	env    []string // added to this process's environment
	n      int
	grace  time.Duration // how long a stopping worker may take before it is killed
	stderr io.Writer
	log    *slog.Logger
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

// run supervises n workers until ctx ends, then stops them (SIGTERM, then
// SIGKILL after the grace) and returns when all have exited.
func (s *supervisor) run(ctx context.Context) {
	var wg sync.WaitGroup
	for i := 0; i < s.n; i++ {
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
	cmd := exec.CommandContext(ctx, s.exe, s.args...)
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
