package server

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"

	"github.com/stepwise-sd/stepwise/catalog"
	"github.com/stepwise-sd/stepwise/jobbus"
	"github.com/stepwise-sd/stepwise/modelcache"
)

// Handler returns the server's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.handlePage)
	mux.HandleFunc("GET /healthz", s.handleHealth)
	mux.HandleFunc("GET /favicon.ico", handleFavicon)
	mux.Handle("GET /metrics", s.metrics.handler())
	mux.HandleFunc("POST /v1/jobs", s.handleSubmit)
	mux.HandleFunc("GET /v1/jobs", s.handleList)
	mux.HandleFunc("GET /v1/jobs/{id}", s.handleGet)
	mux.HandleFunc("POST /v1/jobs/{id}/cancel", s.handleCancel)
	mux.HandleFunc("GET /v1/jobs/{id}/events", s.handleEvents)
	mux.HandleFunc("GET /v1/events", s.handleEvents)
	mux.HandleFunc("GET /v1/runs/{run}/{file}", s.handleRunFile)
	mux.HandleFunc("POST /v1/segment", s.handleSync("segment"))
	mux.HandleFunc("POST /v1/edit", s.handleSync("edit"))
	mux.HandleFunc("GET /v1/models", s.handleModels)
	mux.HandleFunc("POST /v1/models/load", s.handleModelOp(jobbus.OpLoad))
	mux.HandleFunc("POST /v1/models/unload", s.handleModelOp(jobbus.OpUnload))
	s.a1111Routes(mux)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such endpoint: "+r.Method+" "+r.URL.Path)
	})
	return s.guard(mux)
}

// guard applies the local server's safety rules to every request: size
// limit, Host, Origin, token.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
		if !s.hostAllowed(r.Host) {
			writeError(w, http.StatusForbidden, "host "+r.Host+" is not served here (stepwise serve --allow-host)")
			return
		}
		if origin := r.Header.Get("Origin"); origin != "" && !s.originAllowed(origin, r.Host) {
			writeError(w, http.StatusForbidden, "origin "+origin+" is not allowed")
			return
		}
		public := r.URL.Path == "/" || r.URL.Path == "/healthz" || r.URL.Path == "/favicon.ico"
		if s.cfg.Token != "" && !public && !s.tokenOK(r) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="stepwise"`)
			writeError(w, http.StatusUnauthorized, "missing or wrong bearer token")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// hostAllowed accepts IP addresses, loopback names and the configured names.
// A DNS-rebinding page reaches the server under its own domain name, which is
// none of these.
func (s *Server) hostAllowed(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.Trim(host, "[]"), ".")
	if host == "" {
		return false
	}
	if net.ParseIP(host) != nil {
		return true
	}
	host = strings.ToLower(host)
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return true
	}
	for _, h := range s.cfg.AllowedHosts {
		if h == "*" || strings.EqualFold(h, host) {
			return true
		}
	}
	return false
}

func (s *Server) tokenOK(r *http.Request) bool {
	got := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	if got == "" || got == r.Header.Get("Authorization") {
		got = r.URL.Query().Get("token")
	}
	return subtle.ConstantTimeCompare([]byte(got), []byte(s.cfg.Token)) == 1
}

// originAllowed accepts the server's own origin and the configured ones.
func (s *Server) originAllowed(origin, host string) bool {
	u, err := url.Parse(origin)
	if err != nil {
		return false
	}
	if strings.EqualFold(u.Host, host) {
		return true
	}
	for _, o := range s.cfg.AllowedOrigins {
		if o == "*" || strings.EqualFold(strings.TrimSuffix(o, "/"), origin) {
			return true
		}
	}
	return false
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]any{"error": msg, "status": status})
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	workers := s.workers.list()
	status := "ok"
	if len(workers) == 0 {
		status = "no workers" // the API answers; jobs wait until a worker joins
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": status, "queue": s.queue.length(), "running": s.metrics.running.Load(),
		"nats": s.bus.NC.IsConnected(), "workers": workers})
}

// submitFrom reads a job from the request and queues it; kind overrides the
// body's kind when set; sync keeps the images for the answer. On error it has
// answered the request.
func (s *Server) submitFrom(w http.ResponseWriter, r *http.Request, kind string, sync bool) *Job {
	bodyKind, p, err := readJob(r)
	if err == nil {
		if kind == "" {
			kind = bodyKind
		}
		var j *Job
		if j, err = s.Submit(kind, p, "v1", sync); err == nil {
			return j
		}
	}
	writeError(w, statusOf(err), err.Error())
	return nil
}

func (s *Server) handleSubmit(w http.ResponseWriter, r *http.Request) {
	j := s.submitFrom(w, r, "", false)
	if j == nil {
		return
	}
	w.Header().Set("Location", "/v1/jobs/"+j.ID)
	writeJSON(w, http.StatusAccepted, j.View())
}

func (s *Server) handleList(w http.ResponseWriter, r *http.Request) {
	jobs := s.Jobs()
	out := make([]JobView, 0, len(jobs))
	for _, j := range jobs {
		out = append(out, j.View())
	}
	writeJSON(w, http.StatusOK, map[string]any{"jobs": out})
}

func (s *Server) jobOr404(w http.ResponseWriter, r *http.Request) *Job {
	j := s.Job(r.PathValue("id"))
	if j == nil {
		writeError(w, http.StatusNotFound, "no job "+r.PathValue("id"))
	}
	return j
}

func (s *Server) handleGet(w http.ResponseWriter, r *http.Request) {
	if j := s.jobOr404(w, r); j != nil {
		writeJSON(w, http.StatusOK, j.View())
	}
}

func (s *Server) handleCancel(w http.ResponseWriter, r *http.Request) {
	j := s.jobOr404(w, r)
	if j == nil {
		return
	}
	if !s.Cancel(j) {
		writeError(w, http.StatusConflict, "job "+j.ID+" is "+j.State()+"; only queued or running jobs can be cancelled")
		return
	}
	writeJSON(w, http.StatusAccepted, j.View())
}

// handleRunFile serves a run's file from the local runs folder (a worker on
// this host wrote it), else from the results object store (a worker anywhere).
func (s *Server) handleRunFile(w http.ResponseWriter, r *http.Request) {
	run, file := r.PathValue("run"), r.PathValue("file")
	path, err := s.cfg.Runs.Path(run, file)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	{
		if _, err := os.Lstat(path); err == nil || !errors.Is(err, os.ErrNotExist) {
			f, err := openRegular(path)
			if err != nil {
				writeError(w, http.StatusNotFound, "no such run file")
				return
			}
			defer f.Close()
			st, err := f.Stat()
			if err != nil {
				writeError(w, http.StatusNotFound, "no such run file")
				return
			}
			http.ServeContent(w, r, st.Name(), st.ModTime(), f)
			return
		}
	}
	obj, err := s.bus.Results.Get(r.Context(), jobbus.ResultName(run, file))
	if err != nil {
		writeError(w, http.StatusNotFound, "no such run file")
		return
	}
	defer obj.Close()
	info, err := obj.Info()
	if err != nil {
		writeError(w, http.StatusNotFound, "no such run file")
		return
	}
	data, err := io.ReadAll(obj)
	if err != nil {
		writeError(w, http.StatusBadGateway, "reading the run file from the results store failed")
		return
	}
	http.ServeContent(w, r, file, info.ModTime, bytes.NewReader(data))
}

// runFile reads a run's file as handleRunFile finds it.
func (s *Server) runFile(ctx context.Context, run, file string) ([]byte, error) {
	if path, err := s.cfg.Runs.Path(run, file); err == nil {
		if f, err := openRegular(path); err == nil {
			defer f.Close()
			return io.ReadAll(f)
		}
	}
	data, err := s.bus.Results.GetBytes(ctx, jobbus.ResultName(run, file))
	if err != nil {
		return nil, fmt.Errorf("run file %s/%s: %w", run, file, err)
	}
	return data, nil
}

// resultPNGs are a finished job's images for a synchronous answer, as PNG files.
func (s *Server) resultPNGs(ctx context.Context, j *Job) ([][]byte, error) {
	run, files := j.imageFiles()
	out := make([][]byte, 0, len(files))
	for _, f := range files {
		data, err := s.runFile(ctx, run, f)
		if err != nil {
			return nil, err
		}
		out = append(out, data)
	}
	return out, nil
}

// openRegular opens a run file only if neither it nor its run folder is a
// symbolic link and it is a regular file: whatever was planted under the
// data folder, the server hands out only what runs wrote.
func openRegular(path string) (*os.File, error) {
	if st, err := os.Lstat(filepath.Dir(path)); err != nil || !st.IsDir() {
		return nil, errors.New("not a run folder")
	}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, errors.New("not a regular file")
	}
	return f, nil
}

func (s *Server) upgrader() *websocket.Upgrader {
	return &websocket.Upgrader{
		ReadBufferSize: 1024, WriteBufferSize: 64 << 10,
		CheckOrigin: func(r *http.Request) bool {
			o := r.Header.Get("Origin")
			return o == "" || s.originAllowed(o, r.Host)
		},
	}
}

func (s *Server) handleEvents(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var jobs []*Job
	if id != "" {
		j := s.jobOr404(w, r)
		if j == nil {
			return
		}
		jobs = []*Job{j}
	} else {
		for _, j := range s.Jobs() {
			if st := j.State(); st == StateQueued || st == StateRunning {
				jobs = append(jobs, j)
			}
		}
	}
	if n := s.websockets.Add(1); n > int64(s.cfg.MaxWebsockets) {
		s.websockets.Add(-1)
		writeError(w, http.StatusServiceUnavailable, fmt.Sprintf("too many websocket connections (%d)", s.cfg.MaxWebsockets))
		return
	}
	defer s.websockets.Add(-1)
	conn, err := s.upgrader().Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader wrote the error
	}
	sub := newSubscriber(conn, id)
	var initial []frame
	for _, j := range jobs {
		initial = append(initial, textFrame(j.event("")))
		if _, pf := j.latestPreview(); pf != nil {
			initial = append(initial, binaryFrame(pf))
		}
	}
	s.hub.serve(sub, initial)
}

// handleSync runs a segment or edit job and answers when it is done, with the
// images as base64 PNGs (the original API's style).
func (s *Server) handleSync(kind string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		j := s.submitFrom(w, r, kind, true)
		if j == nil || !s.wait(r.Context(), j) {
			return
		}
		v := j.View()
		if v.State != StateCompleted {
			status := statusOf(j.Err())
			writeJSON(w, status, map[string]any{"error": v.Error, "status": status, "job": v})
			return
		}
		imgs, err := s.resultPNGs(r.Context(), j)
		if err != nil {
			writeError(w, http.StatusBadGateway, err.Error())
			return
		}
		names := map[string][]string{"segment": {"mask"}, "edit": {"edited", "mask", "edited_mask"}}[kind]
		out := map[string]any{"job": v}
		for i, name := range names {
			if i < len(imgs) {
				out[name] = base64.StdEncoding.EncodeToString(imgs[i])
			}
		}
		if iou, ok := v.Result["subject_iou"]; ok {
			out["subject_iou"] = iou
		}
		writeJSON(w, http.StatusOK, out)
	}
}

// wait blocks until j finishes; if the client goes away first the job is
// cancelled and wait reports false.
func (s *Server) wait(ctx context.Context, j *Job) bool {
	select {
	case <-j.Done():
		return true
	case <-ctx.Done():
		s.Cancel(j)
		return false
	}
}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	current, _ := s.resolveModel("")
	vae, _ := s.resolveVAE("")
	memory, loaded := s.workers.memory()
	out := map[string]any{
		"configured":  map[string]string{"sd": s.cfg.Model, "seg": s.cfg.SegModel, "vae": s.cfg.VAE},
		"current":     map[string]string{"sd": current, "vae": vae},
		"checkpoints": s.checkpoints(),
		"loaded":      loaded,
		"memory":      memory,
		"workers":     s.workers.list(),
		"backends":    s.backends(),
	}
	if s.catalog != nil {
		out["models_dir"] = s.catalog.Dir()
		out["vaes"] = s.catalog.List(catalog.KindVAE)
	}
	writeJSON(w, http.StatusOK, out)
}

// modelRequest reads a load or unload request into what workers are asked.
func (s *Server) modelRequest(r *http.Request, op string) (jobbus.ModelRequest, error) {
	var req struct {
		Kind  string `json:"kind"`  // "sd" or "seg"
		Model string `json:"model"` // sd: a name from the models folder; empty: the current model
		VAE   string `json:"vae"`   // sd: a VAE from the models folder; empty: the current one
		// Backend (sd): libtorch or sdcpp; empty: the server's.
		Backend string `json:"backend"`
	}
	out := jobbus.ModelRequest{Op: op, Kind: "sd", DType: s.cfg.DType.String()}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return out, bodyError(err)
	}
	if err := json.Unmarshal(body, &req); err != nil {
		return out, badRequest("invalid JSON: %v", err)
	}
	switch req.Kind {
	case "sd":
		if out.Path, err = s.resolveModel(req.Model); err != nil {
			return out, err
		}
		if out.VAE, err = s.resolveVAE(req.VAE); err != nil {
			return out, err
		}
		backend, err := s.resolveBackend(req.Backend)
		out.Backend = backend.String()
		return out, err
	case "seg":
		if s.cfg.SegModel == "" {
			return out, badRequest("no segmentation model is configured")
		}
		out.Kind, out.Path = "seg", s.cfg.SegModel
		return out, nil
	}
	return out, badRequest(`kind must be "sd" or "seg"`)
}

// ErrNoWorkers is a request that needs a worker while none is connected.
var ErrNoWorkers = errors.New("no worker is connected")

// modelTimeout bounds a worker's model load (a large checkpoint from a slow disk).
const modelTimeout = 10 * time.Minute

// askWorkers sends a model request to every worker and gathers the replies;
// the first failure is the answer's error.
func (s *Server) askWorkers(ctx context.Context, req jobbus.ModelRequest) ([]jobbus.ModelReply, error) {
	workers := s.workers.list()
	if len(workers) == 0 {
		return nil, &apiError{status: http.StatusServiceUnavailable, msg: ErrNoWorkers.Error()}
	}
	raw, _ := json.Marshal(req)
	ctx, cancel := context.WithTimeout(ctx, modelTimeout)
	defer cancel()
	replies := make([]jobbus.ModelReply, len(workers))
	errs := make([]error, len(workers))
	var wg sync.WaitGroup
	for i, a := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m, err := s.bus.NC.RequestWithContext(ctx, jobbus.ControlSubject(a.ID), raw)
			if err != nil {
				errs[i] = fmt.Errorf("worker %s: %w", a.ID, err)
				return
			}
			if err := json.Unmarshal(m.Data, &replies[i]); err != nil {
				errs[i] = fmt.Errorf("worker %s: unreadable reply: %w", a.ID, err)
				return
			}
			switch rp := replies[i]; rp.Code {
			case "":
				if rp.Error != "" {
					errs[i] = fmt.Errorf("worker %s: %s", a.ID, rp.Error)
				}
			case jobbus.CodeBadRequest:
				errs[i] = badRequest("%s", rp.Error)
			case jobbus.CodeInUse:
				errs[i] = &apiError{status: http.StatusConflict, msg: rp.Error}
			default:
				errs[i] = fmt.Errorf("worker %s: %s", a.ID, rp.Error)
			}
		}()
	}
	wg.Wait()
	return replies, errors.Join(errs...)
}

// modelOpAnswer is a load's or unload's answer as a single server gave it
// (the model, its info, whether it was unloaded, the memory: summed), with
// each worker's reply.
func modelOpAnswer(op, path string, replies []jobbus.ModelReply) map[string]any {
	var memory modelcache.Stats
	unloaded := false
	var info json.RawMessage
	for _, rp := range replies {
		memory = addStats(memory, rp.Memory)
		unloaded = unloaded || rp.Unloaded
		if info == nil {
			info = rp.Info
		}
	}
	out := map[string]any{"memory": memory, "workers": replies}
	if op == jobbus.OpLoad {
		out["loaded"], out["info"] = path, info
	} else {
		out["unloaded"] = unloaded
	}
	return out
}

func (s *Server) handleModelOp(op string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		req, err := s.modelRequest(r, op)
		if err == nil {
			var replies []jobbus.ModelReply
			if replies, err = s.askWorkers(r.Context(), req); err == nil {
				writeJSON(w, http.StatusOK, modelOpAnswer(op, req.Path, replies))
				return
			}
		}
		writeError(w, statusOf(err), err.Error())
	}
}
