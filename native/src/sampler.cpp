#include "sampler.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cfenv>
#include <cmath>

#include "common.h"

namespace sw {

namespace {

// numpy's round: half to even.
double np_round(double x) { return std::nearbyint(x); }

std::vector<double> linspace(double a, double b, int64_t n) {
    std::vector<double> out(static_cast<size_t>(n));
    if (n == 1) {
        out[0] = a;
        return out;
    }
    const double step = (b - a) / static_cast<double>(n - 1);
    for (int64_t i = 0; i < n; i++) out[static_cast<size_t>(i)] = a + step * static_cast<double>(i);
    out[static_cast<size_t>(n - 1)] = b;
    return out;
}

float f32(double x) { return static_cast<float>(x); }

}  // namespace

SamplerKind parse_sampler(int32_t id) {
    switch (id) {
        case SW_SAMPLER_DDIM:
        case SW_SAMPLER_EULER:
        case SW_SAMPLER_EULER_A:
        case SW_SAMPLER_DPMPP_2M:
        case SW_SAMPLER_DPMPP_2M_KARRAS:
        case SW_SAMPLER_PNDM:
            return static_cast<SamplerKind>(id);
    }
    fail(SW_ERR_INVALID_ARGUMENT, "unknown sampler " + std::to_string(id));
}

const char *sampler_name(SamplerKind k) {
    switch (k) {
        case SamplerKind::DDIM: return "ddim";
        case SamplerKind::PNDM: return "pndm";
        case SamplerKind::Euler: return "euler";
        case SamplerKind::EulerAncestral: return "euler_a";
        case SamplerKind::DPMPP2M: return "dpmpp_2m";
        case SamplerKind::DPMPP2MKarras: return "dpmpp_2m_karras";
    }
    return "?";
}

NoiseSchedule NoiseSchedule::from(const Config &c) {
    NoiseSchedule s;
    s.train_steps = c.integer_in("num_train_timesteps", 1000, 2, 100000);
    s.steps_offset = c.integer_in("steps_offset", 0, 0, s.train_steps - 1);
    s.set_alpha_to_one = c.boolean("set_alpha_to_one", false);
    const std::string pred = c.string("prediction_type", "epsilon");
    if (pred != "epsilon" && pred != "v_prediction")
        fail(SW_ERR_UNSUPPORTED, c.source() + ": prediction_type \"" + pred + "\" (want epsilon or v_prediction)");
    s.v_prediction = pred == "v_prediction";
    s.spacing = c.string("timestep_spacing", "");
    if (!s.spacing.empty() && s.spacing != "leading" && s.spacing != "linspace" && s.spacing != "trailing")
        fail(SW_ERR_UNSUPPORTED, c.source() + ": timestep_spacing \"" + s.spacing + "\"");
    // Betas are probabilities of noise per step: strictly between 0 and 1, or
    // the alphas' products reach 0 and every sigma divides by it.
    constexpr double kBetaMin = 1e-9, kBetaMax = 0.999999;
    const double b0 = c.number_in("beta_start", 0.00085, kBetaMin, kBetaMax);
    const double b1 = c.number_in("beta_end", 0.012, kBetaMin, kBetaMax);
    if (!(b0 < b1)) c.bad("beta_end", "greater than beta_start");
    const std::string schedule = c.string("beta_schedule", "scaled_linear");
    // float32 throughout, like the reference's torch computation.
    torch::Tensor betas;
    auto f32opts = torch::TensorOptions().dtype(torch::kFloat32);
    if (c.has("trained_betas")) {
        const auto &j = c.json()["trained_betas"];
        if (!j.is_array() || static_cast<int64_t>(j.size()) != s.train_steps)
            c.bad("trained_betas", "a list of num_train_timesteps (" + std::to_string(s.train_steps) + ") numbers");
        std::vector<float> v;
        for (const auto &x : j) {
            if (!x.is_number()) c.bad("trained_betas", "a list of numbers");
            const double b = x.get<double>();
            if (!(b >= kBetaMin && b <= kBetaMax)) c.bad("trained_betas", "a list of numbers between 0 and 1");
            v.push_back(static_cast<float>(b));
        }
        betas = torch::tensor(v, f32opts);
    } else if (schedule == "scaled_linear") {
        betas = torch::linspace(std::sqrt(b0), std::sqrt(b1), s.train_steps, f32opts).pow(2);
    } else if (schedule == "linear") {
        betas = torch::linspace(b0, b1, s.train_steps, f32opts);
    } else {
        fail(SW_ERR_UNSUPPORTED, c.source() + ": beta_schedule \"" + schedule + "\"");
    }
    auto ac = torch::cumprod(1.0 - betas, 0).contiguous();
    const float *p = ac.data_ptr<float>();
    s.alphas_cumprod.assign(p, p + s.train_steps);
    if (!(s.alphas_cumprod.back() > 0))
        fail(SW_ERR_FORMAT, c.source() + ": the betas leave no signal by the last timestep (alphas_cumprod reaches 0)");
    return s;
}

double NoiseSchedule::sigma_at(double t) const {
    auto sig = [&](int64_t i) {
        const float a = static_cast<float>(alphas_cumprod[static_cast<size_t>(i)]);
        return static_cast<double>(std::sqrt((1.0f - a) / a));
    };
    if (t <= 0) return sig(0);
    if (t >= static_cast<double>(train_steps - 1)) return sig(train_steps - 1);
    const auto lo = static_cast<int64_t>(std::floor(t));
    const double w = t - static_cast<double>(lo);
    return sig(lo) + w * (sig(lo + 1) - sig(lo));
}

double Sampler::ac(int64_t t) const {
    if (t < 0) return sched_.set_alpha_to_one ? 1.0 : sched_.alphas_cumprod[0];
    return sched_.alphas_cumprod[static_cast<size_t>(std::min(t, sched_.train_steps - 1))];
}

double Sampler::sigma(size_t i) const { return sched_.sigma_at(timesteps_[i]); }

torch::Tensor Sampler::add_noise(const torch::Tensor &x0, const torch::Tensor &noise, size_t i) const {
    const double a = ac(static_cast<int64_t>(timesteps_[i]));
    return std::sqrt(a) * x0 + std::sqrt(1.0 - a) * noise;
}

namespace {

// DDIM with eta = 0.
class DDIM : public Sampler {
public:
    DDIM(const NoiseSchedule &s, int64_t n) : Sampler(s), n_(n) {
        const std::string spacing = s.spacing.empty() ? "leading" : s.spacing;
        const int64_t T = s.train_steps;
        if (spacing == "leading") {
            const int64_t ratio = T / n;
            for (int64_t i = n - 1; i >= 0; i--) timesteps_.push_back(static_cast<double>(i * ratio + s.steps_offset));
        } else if (spacing == "linspace") {
            auto v = linspace(0, static_cast<double>(T - 1), n);
            for (auto it = v.rbegin(); it != v.rend(); ++it) timesteps_.push_back(np_round(*it));
        } else {
            const double ratio = static_cast<double>(T) / static_cast<double>(n);
            for (int64_t i = 0; i < n; i++) timesteps_.push_back(np_round(static_cast<double>(T) - ratio * i) - 1);
        }
    }
    StepResult step(const torch::Tensor &eps, size_t i, const torch::Tensor &x, at::Generator &) override {
        const auto t = static_cast<int64_t>(timesteps_[i]);
        const int64_t prev = t - sched_.train_steps / n_;
        const double a = ac(t), a_prev = ac(prev), b = 1.0 - a;
        torch::Tensor x0, e;
        if (sched_.v_prediction) {
            x0 = std::sqrt(a) * x - std::sqrt(b) * eps;
            e = std::sqrt(a) * eps + std::sqrt(b) * x;
        } else {
            x0 = (x - std::sqrt(b) * eps) / std::sqrt(a);
            e = eps;
        }
        return {std::sqrt(a_prev) * x0 + std::sqrt(1.0 - a_prev) * e, x0};
    }

private:
    int64_t n_;
};

// PNDM in PLMS mode (skip_prk_steps), as SD's default scheduler config asks.
class PNDM : public Sampler {
public:
    PNDM(const NoiseSchedule &s, int64_t n) : Sampler(s), n_(n) {
        const std::string spacing = s.spacing.empty() ? "leading" : s.spacing;
        const int64_t T = s.train_steps;
        std::vector<double> ts;
        if (spacing == "leading") {
            const int64_t ratio = T / n;
            for (int64_t i = 0; i < n; i++) ts.push_back(static_cast<double>(i * ratio + s.steps_offset));
        } else if (spacing == "linspace") {
            for (double v : linspace(0, static_cast<double>(T - 1), n)) ts.push_back(np_round(v));
        } else {
            const double ratio = static_cast<double>(T) / static_cast<double>(n);
            for (int64_t i = n - 1; i >= 0; i--) ts.push_back(np_round(static_cast<double>(T) - ratio * i) - 1);
        }
        // [ts[:-1], ts[-2:-1], ts[-1:]] reversed: the second-to-last repeats.
        std::vector<double> plms(ts.begin(), ts.end() - 1);
        if (ts.size() >= 2) plms.push_back(ts[ts.size() - 2]);
        plms.push_back(ts.back());
        timesteps_.assign(plms.rbegin(), plms.rend());
    }
    StepResult step(const torch::Tensor &eps_in, size_t i, const torch::Tensor &x_in, at::Generator &) override {
        auto t = static_cast<int64_t>(timesteps_[i]);
        const int64_t ratio = sched_.train_steps / n_;
        int64_t prev = t - ratio;
        torch::Tensor eps = eps_in, x = x_in;
        if (counter_ != 1) {
            if (ets_.size() > 3) ets_.erase(ets_.begin(), ets_.end() - 3);
            ets_.push_back(eps_in);
        } else {
            prev = t;
            t = t + ratio;
        }
        const size_t n = ets_.size();
        if (n == 1 && counter_ == 0) {
            cur_sample_ = x_in;
        } else if (n == 1 && counter_ == 1) {
            eps = (eps_in + ets_.back()) / 2;
            x = cur_sample_;
            cur_sample_ = torch::Tensor();
        } else if (n == 2) {
            eps = (3 * ets_[1] - ets_[0]) / 2;
        } else if (n == 3) {
            eps = (23 * ets_[2] - 16 * ets_[1] + 5 * ets_[0]) / 12;
        } else {
            eps = (1.0 / 24) * (55 * ets_[n - 1] - 59 * ets_[n - 2] + 37 * ets_[n - 3] - 9 * ets_[n - 4]);
        }
        const double a = ac(t), a_prev = ac(prev), b = 1.0 - a, b_prev = 1.0 - a_prev;
        if (sched_.v_prediction) eps = std::sqrt(a) * eps + std::sqrt(b) * x;
        const double sample_coeff = std::sqrt(a_prev / a);
        const double denom = a * std::sqrt(b_prev) + std::sqrt(a * b * a_prev);
        auto prev_sample = sample_coeff * x - (a_prev - a) * eps / denom;
        counter_++;
        auto x0 = (x - std::sqrt(b) * eps) / std::sqrt(a);
        return {prev_sample, x0};
    }

private:
    int64_t n_;
    int counter_ = 0;
    std::vector<torch::Tensor> ets_;
    torch::Tensor cur_sample_;
};

// Shared by the sigma-based samplers: timesteps by spacing, sigmas by
// interpolating the training sigmas (float32 like the reference).
std::vector<double> sigma_timesteps(const NoiseSchedule &s, int64_t n, const std::string &dflt) {
    const std::string spacing = s.spacing.empty() ? dflt : s.spacing;
    const int64_t T = s.train_steps;
    std::vector<double> ts;
    if (spacing == "linspace") {
        auto v = linspace(0, static_cast<double>(T - 1), n);
        ts.assign(v.rbegin(), v.rend());
    } else if (spacing == "leading") {
        const int64_t ratio = T / n;
        for (int64_t i = n - 1; i >= 0; i--) ts.push_back(np_round(static_cast<double>(i * ratio)) + s.steps_offset);
    } else {
        const double ratio = static_cast<double>(T) / static_cast<double>(n);
        for (int64_t i = 0; i < n; i++) ts.push_back(np_round(static_cast<double>(T) - ratio * i) - 1);
    }
    return ts;
}

class EulerFamily : public Sampler {
public:
    EulerFamily(const NoiseSchedule &s, int64_t n, bool ancestral) : Sampler(s), ancestral_(ancestral) {
        spacing_ = s.spacing.empty() ? "linspace" : s.spacing;
        auto ts = sigma_timesteps(s, n, "linspace");
        for (double t : ts) {
            sigmas_.push_back(f32(s.sigma_at(t)));
            timesteps_.push_back(f32(t));
        }
        sigmas_.push_back(0.0);
        max_sigma_ = *std::max_element(sigmas_.begin(), sigmas_.end());
    }
    double init_noise_sigma() const override {
        if (spacing_ == "linspace" || spacing_ == "trailing") return max_sigma_;
        return f32(std::sqrt(max_sigma_ * max_sigma_ + 1.0));
    }
    double sigma(size_t i) const override { return sigmas_[i]; }
    torch::Tensor scale_model_input(const torch::Tensor &x, size_t i) const override {
        return x / std::sqrt(sigmas_[i] * sigmas_[i] + 1.0);
    }
    StepResult step(const torch::Tensor &out, size_t i, const torch::Tensor &x, at::Generator &gen) override {
        const double sigma = sigmas_[i], next = sigmas_[i + 1];
        torch::Tensor x0;
        if (sched_.v_prediction) {
            x0 = out * (-sigma / std::sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1);
        } else {
            x0 = x - sigma * out;
        }
        if (!ancestral_) {
            // EulerDiscreteScheduler draws noise even though s_churn = 0 makes it
            // unused; the draw still advances the generator.
            (void)randn(x.sizes(), gen, x.device(), x.scalar_type());
            auto d = (x - x0) / sigma;
            return {x + d * (next - sigma), x0};
        }
        const double up = std::sqrt(next * next * (sigma * sigma - next * next) / (sigma * sigma));
        const double down = std::sqrt(next * next - up * up);
        auto d = (x - x0) / sigma;
        auto prev = x + d * (down - sigma);
        prev = prev + randn(x.sizes(), gen, x.device(), x.scalar_type()) * up;
        return {prev, x0};
    }
    torch::Tensor add_noise(const torch::Tensor &x0, const torch::Tensor &noise, size_t i) const override {
        return x0 + noise * sigmas_[i];
    }

private:
    bool ancestral_;
    std::string spacing_;
    std::vector<double> sigmas_;
    double max_sigma_ = 1.0;
};

// DPM-Solver++ (2M, midpoint), lower order at the final step for short runs.
class DPMPP2M : public Sampler {
public:
    DPMPP2M(const NoiseSchedule &s, int64_t n, bool karras) : Sampler(s) {
        const int64_t T = s.train_steps;
        if (!karras) {
            const std::string spacing = s.spacing.empty() ? "linspace" : s.spacing;
            if (spacing == "linspace") {
                auto v = linspace(0, static_cast<double>(T - 1), n + 1);
                for (size_t k = v.size() - 1; k >= 1; k--) timesteps_.push_back(np_round(v[k]));
            } else if (spacing == "leading") {
                const int64_t ratio = T / (n + 1);
                for (int64_t k = n; k >= 1; k--) timesteps_.push_back(np_round(static_cast<double>(k * ratio)) + s.steps_offset);
            } else {
                const double ratio = static_cast<double>(T) / static_cast<double>(n);
                for (int64_t k = 0; k < n; k++) timesteps_.push_back(np_round(static_cast<double>(T) - ratio * k) - 1);
            }
            for (double t : timesteps_) sigmas_.push_back(f32(s.sigma_at(t)));
        } else {
            // Karras et al. (2022), rho = 7, between the training sigma range.
            std::vector<double> log_sigmas;
            for (int64_t t = 0; t < T; t++) log_sigmas.push_back(std::log(static_cast<float>(s.sigma_at(static_cast<double>(t)))));
            const double smin = f32(s.sigma_at(0)), smax = f32(s.sigma_at(static_cast<double>(T - 1)));
            const double rho = 7.0, lo = std::pow(smin, 1 / rho), hi = std::pow(smax, 1 / rho);
            for (double r : linspace(0, 1, n)) {
                const double sigma = std::pow(hi + r * (lo - hi), rho);
                sigmas_.push_back(f32(sigma));
                timesteps_.push_back(np_round(sigma_to_t(sigma, log_sigmas)));
            }
        }
        sigmas_.push_back(f32(s.sigma_at(0)));  // diffusers 0.25 ends at sigma_min
        outputs_.resize(2);
    }
    double sigma(size_t i) const override { return sigmas_[i]; }
    StepResult step(const torch::Tensor &out, size_t i, const torch::Tensor &x, at::Generator &) override {
        const size_t n = timesteps_.size();
        const bool lower_final = i == n - 1 && n < 15;
        const bool lower_second = i == n - 2 && n < 15;
        auto [alpha_s, sigma_s] = alpha_sigma(sigmas_[i]);
        torch::Tensor x0 = sched_.v_prediction ? alpha_s * x - sigma_s * out : (x - sigma_s * out) / alpha_s;
        outputs_[0] = outputs_[1];
        outputs_[1] = x0;
        auto [alpha_t, sigma_t] = alpha_sigma(sigmas_[i + 1]);
        const double lambda_t = std::log(alpha_t) - std::log(sigma_t);
        const double lambda_s0 = std::log(alpha_s) - std::log(sigma_s);
        const double h = lambda_t - lambda_s0;
        torch::Tensor prev;
        if (lower_order_nums_ < 1 || lower_final) {
            prev = (sigma_t / sigma_s) * x - (alpha_t * (std::exp(-h) - 1.0)) * x0;
        } else {
            (void)lower_second;
            auto [alpha_s1, sigma_s1] = alpha_sigma(sigmas_[i - 1]);
            const double lambda_s1 = std::log(alpha_s1) - std::log(sigma_s1);
            const double r0 = (lambda_s0 - lambda_s1) / h;
            auto d1 = (1.0 / r0) * (outputs_[1] - outputs_[0]);
            prev = (sigma_t / sigma_s) * x - (alpha_t * (std::exp(-h) - 1.0)) * outputs_[1] -
                   0.5 * (alpha_t * (std::exp(-h) - 1.0)) * d1;
        }
        if (lower_order_nums_ < 2) lower_order_nums_++;
        return {prev, x0};
    }
    torch::Tensor add_noise(const torch::Tensor &x0, const torch::Tensor &noise, size_t i) const override {
        auto [a, s] = alpha_sigma(sigmas_[i]);
        return a * x0 + s * noise;
    }

private:
    static std::pair<double, double> alpha_sigma(double sigma) {
        const double a = 1.0 / std::sqrt(sigma * sigma + 1.0);
        return {a, sigma * a};
    }
    static double sigma_to_t(double sigma, const std::vector<double> &log_sigmas) {
        const double ls = std::log(std::max(sigma, 1e-10));
        // The last index whose log-sigma is <= ls, clipped so high = low + 1 exists.
        int64_t low = 0;
        for (size_t k = 0; k < log_sigmas.size(); k++)
            if (ls - log_sigmas[k] >= 0) low = static_cast<int64_t>(k);
        low = std::min<int64_t>(low, static_cast<int64_t>(log_sigmas.size()) - 2);
        const double l = log_sigmas[static_cast<size_t>(low)], hgh = log_sigmas[static_cast<size_t>(low + 1)];
        double w = (l - ls) / (l - hgh);
        w = std::min(1.0, std::max(0.0, w));
        return (1 - w) * static_cast<double>(low) + w * static_cast<double>(low + 1);
    }
    std::vector<double> sigmas_;
    std::vector<torch::Tensor> outputs_;
    int lower_order_nums_ = 0;
};

}  // namespace

std::unique_ptr<Sampler> make_sampler(SamplerKind kind, const NoiseSchedule &sched, int64_t steps) {
    if (steps < 1) fail(SW_ERR_INVALID_ARGUMENT, "steps must be at least 1");
    if (steps > sched.train_steps) fail(SW_ERR_INVALID_ARGUMENT, "steps exceed the training timesteps");
    switch (kind) {
        case SamplerKind::DDIM: return std::make_unique<DDIM>(sched, steps);
        case SamplerKind::PNDM: return std::make_unique<PNDM>(sched, steps);
        case SamplerKind::Euler: return std::make_unique<EulerFamily>(sched, steps, false);
        case SamplerKind::EulerAncestral: return std::make_unique<EulerFamily>(sched, steps, true);
        case SamplerKind::DPMPP2M: return std::make_unique<DPMPP2M>(sched, steps, false);
        case SamplerKind::DPMPP2MKarras: return std::make_unique<DPMPP2M>(sched, steps, true);
    }
    fail(SW_ERR_INVALID_ARGUMENT, "unknown sampler");
}

torch::Tensor randn(at::IntArrayRef shape, at::Generator &gen, const torch::Device &device, torch::ScalarType dtype) {
    auto t = torch::randn(shape, gen, torch::TensorOptions().dtype(torch::kFloat32));
    if (device.is_cpu() && dtype == torch::kFloat32) return t;
    return t.to(device, dtype);
}

}  // namespace sw
