// The CLIP byte-level BPE tokenizer (transformers' CLIPTokenizer without ftfy):
// vocab.json + merges.txt, text normalisation, CLIP's pre-tokenizing pattern,
// BPE by merge rank, BOS/EOS, truncation and padding. OpenAI CLIP's own
// vocabulary is built into the library (native/data/clip_merges.txt).
#pragma once

#include <map>
#include <string>
#include <unordered_map>
#include <vector>

namespace sw {

// What fills the ids after EOS: SD 1.x pads with <|endoftext|>, SD 2.x's
// OpenCLIP text tower with "!" (id 0).
enum class ClipPad { EndOfText, Exclamation };

class Tokenizer {
public:
    // Loads dir/vocab.json and dir/merges.txt.
    explicit Tokenizer(const std::string &dir);
    // OpenAI CLIP's vocabulary (49408 tokens), which every SD 1.x/2.x model
    // uses, from the merges built into the library.
    explicit Tokenizer(ClipPad pad);

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
    const std::unordered_map<std::string, int64_t> &vocab() const { return vocab_; }
    // The tokenizer folder, or a phrase naming the built-in vocabulary (for messages).
    const std::string &source() const { return source_; }

private:
    // Parses merges.txt text (source names it in errors) into ranks_ and
    // returns the merges kept, in order.
    std::vector<std::pair<std::string, std::string>> load_merges(const std::string &text, const std::string &source);
    std::vector<std::string> bpe(const std::string &word) const;
    std::unordered_map<std::string, int64_t> vocab_;
    std::map<std::pair<std::string, std::string>, size_t> ranks_;
    std::vector<std::string> byte_symbol_;  // byte -> its printable UTF-8 symbol
    std::vector<int> byte_order_;           // bytes in CLIP's bytes_to_unicode order (its vocabulary's first 256 ids)
    int64_t bos_ = 0, eos_ = 0, pad_ = 0, unk_ = 0;
    std::string source_;
};

// normalize_prompt applies transformers' BasicTokenizer fallback: control
// characters dropped, whitespace unified, CJK ideographs spaced, NFC,
// whitespace split, lower-cased, joined with single spaces.
std::string normalize_prompt(const std::string &text);

// split_words applies CLIP's pattern to normalised text.
std::vector<std::string> split_words(const std::string &text);

}  // namespace sw
