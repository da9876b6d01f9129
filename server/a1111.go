package server

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"

	"github.com/stepwise-sd/stepwise/binding"
)

// The AUTOMATIC1111 web UI API subset existing clients use, with its field
// names and response shapes.
func (s *Server) a1111Routes(mux *http.ServeMux) {
	mux.HandleFunc("POST /sdapi/v1/txt2img", s.a1111Generate("txt2img"))
	mux.HandleFunc("POST /sdapi/v1/img2img", s.a1111Generate("img2img"))
	mux.HandleFunc("GET /sdapi/v1/progress", s.a1111Progress)
	mux.HandleFunc("POST /sdapi/v1/interrupt", s.a1111Interrupt)
	mux.HandleFunc("GET /sdapi/v1/sd-models", s.a1111Models)
	mux.HandleFunc("GET /sdapi/v1/samplers", s.a1111Samplers)
	mux.HandleFunc("GET /sdapi/v1/sd-vae", s.a1111VAEs)
	mux.HandleFunc("POST /sdapi/v1/refresh-checkpoints", s.a1111Refresh)
	mux.HandleFunc("POST /sdapi/v1/refresh-vae", s.a1111Refresh)
	mux.HandleFunc("GET /sdapi/v1/options", s.a1111Options)
	mux.HandleFunc("POST /sdapi/v1/options", s.a1111SetOptions)
}

// a1111Request is the part of StableDiffusionProcessingTxt2Img/Img2Img stepwise honours.
type a1111Request struct {
	Prompt            string   `json:"prompt"`
	NegativePrompt    string   `json:"negative_prompt"`
	Width             int      `json:"width"`
	Height            int      `json:"height"`
	Steps             int      `json:"steps"`
	CFGScale          float32  `json:"cfg_scale"`
	Seed              *int64   `json:"seed"`
	SamplerName       string   `json:"sampler_name"`
	SamplerIndex      string   `json:"sampler_index"`
	BatchSize         int      `json:"batch_size"`
	DenoisingStrength *float32 `json:"denoising_strength"`
	MaskBlur          *float64 `json:"mask_blur"`
	InitImages        []string `json:"init_images"`
	Mask              string   `json:"mask"`
	InpaintingInvert  int      `json:"inpainting_mask_invert"`
	// OverrideSettings may switch the checkpoint and VAE for this request alone.
	OverrideSettings struct {
		Checkpoint string `json:"sd_model_checkpoint"`
		VAE        string `json:"sd_vae"`
	} `json:"override_settings"`
}

func (s *Server) a1111Generate(endpoint string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		kind := endpoint
		body, err := io.ReadAll(r.Body)
		if err != nil {
			err = bodyError(err)
			writeA1111Error(w, statusOf(err), err.Error())
			return
		}
		var req a1111Request
		if err := json.Unmarshal(body, &req); err != nil {
			writeA1111Error(w, http.StatusUnprocessableEntity, "invalid JSON: "+err.Error())
			return
		}
		p := DefaultParams()
		p.Prompt, p.NegativePrompt, p.Width, p.Height = req.Prompt, req.NegativePrompt, req.Width, req.Height
		p.Steps, p.CFGScale, p.SamplerName, p.BatchSize = req.Steps, req.CFGScale, req.SamplerName, req.BatchSize
		if p.BatchSize == 0 {
			p.BatchSize = 1
		}
		// A1111's defaults where the request leaves a field out.
		if p.Width == 0 && kind == "txt2img" {
			p.Width = 512
		}
		if p.Height == 0 && kind == "txt2img" {
			p.Height = 512
		}
		if p.Steps == 0 {
			p.Steps = 50
		}
		if p.CFGScale == 0 {
			p.CFGScale = 7
		}
		if p.SamplerName == "" {
			p.SamplerName = req.SamplerIndex
		}
		if p.SamplerName == "" {
			p.SamplerName = "Euler a"
		}
		if req.Seed != nil {
			p.Seed = *req.Seed
		}
		p.Model, p.VAE = req.OverrideSettings.Checkpoint, req.OverrideSettings.VAE
		if kind == "img2img" {
			if len(req.InitImages) == 0 {
				writeA1111Error(w, http.StatusUnprocessableEntity, "init_images is empty")
				return
			}
			p.Image = req.InitImages[0]
			p.DenoisingStrength = 0.75
			if req.DenoisingStrength != nil {
				p.DenoisingStrength = *req.DenoisingStrength
			}
			p.MaskBlur = 4
			if req.MaskBlur != nil {
				p.MaskBlur = *req.MaskBlur
			}
			if req.Mask != "" {
				kind = "inpaint"
				p.Mask = req.Mask
				// Inverted on a worker, after the mask passed the limits.
				p.InvertMask = req.InpaintingInvert != 0
			}
		}
		j, err := s.Submit(kind, p, "sdapi", true)
		if err != nil {
			writeA1111Error(w, statusOf(err), err.Error())
			return
		}
		if !s.wait(r.Context(), j) {
			return
		}
		v := j.View()
		if v.State != StateCompleted {
			writeA1111Error(w, statusOf(j.Err()), v.State+": "+v.Error)
			return
		}
		imgs, err := s.resultPNGs(r.Context(), j)
		if err != nil {
			writeA1111Error(w, http.StatusBadGateway, err.Error())
			return
		}
		out := make([]string, 0, len(imgs))
		for _, img := range imgs {
			out = append(out, base64.StdEncoding.EncodeToString(img))
		}
		seed := v.Parameters.Seed // resolved at submission
		model := s.describe(j.modelPath())
		params := map[string]any{}
		json.Unmarshal(body, &params)
		params["seed"] = seed
		info, _ := json.Marshal(map[string]any{
			"prompt": p.Prompt, "negative_prompt": p.NegativePrompt, "seed": seed, "all_seeds": []int64{seed},
			"width": v.Result["width"], "height": v.Result["height"], "sampler_name": p.SamplerName, "steps": p.Steps,
			"cfg_scale": p.CFGScale, "batch_size": p.BatchSize, "denoising_strength": p.DenoisingStrength,
			"sd_model_name": model.Name, "sd_model_hash": model.Hash, "job_id": j.ID, "run_id": v.RunID,
		})
		writeJSON(w, http.StatusOK, map[string]any{"images": out, "parameters": params, "info": string(info)})
	}
}

func writeA1111Error(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]any{"error": http.StatusText(status), "detail": msg, "body": "", "errors": msg})
}

// a1111Progress reports the running A1111-API job (or any running job), as
// A1111's polling clients expect.
func (s *Server) a1111Progress(w http.ResponseWriter, r *http.Request) {
	skipImage := r.URL.Query().Get("skip_current_image") == "true"
	var cur *Job
	pending := 0
	for _, j := range s.Jobs() {
		switch j.State() {
		case StateRunning:
			if cur == nil || j.Source == "sdapi" {
				cur = j
			}
		case StateQueued:
			pending++
		}
	}
	state := map[string]any{
		"skipped": false, "interrupted": false, "job": "", "job_count": pending, "job_timestamp": "0",
		"job_no": 0, "sampling_step": 0, "sampling_steps": 0,
	}
	resp := map[string]any{"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": nil, "textinfo": nil}
	if cur != nil {
		v := cur.View()
		state["job"] = cur.ID
		state["job_count"] = pending + 1
		state["job_timestamp"] = v.Created.Format("20060102150405")
		state["sampling_step"] = v.Step
		state["sampling_steps"] = v.Steps
		resp["progress"] = v.Progress
		if v.ETA != nil {
			resp["eta_relative"] = *v.ETA
		}
		resp["textinfo"] = fmt.Sprintf("step %d/%d", v.Step, v.Steps)
		if !skipImage {
			if jpeg, _ := cur.latestPreview(); jpeg != nil {
				resp["current_image"] = base64.StdEncoding.EncodeToString(jpeg)
			}
		}
	}
	writeJSON(w, http.StatusOK, resp)
}

// a1111Interrupt cancels the running jobs submitted through the A1111 API.
func (s *Server) a1111Interrupt(w http.ResponseWriter, r *http.Request) {
	for _, j := range s.Jobs() {
		if j.Source == "sdapi" && j.State() == StateRunning {
			s.Cancel(j)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{})
}

func (s *Server) a1111Samplers(w http.ResponseWriter, r *http.Request) {
	out := make([]map[string]any, 0, len(a1111SamplerNames))
	for _, n := range a1111SamplerNames {
		aliases := append([]string{n.sampler.String()}, n.aliases...)
		out = append(out, map[string]any{"name": n.display, "aliases": aliases, "options": map[string]string{}})
	}
	writeJSON(w, http.StatusOK, out)
}

// a1111SamplerNames are AUTOMATIC1111's names for the engine's samplers: the
// display name its UI and clients send, and older spellings.
var a1111SamplerNames = []struct {
	sampler binding.Sampler
	display string
	aliases []string
}{
	{binding.Euler, "Euler", []string{"k_euler"}},
	{binding.EulerA, "Euler a", []string{"euler_ancestral", "k_euler_a", "k_euler_ancestral"}},
	{binding.DPMPP2M, "DPM++ 2M", []string{"k_dpmpp_2m"}},
	{binding.DPMPP2MKarras, "DPM++ 2M Karras", []string{"k_dpmpp_2m_karras"}},
	{binding.DDIM, "DDIM", nil},
	{binding.PNDM, "PLMS", []string{"plms"}},
}

// ParseSampler accepts the engine's sampler names and AUTOMATIC1111's display
// names and aliases, case-insensitively: what the job API and the CLI take.
func ParseSampler(name string) (binding.Sampler, error) {
	sampler, err := binding.ParseSampler(name)
	if err == nil {
		return sampler, nil
	}
	key := strings.ToLower(strings.TrimSpace(name))
	for _, n := range a1111SamplerNames {
		if key == strings.ToLower(n.display) || slices.Contains(n.aliases, key) {
			return n.sampler, nil
		}
	}
	return 0, fmt.Errorf("%w, or an A1111 name such as %q", err, a1111SamplerNames[3].display)
}
