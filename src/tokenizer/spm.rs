//! SentencePiece-style (`tokenizer.ggml.model = "llama"`) encoding of one piece of plain
//! text: Llama 2, Mistral, Phi-3, Gemma.
//!
//! Owns the score-based bigram merge only. The caller has already split control and
//! user-defined tokens out of the text, added the space prefix and written spaces as `▁`.
//! This is llama.cpp's `llm_tokenizer_spm`, which is not BPE with merge ranks: it starts
//! from single UTF-8 characters and repeatedly merges the adjacent pair whose concatenation
//! is the vocabulary entry with the highest score (ties: the leftmost pair), until no
//! adjacent pair forms a vocabulary entry. A final piece that is no entry (a character
//! outside the vocabulary) becomes its bytes, as the `<0xXX>` byte tokens.
//!
//! ```text
//!   "▁hello"  ─► ▁ h e l l o ─► ▁ h e ll o ─► ▁ he ll o ─► ▁he llo ─► ▁hello
//!                (each step merges the best-scoring adjacent pair that is a token)
//! ```
//!
//! llama.cpp also keeps a map from merged text back to the pair that formed it, to
//! re-split a final piece that is no entry; every merged piece is an entry by
//! construction, so only single characters can be no entry and that map is never used:
//! it is left out here.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::TokenIds;

/// One candidate merge: symbols `left` and `right` (adjacent), forming an entry with
/// `score`; `num_bytes` tells a stale candidate (one side merged since) from a live one.
#[derive(Debug, Clone, Copy)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    num_bytes: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair. Scores are normalized
    /// at load (no NaN, no -0.0), so `total_cmp` agrees with C++'s `<` on them.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// A run of bytes of the text, linked to its neighbours (`usize::MAX` = none).
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    num_bytes: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

/// The vocabulary data the merge loop reads.
pub(crate) struct SpmModel {
    /// Score of each token, in id order (normalized: NaN → -inf, -0.0 → 0.0).
    scores: Vec<f32>,
    /// Id of the token for each byte value: `<0xXX>`, else the one-byte string.
    byte_ids: [Option<u32>; 256],
    /// Emitted for a byte with no token (llama.cpp aborts there).
    unk: Option<u32>,
}

impl SpmModel {
    /// `scores` one per token (missing scores are 0, as in llama.cpp).
    pub(crate) fn new(
        vocab: &TokenIds,
        mut scores: Vec<f32>,
        num_tokens: usize,
        unk: Option<u32>,
    ) -> Self {
        scores.resize(num_tokens, 0.0);
        for score in &mut scores {
            if score.is_nan() {
                *score = f32::NEG_INFINITY;
            } else if *score == 0.0 {
                *score = 0.0; // -0.0 == 0.0 in llama.cpp's comparison
            }
        }
        let mut byte_ids = [None; 256];
        for (b, slot) in (0u8..=255).zip(byte_ids.iter_mut()) {
            let hex = format!("<0x{b:02X}>");
            *slot = vocab.get(&hex).or_else(|| {
                let one = [b];
                std::str::from_utf8(&one).ok().and_then(|s| vocab.get(s))
            });
        }
        Self {
            scores,
            byte_ids,
            unk,
        }
    }

    /// Appends the ids of `text` (already `▁`-escaped) to `out`.
    pub(crate) fn encode(&self, vocab: &TokenIds, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                num_bytes: c.len_utf8(),
                prev: index.checked_sub(1).unwrap_or(NONE),
                next: index + 1,
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = NONE;
        }
        let mut queue = BinaryHeap::with_capacity(symbols.len());
        for right in 1..symbols.len() {
            self.try_add_bigram(vocab, text, &symbols, right - 1, right, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (Some(&left), Some(&right)) = (symbols.get(bigram.left), symbols.get(bigram.right))
            else {
                continue; // unreachable: indices come from `symbols`
            };
            // One side was merged into something else since this candidate was queued.
            if left.num_bytes == 0
                || right.num_bytes == 0
                || left.num_bytes + right.num_bytes != bigram.num_bytes
            {
                continue;
            }
            // Merge right into left and unlink right.
            if let Some(sym) = symbols.get_mut(bigram.left) {
                sym.num_bytes += right.num_bytes;
                sym.next = right.next;
            }
            if let Some(sym) = symbols.get_mut(bigram.right) {
                sym.num_bytes = 0;
            }
            if let Some(sym) = symbols.get_mut(right.next) {
                sym.prev = bigram.left;
            }
            self.try_add_bigram(vocab, text, &symbols, left.prev, bigram.left, &mut queue);
            self.try_add_bigram(vocab, text, &symbols, bigram.left, right.next, &mut queue);
        }
        let mut index = if symbols.is_empty() { NONE } else { 0 };
        while let Some(sym) = symbols.get(index) {
            let piece = text
                .get(sym.start..sym.start + sym.num_bytes)
                .unwrap_or_default();
            match vocab.get(piece) {
                Some(id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        if let Some(id) = self.byte_ids[usize::from(b)].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            index = sym.next;
        }
    }

    /// Queues the merge of symbols `left` and `right` if their text is a vocabulary entry.
    fn try_add_bigram(
        &self,
        vocab: &TokenIds,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (Some(l), Some(r)) = (symbols.get(left), symbols.get(right)) else {
            return; // NONE on either side
        };
        let num_bytes = l.num_bytes + r.num_bytes;
        let Some(pair) = text.get(l.start..l.start + num_bytes) else {
            return;
        };
        if let Some(id) = vocab.get(pair) {
            if let Some(&score) = self.scores.get(id as usize) {
                queue.push(Bigram {
                    score,
                    left,
                    right,
                    num_bytes,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(entries: &[(&str, f32)]) -> (TokenIds, SpmModel) {
        let vocab = TokenIds::new(entries.iter().map(|(t, _)| (*t).to_owned()).collect());
        let scores = entries.iter().map(|(_, s)| *s).collect();
        let spm = SpmModel::new(&vocab, scores, entries.len(), Some(0));
        (vocab, spm)
    }

    fn encode(vocab: &TokenIds, spm: &SpmModel, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        spm.encode(vocab, text, &mut out);
        out
    }

    #[test]
    fn highest_score_merges_first() {
        // "abc": "ab" (-1) vs "bc" (-0.5): bc wins, then "abc" is not reachable from a+bc.
        let (vocab, spm) = model(&[
            ("<unk>", 0.0),
            ("a", -5.0),
            ("b", -5.0),
            ("c", -5.0),
            ("ab", -1.0),
            ("bc", -0.5),
        ]);
        assert_eq!(encode(&vocab, &spm, "abc"), vec![1, 5]);
    }

    #[test]
    fn ties_merge_leftmost_first() {
        let (vocab, spm) = model(&[("<unk>", 0.0), ("a", -5.0), ("aa", -1.0)]);
        assert_eq!(encode(&vocab, &spm, "aaa"), vec![2, 1]);
    }

    #[test]
    fn unknown_chars_fall_back_to_byte_tokens() {
        let mut entries = vec![("<unk>".to_owned(), 0.0), ("x".to_owned(), -1.0)];
        for b in 0..=255u8 {
            entries.push((format!("<0x{b:02X}>"), 0.0));
        }
        let refs: Vec<(&str, f32)> = entries.iter().map(|(t, s)| (t.as_str(), *s)).collect();
        let (vocab, spm) = model(&refs);
        // 'é' = C3 A9 → <0xC3> <0xA9>, ids 2 + byte.
        assert_eq!(encode(&vocab, &spm, "xé"), vec![1, 2 + 0xC3, 2 + 0xA9]);
        assert!(encode(&vocab, &spm, "").is_empty());
    }

    #[test]
    fn byte_without_token_becomes_unk() {
        let (vocab, spm) = model(&[("<unk>", 0.0), ("x", -1.0)]);
        assert_eq!(encode(&vocab, &spm, "xy"), vec![1, 0]);
    }
}
