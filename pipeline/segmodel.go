package pipeline

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/stepwise-sd/stepwise/internal/regfile"
)

// maxHeaderBytes bounds a safetensors header read for its shapes alone.
const maxHeaderBytes = 100 << 20

// SegModelClasses reads a segmentation U-Net's class count from the shape of
// its output convolution in a .safetensors header, without loading the
// weights. Class ids 0..n-1 are valid; a one-class (sigmoid) model has the
// two labels 0 and 1, as the engine counts them.
func SegModelClasses(path string) (int, error) {
	f, _, err := regfile.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var n uint64
	if err := binary.Read(f, binary.LittleEndian, &n); err != nil {
		return 0, fmt.Errorf("%s: truncated safetensors header: %w", path, err)
	}
	if n > maxHeaderBytes {
		return 0, fmt.Errorf("%s: safetensors header of %d bytes is too large", path, n)
	}
	head := make([]byte, n)
	if _, err := io.ReadFull(f, head); err != nil {
		return 0, fmt.Errorf("%s: truncated safetensors header: %w", path, err)
	}
	var entries map[string]json.RawMessage
	if err := json.Unmarshal(head, &entries); err != nil {
		return 0, fmt.Errorf("%s: bad safetensors header: %w", path, err)
	}
	for name, raw := range entries {
		if !strings.HasSuffix(name, "outc.conv.weight") {
			continue
		}
		var e struct {
			Shape []int64 `json:"shape"`
		}
		if err := json.Unmarshal(raw, &e); err != nil || len(e.Shape) != 4 || e.Shape[0] < 1 {
			return 0, fmt.Errorf("%s: %s has no [classes, C, 1, 1] shape", path, name)
		}
		return int(max(e.Shape[0], 2)), nil
	}
	return 0, fmt.Errorf("%s: no outc.conv.weight: not a segmentation U-Net", path)
}
