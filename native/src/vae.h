// AutoencoderKL (diffusers): encoder, decoder, quant convs; scaling factor from the config.
#pragma once

#include "unet.h"

namespace sw {

struct VAEConfig {
    int64_t in_channels, out_channels, latent_channels, layers_per_block, groups;
    std::vector<int64_t> block_out;
    double scaling_factor;
    static VAEConfig from(const Config &c);
};

// The VAE mid block: resnet, single-head self-attention with a residual, resnet.
struct VAEMidImpl : torch::nn::Module {
    VAEMidImpl(int64_t channels, int64_t groups);
    torch::Tensor forward(const torch::Tensor &x);
    torch::nn::ModuleList resnets{nullptr}, attentions{nullptr};
};
TORCH_MODULE(VAEMid);

struct VAEAttentionImpl : torch::nn::Module {
    VAEAttentionImpl(int64_t channels, int64_t groups);
    torch::Tensor forward(const torch::Tensor &x);
    GroupNorm group_norm{nullptr};
    Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, to_out{nullptr};
};
TORCH_MODULE(VAEAttention);

struct VAECoderImpl : torch::nn::Module {
    VAECoderImpl(const VAEConfig &c, bool decoder);
    torch::Tensor forward(const torch::Tensor &x);
    bool decoder;
    Conv2d conv_in{nullptr}, conv_out{nullptr};
    torch::nn::ModuleList blocks{nullptr};
    VAEMid mid{nullptr};
    GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(VAECoder);

struct VAEImpl : torch::nn::Module {
    explicit VAEImpl(const VAEConfig &c);
    // image [B, 3, H, W] in [-1, 1] -> posterior mean and log-variance [B, latent, H/8, W/8].
    std::pair<torch::Tensor, torch::Tensor> encode(const torch::Tensor &image);
    // latents (already divided by the scaling factor) -> image in about [-1, 1].
    torch::Tensor decode(const torch::Tensor &latents);
    VAEConfig config;
    VAECoder encoder{nullptr}, decoder{nullptr};
    Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};
    // Fills the encoder and quant_conv (load_vae_weights); run by the first
    // encode, then empty.
    std::function<void()> load_encoder;
};
TORCH_MODULE(VAE);

}  // namespace sw
