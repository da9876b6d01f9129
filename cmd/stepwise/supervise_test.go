package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// serve's --workers: a number is that many workers on the engine flags'
// device; the default is one per GPU the probe finds (asked only then, and
// not when --device names one), else one.
func TestPlanWorkers(t *testing.T) {
	gpus := []string{"cuda:0", "cuda:1"}
	for _, tc := range []struct {
		name    string
		n       int
		device  string
		found   []string
		want    []string
		probeOK bool // whether the probe may be asked
	}{
		{"none", 0, "", gpus, nil, false},
		{"two on the flags' device", 2, "", gpus, []string{"", ""}, false},
		{"two on a named device", 2, "cuda:1", gpus, []string{"", ""}, false},
		{"auto: one per GPU", autoWorkers, "", gpus, gpus, true},
		{"auto without a GPU: one", autoWorkers, "", nil, []string{""}, true},
		{"auto with --device: one there", autoWorkers, "cuda:1", gpus, []string{""}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			asked := false
			got := planWorkers(tc.n, tc.device, func() []string { asked = true; return tc.found })
			if len(tc.want) == 0 {
				assert.Empty(t, got)
			} else {
				assert.Equal(t, tc.want, got)
			}
			if !tc.probeOK {
				assert.False(t, asked, "the probe starts a process: ask it only for the default")
			}
		})
	}
}

// syncBuffer is a bytes.Buffer that the supervisor's children write to
// from their own goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Each worker process is given its own device; one with none keeps the args.
func TestSupervisorGivesEachWorkerItsDevice(t *testing.T) {
	out := &syncBuffer{}
	s := &supervisor{exe: "/bin/echo", args: []string{"worker", "--nats", "x"}, devices: []string{"cuda:0", "cuda:1", ""},
		grace: time.Second, stderr: out, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.run(ctx); close(done) }()
	want := []string{"worker --nats x --device cuda:0\n", "worker --nats x --device cuda:1\n", "worker --nats x\n"}
	require.Eventually(t, func() bool {
		for _, w := range want {
			if !strings.Contains(out.String(), w) {
				return false
			}
		}
		return true
	}, time.Minute, 20*time.Millisecond, "every worker started with its device: %q", out)
	cancel()
	<-done
}
