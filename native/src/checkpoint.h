// Loading single-file checkpoints in the original LDM key layout.
#pragma once

#include <string>

#include "models.h"

namespace sw {

// Checks what no single config can: that the text encoder, UNet, VAE,
// scheduler and tokenizer of one model fit together and that the engine runs
// them. Called before any of them is built.
void check_sd_configs(const std::string &root, const ClipTextConfig &clip, const UNetConfig &unet, const VAEConfig &vae,
                      const Config &scheduler, const Tokenizer &tokenizer, const std::string &tokenizer_dir);

// Builds and fills m's text encoder, UNet and VAE (and its scheduler config)
// from one .safetensors file; m.device and m.dtype must be set.
void open_single_file(sw_sd_model &m, const std::string &path, const std::string &tokenizer_dir);

}  // namespace sw
