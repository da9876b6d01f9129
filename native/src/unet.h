// UNet2DConditionModel (diffusers) for Stable Diffusion 1.x and 2.x, and the
// blocks the VAE shares with it. Every size comes from the config.
#pragma once

#include "config.h"
#include "layers.h"

namespace sw {

// ResnetBlock2D; temb_channels 0 means no time embedding (VAE).
struct ResnetBlockImpl : torch::nn::Module {
    ResnetBlockImpl(int64_t in, int64_t out, int64_t temb_channels, int64_t groups, double eps);
    torch::Tensor forward(const torch::Tensor &x, const c10::optional<torch::Tensor> &temb);
    GroupNorm norm1{nullptr}, norm2{nullptr};
    Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
    Linear time_emb_proj{nullptr};
};
TORCH_MODULE(ResnetBlock);

struct Downsample2DImpl : torch::nn::Module {
    // pad_asymmetric: the VAE's (0,1,0,1) zero pad with an unpadded conv.
    Downsample2DImpl(int64_t channels, bool pad_asymmetric);
    torch::Tensor forward(const torch::Tensor &x);
    Conv2d conv{nullptr};
    bool pad_asymmetric;
};
TORCH_MODULE(Downsample2D);

struct Upsample2DImpl : torch::nn::Module {
    explicit Upsample2DImpl(int64_t channels);
    torch::Tensor forward(const torch::Tensor &x, c10::optional<std::vector<int64_t>> size = c10::nullopt);
    Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

// Attention (diffusers): to_q, to_k, to_v, to_out.0.
struct AttentionImpl : torch::nn::Module {
    AttentionImpl(int64_t query_dim, int64_t context_dim, int64_t heads, int64_t head_dim, bool qkv_bias, bool upcast);
    // to_out(attention) + residual, where residual is defined.
    torch::Tensor forward(const torch::Tensor &x, const c10::optional<torch::Tensor> &context = c10::nullopt,
                          const torch::Tensor &residual = {});
    Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, to_out{nullptr};
    int64_t heads;
    bool upcast;
    // Set by FixedContext: its context and, once projected, its keys and values.
    torch::Tensor fixed_context, fixed_keys, fixed_values;
};
TORCH_MODULE(Attention);

struct TransformerBlockImpl : torch::nn::Module {
    TransformerBlockImpl(int64_t dim, int64_t heads, int64_t head_dim, int64_t context_dim, bool upcast);
    torch::Tensor forward(const torch::Tensor &x, const torch::Tensor &context);
    LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
    Attention attn1{nullptr}, attn2{nullptr};
    Linear ff_in{nullptr}, ff_out{nullptr};  // ff.net.0.proj (GEGLU), ff.net.2
};
TORCH_MODULE(TransformerBlock);

struct Transformer2DImpl : torch::nn::Module {
    Transformer2DImpl(int64_t channels, int64_t heads, int64_t layers, int64_t context_dim, int64_t groups,
                      bool linear_projection, bool upcast);
    torch::Tensor forward(const torch::Tensor &x, const torch::Tensor &context);
    GroupNorm norm{nullptr};
    torch::nn::AnyModule proj_in, proj_out;
    torch::nn::ModuleList blocks;
    bool linear_projection;
};
TORCH_MODULE(Transformer2D);

struct UNetConfig {
    int64_t in_channels, out_channels, sample_size, cross_attention_dim, groups, time_embed_dim;
    double eps;
    int64_t layers_per_block;
    std::vector<int64_t> block_out, heads, transformer_layers;
    std::vector<bool> down_attn, up_attn;  // CrossAttn*Block2D per position
    bool flip_sin_to_cos, linear_projection, upcast_attention;
    double freq_shift;
    static UNetConfig from(const Config &c);
    std::string describe() const;
};

struct UNetBlockImpl : torch::nn::Module {
    torch::nn::ModuleList resnets{nullptr}, attentions{nullptr};
    Downsample2D down{nullptr};
    Upsample2D up{nullptr};
};
TORCH_MODULE(UNetBlock);

struct UNetImpl : torch::nn::Module {
    explicit UNetImpl(const UNetConfig &c);
    // sample [B, C, h, w]; timesteps [B] (float); context [B, T, D] -> [B, out, h, w].
    torch::Tensor forward(const torch::Tensor &sample, const torch::Tensor &timesteps, const torch::Tensor &context);
    UNetConfig config;
    Conv2d conv_in{nullptr}, conv_out{nullptr};
    Linear time_linear_1{nullptr}, time_linear_2{nullptr};
    torch::nn::ModuleList down_blocks, up_blocks;
    UNetBlock mid{nullptr};
    GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(UNet);

// While one lives, every cross-attention layer of a UNet projects context to
// keys and values once, at its first forward given that very tensor (the same
// TensorImpl), and reuses them at every later one: all of a generation's steps
// attend to one prompt, and its keys and values cost ~15 ms of a bfloat16
// 256² step on SD 1.5 (diffusers projects them again at every step). Another
// context tensor is projected as before. context must not be written while
// one lives; the projections are freed when it ends.
class FixedContext {
public:
    FixedContext(torch::nn::Module &unet, const torch::Tensor &context);
    ~FixedContext();
    FixedContext(const FixedContext &) = delete;
    FixedContext &operator=(const FixedContext &) = delete;

private:
    std::vector<AttentionImpl *> layers_;
};

// Sinusoidal timestep embedding as diffusers' get_timestep_embedding.
torch::Tensor timestep_embedding(const torch::Tensor &t, int64_t dim, bool flip_sin_to_cos, double shift);

}  // namespace sw
