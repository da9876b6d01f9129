// The CLIP text encoder (transformers' CLIPTextModel), driven by its config.
#pragma once

#include "config.h"
#include "layers.h"

namespace sw {

struct ClipTextConfig {
    int64_t vocab_size, hidden_size, intermediate_size, heads, layers, max_positions;
    double eps;
    bool quick_gelu;
    static ClipTextConfig from(const Config &c);
};

struct ClipLayerImpl : torch::nn::Module {
    explicit ClipLayerImpl(const ClipTextConfig &c);
    torch::Tensor forward(const torch::Tensor &x, const torch::Tensor &causal_mask);
    Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr}, fc1{nullptr}, fc2{nullptr};
    LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
    int64_t heads;
    bool quick_gelu;
};
TORCH_MODULE(ClipLayer);

struct ClipTextModelImpl : torch::nn::Module {
    explicit ClipTextModelImpl(const ClipTextConfig &c);
    // ids [B, T] int64 -> [B, T, hidden]: the final layer norm applied to the
    // output of the last layer, or of the layer clip_skip layers before it.
    torch::Tensor forward(const torch::Tensor &ids, int64_t clip_skip = 0);
    ClipTextConfig config;
    Embedding token_embedding{nullptr}, position_embedding{nullptr};
    torch::nn::ModuleList layers;
    LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(ClipTextModel);

}  // namespace sw
