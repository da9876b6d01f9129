#include "layers.h"

#include "common.h"
#include "onednn.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
// GCC 12 warns on its own AVX-512 intrinsics' deliberately undefined operands
// (_mm512_undefined_ps inside _mm512_max_ps and the reductions).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

namespace sw {

namespace {
// A placeholder with the parameter's shape over one element: building a model
// allocates nothing, so a config that lies about sizes is caught against the
// weights file's shapes before anything of its size exists.
torch::Tensor empty(std::initializer_list<int64_t> shape) { return torch::empty({1}).expand(shape); }
}  // namespace

Conv2dImpl::Conv2dImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride_, int64_t padding_, bool has_bias)
    : stride(stride_), padding(padding_) {
    weight = register_parameter("weight", empty({out, in, kernel, kernel}), false);
    if (has_bias) bias = register_parameter("bias", empty({out}), false);
}

torch::Tensor Conv2dImpl::forward(const torch::Tensor &x) {
    const auto b = phases && bias.defined() ? bias.repeat({4}) : bias;  // each phase's channels
    if (blocked) return conv_blocked(*blocked, x, b);
    if (packed.defined())
        return at::mkldnn_convolution(x.contiguous(), packed, b, {padding, padding}, {stride, stride}, {1, 1}, 1);
    if (winograd_applies(x, weight, b, stride, padding)) return conv2d_winograd(x, weight, b);
    return at::conv2d(x, weight, b, {stride, stride}, {padding, padding});
}

namespace {
// kernel_from_phases and a blocked phase kernel's load work through this many
// output channels at a time, so their float32 temporaries stay small (SD 1.5's
// largest upsampling kernel is 1280 × 1280 × 9).
constexpr int64_t kPhaseBlock = 64;
}  // namespace

// at::conv2d hands oneDNN the kernel in PyTorch's [out, in, kh, kw] layout,
// and oneDNN reorders a copy of it into its blocked layout at every call: for
// SD 1.5's 1280-channel convolutions at 4² and 8² (256² images) that copy
// costs more than the convolution (float32 [2, 1280, 4, 4]: 37 ms per call,
// 7 ms prepacked; bfloat16 9.2 against 4.1 ms). Done once here, the weight is
// held once, in the packed layout only. The engine's own convolution on a
// BlockedConv runs as fast as libtorch's on its prepacked tensor (SD 1.5's
// UNet shapes at 256² and 512²: 364.6 against 368.3 ms in bfloat16, 695.5
// against 701.6 ms in float32, summed) and takes the kernel in one pass
// instead of two.
void Conv2dImpl::prepack(const torch::Tensor &w_, torch::ScalarType dtype) {
    if (block_convolutions(dtype, w_.device())) {
        const int64_t out = weight.size(0), in = weight.size(1);
        if (takes_phases(dtype) && out % 16 == 0) {
            // The phase kernels in runs of output channels, each straight
            // into the layout: the whole [4 × out, in, 2, 2] kernel never
            // exists outside it (SD 1.5's largest, 52 MB in bfloat16, was a
            // temporary of its own, fresh pages the load faulted in).
            const auto w3 = w_.reshape({out, in, 3, 3});
            blocked = block_conv({4 * out, in, 2, 2}, dtype, stride, padding, [&](const PutRows &put) {
                for (int64_t o0 = 0; o0 < out; o0 += kPhaseBlock) {
                    const int64_t n = std::min(kPhaseBlock, out - o0);
                    const auto p = phase_kernels(w3.narrow(0, o0, n), torch::kFloat32).view({4, n, in, 2, 2});
                    for (int64_t phase = 0; phase < 4; phase++) put(phase * out + o0, p[phase]);
                }
            });
            hold_as_phases(dtype);
        } else {
            const auto w = to_phases(w_, dtype);
            blocked = block_conv(w.reshape(weight.sizes()), dtype, stride, padding);
        }
        weight.set_data(torch::empty({1}, weight.options().dtype(dtype)).expand(weight.sizes()));
        return;
    }
    const auto w = to_phases(w_, dtype);
    // to_mkldnn converts float32 to bfloat16 itself (rounding to nearest even,
    // as Tensor::to does): one copy fewer than converting first.
    const bool converts = w.scalar_type() == dtype || w.scalar_type() == torch::kFloat32;
    auto dense = (converts ? w : w.to(dtype)).reshape(weight.sizes()).contiguous();
    packed = at::mkldnn_reorder_conv2d_weight(dense.to_mkldnn(dtype), {padding, padding}, {stride, stride}, {1, 1}, 1);
    weight.set_data(torch::empty({1}, weight.options().dtype(dtype)).expand(weight.sizes()));
}

void Conv2dImpl::hold_channels_last(const torch::Tensor &w_, torch::ScalarType dtype) {
    const auto w = to_phases(w_, dtype).reshape(weight.sizes());
    auto held = at::empty(w.sizes(), w.options().dtype(dtype).memory_format(torch::MemoryFormat::ChannelsLast));
    if (!copy_strided(w, held)) held.copy_(w);
    weight.set_data(held);
}

// w as this convolution holds it in dtype: its phase kernels where its input
// is upsampled and dtype is bfloat16 (weight then takes their shape), else w
// itself. Float32 keeps the 3×3 kernel: in the VAE Winograd already takes
// those convolutions (phase kernels measured no faster there), and in the
// UNet their 16/9 of the kernels took float32's peak at 256² to 4.80 GiB
// (from 4.72) for a step no faster at 256² and within noise at 512².
bool Conv2dImpl::takes_phases(torch::ScalarType dtype) const {
    if (!upsampled_input || dtype != torch::kBFloat16) return false;
    if (weight.size(2) != 3 || weight.size(3) != 3 || stride != 1 || padding != 1)
        throw std::logic_error("Conv2d: phase kernels need a 3×3 convolution with stride 1 and padding 1");
    return true;
}

void Conv2dImpl::hold_as_phases(torch::ScalarType dtype) {
    weight.set_data(empty({1}).to(dtype).expand({4 * weight.size(0), weight.size(1), 2, 2}));
    phases = true;
}

torch::Tensor Conv2dImpl::to_phases(const torch::Tensor &w, torch::ScalarType dtype) {
    if (!takes_phases(dtype)) return w;
    auto p = phase_kernels(w.reshape(weight.sizes()), dtype);
    hold_as_phases(dtype);
    return p;
}

torch::Tensor Conv2dImpl::kernel3x3() {
    if (!phases) return weight;
    const auto dense = blocked ? unblock_conv(*blocked) : packed.defined() ? packed.to_dense() : weight;
    return kernel_from_phases(dense, weight.scalar_type());
}

namespace {

// Each [3, 3] kernel of src (count of them) to its four [2, 2] phase kernels
// in dst ([4, count, 2, 2]), in one pass.
template <typename T>
void fold_phases(const float *src, T *dst, int64_t count) {
    at::parallel_for(0, count, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            const float *k = src + i * 9;
            for (int a = 0; a < 2; a++) {
                // The two rows phase a reads: (w0, w1 + w2) or (w0 + w1, w2).
                float r[2][3];
                for (int x = 0; x < 3; x++) {
                    r[0][x] = a == 0 ? k[x] : k[x] + k[3 + x];
                    r[1][x] = a == 0 ? k[3 + x] + k[6 + x] : k[6 + x];
                }
                for (int b = 0; b < 2; b++) {
                    T *p = dst + ((2 * a + b) * count + i) * 4;
                    for (int y = 0; y < 2; y++) {
                        p[2 * y] = static_cast<T>(b == 0 ? r[y][0] : r[y][0] + r[y][1]);
                        p[2 * y + 1] = static_cast<T>(b == 0 ? r[y][1] + r[y][2] : r[y][2]);
                    }
                }
            }
        }
    });
}

}  // namespace

torch::Tensor phase_kernels(const torch::Tensor &w_, torch::ScalarType dtype) {
    TORCH_CHECK(w_.dim() == 4 && w_.size(2) == 3 && w_.size(3) == 3, "phase_kernels: want [out, in, 3, 3]");
    // One pass straight into the result: ATen ops over the whole tensor took
    // ~33 ms for SD 1.5's largest (1280 × 1280) at load, most of it in
    // float32 temporaries' fresh pages.
    const auto w = w_.to(torch::kFloat32).contiguous();
    const int64_t o = w.size(0), c = w.size(1);
    const auto as = dtype == torch::kBFloat16 ? dtype : torch::kFloat32;
    auto out = at::empty({4 * o, c, 2, 2}, w.options().dtype(as));
    if (as == torch::kBFloat16)
        fold_phases(w.data_ptr<float>(), out.data_ptr<c10::BFloat16>(), o * c);
    else
        fold_phases(w.data_ptr<float>(), out.data_ptr<float>(), o * c);
    return out.to(dtype);
}

torch::Tensor kernel_from_phases(const torch::Tensor &phases, torch::ScalarType dtype) {
    TORCH_CHECK(phases.dim() == 4 && phases.size(0) % 4 == 0 && phases.size(2) == 2 && phases.size(3) == 2,
                "kernel_from_phases: want [4 × out, in, 2, 2]");
    const int64_t o = phases.size(0) / 4;
    auto out = at::empty({o, phases.size(1), 3, 3}, phases.options().dtype(dtype));
    const auto p4 = phases.view({4, o, phases.size(1), 2, 2});
    for (int64_t o0 = 0; o0 < o; o0 += kPhaseBlock) {
        const int64_t n = std::min(kPhaseBlock, o - o0);
        auto p = p4.narrow(1, o0, n).to(torch::kFloat32);
        // Phase (a, b) is p[2a + b]; each corner of the kernel is one phase's
        // own corner, the rest follows from the sums.
        auto at_ = [&](int64_t ph, int64_t r, int64_t c) { return p[ph].select(3, c).select(2, r); };
        auto w00 = at_(0, 0, 0), w02 = at_(1, 0, 1), w20 = at_(2, 1, 0), w22 = at_(3, 1, 1);
        auto w01 = at_(1, 0, 0) - w00, w10 = at_(2, 0, 0) - w00;
        auto w12 = at_(3, 0, 1) - w02, w21 = at_(3, 1, 0) - w20;
        auto w11 = at_(3, 0, 0) - w00 - w01 - w10;
        out.narrow(0, o0, n)
            .copy_(at::stack({at::stack({w00, w01, w02}, -1), at::stack({w10, w11, w12}, -1),
                              at::stack({w20, w21, w22}, -1)},
                             -2));
    }
    return out;
}

namespace {

// Whether oneDNN's convolution on a prepacked kernel runs in this libtorch
// for dtype and gives at::conv2d's result (bfloat16 needs AVX-512 kernels;
// some builds have no oneDNN at all).
bool prepacking_works(torch::ScalarType dtype) {
    static std::mutex mu;
    static std::map<torch::ScalarType, bool> known;
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = known.find(dtype); it != known.end()) return it->second;
    bool ok = false;
    std::string why;
    try {
        if (!at::hasMKLDNN()) throw std::runtime_error("libtorch is built without oneDNN");
        torch::NoGradGuard no_grad;
        auto gen = at::detail::createCPUGenerator(1);
        auto w = torch::randn({16, 8, 3, 3}, gen).div(8).to(dtype);
        auto x = torch::randn({2, 8, 5, 6}, gen).to(dtype);
        auto b = torch::randn({16}, gen).to(dtype);
        auto want = at::conv2d(x.to(torch::kFloat32), w.to(torch::kFloat32), b.to(torch::kFloat32), {2, 2}, {1, 1});
        auto p = at::mkldnn_reorder_conv2d_weight(w.to_mkldnn(), {1, 1}, {2, 2}, {1, 1}, 1);
        auto got = at::mkldnn_convolution(x, p, b, {1, 1}, {2, 2}, {1, 1}, 1).to(torch::kFloat32);
        const double err = (got - want).abs().max().item<double>();
        const double limit = dtype == torch::kFloat32 ? 1e-4 : 0.05 * want.abs().max().item<double>();
        ok = got.sizes() == want.sizes() && err <= limit;
        if (!ok) why = "differs from at::conv2d by " + std::to_string(err);
    } catch (const std::exception &e) {
        why = e.what();
        why = why.substr(0, why.find('\n'));
    }
    if (!ok)
        log(SW_LOG_INFO, std::string("convolutions in ") + c10::toString(dtype) +
                             " are not prepacked (oneDNN's prepacked convolution: " + why + ")");
    known[dtype] = ok;
    return ok;
}

}  // namespace

torch::Tensor channels_last_on_cpu(const torch::Tensor &x) {
    if (x.dim() != 4 || !prepack_convolutions(x.scalar_type(), x.device())) return x;
    return x.contiguous(torch::MemoryFormat::ChannelsLast);
}

bool prepack_convolutions(torch::ScalarType dtype, const torch::Device &device) {
    // The engine's own blocked kernels where they run; libtorch's prepacked
    // ones otherwise (a build without oneDNN 2), probed only then.
    return device.is_cpu() && (dtype == torch::kFloat32 || dtype == torch::kBFloat16) &&
           (block_convolutions(dtype, device) || prepacking_works(dtype));
}

ConvTranspose2dImpl::ConvTranspose2dImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride_) : stride(stride_) {
    weight = register_parameter("weight", empty({in, out, kernel, kernel}), false);
    bias = register_parameter("bias", empty({out}), false);
}

torch::Tensor ConvTranspose2dImpl::forward(const torch::Tensor &x) {
    return at::conv_transpose2d(x, weight, bias, {stride, stride});
}

LinearImpl::LinearImpl(int64_t in, int64_t out, bool has_bias) {
    weight = register_parameter("weight", empty({out, in}), false);
    if (has_bias) bias = register_parameter("bias", empty({out}), false);
}

namespace {

// The quantized engine int8 layers run on, chosen once per process: oneDNN
// (VNNI kernels) where libtorch has it, else what it has.
void select_qengine() {
    static std::once_flag once;
    static std::string error;
    std::call_once(once, [] {
        const auto &have = at::globalContext().supportedQEngines();
        auto has = [&](at::QEngine e) { return std::find(have.begin(), have.end(), e) != have.end(); };
        std::vector<at::QEngine> prefer{at::QEngine::ONEDNN};
#if TORCH_VERSION_MAJOR >= 2
        prefer.push_back(at::QEngine::X86);
#endif
        prefer.push_back(at::QEngine::FBGEMM);
        prefer.push_back(at::QEngine::QNNPACK);
        for (auto e : prefer)
            if (has(e)) {
                at::globalContext().setQEngine(e);
                return;
            }
        error = "int8: this libtorch has no quantized engine (onednn, fbgemm or qnnpack)";
    });
    if (!error.empty()) fail(SW_ERR_UNSUPPORTED, error);
}

c10::OperatorHandle quantized_op(const char *name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

}  // namespace

void LinearImpl::quantize_int8() {
    select_qengine();
    static const auto prepack = quantized_op("quantized::linear_prepack");
    auto w = weight.to(torch::kFloat32).contiguous();
    // Symmetric per output channel: the largest |w| of a row maps to 127.
    auto scales = (w.abs().amax(1) / 127.0).clamp_min(1e-12).to(torch::kDouble);
    auto zeros = torch::zeros({w.size(0)}, torch::kLong);
    auto q = at::quantize_per_channel(w, scales, zeros, 0, torch::kQInt8);
    // A copy: set_data below changes the tensor the parameter shares.
    c10::optional<at::Tensor> b;
    if (bias.defined()) b = bias.to(torch::kFloat32).clone();
    torch::jit::Stack stack{q, b};
    prepack.callBoxed(&stack);
    packed = std::move(stack.at(0));
    // The float weight is no longer read: keep a placeholder of its shape.
    weight.set_data(empty({1}).expand(weight.sizes()));
    if (bias.defined()) bias.set_data(empty({1}).expand(bias.sizes()));
}

void LinearImpl::block(const torch::Tensor &w, torch::ScalarType dtype) {
    auto rows = w.reshape(weight.sizes()).chunk(parts, 0);
    blocked.clear();
    for (const auto &r : rows) blocked.push_back(block_linear(r, dtype));
    weight.set_data(empty({1}).to(dtype).expand(weight.sizes()));
}

namespace {

torch::Tensor apply_post(torch::Tensor y, LinearPost post, const torch::Tensor &other) {
    switch (post) {
    case LinearPost::None: return y;
    case LinearPost::Gelu: return at::gelu(y);
    case LinearPost::Mul: return y.mul_(other);
    case LinearPost::Add: return y.add_(other);
    }
    return y;
}

}  // namespace

torch::Tensor LinearImpl::forward_part(int64_t part, const torch::Tensor &x, LinearPost post, const torch::Tensor &other) {
    const int64_t n = weight.size(0) / parts;
    auto b = bias.defined() ? bias.narrow(0, part * n, n) : bias;
    if (!blocked.empty()) return linear_blocked(*blocked.at(static_cast<size_t>(part)), x, b, post, other);
    return apply_post(at::linear(x, weight.narrow(0, part * n, n), b), post, other);
}

torch::Tensor LinearImpl::forward_post(const torch::Tensor &x, LinearPost post, const torch::Tensor &other) {
    if (blocked.size() == 1) return linear_blocked(*blocked.front(), x, bias, post, other);
    return apply_post(forward(x), post, other);
}

torch::Tensor LinearImpl::forward(const torch::Tensor &x) {
    if (blocked.size() == 1) return linear_blocked(*blocked.front(), x, bias);
    if (!blocked.empty()) {
        std::vector<torch::Tensor> parts_out;
        for (int64_t p = 0; p < parts; p++) parts_out.push_back(forward_part(p, x));
        return at::cat(parts_out, -1);
    }
    if (packed.isNone()) return at::linear(x, weight, bias);
    static const auto dynamic = quantized_op("quantized::linear_dynamic");
    torch::jit::Stack stack{x.to(torch::kFloat32).contiguous(), packed, false};
    dynamic.callBoxed(&stack);
    return stack.at(0).toTensor().to(x.scalar_type());
}

int64_t quantize_linears_int8(torch::nn::Module &m) {
    torch::NoGradGuard no_grad;
    int64_t change = 0;
    for (const auto &child : m.modules(/*include_self=*/true)) {
        auto *lin = dynamic_cast<LinearImpl *>(child.get());
        if (lin == nullptr || !lin->packed.isNone()) continue;
        const int64_t before = lin->weight.numel() * static_cast<int64_t>(lin->weight.element_size());
        lin->quantize_int8();
        change += lin->weight.numel() - before;  // one byte per weight now
    }
    return change;
}

GroupNormImpl::GroupNormImpl(int64_t groups_, int64_t channels, double eps_) : groups(groups_), eps(eps_) {
    weight = register_parameter("weight", empty({channels}), false);
    bias = register_parameter("bias", empty({channels}), false);
}

namespace {
// libtorch's CPU group and layer norms run ~10× slower in bfloat16 than in
// float32 (GroupNorm at [2, 320, 32, 32]: 4.5 against 0.5 ms with both
// conversions; LayerNorm at [2, 1024, 320]: 3.1 against 0.3 ms); computing in
// float32 is also the more exact of the two.
bool norm_in_float32(const torch::Tensor &x) { return x.scalar_type() == torch::kBFloat16 && x.device().is_cpu(); }
}  // namespace

torch::Tensor GroupNormImpl::normalize(const torch::Tensor &x, bool silu) {
    if (auto y = group_norm_fast(x, groups, weight, bias, eps, silu); y.defined()) return y;
    const bool up = norm_in_float32(x);
    auto y = up ? at::group_norm(x.to(torch::kFloat32), groups, weight.to(torch::kFloat32), bias.to(torch::kFloat32), eps)
                : at::group_norm(x, groups, weight, bias, eps);
    if (silu) at::silu_(y);
    return up ? y.to(x.scalar_type()) : y;
}

torch::Tensor GroupNormImpl::forward(const torch::Tensor &x) { return normalize(x, false); }

torch::Tensor GroupNormImpl::forward_silu(const torch::Tensor &x) { return normalize(x, true); }

LayerNormImpl::LayerNormImpl(int64_t dim_, double eps_) : dim(dim_), eps(eps_) {
    weight = register_parameter("weight", empty({dim}), false);
    bias = register_parameter("bias", empty({dim}), false);
}

torch::Tensor LayerNormImpl::forward(const torch::Tensor &x) {
    if (auto y = layer_norm_bf16_fast(x, weight, bias, eps); y.defined()) return y;
    if (norm_in_float32(x))
        return at::layer_norm(x.to(torch::kFloat32), {dim}, weight.to(torch::kFloat32), bias.to(torch::kFloat32), eps)
            .to(x.scalar_type());
    return at::layer_norm(x, {dim}, weight, bias, eps);
}

EmbeddingImpl::EmbeddingImpl(int64_t count, int64_t dim) {
    weight = register_parameter("weight", empty({count, dim}), false);
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor &ids) {
    auto rows = at::embedding(weight, ids);
    return rows_as && *rows_as != rows.scalar_type() ? rows.to(*rows_as) : rows;
}

BatchNorm2dImpl::BatchNorm2dImpl(int64_t channels, double eps_) : eps(eps_) {
    weight = register_parameter("weight", empty({channels}), false);
    bias = register_parameter("bias", empty({channels}), false);
    running_mean = register_buffer("running_mean", empty({channels}));
    running_var = register_buffer("running_var", empty({channels}));
    num_batches_tracked = register_buffer("num_batches_tracked", torch::zeros({}, torch::kInt64));
}

torch::Tensor BatchNorm2dImpl::forward(const torch::Tensor &x) {
    return at::batch_norm(x, weight, bias, running_mean, running_var, /*training=*/false, 0.0, eps,
                          /*cudnn_enabled=*/true);
}

namespace {

#if defined(__x86_64__)
// The kernels below need AVX2 and FMA; elsewhere their callers use libtorch's.
bool has_avx2_fma() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has;
}

// Cephes' expf: the clamp, log2(e), ln 2 in two parts for the reduction,
// and the polynomial's coefficients, highest first.
constexpr float kExpMin = -87.3f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp for x <= 0 (softmax's x - max), 8 at a time: Cephes' expf polynomial
// (relative error ~1e-7), with x clamped at -87.3 so that 2^n stays normal
// (exp(-87.3) = 1.2e-38 where the exact value would underflow to 0).
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kExpPoly[0]);
    for (size_t i = 1; i < std::size(kExpPoly); i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
    const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Eight float32 or bfloat16 values as float32, and back (bfloat16 rounded to
// nearest even, as c10::BFloat16 rounds); to_float and to_bfloat16 one at a
// time, for the tails.
template <typename T> __attribute__((target("avx2,fma"))) inline __m256 load8(const T *p) {
    if constexpr (std::is_same_v<T, float>) {
        return _mm256_loadu_ps(p);
    } else {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
}

template <typename T> __attribute__((target("avx2,fma"))) inline void store8(T *p, __m256 v) {
    if constexpr (std::is_same_v<T, float>) {
        _mm256_storeu_ps(p, v);
    } else {
        const __m256i b = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
        const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i *>(p), _mm256_castsi256_si128(packed));
    }
}

template <typename T> float to_float(T v) {
    if constexpr (std::is_same_v<T, float>) {
        return v;
    } else {
        const uint32_t bits = static_cast<uint32_t>(v) << 16;
        float f;
        std::memcpy(&f, &bits, sizeof f);
        return f;
    }
}

inline uint16_t to_bfloat16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// Softmax of the n values at p (float32 or bfloat16, computed in float32,
// bfloat16 rounded to nearest even as c10::BFloat16 rounds) into p, the
// exponentials kept in e (n floats; p itself for float32). p is read twice
// and written once: its maximum, then exp and sum into e, then normalized
// into p. For bfloat16, e is an L1-sized row (a widened copy of the row first
// made two more passes: 1.14 ms for a [512, 4096] block).
template <typename T>
__attribute__((target("avx2,fma"))) void softmax_row_avx2(T *p, int64_t n, float *e) {
    int64_t i = 0;
    __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, load8(p + i));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    float m = *std::max_element(lanes, lanes + 8);
    for (; i < n; i++) m = std::max(m, to_float(p[i]));
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 v = exp_nonpositive(_mm256_sub_ps(load8(p + i), vm));
        _mm256_storeu_ps(e + i, v);
        vsum = _mm256_add_ps(vsum, v);
    }
    _mm256_store_ps(lanes, vsum);
    float sum = 0;
    for (float l : lanes) sum += l;
    for (; i < n; i++) {
        e[i] = std::exp(std::max(to_float(p[i]) - m, kExpMin));
        sum += e[i];
    }
    const __m256 vinv = _mm256_set1_ps(1.0f / sum);
    for (i = 0; i + 8 <= n; i += 8) store8(p + i, _mm256_mul_ps(_mm256_loadu_ps(e + i), vinv));
    for (; i < n; i++) {
        if constexpr (std::is_same_v<T, float>)
            p[i] = e[i] / sum;
        else
            p[i] = to_bfloat16(e[i] / sum);
    }
}

// CPUs with AVX-512 BF16 (its rounding instruction stores bfloat16 in one
// step) run softmax 16 lanes at a time: ~1.25× the AVX2 kernel's rate on
// bfloat16 [512, 4096] blocks here (~5 against 4.0 G elements/s, 2 threads).

// exp_nonpositive, 16 at a time.
SW_AVX512_BF16 inline __m512 exp_nonpositive16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_set1_ps(kExpPoly[0]);
    for (size_t i = 1; i < std::size(kExpPoly); i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
    const __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// Up to 16 float32 or bfloat16 values (the lanes in m) as float32, the
// others `fill`; and back (bfloat16 rounded to nearest even).
template <typename T> SW_AVX512_BF16 inline __m512 load16(const T *p, __mmask16 m, __m512 fill) {
    if constexpr (std::is_same_v<T, float>) {
        return _mm512_mask_loadu_ps(fill, m, p);
    } else {
        const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
        return _mm512_mask_mov_ps(fill, m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
}

template <typename T> SW_AVX512_BF16 inline void store16(T *p, __mmask16 m, __m512 v) {
    if constexpr (std::is_same_v<T, float>)
        _mm512_mask_storeu_ps(p, m, v);
    else
        _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// softmax_row_avx2 16 lanes at a time, the tail masked.
template <typename T> SW_AVX512_BF16 void softmax_row_avx512(T *p, int64_t n, float *e) {
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    auto lanes = [n](int64_t i) {
        return static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
    };
    __m512 vmax = ninf;
    for (int64_t i = 0; i < n; i += 16) vmax = _mm512_max_ps(vmax, load16(p + i, lanes(i), ninf));
    const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes(i);
        const __m512 v = _mm512_maskz_mov_ps(m, exp_nonpositive16(_mm512_sub_ps(load16(p + i, m, vm), vm)));
        _mm512_mask_storeu_ps(e + i, m, v);
        vsum = _mm512_add_ps(vsum, v);
    }
    const __m512 vinv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes(i);
        store16(p + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e + i), vinv));
    }
}

std::atomic<int> lanes_limit{0};

template <typename T> void softmax_rows(T *data, int64_t rows, int64_t n) {
    const bool wide = softmax_lanes() == 16;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t lo, int64_t hi) {
        // float32 rows hold their exponentials themselves.
        std::vector<float> buf(std::is_same_v<T, float> ? 0 : static_cast<size_t>(n));
        for (int64_t row = lo; row < hi; row++) {
            T *p = data + row * n;
            float *e = std::is_same_v<T, float> ? reinterpret_cast<float *>(p) : buf.data();
            if (wide)
                softmax_row_avx512(p, n, e);
            else
                softmax_row_avx2(p, n, e);
        }
    });
}

// v * sigmoid(v), with exp taken of -|v| only (exp_nonpositive's range).
__attribute__((target("avx2,fma"))) inline __m256 silu8(__m256 v) {
    const __m256 t = exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)));
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 positive = _mm256_div_ps(one, _mm256_add_ps(one, t));   // v >= 0: 1 / (1 + e^-v)
    const __m256 negative = _mm256_div_ps(t, _mm256_add_ps(one, t));     // v < 0: e^v / (1 + e^v)
    const __m256 sig = _mm256_blendv_ps(positive, negative, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_mul_ps(v, sig);
}

// Sums and sums of squares of x - k over `runs` runs of 8 values from p, one
// every `stride` elements (stride 8: contiguous), lane by lane into s[0..8)
// and q[0..8): float32 lanes folded into doubles every 512 runs. k, a value
// of each lane's own data, keeps the squares from cancelling: float32 sums of
// x² with a mean of 20 lose the variance's fifth digit.
template <typename T>
__attribute__((target("avx2,fma"))) void shifted_sums8(const T *p, int64_t runs, int64_t stride, const float *k,
                                                       double *s, double *q) {
    const __m256 vk = _mm256_loadu_ps(k);
    for (int64_t r0 = 0; r0 < runs; r0 += 512) {
        __m256 vs = _mm256_setzero_ps(), vq = _mm256_setzero_ps();
        for (int64_t r = r0, end = std::min(runs, r0 + 512); r < end; r++) {
            const __m256 v = _mm256_sub_ps(load8(p + r * stride), vk);
            vs = _mm256_add_ps(vs, v);
            vq = _mm256_fmadd_ps(v, v, vq);
        }
        alignas(32) float ls[8], lq[8];
        _mm256_store_ps(ls, vs);
        _mm256_store_ps(lq, vq);
        for (int i = 0; i < 8; i++) s[i] += ls[i], q[i] += lq[i];
    }
}

// y = x * a + b (then SiLU) over len values (a multiple of 8).
template <typename T>
__attribute__((target("avx2,fma"))) void affine_run(const T *x, T *y, int64_t len, float a, float b, bool silu) {
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    for (int64_t i = 0; i < len; i += 8) {
        const __m256 r = _mm256_fmadd_ps(load8(x + i), va, vb);
        store8(y + i, silu ? silu8(r) : r);
    }
}

// The same for one pixel of c channels (a multiple of 8), channel by channel.
template <typename T>
__attribute__((target("avx2,fma"))) void affine_pixel(const T *x, T *y, int64_t c, const float *a, const float *b,
                                                      bool silu) {
    for (int64_t ch = 0; ch < c; ch += 8) {
        const __m256 r = _mm256_fmadd_ps(load8(x + ch), _mm256_loadu_ps(a + ch), _mm256_loadu_ps(b + ch));
        store8(y + ch, silu ? silu8(r) : r);
    }
}

// GroupNorm (+ SiLU) over a 4-d float32 or bfloat16 tensor, NCHW or
// channels-last, in two passes: statistics (float32 lanes summed into
// doubles, over fixed chunks so the result does not depend on the thread
// count), then the per-channel affine with the SiLU fused and bfloat16
// rounded as c10::BFloat16 rounds. For bfloat16 it replaces a conversion to
// float32 and back around at::group_norm and a separate SiLU pass.
template <typename T>
void group_norm_avx2(const T *x, T *y, int64_t n, int64_t c, int64_t hw, int64_t groups, bool channels_last,
                     const float *gamma, const float *beta, double eps, bool silu) {
    const int64_t per_group = c / groups;
    // Per (image, channel): sum and sum of squares about k, the channel's
    // first value in the image, and that k.
    std::vector<double> sum(n * c, 0.0), sq(n * c, 0.0);
    std::vector<float> k(n * c);
    for (int64_t img = 0; img < n; img++)
        for (int64_t ch = 0; ch < c; ch++)
            k[img * c + ch] = to_float(channels_last ? x[img * hw * c + ch] : x[(img * c + ch) * hw]);
    if (!channels_last) {
        at::parallel_for(0, n * c, 1, [&](int64_t lo, int64_t hi) {
            for (int64_t row = lo; row < hi; row++) {
                double s[8] = {}, q[8] = {};
                const float lanes[8] = {k[row], k[row], k[row], k[row], k[row], k[row], k[row], k[row]};
                shifted_sums8(x + row * hw, hw / 8, 8, lanes, s, q);
                for (int i = 0; i < 8; i++) sum[row] += s[i], sq[row] += q[i];
            }
        });
    } else {
        // Channels-last: each block of 8 channels of an image is a run of 8
        // every c elements; fixed chunks of pixels, each into its own sums.
        constexpr int64_t kChunk = 1024;
        const int64_t chunks = (hw + kChunk - 1) / kChunk, blocks = c / 8;
        std::vector<double> cs(n * chunks * c, 0.0), cq(n * chunks * c, 0.0);
        at::parallel_for(0, n * chunks * blocks, 1, [&](int64_t lo, int64_t hi) {
            for (int64_t task = lo; task < hi; task++) {
                const int64_t b = task % blocks, chunk = task / blocks % chunks, img = task / blocks / chunks;
                const int64_t p0 = chunk * kChunk, pixels = std::min(kChunk, hw - p0);
                const int64_t at = (img * chunks + chunk) * c + b * 8;
                shifted_sums8(x + (img * hw + p0) * c + b * 8, pixels, c, &k[img * c + b * 8], &cs[at], &cq[at]);
            }
        });
        for (int64_t img = 0; img < n; img++)
            for (int64_t chunk = 0; chunk < chunks; chunk++)
                for (int64_t ch = 0; ch < c; ch++) {
                    sum[img * c + ch] += cs[(img * chunks + chunk) * c + ch];
                    sq[img * c + ch] += cq[(img * chunks + chunk) * c + ch];
                }
    }
    // Per (image, channel): y = x * a + b.
    std::vector<float> a(n * c), b(n * c);
    const double count = static_cast<double>(per_group * hw);
    for (int64_t img = 0; img < n; img++)
        for (int64_t g = 0; g < groups; g++) {
            double s = 0, q = 0;  // about zero, in double: exact enough from the shifted sums
            for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ch++) {
                const double kc = k[img * c + ch], sc = sum[img * c + ch];
                s += sc + hw * kc;
                q += sq[img * c + ch] + 2 * kc * sc + hw * kc * kc;
            }
            const double mean = s / count, var = std::max(0.0, q / count - mean * mean);
            const double rstd = 1.0 / std::sqrt(var + eps);
            for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ch++) {
                a[img * c + ch] = static_cast<float>(rstd * gamma[ch]);
                b[img * c + ch] = static_cast<float>(beta[ch] - mean * rstd * gamma[ch]);
            }
        }
    if (!channels_last) {
        at::parallel_for(0, n * c, 1, [&](int64_t lo, int64_t hi) {
            for (int64_t row = lo; row < hi; row++) affine_run(x + row * hw, y + row * hw, hw, a[row], b[row], silu);
        });
    } else {
        at::parallel_for(0, n * hw, 64, [&](int64_t lo, int64_t hi) {
            for (int64_t px = lo; px < hi; px++) {
                const int64_t img = px / hw;
                affine_pixel(x + px * c, y + px * c, c, &a[img * c], &b[img * c], silu);
            }
        });
    }
}

// One bfloat16 row of n values (a multiple of 8) through buf: widened, the
// mean, the variance about it, then the affine, rounded into y.
__attribute__((target("avx2,fma"))) void layer_norm_row_bf16(const uint16_t *x, uint16_t *y, int64_t n,
                                                             const float *gamma, const float *beta, float eps,
                                                             float *buf) {
    __m256 vs = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 v = load8(x + i);
        _mm256_storeu_ps(buf + i, v);
        vs = _mm256_add_ps(vs, v);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vs);
    double sum = 0;
    for (float l : lanes) sum += l;
    const float mean = static_cast<float>(sum / n);
    const __m256 vm = _mm256_set1_ps(mean);
    __m256 vq = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(buf + i), vm);
        vq = _mm256_fmadd_ps(d, d, vq);
    }
    _mm256_store_ps(lanes, vq);
    double sq = 0;
    for (float l : lanes) sq += l;
    const __m256 vr = _mm256_set1_ps(static_cast<float>(1.0 / std::sqrt(sq / n + eps)));
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(buf + i), vm), vr);
        store8(y + i, _mm256_fmadd_ps(d, _mm256_loadu_ps(gamma + i), _mm256_loadu_ps(beta + i)));
    }
}
#endif

}  // namespace

torch::Tensor group_norm_fast(const torch::Tensor &x, int64_t groups, const torch::Tensor &weight,
                              const torch::Tensor &bias, double eps, bool silu) {
#if defined(__x86_64__)
    const bool dtype_ok = x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16;
    if (has_avx2_fma() && dtype_ok && x.device().is_cpu() && x.dim() == 4 && groups > 0 && x.size(1) % groups == 0 &&
        x.numel() > 0) {
        const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
        const bool cl = is_channels_last(x);
        if ((cl || x.is_contiguous()) && (cl ? c % 8 == 0 : hw % 8 == 0)) {
            auto gamma = weight.to(torch::kFloat32).contiguous(), beta = bias.to(torch::kFloat32).contiguous();
            auto y = at::empty_like(x);  // keeps x's memory format
            if (x.scalar_type() == torch::kFloat32)
                group_norm_avx2(x.data_ptr<float>(), y.data_ptr<float>(), n, c, hw, groups, cl,
                                gamma.data_ptr<float>(), beta.data_ptr<float>(), eps, silu);
            else
                group_norm_avx2(reinterpret_cast<const uint16_t *>(x.data_ptr<at::BFloat16>()),
                                reinterpret_cast<uint16_t *>(y.data_ptr<at::BFloat16>()), n, c, hw, groups, cl,
                                gamma.data_ptr<float>(), beta.data_ptr<float>(), eps, silu);
            return y;
        }
    }
#endif
    return torch::Tensor();
}

int64_t kernel_threads() {
    std::mutex mu;
    std::set<std::thread::id> seen;
    // Rows enough for every thread, each long enough that no thread finishes
    // all of its rows before the others start.
    at::parallel_for(0, 64, 1, [&](int64_t, int64_t) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        std::lock_guard<std::mutex> lock(mu);
        seen.insert(std::this_thread::get_id());
    });
    return static_cast<int64_t>(seen.size());
}

torch::Tensor layer_norm_bf16_fast(const torch::Tensor &x, const torch::Tensor &weight, const torch::Tensor &bias,
                                   double eps) {
#if defined(__x86_64__)
    if (has_avx2_fma() && x.scalar_type() == torch::kBFloat16 && x.device().is_cpu() && x.dim() >= 1 &&
        x.numel() > 0 && x.size(-1) % 8 == 0 && weight.numel() == x.size(-1) && bias.numel() == x.size(-1)) {
        const auto in = x.contiguous();
        const int64_t n = in.size(-1), rows = in.numel() / n;
        auto gamma = weight.to(torch::kFloat32).contiguous(), beta = bias.to(torch::kFloat32).contiguous();
        auto y = at::empty_like(in);
        const auto *src = reinterpret_cast<const uint16_t *>(in.data_ptr<at::BFloat16>());
        auto *dst = reinterpret_cast<uint16_t *>(y.data_ptr<at::BFloat16>());
        const float *g = gamma.data_ptr<float>(), *b = beta.data_ptr<float>();
        at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t lo, int64_t hi) {
            std::vector<float> buf(static_cast<size_t>(n));
            for (int64_t r = lo; r < hi; r++)
                layer_norm_row_bf16(src + r * n, dst + r * n, n, g, b, static_cast<float>(eps), buf.data());
        });
        return y;
    }
#endif
    return torch::Tensor();
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__)
    static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                            __builtin_cpu_supports("avx512bf16");
    return has;
#else
    return false;
#endif
}

int softmax_lanes() {
#if defined(__x86_64__)
    const int limit = lanes_limit.load(std::memory_order_relaxed);
    const int have = cpu_has_avx512_bf16() && has_avx2_fma() ? 16 : has_avx2_fma() ? 8 : 0;
    return limit > 0 ? std::min(limit, have) : have;
#else
    return 0;
#endif
}

void limit_softmax_lanes(int lanes) {
#if defined(__x86_64__)
    lanes_limit.store(lanes, std::memory_order_relaxed);
#endif
}

torch::Tensor softmax_lastdim_(torch::Tensor &x) {
#if defined(__x86_64__)
    if (has_avx2_fma() && x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1) {
        const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
        if (x.scalar_type() == torch::kFloat32) {
            softmax_rows(x.data_ptr<float>(), rows, n);
            return x;
        }
        if (x.scalar_type() == torch::kBFloat16) {
            softmax_rows(reinterpret_cast<uint16_t *>(x.data_ptr<at::BFloat16>()), rows, n);
            return x;
        }
    }
#endif
    x = at::softmax(x, -1);
    return x;
}

namespace {

// Attention on the CPU, head by head and a block of queries at a time, each
// head's queries, keys and values first made contiguous: every product is a
// plain 2-d one on contiguous rows, and a block's scores ([512, 4096] float32:
// 8 MiB) stay in cache between the product, the softmax and the second
// product. libtorch's batched 4-d matmul on transposed heads copied its
// operands and ran bfloat16 through a slow path: at 512² ([2, 4096, 320], 8
// heads) 654 against 262 ms in bfloat16, 1250 against 1116 in float32.
torch::Tensor attention_by_head(const torch::Tensor &q, const torch::Tensor &k, const torch::Tensor &v, int64_t heads,
                                const c10::optional<torch::Tensor> &mask, bool upcast, int64_t max_bytes) {
    constexpr int64_t kBlockRows = 512;
    // Up to this many keys (cross-attention's 77, self-attention from 16²
    // latents down) all heads go through one batched product per block:
    // per-head calls cost more than their work there (bfloat16 [2, 4096, 320]
    // queries on 77 keys: 7.7 against 12.4 ms; [2, 64, 1280] on 64: 0.2
    // against 0.7 ms), while for 1024 keys and more a head's block of scores
    // staying in cache wins (14.5 against 25.8 ms).
    constexpr int64_t kBatchedKeys = 256;
    constexpr int64_t kBatchedScoreBytes = int64_t(32) << 20;
    const auto b = q.size(0), nq = q.size(1), nk = k.size(1), inner = q.size(2), dim = inner / heads;
    const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
    const bool up = upcast && q.scalar_type() != torch::kFloat32;
    const auto score_type = up ? torch::kFloat32 : q.scalar_type();
    auto by_head = [&](const torch::Tensor &t, int64_t n) {
        return t.reshape({b, n, heads, dim}).permute({0, 2, 1, 3}).reshape({b * heads, n, dim});
    };
    auto qh = by_head(up ? q.to(torch::kFloat32) * scale : q * scale, nq);
    auto kh = by_head(up ? k.to(torch::kFloat32) : k, nk);
    torch::Tensor m = mask ? mask->to(score_type) : torch::Tensor();
    const int64_t elem = static_cast<int64_t>(c10::elementSize(score_type));
    const bool batched = nk <= kBatchedKeys;
    // Head by head, bfloat16's second product runs transposed, out^T = v^T ·
    // scores^T, so each head's values and output are [dim, n]: oneDNN's
    // bfloat16 product on a 40-wide result ran at ~270 GFLOP/s, on the
    // 512-wide transposed one at ~370 (SD 1.5 at 512²: [512, 4096] · [4096, 40]).
    const bool transposed = !batched && v.scalar_type() == torch::kBFloat16;
    auto vh = transposed ? v.reshape({b, nk, heads, dim}).permute({0, 2, 3, 1}).reshape({b * heads, dim, nk})
                         : by_head(v, nk);
    auto out = transposed ? torch::empty({b * heads, dim, nq}, v.options()) : torch::empty({b * heads, nq, dim}, v.options());
    auto merged = [&] {
        return transposed ? out.view({b, heads, dim, nq}).permute({0, 3, 1, 2}).reshape({b, nq, inner})
                          : out.view({b, heads, nq, dim}).permute({0, 2, 1, 3}).reshape({b, nq, inner});
    };
    if (batched) {
        // Every head at once, in blocks of queries: with few keys each head's
        // products are too small to pay for a call of their own.
        const int64_t budget = std::min<int64_t>(max_bytes, kBatchedScoreBytes);
        const int64_t block = std::clamp<int64_t>(budget / std::max<int64_t>(1, b * heads * nk * elem), 1, nq);
        auto scores = torch::empty({b * heads, std::min(block, nq), nk}, q.options().dtype(score_type));
        auto kt = kh.transpose(1, 2);
        for (int64_t lo = 0; lo < nq; lo += block) {
            check_cancel();
            const int64_t rows = std::min(block, nq - lo);
            auto s = scores.narrow(1, 0, rows);
            at::bmm_out(s, qh.narrow(1, lo, rows), kt);
            if (m.defined()) s.add_(m.narrow(0, lo, rows));
            softmax_lastdim_(s);
            auto o = out.narrow(1, lo, rows);
            at::bmm_out(o, up ? s.to(v.scalar_type()) : s, vh);
        }
        return merged();
    }
    const int64_t block = std::clamp<int64_t>(max_bytes / std::max<int64_t>(1, nk * elem), 1, kBlockRows);
    auto scores = torch::empty({std::min(block, nq), nk}, q.options().dtype(score_type));
    for (int64_t h = 0; h < b * heads; h++) {
        check_cancel();
        auto qs = qh.select(0, h), kt = kh.select(0, h).t(), vs = vh.select(0, h), os = out.select(0, h);
        for (int64_t lo = 0; lo < nq; lo += block) {
            const int64_t rows = std::min(block, nq - lo);
            auto s = scores.narrow(0, 0, rows);
            at::mm_out(s, qs.narrow(0, lo, rows), kt);
            if (m.defined()) s.add_(m.narrow(0, lo, rows));
            softmax_lastdim_(s);
            auto p = up ? s.to(v.scalar_type()) : s;
            if (transposed) {
                auto o = os.narrow(1, lo, rows);
                at::mm_out(o, vs, p.t());
            } else {
                auto o = os.narrow(0, lo, rows);
                at::mm_out(o, p, vs);
            }
        }
    }
    return merged();
}

}  // namespace

torch::Tensor attention(const torch::Tensor &q, const torch::Tensor &k, const torch::Tensor &v, int64_t heads,
                        const c10::optional<torch::Tensor> &mask, bool upcast, int64_t max_bytes) {
    if (!mask)
        if (auto fused = attention_fused_bf16(q, k, v, heads); fused.defined()) return fused;
    if (q.device().is_cpu() && (!mask || mask->dim() == 2))
        return attention_by_head(q, k, v, heads, mask, upcast, max_bytes);
    const auto b = q.size(0), nq = q.size(1), nk = k.size(1), inner = q.size(2);
    const auto dim = inner / heads;
    auto split = [&](const torch::Tensor &t, int64_t n) { return t.reshape({b, n, heads, dim}).transpose(1, 2); };
    auto qh = split(q, nq), kh = split(k, nk), vh = split(v, nk);
    const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
    const bool half = q.scalar_type() != torch::kFloat32;
    const bool up = upcast && half;
    auto khT = (up ? kh.to(torch::kFloat32) : kh).transpose(-1, -2);
    // One slice of queries [.., lo:hi, ..] against every key.
    auto slice = [&](int64_t lo, int64_t hi) {
        auto qs = qh.slice(2, lo, hi);
        torch::Tensor scores = up ? at::matmul(qs.to(torch::kFloat32), khT) * scale : at::matmul(qs * scale, khT);
        if (mask) scores = scores + mask->slice(0, lo, hi).to(scores.scalar_type());
        auto probs = softmax_lastdim_(scores);
        return at::matmul(up ? probs.to(v.scalar_type()) : probs, vh);
    };
    const int64_t elem = up ? 4 : static_cast<int64_t>(q.element_size());
    const int64_t row_bytes = std::max<int64_t>(1, b * heads * nk * elem);
    const int64_t rows = std::max<int64_t>(1, max_bytes / row_bytes);
    torch::Tensor out;
    if (rows >= nq) {
        out = slice(0, nq);
    } else {
        out = torch::empty({b, heads, nq, dim}, v.options());
        for (int64_t lo = 0; lo < nq; lo += rows) {
            check_cancel();
            out.slice(2, lo, std::min(nq, lo + rows)).copy_(slice(lo, std::min(nq, lo + rows)));
        }
    }
    return out.transpose(1, 2).reshape({b, nq, inner});
}

}  // namespace sw
