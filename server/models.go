package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/catalog"
)

// modelChoice is what the server generates with when a request names no
// model: A1111's sd_model_checkpoint and sd_vae options.
type modelChoice struct {
	mu   sync.Mutex
	sd   string // a path; "" is Config.Model
	vae  string // a path; "" is Config.VAE
	none bool   // sd_vae "None": the model's own VAE even when Config.VAE is set
}

// a1111NoVAE are A1111's sd_vae values for "the checkpoint's own VAE".
var a1111NoVAE = map[string]bool{"": true, "Automatic": true, "None": true}

// resolveModel turns a request's model name into a path: a name from the
// models folder, or the server's current model when name is empty. Clients
// name models; they never give paths the server has not listed.
func (s *Server) resolveModel(name string) (string, error) {
	if strings.TrimSpace(name) == "" {
		s.choice.mu.Lock()
		defer s.choice.mu.Unlock()
		if s.choice.sd != "" {
			return s.choice.sd, nil
		}
		return s.cfg.Model, nil
	}
	if s.catalog != nil {
		e, err := s.catalog.Find(catalog.KindCheckpoint, name)
		if err != nil {
			return "", badRequest("%v", err)
		}
		return e.Path, nil
	}
	base := filepath.Base(s.cfg.Model)
	if name == s.cfg.Model || name == base || name == strings.TrimSuffix(base, filepath.Ext(base)) {
		return s.cfg.Model, nil
	}
	return "", badRequest("%v %q: this server serves only %s (stepwise serve --models-dir to choose among many)",
		catalog.ErrUnknownModel, name, base)
}

// resolveVAE turns a request's VAE name into a path ("" for the model's own).
func (s *Server) resolveVAE(name string) (string, error) {
	if strings.TrimSpace(name) == "" {
		s.choice.mu.Lock()
		defer s.choice.mu.Unlock()
		switch {
		case s.choice.none:
			return "", nil
		case s.choice.vae != "":
			return s.choice.vae, nil
		}
		return s.cfg.VAE, nil
	}
	if a1111NoVAE[name] {
		return "", nil
	}
	if s.catalog != nil {
		e, err := s.catalog.Find(catalog.KindVAE, name)
		if err != nil {
			return "", badRequest("%v", err)
		}
		return e.Path, nil
	}
	if s.cfg.VAE != "" && (name == s.cfg.VAE || name == filepath.Base(s.cfg.VAE)) {
		return s.cfg.VAE, nil
	}
	return "", badRequest("%v %q: no models folder lists VAEs (stepwise serve --models-dir)", catalog.ErrUnknownModel, name)
}

// ErrNoWorkerHasBackend refuses a job for a backend that no connected
// worker can load.
var ErrNoWorkerHasBackend = errors.New("no connected worker can run this backend")

// resolveBackend turns a request's backend name into a backend a worker can
// run: empty is the server's default. An unknown name, and a backend that no
// connected worker can load (not built in, its library missing), are 400s
// that say why. With no worker connected yet, any known backend is taken:
// the job waits for a worker.
func (s *Server) resolveBackend(name string) (binding.Backend, error) {
	b := s.cfg.Backend
	if strings.TrimSpace(name) != "" {
		var err error
		if b, err = binding.ParseBackend(name); err != nil {
			return b, badRequestErr(err)
		}
	}
	if reason, ok := s.workers.backend(b.String()); !ok {
		return b, badRequestErr(fmt.Errorf("backend %s: %w (%s)", b, ErrNoWorkerHasBackend, reason))
	}
	return b, nil
}

// backendInfo is one backend in /v1/models.
type backendInfo struct {
	Name      string `json:"name"`
	Available bool   `json:"available"`
	Default   bool   `json:"default"`
	// Reason is why it is unavailable; empty when it is available.
	Reason string `json:"reason,omitempty"`
	// Library is the stable-diffusion.cpp build the sdcpp backend found.
	Library string `json:"library,omitempty"`
}

// backends lists every backend, available on some worker or not, with the
// reason a worker gave.
func (s *Server) backends() []backendInfo {
	var out []backendInfo
	for _, b := range binding.Backends() {
		info := backendInfo{Name: b.String(), Default: b == s.cfg.Backend, Reason: "no worker is connected"}
		for _, a := range s.workers.list() {
			for _, st := range a.Backends {
				if st.Name != info.Name {
					continue
				}
				if st.Available && !info.Available {
					info.Available, info.Reason, info.Library = true, "", st.Library
				} else if !info.Available {
					info.Reason = st.Reason
				}
			}
		}
		out = append(out, info)
	}
	return out
}

// describe is a model's catalog entry; models outside the folder are
// described once and remembered (their hash reads the whole file).
func (s *Server) describe(path string) catalog.Entry {
	if s.catalog != nil {
		for _, e := range s.catalog.List("") {
			if e.Path == path {
				return e
			}
		}
	}
	s.described.mu.Lock()
	defer s.described.mu.Unlock()
	if e, ok := s.described.m[path]; ok {
		return e
	}
	e, err := catalog.Describe(path)
	if err != nil {
		e = catalog.Entry{Name: filepath.Base(path), Path: path, Problems: err.Error()}
	}
	s.described.m[path] = e
	return e
}

// checkpoints lists what a client may choose from.
func (s *Server) checkpoints() []catalog.Entry {
	if s.catalog != nil {
		return s.catalog.List(catalog.KindCheckpoint)
	}
	return []catalog.Entry{s.describe(s.cfg.Model)}
}

func (s *Server) a1111Models(w http.ResponseWriter, r *http.Request) {
	out := []map[string]any{}
	for _, e := range s.checkpoints() {
		out = append(out, map[string]any{"title": e.Title, "model_name": e.Name, "hash": e.Hash, "sha256": e.SHA256,
			"filename": e.Path, "config": nil})
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) a1111VAEs(w http.ResponseWriter, r *http.Request) {
	out := []map[string]any{}
	if s.catalog != nil {
		for _, e := range s.catalog.List(catalog.KindVAE) {
			out = append(out, map[string]any{"model_name": e.Name, "filename": e.Path})
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) a1111Refresh(w http.ResponseWriter, r *http.Request) {
	if s.catalog != nil {
		if err := s.catalog.Refresh(); err != nil {
			writeA1111Error(w, http.StatusInternalServerError, err.Error())
			return
		}
	}
	writeJSON(w, http.StatusOK, nil)
}

// a1111Options answers the options clients read: the current checkpoint and VAE.
func (s *Server) a1111Options(w http.ResponseWriter, r *http.Request) {
	sd, _ := s.resolveModel("")
	vae, _ := s.resolveVAE("")
	e := s.describe(sd)
	vaeName := "Automatic"
	if vae != "" {
		vaeName = s.describe(vae).Name
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"sd_model_checkpoint": e.Title, "sd_checkpoint_hash": e.SHA256, "sd_vae": vaeName,
		"samples_format": "png", "CLIP_stop_at_last_layers": 1,
	})
}

// a1111SetOptions switches the current checkpoint and VAE for requests that
// name none; other options are accepted and ignored, as A1111 clients set many.
func (s *Server) a1111SetOptions(w http.ResponseWriter, r *http.Request) {
	var req map[string]json.RawMessage
	body, err := io.ReadAll(r.Body)
	if err != nil {
		err = bodyError(err)
		writeA1111Error(w, statusOf(err), err.Error())
		return
	}
	if err := json.Unmarshal(body, &req); err != nil {
		writeA1111Error(w, http.StatusUnprocessableEntity, "invalid JSON: "+err.Error())
		return
	}
	str := func(key string) (string, bool, error) {
		raw, ok := req[key]
		if !ok {
			return "", false, nil
		}
		var v string
		if err := json.Unmarshal(raw, &v); err != nil {
			return "", true, badRequest("%s must be a string", key)
		}
		return v, true, nil
	}
	ckpt, setCkpt, err := str("sd_model_checkpoint")
	if err == nil && setCkpt && strings.TrimSpace(ckpt) == "" {
		err = badRequest("sd_model_checkpoint is empty")
	}
	var sdPath, vaePath string
	if err == nil && setCkpt {
		sdPath, err = s.resolveModel(ckpt)
	}
	vae, setVAE, verr := str("sd_vae")
	if err == nil {
		err = verr
	}
	if err == nil && setVAE {
		vaePath, err = s.resolveVAE(vae)
	}
	if err != nil {
		writeA1111Error(w, statusOf(err), err.Error())
		return
	}
	s.choice.mu.Lock()
	if setCkpt {
		s.choice.sd = sdPath
	}
	if setVAE {
		s.choice.vae, s.choice.none = vaePath, vaePath == ""
	}
	s.choice.mu.Unlock()
	writeJSON(w, http.StatusOK, nil)
}
