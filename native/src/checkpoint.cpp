// Single-file Stable Diffusion checkpoints in the original CompVis/LDM key
// layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*):
// the architecture is read from tensor shapes, a few facts shapes cannot tell
// (head counts, v-prediction) from an optional LDM .yaml beside the file.
#include <sstream>
#include <cerrno>
#include <cmath>
#include <map>
#include <regex>
#include <set>

#include "checkpoint.h"
#include "safetensors.h"
#include "sampler.h"
#include "weights.h"

namespace sw {

namespace {

const std::string kUNet = "model.diffusion_model.";
const std::string kVAE = "first_stage_model.";

bool starts_with(const std::string &s, const std::string &p) { return s.rfind(p, 0) == 0; }

// The scalar settings of an LDM yaml, found line by line ("key: value"); the
// first occurrence wins, which is the UNet's for the keys read here. Numbers
// are parsed on use, and a bad one is SW_ERR_FORMAT naming the file and key.
struct YamlHints {
    std::string file;
    std::map<std::string, std::string> values;

    bool has(const std::string &key) const { return values.count(key) != 0; }

    double number(const std::string &key) const {
        const std::string &v = values.at(key);
        char *end = nullptr;
        errno = 0;
        const double d = std::strtod(v.c_str(), &end);
        if (v.empty() || end != v.c_str() + v.size() || errno == ERANGE || !std::isfinite(d))
            fail(SW_ERR_FORMAT, file + ": \"" + key + "\" must be a number (is \"" + v + "\")");
        return d;
    }

    int64_t integer(const std::string &key, int64_t lo, int64_t hi) const {
        const double d = number(key);
        if (d != std::floor(d) || d < static_cast<double>(lo) || d > static_cast<double>(hi))
            fail(SW_ERR_FORMAT, file + ": \"" + key + "\" must be a whole number between " + std::to_string(lo) +
                                    " and " + std::to_string(hi) + " (is \"" + values.at(key) + "\")");
        return static_cast<int64_t>(d);
    }
};

YamlHints read_yaml_hints(const std::string &path) {
    YamlHints out{path, {}};
    std::istringstream in(read_text_file(path));
    std::string line;
    static const std::regex kv(R"(^\s*([A-Za-z_]+)\s*:\s*([^#]*?)\s*(#.*)?$)");
    std::smatch m;
    while (std::getline(in, line)) {
        if (std::regex_match(line, m, kv) && !m[2].str().empty() && !out.has(m[1].str())) out.values[m[1].str()] = m[2].str();
    }
    return out;
}

// A block index from a tensor name: digits only, and few enough to be an
// index (-1 otherwise, which matches no module).
int64_t parse_index(const std::string &s) {
    if (s.empty() || s.size() > 6 || s.find_first_not_of("0123456789") != std::string::npos) return -1;
    return std::stoll(s);
}

std::string yaml_path_for(const std::string &path) {
    const auto dot = path.find_last_of('.');
    return (dot == std::string::npos ? path : path.substr(0, dot)) + ".yaml";
}

int64_t dim(const SafeTensorsFile &f, const std::string &key, size_t d) {
    const auto &s = f.entry(key).shape;
    if (d >= s.size()) fail(SW_ERR_FORMAT, f.path() + ": tensor " + key + " has too few dimensions");
    return s[d];
}

int64_t count_indices(const SafeTensorsFile &f, const std::string &prefix) {
    std::set<int64_t> seen;
    for (const auto &[name, e] : f.entries()) {
        if (!starts_with(name, prefix)) continue;
        const std::string rest = name.substr(prefix.size());
        const auto dot = rest.find('.');
        const int64_t idx = parse_index(rest.substr(0, dot));
        if (idx >= 0) seen.insert(idx);
    }
    return static_cast<int64_t>(seen.size());
}

std::string resnet_name(const std::string &ldm) {
    static const std::vector<std::pair<std::string, std::string>> renames = {
        {"in_layers.0.", "norm1."}, {"in_layers.2.", "conv1."},        {"out_layers.0.", "norm2."},
        {"out_layers.3.", "conv2."}, {"emb_layers.1.", "time_emb_proj."}, {"skip_connection.", "conv_shortcut."}};
    for (const auto &[a, b] : renames)
        if (starts_with(ldm, a)) return b + ldm.substr(a.size());
    return ldm;
}

// LDM UNet key (after the prefix) -> diffusers name.
std::string unet_key_to_diffusers(const std::string &k, int64_t n) {
    static const std::vector<std::pair<std::string, std::string>> direct = {
        {"time_embed.0.", "time_embedding.linear_1."}, {"time_embed.2.", "time_embedding.linear_2."},
        {"input_blocks.0.0.", "conv_in."},             {"out.0.", "conv_norm_out."},
        {"out.2.", "conv_out."},                       {"middle_block.1.", "mid_block.attentions.0."}};
    for (const auto &[a, b] : direct)
        if (starts_with(k, a)) return b + k.substr(a.size());
    static const std::regex mid(R"(^middle_block\.([02])\.(.*)$)");
    static const std::regex in(R"(^input_blocks\.(\d+)\.(\d+)\.(.*)$)");
    static const std::regex outb(R"(^output_blocks\.(\d+)\.(\d+)\.(.*)$)");
    std::smatch m;
    if (std::regex_match(k, m, mid))
        return "mid_block.resnets." + std::string(m[1] == "0" ? "0" : "1") + "." + resnet_name(m[2]);
    if (std::regex_match(k, m, in)) {
        const int64_t i = parse_index(m[1]), sub = parse_index(m[2]);
        if (i < 1 || sub < 0) return "";
        const int64_t block = (i - 1) / (n + 1), layer = (i - 1) % (n + 1);
        const std::string rest = m[3];
        if (layer == n) {
            if (starts_with(rest, "op.")) return "down_blocks." + std::to_string(block) + ".downsamplers.0.conv." + rest.substr(3);
            return "";
        }
        if (sub == 0) return "down_blocks." + std::to_string(block) + ".resnets." + std::to_string(layer) + "." + resnet_name(rest);
        return "down_blocks." + std::to_string(block) + ".attentions." + std::to_string(layer) + "." + rest;
    }
    if (std::regex_match(k, m, outb)) {
        const int64_t i = parse_index(m[1]), sub = parse_index(m[2]);
        if (i < 0 || sub < 0) return "";
        const int64_t block = i / (n + 1), layer = i % (n + 1);
        const std::string rest = m[3], pre = "up_blocks." + std::to_string(block) + ".";
        if (sub == 0) return pre + "resnets." + std::to_string(layer) + "." + resnet_name(rest);
        if (starts_with(rest, "conv.")) return pre + "upsamplers.0.conv." + rest.substr(5);
        return pre + "attentions." + std::to_string(layer) + "." + rest;
    }
    return "";
}

// LDM VAE key (after the prefix) -> diffusers name.
std::string vae_key_to_diffusers(const std::string &k, int64_t levels) {
    static const std::regex down(R"(^encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$)");
    static const std::regex downs(R"(^encoder\.down\.(\d+)\.downsample\.conv\.(.*)$)");
    static const std::regex up(R"(^decoder\.up\.(\d+)\.block\.(\d+)\.(.*)$)");
    static const std::regex ups(R"(^decoder\.up\.(\d+)\.upsample\.conv\.(.*)$)");
    static const std::regex midres(R"(^(encoder|decoder)\.mid\.block_([12])\.(.*)$)");
    static const std::regex midattn(R"(^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)$)");
    static const std::regex norm_out(R"(^(encoder|decoder)\.norm_out\.(.*)$)");
    auto res = [](std::string rest) {
        if (starts_with(rest, "nin_shortcut.")) return "conv_shortcut." + rest.substr(13);
        return rest;
    };
    std::smatch m;
    if (std::regex_match(k, m, down))
        return "encoder.down_blocks." + m[1].str() + ".resnets." + m[2].str() + "." + res(m[3]);
    if (std::regex_match(k, m, downs)) return "encoder.down_blocks." + m[1].str() + ".downsamplers.0.conv." + m[2].str();
    if (std::regex_match(k, m, up)) {
        const int64_t i = levels - 1 - parse_index(m[1]);
        return "decoder.up_blocks." + std::to_string(i) + ".resnets." + m[2].str() + "." + res(m[3]);
    }
    if (std::regex_match(k, m, ups)) {
        const int64_t i = levels - 1 - parse_index(m[1]);
        return "decoder.up_blocks." + std::to_string(i) + ".upsamplers.0.conv." + m[2].str();
    }
    if (std::regex_match(k, m, midres))
        return m[1].str() + ".mid_block.resnets." + (m[2] == "1" ? "0" : "1") + "." + res(m[3]);
    if (std::regex_match(k, m, midattn)) {
        static const std::map<std::string, std::string> to = {
            {"norm", "group_norm"}, {"q", "to_q"}, {"k", "to_k"}, {"v", "to_v"}, {"proj_out", "to_out.0"}};
        return m[1].str() + ".mid_block.attentions.0." + to.at(m[2]) + "." + m[3].str();
    }
    if (std::regex_match(k, m, norm_out)) return m[1].str() + ".conv_norm_out." + m[2].str();
    return k;  // conv_in, conv_out, quant_conv, post_quant_conv keep their names
}

// SD 2.x's OpenCLIP text tower -> transformers CLIPTextModel names.
Source open_clip_source(const std::string &name, const std::string &root) {
    static const std::regex layer(R"(^text_model\.encoder\.layers\.(\d+)\.(.*)$)");
    std::smatch m;
    if (name == "text_model.embeddings.token_embedding.weight") return {root + "token_embedding.weight"};
    if (name == "text_model.embeddings.position_embedding.weight") return {root + "positional_embedding"};
    if (starts_with(name, "text_model.final_layer_norm.")) return {root + "ln_final." + name.substr(28)};
    if (std::regex_match(name, m, layer)) {
        const std::string pre = root + "transformer.resblocks." + m[1].str() + ".";
        const std::string rest = m[2];
        static const std::vector<std::pair<std::string, std::string>> renames = {
            {"layer_norm1.", "ln_1."}, {"layer_norm2.", "ln_2."}, {"mlp.fc1.", "mlp.c_fc."},
            {"mlp.fc2.", "mlp.c_proj."}, {"self_attn.out_proj.", "attn.out_proj."}};
        for (const auto &[a, b] : renames)
            if (starts_with(rest, a)) return {pre + b + rest.substr(a.size())};
        static const std::vector<std::string> qkv = {"self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."};
        for (int i = 0; i < 3; i++)
            if (starts_with(rest, qkv[static_cast<size_t>(i)]))
                return {pre + "attn.in_proj_" + rest.substr(qkv[static_cast<size_t>(i)].size()), i, 3};
    }
    return {};
}

nlohmann::json unet_config(const SafeTensorsFile &f, const YamlHints &yaml, int64_t *n_out) {
    const auto p = [&](const std::string &k) { return kUNet + k; };
    if (!f.has(p("input_blocks.0.0.weight")) || !f.has(p("out.2.weight")))
        fail(SW_ERR_UNSUPPORTED, f.path() + ": not a Stable Diffusion 1.x/2.x checkpoint (no UNet input/output convolutions)");
    if (f.has(p("label_emb.0.0.weight")))
        fail(SW_ERR_UNSUPPORTED, f.path() + ": SDXL-style UNet (label_emb) is not supported");
    const int64_t c0 = dim(f, p("input_blocks.0.0.weight"), 0);
    const int64_t in_ch = dim(f, p("input_blocks.0.0.weight"), 1);
    const int64_t blocks = count_indices(f, p("input_blocks."));
    int64_t n = 0;
    while (n + 1 < blocks && !f.has(p("input_blocks." + std::to_string(n + 1) + ".0.op.weight"))) n++;
    if (n == 0 || (blocks - 1 + 1) % (n + 1) != 0)
        fail(SW_ERR_UNSUPPORTED, f.path() + ": unrecognised UNet layout (" + std::to_string(blocks) + " input blocks)");
    const int64_t levels = blocks / (n + 1);
    std::vector<int64_t> channels;
    std::vector<std::string> down, up;
    int64_t context = 0, depth = 1;
    bool linear = false;
    for (int64_t l = 0; l < levels; l++) {
        const std::string blk = "input_blocks." + std::to_string(1 + l * (n + 1)) + ".";
        channels.push_back(dim(f, p(blk + "0.out_layers.3.weight"), 0));
        const bool attn = f.has(p(blk + "1.proj_in.weight"));
        down.push_back(attn ? "CrossAttnDownBlock2D" : "DownBlock2D");
        up.insert(up.begin(), attn ? "CrossAttnUpBlock2D" : "UpBlock2D");
        if (attn) {
            context = dim(f, p(blk + "1.transformer_blocks.0.attn2.to_k.weight"), 1);
            linear = f.entry(p(blk + "1.proj_in.weight")).shape.size() == 2;
            depth = count_indices(f, p(blk + "1.transformer_blocks."));
        }
    }
    if (context == 0) fail(SW_ERR_UNSUPPORTED, f.path() + ": UNet without cross-attention");
    // Head counts are not in the shapes: the yaml's num_heads / num_head_channels,
    // else SD 1.x's 8 heads, or SD 2.x's 64-wide heads for 1024-wide context.
    nlohmann::json heads;
    // (-1 means "not set" in LDM yamls.)
    const int64_t head_channels = yaml.has("num_head_channels") ? yaml.integer("num_head_channels", -1, kMaxWidth) : -1;
    const int64_t num_heads = yaml.has("num_heads") ? yaml.integer("num_heads", -1, kMaxHeads) : -1;
    if (head_channels > 0) {
        heads = nlohmann::json::array();
        for (auto c : channels) heads.push_back(c / head_channels);
    } else if (num_heads > 0) {
        heads = num_heads;
    } else if (context == 1024) {
        heads = nlohmann::json::array();
        for (auto c : channels) heads.push_back(c / 64);
    } else {
        heads = 8;
    }
    *n_out = n;
    return {{"in_channels", in_ch},
            {"out_channels", dim(f, p("out.2.weight"), 0)},
            {"block_out_channels", channels},
            {"layers_per_block", n},
            {"cross_attention_dim", context},
            {"attention_head_dim", heads},
            {"transformer_layers_per_block", depth},
            {"use_linear_projection", linear},
            {"down_block_types", down},
            {"up_block_types", up},
            {"time_embedding_dim", dim(f, p("time_embed.0.weight"), 0)},
            {"norm_num_groups", 32},
            {"sample_size", 64},
            {"upcast_attention", context == 1024 && c0 == 320}};
}

// The VAE config read from shapes: keys under prefix, in the LDM layout
// (encoder.down.N.block.M) or, when ldm is false, diffusers' (down_blocks.N.resnets.M).
nlohmann::json vae_config(const SafeTensorsFile &f, const std::string &prefix, bool ldm, double scale, int64_t *levels) {
    const auto p = [&](const std::string &k) { return prefix + k; };
    const std::string down = ldm ? "encoder.down." : "encoder.down_blocks.";
    const std::string block = ldm ? ".block." : ".resnets.";
    *levels = count_indices(f, p(down));
    if (*levels == 0) fail(SW_ERR_UNSUPPORTED, f.path() + ": no VAE encoder blocks under " + p(down));
    std::vector<int64_t> channels;
    for (int64_t l = 0; l < *levels; l++) channels.push_back(dim(f, p(down + std::to_string(l) + block + "0.conv1.weight"), 0));
    return {{"in_channels", dim(f, p("encoder.conv_in.weight"), 1)},
            {"out_channels", dim(f, p("decoder.conv_out.weight"), 0)},
            {"latent_channels", dim(f, p("post_quant_conv.weight"), 0)},
            {"layers_per_block", count_indices(f, p(down + "0" + block))},
            {"block_out_channels", channels},
            {"norm_num_groups", 32},
            {"scaling_factor", scale},
            {"down_block_types", std::vector<std::string>(static_cast<size_t>(*levels), "DownEncoderBlock2D")},
            {"up_block_types", std::vector<std::string>(static_cast<size_t>(*levels), "UpDecoderBlock2D")}};
}

// Module names -> file keys for an LDM VAE under prefix.
std::map<std::string, std::string> ldm_vae_keys(const SafeTensorsFile &f, const std::string &prefix, int64_t levels) {
    std::map<std::string, std::string> keys;
    for (const auto &[key, e] : f.entries())
        if (starts_with(key, prefix)) keys[vae_key_to_diffusers(key.substr(prefix.size()), levels)] = key;
    return keys;
}

Resolver from_map(const std::map<std::string, std::string> &keys, const std::string &prefix) {
    return [keys, prefix](const std::string &name) {
        auto it = keys.find(name);
        return Source{it == keys.end() ? prefix + name : it->second};
    };
}

std::string join(const std::vector<int64_t> &v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
}

int64_t clip_heads(int64_t hidden) { return hidden >= 64 && hidden % 64 == 0 ? hidden / 64 : std::max<int64_t>(1, hidden / 8); }

}  // namespace

WeightStats load_vae_weights(VAEImpl &vae, std::shared_ptr<const SafeTensorsFile> f, Resolver resolve,
                             torch::ScalarType dtype, const torch::Device &device) {
    // Each half as a module of its own, its tensors under their names in vae.
    auto half = [&](std::initializer_list<const char *> names) {
        auto part = std::make_shared<torch::nn::Module>();
        const auto children = vae.named_children();
        for (const char *n : names) part->register_module(n, children[n]);
        return part;
    };
    auto encoding = half({"encoder", "quant_conv"}), decoding = half({"decoder", "post_quant_conv"});
    WeightStats stats = check_weights(*encoding, *f, resolve, dtype);
    // Until it is loaded the encoder's placeholders take dtype, so that the
    // module's stats are the ones it will have.
    for (auto &t : encoding->parameters())
        if (t.is_floating_point()) t.set_data(torch::empty({1}, t.options().dtype(dtype)).expand(t.sizes()));
    const auto now = load_weights(*decoding, *f, resolve, dtype, device);
    stats.params += now.params;
    stats.bytes += now.bytes;
    vae.load_encoder = [encoding, f = std::move(f), resolve = std::move(resolve), dtype, device] {
        load_weights(*encoding, *f, resolve, dtype, device);
    };
    return stats;
}

void open_single_file(sw_sd_model &m, const std::string &path) {
    const auto file = std::make_shared<const SafeTensorsFile>(path);
    const SafeTensorsFile &f = *file;
    const std::string yaml_file = yaml_path_for(path);
    const auto yaml = path_exists(yaml_file) ? read_yaml_hints(yaml_file) : YamlHints{yaml_file, {}};
    const auto st = scalar_type(m.dtype);

    int64_t n = 0, levels = 0;
    const UNetConfig unet_cfg = UNetConfig::from(Config(unet_config(f, yaml, &n), path + " (UNet from shapes)"));
    if (!f.has(kVAE + "encoder.conv_in.weight") || !f.has(kVAE + "post_quant_conv.weight"))
        fail(SW_ERR_UNSUPPORTED, f.path() + ": no VAE (first_stage_model) in the checkpoint");
    const double scale = yaml.has("scale_factor") ? yaml.number("scale_factor") : 0.18215;
    const VAEConfig vae_cfg = VAEConfig::from(Config(vae_config(f, kVAE, true, scale, &levels), path + " (VAE from shapes)"));

    // The text encoder: SD 1.x's transformers CLIP, or SD 2.x's OpenCLIP.
    std::string clip_root = "cond_stage_model.transformer.text_model.";
    if (!f.has(clip_root + "embeddings.token_embedding.weight") && f.has("cond_stage_model.transformer.embeddings.token_embedding.weight"))
        clip_root = "cond_stage_model.transformer.";
    const bool open_clip = f.has("cond_stage_model.model.token_embedding.weight");
    nlohmann::json clip;
    if (open_clip) {
        const std::string r = "cond_stage_model.model.";
        const int64_t hidden = dim(f, r + "token_embedding.weight", 1);
        // SD 2.x uses the penultimate layer: the last resblock is not run.
        clip = {{"vocab_size", dim(f, r + "token_embedding.weight", 0)},
                {"hidden_size", hidden},
                {"intermediate_size", dim(f, r + "transformer.resblocks.0.mlp.c_fc.weight", 0)},
                {"num_attention_heads", clip_heads(hidden)},
                {"num_hidden_layers", count_indices(f, r + "transformer.resblocks.") - 1},
                {"max_position_embeddings", dim(f, r + "positional_embedding", 0)},
                {"hidden_act", "gelu"}};
    } else if (f.has(clip_root + "embeddings.token_embedding.weight")) {
        const int64_t hidden = dim(f, clip_root + "embeddings.token_embedding.weight", 1);
        clip = {{"vocab_size", dim(f, clip_root + "embeddings.token_embedding.weight", 0)},
                {"hidden_size", hidden},
                {"intermediate_size", dim(f, clip_root + "encoder.layers.0.mlp.fc1.weight", 0)},
                {"num_attention_heads", clip_heads(hidden)},
                {"num_hidden_layers", count_indices(f, clip_root + "encoder.layers.")},
                {"max_position_embeddings", dim(f, clip_root + "embeddings.position_embedding.weight", 0)},
                {"hidden_act", "quick_gelu"}};
    } else {
        fail(SW_ERR_UNSUPPORTED, path + ": no text encoder (cond_stage_model) in the checkpoint");
    }
    const ClipTextConfig clip_cfg = ClipTextConfig::from(Config(clip, path + " (text encoder from shapes)"));

    // SD 1.5's scheduler, adjusted by the yaml (v-prediction, betas).
    nlohmann::json sched = {{"_class_name", "PNDMScheduler"}, {"beta_schedule", "scaled_linear"},
                            {"beta_start", 0.00085},          {"beta_end", 0.012},
                            {"num_train_timesteps", 1000},     {"set_alpha_to_one", false},
                            {"skip_prk_steps", true},          {"steps_offset", 1}};
    if (yaml.has("linear_start")) sched["beta_start"] = yaml.number("linear_start");
    if (yaml.has("linear_end")) sched["beta_end"] = yaml.number("linear_end");
    if (yaml.has("parameterization") && yaml.values.at("parameterization").find('v') != std::string::npos)
        sched["prediction_type"] = "v_prediction";
    m.scheduler_config = Config(sched, path + " (scheduler)");
    if (!m.tokenizer) m.tokenizer = builtin_tokenizer(unet_cfg);
    check_sd_configs(path, clip_cfg, unet_cfg, vae_cfg, m.scheduler_config, *m.tokenizer, m.tokenizer->source());

    m.text_encoder = ClipTextModel(clip_cfg);
    m.unet = UNet(unet_cfg);
    m.vae = VAE(vae_cfg);

    // Module names -> file keys.
    std::map<std::string, std::string> unet_keys;
    for (const auto &[key, e] : f.entries()) {
        if (starts_with(key, kUNet)) {
            const auto d = unet_key_to_diffusers(key.substr(kUNet.size()), n);
            if (!d.empty()) unet_keys[d] = key;
        }
    }
    const auto vae_keys = ldm_vae_keys(f, kVAE, levels);
    WeightStats total;
    auto add = [&](const WeightStats &s) {
        total.params += s.params;
        total.bytes += s.bytes;
    };
    add(load_weights(*m.unet, f, from_map(unet_keys, kUNet), st, m.device));
    add(load_vae_weights(*m.vae, file, from_map(vae_keys, kVAE), st, m.device));
    if (open_clip) {
        add(load_weights(*m.text_encoder, f, [](const std::string &name) { return open_clip_source(name, "cond_stage_model.model."); },
                         st, m.device));
    } else {
        const std::string root = clip_root;
        add(load_weights(*m.text_encoder, f,
                         [root](const std::string &name) {
                             return Source{root + (starts_with(name, "text_model.") ? name.substr(11) : name)};
                         },
                         st, m.device));
    }
    m.params = total.params;
    m.bytes = total.bytes;
}

void check_vae_fits(const VAEConfig &got, const VAEConfig &want, const std::string &what) {
    std::string diff;
    auto differ = [&](const std::string &name, const std::string &g, const std::string &w) {
        if (g != w) diff += (diff.empty() ? "" : "; ") + name + " " + g + " (the model's: " + w + ")";
    };
    differ("block_out_channels", join(got.block_out), join(want.block_out));
    differ("layers_per_block", std::to_string(got.layers_per_block), std::to_string(want.layers_per_block));
    differ("latent_channels", std::to_string(got.latent_channels), std::to_string(want.latent_channels));
    differ("in_channels", std::to_string(got.in_channels), std::to_string(want.in_channels));
    differ("out_channels", std::to_string(got.out_channels), std::to_string(want.out_channels));
    differ("norm_num_groups", std::to_string(got.groups), std::to_string(want.groups));
    if (!diff.empty()) fail(SW_ERR_INVALID_ARGUMENT, what + ": this VAE does not fit the model: " + diff);
}

WeightStats load_vae_file(VAE &vae, const std::string &path, torch::ScalarType dtype, const torch::Device &device) {
    const auto file = std::make_shared<const SafeTensorsFile>(path);
    const SafeTensorsFile &f = *file;
    std::string prefix;
    if (f.has(kVAE + "encoder.conv_in.weight"))
        prefix = kVAE;
    else if (!f.has("encoder.conv_in.weight"))
        fail(SW_ERR_UNSUPPORTED, path + ": not a VAE checkpoint (no encoder.conv_in.weight, bare or under " + kVAE + ")");
    const bool ldm = !f.has(prefix + "encoder.down_blocks.0.resnets.0.conv1.weight");
    int64_t levels = 0;
    const auto cfg = VAEConfig::from(
        Config(vae_config(f, prefix, ldm, vae->config.scaling_factor, &levels), path + " (VAE from shapes)"));
    check_vae_fits(cfg, vae->config, path);
    if (!ldm) return load_vae_weights(*vae, file, prefixed(prefix), dtype, device);
    return load_vae_weights(*vae, file, from_map(ldm_vae_keys(f, prefix, levels), prefix), dtype, device);
}

}  // namespace sw
