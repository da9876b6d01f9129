// What the engine runs through oneDNN's own C++ API rather than through
// libtorch: Winograd convolutions on the CPU.
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

// Calls of conv2d_winograd in this process so far (tests see which
// convolutions took it).
int64_t winograd_calls();

}  // namespace sw
