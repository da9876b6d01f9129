// Loading single-file checkpoints in the original LDM key layout, and
// standalone VAE files.
#pragma once

#include <memory>
#include <string>

#include "models.h"
#include "weights.h"

namespace sw {

// Checks what no single config can: that the text encoder, UNet, VAE,
// scheduler and tokenizer of one model fit together and that the engine runs
// them. Called before any of them is built.
void check_sd_configs(const std::string &root, const ClipTextConfig &clip, const UNetConfig &unet, const VAEConfig &vae,
                      const Config &scheduler, const Tokenizer &tokenizer, const std::string &tokenizer_dir);

// is_sd2 tells SD 2.x from its UNet; builtin_tokenizer is the CLIP vocabulary
// built into the library, padded as that family pads.
bool is_sd2(const UNetConfig &unet);
std::unique_ptr<Tokenizer> builtin_tokenizer(const UNetConfig &unet);

// Builds and fills m's text encoder, UNet and VAE (and its scheduler config)
// from one .safetensors file; m.device and m.dtype must be set. Such files
// carry no tokenizer: m.tokenizer is the caller's, or the built-in one.
void open_single_file(sw_sd_model &m, const std::string &path);

// Fills vae from f: its decoder (with post_quant_conv) now, its encoder (with
// quant_conv) at its first encode, since only img2img and inpaint encode
// (SD 1.5's encoder is 34 M of the VAE's 84 M parameters); f stays mapped,
// nothing of it resident, until then. Every tensor of both halves is checked
// now. Returns the stats of both, the encoder's as it will be held.
WeightStats load_vae_weights(VAEImpl &vae, std::shared_ptr<const SafeTensorsFile> f, Resolver resolve,
                             torch::ScalarType dtype, const torch::Device &device);

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
