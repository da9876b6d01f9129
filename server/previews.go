package server

import (
	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// previewEncoder turns a job's raw previews into websocket frames on its own
// goroutine, on the worker,
// so the engine's step callback only hands a step over and returns. A few
// steps may wait (a goroutine that is not scheduled for a moment loses no
// preview); when the encoder falls further behind, the oldest are skipped.
type previewEncoder struct {
	jobID   string
	publish func(frame []byte)
	in      chan binding.Step
	done    chan struct{}
}

const previewJPEGQuality = 85

// previewBacklog is how many steps' previews may wait for the encoder.
const previewBacklog = 4

func newPreviewEncoder(jobID string, publish func(frame []byte)) *previewEncoder {
	e := &previewEncoder{jobID: jobID, publish: publish, in: make(chan binding.Step, previewBacklog), done: make(chan struct{})}
	go e.loop()
	return e
}

// offer never blocks: when the backlog is full it drops the oldest step the
// encoder has not taken yet.
func (e *previewEncoder) offer(st binding.Step) {
	for {
		select {
		case e.in <- st:
			return
		default:
		}
		select {
		case <-e.in:
		default:
		}
	}
}

func (e *previewEncoder) loop() {
	defer close(e.done)
	for st := range e.in {
		for i, p := range st.Previews {
			data, err := pipeline.EncodeJPEG(pipeline.ToImage(p), previewJPEGQuality)
			if err != nil {
				continue
			}
			e.publish(previewFrame(PreviewMeta{JobID: e.jobID, Step: st.Step, Steps: st.Steps, Index: i, Format: "jpeg",
				Width: p.Width, Height: p.Height}, data))
		}
	}
}

// close waits until every preview taken has been published.
func (e *previewEncoder) close() {
	close(e.in)
	<-e.done
}
