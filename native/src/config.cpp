#include "config.h"

#include "common.h"

namespace sw {

Config Config::from_file(const std::string &path) {
    const std::string text = read_text_file(path);
    try {
        auto j = nlohmann::json::parse(text);
        if (!j.is_object()) fail(SW_ERR_FORMAT, path + ": not a JSON object");
        return Config(std::move(j), path);
    } catch (const nlohmann::json::exception &e) {
        fail(SW_ERR_FORMAT, path + ": bad JSON: " + e.what());
    }
}

void Config::bad(const std::string &key, const std::string &want) const {
    fail(SW_ERR_FORMAT, source_ + ": \"" + key + "\" must be " + want);
}

int64_t Config::integer(const std::string &key) const {
    if (!has(key)) fail(SW_ERR_FORMAT, source_ + ": missing \"" + key + "\"");
    if (!j_[key].is_number_integer()) bad(key, "an integer");
    return j_[key].get<int64_t>();
}

int64_t Config::integer(const std::string &key, int64_t fallback) const { return has(key) ? integer(key) : fallback; }

double Config::number(const std::string &key, double fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_number()) bad(key, "a number");
    return j_[key].get<double>();
}

bool Config::boolean(const std::string &key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_boolean()) bad(key, "true or false");
    return j_[key].get<bool>();
}

std::string Config::string(const std::string &key, const std::string &fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_string()) bad(key, "a string");
    return j_[key].get<std::string>();
}

std::vector<int64_t> Config::integers(const std::string &key) const {
    if (!has(key)) fail(SW_ERR_FORMAT, source_ + ": missing \"" + key + "\"");
    if (!j_[key].is_array()) bad(key, "a list of integers");
    std::vector<int64_t> out;
    for (const auto &v : j_[key]) {
        if (!v.is_number_integer()) bad(key, "a list of integers");
        out.push_back(v.get<int64_t>());
    }
    return out;
}

std::vector<std::string> Config::strings(const std::string &key) const {
    if (!has(key)) fail(SW_ERR_FORMAT, source_ + ": missing \"" + key + "\"");
    if (!j_[key].is_array()) bad(key, "a list of strings");
    std::vector<std::string> out;
    for (const auto &v : j_[key]) {
        if (!v.is_string()) bad(key, "a list of strings");
        out.push_back(v.get<std::string>());
    }
    return out;
}

std::vector<int64_t> Config::per_block(const std::string &key, size_t n, int64_t fallback) const {
    if (!has(key)) return std::vector<int64_t>(n, fallback);
    if (j_[key].is_number_integer()) return std::vector<int64_t>(n, j_[key].get<int64_t>());
    auto v = integers(key);
    if (v.size() != n) bad(key, "an integer or a list of " + std::to_string(n));
    return v;
}

}  // namespace sw
