// Shared internals of the engine: the error type every layer throws, logging,
// devices and dtypes. Nothing here is exported; api.cpp turns Error into sw_status.
#pragma once

#include <torch/torch.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "stepwise.h"

namespace sw {

// Error carries the status that the C boundary will report.
class Error : public std::runtime_error {
public:
    Error(sw_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
    sw_status status() const { return status_; }

private:
    sw_status status_;
};

[[noreturn]] inline void fail(sw_status status, const std::string &message) { throw Error(status, message); }

void log(sw_log_level level, const std::string &message);

// parse_device turns "cpu", "cuda", "cuda:N" or "mps" into a device that exists
// in this build and on this machine.
torch::Device parse_device(const std::string &spec);
std::string device_id(const torch::Device &d);

// resolve_dtype maps SW_DTYPE_AUTO to the device's default and validates the rest.
sw_dtype resolve_dtype(int32_t dtype, const torch::Device &device);
torch::ScalarType scalar_type(sw_dtype dtype);
const char *dtype_name(sw_dtype dtype);

// Whether t is laid out channels-last and not also plain NCHW (a tensor with
// one channel or one pixel is both).
inline bool is_channels_last(const torch::Tensor &t) {
    return !t.is_contiguous() && t.is_contiguous(torch::MemoryFormat::ChannelsLast);
}

// Reads a whole text file of at most max_bytes; a missing file is
// SW_ERR_NOT_FOUND naming it, anything but a regular file SW_ERR_IO.
std::string read_text_file(const std::string &path, int64_t max_bytes = int64_t(64) << 20);
bool path_exists(const std::string &path);

// open_regular opens path read-only and returns the descriptor (O_CLOEXEC) and
// its size. Anything but a regular file is refused at once: a FIFO or a device
// would block the reader forever, a folder would mislead it. The path is checked
// with stat before the open (which is non-blocking, so even a FIFO created in
// between cannot hang it) and the descriptor with fstat after.
int open_regular(const std::string &path, int64_t *size);

// Cancel points. A call on a model installs the model's cancel flag for its
// thread (CallGuard); the engine calls check_cancel between blocks, layers,
// attention slices and denoising steps, so a cancel requested from another
// thread lands within one of those, however large the image.
void check_cancel();

// The cancel flag check_cancel reads on this thread, null where none is
// installed: a kernel that splits one call over worker threads (which have
// none of their own) hands it to them, and they stop early when it is set.
const std::atomic<bool> *cancel_flag();

// The library's thread count (sw_set_num_threads): libtorch's, applied by
// CallGuard to every OS thread a call runs on. n <= 0 is ignored.
void set_library_threads(int n);

// Per-call libtorch state: it is per thread, and the Go caller may arrive on any
// OS thread, so every exported entry point that runs tensors makes one of these.
// Given a cancel flag it installs it for check_cancel on this thread; without
// one it keeps the flag of an enclosing guard.
class CallGuard {
public:
    explicit CallGuard(const std::atomic<bool> *cancel = nullptr);
    ~CallGuard();
    CallGuard(const CallGuard &) = delete;
    CallGuard &operator=(const CallGuard &) = delete;

private:
    const std::atomic<bool> *previous_;
    c10::InferenceMode inference_{true};
};

}  // namespace sw
