package binding

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"
)

// ABIVersion is the SW_ABI_VERSION this package was written for. A library
// reporting another version is refused.
const ABIVersion = 3

// Mirrors of the structs in stepwise.h. Field order, sizes and padding match
// the C layout on 64-bit platforms; they change only with ABIVersion.

const errorMessageSize = 2048

type cError struct {
	Status  int32
	Message [errorMessageSize]byte
}

type cDeviceInfo struct {
	Kind        int32
	Index       int32
	ID          [32]byte
	Name        [128]byte
	TotalMemory int64
	FreeMemory  int64
}

type cModelInfo struct {
	ParamCount  int64
	WeightBytes int64
	DType       int32
	Device      [32]byte
	Arch        [128]byte
}

type cSDModelParams struct {
	Path         *byte
	TokenizerDir *byte
	Device       *byte
	DType        int32
	VAEPath      *byte
	Backend      int32
}

type cSegModelParams struct {
	Path   *byte
	Device *byte
	DType  int32
}

type cSegArch struct {
	InChannels int32
	Classes    int32
	BaseWidth  int32
	Bilinear   int32
}

// Status is an sw_status code returned by the engine.
type Status int32

// The engine's status codes.
const (
	StatusOK              Status = 0
	StatusInvalidArgument Status = 1
	StatusNotFound        Status = 2
	StatusIO              Status = 3
	StatusFormat          Status = 4
	StatusUnsupported     Status = 5
	StatusOutOfMemory     Status = 6
	StatusDevice          Status = 7
	StatusCancelled       Status = 8
	StatusInternal        Status = 9
)

// Sentinel errors, one per status; an *Error matches its own with errors.Is.
var (
	ErrInvalidArgument = errors.New("invalid argument")
	ErrNotFound        = errors.New("not found")
	ErrIO              = errors.New("i/o error")
	ErrFormat          = errors.New("malformed file")
	ErrUnsupported     = errors.New("unsupported")
	ErrOutOfMemory     = errors.New("out of memory")
	ErrDevice          = errors.New("device error")
	ErrCancelled       = errors.New("cancelled")
	ErrInternal        = errors.New("internal engine error")
)

var statusErrors = map[Status]error{
	StatusInvalidArgument: ErrInvalidArgument,
	StatusNotFound:        ErrNotFound,
	StatusIO:              ErrIO,
	StatusFormat:          ErrFormat,
	StatusUnsupported:     ErrUnsupported,
	StatusOutOfMemory:     ErrOutOfMemory,
	StatusDevice:          ErrDevice,
	StatusCancelled:       ErrCancelled,
	StatusInternal:        ErrInternal,
}

// Error is a failure reported by the engine: the status and the message the
// failing call wrote.
type Error struct {
	Op      string // the C function, e.g. "sw_sd_model_open"
	Status  Status
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Op, e.Message) }

// Unwrap returns the sentinel error of the status, for errors.Is.
func (e *Error) Unwrap() error {
	if s, ok := statusErrors[e.Status]; ok {
		return s
	}
	return ErrInternal
}

// check turns a status and the call's error struct into a Go error.
func check(op string, status int32, ce *cError) error {
	if Status(status) == StatusOK {
		return nil
	}
	msg := cString(ce.Message[:])
	if msg == "" {
		msg = fmt.Sprintf("status %d", status)
	}
	return &Error{Op: op, Status: Status(status), Message: msg}
}

// cString reads a NUL-terminated string out of a fixed buffer.
func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// goString copies a NUL-terminated C string owned by the library.
func goString(p *byte) string {
	if p == nil {
		return ""
	}
	n := 0
	for *(*byte)(unsafe.Add(unsafe.Pointer(p), n)) != 0 {
		n++
	}
	return string(unsafe.Slice(p, n))
}

// cStr returns a NUL-terminated copy of s for a params struct; the caller pins
// it for the duration of the call.
func cStr(s string) []byte {
	b := make([]byte, len(s)+1)
	copy(b, s)
	return b
}

// pinStr is cStr pinned with pin, as the pointer a params struct holds.
func pinStr(pin *runtime.Pinner, s string) *byte {
	b := cStr(s)
	pin.Pin(&b[0])
	return &b[0]
}
