package models

import (
	"sort"
	"strings"
	"unicode"
)

// ByteUnicode is CLIP's bytes_to_unicode table: every byte maps to a printable
// rune, printable Latin-1 bytes to themselves, the rest to 256 + n. The order
// of Symbols is the order of the first 256 vocabulary entries.
type ByteUnicode struct {
	Rune    [256]rune
	Symbols []string // in vocabulary order
}

// NewByteUnicode builds the table.
func NewByteUnicode() ByteUnicode {
	var t ByteUnicode
	var printable []int
	for b := '!'; b <= '~'; b++ {
		printable = append(printable, int(b))
	}
	for b := '¡'; b <= '¬'; b++ {
		printable = append(printable, int(b))
	}
	for b := '®'; b <= 'ÿ'; b++ {
		printable = append(printable, int(b))
	}
	seen := map[int]bool{}
	for _, b := range printable {
		seen[b] = true
		t.Rune[b] = rune(b)
		t.Symbols = append(t.Symbols, string(rune(b)))
	}
	n := 0
	for b := 0; b < 256; b++ {
		if !seen[b] {
			t.Rune[b] = rune(256 + n)
			t.Symbols = append(t.Symbols, string(rune(256+n)))
			n++
		}
	}
	return t
}

// TrainBPE learns up to merges byte-level BPE merges from text, CLIP style:
// lower-cased words of letters or digits, each ending in "</w>". Ties between
// equally frequent pairs go to the lexically smaller pair, so the result is
// deterministic.
func TrainBPE(text string, merges int) [][2]string {
	bu := NewByteUnicode()
	counts := map[string]int{}
	for _, w := range strings.FieldsFunc(strings.ToLower(text), func(r rune) bool {
		return !unicode.IsLetter(r) && !unicode.IsDigit(r)
	}) {
		counts[w]++
	}
	type word struct {
		syms  []string
		count int
	}
	var words []word
	for w, c := range counts {
		var syms []string
		for _, b := range []byte(w) {
			syms = append(syms, string(bu.Rune[b]))
		}
		syms[len(syms)-1] += "</w>"
		words = append(words, word{syms, c})
	}
	sort.Slice(words, func(i, j int) bool { return strings.Join(words[i].syms, " ") < strings.Join(words[j].syms, " ") })

	var out [][2]string
	for len(out) < merges {
		pairs := map[[2]string]int{}
		for _, w := range words {
			for i := 0; i+1 < len(w.syms); i++ {
				pairs[[2]string{w.syms[i], w.syms[i+1]}] += w.count
			}
		}
		var best [2]string
		bestN := 0
		for p, n := range pairs {
			if n > bestN || (n == bestN && (p[0] < best[0] || (p[0] == best[0] && p[1] < best[1]))) {
				best, bestN = p, n
			}
		}
		if bestN == 0 {
			break
		}
		out = append(out, best)
		joined := best[0] + best[1]
		for wi := range words {
			s := words[wi].syms
			var merged []string
			for i := 0; i < len(s); i++ {
				if i+1 < len(s) && s[i] == best[0] && s[i+1] == best[1] {
					merged = append(merged, joined)
					i++
					continue
				}
				merged = append(merged, s[i])
			}
			words[wi].syms = merged
		}
	}
	return out
}
