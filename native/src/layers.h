// Thin layers over ATen's functional ops. Parameters are registered under the
// names the reference checkpoints use and start as one-element placeholders
// of their shape: building a model costs no memory, the weights file fills
// every tensor.
#pragma once

#include <torch/torch.h>

#include "onednn.h"

#include <memory>
#include <string>
#include <vector>

namespace sw {

struct Conv2dImpl : torch::nn::Module {
    Conv2dImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride = 1, int64_t padding = 0, bool bias = true);
    torch::Tensor forward(const torch::Tensor &x);
    // Keeps w (this convolution's weight, in any layout) only in oneDNN's
    // layout for this convolution, as dtype; weight becomes a placeholder of
    // its shape and forward runs oneDNN on that kernel directly. As a
    // BlockedConv (one reorder from w) where block_convolutions holds, else as
    // libtorch's oneDNN tensor (a plain oneDNN copy of w, then its reorder).
    void prepack(const torch::Tensor &w, torch::ScalarType dtype);
    torch::Tensor weight, bias;
    // The weight in oneDNN's layout where prepacked: the engine's own blocked
    // kernel where block_convolutions holds, else libtorch's oneDNN tensor;
    // null and undefined while not prepacked.
    std::shared_ptr<const BlockedConv> blocked;
    torch::Tensor packed;
    bool prepacked() const { return blocked || packed.defined(); }
    int64_t stride, padding;
    // How load_weights holds the kernel where convolutions are prepacked (see
    // prepack_convolutions): in oneDNN's layout, which pays where the kernel
    // outweighs the activations (the UNet's small latents, many channels), or
    // dense channels-last for a model that computes channels-last (the VAE,
    // whose activations at 128² and 256² are the larger: oneDNN then reads and
    // writes them as they are; float32 [1, 128, 256, 256]: 104 ms against 130
    // prepacked, bfloat16 44 against 52).
    enum class CPUKernel { Prepacked, ChannelsLast } cpu_kernel = CPUKernel::Prepacked;
    // Keeps w as a dense channels-last kernel in dtype (CPUKernel::ChannelsLast).
    void hold_channels_last(const torch::Tensor &w, torch::ScalarType dtype);

    // Set before loading by a layer that feeds this convolution (3×3, stride
    // 1, padding 1) only nearest 2× upsamplings (Upsample2D): in bfloat16,
    // where the kernel is prepacked or held channels-last, it is then held as
    // its four phase kernels (phase_kernels) and `phases` is set: forward on
    // the tensor before upsampling gives the four phases of the output side
    // by side (Upsample2DImpl interleaves them), in 16 multiply-adds per
    // output pixel and channel pair instead of 36.
    bool upsampled_input = false;
    bool phases = false;
    // The 3×3 kernel back from the phase kernels (kernel_from_phases), in
    // the weight's dtype, for an upsampling to another size than 2×.
    torch::Tensor kernel3x3();

private:
    // Whether this convolution holds phase kernels in dtype (throws where its
    // shape cannot); hold_as_phases makes weight their placeholder and sets
    // phases; to_phases gives w's phase kernels where it does, else w.
    bool takes_phases(torch::ScalarType dtype) const;
    void hold_as_phases(torch::ScalarType dtype);
    torch::Tensor to_phases(const torch::Tensor &w, torch::ScalarType dtype);
};
TORCH_MODULE(Conv2d);

// A 3×3 convolution (padding 1) of x upsampled 2× (nearest) is, at output
// pixel (2i + a, 2j + b), a 2×2 convolution of x around (i, j): the kernel's
// rows (and columns) that read the same input row add up, (w0, w1 + w2) for
// a = 0 and (w0 + w1, w2) for a = 1. phase_kernels stacks the four 2×2
// kernels of w ([out, in, 3, 3]) as [4 × out, in, 2, 2] in dtype, phase
// 2a + b first by a then b, summed in float32; a 2×2 convolution of x with
// padding 1 then has phase (a, b) at channel block 2a + b, pixel (i + a,
// j + b). kernel_from_phases inverts it (in float32, the result in dtype).
torch::Tensor phase_kernels(const torch::Tensor &w, torch::ScalarType dtype);
torch::Tensor kernel_from_phases(const torch::Tensor &phases, torch::ScalarType dtype);

struct ConvTranspose2dImpl : torch::nn::Module {
    ConvTranspose2dImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride);
    torch::Tensor forward(const torch::Tensor &x);
    torch::Tensor weight, bias;
    int64_t stride;
};
TORCH_MODULE(ConvTranspose2d);

struct LinearImpl : torch::nn::Module {
    LinearImpl(int64_t in, int64_t out, bool bias = true);
    torch::Tensor forward(const torch::Tensor &x);
    // forward(x), then post on the result (LinearPost): fused into the
    // product where the weight is blocked, in ATen passes otherwise.
    torch::Tensor forward_post(const torch::Tensor &x, LinearPost post, const torch::Tensor &other = {});
    // The product with rows [part × out/parts, (part + 1) × out/parts) of the
    // weight and bias alone, then post (GEGLU's value and gate halves).
    torch::Tensor forward_part(int64_t part, const torch::Tensor &x, LinearPost post = LinearPost::None,
                               const torch::Tensor &other = {});
    // Keeps w (this layer's weight, any float dtype) only blocked
    // (BlockedLinear), in `parts` blocks of rows; weight becomes a placeholder
    // of its shape.
    void block(const torch::Tensor &w, torch::ScalarType dtype);
    // The row blocks the weight is blocked in, set before loading.
    int64_t parts = 1;
    std::vector<std::shared_ptr<const BlockedLinear>> blocked;  // empty while not blocked
    // Replaces the float weight by int8 with one scale per output channel,
    // prepacked for libtorch's quantized engine; forward then quantizes its
    // input per call (dynamic quantization) and returns its input's dtype.
    void quantize_int8();
    torch::Tensor weight, bias;
    c10::IValue packed;  // the prepacked int8 weight and bias; None while float
};
TORCH_MODULE(Linear);

struct GroupNormImpl : torch::nn::Module {
    GroupNormImpl(int64_t groups, int64_t channels, double eps);
    torch::Tensor forward(const torch::Tensor &x);
    // silu(forward(x)) in one pass (group_norm_fast, where it applies; else
    // the SiLU in place on at::group_norm's result).
    torch::Tensor forward_silu(const torch::Tensor &x);
    torch::Tensor weight, bias;
    int64_t groups;
    double eps;

private:
    torch::Tensor normalize(const torch::Tensor &x, bool silu);
};
TORCH_MODULE(GroupNorm);

struct LayerNormImpl : torch::nn::Module {
    LayerNormImpl(int64_t dim, double eps);
    torch::Tensor forward(const torch::Tensor &x);
    torch::Tensor weight, bias;
    int64_t dim;
    double eps;
};
TORCH_MODULE(LayerNorm);

struct EmbeddingImpl : torch::nn::Module {
    EmbeddingImpl(int64_t count, int64_t dim);
    torch::Tensor forward(const torch::Tensor &ids);
    torch::Tensor weight;
    // Where the table is held in its file's dtype (load_weights maps it on
    // the CPU: a call reads a few of its rows), the dtype the rows it looks
    // up are converted to.
    c10::optional<torch::ScalarType> rows_as;
};
TORCH_MODULE(Embedding);

// BatchNorm2d in eval mode (running statistics), as trained segmentation
// checkpoints are used for inference.
struct BatchNorm2dImpl : torch::nn::Module {
    BatchNorm2dImpl(int64_t channels, double eps = 1e-5);
    torch::Tensor forward(const torch::Tensor &x);
    torch::Tensor weight, bias, running_mean, running_var, num_batches_tracked;
    double eps;
};
TORCH_MODULE(BatchNorm2d);

// Stores the weights of every Linear under m as int8 (LinearImpl::quantize_int8).
// Fails with SW_ERR_UNSUPPORTED when libtorch has no quantized engine. Returns
// the bytes the weights take afterwards minus before (negative: saved).
int64_t quantize_linears_int8(torch::nn::Module &m);

// Whether convolutions with dtype weights on device are prepacked as they
// load (load_weights): float32 or bfloat16 on the CPU, as the engine's own
// blocked kernels where block_convolutions holds (onednn.h), else where this
// libtorch's oneDNN convolution on a prepacked kernel runs and agrees with
// at::conv2d on a probe (checked once per dtype, the reason logged when it
// does not).
bool prepack_convolutions(torch::ScalarType dtype, const torch::Device &device);

// x in channels-last when it is a 4-d tensor whose convolutions have
// channels-last kernels (Conv2dImpl::CPUKernel::ChannelsLast: the CPU, float32
// or bfloat16); x as it is otherwise.
torch::Tensor channels_last_on_cpu(const torch::Tensor &x);

// GroupNorm of x (then SiLU, if silu) in the engine's own kernel: x float32
// or bfloat16, 4-d, NCHW or channels-last, on a CPU with AVX2 and FMA (and
// height × width, NCHW, or channels, channels-last, in multiples of 8). The
// statistics are summed in double, the rest computes in float32; the result
// has x's dtype and memory format. An undefined tensor where it does not
// apply: the caller then runs at::group_norm.
torch::Tensor group_norm_fast(const torch::Tensor &x, int64_t groups, const torch::Tensor &weight,
                              const torch::Tensor &bias, double eps, bool silu);

// LayerNorm over the last dimension of a bfloat16 x in the engine's own
// kernel, computed in float32 (a row at a time, in L1: mean, then the
// variance about it) and rounded as c10::BFloat16 rounds: on a CPU with AVX2
// and FMA, rows of a multiple of 8. An undefined tensor where it does not
// apply: the caller then runs at::layer_norm.
torch::Tensor layer_norm_bf16_fast(const torch::Tensor &x, const torch::Tensor &weight, const torch::Tensor &bias,
                                   double eps);

#if defined(__x86_64__)
// The instruction sets of the engine's AVX-512 BF16 kernels: functions built
// for them in a library built for any x86-64, called only where
// cpu_has_avx512_bf16().
#define SW_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#endif

// Whether this CPU runs AVX-512 BF16 and the AVX-512 subsets its kernels use.
bool cpu_has_avx512_bf16();

// softmax over the last dimension, in place where it can be: float32 or
// bfloat16 (computed in float32, rounded as c10::BFloat16 rounds) on a CPU
// with AVX2 and FMA, in one vectorised pass per row for the exponentials
// (libtorch 1.13's float32 softmax ran ~0.4 G elements/s on 2 threads, and at
// 512² the UNet's first-level attention holds 16 × 4096² scores); elsewhere
// x = at::softmax(x, -1). With AVX-512 BF16 the rows run 16 lanes at a time.
// Returns x.
torch::Tensor softmax_lastdim_(torch::Tensor &x);

// The lanes softmax_lastdim_'s kernel runs at here: 16 (AVX-512 BF16), 8
// (AVX2 and FMA) or 0 (libtorch's). Tests narrow it with
// limit_softmax_lanes(8) to check the AVX2 kernel on a wider CPU; 0 lifts the
// limit.
int softmax_lanes();
void limit_softmax_lanes(int lanes);

// How many threads the engine's own CPU kernels (softmax_lastdim_, GroupNorm)
// split their rows over at the current thread setting: at::parallel_for in
// this library, which runs on one thread unless it was built with OpenMP.
int64_t kernel_threads();

// The most bytes one attention score matrix may take (on the CPU, one head's
// block of queries); larger ones are computed in slices of queries (the
// result is the same: softmax is per query).
constexpr int64_t kAttentionSliceBytes = int64_t(256) << 20;

// Multi-head scaled dot-product attention over [B, N, heads*dim] tensors.
// upcast computes the scores in float32 when the inputs are half precision.
// Unmasked bfloat16 on the CPU runs as attention_fused_bf16 where it applies.
torch::Tensor attention(const torch::Tensor &q, const torch::Tensor &k, const torch::Tensor &v, int64_t heads,
                        const c10::optional<torch::Tensor> &mask = c10::nullopt, bool upcast = false,
                        int64_t max_bytes = kAttentionSliceBytes);

// Unmasked multi-head attention of bfloat16 q [B, Nq, heads*dim] and k, v
// [B, Nk, heads*dim] (contiguous, on the CPU) in the engine's own kernel
// (attention.cpp), where the CPU has AVX-512 BF16 and dim is even and at
// most kFusedAttentionMaxDim; an undefined tensor elsewhere. Each block of a
// head's queries takes its scores, softmax and product with the values in
// one pass through L2, the scores in float32 (so upcast is always met), with
// no copy of a head's queries, keys or values and no per-call reorder: at
// SD 1.5's 256² first level ([2, 1024, 320], 8 heads of 40) 9.1 against 13
// ms for oneDNN's products around the engine's softmax (2 threads).
torch::Tensor attention_fused_bf16(const torch::Tensor &q, const torch::Tensor &k, const torch::Tensor &v,
                                   int64_t heads);

// The widest head attention_fused_bf16 takes (SD 1.5's last level: 160).
constexpr int64_t kFusedAttentionMaxDim = 160;

// Calls that attention_fused_bf16 ran in this process (tests see which path
// an attention took).
int64_t fused_attention_calls();

// allow_fused_attention(false) makes attention_fused_bf16 decline everything,
// so that tests on a CPU with AVX-512 BF16 also check the path CPUs without
// it take; true lifts that.
void allow_fused_attention(bool allowed);

}  // namespace sw
