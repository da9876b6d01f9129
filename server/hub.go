package server

import (
	"encoding/binary"
	"encoding/json"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// Event is a JSON text frame of the event stream (docs/protocol.md).
type Event struct {
	Type     string    `json:"type"`
	JobID    string    `json:"job_id"`
	Kind     string    `json:"kind,omitempty"`
	State    string    `json:"state,omitempty"`
	Position *int      `json:"position,omitempty"`
	Step     int       `json:"step,omitempty"`
	Steps    int       `json:"steps,omitempty"`
	Progress float64   `json:"progress,omitempty"`
	Elapsed  float64   `json:"elapsed,omitempty"`
	ETA      *float64  `json:"eta,omitempty"`
	Files    []string  `json:"files,omitempty"`
	Result   any       `json:"result,omitempty"`
	Error    string    `json:"error,omitempty"`
	Worker   string    `json:"worker,omitempty"`
	Attempt  int       `json:"attempt,omitempty"`
	Time     time.Time `json:"time"`
}

// Preview frame: [u32 type = 4][u32 n][n bytes of JSON metadata][image bytes],
// big-endian, as ComfyUI's PREVIEW_IMAGE_WITH_METADATA.
const previewFrameType = 4

// PreviewMeta is the JSON metadata of a binary preview frame.
type PreviewMeta struct {
	JobID  string `json:"job_id"`
	Step   int    `json:"step"`
	Steps  int    `json:"steps"`
	Index  int    `json:"index"`
	Format string `json:"format"` // "jpeg" or "png"
	Width  int    `json:"width"`
	Height int    `json:"height"`
}

func previewFrame(meta PreviewMeta, img []byte) []byte {
	m, _ := json.Marshal(meta)
	out := make([]byte, 8, 8+len(m)+len(img))
	binary.BigEndian.PutUint32(out[0:], previewFrameType)
	binary.BigEndian.PutUint32(out[4:], uint32(len(m)))
	return append(append(out, m...), img...)
}

const (
	writeWait      = 10 * time.Second
	pongWait       = 60 * time.Second
	pingPeriod     = pongWait * 9 / 10
	maxClientFrame = 4096
	eventBuffer    = 256
)

// subscriber is one websocket connection watching one job ("" = every job).
type subscriber struct {
	conn    *websocket.Conn
	jobID   string
	events  chan frame // bounded; a client that lets it fill is dropped
	preview chan frame // one slot: the newest preview wins
	done    chan struct{}
	once    sync.Once
}

func (s *subscriber) close() { s.once.Do(func() { close(s.done) }) }

// hub fans events and previews out to subscribers without ever blocking the producer.
type hub struct {
	mu           sync.Mutex
	subs         map[*subscriber]bool
	log          *slog.Logger
	previewBytes atomic.Int64
	dropped      atomic.Int64 // previews replaced before a slow client took them
	slowClients  atomic.Int64 // subscribers dropped for letting their event queue fill
}

func newHub(log *slog.Logger) *hub { return &hub{subs: map[*subscriber]bool{}, log: log} }

func (h *hub) add(s *subscriber) {
	h.mu.Lock()
	h.subs[s] = true
	h.mu.Unlock()
}

func (h *hub) remove(s *subscriber) {
	h.mu.Lock()
	delete(h.subs, s)
	h.mu.Unlock()
	s.close()
}

func (h *hub) matching(jobID string) []*subscriber {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []*subscriber
	for s := range h.subs {
		if s.jobID == "" || s.jobID == jobID {
			out = append(out, s)
		}
	}
	return out
}

// frame is a message prepared once for every connection, with its size.
type frame struct {
	pm      *websocket.PreparedMessage
	n       int
	preview bool
}

func newSubscriber(conn *websocket.Conn, jobID string) *subscriber {
	return &subscriber{conn: conn, jobID: jobID, events: make(chan frame, eventBuffer),
		preview: make(chan frame, 1), done: make(chan struct{})}
}

func textFrame(v any) frame {
	b, _ := json.Marshal(v)
	pm, _ := websocket.NewPreparedMessage(websocket.TextMessage, b)
	return frame{pm: pm, n: len(b)}
}

func binaryFrame(b []byte) frame {
	pm, _ := websocket.NewPreparedMessage(websocket.BinaryMessage, b)
	return frame{pm: pm, n: len(b), preview: true}
}

// publish sends an event to the job's subscribers; a subscriber whose queue is
// full is disconnected rather than waited for.
func (h *hub) publish(ev Event) {
	f := textFrame(ev)
	for _, s := range h.matching(ev.JobID) {
		select {
		case s.events <- f:
		default:
			h.log.Warn("dropping a websocket client that does not read its events", "job", ev.JobID)
			h.slowClients.Add(1)
			h.remove(s)
		}
	}
}

// publishPreview offers a preview frame; each subscriber keeps only the newest.
func (h *hub) publishPreview(jobID string, data []byte) {
	f := binaryFrame(data)
	for _, s := range h.matching(jobID) {
		offerLatest(s.preview, f, &h.dropped)
	}
}

func offerLatest(ch chan frame, f frame, dropped *atomic.Int64) {
	for {
		select {
		case ch <- f:
			return
		default:
		}
		select {
		case <-ch: // a stale preview the client has not taken yet
			dropped.Add(1)
		default:
		}
	}
}

// serve runs the connection's writer and reader until either ends. initial
// messages (the current state, the latest preview) go first.
func (h *hub) serve(s *subscriber, initial []frame) {
	h.add(s)
	defer h.remove(s)
	go h.readPump(s)
	ticker := time.NewTicker(pingPeriod)
	defer ticker.Stop()
	defer s.conn.Close()
	write := func(f frame) bool {
		s.conn.SetWriteDeadline(time.Now().Add(writeWait))
		if s.conn.WritePreparedMessage(f.pm) != nil {
			return false
		}
		if f.preview {
			h.previewBytes.Add(int64(f.n))
		}
		return true
	}
	for _, f := range initial {
		if !write(f) {
			return
		}
	}
	for {
		select {
		case <-s.done:
			s.conn.SetWriteDeadline(time.Now().Add(writeWait))
			s.conn.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""))
			return
		case f := <-s.events:
			// A preview waiting goes first: the step it shows came before
			// this event (the job's end comes after its last preview).
			select {
			case p := <-s.preview:
				if !write(p) {
					return
				}
			default:
			}
			if !write(f) {
				return
			}
		case f := <-s.preview:
			if !write(f) {
				return
			}
		case <-ticker.C:
			s.conn.SetWriteDeadline(time.Now().Add(writeWait))
			if err := s.conn.WriteMessage(websocket.PingMessage, nil); err != nil {
				return
			}
		}
	}
}

// readPump keeps the read side alive for pongs and close frames; a client may
// also send {"type":"cancel"} (handled by onMessage in the server).
func (h *hub) readPump(s *subscriber) {
	defer s.close()
	s.conn.SetReadLimit(maxClientFrame)
	s.conn.SetReadDeadline(time.Now().Add(pongWait))
	s.conn.SetPongHandler(func(string) error { s.conn.SetReadDeadline(time.Now().Add(pongWait)); return nil })
	for {
		if _, _, err := s.conn.ReadMessage(); err != nil {
			return
		}
		s.conn.SetReadDeadline(time.Now().Add(pongWait))
	}
}

func (h *hub) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs)
}
