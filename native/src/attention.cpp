// attention_fused_bf16 (layers.h): bfloat16 attention on the CPU with
// AVX-512 BF16's pair dot products (vdpbf16ps), a block of one head's queries
// at a time. For each block:
//   1. scores S = q·kᵀ in float32, and each row's maximum;
//   2. P = exp(scale · (S - max)) rounded to bfloat16, and each row's sum;
//   3. out = (P·v) / sum, rounded to bfloat16.
// S and P stay in L2 between the steps. Keys and values are first packed, once
// per head, into the pairs the dot product takes; queries and the output are
// read and written in place in their [B, N, heads*dim] layout.
#include "layers.h"

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>

#if defined(__x86_64__)
// GCC 12 warns on its own AVX-512 intrinsics' deliberately undefined operands
// (_mm512_undefined_ps inside the reductions).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#endif

namespace sw {

namespace {

std::atomic<int64_t> fused_calls{0};
std::atomic<bool> fused_allowed{true};

#if defined(__x86_64__)

// Keys are packed in chunks of 16 (a vector of scores); values and the
// output in vectors of 16 of a head's dims.
constexpr int64_t kLanes = 16;
// A block's queries: a multiple of every row tile below, and as many as keep
// its float32 scores and bfloat16 probabilities within kBlockBytes, but at
// most kMaxBlockRows, so that a head with few keys (cross-attention's 77)
// still splits into several blocks for the threads to share.
constexpr int64_t kRowQuantum = 24, kMaxBlockRows = 480;
constexpr int64_t kBlockBytes = int64_t(512) << 10;
// Scores are computed 6 queries × 4 chunks of keys at a time (24 float32
// accumulators): 4 loads of keys and 6 broadcasts of queries per 24 pair
// dot products.
constexpr int kScoreRows = 6, kScoreChunks = 4;

__mmask16 first_lanes(int64_t n) {
    return n >= kLanes ? static_cast<__mmask16>(0xFFFF) : n > 0 ? static_cast<__mmask16>((1u << n) - 1) : 0;
}

SW_AVX512_BF16 inline __m512bh broadcast_pair(const uint16_t *p) {
    uint32_t pair;
    std::memcpy(&pair, p, sizeof pair);
    return (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
}

// kp: chunk c of 16 keys is [dim/2][16] pairs, (k[j][2p], k[j][2p+1]) for
// key j = 16c + lane; keys past nk are zero.
SW_AVX512_BF16 void pack_keys(const uint16_t *k, int64_t ldk, int64_t nk, int64_t dim, uint32_t *kp) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int>(ldk / 2)));
    for (int64_t j = 0; j < nk; j += kLanes) {
        const __mmask16 m = first_lanes(nk - j);
        uint32_t *chunk = kp + (j / kLanes) * (dim / 2) * kLanes;
        for (int64_t p = 0; p < dim / 2; p++)
            _mm512_storeu_si512(chunk + p * kLanes,
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, k + j * ldk + 2 * p, 4));
    }
}

// vp: row jp is [dv] pairs (v[2jp][c], v[2jp+1][c]) of the head's dims c,
// zero past dim and past the last key.
SW_AVX512_BF16 void pack_values(const uint16_t *v, int64_t ldv, int64_t nk, int64_t dim, int64_t dv, uint32_t *vp) {
    for (int64_t jp = 0; jp < (nk + 1) / 2; jp++) {
        const uint16_t *a = v + 2 * jp * ldv, *b = 2 * jp + 1 < nk ? a + ldv : nullptr;
        for (int64_t c = 0; c < dv; c += kLanes) {
            const __mmask16 m = first_lanes(dim - c);
            __m512i pair = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + c));
            if (b != nullptr)
                pair = _mm512_or_si512(pair, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + c)), 16));
            _mm512_storeu_si512(vp + jp * dv + c, pair);
        }
    }
}

// Scores of R queries against C chunks of keys from key j; the last chunk's
// lanes in `last` are real keys and count towards the row maxima.
template <int R, int C>
SW_AVX512_BF16 inline void score_tile(const uint16_t *q, int64_t ldq, int64_t dim, const uint32_t *kp, int64_t j,
                                      __mmask16 last, float *s, int64_t lds, __m512 *row_max) {
    __m512 acc[R][C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    const uint32_t *chunk = kp + (j / kLanes) * (dim / 2) * kLanes;
    for (int64_t p = 0; p < dim / 2; p++) {
        __m512bh keys[C];
        for (int c = 0; c < C; c++) keys[c] = (__m512bh)_mm512_loadu_si512(chunk + (c * dim / 2 + p) * kLanes);
        for (int r = 0; r < R; r++) {
            const __m512bh pair = broadcast_pair(q + r * ldq + 2 * p);
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pair, keys[c]);
        }
    }
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            _mm512_storeu_ps(s + r * lds + j + c * kLanes, acc[r][c]);
            row_max[r] = _mm512_max_ps(row_max[r], c == C - 1 ? _mm512_mask_mov_ps(ninf, last, acc[r][c]) : acc[r][c]);
        }
}

template <int R>
SW_AVX512_BF16 void score_rows(const uint16_t *q, int64_t ldq, int64_t dim, const uint32_t *kp, int64_t nk, float *s,
                               int64_t lds, float *max_out) {
    __m512 row_max[R];
    for (int r = 0; r < R; r++) row_max[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + kScoreChunks * kLanes <= nk; j += kScoreChunks * kLanes)
        score_tile<R, kScoreChunks>(q, ldq, dim, kp, j, 0xFFFF, s, lds, row_max);
    for (; j < nk; j += kLanes) score_tile<R, 1>(q, ldq, dim, kp, j, first_lanes(nk - j), s, lds, row_max);
    for (int r = 0; r < R; r++) max_out[r] = _mm512_reduce_max_ps(row_max[r]);
}

// 2^t, 16 at a time: 2^f for f = t - round(t) in [-1/2, 1/2] from its
// degree-5 Taylor polynomial (relative error < 3e-6, far under bfloat16's
// 2^-9), scaled by 2^round(t) (vscalefps: 0 for very negative t).
SW_AVX512_BF16 inline __m512 exp2_16(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    // ln(2)^i / i!, highest first.
    static constexpr float kPoly[] = {1.3333558146428441e-3f, 9.6181291076284772e-3f, 5.5504108664821576e-2f,
                                      2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};
    __m512 y = _mm512_set1_ps(kPoly[0]);
    for (size_t i = 1; i < std::size(kPoly); i++) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kPoly[i]));
    return _mm512_scalef_ps(y, n);
}

// p[0, np) = bfloat16 exp(scale · (s - max)) for the nk real keys, 0 past
// them; returns 1 / their sum (of the float32 values). c = scale · log2(e).
SW_AVX512_BF16 float exponentials(const float *s, int64_t nk, float max, float c, uint16_t *p, int64_t np) {
    const __m512 vc = _mm512_set1_ps(c), vmc = _mm512_set1_ps(max * c);
    __m512 sum = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + kLanes <= nk; i += kLanes) {
        const __m512 e = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + i), vc, vmc));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(p + i), (__m256i)_mm512_cvtneps_pbh(e));
    }
    for (; i < np; i += kLanes) {
        const __mmask16 real = first_lanes(nk - i);
        const __m512 e = _mm512_maskz_mov_ps(real, exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(real, s + i), vc, vmc)));
        sum = _mm512_add_ps(sum, e);
        _mm256_mask_storeu_epi16(p + i, first_lanes(np - i), (__m256i)_mm512_cvtneps_pbh(e));
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

// out[r][0, dim) = (p[r] · v) × inv[r] for R queries, V vectors of dims.
template <int R, int V>
SW_AVX512_BF16 void value_rows(const uint16_t *p, int64_t ldp, int64_t pairs, const uint32_t *vp, int64_t dim,
                               const float *inv, uint16_t *out, int64_t ldo) {
    __m512 acc[R][V];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < V; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t jp = 0; jp < pairs; jp++) {
        __m512bh values[V];
        for (int c = 0; c < V; c++) values[c] = (__m512bh)_mm512_loadu_si512(vp + (jp * V + c) * kLanes);
        for (int r = 0; r < R; r++) {
            const __m512bh pair = broadcast_pair(p + r * ldp + 2 * jp);
            for (int c = 0; c < V; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pair, values[c]);
        }
    }
    for (int r = 0; r < R; r++) {
        const __m512 scale = _mm512_set1_ps(inv[r]);
        for (int c = 0; c < V; c++)
            _mm256_mask_storeu_epi16(out + r * ldo + c * kLanes, first_lanes(dim - c * kLanes),
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], scale)));
    }
}

// value_rows over a block's rows, as many queries at a time as keep the
// accumulators (R × V) and one row of values within AVX-512's 32 registers.
template <int V>
SW_AVX512_BF16 void value_block(const uint16_t *p, int64_t ldp, int64_t rows, int64_t pairs, const uint32_t *vp,
                                int64_t dim, const float *inv, uint16_t *out, int64_t ldo) {
    constexpr int R = V <= 2 ? 8 : V == 3 ? 6 : V <= 5 ? 4 : V <= 7 ? 3 : 2;
    static_assert(kRowQuantum % R == 0, "a block's rows split into whole tiles");
    int64_t r = 0;
    for (; r + R <= rows; r += R) value_rows<R, V>(p + r * ldp, ldp, pairs, vp, dim, inv + r, out + r * ldo, ldo);
    for (; r < rows; r++) value_rows<1, V>(p + r * ldp, ldp, pairs, vp, dim, inv + r, out + r * ldo, ldo);
}

using ValueBlock = void (*)(const uint16_t *, int64_t, int64_t, int64_t, const uint32_t *, int64_t, const float *,
                            uint16_t *, int64_t);

ValueBlock value_block_for(int64_t vectors) {
    static_assert(kFusedAttentionMaxDim <= 10 * kLanes, "value_block_for covers every width");
    switch (vectors) {
        case 1: return value_block<1>;
        case 2: return value_block<2>;
        case 3: return value_block<3>;
        case 4: return value_block<4>;
        case 5: return value_block<5>;
        case 6: return value_block<6>;
        case 7: return value_block<7>;
        case 8: return value_block<8>;
        case 9: return value_block<9>;
        case 10: return value_block<10>;
        default: return nullptr;
    }
}

SW_AVX512_BF16 void score_block(const uint16_t *q, int64_t ldq, int64_t rows, int64_t dim, const uint32_t *kp,
                                int64_t nk, float *s, int64_t lds, float *max) {
    static_assert(kRowQuantum % kScoreRows == 0, "a block's rows split into whole tiles");
    int64_t r = 0;
    for (; r + kScoreRows <= rows; r += kScoreRows)
        score_rows<kScoreRows>(q + r * ldq, ldq, dim, kp, nk, s + r * lds, lds, max + r);
    for (; r < rows; r++) score_rows<1>(q + r * ldq, ldq, dim, kp, nk, s + r * lds, lds, max + r);
}

#endif

}  // namespace

int64_t fused_attention_calls() { return fused_calls.load(); }

void allow_fused_attention(bool allowed) { fused_allowed.store(allowed); }

torch::Tensor attention_fused_bf16(const torch::Tensor &q, const torch::Tensor &k, const torch::Tensor &v,
                                   int64_t heads) {
#if defined(__x86_64__)
    const auto bf = torch::kBFloat16;
    if (!fused_allowed.load(std::memory_order_relaxed) || !cpu_has_avx512_bf16() || q.dim() != 3 || k.dim() != 3 || v.dim() != 3 || heads < 1) return {};
    if (q.scalar_type() != bf || k.scalar_type() != bf || v.scalar_type() != bf) return {};
    if (!q.device().is_cpu() || !k.device().is_cpu() || !v.device().is_cpu()) return {};
    if (!q.is_contiguous() || !k.is_contiguous() || !v.is_contiguous()) return {};
    const int64_t b = q.size(0), nq = q.size(1), nk = k.size(1), inner = q.size(2), dim = inner / heads;
    if (inner % heads != 0 || dim % 2 != 0 || dim > kFusedAttentionMaxDim || nk < 1) return {};
    if (k.size(0) != b || v.size(0) != b || k.size(2) != inner || v.size(2) != inner || v.size(1) != nk) return {};
    fused_calls.fetch_add(1, std::memory_order_relaxed);
    auto out = torch::empty({b, nq, inner}, q.options());
    if (nq == 0 || b == 0 || dim == 0) return out;

    const int64_t chunks = (nk + kLanes - 1) / kLanes, padded = chunks * kLanes;
    const int64_t pairs = (nk + 1) / 2, np = 2 * pairs;
    const int64_t vectors = (dim + kLanes - 1) / kLanes, dv = vectors * kLanes;
    const int64_t units = b * heads, key_words = chunks * (dim / 2) * kLanes, value_words = pairs * dv;
    auto packed = torch::empty({units * (key_words + value_words)}, torch::TensorOptions().dtype(torch::kInt32));
    auto *kp = reinterpret_cast<uint32_t *>(packed.data_ptr<int32_t>()), *vp = kp + units * key_words;
    const auto *qd = reinterpret_cast<const uint16_t *>(q.data_ptr<at::BFloat16>());
    const auto *kd = reinterpret_cast<const uint16_t *>(k.data_ptr<at::BFloat16>());
    const auto *vd = reinterpret_cast<const uint16_t *>(v.data_ptr<at::BFloat16>());
    auto *od = reinterpret_cast<uint16_t *>(out.data_ptr<at::BFloat16>());
    const std::atomic<bool> *cancel = cancel_flag();
    auto cancelled = [cancel] { return cancel != nullptr && cancel->load(std::memory_order_relaxed); };

    at::parallel_for(0, units, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t u = lo; u < hi && !cancelled(); u++) {
            const int64_t i = u / heads, h = u % heads;
            pack_keys(kd + i * nk * inner + h * dim, inner, nk, dim, kp + u * key_words);
            pack_values(vd + i * nk * inner + h * dim, inner, nk, dim, dv, vp + u * value_words);
        }
    });
    check_cancel();

    // float32 scores and bfloat16 probabilities: 6 bytes a key.
    const int64_t rows = std::clamp<int64_t>(kBlockBytes / (6 * padded) / kRowQuantum * kRowQuantum, kRowQuantum,
                                             kMaxBlockRows);
    const int64_t blocks = (nq + rows - 1) / rows;
    const float c = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)) / std::log(2.0));
    const ValueBlock values = value_block_for(vectors);
    at::parallel_for(0, units * blocks, 1, [&](int64_t lo, int64_t hi) {
        std::unique_ptr<float[]> s(new float[rows * padded]), max(new float[rows]), inv(new float[rows]);
        std::unique_ptr<uint16_t[]> p(new uint16_t[rows * np]);
        for (int64_t w = lo; w < hi && !cancelled(); w++) {
            const int64_t u = w / blocks, r0 = (w % blocks) * rows, n = std::min(rows, nq - r0);
            const int64_t offset = (u / heads * nq + r0) * inner + u % heads * dim;
            score_block(qd + offset, inner, n, dim, kp + u * key_words, nk, s.get(), padded, max.get());
            for (int64_t r = 0; r < n; r++) inv[r] = exponentials(s.get() + r * padded, nk, max[r], c, p.get() + r * np, np);
            values(p.get(), np, n, pairs, vp + u * value_words, dim, inv.get(), od + offset, inner);
        }
    });
    check_cancel();
    return out;
#else
    return {};
#endif
}

}  // namespace sw
