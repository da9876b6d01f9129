// Filling modules from safetensors files, and making random weights for them.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "safetensors.h"

namespace sw {

struct WeightStats {
    int64_t params = 0;  // number of parameter elements
    int64_t bytes = 0;   // bytes of parameters and buffers as loaded (lookup tables left in the file not counted)
};

// load_weights fills every parameter and buffer of m from f (names prefixed
// with prefix), converted to dtype on device. A missing tensor, a shape that
// differs or a non-float dtype is an error naming the file and the tensor.
// Linear weights stored as 1x1 convolutions (and the reverse) are reshaped.
WeightStats load_weights(torch::nn::Module &m, const SafeTensorsFile &f, const std::string &prefix,
                         torch::ScalarType dtype, const torch::Device &device);

// Where a module's tensor lives in a file whose layout differs: the key, and
// optionally one of `parts` equal chunks along dimension 0 (a fused q/k/v).
struct Source {
    std::string key;
    int part = 0, parts = 1;
};
using Resolver = std::function<Source(const std::string &name)>;

// The resolver that names each tensor prefix + its module name (a diffusers
// folder's file: prefix "").
Resolver prefixed(std::string prefix);

// load_weights with a resolver mapping each module name to its source.
WeightStats load_weights(torch::nn::Module &m, const SafeTensorsFile &f, const Resolver &resolve,
                         torch::ScalarType dtype, const torch::Device &device);

// check_weights checks every tensor of m against f as load_weights does,
// loading none, and returns the stats load_weights will (in dtype).
WeightStats check_weights(torch::nn::Module &m, const SafeTensorsFile &f, const Resolver &resolve,
                          torch::ScalarType dtype);

// randomize fills m deterministically from a CPU generator seeded with seed:
// matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases N(0, 0.02²),
// batch-norm statistics near (0, 1).
void randomize(torch::nn::Module &m, uint64_t seed);

// named_tensors lists every parameter and buffer of m under prefix, for writing.
std::vector<std::pair<std::string, torch::Tensor>> named_tensors(torch::nn::Module &m, const std::string &prefix);

// While one lives, libtorch's CPU allocations of at least kMinKeptBlock keep
// the blocks they free and hand them out again, for requests a block exceeds
// by at most slack eighths of the request (the smallest slack of those alive);
// the kept ones (at most the largest max_kept of those alive,
// the smallest freed first) are freed when the last one ends, and libtorch's
// own allocator is back.
// load_weights holds one while it prepacks convolution kernels: each kernel's
// temporary plain copy (to_mkldnn) then reuses the last one's memory instead
// of page-faulting fresh memory, which is most of such a load's time (float32
// SD 1.5 open 1.75–2.05 against 2.26–2.73 s on this project's machine).
//
// Every generate and segment call on a CPU model holds one too
// (kCallKeptBytes, kCallMinBlock): glibc gives blocks of 32 MiB and more (a
// float32 VAE activation at 256²: [1, 128, 256, 256]) straight back to the
// kernel and maps fresh ones for the next, and on this project's machine
// faulting them in cost more than the work on them (a GroupNorm of one: 17
// against 4 ms). Smaller ones stay glibc's: its heap reuses them hot in cache
// (keeping the UNet's 2.6 MB activations here made the 256² step 10% slower).
class ReuseCPUMemory {
public:
    explicit ReuseCPUMemory(size_t max_kept = kMaxKeptBytes, size_t min_block = kMinKeptBlock,
                            size_t slack = kLooseSlack);
    ~ReuseCPUMemory();
    ReuseCPUMemory(const ReuseCPUMemory &) = delete;
    ReuseCPUMemory &operator=(const ReuseCPUMemory &) = delete;

    // Twice SD 1.5's largest float32 kernel: kernels of every size class,
    // kept, would be a model's peak plus ~0.3 GB.
    static constexpr size_t kMaxKeptBytes = size_t(128) << 20;
    // Smaller blocks are not kept while loading: glibc's heap has them.
    static constexpr size_t kMinKeptBlock = size_t(1) << 20;
    // An engine call's: a few of a 512² VAE's largest activations, of at
    // least glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX).
    static constexpr size_t kCallKeptBytes = size_t(512) << 20;
    static constexpr size_t kCallMinBlock = size_t(32) << 20;
    // How far a kept block may exceed a request, in eighths of it. Loose: up
    // to twice the request; what a float32 load wants (its kernels' plain
    // copies reuse each other across sizes: open 1.35 against 1.53 s with
    // Tight). Tight: an eighth; what a bfloat16 load wants (there weights held
    // for the model's life took freed temporaries up to twice their size:
    // 2.36 against 2.21 GB resident after open, and slower).
    static constexpr size_t kLooseSlack = 8;
    static constexpr size_t kTightSlack = 1;
    // The bytes kept for reuse now.
    static size_t kept_bytes();

private:
    size_t max_kept_, min_block_, slack_;
};

// What every generate and segment call holds: ReuseCPUMemory with the call's
// cap and minimum block on a CPU model, nothing on another device.
class CallMemory {
public:
    explicit CallMemory(const torch::Device &device) {
        if (device.is_cpu()) reuse_.emplace(ReuseCPUMemory::kCallKeptBytes, ReuseCPUMemory::kCallMinBlock);
    }

private:
    std::optional<ReuseCPUMemory> reuse_;
};

}  // namespace sw
