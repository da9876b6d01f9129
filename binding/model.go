package binding

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"
)

// ModelInfo describes a loaded model.
type ModelInfo struct {
	Params      int64  `json:"params"`
	WeightBytes int64  `json:"weight_bytes"` // held in memory: a lookup table left in the file mapping is not counted
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

// cancelRetry is how often a cancelled context asks the engine again to stop
// until the call returns: a cancel that races with the start of a native call
// may be cleared by that start (see sw_sd_model_cancel).
const cancelRetry = 100 * time.Millisecond

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
	// Backend runs the model: BackendLibtorch (the zero value) or
	// BackendSDCPP (stable-diffusion.cpp: SD 1.x, cpu; see
	// docs/engine.md).
	Backend Backend
}

// SegOptions say which segmentation model to open and how.
type SegOptions struct {
	Path   string // a .safetensors file in the Pytorch-UNet layout
	Device string // empty: the library's selected device
	DType  DType
}

// SDModel is an open Stable Diffusion model. Generation calls on one model are
// serialised: the engine allows one at a time per handle.
type SDModel struct{ *model }

// SegModel is an open segmentation U-Net; calls on one model are serialised.
type SegModel struct{ *model }

// model is what SDModel and SegModel share: the native handle behind a lock
// that keeps to one call at a time, what it was opened from, and the handle's
// close and cancel functions.
type model struct {
	lib    *Library
	mu     sync.Mutex // held for every call that uses handle
	handle uintptr
	info   ModelInfo
	path   string
	free   func(uintptr)
	cancel func(uintptr)
}

// openModel runs a model kind's native open (which fills its params, pinning
// what they point to) and info calls, freeing the handle when info fails, and
// wraps the model as the kind's Go type. what and path name it in errors.
func openModel[T any](l *Library, kind, what, path string, free, cancel func(uintptr),
	info func(h uintptr, out *cModelInfo, ce *cError) int32,
	open func(pin *runtime.Pinner, out *uintptr, ce *cError) int32, wrap func(*model) T) (T, error) {
	var zero T
	if path == "" {
		return zero, fmt.Errorf("open %s: empty path", what)
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	var h uintptr
	var ce cError
	if err := check("sw_"+kind+"_model_open", open(&pin, &h, &ce), &ce); err != nil {
		return zero, fmt.Errorf("open %s %s: %w", what, path, err)
	}
	var ci cModelInfo
	if err := check("sw_"+kind+"_model_info", info(h, &ci, &ce), &ce); err != nil {
		free(h)
		return zero, fmt.Errorf("open %s %s: %w", what, path, err)
	}
	return wrap(&model{lib: l, handle: h, info: modelInfo(&ci), path: path, free: free, cancel: cancel}), nil
}

// Info describes the loaded model.
func (m *model) Info() ModelInfo { return m.info }

// Path is what the model was loaded from.
func (m *model) Path() string { return m.path }

// Close frees the model; it waits for a call in progress. Closing twice is a no-op.
func (m *model) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.handle != 0 {
		m.free(m.handle)
		m.handle = 0
	}
	return nil
}

// call is the preamble of every native call on a model: it takes the lock,
// refuses a closed model, gives f a pinner for what its params point to, and
// while f runs, turns ctx's cancellation into the engine's own cancel, which
// stops the call inside a denoising step or between network blocks rather
// than only between steps. The watcher is gone when call returns.
func call[T any](ctx context.Context, m *model, f func(h uintptr, pin *runtime.Pinner) (T, error)) (T, error) {
	var zero T
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.handle == 0 {
		return zero, ErrModelClosed
	}
	if ctx.Done() != nil {
		done := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go m.cancelOnDone(ctx, m.handle, done, &wg)
		defer func() {
			close(done)
			wg.Wait()
		}()
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	res, err := f(m.handle, &pin)
	if errors.Is(err, ErrCancelled) && ctx.Err() != nil {
		// The caller's reason (canceled, deadline) matches too.
		err = fmt.Errorf("%w (%w)", err, ctx.Err())
	}
	return res, err
}

// cancelOnDone asks the engine to stop the call on h once ctx is done, and
// again every cancelRetry until done is closed.
func (m *model) cancelOnDone(ctx context.Context, h uintptr, done <-chan struct{}, wg *sync.WaitGroup) {
	defer wg.Done()
	select {
	case <-done:
		return
	case <-ctx.Done():
	}
	tick := time.NewTicker(cancelRetry)
	defer tick.Stop()
	for {
		m.cancel(h)
		select {
		case <-done:
			return
		case <-tick.C:
		}
	}
}

// OpenSD loads every component of a Stable Diffusion model.
func (l *Library) OpenSD(o SDOptions) (*SDModel, error) {
	return openModel(l, "sd", "model", o.Path, l.fn.sdClose, l.fn.sdCancel, l.fn.sdInfo,
		func(pin *runtime.Pinner, out *uintptr, ce *cError) int32 {
			var p cSDModelParams
			l.fn.sdDefaultParams(&p)
			p.TokenizerDir = pinStr(pin, o.TokenizerDir) // empty: the model's own
			p.VAEPath = pinStr(pin, o.VAEPath)           // empty: the model's own
			device := o.Device
			if device == "" {
				device = o.Backend.DefaultDevice()
			}
			device = l.deviceOr(device)
			p.Path, p.Device, p.DType = pinStr(pin, o.Path), pinStr(pin, device), int32(o.DType)
			p.Backend = int32(o.Backend)
			return l.fn.sdOpen(&p, out, ce)
		}, func(m *model) *SDModel { return &SDModel{m} })
}

// OpenSeg loads a segmentation U-Net.
func (l *Library) OpenSeg(o SegOptions) (*SegModel, error) {
	return openModel(l, "seg", "segmentation model", o.Path, l.fn.segClose, l.fn.segCancel, l.fn.segInfo,
		func(pin *runtime.Pinner, out *uintptr, ce *cError) int32 {
			var p cSegModelParams
			l.fn.segDefaultParams(&p)
			// The engine opens segmentation models in float32 when asked for auto.
			p.Path, p.Device, p.DType = pinStr(pin, o.Path), pinStr(pin, l.deviceOr(o.Device)), int32(o.DType)
			return l.fn.segOpen(&p, out, ce)
		}, func(m *model) *SegModel { return &SegModel{m} })
}

// deviceOr is device, or the library's selected device when it is empty.
func (l *Library) deviceOr(device string) string {
	if device == "" {
		return l.device.ID
	}
	return device
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
