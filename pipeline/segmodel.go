package pipeline

import (
	"fmt"
	"strings"

	"github.com/stepwise-sd/stepwise/internal/safetensors"
)

// SegModelClasses reads a segmentation U-Net's class count from the shape of
// its output convolution in a .safetensors header, without loading the
// weights. Class ids 0..n-1 are valid; a one-class (sigmoid) model has the
// two labels 0 and 1, as the engine counts them.
func SegModelClasses(path string) (int, error) {
	shapes, err := safetensors.ReadShapes(path)
	if err != nil {
		return 0, err
	}
	for name, shape := range shapes {
		if !strings.HasSuffix(name, "outc.conv.weight") {
			continue
		}
		if len(shape) != 4 || shape[0] < 1 {
			return 0, fmt.Errorf("%s: %s has no [classes, C, 1, 1] shape", path, name)
		}
		return int(max(shape[0], 2)), nil
	}
	return 0, fmt.Errorf("%s: no outc.conv.weight: not a segmentation U-Net", path)
}
