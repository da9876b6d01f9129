// The exported C functions: each one catches every exception and turns it into
// an sw_status with a message in the caller's sw_error.
#include <cstring>
#include <memory>

#include <chrono>

#include "generate.h"
#include "segment.h"
#include "models.h"
#include "sdcpp.h"

#ifndef SW_VERSION_STRING
#define SW_VERSION_STRING "0.0.0-dev"
#endif

namespace {

sw_status report(sw_error *err, sw_status status, const std::string &message) {
    if (err != nullptr) {
        err->status = status;
        std::strncpy(err->message, message.c_str(), SW_ERROR_MESSAGE_SIZE - 1);
        err->message[SW_ERROR_MESSAGE_SIZE - 1] = '\0';
    }
    return status;
}

bool mentions_oom(const std::string &s) {
    return s.find("out of memory") != std::string::npos || s.find("CUDA error: out of memory") != std::string::npos ||
           s.find("DefaultCPUAllocator: can't allocate memory") != std::string::npos;
}

// guarded runs f, turning every exception into a status.
template <typename F>
sw_status guarded(sw_error *err, F &&f) {
    report(err, SW_OK, "");
    try {
        f();
        return SW_OK;
    } catch (const sw::Error &e) {
        return report(err, e.status(), e.what());
    } catch (const c10::OutOfMemoryError &e) {
        return report(err, SW_ERR_OUT_OF_MEMORY, e.what_without_backtrace());
    } catch (const c10::Error &e) {
        const std::string msg = e.what_without_backtrace();
        return report(err, mentions_oom(msg) ? SW_ERR_OUT_OF_MEMORY : SW_ERR_INTERNAL, msg);
    } catch (const std::bad_alloc &) {
        return report(err, SW_ERR_OUT_OF_MEMORY, "out of host memory");
    } catch (const std::exception &e) {
        return report(err, SW_ERR_INTERNAL, e.what());
    } catch (...) {
        return report(err, SW_ERR_INTERNAL, "unknown C++ exception");
    }
}

std::string build_info() {
    std::string s = "stepwise " SW_VERSION_STRING "; libtorch " TORCH_VERSION;
#if defined(SW_WITH_CUDA)
    s += "; cuda: built";
#else
    s += "; cuda: no";
#endif
    s += std::string("; mps: ") + (at::hasMPS() ? "yes" : "no");
    s += "; cxx11 abi: " + std::to_string(_GLIBCXX_USE_CXX11_ABI);
    s += "; threads: " + std::to_string(at::get_num_threads());
    s += "; backends: libtorch, " + sw::sdcpp_describe();
#if defined(__clang__)
    s += "; compiler: clang " __clang_version__;
#elif defined(__GNUC__)
    s += "; compiler: gcc " __VERSION__;
#endif
    return s;
}

// The calls every model handle shares, so the SD and segmentation twins of the
// C API stay one line each.

template <typename M, typename P, typename Open>
sw_status open_model(const P *p, M **out, sw_error *err, Open &&open) {
    if (out != nullptr) *out = nullptr;
    return guarded(err, [&] {
        if (p == nullptr || out == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, "params or out is NULL");
        *out = open(*p);
    });
}

template <typename M>
void close_model(M *m) {
    try {
        delete m;
    } catch (...) {
    }
}

sw_status model_info(const sw::ModelHandle *m, sw_model_info *out, sw_error *err) {
    return guarded(err, [&] {
        if (m == nullptr || out == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, "model or out is NULL");
        std::memset(out, 0, sizeof *out);
        out->param_count = m->params;
        out->weight_bytes = m->bytes;
        out->dtype = m->dtype;
        std::strncpy(out->device, sw::device_id(m->device).c_str(), sizeof out->device - 1);
        std::strncpy(out->arch, m->arch.c_str(), sizeof out->arch - 1);
    });
}

void cancel_model(sw::ModelHandle *m) {
    if (m != nullptr) m->cancel.store(true);
}

// with_model is the preamble of every call that runs a model: the handle is
// checked and taken (a second call at the same time is refused, not raced),
// its cancel flag cleared and installed as this thread's, libtorch's
// per-thread state set, and every exception turned into a status.
template <typename M, typename F>
sw_status with_model(M *m, sw_error *err, F &&f) {
    return guarded(err, [&] {
        if (m == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, "model is NULL");
        std::unique_lock<std::mutex> lock(m->busy, std::try_to_lock);
        if (!lock.owns_lock()) sw::fail(SW_ERR_INVALID_ARGUMENT, "the model is in use by another call");
        m->cancel.store(false);
        sw::CallGuard guard(&m->cancel);
        f(*m);
    });
}

}  // namespace

extern "C" {

SW_API int32_t sw_abi_version(void) { return SW_ABI_VERSION; }
SW_API const char *sw_version(void) { return SW_VERSION_STRING; }
SW_API const char *sw_torch_version(void) { return TORCH_VERSION; }

SW_API const char *sw_build_info(void) {
    static const std::string info = [] {
        try {
            return build_info();
        } catch (...) {
            return std::string("stepwise " SW_VERSION_STRING);
        }
    }();
    return info.c_str();
}

SW_API void sw_set_log_callback(sw_log_callback callback, void *user_data) { sw::set_log_callback(callback, user_data); }

SW_API void sw_set_num_threads(int32_t n) {
    try {
        sw::set_library_threads(n);
    } catch (...) {
    }
}

SW_API int32_t sw_device_count(void) {
    try {
        return static_cast<int32_t>(sw::list_devices().size());
    } catch (...) {
        return 1;  // the CPU is always there
    }
}

SW_API sw_status sw_device_get(int32_t i, sw_device_info *out, sw_error *err) {
    return guarded(err, [&] {
        if (out == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, "out is NULL");
        const auto devices = sw::list_devices();
        if (i < 0 || static_cast<size_t>(i) >= devices.size())
            sw::fail(SW_ERR_INVALID_ARGUMENT, "device index " + std::to_string(i) + " out of range (" +
                                                  std::to_string(devices.size()) + " devices)");
        *out = devices[static_cast<size_t>(i)];
    });
}

// The handle calls of both model kinds, side by side: each is one shared helper.

SW_API void sw_sd_model_default_params(sw_sd_model_params *p) {
    if (p == nullptr) return;
    std::memset(p, 0, sizeof *p);
    p->device = "cpu";
    p->dtype = SW_DTYPE_AUTO;
}
SW_API void sw_seg_model_default_params(sw_seg_model_params *p) {
    if (p == nullptr) return;
    std::memset(p, 0, sizeof *p);
    p->device = "cpu";
    p->dtype = SW_DTYPE_F32;
}

SW_API sw_status sw_backend_available(int32_t backend, sw_error *err) {
    return guarded(err, [&] {
        std::string reason;
        switch (backend) {
            case SW_BACKEND_LIBTORCH:
                return;
            case SW_BACKEND_SDCPP:
                if (!sw::sdcpp_available(&reason)) sw::fail(SW_ERR_UNSUPPORTED, "sdcpp backend: " + reason);
                return;
            default:
                sw::fail(SW_ERR_INVALID_ARGUMENT, "unknown backend " + std::to_string(backend));
        }
    });
}

SW_API sw_status sw_sd_model_open(const sw_sd_model_params *p, sw_sd_model **out, sw_error *err) {
    return open_model(p, out, err, [](const sw_sd_model_params &params) {
        switch (params.backend) {
            case SW_BACKEND_LIBTORCH:
                return sw::open_sd_model(params);
            case SW_BACKEND_SDCPP:
                return sw::open_sdcpp_model(params);
            default:
                sw::fail(SW_ERR_INVALID_ARGUMENT, "unknown backend " + std::to_string(params.backend) +
                                                      " (want libtorch or sdcpp)");
        }
    });
}
SW_API sw_status sw_seg_model_open(const sw_seg_model_params *p, sw_seg_model **out, sw_error *err) {
    return open_model(p, out, err, sw::open_seg_model);
}

SW_API void sw_sd_model_close(sw_sd_model *m) { close_model(m); }
SW_API void sw_seg_model_close(sw_seg_model *m) { close_model(m); }

SW_API void sw_sd_model_cancel(sw_sd_model *m) {
    cancel_model(m);
    if (m != nullptr && m->sdcpp) {
        try {
            sw::sdcpp_cancel(*m);
        } catch (...) {
        }
    }
}
SW_API void sw_seg_model_cancel(sw_seg_model *m) { cancel_model(m); }

SW_API sw_status sw_sd_model_info(const sw_sd_model *m, sw_model_info *out, sw_error *err) {
    return model_info(m, out, err);
}
SW_API sw_status sw_seg_model_info(const sw_seg_model *m, sw_model_info *out, sw_error *err) {
    return model_info(m, out, err);
}

SW_API sw_status sw_sd_write_random_weights(const char *dir, uint64_t seed, sw_error *err) {
    return guarded(err, [&] {
        if (dir == nullptr || *dir == '\0') sw::fail(SW_ERR_INVALID_ARGUMENT, "dir is empty");
        sw::write_random_sd(dir, seed);
    });
}

SW_API sw_status sw_seg_write_random_weights(const char *path, const sw_seg_arch *arch, uint64_t seed,
                                             sw_error *err) {
    return guarded(err, [&] {
        if (path == nullptr || *path == '\0' || arch == nullptr)
            sw::fail(SW_ERR_INVALID_ARGUMENT, "path or arch is NULL");
        sw::write_random_seg(path, *arch, seed);
    });
}

}  // extern "C"

// ---- generation -------------------------------------------------------------

namespace {

void check_image(const sw_image *img, int32_t channels, const char *what) {
    if (img->data == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, std::string(what) + ": no pixel data");
    if (img->width <= 0 || img->height <= 0) sw::fail(SW_ERR_INVALID_ARGUMENT, std::string(what) + ": empty image");
    if (img->channels != channels)
        sw::fail(SW_ERR_INVALID_ARGUMENT, std::string(what) + ": want " + std::to_string(channels) + " channels, got " +
                                              std::to_string(img->channels));
    if (img->stride < img->width * img->channels) sw::fail(SW_ERR_INVALID_ARGUMENT, std::string(what) + ": stride too small");
}

// u8 [H, W, C] with a stride -> float32 [1, C, H, W] in 0..1.
torch::Tensor image_tensor(const sw_image *img) {
    auto t = torch::from_blob(img->data, {img->height, img->width, img->channels},
                              {img->stride, img->channels, 1}, torch::kUInt8);
    return t.permute({2, 0, 1}).unsqueeze(0).to(torch::kFloat32) / 255.0;
}

// A result handed out is the base of a holder that owns the memory behind its
// pointers; the matching free deletes the holder.
template <typename R>
struct Holder : R {
    Holder() : R{} {}
    std::vector<sw_image> images;
    std::vector<torch::Tensor> tensors;
    // keep returns t's data, alive as long as the holder.
    template <typename T>
    T *keep(const torch::Tensor &t) {
        tensors.push_back(t);
        return t.data_ptr<T>();
    }
};

template <typename R>
void free_result(R *r) {
    try {
        delete static_cast<Holder<R> *>(r);
    } catch (...) {
    }
}

}  // namespace

extern "C" {

SW_API void sw_generate_default_params(sw_generate_params *p) {
    if (p == nullptr) return;
    std::memset(p, 0, sizeof *p);
    p->width = 512;
    p->height = 512;
    p->steps = 20;
    p->batch_size = 1;
    p->cfg_scale = 7.5f;
    p->sampler = SW_SAMPLER_EULER;
    p->strength = 1.0f;
    p->preview = SW_PREVIEW_NONE;
    p->preview_every = 1;
}

SW_API sw_status sw_sd_generate(sw_sd_model *m, const sw_generate_params *p, sw_generate_result **out, sw_error *err) {
    if (out != nullptr) *out = nullptr;
    return with_model(m, err, [&](sw_sd_model &model) {
        if (p == nullptr || out == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, "params or out is NULL");
        sw::GenerateRequest r;
        r.prompt = p->prompt ? p->prompt : "";
        r.negative_prompt = p->negative_prompt ? p->negative_prompt : "";
        r.width = p->width;
        r.height = p->height;
        r.steps = p->steps;
        r.batch = p->batch_size;
        r.cfg_scale = p->cfg_scale;
        r.sampler = sw::parse_sampler(p->sampler);
        r.seed = p->seed;
        r.strength = p->strength;
        r.clip_skip = p->clip_skip;
        r.preview = p->preview;
        r.preview_every = p->preview_every;
        if (p->init_image) {
            check_image(p->init_image, 3, "init image");
            r.init_image = image_tensor(p->init_image) * 2.0 - 1.0;
        }
        if (p->mask) {
            check_image(p->mask, 1, "mask");
            r.mask = image_tensor(p->mask);
        }
        sw::StepHook hook;
        if (p->callback) {
            hook = [&](const sw::StepEvent &ev) {
                sw_step_info info{};
                info.step = static_cast<int32_t>(ev.step);
                info.steps = static_cast<int32_t>(ev.steps);
                info.timestep = ev.timestep;
                info.sigma = ev.sigma;
                info.elapsed_seconds = ev.elapsed;
                std::vector<sw_image> previews;
                if (ev.preview.defined()) {
                    const auto b = ev.preview.size(0), h = ev.preview.size(1), w = ev.preview.size(2);
                    for (int64_t i = 0; i < b; i++) {
                        previews.push_back({static_cast<int32_t>(w), static_cast<int32_t>(h), 3, static_cast<int32_t>(w * 3),
                                            ev.preview[i].data_ptr<uint8_t>()});
                    }
                    info.preview_count = static_cast<int32_t>(b);
                    info.previews = previews.data();
                }
                return p->callback(&info, p->user_data) != 0;
            };
        }
        auto res = model.sdcpp ? sw::sdcpp_generate(model, r, hook) : sw::generate(model, r, hook);
        auto holder = std::make_unique<Holder<sw_generate_result>>();
        const auto b = res.images.size(0), h = res.images.size(1), w = res.images.size(2);
        for (int64_t i = 0; i < b; i++)
            holder->images.push_back({static_cast<int32_t>(w), static_cast<int32_t>(h), 3, static_cast<int32_t>(w * 3),
                                      holder->keep<uint8_t>(res.images[i])});
        sw_generate_result &o = *holder;
        o.count = static_cast<int32_t>(b);
        o.images = holder->images.data();
        if (res.latents.defined()) {  // the sdcpp backend hands out images only
            for (int i = 0; i < 4; i++) o.latent_shape[i] = static_cast<int32_t>(res.latents.size(i));
            o.latents = holder->keep<float>(res.latents);
        }
        o.pixels = holder->keep<float>(res.pixels);
        o.tokens = static_cast<int32_t>(res.tokens);
        o.truncated = res.truncated ? 1 : 0;
        o.seconds_text = res.seconds_text;
        o.seconds_denoise = res.seconds_denoise;
        o.seconds_decode = res.seconds_decode;
        *out = holder.release();
    });
}

SW_API void sw_generate_result_free(sw_generate_result *r) { free_result(r); }

SW_API sw_status sw_sd_tokenize(sw_sd_model *m, const char *text, int64_t *ids, int32_t capacity, int32_t *count,
                                sw_error *err) {
    return with_model(m, err, [&](sw_sd_model &model) {
        if (text == nullptr || count == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, "text or count is NULL");
        auto v = model.tokenizer->encode(text);
        *count = static_cast<int32_t>(v.size());
        for (int32_t i = 0; i < capacity && i < *count && ids != nullptr; i++) ids[i] = v[static_cast<size_t>(i)];
    });
}

}  // extern "C"

// ---- segmentation -----------------------------------------------------------

extern "C" {

SW_API void sw_segment_default_params(sw_segment_params *p) {
    if (p == nullptr) return;
    std::memset(p, 0, sizeof *p);
    p->threshold = 0.5f;
}

SW_API sw_status sw_seg_segment(sw_seg_model *m, const sw_segment_params *p, sw_segment_result **out, sw_error *err) {
    if (out != nullptr) *out = nullptr;
    return with_model(m, err, [&](sw_seg_model &model) {
        if (p == nullptr || out == nullptr || p->image == nullptr)
            sw::fail(SW_ERR_INVALID_ARGUMENT, "params, image or out is NULL");
        check_image(p->image, 3, "image");
        if (p->out_width < 0 || p->out_height < 0 || p->out_width > 16384 || p->out_height > 16384)
            sw::fail(SW_ERR_INVALID_ARGUMENT, "output size out of range");
        if (p->subject_class_count < 0 || (p->subject_class_count > 0 && p->subject_classes == nullptr))
            sw::fail(SW_ERR_INVALID_ARGUMENT, "subject classes: count without a list");
        sw::SegmentRequest r;
        r.input = image_tensor(p->image);
        r.out_width = p->out_width;
        r.out_height = p->out_height;
        r.threshold = p->threshold;
        for (int32_t i = 0; i < p->subject_class_count; i++) r.subject.push_back(p->subject_classes[i]);
        const auto t0 = std::chrono::steady_clock::now();
        auto res = sw::segment(model, r);
        auto holder = std::make_unique<Holder<sw_segment_result>>();
        const auto h = static_cast<int32_t>(res.mask.size(0)), w = static_cast<int32_t>(res.mask.size(1));
        holder->mask = {w, h, 1, w, holder->keep<uint8_t>(res.mask)};
        holder->labels = {w, h, 1, w, holder->keep<uint8_t>(res.labels)};
        holder->classes = static_cast<int32_t>(model.net->arch.classes);
        if (p->want_logits) {
            holder->logits = holder->keep<float>(res.logits);
        }
        holder->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        *out = holder.release();
    });
}

SW_API void sw_segment_result_free(sw_segment_result *r) { free_result(r); }

}  // extern "C"
