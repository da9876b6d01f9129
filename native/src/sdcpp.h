// The stable-diffusion.cpp backend: an sw_sd_model whose weights live in a
// stable-diffusion.cpp context instead of libtorch modules. Its library is
// opened with dlopen on first use, never linked, so libstepwise.so loads on
// machines without it.
#pragma once

#include <string>

#include "generate.h"
#include "models.h"

namespace sw {

// Whether this build has the backend and its library and every symbol it needs
// load; when not, *reason says why (naming the library or the symbol).
bool sdcpp_available(std::string *reason);

// One line for sw_build_info: "sdcpp (<library path>)", "sdcpp unavailable
// (<reason>)" or "sdcpp not built".
std::string sdcpp_describe();

// Opens p.path (a single-file .safetensors checkpoint or a diffusers folder)
// through stable-diffusion.cpp, after checking what can be checked without it.
sw_sd_model *open_sdcpp_model(const sw_sd_model_params &p);

// txt2img, img2img or inpaint on a model opened by open_sdcpp_model; hook
// gets one event per sampling step. The result has images and pixels, no latents.
GenerateOutput sdcpp_generate(sw_sd_model &m, const GenerateRequest &r, const StepHook &hook);

// Forwards a cancel request to the running generation (its flag is already set).
void sdcpp_cancel(sw_sd_model &m);

}  // namespace sw
