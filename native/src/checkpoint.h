// Loading single-file checkpoints in the original LDM key layout.
#pragma once

#include <string>

#include "models.h"

namespace sw {

// Builds and fills m's text encoder, UNet and VAE (and its scheduler config)
// from one .safetensors file; m.device and m.dtype must be set.
void open_single_file(sw_sd_model &m, const std::string &path, const std::string &tokenizer_dir);

}  // namespace sw
