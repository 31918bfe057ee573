//! The vocabulary's storage: token strings in id order, the string → id index over them,
//! and each token's raw bytes.
//!
//! Owns storage and lookup only; what a token's bytes are (byte-level, `▁` as a space, a
//! `<0xXX>` byte) is decided by the caller. Built once per model load, so it is laid out
//! for a fast build and a small footprint at 262,144 tokens (Gemma 3):
//!
//! - [`TokenIds`] indexes the strings it owns by id: a `hashbrown` table of `u32` ids,
//!   hashed by their strings, instead of a map that keeps a second copy of every string
//!   (no per-token allocation, a 4-byte slot per token, one string compare per hit);
//! - [`Pieces`] keeps every token's bytes in one buffer with end offsets (one allocation
//!   instead of one per token).

use std::hash::{BuildHasher, RandomState};

use hashbrown::hash_table::{Entry, HashTable};

/// Token strings in id order and the id of each string (the first id of a string that
/// appears more than once).
pub(crate) struct TokenIds {
    /// Token strings, in id order.
    tokens: Vec<String>,
    /// Ids, hashed by `tokens[id]` with `hasher`.
    table: HashTable<u32>,
    hasher: RandomState,
    /// Ids whose string an earlier id already has.
    num_duplicates: usize,
}

impl TokenIds {
    /// Indexes `tokens` (at most `u32::MAX + 1` of them; the caller checks).
    pub(crate) fn new(tokens: Vec<String>) -> Self {
        let hasher = RandomState::new();
        let mut table = HashTable::with_capacity(tokens.len());
        let mut num_duplicates = 0;
        let rehash = |id: &u32| {
            tokens
                .get(*id as usize)
                .map_or(0, |t| hasher.hash_one(t.as_str()))
        };
        for (id, token) in (0u32..).zip(&tokens) {
            let hash = hasher.hash_one(token.as_str());
            let same = |other: &u32| tokens.get(*other as usize) == Some(token);
            match table.entry(hash, same, rehash) {
                Entry::Occupied(_) => num_duplicates += 1,
                Entry::Vacant(slot) => {
                    slot.insert(id);
                }
            }
        }
        Self {
            tokens,
            table,
            hasher,
            num_duplicates,
        }
    }

    /// The id of `token`, if it is in the vocabulary.
    pub(crate) fn get(&self, token: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(token);
        self.table
            .find(hash, |id| {
                self.tokens
                    .get(*id as usize)
                    .is_some_and(|t| t.as_str() == token)
            })
            .copied()
    }

    /// Whether `token` is in the vocabulary.
    pub(crate) fn contains(&self, token: &str) -> bool {
        self.get(token).is_some()
    }

    /// The token strings, in id order.
    pub(crate) fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// How many ids repeat an earlier id's string.
    pub(crate) fn num_duplicates(&self) -> usize {
        self.num_duplicates
    }

    /// `(string, id)` for each distinct string, with its first id.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&str, u32)> {
        (0u32..)
            .zip(&self.tokens)
            .filter(|(id, token)| self.get(token) == Some(*id))
            .map(|(id, token)| (token.as_str(), id))
    }
}

/// The raw bytes of every token, in id order, in one buffer.
#[derive(Default)]
pub(crate) struct Pieces {
    bytes: Vec<u8>,
    /// `ends[id]`: one past the last byte of token `id` in `bytes`.
    ends: Vec<usize>,
}

impl Pieces {
    /// Empty, with room for `num_tokens` tokens of about `num_bytes` bytes in all.
    pub(crate) fn with_capacity(num_tokens: usize, num_bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(num_bytes),
            ends: Vec::with_capacity(num_tokens),
        }
    }

    /// Appends the next token's bytes: what `write` pushes onto the buffer.
    pub(crate) fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.bytes);
        self.ends.push(self.bytes.len());
    }

    /// The bytes of token `id` (`None` past the last token).
    pub(crate) fn get(&self, id: usize) -> Option<&[u8]> {
        let end = *self.ends.get(id)?;
        let start = match id.checked_sub(1) {
            Some(prev) => *self.ends.get(prev)?,
            None => 0,
        };
        self.bytes.get(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_id_of_a_repeated_string_wins() {
        let ids = TokenIds::new(["a", "b", "a", "", "c"].map(String::from).to_vec());
        assert_eq!(ids.get("a"), Some(0));
        assert_eq!(ids.get("b"), Some(1));
        assert_eq!(ids.get(""), Some(3));
        assert_eq!(ids.get("c"), Some(4));
        assert_eq!(ids.get("d"), None);
        assert!(ids.contains("c") && !ids.contains("ab"));
        assert_eq!(ids.num_duplicates(), 1);
        assert_eq!(ids.tokens().len(), 5);
        let entries: Vec<(&str, u32)> = ids.entries().collect();
        assert_eq!(entries, vec![("a", 0), ("b", 1), ("", 3), ("c", 4)]);
    }

    #[test]
    fn pieces_keep_each_tokens_bytes() {
        let mut pieces = Pieces::with_capacity(3, 4);
        pieces.push_with(|b| b.extend_from_slice(b"ab"));
        pieces.push_with(|_| {});
        pieces.push_with(|b| b.push(0xff));
        assert_eq!(pieces.get(0), Some(&b"ab"[..]));
        assert_eq!(pieces.get(1), Some(&b""[..]));
        assert_eq!(pieces.get(2), Some(&[0xff][..]));
        assert_eq!(pieces.get(3), None);
    }
}
