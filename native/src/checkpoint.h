// Loading single-file checkpoints in the original LDM key layout, and
// standalone VAE files.
#pragma once

#include <string>

#include "models.h"
#include "weights.h"

namespace sw {

// Builds and fills m's text encoder, UNet and VAE (and its scheduler config)
// from one .safetensors file; m.device and m.dtype must be set. The tokenizer
// is not in such files: the caller picks one.
void open_single_file(sw_sd_model &m, const std::string &path);

// Fills vae from a standalone VAE .safetensors file: LDM keys (encoder.down.*,
// decoder.up.*, quant_conv, post_quant_conv; optionally under
// first_stage_model., as vae-ft-mse-840000 ships) or diffusers keys
// (encoder.down_blocks.*). The file's widths, depth and latent channels must
// equal vae's, else SW_ERR_INVALID_ARGUMENT says how they differ.
WeightStats load_vae_file(VAE &vae, const std::string &path, torch::ScalarType dtype, const torch::Device &device);

// Fails with SW_ERR_INVALID_ARGUMENT, naming what (a VAE file or folder) and
// the differences, unless got has the architecture of want.
void check_vae_fits(const VAEConfig &got, const VAEConfig &want, const std::string &what);

}  // namespace sw
