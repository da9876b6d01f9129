// Reading the JSON configs of diffusers / transformers folders.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace sw {

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

private:
    [[noreturn]] void bad(const std::string &key, const std::string &want) const;
    nlohmann::json j_;
    std::string source_;
};

}  // namespace sw
