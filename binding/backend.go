package binding

import (
	"fmt"
	"strings"
)

// Backend is the engine that runs a Stable Diffusion model, as in sw_backend.
type Backend int32

// The backends.
const (
	// BackendLibtorch is stepwise's own C++/libtorch engine (the default).
	BackendLibtorch Backend = 0
	// BackendSDCPP is stable-diffusion.cpp, opened at run time when the
	// library was built with it (see Library.BackendAvailable).
	BackendSDCPP Backend = 1
)

// Backends lists every backend, the default first.
func Backends() []Backend { return []Backend{BackendLibtorch, BackendSDCPP} }

func (b Backend) String() string {
	switch b {
	case BackendLibtorch:
		return "libtorch"
	case BackendSDCPP:
		return "sdcpp"
	}
	return fmt.Sprintf("backend(%d)", int32(b))
}

// DefaultDevice is the device a model of this backend opens on when none is
// named: "" (the library's selected device) for libtorch, "cpu" for sdcpp,
// which has no other device in this build (the library's selected device is
// libtorch's).
func (b Backend) DefaultDevice() string {
	if b == BackendSDCPP {
		return "cpu"
	}
	return ""
}

// MarshalText writes the backend's name.
func (b Backend) MarshalText() ([]byte, error) { return []byte(b.String()), nil }

// UnknownBackendError is ParseBackend's error for a name it does not know.
type UnknownBackendError struct{ Name string }

func (e *UnknownBackendError) Error() string {
	return fmt.Sprintf("unknown backend %q (want libtorch or sdcpp)", e.Name)
}

// ParseBackend reads "libtorch" (or "") and "sdcpp" (or "stable-diffusion.cpp").
func ParseBackend(s string) (Backend, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "libtorch", "torch":
		return BackendLibtorch, nil
	case "sdcpp", "stable-diffusion.cpp", "sd.cpp":
		return BackendSDCPP, nil
	}
	return BackendLibtorch, &UnknownBackendError{Name: s}
}
