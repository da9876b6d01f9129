package modelcache

import (
	"fmt"

	"github.com/stepwise-sd/stepwise/binding"
)

// LibraryLoader loads models with the native engine.
type LibraryLoader struct {
	Lib *binding.Library
	// TokenizerDir overrides the tokenizer folder of SD models (single files).
	TokenizerDir string
}

// Device is the library's selected device for "", else the device name picks.
func (l LibraryLoader) Device(name string) (binding.Device, error) {
	if name == "" {
		return l.Lib.Device(), nil
	}
	devices, err := l.Lib.Devices()
	if err != nil {
		return binding.Device{}, err
	}
	return binding.SelectDevice(devices, name)
}

// BackendAvailable is the library's answer: nil, or why b cannot be used.
func (l LibraryLoader) BackendAvailable(b binding.Backend) error { return l.Lib.BackendAvailable(b) }

// Backends is the library's list of backends.
func (l LibraryLoader) Backends() []binding.BackendStatus { return l.Lib.Version().Backends }

// Load opens the model for k.
func (l LibraryLoader) Load(k Key) (Model, error) {
	// Each branch returns a nil interface on error, never a typed nil pointer.
	switch k.Kind {
	case KindSD:
		m, err := l.Lib.OpenSD(binding.SDOptions{Path: k.Path, TokenizerDir: l.TokenizerDir, Device: k.Device, DType: k.DType,
			VAEPath: k.VAE, Backend: k.Backend})
		if err != nil {
			return nil, err
		}
		return m, nil
	case KindSeg:
		m, err := l.Lib.OpenSeg(binding.SegOptions{Path: k.Path, Device: k.Device, DType: k.DType})
		if err != nil {
			return nil, err
		}
		return m, nil
	}
	return nil, fmt.Errorf("load %s: unknown model kind %d", k.Path, k.Kind)
}
