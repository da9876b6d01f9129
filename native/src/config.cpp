#include "config.h"

#include <cmath>
#include <cstdint>
#include <sstream>

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
    const auto &v = j_[key];
    if (!v.is_number_integer()) bad(key, "an integer");
    // Unsigned values past int64 would wrap to negatives: say what they are.
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) bad(key, "an integer below 2^63");
    return v.get<int64_t>();
}

int64_t Config::integer(const std::string &key, int64_t fallback) const { return has(key) ? integer(key) : fallback; }

double Config::number(const std::string &key, double fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_number()) bad(key, "a number");
    const double v = j_[key].get<double>();
    if (!std::isfinite(v)) bad(key, "a finite number");
    return v;
}

void Config::check_range(const std::string &what, int64_t v, int64_t lo, int64_t hi) const {
    if (v < lo || v > hi)
        bad(what, "between " + std::to_string(lo) + " and " + std::to_string(hi) + " (is " + std::to_string(v) + ")");
}

int64_t Config::integer_in(const std::string &key, int64_t fallback, int64_t lo, int64_t hi) const {
    const int64_t v = integer(key, fallback);
    check_range(key, v, lo, hi);
    return v;
}

int64_t Config::integer_in(const std::string &key, int64_t lo, int64_t hi) const {
    const int64_t v = integer(key);
    check_range(key, v, lo, hi);
    return v;
}

double Config::number_in(const std::string &key, double fallback, double lo, double hi) const {
    const double v = number(key, fallback);
    if (!(v >= lo && v <= hi)) {
        std::ostringstream ss;
        ss << "between " << lo << " and " << hi << " (is " << v << ")";
        bad(key, ss.str());
    }
    return v;
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
