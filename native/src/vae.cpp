#include "vae.h"

#include "common.h"

namespace sw {

namespace {
constexpr double kVAEEps = 1e-6;
}

VAEConfig VAEConfig::from(const Config &c) {
    VAEConfig o;
    o.in_channels = c.integer_in("in_channels", 3, 1, kMaxWidth);
    o.out_channels = c.integer_in("out_channels", 3, 1, kMaxWidth);
    o.latent_channels = c.integer_in("latent_channels", 4, 1, kMaxWidth);
    o.layers_per_block = c.integer_in("layers_per_block", 1, 1, kMaxLayersPerBlock);
    o.groups = c.integer_in("norm_num_groups", 32, 1, kMaxWidth);
    o.block_out = c.integers("block_out_channels");
    o.scaling_factor = c.number_in("scaling_factor", 0.18215, 1e-6, 1e3);
    const size_t n = o.block_out.size();
    if (n == 0 || n > static_cast<size_t>(kMaxBlocks))
        c.bad("block_out_channels", "a list of 1 to " + std::to_string(kMaxBlocks) + " widths");
    for (size_t i = 0; i < n; i++) {
        const std::string at = "block_out_channels[" + std::to_string(i) + "]";
        c.check_range(at, o.block_out[i], 1, kMaxWidth);
        if (o.block_out[i] % o.groups != 0)
            c.bad(at, "a multiple of norm_num_groups " + std::to_string(o.groups) + " (is " +
                          std::to_string(o.block_out[i]) + ")");
    }
    const auto down = c.strings("down_block_types"), up = c.strings("up_block_types");
    for (const auto &t : down)
        if (t != "DownEncoderBlock2D") fail(SW_ERR_UNSUPPORTED, c.source() + ": down block type " + t);
    for (const auto &t : up)
        if (t != "UpDecoderBlock2D") fail(SW_ERR_UNSUPPORTED, c.source() + ": up block type " + t);
    if (down.size() != n) c.bad("down_block_types", "a list with one entry per block_out_channels");
    if (up.size() != n) c.bad("up_block_types", "a list with one entry per block_out_channels");
    return o;
}

VAEAttentionImpl::VAEAttentionImpl(int64_t channels, int64_t groups) {
    group_norm = register_module("group_norm", GroupNorm(groups, channels, kVAEEps));
    to_q = register_module("to_q", Linear(channels, channels));
    to_k = register_module("to_k", Linear(channels, channels));
    to_v = register_module("to_v", Linear(channels, channels));
    auto out = register_module("to_out", torch::nn::ModuleList());
    to_out = Linear(channels, channels);
    out->push_back(to_out);
}

torch::Tensor VAEAttentionImpl::forward(const torch::Tensor &x) {
    const auto b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    auto t = group_norm(x).reshape({b, c, h * w}).transpose(1, 2);
    auto out = to_out(attention(to_q(t), to_k(t), to_v(t), 1, c10::nullopt, true));
    return out.transpose(1, 2).reshape({b, c, h, w}) + x;
}

VAEMidImpl::VAEMidImpl(int64_t ch, int64_t groups) {
    resnets = register_module("resnets", torch::nn::ModuleList());
    attentions = register_module("attentions", torch::nn::ModuleList());
    resnets->push_back(ResnetBlock(ch, ch, 0, groups, kVAEEps));
    attentions->push_back(VAEAttention(ch, groups));
    resnets->push_back(ResnetBlock(ch, ch, 0, groups, kVAEEps));
}

torch::Tensor VAEMidImpl::forward(const torch::Tensor &x) {
    check_cancel();
    auto h = resnets[0]->as<ResnetBlock>()->forward(x, c10::nullopt);
    check_cancel();
    h = attentions[0]->as<VAEAttention>()->forward(h);
    check_cancel();
    return resnets[1]->as<ResnetBlock>()->forward(h, c10::nullopt);
}

VAECoderImpl::VAECoderImpl(const VAEConfig &c, bool decoder_) : decoder(decoder_) {
    const size_t n = c.block_out.size();
    const int64_t top = c.block_out[n - 1];
    if (!decoder) {
        conv_in = register_module("conv_in", Conv2d(c.in_channels, c.block_out[0], 3, 1, 1));
        blocks = register_module("down_blocks", torch::nn::ModuleList());
        int64_t out_ch = c.block_out[0];
        for (size_t i = 0; i < n; i++) {
            const int64_t in_ch = out_ch;
            out_ch = c.block_out[i];
            auto blk = UNetBlock();
            blk->resnets = blk->register_module("resnets", torch::nn::ModuleList());
            for (int64_t j = 0; j < c.layers_per_block; j++)
                blk->resnets->push_back(ResnetBlock(j == 0 ? in_ch : out_ch, out_ch, 0, c.groups, kVAEEps));
            if (i + 1 < n) {
                auto ds = blk->register_module("downsamplers", torch::nn::ModuleList());
                blk->down = Downsample2D(out_ch, true);
                ds->push_back(blk->down);
            }
            blocks->push_back(blk);
        }
        mid = register_module("mid_block", VAEMid(top, c.groups));
        conv_norm_out = register_module("conv_norm_out", GroupNorm(c.groups, top, kVAEEps));
        conv_out = register_module("conv_out", Conv2d(top, 2 * c.latent_channels, 3, 1, 1));
    } else {
        conv_in = register_module("conv_in", Conv2d(c.latent_channels, top, 3, 1, 1));
        mid = register_module("mid_block", VAEMid(top, c.groups));
        blocks = register_module("up_blocks", torch::nn::ModuleList());
        std::vector<int64_t> rev(c.block_out.rbegin(), c.block_out.rend());
        int64_t out_ch = rev[0];
        for (size_t i = 0; i < n; i++) {
            const int64_t prev = out_ch;
            out_ch = rev[i];
            auto blk = UNetBlock();
            blk->resnets = blk->register_module("resnets", torch::nn::ModuleList());
            for (int64_t j = 0; j < c.layers_per_block + 1; j++)
                blk->resnets->push_back(ResnetBlock(j == 0 ? prev : out_ch, out_ch, 0, c.groups, kVAEEps));
            if (i + 1 < n) {
                auto us = blk->register_module("upsamplers", torch::nn::ModuleList());
                blk->up = Upsample2D(out_ch);
                us->push_back(blk->up);
            }
            blocks->push_back(blk);
        }
        conv_norm_out = register_module("conv_norm_out", GroupNorm(c.groups, c.block_out[0], kVAEEps));
        conv_out = register_module("conv_out", Conv2d(c.block_out[0], c.out_channels, 3, 1, 1));
    }
}

torch::Tensor VAECoderImpl::forward(const torch::Tensor &x) {
    auto h = conv_in(x);
    if (decoder) h = mid(h);
    for (const auto &m : *blocks) {
        auto blk = m->as<UNetBlock>();
        for (const auto &r : *blk->resnets) {
            check_cancel();
            h = r->as<ResnetBlock>()->forward(h, c10::nullopt);
        }
        check_cancel();
        if (blk->down) h = blk->down(h);
        if (blk->up) h = blk->up(h);
    }
    if (!decoder) h = mid(h);
    check_cancel();
    return conv_out(conv_norm_out->forward_silu(h));
}

VAEImpl::VAEImpl(const VAEConfig &c) : config(c) {
    encoder = register_module("encoder", VAECoder(c, false));
    decoder = register_module("decoder", VAECoder(c, true));
    quant_conv = register_module("quant_conv", Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1));
    post_quant_conv = register_module("post_quant_conv", Conv2d(c.latent_channels, c.latent_channels, 1));
    for (const auto &child : modules(/*include_self=*/false))
        if (auto *conv = dynamic_cast<Conv2dImpl *>(child.get())) conv->cpu_kernel = Conv2dImpl::CPUKernel::ChannelsLast;
}

std::pair<torch::Tensor, torch::Tensor> VAEImpl::encode(const torch::Tensor &image) {
    if (load_encoder) {
        load_encoder();  // on failure it stays, for the next encode to try again
        load_encoder = nullptr;
    }
    auto moments = quant_conv(encoder(channels_last_on_cpu(image))).contiguous();
    auto parts = moments.chunk(2, 1);
    return {parts[0], parts[1].clamp(-30.0, 20.0)};
}

torch::Tensor VAEImpl::decode(const torch::Tensor &latents) {
    return decoder(post_quant_conv(channels_last_on_cpu(latents))).contiguous();
}

}  // namespace sw
