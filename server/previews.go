package server

import (
	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// previewEncoder turns a job's raw previews into frames on its own goroutine,
// so the engine's step callback only hands a step over and returns. A few
// steps may wait (a goroutine that is not scheduled for a moment loses no
// preview); when the encoder falls further behind, the oldest are skipped.
type previewEncoder struct {
	s    *Server
	j    *Job
	in   chan binding.Step
	done chan struct{}
}

const previewJPEGQuality = 85

// previewBacklog is how many steps' previews may wait for the encoder.
const previewBacklog = 4

func newPreviewEncoder(s *Server, j *Job) *previewEncoder {
	e := &previewEncoder{s: s, j: j, in: make(chan binding.Step, previewBacklog), done: make(chan struct{})}
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
			frame := previewFrame(PreviewMeta{JobID: e.j.ID, Step: st.Step, Steps: st.Steps, Index: i, Format: "jpeg",
				Width: p.Width, Height: p.Height}, data)
			if i == 0 {
				e.j.setPreview(data, frame)
			}
			e.s.hub.publishPreview(e.j.ID, frame)
		}
	}
}

// close waits until every preview taken has been published.
func (e *previewEncoder) close() {
	close(e.in)
	<-e.done
}
