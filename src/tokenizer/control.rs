//! Where control-token strings (`<|im_start|>`, `<|endoftext|>`, ...) occur in text.
//!
//! Owns the matcher of added-token strings only; it does not encode. The tokenizer builds
//! two: one of the control (and unknown-type) tokens, split out of text only with
//! `parse_special`, and one of the user-defined tokens, always split out. The matcher is built
//! the way Hugging Face `tokenizers`' `AddedVocabulary` builds its split trie for the
//! non-normalized (special) added tokens: an Aho-Corasick automaton with leftmost-longest
//! matching. So splitting a text at [`ControlTokens::find_matches`] and encoding the pieces
//! in between as plain text gives exactly the ids that encoding the whole text with
//! `parse_special = true` gives; [`super::Tokenizer::encode_chat`] relies on this to parse
//! control tokens only in the text a chat template wrote itself.

use std::collections::HashSet;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

use super::TokenizerError;

/// One occurrence of a control-token string: byte range `start..end` and the token's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ControlMatch {
    /// First byte of the match.
    pub(crate) start: usize,
    /// One past its last byte.
    pub(crate) end: usize,
    /// Id of the matched control token.
    pub(crate) id: u32,
    /// Whitespace right after the token is dropped (the token's `rstrip` attribute).
    pub(crate) rstrip: bool,
}

/// Leftmost-longest matcher of the vocabulary's control-token strings.
pub(crate) struct ControlTokens {
    /// `None` when the vocabulary has no (non-empty) control token.
    matcher: Option<AhoCorasick>,
    /// Id of each pattern, in pattern order.
    ids: Vec<u32>,
    /// `rstrip` attribute of each pattern, in pattern order.
    rstrip: Vec<bool>,
    /// String of each pattern, in pattern order.
    strs: Vec<String>,
}

impl ControlTokens {
    /// Builds the matcher from `(string, id, rstrip)` triples. Empty strings are ignored
    /// and a string given twice keeps its first id (as `tokenizers` does).
    pub(crate) fn new<'a>(
        tokens: impl IntoIterator<Item = (&'a str, u32, bool)>,
    ) -> Result<Self, TokenizerError> {
        let mut seen = HashSet::new();
        let mut ids = Vec::new();
        let mut strs = Vec::new();
        let mut rstrip = Vec::new();
        for (token, id, strip) in tokens {
            if !token.is_empty() && seen.insert(token) {
                strs.push(token.to_owned());
                ids.push(id);
                rstrip.push(strip);
            }
        }
        let matcher = if strs.is_empty() {
            None
        } else {
            let automaton = AhoCorasickBuilder::new()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&strs)
                .map_err(|err| TokenizerError::Build(Box::new(err)))?;
            Some(automaton)
        };
        Ok(Self {
            matcher,
            ids,
            rstrip,
            strs,
        })
    }

    /// Appends the leftmost-longest, non-overlapping matches inside `text`, with byte
    /// offsets shifted by `offset` (the position of `text` in a larger string).
    pub(crate) fn find_matches(&self, text: &str, offset: usize, out: &mut Vec<ControlMatch>) {
        let Some(matcher) = &self.matcher else {
            return;
        };
        for found in matcher.find_iter(text) {
            let pattern = found.pattern().as_usize();
            if let (Some(&id), Some(&rstrip)) = (self.ids.get(pattern), self.rstrip.get(pattern)) {
                out.push(ControlMatch {
                    start: offset + found.start(),
                    end: offset + found.end(),
                    id,
                    rstrip,
                });
            }
        }
    }

    /// The first control-token string found in `text`, if any.
    pub(crate) fn first_in(&self, text: &str) -> Option<&str> {
        let found = self.matcher.as_ref()?.find(text)?;
        self.strs
            .get(found.pattern().as_usize())
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(control: &ControlTokens, text: &str) -> Vec<(usize, usize, u32)> {
        let mut out = Vec::new();
        control.find_matches(text, 10, &mut out);
        out.into_iter().map(|m| (m.start, m.end, m.id)).collect()
    }

    #[test]
    fn leftmost_longest_like_tokenizers() {
        let control = ControlTokens::new([
            ("<a>", 1, false),
            ("<a><b>", 2, false),
            ("b>", 3, false),
            ("", 4, false),
            ("<a>", 5, false),
        ])
        .unwrap();
        // The longest match at the leftmost start wins; `b>` inside it is not reported.
        assert_eq!(
            matches(&control, "x<a><b>y<a>"),
            vec![(11, 17, 2), (18, 21, 1)]
        );
        assert_eq!(control.first_in("zz b> <a>"), Some("b>"));
        assert_eq!(control.first_in("plain"), None);
    }

    #[test]
    fn no_control_tokens_matches_nothing() {
        let control = ControlTokens::new([("", 0, false)]).unwrap();
        assert!(matches(&control, "<|im_start|>").is_empty());
        assert_eq!(control.first_in("<|im_start|>"), None);
    }
}
