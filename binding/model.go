package binding

import (
	"fmt"
	"runtime"
	"sync"
)

// ModelInfo describes a loaded model.
type ModelInfo struct {
	Params      int64  `json:"params"`
	WeightBytes int64  `json:"weight_bytes"`
	DType       DType  `json:"-"`
	Device      string `json:"device"`
	Arch        string `json:"arch"`
}

func modelInfo(ci *cModelInfo) ModelInfo {
	return ModelInfo{
		Params:      ci.ParamCount,
		WeightBytes: ci.WeightBytes,
		DType:       DType(ci.DType),
		Device:      cString(ci.Device[:]),
		Arch:        cString(ci.Arch[:]),
	}
}

// SDOptions say which Stable Diffusion model to open and how.
type SDOptions struct {
	// Path is a diffusers folder or a single-file .safetensors checkpoint.
	Path string
	// TokenizerDir overrides the tokenizer. Empty: a diffusers folder's own
	// tokenizer/, else the CLIP vocabulary built into the engine.
	TokenizerDir string
	Device       string // empty: the library's selected device
	DType        DType
	// VAEPath replaces the model's VAE: a .safetensors file (LDM or diffusers
	// keys) or a diffusers VAE folder, of the model's VAE architecture.
	VAEPath string
}

// SDModel is an open Stable Diffusion model. Generation calls on one model are
// serialised: the engine allows one at a time per handle.
type SDModel struct {
	lib    *Library
	mu     sync.Mutex // held for every call that uses handle
	handle uintptr
	info   ModelInfo
	path   string
}

// OpenSD loads every component of a Stable Diffusion model.
func (l *Library) OpenSD(o SDOptions) (*SDModel, error) {
	if o.Path == "" {
		return nil, fmt.Errorf("open model: empty path")
	}
	device := o.Device
	if device == "" {
		device = l.device.ID
	}
	var p cSDModelParams
	l.fn.sdDefaultParams(&p)
	var pin runtime.Pinner
	defer pin.Unpin()
	path, dev := cStr(o.Path), cStr(device)
	pin.Pin(&path[0])
	pin.Pin(&dev[0])
	p.Path, p.Device, p.DType = &path[0], &dev[0], int32(o.DType)
	if o.TokenizerDir != "" {
		tok := cStr(o.TokenizerDir)
		pin.Pin(&tok[0])
		p.TokenizerDir = &tok[0]
	}
	if o.VAEPath != "" {
		vae := cStr(o.VAEPath)
		pin.Pin(&vae[0])
		p.VAEPath = &vae[0]
	}
	var h uintptr
	var ce cError
	if err := check("sw_sd_model_open", l.fn.sdOpen(&p, &h, &ce), &ce); err != nil {
		return nil, fmt.Errorf("open model %s: %w", o.Path, err)
	}
	m := &SDModel{lib: l, handle: h, path: o.Path}
	var ci cModelInfo
	if err := check("sw_sd_model_info", l.fn.sdInfo(h, &ci, &ce), &ce); err != nil {
		l.fn.sdClose(h)
		return nil, fmt.Errorf("open model %s: %w", o.Path, err)
	}
	m.info = modelInfo(&ci)
	return m, nil
}

// Info describes the loaded model.
func (m *SDModel) Info() ModelInfo { return m.info }

// Path is the folder or file the model was loaded from.
func (m *SDModel) Path() string { return m.path }

// Close frees the model; it waits for a call in progress. Closing twice is a no-op.
func (m *SDModel) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.handle != 0 {
		m.lib.fn.sdClose(m.handle)
		m.handle = 0
	}
	return nil
}

// SegOptions say which segmentation model to open and how.
type SegOptions struct {
	Path   string // a .safetensors file in the Pytorch-UNet layout
	Device string // empty: the library's selected device
	DType  DType
}

// SegModel is an open segmentation U-Net; calls on one model are serialised.
type SegModel struct {
	lib    *Library
	mu     sync.Mutex
	handle uintptr
	info   ModelInfo
	path   string
}

// OpenSeg loads a segmentation U-Net.
func (l *Library) OpenSeg(o SegOptions) (*SegModel, error) {
	if o.Path == "" {
		return nil, fmt.Errorf("open segmentation model: empty path")
	}
	device := o.Device
	if device == "" {
		device = l.device.ID
	}
	var p cSegModelParams
	l.fn.segDefaultParams(&p)
	var pin runtime.Pinner
	defer pin.Unpin()
	path, dev := cStr(o.Path), cStr(device)
	pin.Pin(&path[0])
	pin.Pin(&dev[0])
	p.Path, p.Device = &path[0], &dev[0]
	if o.DType != DTypeAuto {
		p.DType = int32(o.DType)
	}
	var h uintptr
	var ce cError
	if err := check("sw_seg_model_open", l.fn.segOpen(&p, &h, &ce), &ce); err != nil {
		return nil, fmt.Errorf("open segmentation model %s: %w", o.Path, err)
	}
	m := &SegModel{lib: l, handle: h, path: o.Path}
	var ci cModelInfo
	if err := check("sw_seg_model_info", l.fn.segInfo(h, &ci, &ce), &ce); err != nil {
		l.fn.segClose(h)
		return nil, fmt.Errorf("open segmentation model %s: %w", o.Path, err)
	}
	m.info = modelInfo(&ci)
	return m, nil
}

// Info describes the loaded model.
func (m *SegModel) Info() ModelInfo { return m.info }

// Path is the file the model was loaded from.
func (m *SegModel) Path() string { return m.path }

// Close frees the model; it waits for a call in progress. Closing twice is a no-op.
func (m *SegModel) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.handle != 0 {
		m.lib.fn.segClose(m.handle)
		m.handle = 0
	}
	return nil
}

// WriteRandomSD writes deterministic random float32 weights for the diffusers
// folder dir, whose unet/, vae/ and text_encoder/ already hold config.json.
func (l *Library) WriteRandomSD(dir string, seed uint64) error {
	var ce cError
	if err := check("sw_sd_write_random_weights", l.fn.sdWriteRandom(dir, seed, &ce), &ce); err != nil {
		return fmt.Errorf("write random weights to %s: %w", dir, err)
	}
	return nil
}

// SegArch is the shape of a segmentation U-Net to create.
type SegArch struct {
	InChannels int  // 3 for RGB
	Classes    int  // 1: sigmoid; more: argmax
	BaseWidth  int  // 64 in the original project
	Bilinear   bool // bilinear upsampling instead of transposed convolutions
}

// WriteRandomSeg writes a random-weight segmentation U-Net to path.
func (l *Library) WriteRandomSeg(path string, a SegArch, seed uint64) error {
	ca := cSegArch{InChannels: int32(a.InChannels), Classes: int32(a.Classes), BaseWidth: int32(a.BaseWidth)}
	if a.Bilinear {
		ca.Bilinear = 1
	}
	var ce cError
	if err := check("sw_seg_write_random_weights", l.fn.segWriteRandom(path, &ca, seed, &ce), &ce); err != nil {
		return fmt.Errorf("write random segmentation model to %s: %w", path, err)
	}
	return nil
}
