// The CLIP byte-level BPE tokenizer (transformers' CLIPTokenizer without ftfy):
// vocab.json + merges.txt, text normalisation, CLIP's pre-tokenizing pattern,
// BPE by merge rank, BOS/EOS, truncation and padding.
#pragma once

#include <map>
#include <string>
#include <unordered_map>
#include <vector>

namespace sw {

class Tokenizer {
public:
    // Loads dir/vocab.json and dir/merges.txt.
    explicit Tokenizer(const std::string &dir);

    // BPE ids of text, without BOS/EOS, untruncated.
    std::vector<int64_t> encode(const std::string &text) const;
    // BOS + the first length-2 ids + EOS, padded with the pad id to length.
    std::vector<int64_t> encode_padded(const std::string &text, size_t length = 77) const;
    // The BPE token strings of text (for debugging and tests).
    std::vector<std::string> tokens(const std::string &text) const;

    int64_t bos() const { return bos_; }
    int64_t eos() const { return eos_; }
    int64_t pad() const { return pad_; }
    size_t vocab_size() const { return vocab_.size(); }
    int64_t max_id() const { return max_id_; }

private:
    std::vector<std::string> bpe(const std::string &word) const;
    std::unordered_map<std::string, int64_t> vocab_;
    std::map<std::pair<std::string, std::string>, size_t> ranks_;
    std::vector<std::string> byte_symbol_;  // byte -> its printable UTF-8 symbol
    int64_t bos_ = 0, eos_ = 0, pad_ = 0, unk_ = 0, max_id_ = 0;
    std::string dir_;
};

// normalize_prompt applies transformers' BasicTokenizer fallback: control
// characters dropped, whitespace unified, CJK ideographs spaced, NFC,
// whitespace split, lower-cased, joined with single spaces.
std::string normalize_prompt(const std::string &text);

// split_words applies CLIP's pattern to normalised text.
std::vector<std::string> split_words(const std::string &text);

}  // namespace sw
