// Shared internals of the engine: the error type every layer throws, logging,
// devices and dtypes. Nothing here is exported; api.cpp turns Error into sw_status.
#pragma once

#include <torch/torch.h>

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

// Reads a whole text file; a missing file is SW_ERR_NOT_FOUND naming it.
std::string read_text_file(const std::string &path);
bool path_exists(const std::string &path);

// Per-call libtorch state: it is per thread, and the Go caller may arrive on any
// OS thread, so every exported entry point that runs tensors makes one of these.
struct CallGuard {
    CallGuard() { at::init_num_threads(); }  // OpenMP's thread count is per OS thread
    c10::InferenceMode inference{true};
};

}  // namespace sw
