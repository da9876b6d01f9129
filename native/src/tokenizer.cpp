#include "tokenizer.h"

#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

#include <climits>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common.h"

namespace sw {

// The bytes of native/data/clip_merges.txt, embedded by CMake (embed.cmake).
extern const unsigned char kClipMerges[];
extern const std::size_t kClipMerges_size;

namespace {

// transformers' CLIPTokenizer reads at most this many merges (CLIP's own limit).
constexpr size_t kMaxMerges = 49152 - 256 - 2;

std::string utf8(UChar32 c) {
    std::string s;
    icu::UnicodeString(c).toUTF8String(s);
    return s;
}

std::vector<UChar32> code_points(const std::string &s) {
    std::vector<UChar32> out;
    int32_t i = 0;
    const auto *p = reinterpret_cast<const uint8_t *>(s.data());
    const int32_t n = static_cast<int32_t>(s.size());
    while (i < n) {
        UChar32 c;
        U8_NEXT(p, i, n, c);
        if (c < 0) c = 0xFFFD;  // invalid UTF-8 becomes the replacement character
        out.push_back(c);
    }
    return out;
}

// transformers' _is_whitespace / _is_control.
bool is_whitespace(UChar32 c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || u_charType(c) == U_SPACE_SEPARATOR; }

bool is_control(UChar32 c) {
    if (c == '\t' || c == '\n' || c == '\r') return false;
    switch (u_charType(c)) {
        case U_CONTROL_CHAR:
        case U_FORMAT_CHAR:
        case U_UNASSIGNED:
        case U_PRIVATE_USE_CHAR:
        case U_SURROGATE:
            return true;
        default:
            return false;
    }
}

bool is_cjk(UChar32 c) {
    return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
           (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

bool is_letter(UChar32 c) {
    switch (u_charType(c)) {
        case U_UPPERCASE_LETTER:
        case U_LOWERCASE_LETTER:
        case U_TITLECASE_LETTER:
        case U_MODIFIER_LETTER:
        case U_OTHER_LETTER:
            return true;
        default:
            return false;
    }
}

bool is_number(UChar32 c) {
    const auto t = u_charType(c);
    return t == U_DECIMAL_DIGIT_NUMBER || t == U_LETTER_NUMBER || t == U_OTHER_NUMBER;
}

// Python's str.isspace, which the \s of CLIP's pattern follows.
bool is_space(UChar32 c) { return u_isUWhiteSpace(c) || (c >= 0x1C && c <= 0x1F); }

std::vector<std::string> split_on_space(const std::string &s) {
    std::vector<std::string> out;
    std::string cur;
    for (UChar32 c : code_points(s)) {
        if (is_space(c)) {
            if (!cur.empty()) out.push_back(cur);
            cur.clear();
        } else {
            cur += utf8(c);
        }
    }
    if (!cur.empty()) out.push_back(cur);
    return out;
}

}  // namespace

std::string normalize_prompt(const std::string &text) {
    std::string cleaned;
    for (UChar32 c : code_points(text)) {
        if (c == 0 || c == 0xFFFD || is_control(c)) continue;
        if (is_whitespace(c)) {
            cleaned += ' ';
        } else if (is_cjk(c)) {
            cleaned += ' ' + utf8(c) + ' ';
        } else {
            cleaned += utf8(c);
        }
    }
    UErrorCode status = U_ZERO_ERROR;
    const icu::Normalizer2 *nfc = icu::Normalizer2::getNFCInstance(status);
    if (U_FAILURE(status)) fail(SW_ERR_INTERNAL, "ICU NFC normaliser unavailable");
    icu::UnicodeString u = nfc->normalize(icu::UnicodeString::fromUTF8(cleaned), status);
    if (U_FAILURE(status)) fail(SW_ERR_INTERNAL, "ICU NFC normalisation failed");
    std::string nfc_text;
    u.toUTF8String(nfc_text);
    std::string out;
    for (const auto &word : split_on_space(nfc_text)) {
        icu::UnicodeString w = icu::UnicodeString::fromUTF8(word);
        w.toLower(icu::Locale::getRoot());
        std::string lower;
        w.toUTF8String(lower);
        // Lower-casing can produce spaces in principle; re-split as transformers does.
        for (const auto &piece : split_on_space(lower)) {
            if (!out.empty()) out += ' ';
            out += piece;
        }
    }
    return out;
}

std::vector<std::string> split_words(const std::string &text) {
    // <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
    static const char *specials[] = {"<|startoftext|>", "<|endoftext|>"};
    static const char *contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
    const auto cps = code_points(text);
    std::vector<std::string> out;
    size_t i = 0;
    auto lower_ascii_at = [&](size_t j) -> int {
        if (j >= cps.size()) return -1;
        UChar32 c = cps[j];
        return (c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c;
    };
    while (i < cps.size()) {
        bool matched = false;
        for (const char *sp : specials) {
            const size_t n = std::char_traits<char>::length(sp);
            bool ok = i + n <= cps.size();
            for (size_t k = 0; ok && k < n; k++) ok = lower_ascii_at(i + k) == sp[k];
            if (ok) {
                out.emplace_back(sp);
                i += n;
                matched = true;
                break;
            }
        }
        if (matched) continue;
        for (const char *ct : contractions) {
            const size_t n = std::char_traits<char>::length(ct);
            bool ok = i + n <= cps.size();
            for (size_t k = 0; ok && k < n; k++) ok = lower_ascii_at(i + k) == ct[k];
            if (ok) {
                std::string s;
                for (size_t k = 0; k < n; k++) s += utf8(cps[i + k]);
                out.push_back(s);
                i += n;
                matched = true;
                break;
            }
        }
        if (matched) continue;
        const UChar32 c = cps[i];
        std::string s;
        if (is_letter(c)) {
            while (i < cps.size() && is_letter(cps[i])) s += utf8(cps[i++]);
        } else if (is_number(c)) {
            s = utf8(cps[i++]);
        } else if (!is_space(c)) {
            while (i < cps.size() && !is_space(cps[i]) && !is_letter(cps[i]) && !is_number(cps[i])) s += utf8(cps[i++]);
        } else {
            i++;
            continue;
        }
        out.push_back(s);
    }
    return out;
}

Tokenizer::Tokenizer(const std::string &dir) : source_(dir) {
    const std::string vocab_path = dir + "/vocab.json";
    const std::string text = read_text_file(vocab_path);
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception &e) {
        fail(SW_ERR_FORMAT, vocab_path + ": bad JSON: " + e.what());
    }
    if (!j.is_object()) fail(SW_ERR_FORMAT, vocab_path + ": not a JSON object");
    for (auto it = j.begin(); it != j.end(); ++it) {
        if (!it->is_number_integer()) fail(SW_ERR_FORMAT, vocab_path + ": id of " + it.key() + " is not an integer");
        vocab_[it.key()] = it->get<int64_t>();
    }
    auto special = [&](const char *name) {
        auto it = vocab_.find(name);
        if (it == vocab_.end()) fail(SW_ERR_FORMAT, vocab_path + ": no " + std::string(name) + " token");
        return it->second;
    };
    bos_ = special("<|startoftext|>");
    eos_ = special("<|endoftext|>");
    unk_ = eos_;
    pad_ = eos_;
    // A tokenizer_config.json may name another pad token (SD 2.x pads with "!").
    const std::string cfg_path = dir + "/tokenizer_config.json";
    if (path_exists(cfg_path)) {
        try {
            auto cfg = nlohmann::json::parse(read_text_file(cfg_path));
            auto token_name = [&](const char *key) -> std::string {
                if (!cfg.contains(key)) return "";
                const auto &v = cfg[key];
                if (v.is_string()) return v.get<std::string>();
                if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
                return "";
            };
            const std::string pad = token_name("pad_token"), unk = token_name("unk_token");
            if (!pad.empty() && vocab_.count(pad)) pad_ = vocab_.at(pad);
            if (!unk.empty() && vocab_.count(unk)) unk_ = vocab_.at(unk);
        } catch (const nlohmann::json::exception &e) {
            fail(SW_ERR_FORMAT, cfg_path + ": bad JSON: " + e.what());
        }
    }

    load_merges(read_text_file(dir + "/merges.txt"), dir + "/merges.txt");
}

Tokenizer::Tokenizer(ClipPad pad) : source_("the built-in CLIP vocabulary") {
    const auto merges = load_merges(std::string(reinterpret_cast<const char *>(kClipMerges), kClipMerges_size), source_);
    // CLIP's rule (simple_tokenizer.py): the byte symbols, the same ending a
    // word, each merge's result in rank order, then the two specials. Later
    // duplicates overwrite earlier ones, as Python's dict(zip(...)) does.
    int64_t id = 0;
    for (int b : byte_order_) vocab_[byte_symbol_[static_cast<size_t>(b)]] = id++;
    for (int b : byte_order_) vocab_[byte_symbol_[static_cast<size_t>(b)] + "</w>"] = id++;
    for (const auto &[a, b] : merges) vocab_[a + b] = id++;
    bos_ = vocab_["<|startoftext|>"] = id++;
    eos_ = vocab_["<|endoftext|>"] = id++;
    unk_ = eos_;
    pad_ = pad == ClipPad::Exclamation ? vocab_.at("!") : eos_;
}

std::vector<std::pair<std::string, std::string>> Tokenizer::load_merges(const std::string &text, const std::string &source) {
    std::vector<std::pair<std::string, std::string>> merges;
    std::istringstream in(text);
    std::string line;
    size_t line_no = 0;
    while (std::getline(in, line)) {
        line_no++;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line_no == 1 && line.rfind("#version", 0) == 0) continue;
        if (line.empty()) continue;
        if (merges.size() >= kMaxMerges) break;
        const auto sp = line.find(' ');
        if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos)
            fail(SW_ERR_FORMAT, source + ":" + std::to_string(line_no) + ": want two symbols separated by a space");
        merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
    }
    // A repeated merge keeps its last rank, as transformers' dict(zip(...)) does.
    for (size_t i = 0; i < merges.size(); i++) ranks_[merges[i]] = i;

    // CLIP's bytes_to_unicode: printable bytes map to themselves and come
    // first; the rest map to 256, 257, ... in byte order.
    byte_symbol_.assign(256, "");
    byte_order_.clear();
    std::vector<bool> printable(256, false);
    for (int b = '!'; b <= '~'; b++) printable[b] = true;
    for (int b = 0xA1; b <= 0xAC; b++) printable[b] = true;
    for (int b = 0xAE; b <= 0xFF; b++) printable[b] = true;
    for (int b = 0; b < 256; b++)
        if (printable[b]) byte_order_.push_back(b);
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        if (!printable[b]) byte_order_.push_back(b);
        byte_symbol_[b] = utf8(printable[b] ? b : 256 + extra++);
    }
    return merges;
}

std::vector<std::string> Tokenizer::bpe(const std::string &token) const {
    // token is a word already mapped byte-by-byte to symbols; split it into
    // those symbols (code points), marking the last as word-final.
    std::vector<std::string> word;
    for (UChar32 c : code_points(token)) word.push_back(utf8(c));
    if (word.empty()) return {};
    word.back() += "</w>";
    while (word.size() > 1) {
        size_t best_rank = SIZE_MAX;
        std::pair<std::string, std::string> best;
        for (size_t i = 0; i + 1 < word.size(); i++) {
            auto it = ranks_.find({word[i], word[i + 1]});
            if (it != ranks_.end() && it->second < best_rank) {
                best_rank = it->second;
                best = it->first;
            }
        }
        if (best_rank == SIZE_MAX) break;
        std::vector<std::string> merged;
        for (size_t i = 0; i < word.size();) {
            if (i + 1 < word.size() && word[i] == best.first && word[i + 1] == best.second) {
                merged.push_back(best.first + best.second);
                i += 2;
            } else {
                merged.push_back(word[i]);
                i++;
            }
        }
        word.swap(merged);
    }
    return word;
}

std::vector<std::string> Tokenizer::tokens(const std::string &text) const {
    std::vector<std::string> out;
    for (const auto &w : split_words(normalize_prompt(text))) {
        std::string mapped;
        for (unsigned char b : w) mapped += byte_symbol_[b];
        for (auto &t : bpe(mapped)) out.push_back(std::move(t));
    }
    return out;
}

std::vector<int64_t> Tokenizer::encode(const std::string &text) const {
    std::vector<int64_t> ids;
    for (const auto &t : tokens(text)) {
        auto it = vocab_.find(t);
        ids.push_back(it == vocab_.end() ? unk_ : it->second);
    }
    return ids;
}

std::vector<int64_t> Tokenizer::encode_padded(const std::string &text, size_t length) const {
    auto ids = encode(text);
    if (length < 2) fail(SW_ERR_INVALID_ARGUMENT, "token length must be at least 2");
    if (ids.size() > length - 2) ids.resize(length - 2);
    std::vector<int64_t> out;
    out.reserve(length);
    out.push_back(bos_);
    out.insert(out.end(), ids.begin(), ids.end());
    out.push_back(eos_);
    while (out.size() < length) out.push_back(pad_);
    return out;
}

}  // namespace sw
