#include "common.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <sstream>

namespace sw {

namespace {
std::mutex log_mu;
sw_log_callback log_cb = nullptr;
void *log_user_data = nullptr;
}  // namespace

void set_log_callback(sw_log_callback cb, void *user_data) {
    std::lock_guard<std::mutex> lock(log_mu);
    log_cb = cb;
    log_user_data = user_data;
}

void log(sw_log_level level, const std::string &message) {
    sw_log_callback cb;
    void *ud;
    {
        std::lock_guard<std::mutex> lock(log_mu);
        cb = log_cb;
        ud = log_user_data;
    }
    if (cb != nullptr) {
        cb(level, message.c_str(), ud);
        return;
    }
    if (level >= SW_LOG_WARN) std::fprintf(stderr, "stepwise: %s\n", message.c_str());
}

torch::Device parse_device(const std::string &spec) {
    if (spec.empty() || spec == "cpu") return torch::Device(torch::kCPU);
    if (spec == "mps") {
#if defined(__APPLE__)
        if (at::hasMPS()) return torch::Device(torch::kMPS);
#endif
        fail(SW_ERR_DEVICE, "device mps is not available in this build or on this machine");
    }
    if (spec.rfind("cuda", 0) == 0) {
        if (!torch::cuda::is_available())
            fail(SW_ERR_DEVICE, "device " + spec + " requested but this libtorch has no usable CUDA device");
        int64_t index = 0;
        if (spec.size() > 4) {
            if (spec[4] != ':' || spec.size() == 5) fail(SW_ERR_INVALID_ARGUMENT, "bad device \"" + spec + "\"");
            const std::string digits = spec.substr(5);
            if (digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 4)
                fail(SW_ERR_INVALID_ARGUMENT, "bad device \"" + spec + "\"");
            index = std::stoll(digits);
        }
        const int64_t count = static_cast<int64_t>(torch::cuda::device_count());
        if (index >= count)
            fail(SW_ERR_DEVICE, "device " + spec + " does not exist (" + std::to_string(count) + " CUDA devices)");
        return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
    }
    fail(SW_ERR_INVALID_ARGUMENT, "unknown device \"" + spec + "\" (want cpu, cuda, cuda:N or mps)");
}

std::string device_id(const torch::Device &d) {
    if (d.is_cuda()) return "cuda:" + std::to_string(d.has_index() ? d.index() : 0);
    if (d.is_mps()) return "mps";
    return "cpu";
}

sw_dtype resolve_dtype(int32_t dtype, const torch::Device &device) {
    switch (dtype) {
        case SW_DTYPE_AUTO:
            return device.is_cpu() ? SW_DTYPE_F32 : SW_DTYPE_F16;
        case SW_DTYPE_F32:
        case SW_DTYPE_F16:
        case SW_DTYPE_BF16:
            return static_cast<sw_dtype>(dtype);
        default:
            fail(SW_ERR_INVALID_ARGUMENT, "unknown dtype " + std::to_string(dtype) + " (want auto, f32, f16 or bf16)");
    }
}

torch::ScalarType scalar_type(sw_dtype dtype) {
    switch (dtype) {
        case SW_DTYPE_F16:
            return torch::kFloat16;
        case SW_DTYPE_BF16:
            return torch::kBFloat16;
        default:
            return torch::kFloat32;
    }
}

const char *dtype_name(sw_dtype dtype) {
    switch (dtype) {
        case SW_DTYPE_F16:
            return "f16";
        case SW_DTYPE_BF16:
            return "bf16";
        case SW_DTYPE_F32:
            return "f32";
        default:
            return "auto";
    }
}

bool path_exists(const std::string &path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
}

std::string read_text_file(const std::string &path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        if (!path_exists(path)) fail(SW_ERR_NOT_FOUND, path + ": no such file");
        fail(SW_ERR_IO, path + ": cannot open");
    }
    std::ostringstream ss;
    ss << in.rdbuf();
    if (in.bad()) fail(SW_ERR_IO, path + ": read failed");
    return ss.str();
}

}  // namespace sw
