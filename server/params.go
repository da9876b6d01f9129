package server

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"io"
	"math"
	"mime"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// JobParams are a job's parameters; names follow the A1111 API where it has one.
type JobParams struct {
	Prompt            string  `json:"prompt"`
	NegativePrompt    string  `json:"negative_prompt"`
	Width             int     `json:"width"`
	Height            int     `json:"height"`
	Steps             int     `json:"steps"`
	CFGScale          float32 `json:"cfg_scale"`
	Seed              int64   `json:"seed"`
	SamplerName       string  `json:"sampler_name"`
	DenoisingStrength float32 `json:"denoising_strength"`
	BatchSize         int     `json:"batch_size"`
	MaskBlur          float64 `json:"mask_blur"`
	Preview           string  `json:"preview"`
	PreviewEvery      int     `json:"preview_every"`
	// Image and Mask are base64 (optionally a data: URL); multipart uploads fill them too.
	Image string `json:"image,omitempty"`
	Mask  string `json:"mask,omitempty"`
	// Model and VAE name a checkpoint and a VAE of the models folder; empty:
	// the server's current ones.
	Model string `json:"model,omitempty"`
	VAE   string `json:"vae,omitempty"`
	// Backend is the engine that runs the model: libtorch or sdcpp; empty:
	// the server's (serve --backend).
	Backend string `json:"backend,omitempty"`
	// InvertMask swaps the mask's inside and outside (A1111's inpainting_mask_invert).
	InvertMask bool `json:"invert_mask,omitempty"`
	// Edit and segment.
	RepaintSubject bool    `json:"repaint_subject,omitempty"`
	Grow           int     `json:"grow,omitempty"`
	SegmentScale   float64 `json:"segment_scale,omitempty"`
	Classes        []int   `json:"classes,omitempty"`
	WorkingSize    int     `json:"working_size,omitempty"`
}

// DefaultParams are what a request leaves out: requests are decoded on top
// of them, so an explicit 0 stays 0 (and is refused where it is invalid).
// The values are the pipeline's defaults; previews default on for the page.
func DefaultParams() JobParams {
	d := pipeline.DefaultGenerateOptions()
	return JobParams{Steps: d.Steps, CFGScale: d.CFGScale, Seed: -1, SamplerName: d.Sampler.String(),
		BatchSize: d.BatchSize, Preview: binding.PreviewLatent2RGB.String(), PreviewEvery: d.PreviewEvery, MaskBlur: d.MaskBlur}
}

// Bounds on job parameters that are not server settings: each is far beyond
// what a sensible request asks for, and close enough that no request can turn
// into unbounded work.
const (
	maxCFGScale     = 30
	maxMaskBlur     = 64
	maxPreviewEvery = 1000
	// maxSegmentScale bounds segment_scale; the scaled image must also fit MaxPixels.
	maxSegmentScale = 4
	// maxClasses bounds the classes list; class ids are below the model's class count.
	maxClasses = 256
	// maxSeed keeps seeds within what every client (and JSON's doubles) can say exactly.
	maxSeed = 1<<53 - 1
)

// Kinds of job.
var jobKinds = map[string]bool{"txt2img": true, "img2img": true, "inpaint": true, "segment": true, "edit": true}

// decoded holds a validated job's decoded inputs.
type decoded struct {
	sdPath  string
	vaePath string
	backend binding.Backend
	sampler binding.Sampler
	preview binding.Preview
	image   []byte
	mask    []byte
	seed    uint64
}

func decodeB64(name, s string) ([]byte, error) {
	if i := strings.Index(s, ";base64,"); strings.HasPrefix(s, "data:") && i >= 0 {
		s = s[i+len(";base64,"):]
	}
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, badRequest("%s is not valid base64", name)
	}
	return b, nil
}

// checkText refuses text the engine could not take whole.
func (s *Server) checkText(name, v string) error {
	if len(v) > s.cfg.MaxPromptBytes {
		return badRequest("%s is %d bytes; at most %d are allowed (CLIP reads the first 75 tokens)", name, len(v), s.cfg.MaxPromptBytes)
	}
	if strings.IndexByte(v, 0) >= 0 {
		return badRequest("%s contains a NUL character", name)
	}
	if !utf8.ValidString(v) {
		return badRequest("%s is not valid UTF-8", name)
	}
	return nil
}

// checkImage checks an uploaded image against the limits from its header
// alone, before anything is decoded.
func (s *Server) checkImage(name string, data []byte) (image.Config, error) {
	cfg, _, err := pipeline.CheckImage(data, s.cfg.MaxPixels)
	if err != nil {
		return cfg, badRequest("%s: %v", name, err)
	}
	return cfg, nil
}

// decodeFully decodes an image whose header passed checkImage, so that a
// truncated or corrupt body is refused at submission, not after the 202.
// Decodes take a slot of s.decodes: the memory they need stays bounded however
// many requests arrive at once.
func (s *Server) decodeFully(name string, data []byte) (image.Rectangle, error) {
	s.decodes <- struct{}{}
	defer func() { <-s.decodes }()
	img, err := pipeline.DecodeImage(data, s.cfg.MaxPixels)
	if err != nil {
		return image.Rectangle{}, badRequest("%s: %v", name, err)
	}
	return img.Bounds(), nil
}

// validate checks a job's parameters against the server's limits and fills
// defaults; its errors are 400s. Everything a job could fail on because of
// its input is found here, before the job is queued.
func (s *Server) validate(kind string, p *JobParams) (*decoded, error) {
	if !jobKinds[kind] {
		return nil, badRequest("unknown kind %q (want txt2img, img2img, inpaint, segment or edit)", kind)
	}
	for _, t := range []struct{ name, v string }{{"prompt", p.Prompt}, {"negative_prompt", p.NegativePrompt}} {
		if err := s.checkText(t.name, t.v); err != nil {
			return nil, err
		}
	}
	if kind != "segment" && strings.TrimSpace(p.Prompt) == "" {
		return nil, badRequest("prompt is empty")
	}
	if err := s.checkNumbers(kind, p); err != nil {
		return nil, err
	}
	d := &decoded{}
	var err error
	if d.sampler, err = ParseSampler(p.SamplerName); err != nil {
		return nil, badRequest("%v", err)
	}
	if d.preview, err = binding.ParsePreview(p.Preview); err != nil {
		return nil, badRequest("%v", err)
	}
	if kind != "segment" {
		if d.sdPath, err = s.resolveModel(p.Model); err != nil {
			return nil, err
		}
		if d.vaePath, err = s.resolveVAE(p.VAE); err != nil {
			return nil, err
		}
		if d.backend, err = s.resolveBackend(p.Backend); err != nil {
			return nil, err
		}
	}
	if err := s.checkInputs(kind, p, d); err != nil {
		return nil, err
	}
	if p.Seed < 0 {
		var b [4]byte
		rand.Read(b[:])
		p.Seed = int64(binary.BigEndian.Uint32(b[:]))
	}
	d.seed = uint64(p.Seed)
	return d, nil
}

// checkNumbers bounds every numeric parameter.
func (s *Server) checkNumbers(kind string, p *JobParams) error {
	side := func(name string, v int, zeroOK bool) error {
		if (v == 0 && zeroOK) || (v >= 8 && v <= s.cfg.MaxSide && v%8 == 0) {
			return nil
		}
		return badRequest("%s must be a multiple of 8 from 8 to %d (got %d)", name, s.cfg.MaxSide, v)
	}
	// A left-out width or height is 0: txt2img then makes 512, the others
	// take the image's size (checked against max-size with the image).
	for _, f := range []struct {
		name string
		v    int
	}{{"width", p.Width}, {"height", p.Height}, {"working_size", p.WorkingSize}} {
		if err := side(f.name, f.v, true); err != nil {
			return err
		}
	}
	switch {
	case p.Steps < 1 || p.Steps > s.cfg.MaxSteps:
		return badRequest("steps must be between 1 and %d (got %d)", s.cfg.MaxSteps, p.Steps)
	case p.BatchSize < 1 || p.BatchSize > s.cfg.MaxBatch:
		return badRequest("batch_size must be between 1 and %d (got %d)", s.cfg.MaxBatch, p.BatchSize)
	case !finite32(p.CFGScale) || p.CFGScale < 0 || p.CFGScale > maxCFGScale:
		return badRequest("cfg_scale must be between 0 and %d", maxCFGScale)
	case !finite32(p.DenoisingStrength) || p.DenoisingStrength < 0 || p.DenoisingStrength > 1:
		return badRequest("denoising_strength must be in (0, 1] (0: the kind's default)")
	case math.IsNaN(p.MaskBlur) || p.MaskBlur < 0 || p.MaskBlur > maxMaskBlur:
		return badRequest("mask_blur must be between 0 and %d", maxMaskBlur)
	case p.PreviewEvery < 1 || p.PreviewEvery > maxPreviewEvery:
		return badRequest("preview_every must be between 1 and %d", maxPreviewEvery)
	case p.Seed > maxSeed || p.Seed < -1:
		return badRequest("seed must be -1 (random) or between 0 and %d", int64(maxSeed))
	case p.Grow < -s.cfg.MaxSide || p.Grow > s.cfg.MaxSide:
		return badRequest("grow must be between -%d and %d pixels", s.cfg.MaxSide, s.cfg.MaxSide)
	case math.IsNaN(p.SegmentScale) || p.SegmentScale < 0 || p.SegmentScale > maxSegmentScale:
		return badRequest("segment_scale must be in (0, %d] (0: 0.5)", maxSegmentScale)
	case len(p.Classes) > maxClasses:
		return badRequest("classes lists %d classes; at most %d", len(p.Classes), maxClasses)
	}
	return nil
}

func finite32(v float32) bool { return !math.IsNaN(float64(v)) && !math.IsInf(float64(v), 0) }

// checkInputs decodes the images a job needs and checks them, and everything
// that depends on them, against the limits.
func (s *Server) checkInputs(kind string, p *JobParams, d *decoded) error {
	var err error
	if p.Image != "" {
		if d.image, err = decodeB64("image", p.Image); err != nil {
			return err
		}
	}
	if p.Mask != "" {
		if d.mask, err = decodeB64("mask", p.Mask); err != nil {
			return err
		}
	}
	switch kind {
	case "txt2img":
		if d.image != nil || d.mask != nil {
			return badRequest("txt2img takes no image or mask (use img2img or inpaint)")
		}
		return nil
	case "img2img", "segment", "edit":
		if d.image == nil {
			return badRequest("%s needs an image", kind)
		}
		if d.mask != nil {
			return badRequest("%s takes no mask (use inpaint)", kind)
		}
	case "inpaint":
		if d.image == nil || d.mask == nil {
			return badRequest("inpaint needs an image and a mask")
		}
	}
	// Headers first: nothing is decoded before every limit is known to hold.
	imgCfg, err := s.checkImage("image", d.image)
	if err != nil {
		return err
	}
	if d.mask != nil {
		maskCfg, err := s.checkImage("mask", d.mask)
		if err != nil {
			return err
		}
		if maskCfg.Width != imgCfg.Width || maskCfg.Height != imgCfg.Height {
			return badRequest("the mask is %dx%d, the image %dx%d: they must be the same size",
				maskCfg.Width, maskCfg.Height, imgCfg.Width, imgCfg.Height)
		}
	}
	switch kind {
	case "img2img", "inpaint":
		// The output takes the image's size unless width/height say otherwise.
		w, h := p.Width, p.Height
		if w == 0 {
			w = imgCfg.Width / 8 * 8
		}
		if h == 0 {
			h = imgCfg.Height / 8 * 8
		}
		if w < 8 || h < 8 || w > s.cfg.MaxSide || h > s.cfg.MaxSide {
			return badRequest("the image is %dx%d: the output would be %dx%d, outside 8..%d (give width and height to resize it)",
				imgCfg.Width, imgCfg.Height, w, h, s.cfg.MaxSide)
		}
		if err := checkStrength(kind, p); err != nil {
			return err
		}
	case "segment", "edit":
		if err := s.checkSegment(kind, p, imgCfg); err != nil {
			return err
		}
	}
	if _, err := s.decodeFully("image", d.image); err != nil {
		return err
	}
	if d.mask != nil {
		if _, err := s.decodeFully("mask", d.mask); err != nil {
			return err
		}
	}
	return nil
}

// checkStrength refuses a denoising strength that leaves no step to run: the
// engine runs the last int(steps × strength) of the steps.
func checkStrength(kind string, p *JobParams) error {
	strength := p.DenoisingStrength
	if strength == 0 {
		strength = pipeline.DefaultStrength(kind == "inpaint")
	}
	if strength < 1 && int64(float64(p.Steps)*float64(strength)) < 1 {
		return badRequest("denoising_strength %g of %d steps leaves no step to run: raise steps or the strength", strength, p.Steps)
	}
	return nil
}

// checkSegment checks what segmentation will do with an image of size cfg.
func (s *Server) checkSegment(kind string, p *JobParams, cfg image.Config) error {
	if s.cfg.SegModel == "" {
		return badRequest("no segmentation model is configured (stepwise serve --seg-model)")
	}
	scale := p.SegmentScale
	if scale == 0 {
		scale = pipeline.DefaultSegmentScale
	}
	w, h := int(scale*float64(cfg.Width)), int(scale*float64(cfg.Height))
	if int64(w)*int64(h) > int64(s.cfg.MaxPixels) {
		return badRequest("segment_scale %g makes the %dx%d image %dx%d, more than the %d pixels allowed",
			scale, cfg.Width, cfg.Height, w, h, s.cfg.MaxPixels)
	}
	if w < pipeline.MinSegmentSide || h < pipeline.MinSegmentSide {
		return badRequest("the image is %dx%d; at segment_scale %g the segmentation model needs at least %dx%d",
			cfg.Width, cfg.Height, scale, int(math.Ceil(pipeline.MinSegmentSide/scale)), int(math.Ceil(pipeline.MinSegmentSide/scale)))
	}
	if len(p.Classes) > 0 {
		n, err := s.segClasses()
		if err != nil {
			return err
		}
		for _, c := range p.Classes {
			if c < 0 || c >= n {
				return badRequest("class %d is out of range: the segmentation model has classes 0..%d", c, n-1)
			}
		}
	}
	return nil
}

// readJob parses a job request: JSON ({"kind": ..., params}) or multipart
// (form fields and "image" / "mask" files).
func readJob(r *http.Request) (string, JobParams, error) {
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if ct == "multipart/form-data" {
		return readMultipartJob(r)
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return "", JobParams{}, bodyError(err)
	}
	return decodeJobJSON(body)
}

// decodeJobJSON decodes a JSON job request on top of DefaultParams.
func decodeJobJSON(body []byte) (string, JobParams, error) {
	p := DefaultParams()
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return "", p, badRequest("invalid JSON: %v", err)
	}
	var kind string
	if raw, ok := fields["kind"]; ok {
		if err := json.Unmarshal(raw, &kind); err != nil {
			return "", p, badRequest("kind must be a string")
		}
	}
	if err := json.Unmarshal(body, &p); err != nil {
		return "", p, badRequest("invalid parameters: %v", err)
	}
	for name, raw := range fields {
		if err := refuseZeroSize(name, string(raw)); err != nil {
			return "", p, err
		}
	}
	return kind, p, nil
}

// refuseZeroSize tells a left-out width or height (the default applies) from
// a field given as 0, which is no size at all; value is the field's text as
// the request gave it.
func refuseZeroSize(name, value string) error {
	if (name == "width" || name == "height") && strings.TrimSpace(value) == "0" {
		return badRequest("%s is 0: leave it out for the default", name)
	}
	return nil
}

// bodyError turns a failure to read a request body into an API error: too
// large is 413, anything else (a broken chunked encoding, a client gone) 400.
func bodyError(err error) error {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return &apiError{status: http.StatusRequestEntityTooLarge, msg: fmt.Sprintf("the request body is larger than %d bytes", mbe.Limit)}
	}
	return badRequest("could not read the request body: %v", err)
}

// multipartMemory is how much of a multipart form is held in memory; the rest
// of the (MaxBodyBytes-bounded) upload waits in temporary files.
const multipartMemory = 8 << 20

// readMultipartJob reads form fields by the type of the JobParams field they
// name, so "true" stays a string in a prompt and "12" a number in steps.
func readMultipartJob(r *http.Request) (string, JobParams, error) {
	p := DefaultParams()
	if err := r.ParseMultipartForm(multipartMemory); err != nil {
		return "", p, bodyError(err)
	}
	defer r.MultipartForm.RemoveAll()
	fields := map[string]reflect.Value{}
	pv := reflect.ValueOf(&p).Elem()
	for i := 0; i < pv.NumField(); i++ {
		name, _, _ := strings.Cut(pv.Type().Field(i).Tag.Get("json"), ",")
		fields[name] = pv.Field(i)
	}
	kind := ""
	for k, vs := range r.MultipartForm.Value {
		if len(vs) == 0 {
			continue
		}
		v := vs[0]
		if k == "kind" {
			kind = v
			continue
		}
		f, ok := fields[k]
		if !ok || k == "image" || k == "mask" {
			continue // unknown fields are ignored, as in JSON
		}
		if err := setField(f, v); err != nil {
			return "", p, badRequest("form field %s: %v", k, err)
		}
		if err := refuseZeroSize(k, v); err != nil {
			return "", p, err
		}
	}
	for _, name := range []string{"image", "mask"} {
		if fh := r.MultipartForm.File[name]; len(fh) > 0 {
			f, err := fh[0].Open()
			if err != nil {
				return "", p, badRequest("read %s: %v", name, err)
			}
			b, err := io.ReadAll(f)
			f.Close()
			if err != nil {
				return "", p, bodyError(err)
			}
			fields[name].SetString(base64.StdEncoding.EncodeToString(b))
		} else if vs := r.MultipartForm.Value[name]; len(vs) > 0 {
			fields[name].SetString(vs[0])
		}
	}
	return kind, p, nil
}

// setField parses a form value into a field of JobParams by the field's type.
func setField(f reflect.Value, v string) error {
	v = strings.TrimSpace(v)
	switch f.Kind() {
	case reflect.String:
		f.SetString(v)
	case reflect.Int, reflect.Int64:
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return fmt.Errorf("%q is not an integer", v)
		}
		f.SetInt(n)
	case reflect.Float32, reflect.Float64:
		n, err := strconv.ParseFloat(v, 64)
		if err != nil {
			return fmt.Errorf("%q is not a number", v)
		}
		f.SetFloat(n)
	case reflect.Bool:
		b, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("%q is not true or false", v)
		}
		f.SetBool(b)
	case reflect.Slice: // classes: "1,2" or "[1,2]"
		var out []int
		for _, part := range strings.FieldsFunc(strings.Trim(v, "[]"), func(r rune) bool { return r == ',' || r == ' ' }) {
			n, err := strconv.Atoi(part)
			if err != nil {
				return fmt.Errorf("%q is not a list of integers", v)
			}
			if len(out) == maxClasses {
				return fmt.Errorf("more than %d entries", maxClasses)
			}
			out = append(out, n)
		}
		f.Set(reflect.ValueOf(out))
	default:
		return fmt.Errorf("unsupported field")
	}
	return nil
}
