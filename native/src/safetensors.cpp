#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common.h"

namespace sw {

namespace {

// Headers larger than this are refused before they are parsed (the reference
// implementation uses the same limit).
constexpr uint64_t kMaxHeaderSize = 100u * 1024 * 1024;

bool dtype_from_name(const std::string &name, torch::ScalarType *out, size_t *elem) {
    static const std::map<std::string, std::pair<torch::ScalarType, size_t>> table = {
        {"F64", {torch::kFloat64, 8}}, {"F32", {torch::kFloat32, 4}}, {"F16", {torch::kFloat16, 2}},
        {"BF16", {torch::kBFloat16, 2}}, {"I64", {torch::kInt64, 8}},  {"I32", {torch::kInt32, 4}},
        {"I16", {torch::kInt16, 2}},     {"I8", {torch::kInt8, 1}},     {"U8", {torch::kUInt8, 1}},
        {"BOOL", {torch::kBool, 1}},
    };
    auto it = table.find(name);
    if (it == table.end()) return false;
    *out = it->second.first;
    *elem = it->second.second;
    return true;
}

const char *dtype_to_name(torch::ScalarType t) {
    switch (t) {
        case torch::kFloat64: return "F64";
        case torch::kFloat32: return "F32";
        case torch::kFloat16: return "F16";
        case torch::kBFloat16: return "BF16";
        case torch::kInt64: return "I64";
        case torch::kInt32: return "I32";
        case torch::kInt16: return "I16";
        case torch::kInt8: return "I8";
        case torch::kUInt8: return "U8";
        case torch::kBool: return "BOOL";
        default: fail(SW_ERR_UNSUPPORTED, std::string("cannot write dtype ") + c10::toString(t) + " to safetensors");
    }
}

std::string shape_str(const std::vector<int64_t> &shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// Linux 5.14's names, for older headers; older kernels refuse them (EINVAL)
// and the pages then fault in on first use instead.
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

// page_range is [begin, end) widened to whole pages within the mapping.
std::pair<size_t, size_t> page_range(size_t map_size, size_t begin, size_t end) {
    static const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    return {begin / page * page, std::min(map_size, (end + page - 1) / page * page)};
}

// drop_pages gives the pages of [begin, end) of a read-only file mapping back
// to the kernel once a tensor has been copied out of them, so the mapped file
// and the loaded weights are never both resident: a model's peak memory is its
// weights plus one tensor, not twice its file. The pages stay in the page
// cache; reading them again faults them back in.
void drop_pages(const void *map, size_t map_size, size_t begin, size_t end) {
    const auto [lo, hi] = page_range(map_size, begin, end);
    if (hi > lo) ::madvise(static_cast<char *>(const_cast<void *>(map)) + lo, hi - lo, MADV_DONTNEED);
}

}  // namespace

// The mapping outlives the file object while a tensor load mapped still uses it.
struct SafeTensorsFile::Mapping {
    Mapping(void *a, size_t n) : addr(a), size(n) {}
    Mapping(const Mapping &) = delete;
    Mapping &operator=(const Mapping &) = delete;
    ~Mapping() { ::munmap(addr, size); }
    void *const addr;
    const size_t size;
};

SafeTensorsFile::SafeTensorsFile(const std::string &path) : path_(path) {
    int64_t file_size = 0;
    const int fd = open_regular(path, &file_size);
    const auto size = static_cast<size_t>(file_size);
    if (size < 8) {
        ::close(fd);
        fail(SW_ERR_FORMAT, path + ": truncated safetensors file (" + std::to_string(size) + " bytes, no header)");
    }
    void *map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int map_errno = errno;
    ::close(fd);
    if (map == MAP_FAILED) fail(SW_ERR_IO, path + ": mmap: " + std::strerror(map_errno));
    mapping_ = std::make_shared<Mapping>(map, size);  // unmapped with this object if the header is refused
    const auto *bytes = static_cast<const uint8_t *>(map);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | bytes[i];
    if (header_len > kMaxHeaderSize)
        fail(SW_ERR_FORMAT, path + ": not a safetensors file (header length " + std::to_string(header_len) + ")");
    if (8 + header_len > size)
        fail(SW_ERR_FORMAT, path + ": truncated safetensors file (header needs " + std::to_string(header_len) +
                                " bytes, file has " + std::to_string(size - 8) + ")");
    nlohmann::json header;
    try {
        header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_len);
    } catch (const nlohmann::json::exception &e) {
        fail(SW_ERR_FORMAT, path + ": bad safetensors header: " + e.what());
    }
    if (!header.is_object()) fail(SW_ERR_FORMAT, path + ": bad safetensors header: not a JSON object");
    data_ = bytes + 8 + header_len;
    const size_t data_size = size - 8 - header_len;

    std::vector<std::pair<size_t, std::string>> order;
    for (auto it = header.begin(); it != header.end(); ++it) {
        const std::string &name = it.key();
        if (name == "__metadata__") {
            if (!it->is_object()) fail(SW_ERR_FORMAT, path + ": __metadata__ is not an object");
            for (auto m = it->begin(); m != it->end(); ++m) {
                if (!m->is_string()) fail(SW_ERR_FORMAT, path + ": __metadata__ value " + m.key() + " is not a string");
                metadata_[m.key()] = m->get<std::string>();
            }
            continue;
        }
        const std::string where = path + ": tensor " + name;
        const auto &v = *it;
        if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
            fail(SW_ERR_FORMAT, where + ": entry needs dtype, shape and data_offsets");
        TensorEntry e;
        size_t elem = 0;
        if (!v["dtype"].is_string()) fail(SW_ERR_FORMAT, where + ": dtype is not a string");
        e.dtype = v["dtype"].get<std::string>();
        if (!dtype_from_name(e.dtype, &e.scalar, &elem))
            fail(SW_ERR_UNSUPPORTED, where + ": unsupported dtype " + e.dtype);
        if (!v["shape"].is_array()) fail(SW_ERR_FORMAT, where + ": shape is not an array");
        uint64_t numel = 1;
        for (const auto &d : v["shape"]) {
            if (!d.is_number_unsigned()) fail(SW_ERR_FORMAT, where + ": shape has a non-integer or negative size");
            const uint64_t n = d.get<uint64_t>();
            if (n != 0 && numel > (uint64_t(1) << 62) / n) fail(SW_ERR_FORMAT, where + ": shape overflows");
            numel *= n;
            e.shape.push_back(static_cast<int64_t>(n));
        }
        const auto &off = v["data_offsets"];
        if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
            fail(SW_ERR_FORMAT, where + ": data_offsets must be two non-negative integers");
        e.begin = off[0].get<uint64_t>();
        e.end = off[1].get<uint64_t>();
        if (e.end < e.begin) fail(SW_ERR_FORMAT, where + ": data_offsets end before they begin");
        if (e.end - e.begin != numel * elem)
            fail(SW_ERR_FORMAT, where + ": data_offsets span " + std::to_string(e.end - e.begin) + " bytes but " +
                                    e.dtype + " " + shape_str(e.shape) + " needs " + std::to_string(numel * elem));
        if (e.end > data_size)
            fail(SW_ERR_FORMAT, where + ": truncated safetensors file (tensor ends at byte " +
                                    std::to_string(e.end) + " of a " + std::to_string(data_size) +
                                    "-byte data section)");
        order.emplace_back(e.begin, name);
        entries_.emplace(name, std::move(e));
    }
    // The offsets must tile the data section: no overlaps, no holes.
    std::sort(order.begin(), order.end(), [&](const auto &a, const auto &b) {
        if (a.first != b.first) return a.first < b.first;
        return entries_.at(a.second).end < entries_.at(b.second).end;
    });
    size_t cursor = 0;
    for (const auto &[begin, name] : order) {
        if (begin != cursor)
            fail(SW_ERR_FORMAT, path + ": tensor " + name + ": data_offsets " + (begin < cursor ? "overlap" : "leave a gap") +
                                    " at byte " + std::to_string(std::min(begin, cursor)));
        cursor = entries_.at(name).end;
    }
    if (cursor != data_size)
        fail(SW_ERR_FORMAT, path + ": data section has " + std::to_string(data_size - cursor) +
                                " bytes that no tensor describes");
}

SafeTensorsFile::~SafeTensorsFile() = default;

size_t SafeTensorsFile::offset(const TensorEntry &e) const {
    return static_cast<size_t>(data_ - static_cast<const uint8_t *>(mapping_->addr)) + e.begin;
}

const TensorEntry &SafeTensorsFile::entry(const std::string &name) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) fail(SW_ERR_NOT_FOUND, path_ + ": missing tensor " + name);
    return it->second;
}

torch::Tensor SafeTensorsFile::load_with(const std::string &name,
                                         const std::function<torch::Tensor(const torch::Tensor &view)> &copy_out) const {
    const TensorEntry &e = entry(name);
    auto view = torch::from_blob(const_cast<uint8_t *>(data_ + e.begin), e.shape, torch::TensorOptions().dtype(e.scalar));
    auto out = copy_out(view);
    const size_t begin = offset(e);
    drop_pages(mapping_->addr, mapping_->size, begin, begin + (e.end - e.begin));
    return out;
}

torch::Tensor SafeTensorsFile::load(const std::string &name) const {
    // clone copies it out of the mapping (and fixes any misalignment of the
    // data section).
    return load_with(name, [](const torch::Tensor &view) { return view.clone(); });
}

torch::Tensor SafeTensorsFile::map_stored(const std::string &name) const {
    const TensorEntry &e = entry(name);
    auto *data = const_cast<uint8_t *>(data_ + e.begin);
    if (reinterpret_cast<uintptr_t>(data) % c10::elementSize(e.scalar) != 0) return torch::Tensor();
    const size_t begin = offset(e), end = begin + (e.end - e.begin);
    return torch::from_blob(
        data, e.shape, [mapping = mapping_, begin, end](void *) { drop_pages(mapping->addr, mapping->size, begin, end); },
        torch::TensorOptions().dtype(e.scalar));
}

torch::Tensor SafeTensorsFile::load(const std::string &name, torch::ScalarType dtype, const torch::Device &device) const {
    const TensorEntry &e = entry(name);
    if (device.is_cpu() && e.scalar == dtype) {
        // Resident now, as a copy would be: the first step does not pay for
        // faulting the weights in. The pages go back with the tensor (a page
        // it shares with a neighbour still in use is read back in from the
        // page cache: the mapping is never written).
        if (auto mapped = map_stored(name); mapped.defined()) {
            const size_t begin = offset(e);
            const auto [lo, hi] = page_range(mapping_->size, begin, begin + (e.end - e.begin));
            if (hi > lo) ::madvise(static_cast<char *>(mapping_->addr) + lo, hi - lo, MADV_POPULATE_READ);
            return mapped;
        }
    }
    return load_with(name, [&](const torch::Tensor &view) {
        return view.scalar_type() == dtype && device.is_cpu() ? view.clone()
                                                               : view.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
    });
}

void write_safetensors(const std::string &path, const std::vector<std::pair<std::string, torch::Tensor>> &tensors,
                       const std::map<std::string, std::string> &metadata) {
    nlohmann::json header = nlohmann::json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    std::vector<torch::Tensor> data;
    size_t offset = 0;
    for (const auto &[name, t] : tensors) {
        auto c = t.detach().to(torch::kCPU).contiguous();
        const size_t n = c.numel() * c.element_size();
        header[name] = {{"dtype", dtype_to_name(c.scalar_type())},
                        {"shape", c.sizes().vec()},
                        {"data_offsets", {offset, offset + n}}};
        offset += n;
        data.push_back(c);
    }
    std::string h = header.dump();
    while ((h.size() + 8) % 8 != 0) h.push_back(' ');  // keep the data section 8-byte aligned
    const std::string tmp = path + ".tmp" + std::to_string(::getpid());
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        if (!out) fail(SW_ERR_IO, tmp + ": cannot create");
        uint64_t len = h.size();
        uint8_t le[8];
        for (int i = 0; i < 8; i++) le[i] = static_cast<uint8_t>(len >> (8 * i));
        out.write(reinterpret_cast<const char *>(le), 8);
        out.write(h.data(), static_cast<std::streamsize>(h.size()));
        for (const auto &c : data)
            out.write(static_cast<const char *>(c.data_ptr()), static_cast<std::streamsize>(c.numel() * c.element_size()));
        out.flush();
        if (!out) {
            std::remove(tmp.c_str());
            fail(SW_ERR_IO, tmp + ": write failed");
        }
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        fail(SW_ERR_IO, path + ": rename: " + std::strerror(errno));
    }
}

}  // namespace sw
