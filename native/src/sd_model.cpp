#include <sys/stat.h>

#include <memory>

#include "checkpoint.h"
#include "layers.h"
#include "models.h"
#include "safetensors.h"
#include "sampler.h"
#include "tokenizer.h"
#include "weights.h"

namespace sw {

namespace {

// The weights file of one diffusers component, preferring safetensors.
std::string component_weights(const std::string &dir, const std::string &stem) {
    for (const auto &name : {stem + ".safetensors", stem + ".fp16.safetensors"}) {
        const std::string p = dir + "/" + name;
        if (path_exists(p)) return p;
    }
    if (path_exists(dir + "/" + stem + ".bin"))
        fail(SW_ERR_UNSUPPORTED, dir + "/" + stem + ".bin: pickle weights are not read directly; convert the model to "
                                                    "safetensors (stepwise models convert)");
    fail(SW_ERR_NOT_FOUND, dir + ": no " + stem + ".safetensors");
}

Config component_config(const std::string &dir) { return Config::from_file(dir + "/config.json"); }

std::unique_ptr<Tokenizer> load_tokenizer(const std::string &dir) {
    for (const auto &name : {"vocab.json", "merges.txt"})
        if (!path_exists(dir + "/" + name)) fail(SW_ERR_NOT_FOUND, dir + ": tokenizer file " + name + " is missing");
    return std::make_unique<Tokenizer>(dir);
}

std::string sd_family(const UNetConfig &unet) {
    return std::string(is_sd2(unet) ? "sd2" : "sd1") + (unet.in_channels == 9 ? "-inpaint" : "");
}

bool is_pickle(const std::string &path) {
    const auto dot = path.find_last_of('.');
    const std::string ext = dot == std::string::npos ? "" : path.substr(dot);
    return ext == ".ckpt" || ext == ".pt" || ext == ".pth" || ext == ".bin";
}

bool is_regular_file(const std::string &path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

WeightStats module_stats(torch::nn::Module &module) {
    WeightStats s;
    for (const auto &t : module.parameters()) {
        s.params += t.numel();
        s.bytes += t.numel() * static_cast<int64_t>(t.element_size());
    }
    for (const auto &t : module.buffers()) s.bytes += t.numel() * static_cast<int64_t>(t.element_size());
    return s;
}

// Replaces m's VAE with the one at path: a diffusers VAE folder (config.json +
// weights; its config, scaling factor included, is used) or a single
// .safetensors file (the model's VAE config is used). Either must have the
// architecture of the model's own VAE.
void replace_vae(sw_sd_model &m, const std::string &path, torch::ScalarType st) {
    if (!path_exists(path)) fail(SW_ERR_NOT_FOUND, path + ": no such VAE file or folder");
    VAE vae{nullptr};
    WeightStats stats;
    if (!is_regular_file(path)) {
        const auto cfg = VAEConfig::from(component_config(path));
        check_vae_fits(cfg, m.vae->config, path);
        vae = VAE(cfg);
        stats = load_vae_weights(*vae, std::make_shared<const SafeTensorsFile>(component_weights(path, "diffusion_pytorch_model")),
                                 prefixed(""), st, m.device);
    } else {
        if (is_pickle(path))
            fail(SW_ERR_UNSUPPORTED, path + ": pickle VAE files are not read directly; convert it to .safetensors "
                                            "(stepwise models convert)");
        vae = VAE(m.vae->config);
        stats = load_vae_file(vae, path, st, m.device);
    }
    const auto own = module_stats(*m.vae);
    m.params += stats.params - own.params;
    m.bytes += stats.bytes - own.bytes;
    m.vae = vae;
}

}  // namespace

// SD 2.x is told from its UNet: linear projections and 1024-wide context
// (OpenCLIP ViT-H). It decides the family name and the built-in tokenizer's padding.
bool is_sd2(const UNetConfig &unet) { return unet.linear_projection || unet.cross_attention_dim == 1024; }

std::unique_ptr<Tokenizer> builtin_tokenizer(const UNetConfig &unet) {
    return std::make_unique<Tokenizer>(is_sd2(unet) ? ClipPad::Exclamation : ClipPad::EndOfText);
}

void check_sd_configs(const std::string &root, const ClipTextConfig &clip, const UNetConfig &unet, const VAEConfig &vae,
                      const Config &scheduler, const Tokenizer &tokenizer, const std::string &tokenizer_dir) {
    if (static_cast<int64_t>(tokenizer.vocab_size()) > clip.vocab_size || tokenizer.max_id() >= clip.vocab_size)
        fail(SW_ERR_FORMAT, root + ": " + tokenizer_dir + " has " + std::to_string(tokenizer.vocab_size()) +
                                " tokens (ids up to " + std::to_string(tokenizer.max_id()) + "), the text encoder only " +
                                std::to_string(clip.vocab_size) + "; pass the model's own tokenizer folder (--tokenizer DIR)");
    NoiseSchedule::from(scheduler);  // validates it now, not at the first generation
    if (unet.cross_attention_dim != clip.hidden_size)
        fail(SW_ERR_FORMAT, root + ": unet cross_attention_dim " + std::to_string(unet.cross_attention_dim) +
                                " does not match the text encoder's hidden_size " + std::to_string(clip.hidden_size));
    if (vae.latent_channels != 4 || unet.out_channels != 4)
        fail(SW_ERR_UNSUPPORTED, root + ": only 4-channel latents are supported");
    if (unet.in_channels != 4 && unet.in_channels != 9)
        fail(SW_ERR_UNSUPPORTED, root + ": a UNet with " + std::to_string(unet.in_channels) +
                                     " input channels (want 4, or 9 for inpainting)");
    if (vae.in_channels != 3 || vae.out_channels != 3)
        fail(SW_ERR_UNSUPPORTED, root + ": only RGB VAEs (3 channels in and out) are supported");
}

sw_sd_model *open_sd_model(const sw_sd_model_params &p) {
    CallGuard guard;
    if (p.path == nullptr || *p.path == '\0') fail(SW_ERR_INVALID_ARGUMENT, "model path is empty");
    const std::string root = p.path;
    if (!path_exists(root)) fail(SW_ERR_NOT_FOUND, root + ": no such file or folder");
    struct stat st_buf;
    const bool is_file = ::stat(root.c_str(), &st_buf) == 0 && S_ISREG(st_buf.st_mode);
    if (!is_file && !S_ISDIR(st_buf.st_mode))
        fail(SW_ERR_IO, root + ": neither a regular file nor a folder (a FIFO or a device is never read)");

    auto m = std::make_unique<sw_sd_model>();
    m->path = root;
    m->device = parse_device(p.device ? p.device : "cpu");
    m->dtype = resolve_dtype(p.dtype, m->device);
    const auto st = scalar_type(m->dtype);
    const std::string tokenizer_arg = (p.tokenizer_dir && *p.tokenizer_dir) ? p.tokenizer_dir : "";
    const std::string vae_arg = (p.vae_path && *p.vae_path) ? p.vae_path : "";

    // The tokenizer: --tokenizer, else a diffusers folder's own, else (single
    // files, folders without one) the built-in CLIP vocabulary, once the
    // architecture says how to pad.
    if (!tokenizer_arg.empty()) {
        m->tokenizer_dir = tokenizer_arg;
        m->tokenizer = load_tokenizer(tokenizer_arg);
    }
    if (is_file) {
        if (is_pickle(root))
            fail(SW_ERR_UNSUPPORTED, root + ": pickle checkpoints are not read directly; convert it to .safetensors "
                                            "(stepwise models convert)");
        open_single_file(*m, root);
    } else {
        if (!path_exists(root + "/model_index.json"))
            fail(SW_ERR_UNSUPPORTED, root + ": not a diffusers folder (no model_index.json)");
        Config::from_file(root + "/model_index.json");  // validates the JSON
        if (!m->tokenizer && path_exists(root + "/tokenizer")) {
            m->tokenizer_dir = root + "/tokenizer";
            m->tokenizer = load_tokenizer(m->tokenizer_dir);
        }
        m->scheduler_config = Config::from_file(root + "/scheduler/scheduler_config.json");
        const auto clip_cfg = ClipTextConfig::from(component_config(root + "/text_encoder"));
        const auto unet_cfg = UNetConfig::from(component_config(root + "/unet"));
        const auto vae_cfg = VAEConfig::from(component_config(root + "/vae"));
        if (!m->tokenizer) m->tokenizer = builtin_tokenizer(unet_cfg);
        check_sd_configs(root, clip_cfg, unet_cfg, vae_cfg, m->scheduler_config, *m->tokenizer, m->tokenizer->source());
        m->text_encoder = ClipTextModel(clip_cfg);
        m->unet = UNet(unet_cfg);
        m->vae = VAE(vae_cfg);
        struct Part {
            torch::nn::Module &module;
            std::string dir, stem;
        };
        auto add = [&](const WeightStats &stats) {
            m->params += stats.params;
            m->bytes += stats.bytes;
        };
        for (const Part &part : {Part{*m->text_encoder, root + "/text_encoder", "model"},
                                 Part{*m->unet, root + "/unet", "diffusion_pytorch_model"}}) {
            SafeTensorsFile f(component_weights(part.dir, part.stem));
            add(load_weights(part.module, f, "", st, m->device));
        }
        add(load_vae_weights(*m->vae,
                             std::make_shared<const SafeTensorsFile>(component_weights(root + "/vae", "diffusion_pytorch_model")),
                             prefixed(""), st, m->device));
    }
    const auto &unet_cfg = m->unet->config;
    if (!vae_arg.empty()) replace_vae(*m, vae_arg, st);
    m->text_encoder->eval();
    m->unet->eval();
    m->vae->eval();
    // int8: the UNet's linear layers (attention projections, feed-forward,
    // time embedding), where dynamic quantization pays; convolutions, the text
    // encoder and the VAE stay float32.
    if (m->dtype == SW_DTYPE_INT8) m->bytes += quantize_linears_int8(*m->unet);
    m->arch = sd_family(unet_cfg) + " " + unet_cfg.describe() + (is_file ? " (single file)" : "") +
              (vae_arg.empty() ? "" : " + external VAE");
    log(SW_LOG_INFO, "opened " + root + " (" + m->arch + ", " + std::to_string(m->params) + " params, " +
                         device_id(m->device) + " " + dtype_name(m->dtype) + ")");
    return m.release();
}

void write_random_sd(const std::string &dir, uint64_t seed) {
    const auto clip_cfg = ClipTextConfig::from(component_config(dir + "/text_encoder"));
    const auto unet_cfg = UNetConfig::from(component_config(dir + "/unet"));
    const auto vae_cfg = VAEConfig::from(component_config(dir + "/vae"));
    // One seed per component, so changing one config leaves the others' weights alone.
    {
        ClipTextModel te(clip_cfg);
        randomize(*te, seed);
        write_safetensors(dir + "/text_encoder/model.safetensors", named_tensors(*te, ""));
    }
    {
        UNet unet(unet_cfg);
        randomize(*unet, seed + 1);
        write_safetensors(dir + "/unet/diffusion_pytorch_model.safetensors", named_tensors(*unet, ""));
    }
    {
        VAE vae(vae_cfg);
        randomize(*vae, seed + 2);
        write_safetensors(dir + "/vae/diffusion_pytorch_model.safetensors", named_tensors(*vae, ""));
    }
}

}  // namespace sw
