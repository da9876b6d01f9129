// The Stable Diffusion pipelines: txt2img, img2img and inpaint, with
// classifier-free guidance, per-step hooks (progress, previews, cancel) and
// the reference's order of random draws.
#pragma once

#include <functional>
#include <string>

#include "models.h"
#include "sampler.h"

namespace sw {

struct GenerateRequest {
    std::string prompt, negative_prompt;
    int64_t width = 512, height = 512, steps = 20, batch = 1, clip_skip = 0;
    double cfg_scale = 7.5, strength = 1.0;
    uint64_t seed = 0;
    SamplerKind sampler = SamplerKind::Euler;
    torch::Tensor init_image;  // [1, 3, H, W] float32 in [-1, 1], or undefined
    torch::Tensor mask;        // [1, 1, H, W] float32, 1 = repaint, or undefined
    int32_t preview = SW_PREVIEW_NONE;
    int64_t preview_every = 1;
};

struct StepEvent {
    int64_t step = 0, steps = 0;  // 1-based step of this run
    double timestep = 0, sigma = 0, elapsed = 0;
    torch::Tensor latents;   // after the step, float32 [B, 4, h, w]
    torch::Tensor denoised;  // the predicted clean latents
    torch::Tensor preview;   // uint8 [B, H, W, 3] on the cpu, or undefined
};

// Returns true to cancel.
using StepHook = std::function<bool(const StepEvent &)>;

struct GenerateOutput {
    torch::Tensor latents;  // float32 [B, 4, h, w], final, before dividing by the VAE scale
    torch::Tensor pixels;   // float32 [B, H, W, 3] in [0, 1]
    torch::Tensor images;   // uint8 [B, H, W, 3]
    double seconds_text = 0, seconds_denoise = 0, seconds_decode = 0;
    int64_t tokens = 0;
    bool truncated = false;
};

GenerateOutput generate(sw_sd_model &m, const GenerateRequest &r, const StepHook &hook);

// The prompt embedding the UNet sees: [2B, 77, D] ([uncond, cond]) with
// guidance, [B, 77, D] without.
torch::Tensor encode_prompts(sw_sd_model &m, const std::string &prompt, const std::string &negative, int64_t batch,
                             bool guidance, int64_t clip_skip, int64_t *tokens = nullptr, bool *truncated = nullptr);

// A 4->3 linear projection of SD latents to RGB, upscaled x8: uint8 [B, H, W, 3].
torch::Tensor latent_to_rgb(const torch::Tensor &latents);

// float image in about [-1, 1] [B, 3, H, W] -> uint8 [B, H, W, 3], and the float
// [0, 1] NHWC version before quantisation.
std::pair<torch::Tensor, torch::Tensor> to_pixels(const torch::Tensor &decoded);

}  // namespace sw
