#include "layers.h"

#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/version.h>

#include <algorithm>
#include <mutex>

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
    return at::conv2d(x, weight, bias, {stride, stride}, {padding, padding});
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
    weight.set_data(torch::empty({1}).expand(weight.sizes()));
    if (bias.defined()) bias.set_data(torch::empty({1}).expand(bias.sizes()));
}

torch::Tensor LinearImpl::forward(const torch::Tensor &x) {
    if (packed.isNone()) return at::linear(x, weight, bias);
    static const auto dynamic = quantized_op("quantized::linear_dynamic");
    torch::jit::Stack stack{x.to(torch::kFloat32).contiguous(), packed, false};
    dynamic.callBoxed(&stack);
    return stack.at(0).toTensor().to(x.scalar_type());
}

int64_t quantize_linears_int8(torch::nn::Module &m) {
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

torch::Tensor GroupNormImpl::forward(const torch::Tensor &x) {
    // libtorch 1.13's channels-last kernel accumulates half types in their own
    // precision (bf16 320 channels at 32²: max |error| 1.2, against 0.13 for
    // the NCHW kernel); in float32 it is exact to rounding.
    if (x.scalar_type() != torch::kFloat32 && x.is_contiguous(torch::MemoryFormat::ChannelsLast) && !x.is_contiguous())
        return at::group_norm(x.to(torch::kFloat32), groups, weight.to(torch::kFloat32), bias.to(torch::kFloat32), eps)
            .to(x.scalar_type());
    return at::group_norm(x, groups, weight, bias, eps);
}

LayerNormImpl::LayerNormImpl(int64_t dim_, double eps_) : dim(dim_), eps(eps_) {
    weight = register_parameter("weight", empty({dim}), false);
    bias = register_parameter("bias", empty({dim}), false);
}

torch::Tensor LayerNormImpl::forward(const torch::Tensor &x) { return at::layer_norm(x, {dim}, weight, bias, eps); }

EmbeddingImpl::EmbeddingImpl(int64_t count, int64_t dim) {
    weight = register_parameter("weight", empty({count, dim}), false);
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor &ids) { return at::embedding(weight, ids); }

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

torch::Tensor compute_layout(const torch::Tensor &x) {
    if (x.dim() != 4 || !x.device().is_cpu()) return x;
    return x.contiguous(torch::MemoryFormat::ChannelsLast);
}

torch::Tensor attention(const torch::Tensor &q, const torch::Tensor &k, const torch::Tensor &v, int64_t heads,
                        const c10::optional<torch::Tensor> &mask, bool upcast, int64_t max_bytes) {
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
        auto probs = at::softmax(scores, -1);
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
