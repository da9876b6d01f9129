#include "generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cstdlib>

#include "tokenizer.h"
#include "weights.h"

namespace sw {

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// fault_step is the step at which STEPWISE_FAULT_ABORT_AT_STEP asks the engine
// to abort() the process, or 0. It exists so that the worker tests can crash a
// worker for real, inside the engine, the way a native fault does.
int64_t fault_step() {
    const char *v = std::getenv("STEPWISE_FAULT_ABORT_AT_STEP");
    return v ? std::strtoll(v, nullptr, 10) : 0;
}

void validate(const sw_sd_model &m, const GenerateRequest &r) {
    auto bad = [](const std::string &msg) { fail(SW_ERR_INVALID_ARGUMENT, msg); };
    if (r.width <= 0 || r.height <= 0 || r.width % 8 != 0 || r.height % 8 != 0)
        bad("width and height must be positive multiples of 8 (got " + std::to_string(r.width) + "x" +
            std::to_string(r.height) + ")");
    if (r.width > 8192 || r.height > 8192) bad("width and height must be at most 8192");
    if (r.steps < 1 || r.steps > 1000) bad("steps must be between 1 and 1000 (got " + std::to_string(r.steps) + ")");
    if (r.batch < 1 || r.batch > 64) bad("batch size must be between 1 and 64");
    if (!(r.cfg_scale >= 0 && r.cfg_scale <= 100)) bad("cfg scale must be between 0 and 100");
    if (r.clip_skip < 0 || r.clip_skip >= m.text_encoder->config.layers) bad("clip skip out of range");
    if (r.preview < SW_PREVIEW_NONE || r.preview > SW_PREVIEW_VAE) bad("unknown preview mode");
    if (r.preview_every < 1) bad("preview_every must be at least 1");
    const bool has_init = r.init_image.defined(), has_mask = r.mask.defined();
    if (has_mask && !has_init) bad("a mask needs an init image");
    if (has_init) {
        if (r.init_image.size(2) != r.height || r.init_image.size(3) != r.width)
            bad("init image is " + std::to_string(r.init_image.size(3)) + "x" + std::to_string(r.init_image.size(2)) +
                ", the request is " + std::to_string(r.width) + "x" + std::to_string(r.height));
        if (!(r.strength > 0 && r.strength <= 1)) bad("strength must be in (0, 1]");
    }
    if (has_mask && (r.mask.size(2) != r.height || r.mask.size(3) != r.width))
        bad("mask is " + std::to_string(r.mask.size(3)) + "x" + std::to_string(r.mask.size(2)) + ", the image is " +
            std::to_string(r.width) + "x" + std::to_string(r.height));
    const int64_t in_ch = m.unet->config.in_channels;
    if (in_ch == 9 && !has_mask) bad("this is an inpainting model: it needs an init image and a mask");
    if (in_ch != 4 && in_ch != 9) fail(SW_ERR_UNSUPPORTED, "UNet with " + std::to_string(in_ch) + " input channels");
}

// The VAE posterior sample, scaled: scaling * (mean + std * randn).
torch::Tensor encode_sample(sw_sd_model &m, const torch::Tensor &image, at::Generator &gen) {
    const auto dtype = scalar_type(m.dtype);
    auto [mean, logvar] = m.vae->encode(image.to(m.device, dtype));
    mean = mean.to(torch::kFloat32);
    auto std = torch::exp(0.5 * logvar.to(torch::kFloat32));
    auto noise = randn(mean.sizes(), gen, m.device);
    return m.vae->config.scaling_factor * (mean + std * noise);
}

}  // namespace

torch::Tensor encode_prompts(sw_sd_model &m, const std::string &prompt, const std::string &negative, int64_t batch,
                             bool guidance, int64_t clip_skip, int64_t *tokens, bool *truncated) {
    const int64_t length = m.text_encoder->config.max_positions;
    auto pos = m.tokenizer->encode(prompt);
    if (tokens) *tokens = static_cast<int64_t>(pos.size());
    const bool cut = static_cast<int64_t>(pos.size()) > length - 2;
    if (truncated) *truncated = cut;
    if (cut)
        log(SW_LOG_WARN, "prompt has " + std::to_string(pos.size()) + " tokens; only the first " +
                             std::to_string(length - 2) + " are used");
    std::vector<int64_t> ids;
    if (guidance) {
        auto neg = m.tokenizer->encode_padded(negative, static_cast<size_t>(length));
        ids.insert(ids.end(), neg.begin(), neg.end());
    }
    auto p = m.tokenizer->encode_padded(prompt, static_cast<size_t>(length));
    ids.insert(ids.end(), p.begin(), p.end());
    const int64_t rows = guidance ? 2 : 1;
    auto t = torch::tensor(ids, torch::kInt64).reshape({rows, length}).to(m.device);
    auto emb = m.text_encoder->forward(t, clip_skip);
    // [uncond x B, cond x B], as the reference repeats per image.
    std::vector<torch::Tensor> parts;
    for (int64_t r = 0; r < rows; r++) parts.push_back(emb.slice(0, r, r + 1).expand({batch, -1, -1}));
    return torch::cat(parts, 0);
}

torch::Tensor latent_to_rgb(const torch::Tensor &latents) {
    // SD 1.x/2.x latent -> RGB factors (rows: latent channels; columns: R, G, B)
    // and bias, fitted to the SD VAE (as stable-diffusion.cpp ships them).
    static const float w[4][3] = {{0.337366f, 0.216344f, 0.257386f},
                                  {0.165636f, 0.386828f, 0.046994f},
                                  {-0.267803f, 0.237036f, 0.223517f},
                                  {-0.178022f, -0.200862f, -0.678514f}};
    static const float b[3] = {-0.017478f, -0.055834f, -0.105825f};
    auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(latents.device());
    auto W = torch::from_blob(const_cast<float *>(&w[0][0]), {4, 3}, torch::kFloat32).to(opts);
    auto B = torch::from_blob(const_cast<float *>(b), {3}, torch::kFloat32).to(opts);
    auto x = latents.to(torch::kFloat32).permute({0, 2, 3, 1});  // [B, h, w, 4]
    auto rgb = torch::matmul(x, W) + B;                          // [B, h, w, 3] in about [-1, 1]
    rgb = ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch::kUInt8);
    // Nearest x8 upscale to the image size.
    rgb = rgb.repeat_interleave(8, 1).repeat_interleave(8, 2);
    return rgb.to(torch::kCPU).contiguous();
}

std::pair<torch::Tensor, torch::Tensor> to_pixels(const torch::Tensor &decoded) {
    auto pixels = (decoded.to(torch::kFloat32) / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1}).contiguous();
    auto images = (pixels * 255).round().to(torch::kUInt8);
    return {images.to(torch::kCPU).contiguous(), pixels.to(torch::kCPU).contiguous()};
}

GenerateOutput generate(sw_sd_model &m, const GenerateRequest &r, const StepHook &hook) {
    validate(m, r);
    CallGuard guard;
    CallMemory memory(m.device);  // weights.h: large activations reused, not faulted in afresh
    GenerateOutput out;
    const auto dtype = scalar_type(m.dtype);
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(m.device);
    const bool guidance = r.cfg_scale > 1.0;
    const bool nine = m.unet->config.in_channels == 9;
    const int64_t lc = m.vae->config.latent_channels;
    const std::vector<int64_t> shape{r.batch, lc, r.height / 8, r.width / 8};
    const double scale = m.vae->config.scaling_factor;

    auto t0 = Clock::now();
    auto context = encode_prompts(m, r.prompt, r.negative_prompt, r.batch, guidance, r.clip_skip, &out.tokens,
                                  &out.truncated);
    out.seconds_text = since(t0);

    auto sampler = make_sampler(r.sampler, NoiseSchedule::from(m.scheduler_config), r.steps);
    at::Generator gen = at::detail::createCPUGenerator(r.seed);

    // Where the run starts: img2img and inpaint with strength < 1 skip the
    // noisiest timesteps.
    size_t start = 0;
    const bool has_init = r.init_image.defined();
    const bool full_strength = !has_init || r.strength >= 1.0;
    if (has_init && !full_strength) {
        const int64_t init_steps = std::min(static_cast<int64_t>(static_cast<double>(r.steps) * r.strength), r.steps);
        start = static_cast<size_t>(std::max<int64_t>(r.steps - init_steps, 0));
        if (start >= sampler->size())
            fail(SW_ERR_INVALID_ARGUMENT, "strength " + std::to_string(r.strength) + " with " + std::to_string(r.steps) +
                                              " steps leaves no step to run");
    }

    torch::Tensor latents, noise, image_latents, mask_latent, masked_latents;
    torch::Tensor image;
    if (has_init) image = r.init_image.to(m.device, torch::kFloat32);
    if (!has_init) {
        latents = randn(shape, gen, m.device) * sampler->init_noise_sigma();
    } else if (!r.mask.defined()) {
        // img2img: draw 0 = posterior noise, draw 1 = the noise added at the start.
        image_latents = encode_sample(m, image, gen).expand(shape);
        noise = randn(shape, gen, m.device);
        latents = sampler->add_noise(image_latents, noise, start);
    } else {
        auto mask = (r.mask.to(m.device, torch::kFloat32) >= 0.5).to(torch::kFloat32);
        auto masked_image = image * (mask < 0.5).to(torch::kFloat32);
        // Inpaint draws: the image posterior (only when it is needed), the noise,
        // then the masked-image posterior.
        if (!nine || !full_strength) image_latents = encode_sample(m, image, gen).expand(shape);
        noise = randn(shape, gen, m.device);
        latents = full_strength ? noise * sampler->init_noise_sigma() : sampler->add_noise(image_latents, noise, start);
        mask_latent = at::upsample_nearest2d(mask, {r.height / 8, r.width / 8}).expand({r.batch, 1, -1, -1});
        if (nine) {
            masked_latents = encode_sample(m, masked_image, gen).expand(shape);
        } else {
            (void)randn(shape, gen, m.device);  // the reference encodes it anyway; keep its draw order
        }
    }

    t0 = Clock::now();
    const FixedContext fixed(*m.unet, context);
    const size_t total = sampler->size() - start;
    const int64_t abort_at = fault_step();
    for (size_t i = start; i < sampler->size(); i++) {
        check_cancel();
        const double t = sampler->timesteps()[i];
        auto model_in = guidance ? torch::cat({latents, latents}, 0) : latents;
        model_in = sampler->scale_model_input(model_in, i);
        if (nine) {
            auto ml = guidance ? torch::cat({mask_latent, mask_latent}, 0) : mask_latent;
            auto mi = guidance ? torch::cat({masked_latents, masked_latents}, 0) : masked_latents;
            model_in = torch::cat({model_in, ml, mi}, 1);
        }
        auto tt = torch::full({model_in.size(0)}, t, f32);
        auto pred = m.unet->forward(model_in.to(dtype), tt, context).to(torch::kFloat32);
        if (guidance) {
            auto parts = pred.chunk(2, 0);
            pred = parts[0] + r.cfg_scale * (parts[1] - parts[0]);
        }
        auto res = sampler->step(pred, i, latents, gen);
        latents = res.prev_sample;
        if (r.mask.defined() && !nine) {
            // Outside the mask, keep the original latents noised to the next level.
            auto keep = image_latents;
            if (i + 1 < sampler->size()) keep = sampler->add_noise(image_latents, noise, i + 1);
            latents = (1 - mask_latent) * keep + mask_latent * latents;
        }
        if (abort_at > 0 && static_cast<int64_t>(i - start + 1) == abort_at) std::abort();
        if (hook) {
            StepEvent ev;
            ev.step = static_cast<int64_t>(i - start + 1);
            ev.steps = static_cast<int64_t>(total);
            ev.timestep = t;
            ev.sigma = sampler->sigma(i);
            ev.elapsed = since(t0);
            ev.latents = latents;
            ev.denoised = res.pred_original;
            const bool due = (ev.step % r.preview_every == 0) || ev.step == ev.steps;
            if (r.preview == SW_PREVIEW_LATENT2RGB) {
                ev.preview = latent_to_rgb(res.pred_original);
            } else if (r.preview == SW_PREVIEW_VAE && due) {
                ev.preview = to_pixels(m.vae->decode((res.pred_original / scale).to(dtype))).first;
            }
            if (hook(ev)) fail(SW_CANCELLED, "cancelled at step " + std::to_string(ev.step) + " of " + std::to_string(ev.steps));
        }
    }
    out.seconds_denoise = since(t0);

    t0 = Clock::now();
    auto decoded = m.vae->decode((latents / scale).to(dtype));
    std::tie(out.images, out.pixels) = to_pixels(decoded);
    out.latents = latents.to(torch::kCPU).contiguous();
    out.seconds_decode = since(t0);
    return out;
}

}  // namespace sw
