package binding

import (
	"fmt"
	"strings"
)

// DType is the floating-point type model weights are loaded in.
type DType int32

// Data types, as in sw_dtype.
const (
	DTypeAuto DType = 0 // float32 on cpu, float16 on cuda and mps
	F32       DType = 1
	F16       DType = 2
	BF16      DType = 3
	// ggml's block-quantised types, for the sdcpp backend only.
	Q8_0 DType = 4
	Q5_0 DType = 5
	Q4_0 DType = 6
	// INT8 is libtorch on the cpu with the UNet's linear layers in int8
	// (per-channel weight scales, activations quantized per call); the rest
	// computes in float32.
	INT8 DType = 7
)

func (t DType) String() string {
	switch t {
	case F32:
		return "f32"
	case F16:
		return "f16"
	case BF16:
		return "bf16"
	case Q8_0:
		return "q8_0"
	case Q5_0:
		return "q5_0"
	case Q4_0:
		return "q4_0"
	case INT8:
		return "int8"
	default:
		return "auto"
	}
}

// ParseDType reads "auto", "f32"/"float32"/"fp32", "f16"/"float16"/"fp16",
// "bf16"/"bfloat16", "int8" (libtorch on the cpu), or (sdcpp backend only)
// "q8_0", "q5_0", "q4_0".
func ParseDType(s string) (DType, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "auto":
		return DTypeAuto, nil
	case "f32", "fp32", "float32", "float":
		return F32, nil
	case "f16", "fp16", "float16", "half":
		return F16, nil
	case "bf16", "bfloat16":
		return BF16, nil
	case "q8_0":
		return Q8_0, nil
	case "q5_0":
		return Q5_0, nil
	case "q4_0":
		return Q4_0, nil
	case "int8":
		return INT8, nil
	}
	return DTypeAuto, fmt.Errorf("unknown dtype %q (want auto, f32, f16, bf16, int8, q8_0, q5_0 or q4_0)", s)
}

// Resolve maps DTypeAuto to the default for a device kind.
func (t DType) Resolve(kind DeviceKind) DType {
	if t != DTypeAuto {
		return t
	}
	if kind == CPU {
		return F32
	}
	return F16
}
