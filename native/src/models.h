// The objects behind the opaque handles of stepwise.h.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>

#include "clip.h"
#include "common.h"
#include "segunet.h"
#include "tokenizer.h"
#include "unet.h"
#include "vae.h"

namespace sw {

// ModelHandle is what every opaque model handle shares: identity, memory, the
// cancel flag other threads may set, and the lock that keeps to one call at a
// time what the header allows one call at a time.
struct ModelHandle {
    std::string path;
    torch::Device device{torch::kCPU};
    sw_dtype dtype = SW_DTYPE_F32;
    int64_t params = 0;
    int64_t bytes = 0;
    std::string arch;
    std::atomic<bool> cancel{false};
    std::mutex busy;
};

struct SdcppContext;  // sdcpp.cpp

}  // namespace sw

struct sw_sd_model : sw::ModelHandle {
    std::string tokenizer_dir;  // empty: the built-in CLIP vocabulary
    sw::ClipTextModel text_encoder{nullptr};
    sw::UNet unet{nullptr};
    sw::VAE vae{nullptr};
    sw::Config scheduler_config;
    std::unique_ptr<sw::Tokenizer> tokenizer;
    // Set for the stable-diffusion.cpp backend, whose context holds the weights
    // instead of the modules above (which stay empty).
    std::shared_ptr<sw::SdcppContext> sdcpp;
};

struct sw_seg_model : sw::ModelHandle {
    sw::SegUNet net{nullptr};
};

namespace sw {

// Opening models: diffusers folders and segmentation checkpoints.
sw_sd_model *open_sd_model(const sw_sd_model_params &p);
sw_seg_model *open_seg_model(const sw_seg_model_params &p);

void write_random_sd(const std::string &dir, uint64_t seed);
void write_random_seg(const std::string &path, const sw_seg_arch &arch, uint64_t seed);

// Devices present on this machine, cpu first.
std::vector<sw_device_info> list_devices();

void set_log_callback(sw_log_callback cb, void *user_data);

}  // namespace sw
