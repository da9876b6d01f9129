#include "unet.h"

#include "common.h"

namespace sw {

ResnetBlockImpl::ResnetBlockImpl(int64_t in, int64_t out, int64_t temb_channels, int64_t groups, double eps) {
    norm1 = register_module("norm1", GroupNorm(groups, in, eps));
    conv1 = register_module("conv1", Conv2d(in, out, 3, 1, 1));
    if (temb_channels > 0) time_emb_proj = register_module("time_emb_proj", Linear(temb_channels, out));
    norm2 = register_module("norm2", GroupNorm(groups, out, eps));
    conv2 = register_module("conv2", Conv2d(out, out, 3, 1, 1));
    if (in != out) conv_shortcut = register_module("conv_shortcut", Conv2d(in, out, 1));
}

torch::Tensor ResnetBlockImpl::forward(const torch::Tensor &x, const c10::optional<torch::Tensor> &temb) {
    // In place where a tensor is the block's own (a convolution's output): no
    // allocation, and a + b is b + a to the bit.
    auto h = conv1(norm1->forward_silu(x));
    if (temb && time_emb_proj) h.add_(time_emb_proj(at::silu(*temb)).unsqueeze(-1).unsqueeze(-1));
    check_cancel();  // one convolution at 2048² takes seconds
    h = conv2(norm2->forward_silu(h));
    return h.add_(conv_shortcut ? conv_shortcut(x) : x);
}

Downsample2DImpl::Downsample2DImpl(int64_t channels, bool pad_asymmetric_) : pad_asymmetric(pad_asymmetric_) {
    conv = register_module("conv", Conv2d(channels, channels, 3, 2, pad_asymmetric ? 0 : 1));
}

torch::Tensor Downsample2DImpl::forward(const torch::Tensor &x) {
    if (pad_asymmetric) return conv(at::constant_pad_nd(x, {0, 1, 0, 1}, 0));
    return conv(x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels) {
    conv = register_module("conv", Conv2d(channels, channels, 3, 1, 1));
    conv->upsampled_input = true;
}

namespace {

// The output of a convolution with phase kernels (Conv2dImpl::phases) on an
// [n, c, h, w] tensor, [n, 4 × o, h + 1, w + 1], as the [n, o, 2h, 2w] image
// the 3×3 convolution of its 2× upsampling gives: phase (a, b) from channel
// block 2a + b at (i + a, j + b) to pixel (2i + a, 2j + b).
torch::Tensor interleave_phases(const torch::Tensor &y, int64_t h, int64_t w) {
    const int64_t o = y.size(1) / 4;
    auto out = at::empty({y.size(0), o, 2 * h, 2 * w}, y.options().memory_format(y.suggest_memory_format()));
    for (int64_t a = 0; a < 2; a++)
        for (int64_t b = 0; b < 2; b++)
            out.slice(2, a, 2 * h, 2).slice(3, b, 2 * w, 2).copy_(y.narrow(1, (2 * a + b) * o, o).narrow(2, a, h).narrow(3, b, w));
    return out;
}

}  // namespace

torch::Tensor Upsample2DImpl::forward(const torch::Tensor &x, c10::optional<std::vector<int64_t>> size) {
    // The skip connection's size where the caller gives one (odd latents), else 2×.
    const std::vector<int64_t> doubled{x.size(2) * 2, x.size(3) * 2}, target = size ? *size : doubled;
    if (!conv->phases) return conv(at::upsample_nearest2d(x, target));
    if (target == doubled) return interleave_phases(conv(x), x.size(2), x.size(3));
    // Another size (an odd latent's skip): the 3×3 kernel, recomputed for the
    // call, on the upsampling itself.
    return at::conv2d(at::upsample_nearest2d(x, target), conv->kernel3x3(), conv->bias, {1, 1}, {1, 1});
}

AttentionImpl::AttentionImpl(int64_t query_dim, int64_t context_dim, int64_t heads_, int64_t head_dim, bool qkv_bias,
                             bool upcast_)
    : heads(heads_), upcast(upcast_) {
    const int64_t inner = heads * head_dim;
    to_q = register_module("to_q", Linear(query_dim, inner, qkv_bias));
    to_k = register_module("to_k", Linear(context_dim, inner, qkv_bias));
    to_v = register_module("to_v", Linear(context_dim, inner, qkv_bias));
    auto out = register_module("to_out", torch::nn::ModuleList());
    to_out = Linear(inner, query_dim);
    out->push_back(to_out);
}

torch::Tensor AttentionImpl::forward(const torch::Tensor &x, const c10::optional<torch::Tensor> &context,
                                     const torch::Tensor &residual) {
    const auto &ctx = context ? *context : x;
    torch::Tensor k, v;
    if (context && fixed_context.defined() && context->is_same(fixed_context)) {
        if (!fixed_keys.defined()) {
            fixed_keys = to_k(ctx);
            fixed_values = to_v(ctx);
        }
        k = fixed_keys;
        v = fixed_values;
    } else {
        k = to_k(ctx);
        v = to_v(ctx);
    }
    auto a = attention(to_q(x), k, v, heads, c10::nullopt, upcast);
    return residual.defined() ? to_out->forward_post(a, LinearPost::Add, residual) : to_out(a);
}

FixedContext::FixedContext(torch::nn::Module &unet, const torch::Tensor &context) {
    for (const auto &child : unet.modules(/*include_self=*/false))
        if (auto *attn = dynamic_cast<AttentionImpl *>(child.get())) {
            attn->fixed_context = context;
            layers_.push_back(attn);
        }
}

FixedContext::~FixedContext() {
    for (auto *attn : layers_) attn->fixed_context = attn->fixed_keys = attn->fixed_values = torch::Tensor();
}

TransformerBlockImpl::TransformerBlockImpl(int64_t dim, int64_t heads, int64_t head_dim, int64_t context_dim,
                                           bool upcast) {
    norm1 = register_module("norm1", LayerNorm(dim, 1e-5));
    attn1 = register_module("attn1", Attention(dim, dim, heads, head_dim, false, upcast));
    norm2 = register_module("norm2", LayerNorm(dim, 1e-5));
    attn2 = register_module("attn2", Attention(dim, context_dim, heads, head_dim, false, upcast));
    norm3 = register_module("norm3", LayerNorm(dim, 1e-5));
    // ff.net = [GEGLU(proj), Dropout, Linear]
    auto ff = register_module("ff", std::make_shared<torch::nn::Module>());
    auto net = ff->register_module("net", torch::nn::ModuleList());
    auto geglu = std::make_shared<torch::nn::Module>();
    ff_in = Linear(dim, dim * 4 * 2);
    ff_in->parts = 2;  // GEGLU's value and gate
    geglu->register_module("proj", ff_in);
    net->push_back(geglu);
    net->push_back(torch::nn::Dropout(0.0));
    ff_out = Linear(dim * 4, dim);
    net->push_back(ff_out);
}

torch::Tensor TransformerBlockImpl::forward(const torch::Tensor &x, const torch::Tensor &context) {
    // The residual adds are the output projections' (fused where the weight
    // is blocked): x + a and a + x are the same to the bit.
    auto h = attn1->forward(norm1(x), c10::nullopt, x);
    check_cancel();
    h = attn2->forward(norm2(h), context, h);
    check_cancel();
    // GEGLU as two products, one per half of ff_in's rows, so that gelu reads
    // a contiguous tensor: on a chunk of one [.., 2n] product it ran 6-10×
    // slower (float32 [2, 1024, 1280]: 7.5 against 1.2 ms). Blocked, gelu is
    // the gate product's and the multiplication the value product's. An int8
    // ff_in has one prepacked product and no float rows to split: its gate
    // half is made contiguous instead.
    const auto hn = norm3(h);
    if (!ff_in->packed.isNone()) {
        auto parts = ff_in(hn).chunk(2, -1);
        return ff_out->forward_post(parts[0] * at::gelu(parts[1].contiguous()), LinearPost::Add, h);
    }
    auto gate = ff_in->forward_part(1, hn, LinearPost::Gelu);
    return ff_out->forward_post(ff_in->forward_part(0, hn, LinearPost::Mul, gate), LinearPost::Add, h);
}

Transformer2DImpl::Transformer2DImpl(int64_t channels, int64_t heads, int64_t layers, int64_t context_dim,
                                     int64_t groups, bool linear_projection_, bool upcast)
    : linear_projection(linear_projection_) {
    norm = register_module("norm", GroupNorm(groups, channels, 1e-6));
    if (linear_projection) {
        proj_in = torch::nn::AnyModule(Linear(channels, channels));
        proj_out = torch::nn::AnyModule(Linear(channels, channels));
    } else {
        proj_in = torch::nn::AnyModule(Conv2d(channels, channels, 1));
        proj_out = torch::nn::AnyModule(Conv2d(channels, channels, 1));
    }
    register_module("proj_in", proj_in.ptr());
    blocks = register_module("transformer_blocks", torch::nn::ModuleList());
    for (int64_t i = 0; i < layers; i++)
        blocks->push_back(TransformerBlock(channels, heads, channels / heads, context_dim, upcast));
    register_module("proj_out", proj_out.ptr());
}

torch::Tensor Transformer2DImpl::forward(const torch::Tensor &x, const torch::Tensor &context) {
    const auto b = x.size(0), c = x.size(1), hgt = x.size(2), wid = x.size(3);
    auto h = norm(x);
    if (!linear_projection) h = proj_in.forward(h);
    h = h.permute({0, 2, 3, 1}).reshape({b, hgt * wid, c});
    if (linear_projection) h = proj_in.forward(h);
    for (const auto &blk : *blocks) {
        check_cancel();
        h = blk->as<TransformerBlock>()->forward(h, context);
    }
    if (linear_projection) h = proj_out.forward(h);
    h = h.reshape({b, hgt, wid, c}).permute({0, 3, 1, 2});
    if (!linear_projection) h = proj_out.forward(h.contiguous());
    return h + x;
}

UNetConfig UNetConfig::from(const Config &c) {
    UNetConfig o;
    o.in_channels = c.integer_in("in_channels", 4, 1, kMaxWidth);
    o.out_channels = c.integer_in("out_channels", 4, 1, kMaxWidth);
    o.sample_size = c.integer_in("sample_size", 64, 1, kMaxWidth);
    o.block_out = c.integers("block_out_channels");
    const size_t n = o.block_out.size();
    if (n == 0 || n > static_cast<size_t>(kMaxBlocks))
        c.bad("block_out_channels", "a list of 1 to " + std::to_string(kMaxBlocks) + " widths");
    o.layers_per_block = c.integer_in("layers_per_block", 2, 1, kMaxLayersPerBlock);
    o.groups = c.integer_in("norm_num_groups", 32, 1, kMaxWidth);
    o.eps = c.number_in("norm_eps", 1e-5, 1e-12, 1.0);
    if (c.has("cross_attention_dim") && !c.json()["cross_attention_dim"].is_number_integer())
        fail(SW_ERR_UNSUPPORTED, c.source() + ": per-block cross_attention_dim");
    o.cross_attention_dim = c.integer_in("cross_attention_dim", 768, 1, kMaxWidth);
    // diffusers reads attention_head_dim as the number of heads when
    // num_attention_heads is absent (true of every SD 1.x/2.x config).
    const std::string heads_key = c.has("num_attention_heads") ? "num_attention_heads" : "attention_head_dim";
    o.heads = c.per_block(heads_key, n, 8);
    o.transformer_layers = c.per_block("transformer_layers_per_block", n, 1);
    o.flip_sin_to_cos = c.boolean("flip_sin_to_cos", true);
    o.linear_projection = c.boolean("use_linear_projection", false);
    o.upcast_attention = c.boolean("upcast_attention", false);
    for (size_t i = 0; i < n; i++) {
        const std::string at = "[" + std::to_string(i) + "]";
        c.check_range("block_out_channels" + at, o.block_out[i], 1, kMaxWidth);
        if (o.block_out[i] % o.groups != 0)
            c.bad("block_out_channels" + at, "a multiple of norm_num_groups " + std::to_string(o.groups) + " (is " +
                                                 std::to_string(o.block_out[i]) + ")");
        c.check_range(heads_key + at, o.heads[i], 1, kMaxHeads);
        if (o.block_out[i] % o.heads[i] != 0)
            c.bad(heads_key + at, "a divisor of block_out_channels" + at + " " + std::to_string(o.block_out[i]) +
                                      " (is " + std::to_string(o.heads[i]) + ")");
        c.check_range("transformer_layers_per_block" + at, o.transformer_layers[i], 1, kMaxLayers);
    }
    // The sinusoidal embedding has block_out_channels[0] / 2 frequencies and
    // divides by (that - freq_shift).
    const double half = static_cast<double>(o.block_out[0] / 2);
    o.freq_shift = c.number("freq_shift", 0);
    if (!(o.freq_shift >= 0 && o.freq_shift < half))
        c.bad("freq_shift", "at least 0 and below block_out_channels[0] / 2");
    o.time_embed_dim = c.integer_in("time_embedding_dim", o.block_out[0] * 4, 1, 4 * kMaxWidth);
    for (const auto &key : {"addition_embed_type", "class_embed_type", "encoder_hid_dim_type"})
        if (c.has(key)) fail(SW_ERR_UNSUPPORTED, c.source() + ": \"" + key + "\" (SDXL-style UNets) is not supported");
    if (c.string("time_embedding_type", "positional") != "positional")
        fail(SW_ERR_UNSUPPORTED, c.source() + ": time_embedding_type must be positional");
    if (c.string("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn")
        fail(SW_ERR_UNSUPPORTED, c.source() + ": mid_block_type must be UNetMidBlock2DCrossAttn");
    if (c.boolean("only_cross_attention", false))
        fail(SW_ERR_UNSUPPORTED, c.source() + ": only_cross_attention is not supported");
    for (const auto &t : c.strings("down_block_types")) {
        if (t == "CrossAttnDownBlock2D") o.down_attn.push_back(true);
        else if (t == "DownBlock2D") o.down_attn.push_back(false);
        else fail(SW_ERR_UNSUPPORTED, c.source() + ": down block type " + t);
    }
    for (const auto &t : c.strings("up_block_types")) {
        if (t == "CrossAttnUpBlock2D") o.up_attn.push_back(true);
        else if (t == "UpBlock2D") o.up_attn.push_back(false);
        else fail(SW_ERR_UNSUPPORTED, c.source() + ": up block type " + t);
    }
    if (o.down_attn.size() != n) c.bad("down_block_types", "a list with one entry per block_out_channels");
    if (o.up_attn.size() != n) c.bad("up_block_types", "a list with one entry per block_out_channels");
    return o;
}

std::string UNetConfig::describe() const {
    std::string s = "unet " + std::to_string(in_channels) + "ch [";
    for (size_t i = 0; i < block_out.size(); i++) s += (i ? "," : "") + std::to_string(block_out[i]);
    return s + "] ctx " + std::to_string(cross_attention_dim) + (linear_projection ? " linear-proj" : "");
}

UNetImpl::UNetImpl(const UNetConfig &c) : config(c) {
    const size_t n = c.block_out.size();
    conv_in = register_module("conv_in", Conv2d(c.in_channels, c.block_out[0], 3, 1, 1));
    auto time_embedding = register_module("time_embedding", std::make_shared<torch::nn::Module>());
    time_linear_1 = time_embedding->register_module("linear_1", Linear(c.block_out[0], c.time_embed_dim));
    time_linear_2 = time_embedding->register_module("linear_2", Linear(c.time_embed_dim, c.time_embed_dim));

    auto make_attn = [&](int64_t ch, size_t i) {
        return Transformer2D(ch, c.heads[i], c.transformer_layers[i], c.cross_attention_dim, c.groups,
                             c.linear_projection, c.upcast_attention);
    };

    down_blocks = register_module("down_blocks", torch::nn::ModuleList());
    int64_t out_ch = c.block_out[0];
    for (size_t i = 0; i < n; i++) {
        const int64_t in_ch = out_ch;
        out_ch = c.block_out[i];
        auto blk = UNetBlock();
        blk->resnets = blk->register_module("resnets", torch::nn::ModuleList());
        if (c.down_attn[i]) blk->attentions = blk->register_module("attentions", torch::nn::ModuleList());
        for (int64_t j = 0; j < c.layers_per_block; j++) {
            blk->resnets->push_back(ResnetBlock(j == 0 ? in_ch : out_ch, out_ch, c.time_embed_dim, c.groups, c.eps));
            if (c.down_attn[i]) blk->attentions->push_back(make_attn(out_ch, i));
        }
        if (i + 1 < n) {
            auto ds = blk->register_module("downsamplers", torch::nn::ModuleList());
            blk->down = Downsample2D(out_ch, false);
            ds->push_back(blk->down);
        }
        down_blocks->push_back(blk);
    }

    const int64_t mid_ch = c.block_out[n - 1];
    mid = register_module("mid_block", UNetBlock());
    mid->resnets = mid->register_module("resnets", torch::nn::ModuleList());
    mid->attentions = mid->register_module("attentions", torch::nn::ModuleList());
    mid->resnets->push_back(ResnetBlock(mid_ch, mid_ch, c.time_embed_dim, c.groups, c.eps));
    mid->attentions->push_back(make_attn(mid_ch, n - 1));
    mid->resnets->push_back(ResnetBlock(mid_ch, mid_ch, c.time_embed_dim, c.groups, c.eps));

    up_blocks = register_module("up_blocks", torch::nn::ModuleList());
    std::vector<int64_t> rev(c.block_out.rbegin(), c.block_out.rend());
    out_ch = rev[0];
    for (size_t i = 0; i < n; i++) {
        const int64_t prev_out = out_ch;
        out_ch = rev[i];
        const int64_t in_ch = rev[std::min(i + 1, n - 1)];
        const size_t block_index = n - 1 - i;  // heads and layers of the mirrored down block
        auto blk = UNetBlock();
        blk->resnets = blk->register_module("resnets", torch::nn::ModuleList());
        if (c.up_attn[i]) blk->attentions = blk->register_module("attentions", torch::nn::ModuleList());
        const int64_t layers = c.layers_per_block + 1;
        for (int64_t j = 0; j < layers; j++) {
            const int64_t skip = j == layers - 1 ? in_ch : out_ch;
            const int64_t res_in = j == 0 ? prev_out : out_ch;
            blk->resnets->push_back(ResnetBlock(res_in + skip, out_ch, c.time_embed_dim, c.groups, c.eps));
            if (c.up_attn[i]) blk->attentions->push_back(make_attn(out_ch, block_index));
        }
        if (i + 1 < n) {
            auto us = blk->register_module("upsamplers", torch::nn::ModuleList());
            blk->up = Upsample2D(out_ch);
            us->push_back(blk->up);
        }
        up_blocks->push_back(blk);
    }
    conv_norm_out = register_module("conv_norm_out", GroupNorm(c.groups, c.block_out[0], c.eps));
    conv_out = register_module("conv_out", Conv2d(c.block_out[0], c.out_channels, 3, 1, 1));
}

torch::Tensor timestep_embedding(const torch::Tensor &t, int64_t dim, bool flip_sin_to_cos, double shift) {
    const int64_t half = dim / 2;
    auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(t.device());
    auto exponent = torch::arange(0, half, opts) * (-std::log(10000.0)) / (static_cast<double>(half) - shift);
    auto emb = t.to(torch::kFloat32).unsqueeze(1) * torch::exp(exponent).unsqueeze(0);
    auto sin = torch::sin(emb), cos = torch::cos(emb);
    auto out = flip_sin_to_cos ? torch::cat({cos, sin}, -1) : torch::cat({sin, cos}, -1);
    if (dim % 2 == 1) out = at::constant_pad_nd(out, {0, 1, 0, 0}, 0);
    return out;
}

torch::Tensor UNetImpl::forward(const torch::Tensor &sample, const torch::Tensor &timesteps,
                                const torch::Tensor &context) {
    const auto dtype = sample.scalar_type();
    auto t = timesteps;
    if (t.dim() == 0) t = t.expand({sample.size(0)});
    auto temb = timestep_embedding(t, config.block_out[0], config.flip_sin_to_cos, config.freq_shift).to(dtype);
    temb = time_linear_2(at::silu(time_linear_1(temb)));

    auto h = conv_in(sample);
    std::vector<torch::Tensor> skips{h};
    for (const auto &m : *down_blocks) {
        auto blk = m->as<UNetBlock>();
        for (size_t j = 0; j < blk->resnets->size(); j++) {
            check_cancel();
            h = blk->resnets[j]->as<ResnetBlock>()->forward(h, temb);
            check_cancel();
            if (blk->attentions) h = blk->attentions[j]->as<Transformer2D>()->forward(h, context);
            skips.push_back(h);
        }
        if (blk->down) {
            check_cancel();
            h = blk->down(h);
            skips.push_back(h);
        }
    }
    check_cancel();
    h = mid->resnets[0]->as<ResnetBlock>()->forward(h, temb);
    check_cancel();
    h = mid->attentions[0]->as<Transformer2D>()->forward(h, context);
    check_cancel();
    h = mid->resnets[1]->as<ResnetBlock>()->forward(h, temb);

    for (const auto &m : *up_blocks) {
        auto blk = m->as<UNetBlock>();
        for (size_t j = 0; j < blk->resnets->size(); j++) {
            h = torch::cat({h, skips.back()}, 1);
            skips.pop_back();
            check_cancel();
            h = blk->resnets[j]->as<ResnetBlock>()->forward(h, temb);
            check_cancel();
            if (blk->attentions) h = blk->attentions[j]->as<Transformer2D>()->forward(h, context);
        }
        if (blk->up) {
            // Odd latent sizes: upsample to the skip connection's size, as diffusers does.
            std::vector<int64_t> size{skips.back().size(2), skips.back().size(3)};
            check_cancel();
            h = blk->up(h, size);
        }
    }
    return conv_out(conv_norm_out->forward_silu(h));
}

}  // namespace sw
