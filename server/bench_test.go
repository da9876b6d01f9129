package server_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"sort"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/internal/testenv"
	"github.com/stepwise-sd/stepwise/pipeline"
	"github.com/stepwise-sd/stepwise/server"
)

// BenchmarkPreviewLatency measures, over one job of benchSteps steps on the
// tiny model (64×64), how long a step takes to reach a websocket client of
// the gateway from the worker's step callback — the progress event, and the
// preview frame (JPEG-encoded on the worker) — through a real NATS server
// over loopback TCP; and the step time through the worker against the same
// generation run in-process. It is a benchmark, not a test: it asserts
// nothing about time. Run it with
//
//	go test -run '^$' -bench PreviewLatency -benchtime 1x ./server/
const benchSteps = 200

func BenchmarkPreviewLatency(b *testing.B) {
	e := start(b, server.Config{MaxSteps: benchSteps})
	sd, _ := testenv.Tiny(b)
	body := map[string]any{"kind": "txt2img", "prompt": "a cat", "width": 64, "height": 64, "steps": benchSteps, "seed": 3}
	// Warm: the model loads on the first job.
	first := submit(b, e, txt(2))
	collect(b, e.dial(b, "/v1/jobs/"+first+"/events"), first)

	for i := 0; i < b.N; i++ {
		// The same generation in-process first, on the worker's runner (the
		// model is loaded), then through the worker.
		o := pipeline.DefaultGenerateOptions()
		o.SD, o.Prompt, o.Width, o.Height, o.Steps, o.Seed = pipeline.ModelRef{Path: sd}, "a cat", 64, 64, benchSteps, 3
		o.Preview = binding.PreviewLatent2RGB
		var last time.Duration
		o.OnStep = func(st binding.Step) { last = st.Elapsed }
		_, err := e.runner.Generate(context.Background(), o)
		require.NoError(b, err)
		b.ReportMetric(ms(last)/benchSteps, "inprocess-step-ms")
		id := submit(b, e, body)
		c := e.dial(b, "/v1/jobs/"+id+"/events")
		stepAt := map[int]time.Time{}    // the worker's step callback, by step
		previewAt := map[int]time.Time{} // a preview's arrival, by step
		var progress, previews []time.Duration
		var elapsed float64
		c.SetReadDeadline(time.Now().Add(10 * time.Minute))
		for done := false; !done; {
			typ, data, err := c.ReadMessage()
			require.NoError(b, err)
			now := time.Now()
			if typ == websocket.BinaryMessage {
				n := binary.BigEndian.Uint32(data[4:])
				var meta server.PreviewMeta
				require.NoError(b, json.Unmarshal(data[8:8+n], &meta))
				previewAt[meta.Step] = now
				continue
			}
			var ev struct {
				Type    string    `json:"type"`
				Step    int       `json:"step"`
				Elapsed float64   `json:"elapsed"`
				Time    time.Time `json:"time"`
			}
			require.NoError(b, json.Unmarshal(data, &ev))
			switch ev.Type {
			case "progress":
				stepAt[ev.Step] = ev.Time
				progress = append(progress, now.Sub(ev.Time))
			case "completed":
				elapsed, done = ev.Elapsed, true
			case "failed", "cancelled":
				b.Fatalf("the job ended %s", ev.Type)
			}
		}
		for step, at := range previewAt {
			previews = append(previews, at.Sub(stepAt[step]))
		}
		p50, p99 := percentiles(progress)
		b.ReportMetric(ms(p50), "progress-p50-ms")
		b.ReportMetric(ms(p99), "progress-p99-ms")
		p50, p99 = percentiles(previews)
		b.ReportMetric(ms(p50), "preview-p50-ms")
		b.ReportMetric(ms(p99), "preview-p99-ms")
		b.ReportMetric(float64(len(previews)), "previews")
		b.ReportMetric(elapsed/benchSteps*1000, "worker-step-ms")

	}
}

func percentiles(d []time.Duration) (p50, p99 time.Duration) {
	if len(d) == 0 {
		return 0, 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)*50/100], s[min(len(s)-1, len(s)*99/100)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
