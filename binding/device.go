package binding

import (
	"fmt"
	"strings"
)

// DeviceKind is the kind of a compute device.
type DeviceKind int32

// Device kinds, as in sw_device_kind.
const (
	CPU  DeviceKind = 0
	CUDA DeviceKind = 1
	MPS  DeviceKind = 2
)

func (k DeviceKind) String() string {
	switch k {
	case CUDA:
		return "cuda"
	case MPS:
		return "mps"
	default:
		return "cpu"
	}
}

// Device is one compute device the engine can use.
type Device struct {
	Kind        DeviceKind `json:"kind"`
	Index       int        `json:"index"`
	ID          string     `json:"id"`           // "cpu", "cuda:0", "mps"
	Name        string     `json:"name"`         // hardware name
	TotalMemory int64      `json:"total_memory"` // bytes; -1 when unknown
	FreeMemory  int64      `json:"free_memory"`  // bytes; -1 when unknown
}

// Devices lists the devices present, cpu first.
func (l *Library) Devices() ([]Device, error) {
	n := l.fn.deviceCount()
	out := make([]Device, 0, n)
	for i := int32(0); i < n; i++ {
		var d cDeviceInfo
		var ce cError
		if err := check("sw_device_get", l.fn.deviceGet(i, &d, &ce), &ce); err != nil {
			return nil, err
		}
		out = append(out, Device{
			Kind:        DeviceKind(d.Kind),
			Index:       int(d.Index),
			ID:          cString(d.ID[:]),
			Name:        cString(d.Name[:]),
			TotalMemory: d.TotalMemory,
			FreeMemory:  d.FreeMemory,
		})
	}
	return out, nil
}

// SelectDevice picks the device named by want from devices: "" or "auto"
// prefers cuda:0, then mps, then cpu; "cuda" means cuda:0.
func SelectDevice(devices []Device, want string) (Device, error) {
	want = strings.ToLower(strings.TrimSpace(want))
	if want == "" || want == "auto" {
		for _, kind := range []DeviceKind{CUDA, MPS, CPU} {
			for _, d := range devices {
				if d.Kind == kind {
					return d, nil
				}
			}
		}
		return Device{}, fmt.Errorf("select device: the engine reports no devices")
	}
	if want == "cuda" {
		want = "cuda:0"
	}
	ids := make([]string, len(devices))
	for i, d := range devices {
		if d.ID == want {
			return d, nil
		}
		ids[i] = d.ID
	}
	return Device{}, fmt.Errorf("select device %q: not present (available: %s)", want, strings.Join(ids, ", "))
}
