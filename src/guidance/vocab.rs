//! Our vocabulary as llguidance sees it: a [`TokTrie`] of every token's raw
//! bytes (byte-level BPE pieces, SentencePiece pieces with `▁` as a space,
//! `<0xNN>` byte-fallback tokens as the byte itself), special (control and
//! unknown-type) tokens as `0xFF` + their text (llguidance's marker, so a
//! grammar can name them as `<|im_end|>` and no text rule ever matches
//! them), and the model's end-of-generation set as the trie's EOS tokens.

use std::sync::Arc;

use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::Tokenizer;

/// [`TokenizerEnv`] over a [`Tokenizer`].
pub(crate) struct Vocab {
    trie: TokTrie,
    tok: Arc<Tokenizer>,
}

impl Vocab {
    /// The environment for `tok`; `None` when the model has no
    /// end-of-generation token (a grammar could then never end a completion).
    pub(crate) fn env(tok: Arc<Tokenizer>) -> Option<TokEnv> {
        let eog: Vec<u32> = tok
            .eog_ids()
            .iter()
            .copied()
            .filter(|&t| (t as usize) < tok.vocab_size())
            .collect();
        let first = *eog.first()?;
        let words: Vec<Vec<u8>> = (0..tok.vocab_size() as u32)
            .map(|id| token_bytes(&tok, id))
            .collect();
        let mut info = TokRxInfo::new(words.len() as u32, first);
        info.tok_bos = tok.bos_id();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eog);
        Some(Arc::new(Self { trie, tok }))
    }
}

/// The trie's bytes for token `id`.
pub(crate) fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    if tok.is_special(id) {
        let name = tok.token_str(id).unwrap_or_default();
        if name.is_empty() {
            return Vec::new();
        }
        let mut b = Vec::with_capacity(name.len() + 1);
        b.push(TokTrie::SPECIAL_TOKEN_MARKER);
        b.extend_from_slice(name.as_bytes());
        return b;
    }
    tok.token_to_piece_bytes(id).unwrap_or_default()
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s)
            .ok()
            .and_then(|t| self.tok.encode(t, false).ok())
        {
            Some(ids) => ids,
            None => self.trie.greedy_tokenize(s),
        }
    }

    /// We never ask llguidance to force tokens (the sampler samples every
    /// token under the mask), so it need not rely on our tokenization.
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}
