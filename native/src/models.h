// The objects behind the opaque handles of stepwise.h.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "clip.h"
#include "common.h"
#include "segunet.h"
#include "tokenizer.h"
#include "unet.h"
#include "vae.h"

struct sw_sd_model {
    std::string path;
    std::string tokenizer_dir;  // empty: the built-in CLIP vocabulary
    torch::Device device{torch::kCPU};
    sw_dtype dtype = SW_DTYPE_F32;
    sw::ClipTextModel text_encoder{nullptr};
    sw::UNet unet{nullptr};
    sw::VAE vae{nullptr};
    sw::Config scheduler_config;
    std::unique_ptr<sw::Tokenizer> tokenizer;
    int64_t params = 0;
    int64_t bytes = 0;
    std::string arch;
};

struct sw_seg_model {
    std::string path;
    torch::Device device{torch::kCPU};
    sw_dtype dtype = SW_DTYPE_F32;
    sw::SegUNet net{nullptr};
    int64_t params = 0;
    int64_t bytes = 0;
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
