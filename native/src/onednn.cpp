#include "onednn.h"

#include "common.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#if SW_WITH_DNNL
#include <dnnl.hpp>
#endif

namespace sw {

namespace {

std::atomic<int64_t> calls{0};

#if SW_WITH_DNNL

using dims = dnnl::memory::dims;
using tag = dnnl::memory::format_tag;
constexpr auto f32 = dnnl::memory::data_type::f32;
constexpr auto bf16 = dnnl::memory::data_type::bf16;

dnnl::memory::data_type dnnl_type(torch::ScalarType t) { return t == torch::kBFloat16 ? bf16 : f32; }

dnnl::engine &cpu() {
    static dnnl::engine e(dnnl::engine::kind::cpu, 0);
    return e;
}

// One reorder, run once: the data at `from` (laid out as from_desc) into `to`
// (laid out as to_desc), converting dtypes on the way.
void reorder_once(const dnnl::memory::desc &from_desc, const void *from, const dnnl::memory::desc &to_desc, void *to) {
    dnnl::memory src(from_desc, cpu(), const_cast<void *>(from)), dst(to_desc, cpu(), to);
    dnnl::stream stream(cpu());
    dnnl::reorder(src, dst).execute(stream, src, dst);
    stream.wait();
}

// A bias of o channels as the convolution takes and ATen holds it.
dnnl::memory::desc bias_desc(int64_t o) { return dnnl::memory::desc({o}, f32, tag::a); }

// What a compiled convolution depends on: oneDNN splits its work for the
// thread count it was compiled for.
struct Shape {
    int64_t n, c, o, h, w;
    bool x_channels_last, bias;
    int threads;
    bool operator<(const Shape &s) const {
        return std::tie(n, c, o, h, w, x_channels_last, bias, threads) <
               std::tie(s.n, s.c, s.o, s.h, s.w, s.x_channels_last, s.bias, s.threads);
    }
};

// The convolution runs in bands of output rows: oneDNN's Winograd scratchpad
// holds every tile of the image transformed, ~5× the input ([1, 128, 256, 256]:
// 160 MB), and memory that fresh costs more in page faults than the
// convolution saves. A band's buffers, about this size, are reused from band to
// band and call to call; bands run as fast as the whole image.
constexpr int64_t kBandBytes = 32 << 20;

// A band of output rows and where it sits: the first band pads above, the
// last below; the others read a row of input beyond each edge.
struct Band {
    int64_t rows;
    bool top, bottom;
    int64_t input_rows() const { return rows + !top + !bottom; }
    bool operator==(const Band &b) const { return rows == b.rows && top == b.top && bottom == b.bottom; }
};

// One band's primitives: oneDNN compiles each (JIT) once.
struct BandPlan {
    Band band;
    dnnl::convolution_forward::primitive_desc pd;
    dnnl::convolution_forward conv;
    dnnl::reorder to_src, from_dst;  // from and to the band of the tensors as ATen holds them
    dnnl::memory::desc x_desc, y_desc;
};

// A shape's primitives, and the bytes of the buffers a call uses.
struct Plan {
    int64_t band_rows;
    std::vector<BandPlan> bands;  // each kind of band the image has (at most 3)
    dnnl::memory::desc w_desc;    // the kernel as oneDNN takes it from ATen (dense [out, in, 3, 3])
    dnnl::reorder to_weights;     // into Winograd's transformed layout, shared by the bands
    size_t weights_bytes = 0, src_bytes = 0, dst_bytes = 0, scratch_bytes = 0;
    const BandPlan &find(const Band &b) const {
        for (const auto &p : bands)
            if (p.band == b) return p;
        throw std::logic_error("winograd: no plan for a band");
    }
};

size_t aligned(size_t n) { return (n + 4095) & ~size_t(4095); }

// The strides of a contiguous tensor of dims in NCHW or channels-last, as ATen lays it out.
dims strides_of(const dims &d, bool channels_last) {
    if (channels_last) return {d[1] * d[2] * d[3], 1, d[3] * d[1], d[1]};
    return {d[1] * d[2] * d[3], d[2] * d[3], d[3], 1};
}

BandPlan build_band(const Shape &s, const Band &b) {
    auto any = [](const dims &d) { return dnnl::memory::desc(d, f32, tag::any); };
    const dims x{s.n, s.c, b.input_rows(), s.w}, w{s.o, s.c, 3, 3}, y{s.n, s.o, b.rows, s.w};
    const dims stride{1, 1}, pad_l{b.top ? 1 : 0, 1}, pad_r{b.bottom ? 1 : 0, 1};
    const auto prop = dnnl::prop_kind::forward_inference;
    const auto alg = dnnl::algorithm::convolution_winograd;
    auto d = s.bias ? dnnl::convolution_forward::desc(prop, alg, any(x), any(w), bias_desc(s.o),
                                                      any(y), stride, pad_l, pad_r)
                    : dnnl::convolution_forward::desc(prop, alg, any(x), any(w), any(y), stride, pad_l, pad_r);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // the caller's buffer: calls run from several threads
    BandPlan p;
    p.band = b;
    p.pd = dnnl::convolution_forward::primitive_desc(d, attr, cpu());
    p.conv = dnnl::convolution_forward(p.pd);
    // A band of the whole tensor: its own dims, the whole tensor's strides.
    p.x_desc = dnnl::memory::desc(x, f32, strides_of({s.n, s.c, s.h, s.w}, s.x_channels_last));
    p.y_desc = dnnl::memory::desc(y, f32, strides_of({s.n, s.o, s.h, s.w}, s.x_channels_last));
    p.to_src = dnnl::reorder(dnnl::reorder::primitive_desc(cpu(), p.x_desc, cpu(), p.pd.src_desc()));
    p.from_dst = dnnl::reorder(dnnl::reorder::primitive_desc(cpu(), p.pd.dst_desc(), cpu(), p.y_desc));
    return p;
}

// Each kind of band an image of h rows splits into. Every band has the same
// rows (the last overlaps the one before it): oneDNN lays the transformed
// kernel out differently for bands of other heights.
std::vector<Band> bands_of(int64_t h, int64_t rows) {
    if (h <= rows) return {{h, true, true}};
    std::vector<Band> out{{rows, true, false}};
    if (h > 2 * rows) out.push_back({rows, false, false});
    out.push_back({rows, false, true});
    return out;
}

std::shared_ptr<const Plan> build(const Shape &s) {
    auto plan = std::make_shared<Plan>();
    // Rows per band: a multiple of the 4-row output tile, the band's input,
    // output and transformed tiles (~6× both) within kBandBytes.
    const int64_t row_bytes = s.w * (s.c + s.o) * 4 * 6;
    plan->band_rows = std::max<int64_t>(4, kBandBytes / row_bytes / 4 * 4);
    for (const auto &b : bands_of(s.h, plan->band_rows)) {
        plan->bands.push_back(build_band(s, b));
        const auto &p = plan->bands.back();
        // Every band must take the one transformed kernel.
        if (p.pd.weights_desc() != plan->bands.front().pd.weights_desc())
            throw dnnl::error(dnnl_unimplemented, "winograd: bands want different kernel layouts");
        plan->src_bytes = std::max(plan->src_bytes, aligned(p.pd.src_desc().get_size()));
        plan->dst_bytes = std::max(plan->dst_bytes, aligned(p.pd.dst_desc().get_size()));
        plan->scratch_bytes = std::max(plan->scratch_bytes, aligned(p.pd.scratchpad_desc().get_size()));
    }
    plan->w_desc = dnnl::memory::desc({s.o, s.c, 3, 3}, f32, tag::oihw);
    const auto &wino = plan->bands.front().pd.weights_desc();
    plan->to_weights = dnnl::reorder(dnnl::reorder::primitive_desc(cpu(), plan->w_desc, cpu(), wino));
    plan->weights_bytes = aligned(wino.get_size());
    return plan;
}

// The shape's plan; null where oneDNN has no Winograd kernel for it (its
// AVX-512 kernels want channel counts in multiples of 16, for one).
std::shared_ptr<const Plan> plan_for(const Shape &s) {
    // Bounded: a server that sees many image sizes must not grow without end.
    constexpr size_t kMaxPlans = 64;
    static std::mutex mu;
    static std::map<Shape, std::shared_ptr<const Plan>> plans;
    {
        std::lock_guard<std::mutex> lock(mu);
        if (auto it = plans.find(s); it != plans.end()) return it->second;
    }
    std::shared_ptr<const Plan> plan;
    try {
        plan = build(s);  // outside the lock: compiling takes milliseconds
    } catch (const dnnl::error &e) {
        if (e.status != dnnl_unimplemented) throw;  // the convolution's or a reorder's
    }
    std::lock_guard<std::mutex> lock(mu);
    if (plans.size() >= kMaxPlans) plans.clear();
    return plans.emplace(s, plan).first->second;
}

Shape shape_of(const torch::Tensor &x, const torch::Tensor &weight, const torch::Tensor &bias) {
    return {x.size(0), x.size(1), weight.size(0), x.size(2), x.size(3), is_channels_last(x), bias.defined(),
            at::get_num_threads()};
}

torch::Tensor run(const torch::Tensor &x_, const torch::Tensor &weight_, const torch::Tensor &bias_) {
    // oneDNN's OpenMP kernels take the calling thread's thread count, which
    // ATen sets only on threads that ran one of its parallel loops.
    at::internal::lazy_init_num_threads();
    const Shape s = shape_of(x_, weight_, bias_);
    auto x = s.x_channels_last ? x_ : x_.contiguous();
    // oneDNN 2.6 has no reorder from a channels-last kernel to its Winograd
    // layout; the dense copy costs a few percent of the transform.
    auto weight = weight_.contiguous();
    torch::Tensor bias = bias_.defined() ? bias_.contiguous() : bias_;
    auto plan = plan_for(s);
    if (!plan) throw std::logic_error("conv2d_winograd: oneDNN has no Winograd kernel for this convolution");

    auto y = at::empty({s.n, s.o, s.h, s.w}, x.options().memory_format(s.x_channels_last ? torch::MemoryFormat::ChannelsLast
                                                                                        : torch::MemoryFormat::Contiguous));
    // The buffers, kept by the process from call to call (grown, never
    // shrunk): fresh memory would be page-faulted at every call. One is kept,
    // not one per thread (Go calls arrive on any thread); a call that finds it
    // in use by another takes its own for the call.
    static std::mutex arena_mu;
    static torch::Tensor kept;
    std::unique_lock<std::mutex> lock(arena_mu, std::try_to_lock);
    torch::Tensor own;
    torch::Tensor &arena = lock.owns_lock() ? kept : own;
    const size_t need = plan->weights_bytes + plan->src_bytes + plan->dst_bytes + plan->scratch_bytes;
    if (!arena.defined() || static_cast<size_t>(arena.numel()) < need)
        arena = at::empty({static_cast<int64_t>(need)}, x.options().dtype(torch::kUInt8));
    auto *base = static_cast<uint8_t *>(arena.data_ptr());
    uint8_t *w_buf = base, *src_buf = w_buf + plan->weights_bytes, *dst_buf = src_buf + plan->src_bytes,
            *scratch_buf = dst_buf + plan->dst_bytes;

    dnnl::stream stream(cpu());
    const auto &first = plan->bands.front().pd;
    dnnl::memory weights(first.weights_desc(), cpu(), w_buf);
    dnnl::memory user_weights(plan->w_desc, cpu(), weight.data_ptr());
    plan->to_weights.execute(stream, user_weights, weights);
    std::optional<dnnl::memory> bias_mem;
    if (bias.defined()) bias_mem.emplace(bias_desc(s.o), cpu(), bias.data_ptr());
    auto *xp = x.data_ptr<float>();
    auto *yp = y.data_ptr<float>();
    const int64_t rows = std::min(plan->band_rows, s.h);
    for (int64_t next = 0; next < s.h; next += rows) {
        const int64_t r0 = std::min(next, s.h - rows);  // the last band ends at the last row
        const Band b{rows, r0 == 0, r0 + rows == s.h};
        const auto &p = plan->find(b);
        dnnl::memory user_src(p.x_desc, cpu(), xp + (r0 - !b.top) * x.stride(2));
        dnnl::memory src(p.pd.src_desc(), cpu(), src_buf), dst(p.pd.dst_desc(), cpu(), dst_buf);
        dnnl::memory user_dst(p.y_desc, cpu(), yp + r0 * y.stride(2));
        p.to_src.execute(stream, user_src, src);
        std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, src},
                                                   {DNNL_ARG_WEIGHTS, weights},
                                                   {DNNL_ARG_DST, dst},
                                                   {DNNL_ARG_SCRATCHPAD, dnnl::memory(p.pd.scratchpad_desc(), cpu(), scratch_buf)}};
        if (bias_mem) args.emplace(DNNL_ARG_BIAS, *bias_mem);
        p.conv.execute(stream, args);
        p.from_dst.execute(stream, dst, user_dst);
    }
    stream.wait();
    return y;
}

#endif  // SW_WITH_DNNL

// Runs check, which says why what it probes disagrees ("" where it agrees),
// once per caller; logs `failing` and the reason (or what it threw) when it
// does not pass.
bool probe(const std::string &failing, const std::function<std::string()> &check) {
    std::string why;
    try {
        torch::NoGradGuard no_grad;
        why = check();
    } catch (const std::exception &e) {
        why = e.what();
        why = why.substr(0, why.find('\n'));
    }
    if (!why.empty()) log(SW_LOG_INFO, failing + " (" + why + ")");
    return why.empty();
}

constexpr const char *kNoDNNL = "this build has no oneDNN 2 headers (Debian: libdnnl-dev)";

// Whether Winograd runs here and agrees with at::conv2d, checked once.
bool winograd_works() {
    static const bool works = probe("convolutions do not run as Winograd", []() -> std::string {
#if SW_WITH_DNNL
        auto gen = at::detail::createCPUGenerator(2);
        // Both of oneDNN's Winograd kernels: F(2×2, 3×3) takes small
        // images, F(4×4, 3×3) large ones.
        double err = 0;
        for (int64_t size : {20, 128}) {
            auto w = torch::randn({32, 32, 3, 3}, gen).div(16);
            auto b = torch::randn({32}, gen);
            auto x = torch::randn({1, 32, size, size + 4}, gen);
            auto want = at::conv2d(x, w, b, {1, 1}, {1, 1});
            for (bool cl : {false, true}) {
                auto in = cl ? x.contiguous(torch::MemoryFormat::ChannelsLast) : x;
                auto got = run(in, cl ? w.contiguous(torch::MemoryFormat::ChannelsLast) : w, b);
                err = std::max(err, (got - want).abs().max().item<double>());
            }
        }
        return err <= 1e-4 ? "" : "differs from at::conv2d by " + std::to_string(err);
#else
        return kNoDNNL;
#endif
    });
    return works;
}

}  // namespace

bool winograd_applies(const torch::Tensor &x, const torch::Tensor &weight, const torch::Tensor &bias, int64_t stride,
                      int64_t padding) {
    if (stride != 1 || padding != 1 || x.dim() != 4 || weight.dim() != 4) return false;
    if (!x.device().is_cpu() || x.scalar_type() != torch::kFloat32 || weight.scalar_type() != torch::kFloat32) return false;
    if (weight.size(2) != 3 || weight.size(3) != 3 || x.size(2) * x.size(3) < kWinogradMinPixels) return false;
    if (weight.size(1) != x.size(1) || (bias.defined() && bias.numel() != weight.size(0))) return false;
    if (x.size(1) % 16 != 0 || weight.size(0) % 16 != 0) return false;  // oneDNN's fast kernels' blocks
    if (!winograd_works()) return false;
#if SW_WITH_DNNL
    return plan_for(shape_of(x, weight, bias)) != nullptr;
#else
    return false;
#endif
}

torch::Tensor conv2d_winograd(const torch::Tensor &x, const torch::Tensor &weight, const torch::Tensor &bias) {
#if SW_WITH_DNNL
    calls.fetch_add(1, std::memory_order_relaxed);
    return run(x, weight, bias);
#else
    throw std::logic_error("conv2d_winograd: this build has no oneDNN");
#endif
}

bool onednn_built() { return SW_WITH_DNNL != 0; }

int64_t winograd_calls() { return calls.load(std::memory_order_relaxed); }

// ---- bfloat16 linear layers on blocked weights ----

#if SW_WITH_DNNL
struct BlockedLinear {
    int64_t in = 0, out = 0;
    dnnl::memory::desc desc;  // the blocked layout
    torch::Tensor bytes;      // the weight in it
};
#endif

namespace {

#if SW_WITH_DNNL


// The rows the layout is asked for with: oneDNN's blocked bfloat16 layout for
// a [in, out] weight is the same for every row count (checked here for 1 to
// 32768 rows of SD 1.5's shapes); a call whose matmul runs this layout only
// in oneDNN's reference code is refused, not slowed (matmul_for).
constexpr int64_t kLayoutRows = 2048;

struct MatmulKey {
    int64_t m, k, n;
    LinearPost post;
    bool bias;
    int threads;
    bool operator<(const MatmulKey &o) const {
        return std::tie(m, k, n, post, bias, threads) < std::tie(o.m, o.k, o.n, o.post, o.bias, o.threads);
    }
};

struct Matmul {
    dnnl::matmul::primitive_desc pd;
    dnnl::matmul prim;
};

dnnl::matmul::primitive_desc matmul_pd(const MatmulKey &k, const dnnl::memory::desc &weights) {
    const dnnl::memory::desc x({k.m, k.k}, bf16, tag::ab), y({k.m, k.n}, bf16, tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // the call's buffer: calls run from several threads
    dnnl::post_ops ops;
    switch (k.post) {
    case LinearPost::None: break;
    case LinearPost::Gelu: ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_gelu_erf, 0.0f, 0.0f); break;
    case LinearPost::Mul: ops.append_binary(dnnl::algorithm::binary_mul, y); break;
    case LinearPost::Add: ops.append_binary(dnnl::algorithm::binary_add, y); break;
    }
    attr.set_post_ops(ops);
    auto d = k.bias ? dnnl::matmul::desc(x, weights, dnnl::memory::desc({1, k.n}, bf16, tag::ab), y)
                    : dnnl::matmul::desc(x, weights, y);
    return dnnl::matmul::primitive_desc(d, attr, cpu());
}

// A native kernel, not oneDNN's reference loops (which it falls back to on a
// CPU without bfloat16 instructions, at a fraction of libtorch's speed): a
// matmul's or a convolution's primitive descriptor.
template <typename PrimitiveDesc>
bool native_kernel(const PrimitiveDesc &pd) {
    return std::string(pd.impl_info_str()).rfind("ref", 0) != 0;
}

std::shared_ptr<const Matmul> matmul_for(const MatmulKey &k, const dnnl::memory::desc &weights) {
    // Bounded: a server that sees many image sizes must not grow without end.
    constexpr size_t kMaxMatmuls = 512;
    static std::mutex mu;
    static std::map<MatmulKey, std::shared_ptr<const Matmul>> made;
    {
        std::lock_guard<std::mutex> lock(mu);
        if (auto it = made.find(k); it != made.end()) return it->second;
    }
    auto pd = matmul_pd(k, weights);  // outside the lock: compiling takes milliseconds
    if (!native_kernel(pd))
        throw std::runtime_error(std::string("blocked linear: oneDNN runs [") + std::to_string(k.m) + ", " +
                                 std::to_string(k.k) + "] x [" + std::to_string(k.k) + ", " + std::to_string(k.n) +
                                 "] on the blocked weight only as " + pd.impl_info_str());
    auto mm = std::make_shared<const Matmul>(Matmul{pd, dnnl::matmul(pd)});
    std::lock_guard<std::mutex> lock(mu);
    if (made.size() >= kMaxMatmuls) made.clear();
    return made.emplace(k, mm).first->second;
}

std::shared_ptr<const BlockedLinear> pack(const torch::Tensor &w_) {
    const int64_t out = w_.size(0), in = w_.size(1);
    const auto any = dnnl::memory::desc({in, out}, bf16, tag::any);
    auto pd = matmul_pd({kLayoutRows, in, out, LinearPost::None, false, at::get_num_threads()}, any);
    auto lin = std::make_shared<BlockedLinear>();
    lin->in = in;
    lin->out = out;
    lin->desc = pd.weights_desc();
    lin->bytes = at::empty({static_cast<int64_t>(lin->desc.get_size())}, torch::TensorOptions().dtype(torch::kUInt8));
    // w as oneDNN sees [in, out] transposed, with the tensor's own strides:
    // one reorder converts and blocks it, whatever its dtype and layout.
    auto w = w_.scalar_type() == torch::kFloat32 || w_.scalar_type() == torch::kBFloat16 ? w_ : w_.to(torch::kFloat32);
    const dnnl::memory::desc src({in, out}, dnnl_type(w.scalar_type()), dims{w.stride(1), w.stride(0)});
    reorder_once(src, w.data_ptr(), lin->desc, lin->bytes.data_ptr());
    return lin;
}

torch::Tensor run_linear(const BlockedLinear &w, const torch::Tensor &x_, const torch::Tensor &bias_, LinearPost post,
                         const torch::Tensor &other_) {
    at::internal::lazy_init_num_threads();  // see run
    auto x = x_.reshape({-1, w.in}).contiguous();
    const MatmulKey key{x.size(0), w.in, w.out, post, bias_.defined(), at::get_num_threads()};
    auto out_sizes = x_.sizes().vec();
    out_sizes.back() = w.out;
    auto y = at::empty({key.m, key.n}, x.options());
    if (key.m == 0) return y.reshape(out_sizes);
    const auto mm = matmul_for(key, w.desc);
    dnnl::stream stream(cpu());
    auto scratch = at::empty({static_cast<int64_t>(mm->pd.scratchpad_desc().get_size())}, x.options().dtype(torch::kUInt8));
    std::unordered_map<int, dnnl::memory> args{
        {DNNL_ARG_SRC, dnnl::memory(mm->pd.src_desc(), cpu(), x.data_ptr())},
        {DNNL_ARG_WEIGHTS, dnnl::memory(w.desc, cpu(), w.bytes.data_ptr())},
        {DNNL_ARG_DST, dnnl::memory(mm->pd.dst_desc(), cpu(), y.data_ptr())},
        {DNNL_ARG_SCRATCHPAD, dnnl::memory(mm->pd.scratchpad_desc(), cpu(), scratch.data_ptr())}};
    torch::Tensor bias, other;
    if (key.bias) {
        bias = bias_.contiguous();
        args.emplace(DNNL_ARG_BIAS, dnnl::memory(mm->pd.bias_desc(), cpu(), bias.data_ptr()));
    }
    if (post == LinearPost::Mul || post == LinearPost::Add) {
        other = other_.reshape({key.m, key.n}).contiguous();
        args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                     dnnl::memory(mm->pd.dst_desc(), cpu(), other.data_ptr()));
    }
    mm->prim.execute(stream, args);
    stream.wait();
    return y.reshape(out_sizes);
}

#endif  // SW_WITH_DNNL

// Whether blocked bfloat16 linears run here and agree with at::linear (each
// fused operation too), checked once.
bool blocked_linears_work() {
    static const bool works = probe("bfloat16 linear layers are not blocked", []() -> std::string {
#if SW_WITH_DNNL
        auto gen = at::detail::createCPUGenerator(3);
        auto w = torch::randn({48, 40}, gen).div(8);
        auto b = torch::randn({48}, gen).to(torch::kBFloat16);
        auto x = torch::randn({2, 5, 40}, gen).to(torch::kBFloat16);
        auto other = torch::randn({2, 5, 48}, gen).to(torch::kBFloat16);
        auto lin = pack(w.t().contiguous().t());  // a transposed view: the reorder reads strides
        auto plain = at::linear(x.to(torch::kFloat32), w.to(torch::kBFloat16).to(torch::kFloat32), b.to(torch::kFloat32));
        const std::pair<LinearPost, torch::Tensor> cases[] = {{LinearPost::None, plain},
                                                              {LinearPost::Gelu, at::gelu(plain)},
                                                              {LinearPost::Mul, plain * other.to(torch::kFloat32)},
                                                              {LinearPost::Add, plain + other.to(torch::kFloat32)}};
        double err = 0;
        for (const auto &[post, want] : cases) {
            auto got = run_linear(*lin, x, b, post, other).to(torch::kFloat32);
            err = std::max(err, ((got - want).abs() / (want.abs() + 1)).max().item<double>());
        }
        // bfloat16 rounding of the result and of other
        return err <= 1.0 / 64 ? "" : "differs from at::linear by " + std::to_string(err);
#else
        return kNoDNNL;
#endif
    });
    return works;
}

}  // namespace

bool block_linears(torch::ScalarType dtype, const torch::Device &device) {
    return device.is_cpu() && dtype == torch::kBFloat16 && blocked_linears_work();
}

std::shared_ptr<const BlockedLinear> block_linear(const torch::Tensor &w, torch::ScalarType dtype) {
    if (w.dim() != 2 || !block_linears(dtype, w.device()))
        throw std::logic_error("block_linear: blocked linears do not apply here");
#if SW_WITH_DNNL
    return pack(w);
#else
    return nullptr;
#endif
}

torch::Tensor linear_blocked(const BlockedLinear &w, const torch::Tensor &x, const torch::Tensor &bias, LinearPost post,
                             const torch::Tensor &other) {
#if SW_WITH_DNNL
    if (x.scalar_type() != torch::kBFloat16 || !x.device().is_cpu() || x.dim() < 1 || x.size(-1) != w.in)
        throw std::invalid_argument("linear_blocked: x must be bfloat16 [..., " + std::to_string(w.in) + "] on the CPU");
    if ((post == LinearPost::Mul || post == LinearPost::Add) &&
        (!other.defined() || other.scalar_type() != torch::kBFloat16 || other.numel() != x.numel() / w.in * w.out))
        throw std::invalid_argument("linear_blocked: other must be bfloat16 of the result's shape");
    return run_linear(w, x, bias, post, other);
#else
    throw std::logic_error("linear_blocked: this build has no oneDNN");
#endif
}

int64_t blocked_bytes(const BlockedLinear &w) {
#if SW_WITH_DNNL
    return w.bytes.numel();
#else
    return 0;
#endif
}

// ---- convolutions on blocked kernels ----

#if SW_WITH_DNNL
struct BlockedConv {
    int64_t out = 0, in = 0, kh = 0, kw = 0, stride = 1, padding = 0;
    torch::ScalarType dtype = torch::kFloat32;
    dnnl::memory::format_tag src_tag = dnnl::memory::format_tag::any;  // the input's layout the kernel's goes with
    dnnl::memory::desc desc;  // the blocked layout
    torch::Tensor bytes;      // the kernel in it
};
#endif

namespace {

#if SW_WITH_DNNL

// The input the kernel's layout is chosen for: oneDNN's direct kernels block
// the kernel by channels only, so the layout is the same for every input size
// (a call whose convolution would not run it natively is refused, not slowed:
// conv_for).
constexpr int64_t kLayoutBatch = 2, kLayoutSide = 32;

// The input layouts a kernel's is chosen with, the first whose convolution
// runs natively: channels in blocks of 16 (libtorch's own choice, and its
// kernel is the cheapest to reorder into: 6.4 ms for bfloat16 [1280, 1280,
// 3, 3] from float32, against 19.7 ms for the channels-last kernel oneDNN 2.6
// prefers when left to choose), else channels-last (where the channels do not
// fill a block: the UNet's first convolution, 4 of them).
constexpr dnnl::memory::format_tag kSrcTags[] = {dnnl::memory::format_tag::aBcd16b, dnnl::memory::format_tag::abcd,
                                                  dnnl::memory::format_tag::acdb};

struct ConvKey {
    int64_t n, c, o, h, w, kh, kw, stride, padding;
    torch::ScalarType dtype, bias;  // bias: Undefined where there is none
    dnnl::memory::format_tag src_tag;
    int threads;
    bool operator<(const ConvKey &k) const {
        return std::tie(n, c, o, h, w, kh, kw, stride, padding, dtype, bias, src_tag, threads) <
               std::tie(k.n, k.c, k.o, k.h, k.w, k.kh, k.kw, k.stride, k.padding, k.dtype, k.bias, k.src_tag, k.threads);
    }
    int64_t out_h() const { return (h + 2 * padding - kh) / stride + 1; }
    int64_t out_w() const { return (w + 2 * padding - kw) / stride + 1; }
};

struct Conv {
    dnnl::convolution_forward::primitive_desc pd;
    dnnl::convolution_forward prim;
    dnnl::memory::desc x_desc, y_desc;  // as ATen holds x and the result: NCHW
    dnnl::reorder to_src, from_dst;     // into and out of the primitive's layouts where they differ
    bool src_differs, dst_differs;
    size_t src_bytes, dst_bytes, scratch_bytes;
};

dnnl::convolution_forward::primitive_desc conv_pd(const ConvKey &k, const dnnl::memory::desc &weights) {
    const auto dt = dnnl_type(k.dtype);
    const dnnl::memory::desc x({k.n, k.c, k.h, k.w}, dt, k.src_tag), y({k.n, k.o, k.out_h(), k.out_w()}, dt, tag::any);
    const dims strides{k.stride, k.stride}, pad{k.padding, k.padding};
    const auto prop = dnnl::prop_kind::forward_inference;
    const auto alg = dnnl::algorithm::convolution_direct;
    auto d = k.bias != torch::ScalarType::Undefined
                 ? dnnl::convolution_forward::desc(prop, alg, x, weights, dnnl::memory::desc({k.o}, dnnl_type(k.bias), tag::a),
                                                   y, strides, pad, pad)
                 : dnnl::convolution_forward::desc(prop, alg, x, weights, y, strides, pad, pad);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // the call's buffer: calls run from several threads
    return dnnl::convolution_forward::primitive_desc(d, attr, cpu());
}

std::shared_ptr<const Conv> conv_for(const ConvKey &k, const dnnl::memory::desc &weights) {
    // Bounded: a server that sees many image sizes must not grow without end.
    constexpr size_t kMaxConvs = 1024;
    static std::mutex mu;
    static std::map<ConvKey, std::shared_ptr<const Conv>> made;
    {
        std::lock_guard<std::mutex> lock(mu);
        // A kernel blocked for another thread count may have another layout.
        if (auto it = made.find(k); it != made.end() && it->second->pd.weights_desc() == weights) return it->second;
    }
    auto pd = conv_pd(k, weights);  // outside the lock: compiling takes milliseconds
    if (!native_kernel(pd))
        throw std::runtime_error(std::string("blocked convolution: oneDNN runs it on the blocked kernel only as ") +
                                 pd.impl_info_str());
    const auto dt = dnnl_type(k.dtype);
    auto c = std::make_shared<Conv>();
    c->pd = pd;
    c->prim = dnnl::convolution_forward(pd);
    c->x_desc = dnnl::memory::desc({k.n, k.c, k.h, k.w}, dt, tag::nchw);
    c->y_desc = dnnl::memory::desc({k.n, k.o, k.out_h(), k.out_w()}, dt, tag::nchw);
    c->src_differs = pd.src_desc() != c->x_desc;
    c->dst_differs = pd.dst_desc() != c->y_desc;
    if (c->src_differs) c->to_src = dnnl::reorder(dnnl::reorder::primitive_desc(cpu(), c->x_desc, cpu(), pd.src_desc()));
    if (c->dst_differs) c->from_dst = dnnl::reorder(dnnl::reorder::primitive_desc(cpu(), pd.dst_desc(), cpu(), c->y_desc));
    c->src_bytes = c->src_differs ? aligned(pd.src_desc().get_size()) : 0;
    c->dst_bytes = c->dst_differs ? aligned(pd.dst_desc().get_size()) : 0;
    c->scratch_bytes = aligned(pd.scratchpad_desc().get_size());
    std::lock_guard<std::mutex> lock(mu);
    if (made.size() >= kMaxConvs) made.clear();
    return made.insert_or_assign(k, c).first->second;
}

// Rows (output channels) of a dense kernel, reordered into their place in c's
// layout: its blocks of output channels lie one after another, so a run of
// them starting at a multiple of the block is a sub-tensor of the layout.
void put_rows(const BlockedConv &c, int64_t row0, const torch::Tensor &rows_) {
    const auto rows = rows_.scalar_type() == torch::kFloat32 || rows_.scalar_type() == torch::kBFloat16
                          ? rows_
                          : rows_.to(torch::kFloat32);
    if (rows.dim() != 4 || row0 < 0 || row0 + rows.size(0) > c.out || rows.size(1) != c.in || rows.size(2) != c.kh ||
        rows.size(3) != c.kw)
        throw std::invalid_argument("block_conv: rows that are not the kernel's");
    const bool whole = row0 == 0 && rows.size(0) == c.out;
    const auto to_desc = whole ? c.desc : c.desc.submemory_desc(rows.sizes().vec(), {row0, 0, 0, 0});
    const dnnl::memory::desc src(rows.sizes().vec(), dnnl_type(rows.scalar_type()), rows.strides().vec());
    reorder_once(src, rows.data_ptr(), to_desc, c.bytes.data_ptr());
}

std::shared_ptr<const BlockedConv> pack_conv(c10::IntArrayRef sizes, torch::ScalarType dtype, int64_t stride,
                                             int64_t padding, const std::function<void(const PutRows &)> &fill) {
    auto c = std::make_shared<BlockedConv>();
    c->out = sizes[0];
    c->in = sizes[1];
    c->kh = sizes[2];
    c->kw = sizes[3];
    c->stride = stride;
    c->padding = padding;
    c->dtype = dtype;
    std::string impl;
    for (const auto src_tag : kSrcTags) {
        const ConvKey layout{kLayoutBatch, c->in, c->out, std::max(kLayoutSide, c->kh), std::max(kLayoutSide, c->kw),
                             c->kh, c->kw, stride, padding, dtype, torch::ScalarType::Undefined, src_tag,
                             at::get_num_threads()};
        const auto pd = conv_pd(layout, dnnl::memory::desc({c->out, c->in, c->kh, c->kw}, dnnl_type(dtype), tag::any));
        impl = pd.impl_info_str();
        if (!native_kernel(pd)) continue;
        c->src_tag = src_tag;
        c->desc = pd.weights_desc();
        break;
    }
    if (c->src_tag == tag::any)
        throw std::runtime_error("blocked convolution: oneDNN runs [" + std::to_string(c->out) + ", " +
                                 std::to_string(c->in) + ", " + std::to_string(c->kh) + ", " + std::to_string(c->kw) +
                                 "] only as " + impl);
    c->bytes = at::empty({static_cast<int64_t>(c->desc.get_size())}, torch::TensorOptions().dtype(torch::kUInt8));
    // Each run of rows: one reorder converts and blocks it, whatever its
    // dtype and strides.
    fill([&](int64_t row0, const torch::Tensor &rows) { put_rows(*c, row0, rows); });
    return c;
}

torch::Tensor run_conv(const BlockedConv &w, const torch::Tensor &x_, const torch::Tensor &bias_) {
    at::internal::lazy_init_num_threads();  // see run
    const auto x = x_.contiguous();
    const auto bias = bias_.defined() ? bias_.contiguous() : bias_;
    const ConvKey key{x.size(0),  w.in,     w.out,     x.size(2), x.size(3),
                      w.kh,       w.kw,     w.stride,  w.padding, w.dtype,
                      bias.defined() ? bias.scalar_type() : torch::ScalarType::Undefined,
                      w.src_tag,  at::get_num_threads()};
    auto y = at::empty({key.n, key.o, key.out_h(), key.out_w()}, x.options());
    if (y.numel() == 0) return y;
    const auto conv = conv_for(key, w.desc);
    // The primitive's own layouts of x and the result, and its scratchpad, in
    // one buffer of the call's.
    auto buf = at::empty({static_cast<int64_t>(conv->src_bytes + conv->dst_bytes + conv->scratch_bytes)},
                         x.options().dtype(torch::kUInt8));
    auto *base = static_cast<uint8_t *>(buf.data_ptr());
    dnnl::stream stream(cpu());
    dnnl::memory user_src(conv->x_desc, cpu(), x.data_ptr()), user_dst(conv->y_desc, cpu(), y.data_ptr());
    dnnl::memory src = conv->src_differs ? dnnl::memory(conv->pd.src_desc(), cpu(), base) : user_src;
    dnnl::memory dst = conv->dst_differs ? dnnl::memory(conv->pd.dst_desc(), cpu(), base + conv->src_bytes) : user_dst;
    if (conv->src_differs) conv->to_src.execute(stream, user_src, src);
    std::unordered_map<int, dnnl::memory> args{
        {DNNL_ARG_SRC, src},
        {DNNL_ARG_WEIGHTS, dnnl::memory(w.desc, cpu(), w.bytes.data_ptr())},
        {DNNL_ARG_DST, dst},
        {DNNL_ARG_SCRATCHPAD,
         dnnl::memory(conv->pd.scratchpad_desc(), cpu(), base + conv->src_bytes + conv->dst_bytes)}};
    if (bias.defined()) args.emplace(DNNL_ARG_BIAS, dnnl::memory(conv->pd.bias_desc(), cpu(), bias.data_ptr()));
    conv->prim.execute(stream, args);
    if (conv->dst_differs) conv->from_dst.execute(stream, dst, user_dst);
    stream.wait();
    return y;
}

torch::Tensor run_unblock(const BlockedConv &w) {
    auto out = at::empty({w.out, w.in, w.kh, w.kw}, torch::TensorOptions().dtype(w.dtype));
    reorder_once(w.desc, w.bytes.data_ptr(), dnnl::memory::desc(out.sizes().vec(), dnnl_type(w.dtype), tag::oihw),
                 out.data_ptr());
    return out;
}

#endif  // SW_WITH_DNNL

// Whether blocked convolutions of dtype run here and agree with at::conv2d,
// checked once per dtype: the shapes the models have (3×3 with stride 1 and 2,
// 1×1, phase kernels' 2×2 with padding 1), with and without bias.
bool blocked_convolutions_work(torch::ScalarType dtype) {
    static std::mutex mu;
    static std::map<torch::ScalarType, bool> known;
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = known.find(dtype); it != known.end()) return it->second;
    const bool works = probe(std::string(c10::toString(dtype)) + " convolution kernels are not blocked", [&]() -> std::string {
#if SW_WITH_DNNL
        auto gen = at::detail::createCPUGenerator(4);
        struct Case {
            int64_t in, out, k, stride, padding;
            bool bias;
        };
        double err = 0;
        for (const Case &c : {Case{24, 32, 3, 1, 1, true}, Case{32, 16, 3, 2, 1, false}, Case{24, 40, 1, 1, 0, true},
                              Case{16, 32, 2, 1, 1, true}}) {
            auto w = torch::randn({c.out, c.in, c.k, c.k}, gen).div(8).to(dtype);
            auto b = c.bias ? torch::randn({c.out}, gen).to(dtype) : torch::Tensor();
            auto x = torch::randn({2, c.in, 9, 7}, gen).to(dtype);
            auto want = at::conv2d(x.to(torch::kFloat32), w.to(torch::kFloat32), b.defined() ? b.to(torch::kFloat32) : b,
                                   {c.stride, c.stride}, {c.padding, c.padding});
            auto got = run_conv(*pack_conv(w.sizes(), dtype, c.stride, c.padding, [&](const PutRows &put) { put(0, w); }),
                                x, b)
                           .to(torch::kFloat32);
            if (got.sizes() != want.sizes()) return "a result of another shape";
            err = std::max(err, ((got - want).abs() / (want.abs() + 1)).max().item<double>());
        }
        const double limit = dtype == torch::kFloat32 ? 1e-5 : 1.0 / 64;  // bfloat16 rounding of the result
        return err <= limit ? "" : "differs from at::conv2d by " + std::to_string(err);
#else
        return kNoDNNL;
#endif
    });
    known[dtype] = works;
    return works;
}

}  // namespace

bool block_convolutions(torch::ScalarType dtype, const torch::Device &device) {
    return device.is_cpu() && (dtype == torch::kFloat32 || dtype == torch::kBFloat16) && blocked_convolutions_work(dtype);
}

std::shared_ptr<const BlockedConv> block_conv(const torch::Tensor &w, torch::ScalarType dtype, int64_t stride,
                                              int64_t padding) {
    if (w.dim() != 4) throw std::invalid_argument("block_conv: want a [out, in, kh, kw] kernel");
    return block_conv(w.sizes(), dtype, stride, padding, [&](const PutRows &put) { put(0, w); });
}

std::shared_ptr<const BlockedConv> block_conv(c10::IntArrayRef sizes, torch::ScalarType dtype, int64_t stride,
                                              int64_t padding, const std::function<void(const PutRows &)> &fill) {
    if (sizes.size() != 4 || !block_convolutions(dtype, torch::kCPU))
        throw std::logic_error("block_conv: blocked convolutions do not apply here");
#if SW_WITH_DNNL
    return pack_conv(sizes, dtype, stride, padding, fill);
#else
    return nullptr;
#endif
}

torch::Tensor conv_blocked(const BlockedConv &w, const torch::Tensor &x, const torch::Tensor &bias) {
#if SW_WITH_DNNL
    if (x.scalar_type() != w.dtype || !x.device().is_cpu() || x.dim() != 4 || x.size(1) != w.in)
        throw std::invalid_argument("conv_blocked: x must be " + std::string(c10::toString(w.dtype)) + " [n, " +
                                    std::to_string(w.in) + ", h, w] on the CPU");
    if (x.size(2) + 2 * w.padding < w.kh || x.size(3) + 2 * w.padding < w.kw)
        throw std::invalid_argument("conv_blocked: x is smaller than the kernel");
    if (bias.defined() && (bias.numel() != w.out || (bias.scalar_type() != torch::kFloat32 && bias.scalar_type() != w.dtype)))
        throw std::invalid_argument("conv_blocked: bias must be [" + std::to_string(w.out) + "] in float32 or the kernel's dtype");
    return run_conv(w, x, bias);
#else
    throw std::logic_error("conv_blocked: this build has no oneDNN");
#endif
}

torch::Tensor unblock_conv(const BlockedConv &w) {
#if SW_WITH_DNNL
    return run_unblock(w);
#else
    throw std::logic_error("unblock_conv: this build has no oneDNN");
#endif
}

bool copy_strided(const torch::Tensor &src, torch::Tensor &dst) {
#if SW_WITH_DNNL
    auto takes = [](const torch::Tensor &t) {
        return t.device().is_cpu() && (t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16) &&
               t.dim() >= 1 && t.dim() <= DNNL_MAX_NDIMS && t.numel() > 0 && t.is_non_overlapping_and_dense();
    };
    if (!takes(src) || !takes(dst) || src.sizes() != dst.sizes()) return false;
    reorder_once(dnnl::memory::desc(src.sizes().vec(), dnnl_type(src.scalar_type()), src.strides().vec()),
                 src.data_ptr(), dnnl::memory::desc(dst.sizes().vec(), dnnl_type(dst.scalar_type()), dst.strides().vec()),
                 dst.data_ptr());
    return true;
#else
    return false;
#endif
}

}  // namespace sw
