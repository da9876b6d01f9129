// Package binding is the Go side of the stepwise engine's C ABI
// (native/include/stepwise.h), called through purego so that stepwise builds
// with CGO_ENABLED=0.
//
// It is the only package that knows about the ABI: it finds and loads
// libstepwise.so, refuses a library built for another ABI version, selects the
// device once, turns C statuses into Go errors and owns the cache of loaded
// model handles. Nothing above it sees a pointer.
package binding
