package server

import (
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A subscriber that never reads: publishing never blocks, the preview slot
// keeps only the newest frame, and a full event queue drops the subscriber.
func TestHubNeverBlocksOnAStalledSubscriber(t *testing.T) {
	h := newHub(slog.New(slog.NewTextHandler(io.Discard, nil)))
	stalled := newSubscriber(nil, "job1")
	other := newSubscriber(nil, "job2")
	h.add(stalled)
	h.add(other)

	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 100; i++ {
			h.publishPreview("job1", previewFrame(PreviewMeta{JobID: "job1", Step: i + 1, Steps: 100}, []byte{byte(i)}))
		}
		for i := 0; i < eventBuffer+10; i++ {
			h.publish(Event{Type: "progress", JobID: "job1", Step: i})
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("publishing blocked on a subscriber that does not read")
	}
	require.Len(t, stalled.preview, 1, "one preview slot")
	f := <-stalled.preview
	assert.Equal(t, 8+len(`{"job_id":"job1","step":100,"steps":100,"index":0,"format":"","width":0,"height":0}`)+1, f.n, "the newest preview is the one kept")
	assert.Equal(t, int64(99), h.dropped.Load(), "99 stale previews skipped")
	select {
	case <-stalled.done:
	default:
		t.Fatal("a subscriber whose event queue overflowed is dropped")
	}
	assert.Equal(t, int64(1), h.slowClients.Load(), "the drop is counted")
	assert.Equal(t, 1, h.count(), "the other subscriber stays")
	assert.Empty(t, other.events, "events of other jobs do not reach it")
}

func TestPreviewFrameLayout(t *testing.T) {
	f := previewFrame(PreviewMeta{JobID: "j", Step: 3, Steps: 9, Format: "jpeg"}, []byte("IMG"))
	assert.Equal(t, []byte{0, 0, 0, 4}, f[:4])
	n := int(f[4])<<24 | int(f[5])<<16 | int(f[6])<<8 | int(f[7])
	assert.JSONEq(t, `{"job_id":"j","step":3,"steps":9,"index":0,"format":"jpeg","width":0,"height":0}`, string(f[8:8+n]))
	assert.Equal(t, "IMG", string(f[8+n:]))
}
