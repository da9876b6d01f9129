// The exported C functions: each one catches every exception and turns it into
// an sw_status with a message in the caller's sw_error.
#include <cstring>
#include <memory>

#include "models.h"

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
#if defined(__clang__)
    s += "; compiler: clang " __clang_version__;
#elif defined(__GNUC__)
    s += "; compiler: gcc " __VERSION__;
#endif
    return s;
}

void fill_info(sw_model_info *out, int64_t params, int64_t bytes, sw_dtype dtype, const torch::Device &dev,
               const std::string &arch) {
    std::memset(out, 0, sizeof *out);
    out->param_count = params;
    out->weight_bytes = bytes;
    out->dtype = dtype;
    std::strncpy(out->device, sw::device_id(dev).c_str(), sizeof out->device - 1);
    std::strncpy(out->arch, arch.c_str(), sizeof out->arch - 1);
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
    if (n > 0) {
        try {
            at::set_num_threads(n);
        } catch (...) {
        }
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

SW_API void sw_sd_model_default_params(sw_sd_model_params *p) {
    if (p == nullptr) return;
    std::memset(p, 0, sizeof *p);
    p->device = "cpu";
    p->dtype = SW_DTYPE_AUTO;
}

SW_API sw_status sw_sd_model_open(const sw_sd_model_params *p, sw_sd_model **out, sw_error *err) {
    if (out != nullptr) *out = nullptr;
    return guarded(err, [&] {
        if (p == nullptr || out == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, "params or out is NULL");
        *out = sw::open_sd_model(*p);
    });
}

SW_API void sw_sd_model_close(sw_sd_model *m) {
    try {
        delete m;
    } catch (...) {
    }
}

SW_API sw_status sw_sd_model_info(const sw_sd_model *m, sw_model_info *out, sw_error *err) {
    return guarded(err, [&] {
        if (m == nullptr || out == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, "model or out is NULL");
        fill_info(out, m->params, m->bytes, m->dtype, m->device, m->arch);
    });
}

SW_API void sw_seg_model_default_params(sw_seg_model_params *p) {
    if (p == nullptr) return;
    std::memset(p, 0, sizeof *p);
    p->device = "cpu";
    p->dtype = SW_DTYPE_F32;
}

SW_API sw_status sw_seg_model_open(const sw_seg_model_params *p, sw_seg_model **out, sw_error *err) {
    if (out != nullptr) *out = nullptr;
    return guarded(err, [&] {
        if (p == nullptr || out == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, "params or out is NULL");
        *out = sw::open_seg_model(*p);
    });
}

SW_API void sw_seg_model_close(sw_seg_model *m) {
    try {
        delete m;
    } catch (...) {
    }
}

SW_API sw_status sw_seg_model_info(const sw_seg_model *m, sw_model_info *out, sw_error *err) {
    return guarded(err, [&] {
        if (m == nullptr || out == nullptr) sw::fail(SW_ERR_INVALID_ARGUMENT, "model or out is NULL");
        fill_info(out, m->params, m->bytes, m->dtype, m->device, m->net->arch.describe());
    });
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
