#include "clip.h"

#include "common.h"

namespace sw {

ClipTextConfig ClipTextConfig::from(const Config &c) {
    ClipTextConfig o;
    o.vocab_size = c.integer_in("vocab_size", 1, int64_t(1) << 22);
    o.hidden_size = c.integer_in("hidden_size", 1, kMaxWidth);
    o.intermediate_size = c.integer_in("intermediate_size", 1, 8 * kMaxWidth);
    o.heads = c.integer_in("num_attention_heads", 1, kMaxHeads);
    o.layers = c.integer_in("num_hidden_layers", 1, kMaxLayers);
    // Prompts are padded to this length: BOS and EOS need two places, and the
    // causal mask is length x length.
    o.max_positions = c.integer_in("max_position_embeddings", 77, 2, 4096);
    o.eps = c.number_in("layer_norm_eps", 1e-5, 1e-12, 1.0);
    const std::string act = c.string("hidden_act", "quick_gelu");
    if (act != "quick_gelu" && act != "gelu")
        fail(SW_ERR_UNSUPPORTED, c.source() + ": hidden_act \"" + act + "\" (want quick_gelu or gelu)");
    o.quick_gelu = act == "quick_gelu";
    if (o.hidden_size % o.heads != 0)
        c.bad("num_attention_heads", "a divisor of hidden_size " + std::to_string(o.hidden_size) + " (is " +
                                         std::to_string(o.heads) + ")");
    return o;
}

// Registered under the transformers names: self_attn.{q,k,v,out}_proj, mlp.fc1/fc2.
ClipLayerImpl::ClipLayerImpl(const ClipTextConfig &c) : heads(c.heads), quick_gelu(c.quick_gelu) {
    auto attn = register_module("self_attn", std::make_shared<torch::nn::Module>());
    q_proj = Linear(c.hidden_size, c.hidden_size);
    k_proj = Linear(c.hidden_size, c.hidden_size);
    v_proj = Linear(c.hidden_size, c.hidden_size);
    out_proj = Linear(c.hidden_size, c.hidden_size);
    attn->register_module("q_proj", q_proj);
    attn->register_module("k_proj", k_proj);
    attn->register_module("v_proj", v_proj);
    attn->register_module("out_proj", out_proj);
    layer_norm1 = register_module("layer_norm1", LayerNorm(c.hidden_size, c.eps));
    auto mlp = register_module("mlp", std::make_shared<torch::nn::Module>());
    fc1 = Linear(c.hidden_size, c.intermediate_size);
    fc2 = Linear(c.intermediate_size, c.hidden_size);
    mlp->register_module("fc1", fc1);
    mlp->register_module("fc2", fc2);
    layer_norm2 = register_module("layer_norm2", LayerNorm(c.hidden_size, c.eps));
}

torch::Tensor ClipLayerImpl::forward(const torch::Tensor &x, const torch::Tensor &causal_mask) {
    auto h = layer_norm1(x);
    h = out_proj(attention(q_proj(h), k_proj(h), v_proj(h), heads, causal_mask));
    auto y = x + h;
    h = fc1(layer_norm2(y));
    h = quick_gelu ? h * torch::sigmoid(1.702 * h) : at::gelu(h);
    return y + fc2(h);
}

ClipTextModelImpl::ClipTextModelImpl(const ClipTextConfig &c) : config(c) {
    auto text_model = register_module("text_model", std::make_shared<torch::nn::Module>());
    auto embeddings = text_model->register_module("embeddings", std::make_shared<torch::nn::Module>());
    token_embedding = Embedding(c.vocab_size, c.hidden_size);
    position_embedding = Embedding(c.max_positions, c.hidden_size);
    embeddings->register_module("token_embedding", token_embedding);
    embeddings->register_module("position_embedding", position_embedding);
    auto encoder = text_model->register_module("encoder", std::make_shared<torch::nn::Module>());
    for (int64_t i = 0; i < c.layers; i++) layers->push_back(ClipLayer(c));
    encoder->register_module("layers", layers);
    final_layer_norm = LayerNorm(c.hidden_size, c.eps);
    text_model->register_module("final_layer_norm", final_layer_norm);
}

torch::Tensor ClipTextModelImpl::forward(const torch::Tensor &ids, int64_t clip_skip) {
    const int64_t t = ids.size(1);
    if (t > config.max_positions)
        fail(SW_ERR_INVALID_ARGUMENT, "text encoder: " + std::to_string(t) + " tokens exceed max_position_embeddings " +
                                          std::to_string(config.max_positions));
    if (clip_skip < 0 || clip_skip >= config.layers)
        fail(SW_ERR_INVALID_ARGUMENT, "clip_skip " + std::to_string(clip_skip) + " out of range");
    auto positions = torch::arange(t, torch::TensorOptions().dtype(torch::kInt64).device(ids.device()));
    auto x = token_embedding(ids) + position_embedding(positions).unsqueeze(0);
    auto opts = torch::TensorOptions().dtype(x.scalar_type()).device(x.device());
    auto mask = torch::full({t, t}, -std::numeric_limits<float>::infinity(), opts).triu(1);
    const int64_t run = config.layers - clip_skip;
    for (int64_t i = 0; i < run; i++) {
        check_cancel();
        x = layers[i]->as<ClipLayer>()->forward(x, mask);
    }
    return final_layer_norm(x);
}

}  // namespace sw
