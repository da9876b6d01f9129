// Samplers (diffusers schedulers): DDIM, PNDM (PLMS), Euler, Euler ancestral,
// DPM++ 2M and DPM++ 2M Karras, driven by the model's scheduler config.
#pragma once

#include <ATen/core/Generator.h>
#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "config.h"
#include "stepwise.h"

namespace sw {

// The samplers, valued as sw_sampler in stepwise.h: the header owns the numbers.
enum class SamplerKind : int32_t {
    DDIM = SW_SAMPLER_DDIM,
    Euler = SW_SAMPLER_EULER,
    EulerAncestral = SW_SAMPLER_EULER_A,
    DPMPP2M = SW_SAMPLER_DPMPP_2M,
    DPMPP2MKarras = SW_SAMPLER_DPMPP_2M_KARRAS,
    PNDM = SW_SAMPLER_PNDM,
};

// parse_sampler turns an sw_sampler from the C API into a SamplerKind,
// refusing values the header does not define.
SamplerKind parse_sampler(int32_t id);
const char *sampler_name(SamplerKind k);

struct NoiseSchedule {
    int64_t train_steps = 1000;
    int64_t steps_offset = 0;
    bool set_alpha_to_one = false;
    bool v_prediction = false;
    std::string spacing;           // empty: the sampler's own default
    std::vector<double> alphas_cumprod;  // float32 values as the reference computes them
    static NoiseSchedule from(const Config &c);
    double sigma_at(double t) const;  // sqrt((1-ac)/ac), interpolated like np.interp
};

struct StepResult {
    torch::Tensor prev_sample;
    torch::Tensor pred_original;  // the predicted clean latents, for previews
};

class Sampler {
public:
    virtual ~Sampler() = default;
    // The timestep of every model call, in order (PNDM repeats one).
    const std::vector<double> &timesteps() const { return timesteps_; }
    size_t size() const { return timesteps_.size(); }
    virtual double init_noise_sigma() const { return 1.0; }
    // The noise level at call i, for progress reports.
    virtual double sigma(size_t i) const;
    virtual torch::Tensor scale_model_input(const torch::Tensor &x, size_t i) const { return x; }
    // One step from call i; gen is the pipeline's generator (ancestral noise).
    virtual StepResult step(const torch::Tensor &model_output, size_t i, const torch::Tensor &sample,
                            at::Generator &gen) = 0;
    // Noises x0 to the level of call i (img2img, inpaint).
    virtual torch::Tensor add_noise(const torch::Tensor &x0, const torch::Tensor &noise, size_t i) const;

protected:
    explicit Sampler(NoiseSchedule s) : sched_(std::move(s)) {}
    double ac(int64_t t) const;
    NoiseSchedule sched_;
    std::vector<double> timesteps_;
};

std::unique_ptr<Sampler> make_sampler(SamplerKind kind, const NoiseSchedule &sched, int64_t steps);

// randn draws float32 standard normal noise from a CPU generator, as the
// reference's torch.randn(shape, generator=g) does, then moves it to device.
torch::Tensor randn(at::IntArrayRef shape, at::Generator &gen, const torch::Device &device,
                    torch::ScalarType dtype = torch::kFloat32);

}  // namespace sw
