// Reading the JSON configs of diffusers / transformers folders.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace sw {

// Bounds of config values. Generous (several times the largest released
// Stable Diffusion), but small enough that no size derived from them overflows
// and no model built from them is absurd before its weights are checked.
constexpr int64_t kMaxWidth = int64_t(1) << 16;  // channels, hidden sizes, embedding dims
constexpr int64_t kMaxBlocks = 8;                // UNet / VAE resolution levels
constexpr int64_t kMaxLayersPerBlock = 16;
constexpr int64_t kMaxLayers = 256;              // text-encoder and transformer layers
constexpr int64_t kMaxHeads = 1024;

// Config wraps one config.json with typed accessors whose errors name the file
// and the key.
class Config {
public:
    Config() = default;
    Config(nlohmann::json j, std::string source) : j_(std::move(j)), source_(std::move(source)) {}
    static Config from_file(const std::string &path);

    const std::string &source() const { return source_; }
    bool has(const std::string &key) const { return j_.contains(key) && !j_[key].is_null(); }
    int64_t integer(const std::string &key) const;
    int64_t integer(const std::string &key, int64_t fallback) const;
    double number(const std::string &key, double fallback) const;
    bool boolean(const std::string &key, bool fallback) const;
    std::string string(const std::string &key, const std::string &fallback) const;
    std::vector<int64_t> integers(const std::string &key) const;
    std::vector<std::string> strings(const std::string &key) const;
    // An int-or-list value expanded to n entries (diffusers accepts both).
    std::vector<int64_t> per_block(const std::string &key, size_t n, int64_t fallback) const;
    const nlohmann::json &json() const { return j_; }

    // An integer in [lo, hi], else SW_ERR_FORMAT naming the file and the key.
    int64_t integer_in(const std::string &key, int64_t fallback, int64_t lo, int64_t hi) const;
    int64_t integer_in(const std::string &key, int64_t lo, int64_t hi) const;
    // A finite number in [lo, hi].
    double number_in(const std::string &key, double fallback, double lo, double hi) const;
    // Fails unless v is in [lo, hi]; what names the value (a key, or key[i]).
    void check_range(const std::string &what, int64_t v, int64_t lo, int64_t hi) const;
    // The error every check reports: the file, the key, and what it must be.
    [[noreturn]] void bad(const std::string &key, const std::string &want) const;

private:
    nlohmann::json j_;
    std::string source_;
};

}  // namespace sw
