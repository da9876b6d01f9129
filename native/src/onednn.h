// What the engine runs through oneDNN's own C++ API rather than through
// libtorch: Winograd convolutions, convolutions on kernels blocked at load,
// bfloat16 linear layers and strided copies on the CPU.
// Built only against oneDNN 2 (CMakeLists.txt says which); without it every
// function here reports that it does not apply.
//
// Winograd. libtorch runs every convolution with oneDNN's direct algorithm: it never asks
// for Winograd. For float32 3×3 convolutions oneDNN's Winograd F(4×4, 3×3)
// kernels (AVX-512) do the same work in ~2.5× less time on this project's
// machine (2 threads: [1, 128, 256, 256] 34 ms against 85 ms direct) and agree
// with the direct result to ~2e-6 relative. Their kernel lives in a
// transformed layout four times the size of the dense one, and oneDNN's
// transform is slow (~170 ns per input×output channel pair), so the transform
// is done at every call and only where the image is large enough that it
// costs a small part of what Winograd saves (kWinogradMinPixels). Between
// calls only oneDNN's compiled primitives and one buffer are kept.
#pragma once

#include <torch/torch.h>

#include <functional>

namespace sw {

// The smallest height × width from which a convolution runs as Winograd: the
// per-call kernel transform is ~20% of the time saved at 128², ~85% at 64².
constexpr int64_t kWinogradMinPixels = 128 * 128;

// Whether conv2d_winograd runs this convolution: x float32 on the CPU, in
// NCHW or channels-last, at least kWinogradMinPixels; a 3×3 kernel with
// stride 1 and padding 1, input and output channels in multiples of 16; this build has oneDNN 2.x, its Winograd kernels run
// on this CPU and agree with at::conv2d on a probe (checked once, the reason
// logged when they do not), and it has one for these channel counts.
bool winograd_applies(const torch::Tensor &x, const torch::Tensor &weight, const torch::Tensor &bias, int64_t stride,
                      int64_t padding);

// The convolution of x with weight ([out, in, 3, 3], float32, dense in any
// memory format) and bias ([out] or undefined), stride 1, padding 1, as
// Winograd. The result has x's memory format.
torch::Tensor conv2d_winograd(const torch::Tensor &x, const torch::Tensor &weight, const torch::Tensor &bias);

// Whether this build has oneDNN 2's API (SW_WITH_DNNL): without it neither
// Winograd nor blocked linears ever apply.
bool onednn_built();

// Calls of conv2d_winograd in this process so far (tests see which
// convolutions took it).
int64_t winograd_calls();

// Linear layers. libtorch 1.13 runs a bfloat16 linear as a oneDNN matmul on
// the plain [out, in] weight, which oneDNN copies into its blocked layout at
// every call, then adds the bias and any activation in passes of their own:
// SD 1.5's feed-forward product [2048, 320] × [320, 1280] took 5.4 ms where
// the matmul on a weight blocked once takes 3.7 (2 threads, AVX-512 BF16).
// A BlockedLinear is such a weight, reordered once (at load, straight from the
// file's dtype), held in that layout only; its matmul adds the bias and one
// fused operation on the float32 result before rounding.
struct BlockedLinear;

// What a blocked matmul does to its result y = x·wᵀ + bias before rounding it:
// nothing, gelu(y) (erf), y × other or y + other (other: y's shape and dtype).
enum class LinearPost { None, Gelu, Mul, Add };

// Whether linear weights of dtype on device are blocked as they load:
// bfloat16 on the CPU, in a build with oneDNN 2 whose matmul for it runs a
// native kernel here (not its reference code: AVX-512 BF16 or AMX) and agrees
// with at::linear on a probe (checked once, the reason logged when it does
// not).
bool block_linears(torch::ScalarType dtype, const torch::Device &device);

// w ([out, in], float32 or bfloat16, any strides) as dtype in oneDNN's
// blocked layout. Only where block_linears(dtype, cpu).
std::shared_ptr<const BlockedLinear> block_linear(const torch::Tensor &w, torch::ScalarType dtype);

// x ([..., in], the weight's dtype) times the weight, plus bias ([out] or
// undefined), then post: the result is [..., out] in x's dtype.
torch::Tensor linear_blocked(const BlockedLinear &w, const torch::Tensor &x, const torch::Tensor &bias,
                             LinearPost post = LinearPost::None, const torch::Tensor &other = {});

// The bytes the blocked weight holds.
int64_t blocked_bytes(const BlockedLinear &w);

// Convolutions. at::mkldnn_convolution takes a kernel prepacked in oneDNN's
// layout only as libtorch's own oneDNN tensor, which it builds from a plain
// oneDNN copy of the kernel: two passes over every kernel at load, through a
// temporary as large as the kernel (SD 1.5's UNet: 2.4 GB of float32 read
// twice). A BlockedConv is the kernel reordered into the layout the engine's
// own oneDNN convolution asks for, in one pass from the file's dtype, and held
// in it only; its convolution adds the bias.
struct BlockedConv;

// Whether convolution kernels of dtype on device are blocked as they load:
// float32 or bfloat16 on the CPU, in a build with oneDNN 2 whose direct
// convolution runs a native kernel here on the blocked layout and agrees with
// at::conv2d on a probe (checked once per dtype, the reason logged when it
// does not).
bool block_convolutions(torch::ScalarType dtype, const torch::Device &device);

// w ([out, in, kh, kw], float32 or bfloat16, any strides) as dtype in the
// layout of a convolution with this stride and padding (both sides, both
// axes). Only where block_convolutions(dtype, cpu).
std::shared_ptr<const BlockedConv> block_conv(const torch::Tensor &w, torch::ScalarType dtype, int64_t stride,
                                              int64_t padding);

// block_conv of a kernel computed at load rather than read (the phase
// kernels), so it never exists whole outside its layout: fill calls put(row0,
// rows) with runs of the dense kernel's rows (output channels, [row0, row0 +
// rows.size(0)), float32 or bfloat16, any strides) until each row is in; a run
// starts at a multiple of 16 and, but for the kernel's last, spans a multiple
// of 16.
using PutRows = std::function<void(int64_t row0, const torch::Tensor &rows)>;
std::shared_ptr<const BlockedConv> block_conv(c10::IntArrayRef sizes, torch::ScalarType dtype, int64_t stride,
                                              int64_t padding, const std::function<void(const PutRows &)> &fill);

// The convolution of x ([n, in, h, w], the kernel's dtype, any memory format)
// with the kernel, plus bias ([out] or undefined, float32 or the kernel's
// dtype): [n, out, h', w'] in x's dtype, contiguous.
torch::Tensor conv_blocked(const BlockedConv &w, const torch::Tensor &x, const torch::Tensor &bias);

// The kernel back as a dense [out, in, kh, kw] tensor in its dtype.
torch::Tensor unblock_conv(const BlockedConv &w);

// Copies src into dst (the same sizes; float32 or bfloat16 each, on the CPU,
// dense in any memory format) in one oneDNN reorder: converting a float32
// kernel into a bfloat16 channels-last one took a third of Tensor::copy_'s
// time ([512, 512, 3, 3]: 0.74 against 2.2 ms, one thread). False, copying
// nothing, where it does not take them or the build has no oneDNN 2.
bool copy_strided(const torch::Tensor &src, torch::Tensor &dst);

}  // namespace sw
