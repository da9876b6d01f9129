#include <memory>

#include "models.h"
#include "safetensors.h"
#include "weights.h"

namespace sw {

sw_seg_model *open_seg_model(const sw_seg_model_params &p) {
    CallGuard guard;
    if (p.path == nullptr || *p.path == '\0') fail(SW_ERR_INVALID_ARGUMENT, "model path is empty");
    auto m = std::make_unique<sw_seg_model>();
    m->path = p.path;
    m->device = parse_device(p.device ? p.device : "cpu");
    m->dtype = resolve_dtype(p.dtype == SW_DTYPE_AUTO ? SW_DTYPE_F32 : p.dtype, m->device);
    if (m->dtype == SW_DTYPE_INT8)
        fail(SW_ERR_UNSUPPORTED, "dtype int8 is for Stable Diffusion models (segmentation takes f32, f16 or bf16)");
    const auto dot = m->path.find_last_of('.');
    const std::string ext = dot == std::string::npos ? "" : m->path.substr(dot);
    if (ext == ".pth" || ext == ".pt" || ext == ".ckpt")
        fail(SW_ERR_UNSUPPORTED, m->path + ": pickle checkpoints are not read by the engine; convert it to .safetensors "
                                           "(stepwise models convert)");
    SafeTensorsFile f(m->path);
    const SegArch arch = SegArch::from_file(f);
    m->net = SegUNet(arch);
    const auto stats = load_weights(*m->net, f, "", scalar_type(m->dtype), m->device);
    m->net->eval();
    m->params = stats.params;
    m->bytes = stats.bytes;
    m->arch = arch.describe();
    log(SW_LOG_INFO, "opened " + m->path + " (" + arch.describe() + ")");
    return m.release();
}

void write_random_seg(const std::string &path, const sw_seg_arch &a, uint64_t seed) {
    SegUNet net(SegArch::from_base(a.in_channels, a.classes, a.base_width, a.bilinear != 0));
    randomize(*net, seed);
    write_safetensors(path, named_tensors(*net, ""),
                      {{"n_channels", std::to_string(a.in_channels)},
                       {"n_classes", std::to_string(a.classes)},
                       {"bilinear", a.bilinear ? "True" : "False"}});
}

}  // namespace sw
