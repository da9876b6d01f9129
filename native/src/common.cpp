#include "common.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <atomic>
#include <cstdio>
#include <mutex>

#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace sw {

namespace {
thread_local const std::atomic<bool> *call_cancel = nullptr;
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

namespace {

// What this libtorch cannot compute in float16 on the CPU (libtorch 1.13 has
// no half-precision CPU kernels for layer norm, group norm or convolution;
// 2.x has them), found once by running each kind of operation the models use
// on a few values; empty when it computes them all. A model that opened
// without this check would fail at its first step.
const std::string &cpu_half_missing() {
    static const std::string missing = [] {
        c10::InferenceMode guard;
        const auto h = torch::TensorOptions().dtype(torch::kFloat16);
        const auto x = torch::ones({1, 4, 4, 4}, h);
        try {
            (void)at::layer_norm(x, {4});
            (void)at::group_norm(x, 2);
            (void)at::conv2d(x, torch::ones({4, 4, 3, 3}, h), {}, 1, 1);
            (void)at::linear(x, torch::ones({4, 4}, h));
            (void)at::softmax(x, -1);
            (void)at::silu(x);
            (void)at::gelu(x);
            (void)at::baddbmm(x[0], x[0], x[0]);
            return std::string();
        } catch (const c10::Error &e) {
            std::string what = e.what_without_backtrace();
            return what.substr(0, what.find('\n'));
        }
    }();
    return missing;
}

}  // namespace

sw_dtype resolve_dtype(int32_t dtype, const torch::Device &device) {
    switch (dtype) {
        case SW_DTYPE_AUTO:
            return device.is_cpu() ? SW_DTYPE_F32 : SW_DTYPE_F16;
        case SW_DTYPE_F16:
            if (device.is_cpu() && !cpu_half_missing().empty())
                fail(SW_ERR_UNSUPPORTED, "dtype f16 on the cpu: this libtorch does not compute in float16 there (" +
                                             cpu_half_missing() + "); use f32 or bf16");
            return SW_DTYPE_F16;
        case SW_DTYPE_F32:
        case SW_DTYPE_BF16:
            return static_cast<sw_dtype>(dtype);
        case SW_DTYPE_INT8:
            if (!device.is_cpu())
                fail(SW_ERR_UNSUPPORTED, "dtype int8 runs on the cpu only (device " + device_id(device) + ")");
            return SW_DTYPE_INT8;
        case SW_DTYPE_Q8_0:
        case SW_DTYPE_Q5_0:
        case SW_DTYPE_Q4_0:
            fail(SW_ERR_UNSUPPORTED, std::string("dtype ") + dtype_name(static_cast<sw_dtype>(dtype)) +
                                         " is for the sdcpp backend only (libtorch takes auto, f32, f16, bf16 or int8)");
        default:
            fail(SW_ERR_INVALID_ARGUMENT,
                 "unknown dtype " + std::to_string(dtype) + " (want auto, f32, f16, bf16 or int8)");
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
        case SW_DTYPE_Q8_0:
            return "q8_0";
        case SW_DTYPE_Q5_0:
            return "q5_0";
        case SW_DTYPE_Q4_0:
            return "q4_0";
        case SW_DTYPE_INT8:
            return "int8";
        default:
            return "auto";
    }
}

namespace {

std::atomic<int> library_threads{0};

// OpenMP's thread count is per OS thread, and the Go caller may arrive on any.
// libtorch sets it at a thread's first parallel loop (lazy_init_num_threads),
// and with it rebuilds its pthreadpool, whose new worker busy-waits ~25 ms of a
// core: at::init_num_threads at every call rebuilt it every time, and an
// OpenMP worker's first loop did so in the middle of a load, taking that core
// from the conversion. So libtorch's first-loop initialization runs once per
// thread, here, for the calling thread and its OpenMP workers together; after
// that only OpenMP's count is set, where sw_set_num_threads changed it.
void use_library_threads() {
    at::internal::lazy_init_num_threads();
#ifdef _OPENMP
    const int n = library_threads.load();
    if (n > 0 && omp_get_max_threads() != n) omp_set_num_threads(n);
#endif
    thread_local int workers_ready = 1;  // the largest team whose workers have run a loop
    if (const int team = at::get_num_threads(); team > workers_ready) {
        at::parallel_for(0, team, 1, [](int64_t, int64_t) { at::internal::lazy_init_num_threads(); });
        workers_ready = team;
    }
}

}  // namespace

void set_library_threads(int n) {
    if (n <= 0) return;
    at::set_num_threads(n);
    library_threads = n;
}

CallGuard::CallGuard(const std::atomic<bool> *cancel) : previous_(call_cancel) {
    use_library_threads();
    if (cancel != nullptr) call_cancel = cancel;
}

CallGuard::~CallGuard() { call_cancel = previous_; }

void check_cancel() {
    if (call_cancel != nullptr && call_cancel->load(std::memory_order_relaxed)) fail(SW_CANCELLED, "cancelled");
}

const std::atomic<bool> *cancel_flag() { return call_cancel; }

bool path_exists(const std::string &path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
}

int open_regular(const std::string &path, int64_t *size) {
    auto refuse = [&](const struct stat &st) {
        const char *what = S_ISDIR(st.st_mode)    ? "a folder"
                           : S_ISFIFO(st.st_mode) ? "a FIFO"
                           : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                           : S_ISSOCK(st.st_mode) ? "a socket"
                                                   : "not a regular file";
        fail(SW_ERR_IO, path + ": is " + what + ", want a regular file");
    };
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
        const int e = errno;
        fail(e == ENOENT || e == ENOTDIR ? SW_ERR_NOT_FOUND : SW_ERR_IO, path + ": " + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) refuse(st);
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        const int e = errno;
        fail(e == ENOENT ? SW_ERR_NOT_FOUND : SW_ERR_IO, path + ": " + std::strerror(e));
    }
    if (::fstat(fd, &st) != 0) {
        const int e = errno;
        ::close(fd);
        fail(SW_ERR_IO, path + ": " + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {  // replaced between the stat and the open
        ::close(fd);
        refuse(st);
    }
    // Regular files ignore O_NONBLOCK for reads; clear it anyway so nothing
    // downstream sees a surprising flag.
    const int flags = ::fcntl(fd, F_GETFL);
    if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    *size = static_cast<int64_t>(st.st_size);
    return fd;
}

std::string read_text_file(const std::string &path, int64_t max_bytes) {
    int64_t size = 0;
    const int fd = open_regular(path, &size);
    std::string out;
    try {
        if (size > max_bytes)
            fail(SW_ERR_FORMAT, path + ": " + std::to_string(size) + " bytes, more than the " + std::to_string(max_bytes) +
                                    " this file may have");
        out.resize(static_cast<size_t>(size));
        size_t done = 0;
        while (done < out.size()) {
            const ssize_t n = ::read(fd, &out[done], out.size() - done);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) fail(SW_ERR_IO, path + ": read: " + std::strerror(errno));
            if (n == 0) break;  // shrank while read: keep what is there
            done += static_cast<size_t>(n);
        }
        out.resize(done);
    } catch (...) {
        ::close(fd);
        throw;
    }
    ::close(fd);
    return out;
}

}  // namespace sw
