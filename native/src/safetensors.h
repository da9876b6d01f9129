// Reading and writing the safetensors format: an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
// then the raw little-endian tensor bytes.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace sw {

struct TensorEntry {
    std::string dtype;  // "F32", "F16", "BF16", "I64", ...
    torch::ScalarType scalar;
    std::vector<int64_t> shape;
    size_t begin = 0;  // offsets into the data section
    size_t end = 0;
};

// SafeTensorsFile memory-maps a file and validates its whole header up front:
// every tensor's dtype, shape and offsets, and that the offsets tile the data
// section exactly. Tensors are copied out on request, or used from the mapping
// itself where nothing needs converting (load); the mapping is released once
// the file and every tensor still using it are gone.
class SafeTensorsFile {
public:
    explicit SafeTensorsFile(const std::string &path);
    ~SafeTensorsFile();
    SafeTensorsFile(const SafeTensorsFile &) = delete;
    SafeTensorsFile &operator=(const SafeTensorsFile &) = delete;

    const std::string &path() const { return path_; }
    bool has(const std::string &name) const { return entries_.count(name) != 0; }
    const TensorEntry &entry(const std::string &name) const;
    const std::map<std::string, TensorEntry> &entries() const { return entries_; }
    const std::map<std::string, std::string> &metadata() const { return metadata_; }

    // The tensor in dtype on device. On the CPU in its stored dtype (and
    // aligned for it) it is the mapping's own bytes, read-only, made resident
    // now and given back when the tensor is freed: weights are never copied
    // only to be held once more. Anything else is a converted copy.
    torch::Tensor load(const std::string &name, torch::ScalarType dtype, const torch::Device &device) const;
    // The tensor in its stored dtype, on the CPU: the mapping's own bytes,
    // read-only, its pages read in only as they are touched and given back
    // when the tensor is freed (a lookup table of which a call reads a few
    // rows). Undefined where the data is not aligned for its dtype.
    torch::Tensor map_stored(const std::string &name) const;
    // The tensor in its stored dtype, on the CPU, owning its memory.
    torch::Tensor load(const std::string &name) const;
    // copy_out's result for a view of the tensor's bytes in the mapping (its
    // stored dtype and shape, on the CPU): a tensor that owns its memory, or
    // an undefined one when copy_out kept its copy elsewhere (a prepacked
    // kernel). The view is invalid, its pages given back, once it returns.
    torch::Tensor load_with(const std::string &name,
                            const std::function<torch::Tensor(const torch::Tensor &view)> &copy_out) const;

    struct Mapping;

private:
    std::string path_;
    // e's first byte from the start of the mapping.
    size_t offset(const TensorEntry &e) const;

    std::shared_ptr<Mapping> mapping_;  // shared with the tensors load maps
    const uint8_t *data_ = nullptr;  // start of the data section
    std::map<std::string, TensorEntry> entries_;
    std::map<std::string, std::string> metadata_;
};

// Writes tensors (made contiguous, on the CPU, in their own dtype) and string
// metadata to path atomically: a temporary file in the same folder, then rename.
void write_safetensors(const std::string &path, const std::vector<std::pair<std::string, torch::Tensor>> &tensors,
                       const std::map<std::string, std::string> &metadata = {});

}  // namespace sw
