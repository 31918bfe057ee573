//! SentencePiece-style (`tokenizer.ggml.model = "llama"`) encoding of one piece of plain
//! text: Llama 2, Mistral, Phi-3, Gemma.
//!
//! Owns the score-based bigram merge and the segmentation of runs of `▁` into the
//! vocabulary's whitespace pieces ([`SpaceRuns`]). The caller has already split control and
//! the other user-defined tokens out of the text, added the space prefix and written spaces
//! as `▁`.
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

use std::cmp::{Ordering, Reverse};
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

/// The whitespace pieces of a SentencePiece vocabulary (user-defined tokens of 2 or more
/// spaces, `▁▁` ... in SentencePiece's own spelling) and how a run of `▁` splits into them:
/// as transformers' tokenizer for Gemma splits it. It makes these pieces BPE tokens ranked
/// by id, ahead of every other token, with a merge for each way of cutting a piece in two,
/// the longer left part first: so a run first becomes whitespace pieces, then the text
/// around it merges on its own. Up to the longest piece a run is one piece.
///
/// ```text
///   ▁×5:  ▁▁ ▁▁ ▁  →  ▁▁ ▁▁▁ (rank of ▁▁▁ < ▁▁▁▁)  →  ▁▁▁▁▁
///   ▁×40 (longest 31):  8×▁5 … → ▁16 ▁24
/// ```
#[derive(Debug, Default)]
pub(crate) struct SpaceRuns {
    /// `ids[n]`: the id of the piece of `n` spaces (none for 0 and 1).
    ids: Vec<Option<u32>>,
}

/// A part of a text that [`SpaceRuns::split`] hands on.
pub(crate) enum RunPiece<'t> {
    /// Text for the bigram merge (it may hold single `▁`).
    Text(&'t str),
    /// A whitespace piece.
    Token(u32),
}

/// The escaped space.
const META: char = '\u{2581}';

impl SpaceRuns {
    /// From `(number of spaces, id)` pairs (lengths below 2 are ignored; the first id of a
    /// length wins).
    pub(crate) fn new(pieces: impl IntoIterator<Item = (usize, u32)>) -> Self {
        let mut ids: Vec<Option<u32>> = Vec::new();
        for (len, id) in pieces {
            if len < 2 {
                continue;
            }
            if ids.len() <= len {
                ids.resize(len + 1, None);
            }
            if let Some(slot @ None) = ids.get_mut(len) {
                *slot = Some(id);
            }
        }
        Self { ids }
    }

    /// Hands `text` (escaped) on as text and whitespace pieces, in order: every run of two
    /// or more `▁` becomes pieces; a `▁` no piece took stays with the text after it.
    pub(crate) fn split<'t>(&self, text: &'t str, mut emit: impl FnMut(RunPiece<'t>)) {
        if self.ids.is_empty() {
            if !text.is_empty() {
                emit(RunPiece::Text(text));
            }
            return;
        }
        let meta_len = META.len_utf8();
        let mut text_start = 0; // start of the text not yet handed on
        let mut rest = text;
        let mut offset = 0;
        while let Some(found) = rest.find(META) {
            let run_start = offset + found;
            let run_chars = rest[found..].chars().take_while(|&c| c == META).count();
            let run_end = run_start + run_chars * meta_len;
            offset = run_end;
            rest = text.get(run_end..).unwrap_or_default();
            if run_chars < 2 {
                continue;
            }
            if let Some(before) = text.get(text_start..run_start).filter(|t| !t.is_empty()) {
                emit(RunPiece::Text(before));
            }
            text_start = run_end;
            let mut at = run_start;
            for len in self.segment(run_chars) {
                match self.ids.get(len).copied().flatten() {
                    Some(id) => emit(RunPiece::Token(id)),
                    // A lone `▁` (no whitespace piece took it): to the text, joining what
                    // follows if it ends the run.
                    None if at + len * meta_len == run_end => text_start = at,
                    None => emit(RunPiece::Text(
                        text.get(at..at + len * meta_len).unwrap_or_default(),
                    )),
                }
                at += len * meta_len;
            }
        }
        if let Some(tail) = text.get(text_start..).filter(|t| !t.is_empty()) {
            emit(RunPiece::Text(tail));
        }
    }

    /// The lengths a run of `len` `▁` splits into (BPE: the merge whose result has the
    /// lowest id first, then the longer left part, then the leftmost).
    fn segment(&self, len: usize) -> Vec<usize> {
        let piece_id = |n: usize| self.ids.get(n).copied().flatten();
        let mut lens = vec![1usize; len];
        let mut next: Vec<usize> = (1..=len).collect();
        let mut prev: Vec<usize> = (0..len).map(|i| i.wrapping_sub(1)).collect();
        // Candidate merges: (id, longer left first, left index, right index, their lengths).
        type Candidate = Reverse<(u32, Reverse<usize>, usize, usize, usize, usize)>;
        let mut queue: BinaryHeap<Candidate> = BinaryHeap::new();
        let candidate = |lens: &[usize], left: usize, right: usize| {
            let (l, r) = (*lens.get(left)?, *lens.get(right)?);
            let id = piece_id(l + r)?;
            Some(Reverse((id, Reverse(l), left, right, l, r)))
        };
        queue.extend((1..len).filter_map(|right| candidate(&lens, right - 1, right)));
        while let Some(Reverse((_, _, left, right, l, r))) = queue.pop() {
            // Stale: a side merged since (lengths only grow; a merged-away symbol is 0).
            if lens.get(left) != Some(&l)
                || lens.get(right) != Some(&r)
                || next.get(left) != Some(&right)
            {
                continue;
            }
            let after = next.get(right).copied().unwrap_or(len);
            if let Some(n) = lens.get_mut(left) {
                *n = l + r;
            }
            if let Some(n) = lens.get_mut(right) {
                *n = 0;
            }
            if let Some(n) = next.get_mut(left) {
                *n = after;
            }
            if let Some(p) = prev.get_mut(after) {
                *p = left;
            }
            let before = prev.get(left).copied().unwrap_or(usize::MAX);
            queue.extend(candidate(&lens, before, left));
            queue.extend(candidate(&lens, left, after));
        }
        lens.into_iter().filter(|&n| n > 0).collect()
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

    /// Gemma 3's whitespace pieces: ids 138.. for 2..=31 spaces.
    fn gemma_runs() -> SpaceRuns {
        SpaceRuns::new((2..=31).map(|n| (n, 136 + n as u32)))
    }

    #[test]
    fn space_runs_split_as_transformers_gemma_tokenizer() {
        // transformers 5.24's tokenizer built from the Gemma 3 GGUF (gemma_tokenizer),
        // `" " * n + "x"`: the run's pieces, as numbers of spaces.
        let runs = gemma_runs();
        for (len, want) in [
            (2, vec![2]),
            (5, vec![5]),
            (31, vec![31]),
            (32, vec![16, 16]),
            (33, vec![16, 17]),
            (40, vec![16, 24]),
            (47, vec![16, 31]),
            (62, vec![16, 16, 30]),
            (63, vec![16, 16, 31]),
            (64, vec![16, 16, 16, 16]),
            (65, vec![16, 16, 16, 17]),
            (100, vec![16, 16, 16, 16, 16, 20]),
        ] {
            assert_eq!(runs.segment(len), want, "{len}");
        }
    }

    fn split(runs: &SpaceRuns, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        runs.split(text, |piece| {
            out.push(match piece {
                RunPiece::Text(t) => format!("text {t}"),
                RunPiece::Token(id) => format!("id {id}"),
            })
        });
        out
    }

    #[test]
    fn space_runs_leave_single_meta_to_the_text() {
        let runs = gemma_runs();
        assert_eq!(split(&runs, "▁a▁▁b▁"), ["text ▁a", "id 138", "text b▁"]);
        assert_eq!(split(&runs, "▁▁▁"), ["id 139"]);
        assert!(split(&runs, "").is_empty());
        // Without a piece of one length, a run may keep a lone `▁`: it joins what follows.
        let sparse = SpaceRuns::new([(2, 7)]);
        assert_eq!(split(&sparse, "x▁▁▁y"), ["text x", "id 7", "text ▁y"]);
        assert_eq!(split(&SpaceRuns::default(), "a▁▁b"), ["text a▁▁b"]);
    }
}
