//! Streaming detokenizer: turns generated ids into text one id at a time.
//!
//! Owns a small byte buffer only. A byte-level token can end in the middle of a UTF-8
//! character (emoji and CJK are often split over 2-4 tokens), so bytes that do not yet form
//! a complete character are held back until the next token completes them.
//!
//! ```text
//!   push(id) ──► pending bytes += piece(id) ──► emit longest valid UTF-8 prefix
//!                                              (invalid bytes → U+FFFD, exactly as
//!                                               String::from_utf8_lossy would)
//!   finish() ──► emit what is left, lossily
//! ```
//!
//! The concatenation of every `push` plus `finish` equals
//! [`Tokenizer::decode`](super::Tokenizer::decode) of the same ids with the same
//! `skip_special`. It does not own the vocabulary (it holds a cheap clone of the tokenizer).

use super::{Tokenizer, TokenizerError};

/// Longest possible UTF-8 encoding of one char, the most bytes we ever hold back.
const MAX_UTF8_CHAR_LEN: usize = 4;

/// Streaming, UTF-8-safe detokenizer for one sequence.
///
/// ```no_run
/// # fn demo(tokenizer: &brigade::tokenizer::Tokenizer, ids: &[u32]) -> Result<String, brigade::tokenizer::TokenizerError> {
/// let mut decoder = brigade::tokenizer::IncrementalDecoder::new(tokenizer, true);
/// let mut text = String::new();
/// for &id in ids {
///     text.push_str(&decoder.push(id)?);
/// }
/// text.push_str(&decoder.finish());
/// # Ok(text) }
/// ```
#[derive(Clone)]
#[allow(missing_debug_implementations)] // holds a whole tokenizer; nothing useful to print
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    /// Bytes of an incomplete trailing UTF-8 character (at most 3).
    pending_bytes: Vec<u8>,
}

impl IncrementalDecoder {
    /// A decoder for one sequence; `skip_special` drops control tokens like `decode` does.
    /// Cloning the tokenizer is cheap (its tables are shared).
    pub fn new(tokenizer: &Tokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer: tokenizer.clone(),
            skip_special,
            pending_bytes: Vec::with_capacity(MAX_UTF8_CHAR_LEN),
        }
    }

    /// Feeds one id and returns only the text it completed (possibly empty).
    ///
    /// Never returns part of a character: trailing bytes of an incomplete UTF-8 sequence are
    /// held until a later `push` or [`finish`](Self::finish).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let piece = self
            .tokenizer
            .piece_bytes(id)
            .ok_or(TokenizerError::TokenIdOutOfRange {
                id,
                vocab_size: self.tokenizer.vocab_size(),
            })?;
        if self.skip_special && self.tokenizer.is_special(id) {
            return Ok(String::new());
        }
        self.pending_bytes.extend_from_slice(piece);
        Ok(self.drain_complete())
    }

    /// Flushes held-back bytes; a dangling partial character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending_bytes).into_owned();
        self.pending_bytes.clear();
        text
    }

    /// Whether bytes of an incomplete character are being held back.
    pub fn has_pending(&self) -> bool {
        !self.pending_bytes.is_empty()
    }

    /// Removes and returns the longest prefix of `pending_bytes` that is final: valid UTF-8,
    /// plus U+FFFD for each invalid sequence, stopping before an incomplete trailing char.
    fn drain_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending_bytes;
        while !rest.is_empty() {
            let err = match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(err) => err,
            };
            let Some((valid, after)) = rest.split_at_checked(err.valid_up_to()) else {
                break; // unreachable: valid_up_to() <= rest.len()
            };
            // `valid` is valid UTF-8 by definition; the lossy conversion borrows it unchanged.
            out.push_str(&String::from_utf8_lossy(valid));
            match err.error_len() {
                // Invalid sequence in the middle: one U+FFFD, as from_utf8_lossy does.
                Some(invalid_len) => {
                    out.push(char::REPLACEMENT_CHARACTER);
                    rest = after.get(invalid_len..).unwrap_or_default();
                }
                // Incomplete char at the end: hold it back.
                None => {
                    rest = after;
                    break;
                }
            }
        }
        let num_consumed = self.pending_bytes.len() - rest.len();
        self.pending_bytes.drain(..num_consumed);
        debug_assert!(self.pending_bytes.len() < MAX_UTF8_CHAR_LEN);
        out
    }
}
