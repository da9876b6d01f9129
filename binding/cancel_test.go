package binding_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
)

// cancelSoonAfter cancels from another goroutine a little after the step
// callback that calls it has returned, so that the cancel reaches the engine
// while it computes, not through the callback's own check of the context.
// (The pause only orders the cancel after that check; the steps and the
// decode it must land in take far longer.)
func cancelSoonAfter(cancel context.CancelFunc) {
	go func() {
		time.Sleep(10 * time.Millisecond)
		cancel()
	}()
}

// largeRequest is a tiny-model generation whose steps and decode take long
// enough to be interrupted (256x256: a step is about a second on one core).
func largeRequest(steps int) binding.GenerateRequest {
	r := tinyRequest(steps)
	r.Width, r.Height = 256, 256
	return r
}

// TestCancelLandsInsideAStep cancels while the second of three steps runs:
// the call returns ErrCancelled without reporting that step, which only a
// cancel inside the UNet can do (between steps, step 2 would finish and be
// reported first).
func TestCancelLandsInsideAStep(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	m := openSD(t, sdDir)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var calls atomic.Int32
	r := largeRequest(3)
	r.OnStep = func(s binding.Step) {
		calls.Add(1)
		if s.Step == 1 {
			cancelSoonAfter(cancel)
		}
	}
	_, err := m.Generate(ctx, r)
	require.Error(t, err)
	assert.ErrorIs(t, err, binding.ErrCancelled)
	assert.ErrorIs(t, err, context.Canceled)
	assert.Equal(t, int32(1), calls.Load(), "step 2 was stopped before it finished")

	res, err := m.Generate(context.Background(), tinyRequest(2))
	require.NoError(t, err, "the model works after a cancel inside a step")
	assert.Len(t, res.Images, 1)
}

// TestCancelLandsInsideTheDecode cancels after the last step: only the VAE
// decode is left, so the call fails only if the decoder stops.
func TestCancelLandsInsideTheDecode(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	m := openSD(t, sdDir)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := largeRequest(1)
	r.BatchSize, r.CFGScale = 4, 1 // a longer decode, a shorter step
	var calls atomic.Int32
	r.OnStep = func(s binding.Step) {
		calls.Add(1)
		cancelSoonAfter(cancel)
	}
	_, err := m.Generate(ctx, r)
	require.Error(t, err)
	assert.ErrorIs(t, err, binding.ErrCancelled)
	assert.Equal(t, int32(1), calls.Load())

	_, err = m.Generate(context.Background(), tinyRequest(1))
	require.NoError(t, err, "the model works after a cancel inside the decode")
}

// TestPromptsWithNULAreRefused: C strings end at a NUL, so the engine would
// see a shorter prompt than the caller sent.
func TestPromptsWithNULAreRefused(t *testing.T) {
	sdDir, _ := testenv.Tiny(t)
	m := openSD(t, sdDir)
	for name, mutate := range map[string]func(*binding.GenerateRequest){
		"prompt":          func(r *binding.GenerateRequest) { r.Prompt = "a cat\x00 ignore what follows" },
		"negative prompt": func(r *binding.GenerateRequest) { r.NegativePrompt = "\x00" },
	} {
		t.Run(name, func(t *testing.T) {
			r := tinyRequest(1)
			mutate(&r)
			_, err := m.Generate(context.Background(), r)
			require.Error(t, err)
			assert.ErrorIs(t, err, binding.ErrInvalidArgument)
		})
	}
	_, err := m.Tokenize("a\x00b")
	assert.ErrorIs(t, err, binding.ErrInvalidArgument)
}

// TestCancelStopsASegmentation cancels a segmentation of a large image (about
// two seconds on one core) shortly after it starts: the U-Net stops between
// its blocks and the call fails with the context's error.
func TestCancelStopsASegmentation(t *testing.T) {
	_, segPath := testenv.Tiny(t)
	m, err := testenv.Library(t).OpenSeg(binding.SegOptions{Path: segPath})
	require.NoError(t, err)
	defer m.Close()
	const n = 1024
	img := &binding.Image{Width: n, Height: n, Channels: 3, Pix: make([]byte, n*n*3)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Whether the cancel comes before the engine starts or while it runs, the
	// call fails with the context's error; only a call that ignored it would
	// succeed.
	time.AfterFunc(20*time.Millisecond, cancel)
	_, err = m.Segment(ctx, binding.SegmentRequest{Image: img})
	require.Error(t, err)
	assert.ErrorIs(t, err, context.Canceled)

	small := &binding.Image{Width: 64, Height: 64, Channels: 3, Pix: make([]byte, 64*64*3)}
	_, err = m.Segment(context.Background(), binding.SegmentRequest{Image: small})
	require.NoError(t, err, "the model works after a cancel")
}
