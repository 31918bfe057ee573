//! Tokenizer: the model families' tokenizers built from GGUF metadata, chat templates, and
//! a streaming detokenizer.
//!
//! Owns text ⇄ token-id conversion only. It does not decide when generation stops (it only
//! reports [`Tokenizer::eog_ids`]) and does not read files: [`Tokenizer::from_gguf`] is a
//! thin adapter over an already-open [`GgufFile`], and the real work happens in
//! [`Tokenizer::from_spec`] on plain data.
//!
//! ```text
//!   GGUF metadata ──► TokenizerSpec ──► Tokenizer ─┬─ encode / encode_with_bos  (text → ids)
//!   tokenizer.ggml.*                               ├─ encode_chat           (messages → ids)
//!                                                  ├─ decode, IncrementalDecoder (ids → text)
//!   tokenizer.chat_template ──────────────────────►└─ ChatTemplate::render      (messages → text)
//!
//!   encode(text):  split out control tokens (parse_special) ─► split out user-defined
//!                  tokens ─► each remaining piece through the model's encoder:
//!     "gpt2"    byte-level BPE: pre-tokenizer regexes (pre.rs) + merges by rank
//!     "llama"   SentencePiece: space prefix, ' ' → '▁', score-based bigram merges (spm.rs)
//!     "gemma4"  SentencePiece-style BPE: ' ' → '▁', newline runs apart, merges by rank,
//!               byte fallback to <0xXX>
//! ```
//!
//! The reference is llama.cpp (`llama-vocab.cpp`): ids equal `llama_tokenize(text,
//! add_special = false, parse_special)` on llama.cpp's own vocabulary test files
//! (`tests/tokenizer_vocab.rs`). BPE words and merges are done by the `tokenizers` crate
//! (the engine behind Hugging Face's fast tokenizers); the SentencePiece merge loop is
//! llama.cpp's, written out in `spm.rs`, because BPE-with-merges does not reproduce it.
//! Decoding is done here, from each token's raw bytes, so that [`IncrementalDecoder`] and
//! [`Tokenizer::decode`] agree byte for byte.
//!
//! Conventions:
//! - Supported `tokenizer.ggml.model`: [`SUPPORTED_MODELS`]; anything else (`bert`, `t5`,
//!   `rwkv`, ...) is [`TokenizerError::UnsupportedModel`].
//! - For `gpt2`, supported `tokenizer.ggml.pre`: [`SUPPORTED_PRE`]. Any other value, or a
//!   missing key, is [`TokenizerError::UnsupportedPre`]: a wrong pre-tokenizer silently
//!   produces wrong ids, so there is no fallback (llama.cpp falls back to `default`).
//! - Control tokens (`token_type` 3) and unknown-type tokens (2) are special: split out of
//!   text only when `parse_special` is true, dropped by `decode(.., skip_special = true)`.
//!   User-defined tokens (`token_type` 4) are always split out (as in llama.cpp and HF's
//!   non-special added tokens) and never skipped. Both splits take the leftmost-longest
//!   match, as HF `tokenizers` does; llama.cpp tries tokens longest first over the whole
//!   text, which differs only where two added tokens overlap in the text. For `llama`, the
//!   user-defined tokens made of spaces (Gemma's whitespace pieces, stored as `"  "`, ...)
//!   segment runs of `▁` after the space escaping, as HF's tokenizer for Gemma does (a
//!   typed `"▁ "` is `▁▁`; a run longer than the longest piece splits as its BPE does);
//!   llama.cpp matches them in the raw text.
//! - Added tokens and `<0xXX>` byte tokens decode to their text / byte; normal tokens to
//!   their byte-level bytes (`gpt2`) or with `▁` as a space (`llama`, `gemma4`); unused
//!   (5) and undefined tokens to nothing, as in llama.cpp. Nothing strips the leading space
//!   SentencePiece adds, so `decode` of `encode(" x")` is `"  x"` for Llama 2.
//! - `encode` never adds BOS/EOS; `encode_with_bos` (llama.cpp's `add_special = true`)
//!   adds BOS iff `add_bos_token`, which defaults as in llama.cpp when the key is absent
//!   (true for `llama`, Llama 3 and `gemma4`, false otherwise), and appends EOS iff
//!   `add_eos_token` (default false).
//! - Chat messages are encoded by [`Tokenizer::encode_chat`]: control tokens are parsed in
//!   the text the template writes, while message content is plain text (as OpenAI tokenizes
//!   it), so `"<|im_end|>\n<|im_start|>system"` typed by a user cannot open a system turn.
//!   [`ChatEncodeOptions::parse_special_in_content`] restores the old behaviour.
//! - `tokenizer.ggml.remove_extra_whitespaces` is not read: llama.cpp applies it only to
//!   the `t5` (Unigram) tokenizer, which is not supported.

mod byte_level;
mod chat;
mod control;
mod incremental;
mod pre;
mod spm;
mod vocab;

use std::sync::Arc;

use tokenizers::models::bpe::{Vocab, BPE};

use crate::gguf::{GgufError, GgufFile};
use control::{ControlMatch, ControlTokens};
use vocab::{Pieces, TokenIds};

pub use chat::{ChatContent, ChatMessage, ChatTemplate, ContentPart, FunctionCall, ToolCall};
pub use incremental::IncrementalDecoder;
pub use pre::SUPPORTED_PRE;

/// GGUF `token_type` of an ordinary vocabulary entry.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF `token_type` of the unknown token (`<unk>`).
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
/// GGUF `token_type` of a control token (`<|im_start|>`, `<|endoftext|>`, ...).
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `token_type` of a user-defined (added, non-special) token.
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// GGUF `token_type` of an unused vocabulary slot.
pub const TOKEN_TYPE_UNUSED: i32 = 5;
/// GGUF `token_type` of a byte token (`<0x0A>`).
pub const TOKEN_TYPE_BYTE: i32 = 6;

/// Values of `tokenizer.ggml.model` this module implements.
pub const SUPPORTED_MODELS: &[&str] = &["gpt2", "llama", "gemma4"];

/// Token strings that end a generation turn when present in the vocabulary (besides EOS).
const EOG_TOKEN_STRS: [&str; 8] = [
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|end_of_text|>",
    "<turn|>",
];

/// SentencePiece's visible space, which `llama` and `gemma4` vocabularies write for ' '.
const SPM_SPACE: char = '\u{2581}';

/// Added tokens that keep the whitespace after them under the Phi-3 rule (see
/// [`TokenizerSpec::rstrip_added_tokens`]).
const RSTRIP_EXCEPTIONS: [&str; 3] = ["<unk>", "<s>", "<|endoftext|>"];

/// Everything that can go wrong building or using a [`Tokenizer`] or [`ChatTemplate`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.ggml.model` names a tokenizer family we do not implement.
    #[error("`tokenizer.ggml.model` = {0:?} is not supported (supported: {SUPPORTED_MODELS:?})")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer we cannot reproduce exactly.
    #[error(
        "`tokenizer.ggml.pre` = {0:?} is not supported for BPE (supported: {SUPPORTED_PRE:?})"
    )]
    UnsupportedPre(String),
    /// `tokenizer.ggml.tokens` is empty.
    #[error("`tokenizer.ggml.tokens` is empty")]
    EmptyVocab,
    /// The vocabulary does not fit in `u32` ids.
    #[error("`tokenizer.ggml.tokens` has {num_tokens} entries, more than u32 ids can address")]
    VocabTooLarge {
        /// Number of entries found.
        num_tokens: usize,
    },
    /// `tokenizer.ggml.token_type` is present but not one entry per token.
    #[error("`tokenizer.ggml.token_type` has {got} entries, expected {expected} (one per token)")]
    TokenTypeCount {
        /// Number of tokens.
        expected: usize,
        /// Number of token types.
        got: usize,
    },
    /// `tokenizer.ggml.scores` is present but shorter than the vocabulary.
    #[error(
        "`tokenizer.ggml.scores` has {got} entries, expected at least {expected} (one per token)"
    )]
    ScoreCount {
        /// Number of tokens.
        expected: usize,
        /// Number of scores.
        got: usize,
    },
    /// A merge rule is not `"left right"`.
    #[error("`tokenizer.ggml.merges`[{index}] = {merge:?} is not two space-separated tokens")]
    BadMerge {
        /// Position in the merges array.
        index: usize,
        /// The offending rule.
        merge: String,
    },
    /// A merge rule mentions (or produces) a string that is not in the vocabulary.
    #[error("`tokenizer.ggml.merges`[{index}] = {merge:?} uses {token:?}, which is not in `tokenizer.ggml.tokens`")]
    MergeUnknownToken {
        /// Position in the merges array.
        index: usize,
        /// The offending rule.
        merge: String,
        /// The left part, right part or merged result that is missing.
        token: String,
    },
    /// A special-token id field points past the vocabulary.
    #[error("`tokenizer.ggml.{field}` = {id} is out of range (vocab size {vocab_size})")]
    SpecialIdOutOfRange {
        /// Metadata key suffix, e.g. `bos_token_id`.
        field: &'static str,
        /// The id found.
        id: u32,
        /// Number of tokens.
        vocab_size: usize,
    },
    /// An id passed to `decode` or the incremental decoder is not in the vocabulary.
    #[error("token id {id} is out of range (vocab size {vocab_size})")]
    TokenIdOutOfRange {
        /// The id found.
        id: u32,
        /// Number of tokens.
        vocab_size: usize,
    },
    /// The `tokenizers` crate rejected the configuration (e.g. a bad regex).
    #[error("building tokenizer: {0}")]
    Build(#[source] tokenizers::Error),
    /// The `tokenizers` crate failed while encoding.
    #[error("encoding text: {0}")]
    Encode(#[source] tokenizers::Error),
    /// Reading tokenizer metadata from the GGUF file failed.
    #[error("reading tokenizer metadata: {0}")]
    Gguf(#[from] GgufError),
    /// The chat template fails to parse (the template's own error inside).
    #[error("the chat template failed to parse: {0:#}")]
    TemplateSyntax(#[source] std::sync::Arc<minijinja::Error>),
    /// Rendering the chat template failed (including `raise_exception` from the template).
    #[error("chat template rendering failed: {0:#}")]
    TemplateRender(#[source] minijinja::Error),
    /// A message's content holds control-token text and the chat template changes content
    /// in a way that hides where it lands, so it cannot be kept plain text.
    #[error("`messages[{index}].content` contains the control-token text {token:?}; this model's chat template rewrites message content, so it cannot be kept as plain text: remove it")]
    ControlTokenInContent {
        /// Position of the message in the conversation.
        index: usize,
        /// The control-token string found.
        token: String,
    },
    /// A message's role holds control-token text.
    #[error("`messages[{index}].role` must not contain control-token text, found {token:?}")]
    ControlTokenInRole {
        /// Position of the message in the conversation.
        index: usize,
        /// The control-token string found.
        token: String,
    },
}

impl TokenizerError {
    /// The request field an error is about, in OpenAI's `param` form (`messages[2].content`),
    /// for errors caused by one chat message; `None` for the others.
    pub fn param(&self) -> Option<String> {
        match self {
            Self::ControlTokenInContent { index, .. } => Some(format!("messages[{index}].content")),
            Self::ControlTokenInRole { index, .. } => Some(format!("messages[{index}].role")),
            _ => None,
        }
    }
}

/// How [`Tokenizer::encode_chat`] renders and encodes a conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChatEncodeOptions {
    /// Let the template append the header that opens the assistant's turn.
    pub add_generation_prompt: bool,
    /// Add the vocabulary's special tokens as [`Tokenizer::encode_with_bos`] does: BOS in
    /// front iff `add_bos_token`, EOS at the end iff `add_eos_token` (llama.cpp's
    /// `add_special`).
    pub with_bos: bool,
    /// Parse control-token text inside message content and roles as control tokens, as
    /// before; unsafe with untrusted users (`[tokenizer] parse_special_in_content`).
    pub parse_special_in_content: bool,
}

/// Plain-data description of a tokenizer, as stored under `tokenizer.ggml.*` in GGUF.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerSpec {
    /// Vocabulary in id order, as stored (byte-level spelled `Ġ` = space for `gpt2`,
    /// `▁` = space for `llama` / `gemma4`).
    pub tokens: Vec<String>,
    /// GGUF token types, one per token (1 normal, 2 unknown, 3 control, 4 user-defined,
    /// 5 unused, 6 byte); empty means all normal.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores` (`llama` only): merge priority of each token; empty means
    /// all 0, as in llama.cpp.
    pub scores: Vec<f32>,
    /// BPE merge rules `"left right"`, highest priority first (`gpt2`, `gemma4`).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.model`; one of [`SUPPORTED_MODELS`].
    pub model: String,
    /// `tokenizer.ggml.pre`; for `gpt2` one of [`SUPPORTED_PRE`], ignored otherwise.
    pub pre: String,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`: emitted (`llama`) for a byte that has no token.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (llama.cpp's default when absent, see the module doc).
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token` (default false): `encode_with_bos` appends EOS.
    pub add_eos: bool,
    /// `tokenizer.ggml.add_space_prefix` (`llama` only; default true): a space is put in
    /// front of the text, and of the text after each added token, before encoding.
    pub add_space_prefix: bool,
    /// Whitespace right after an added token (control, unknown, user-defined, and `</s>`)
    /// is dropped, except after `<unk>`, `<s>` and `<|endoftext|>`: llama.cpp's rule for
    /// models whose `general.name` contains `phi-3` / `phi3` (their `tokenizer.json` has
    /// `rstrip` on those tokens).
    pub rstrip_added_tokens: bool,
    /// `tokenizer.chat_template` Jinja source.
    pub chat_template: Option<String>,
}

impl TokenizerSpec {
    /// Reads the spec from GGUF metadata. Required: `tokenizer.ggml.model`, `.tokens`, and
    /// for BPE `.merges` and (`gpt2`) `.pre`; optional: `.token_type`, `.scores`,
    /// `.bos_token_id`, `.eos_token_id`, `.unknown_token_id`, `.add_bos_token`,
    /// `.add_eos_token`, `.add_space_prefix`, `general.name`, `tokenizer.chat_template`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let model = file.get_str("tokenizer.ggml.model")?.to_owned();
        if !SUPPORTED_MODELS.contains(&model.as_str()) {
            // Checked before reading anything else, which other families lay out differently.
            return Err(TokenizerError::UnsupportedModel(model));
        }
        let is_spm = model == "llama";
        let has = |key: &str| file.get(key).is_some();
        let pre = if has("tokenizer.ggml.pre") {
            file.get_str("tokenizer.ggml.pre")?.to_owned()
        } else {
            String::new()
        };
        // For `gpt2` the pre-tokenizer decides the BOS default; an unsupported one is
        // reported here, before the (large) arrays are copied.
        let default_add_bos = match model.as_str() {
            "gpt2" => pre::bpe_pre(&pre)?.default_add_bos,
            _ => true,
        };
        let tokens = to_owned_strings(file.get_str_array("tokenizer.ggml.tokens")?);
        let merges = if is_spm {
            Vec::new()
        } else {
            to_owned_strings(file.get_str_array("tokenizer.ggml.merges")?)
        };
        let token_types = if has("tokenizer.ggml.token_type") {
            file.get_i32_array("tokenizer.ggml.token_type")?
        } else {
            Vec::new()
        };
        let scores = if has("tokenizer.ggml.scores") {
            file.get_f32_array("tokenizer.ggml.scores")?
        } else {
            Vec::new()
        };
        let opt_u32 = |key: &str| -> Result<Option<u32>, TokenizerError> {
            Ok(if has(key) {
                Some(file.get_u32(key)?)
            } else {
                None
            })
        };
        let opt_bool = |key: &str, default: bool| -> Result<bool, TokenizerError> {
            Ok(if has(key) {
                file.get_bool(key)?
            } else {
                default
            })
        };
        // llama.cpp's defaults for SentencePiece vocabularies without the keys.
        let spm_default = |id: u32| (is_spm && (id as usize) < tokens.len()).then_some(id);
        let chat_template = if has("tokenizer.chat_template") {
            Some(file.get_str("tokenizer.chat_template")?.to_owned())
        } else {
            None
        };
        let name = if has("general.name") {
            file.get_str("general.name")?.to_lowercase()
        } else {
            String::new()
        };
        // llama.cpp forces BOS on for gemma4 whatever the key says.
        let add_bos =
            opt_bool("tokenizer.ggml.add_bos_token", default_add_bos)? || model == "gemma4";
        Ok(Self {
            bos: opt_u32("tokenizer.ggml.bos_token_id")?.or(spm_default(1)),
            eos: opt_u32("tokenizer.ggml.eos_token_id")?.or(spm_default(2)),
            unk: opt_u32("tokenizer.ggml.unknown_token_id")?.or(spm_default(0)),
            add_bos,
            add_eos: opt_bool("tokenizer.ggml.add_eos_token", false)?,
            add_space_prefix: is_spm && opt_bool("tokenizer.ggml.add_space_prefix", true)?,
            rstrip_added_tokens: name.contains("phi-3") || name.contains("phi3"),
            tokens,
            token_types,
            scores,
            merges,
            model,
            pre,
            chat_template,
        })
    }
}

fn to_owned_strings(strs: Vec<&str>) -> Vec<String> {
    strs.into_iter().map(str::to_owned).collect()
}

/// Tokenizer of one vocabulary. Cheap to clone (tables are shared), `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
    /// The chat template (the model's, or one set by [`Tokenizer::with_chat_template`]).
    chat_template: Option<ChatTemplate>,
}

/// How a piece of plain text (no added tokens in it) becomes ids.
#[allow(clippy::large_enum_variant)] // one per tokenizer, behind an Arc
enum Encoder {
    /// `gpt2`: byte-level BPE (pre-tokenizer, byte mapping and merges in `tokenizers`).
    ByteLevelBpe(tokenizers::Tokenizer),
    /// `gemma4`: BPE over raw UTF-8 with `▁` for spaces and byte fallback; runs of
    /// newlines are their own words, taken whole when the vocabulary has them.
    SpmBpe(tokenizers::Tokenizer),
    /// `llama`: SentencePiece score-based merges.
    Spm(spm::SpmModel),
}

struct Inner {
    encoder: Encoder,
    /// Control and unknown-type tokens, split out of text with `parse_special = true`.
    control: ControlTokens,
    /// User-defined tokens, always split out of text (but those of
    /// [`Inner::space_runs`]).
    user_defined: ControlTokens,
    /// `llama` (SentencePiece) only: the user-defined tokens made of two or more spaces,
    /// by length, segmenting the runs of `▁` once spaces became `▁` (see
    /// [`Tokenizer::encode_plain`]); empty for the other models.
    space_runs: spm::SpaceRuns,
    /// Vocabulary in id order (as stored) and token string → id (first id for duplicate
    /// strings).
    vocab: TokenIds,
    /// Raw bytes of each token, in id order.
    pieces: Pieces,
    /// GGUF token type of each token.
    token_types: Vec<i32>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    eog_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.inner.bos)
            .field("eos", &self.inner.eos)
            .field("add_bos", &self.inner.add_bos)
            .field("eog_ids", &self.inner.eog_ids)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.*` metadata of an open GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        Self::from_spec(TokenizerSpec::from_gguf(file)?)
    }

    /// Builds the tokenizer from plain data (see [`TokenizerSpec`]).
    ///
    /// A chat template that fails to parse is logged (warn) and kept: plain completion
    /// still works, and rendering it (a chat request) reports the parse error.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Self, TokenizerError> {
        let TokenizerSpec {
            tokens,
            mut token_types,
            scores,
            merges,
            model,
            pre,
            bos,
            eos,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
            rstrip_added_tokens,
            chat_template,
        } = spec;

        if !SUPPORTED_MODELS.contains(&model.as_str()) {
            return Err(TokenizerError::UnsupportedModel(model));
        }
        if tokens.is_empty() {
            return Err(TokenizerError::EmptyVocab);
        }
        let vocab_size = tokens.len();
        if u32::try_from(vocab_size).is_err() {
            return Err(TokenizerError::VocabTooLarge {
                num_tokens: vocab_size,
            });
        }
        if token_types.is_empty() {
            token_types = vec![TOKEN_TYPE_NORMAL; vocab_size];
        } else if token_types.len() != vocab_size {
            return Err(TokenizerError::TokenTypeCount {
                expected: vocab_size,
                got: token_types.len(),
            });
        }
        if !scores.is_empty() && scores.len() < vocab_size {
            return Err(TokenizerError::ScoreCount {
                expected: vocab_size,
                got: scores.len(),
            });
        }
        for (field, id) in [
            ("bos_token_id", bos),
            ("eos_token_id", eos),
            ("unknown_token_id", unk),
        ] {
            if let Some(id) = id {
                if id as usize >= vocab_size {
                    return Err(TokenizerError::SpecialIdOutOfRange {
                        field,
                        id,
                        vocab_size,
                    });
                }
            }
        }

        // Vocab: first occurrence wins for duplicate strings (the later id stays decodable).
        let vocab = TokenIds::new(tokens);
        let num_duplicates = vocab.num_duplicates();
        if num_duplicates > 0 {
            tracing::warn!(
                num_duplicates,
                "tokenizer.ggml.tokens has duplicate strings; encoding uses the first id"
            );
        }

        let encoder = match model.as_str() {
            "llama" => Encoder::Spm(spm::SpmModel::new(&vocab, scores, vocab_size, unk)),
            "gemma4" => {
                let bpe = BPE::builder()
                    .vocab_and_merges(bpe_vocab(&vocab), parse_merges(&merges, &vocab)?)
                    .byte_fallback(true)
                    .build()
                    .map_err(TokenizerError::Build)?;
                Encoder::SpmBpe(tokenizers::Tokenizer::new(bpe))
            }
            _ => {
                let pre = pre::bpe_pre(&pre)?;
                let bpe = BPE::builder()
                    .vocab_and_merges(bpe_vocab(&vocab), parse_merges(&merges, &vocab)?)
                    .ignore_merges(pre.ignore_merges)
                    .build()
                    .map_err(TokenizerError::Build)?;
                let mut hf = tokenizers::Tokenizer::new(bpe);
                hf.with_pre_tokenizer(Some(pre.pre_tokenizer));
                Encoder::ByteLevelBpe(hf)
            }
        };

        let rstrip = |token: &str| rstrip_added_tokens && !RSTRIP_EXCEPTIONS.contains(&token);
        let tokens = vocab.tokens();
        let added = |wanted: &'static [i32]| {
            (0u32..)
                .zip(tokens.iter().zip(&token_types))
                .filter(move |(_, (_, ty))| wanted.contains(ty))
                .map(move |(id, (token, _))| (token.as_str(), id, rstrip(token)))
        };
        let control = ControlTokens::new(added(&[TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN]))?;
        // A GGUF spells SentencePiece's whitespace pieces with spaces (Gemma's `"  "` ...
        // are `▁▁` ...), and SentencePiece and transformers' tokenizer for Gemma find them in
        // the text once spaces are `▁`. transformers respells them `▁▁`, `▁▁▁`, ... as pieces
        // that merge (BPE, by id) before every other piece: a run of up to 31 `▁` (Gemma's
        // longest) is one piece, a longer one splits as that BPE splits it (40 → 16 + 24).
        // We do the same (`spm::SpaceRuns`). llama.cpp matches them in the raw text, longest
        // first: the same ids, but where a typed `▁` touches a space (`"▁ "` is `▁▁` here,
        // `▁` + `▁…` in llama.cpp) and on runs longer than the longest piece (31 + 9).
        let space_run =
            |token: &str| model == "llama" && token.len() >= 2 && token.bytes().all(|b| b == b' ');
        // Phi-3 marks `</s>` as user-defined, with rstrip (llama.cpp sets it by name).
        let user_defined = ControlTokens::new(
            added(&[TOKEN_TYPE_USER_DEFINED])
                .filter(|(token, _, _)| !space_run(token))
                .map(|(token, id, strip)| {
                    (token, id, strip || (rstrip_added_tokens && token == "</s>"))
                }),
        )?;
        let space_runs = spm::SpaceRuns::new(
            added(&[TOKEN_TYPE_USER_DEFINED])
                .filter(|(token, _, _)| space_run(token))
                .map(|(token, id, _)| (token.len(), id)),
        );

        let byte_level = model == "gpt2";
        let num_bytes = tokens.iter().map(String::len).sum();
        let mut pieces = Pieces::with_capacity(vocab_size, num_bytes);
        for (token, &ty) in tokens.iter().zip(&token_types) {
            pieces.push_with(|out| push_piece_bytes(out, token, ty, byte_level));
        }

        let mut eog_ids: Vec<u32> = eos.into_iter().collect();
        for s in EOG_TOKEN_STRS {
            if let Some(id) = vocab.get(s) {
                if !eog_ids.contains(&id) {
                    eog_ids.push(id);
                }
            }
        }

        let token_string = |id: Option<u32>| id.and_then(|id| tokens.get(id as usize)).cloned();
        let chat_template = match chat_template {
            None => None,
            Some(source) => {
                let template = ChatTemplate::compile(&source, token_string(bos), token_string(eos));
                if let Some(err) = template.parse_error() {
                    tracing::warn!(error = %format!("{err:#}"), "tokenizer.chat_template failed to parse; chat requests will fail with this error");
                }
                Some(template)
            }
        };

        Ok(Self {
            inner: Arc::new(Inner {
                encoder,
                control,
                user_defined,
                space_runs,
                vocab,
                pieces,
                token_types,
                bos,
                eos,
                add_bos,
                add_eos,
                add_space_prefix,
                eog_ids,
            }),
            chat_template,
        })
    }

    /// Encodes `text` without BOS/EOS. With `parse_special`, control-token strings in the
    /// text (e.g. `<|im_start|>`) become their single ids; without, they are plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut control_matches = Vec::new();
        if parse_special {
            self.inner
                .control
                .find_matches(text, 0, &mut control_matches);
        }
        self.encode_split(text, &control_matches)
    }

    /// Encodes `text` with the control tokens at `control_matches` (in order, not
    /// overlapping) and every other part as plain text.
    fn encode_split(
        &self,
        text: &str,
        control_matches: &[ControlMatch],
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + control_matches.len() + 1);
        // SentencePiece puts a space in front of the text and after each added token.
        let mut after_added = true;
        for_each_fragment(text, control_matches, |fragment| match fragment {
            Fragment::Text(piece) => self.encode_user_defined(piece, &mut after_added, &mut out),
            Fragment::Token(id) => {
                out.push(id);
                after_added = true;
                Ok(())
            }
        })?;
        Ok(out)
    }

    /// Encodes text with no control tokens in it: user-defined tokens split out, the rest
    /// through the model's encoder. `after_added`: the previous piece was an added token
    /// (or this is the start), for SentencePiece's space prefix.
    fn encode_user_defined(
        &self,
        text: &str,
        after_added: &mut bool,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut matches = Vec::new();
        self.inner.user_defined.find_matches(text, 0, &mut matches);
        for_each_fragment(text, &matches, |fragment| match fragment {
            Fragment::Text(piece) => self.encode_plain(piece, after_added, out),
            Fragment::Token(id) => {
                out.push(id);
                *after_added = true;
                Ok(())
            }
        })
    }

    /// Encodes text with no added tokens in it (nothing for empty text); for `llama`, the
    /// whitespace pieces are split out of it once spaces are `▁` ([`spm::SpaceRuns`]).
    fn encode_plain(
        &self,
        text: &str,
        after_added: &mut bool,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        if text.is_empty() {
            return Ok(());
        }
        let prefix_space = std::mem::replace(after_added, false) && self.inner.add_space_prefix;
        let hf_encode = |hf: &tokenizers::Tokenizer, text: &str, out: &mut Vec<u32>| {
            let encoding = hf
                .encode_fast(text, false)
                .map_err(TokenizerError::Encode)?;
            out.extend_from_slice(encoding.get_ids());
            Ok::<(), TokenizerError>(())
        };
        match &self.inner.encoder {
            Encoder::ByteLevelBpe(hf) => hf_encode(hf, text, out)?,
            Encoder::Spm(spm) => {
                let mut escaped = String::with_capacity(text.len() + 3 * (text.len() / 4 + 1));
                if prefix_space {
                    escaped.push(SPM_SPACE);
                }
                escaped.extend(text.chars().map(|c| if c == ' ' { SPM_SPACE } else { c }));
                let vocab = &self.inner.vocab;
                self.inner.space_runs.split(&escaped, |piece| match piece {
                    spm::RunPiece::Text(text) => spm.encode(vocab, text, out),
                    spm::RunPiece::Token(id) => out.push(id),
                });
            }
            Encoder::SpmBpe(hf) => {
                let escaped = text.replace(' ', "\u{2581}");
                for run in newline_runs(&escaped) {
                    let whole = run
                        .starts_with('\n')
                        .then(|| self.inner.vocab.get(run))
                        .flatten();
                    match whole {
                        Some(id) => out.push(id),
                        None => hf_encode(hf, run, out)?,
                    }
                }
            }
        }
        Ok(())
    }
    /// Like [`encode`](Self::encode), with the special tokens the vocabulary asks for, as
    /// llama.cpp's `add_special = true`: BOS prepended iff `add_bos_token` is set and the
    /// vocabulary has a BOS id, EOS appended iff `add_eos_token` is set and it has an EOS
    /// id.
    pub fn encode_with_bos(
        &self,
        text: &str,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let ids = self.encode(text, parse_special)?;
        Ok(self.add_special_tokens(ids))
    }

    /// `ids` with BOS in front iff `add_bos_token` and EOS at the end iff `add_eos_token`
    /// (each only when the vocabulary has that id).
    fn add_special_tokens(&self, ids: Vec<u32>) -> Vec<u32> {
        let bos = self.inner.bos.filter(|_| self.inner.add_bos);
        let eos = self.inner.eos.filter(|_| self.inner.add_eos);
        if bos.is_none() && eos.is_none() {
            return ids;
        }
        let mut out = Vec::with_capacity(ids.len() + 2);
        out.extend(bos);
        out.extend(ids);
        out.extend(eos);
        out
    }

    /// Renders `messages` with `template` and encodes the prompt.
    ///
    /// Control tokens are parsed only in the text the template writes itself; every message
    /// content is plain text, so a user cannot forge a turn by typing `<|im_end|>`. Where
    /// contents hold no control-token text (and no control token spans a content's edge)
    /// the ids equal `encode(render(..), true)`, what Hugging Face's
    /// `apply_chat_template(tokenize=True)` gives. A template that changes
    /// content beyond trimming it is encoded the old way when no content holds control-token
    /// text, and refused with [`TokenizerError::ControlTokenInContent`] when one does. A role
    /// holding control-token text is refused ([`TokenizerError::ControlTokenInRole`]).
    /// With [`ChatEncodeOptions::parse_special_in_content`] all of this is skipped and the
    /// rendering is encoded with control tokens parsed everywhere.
    pub fn encode_chat(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
        options: ChatEncodeOptions,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_chat_with(template, messages, None, None, options)
    }

    /// [`encode_chat`](Self::encode_chat) with `tools` and extra `template_vars` passed to
    /// the template as [`ChatTemplate::render_with`] takes them (OpenAI's `tools`, vLLM's
    /// `chat_template_kwargs`); with both `None` it is `encode_chat`.
    pub fn encode_chat_with(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        template_vars: Option<&serde_json::Map<String, serde_json::Value>>,
        options: ChatEncodeOptions,
    ) -> Result<Vec<u32>, TokenizerError> {
        let ChatEncodeOptions {
            add_generation_prompt,
            with_bos,
            parse_special_in_content,
        } = options;
        let ids = if parse_special_in_content {
            let text =
                template.render_with(messages, tools, template_vars, add_generation_prompt)?;
            self.encode(&text, true)?
        } else {
            self.encode_chat_plain_content(
                template,
                messages,
                tools,
                template_vars,
                add_generation_prompt,
            )?
        };
        Ok(if with_bos {
            self.add_special_tokens(ids)
        } else {
            ids
        })
    }

    /// [`encode_chat`](Self::encode_chat) without BOS, content as plain text.
    fn encode_chat_plain_content(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        template_vars: Option<&serde_json::Map<String, serde_json::Value>>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let control = &self.inner.control;
        // Templates compare roles and write them beside their own control tokens: a role
        // cannot be located like content, so control-token text there is refused.
        for (index, message) in messages.iter().enumerate() {
            if let Some(token) = control.first_in(&message.role) {
                return Err(TokenizerError::ControlTokenInRole {
                    index,
                    token: token.to_owned(),
                });
            }
        }
        let rendered = template.render_locating_content(
            messages,
            tools,
            template_vars,
            add_generation_prompt,
        )?;
        let Some(content_ranges) = rendered.content_ranges else {
            // Content could not be located: safe to parse the rendering only if no content
            // holds control-token text.
            for (index, message) in messages.iter().enumerate() {
                if let Some(token) = control.first_in(&message.content) {
                    return Err(TokenizerError::ControlTokenInContent {
                        index,
                        token: token.to_owned(),
                    });
                }
            }
            return self.encode(&rendered.text, true);
        };
        let text = rendered.text.as_str();
        // Offsets below come from `content_ranges` and the matcher, so they are in order and
        // on char boundaries; `get` only keeps a broken invariant from panicking.
        let broken = || TokenizerError::Encode("chat content ranges out of order".into());
        // Control tokens lying wholly in the template's own text, between content ranges.
        let mut matches: Vec<ControlMatch> = Vec::new();
        let mut segment_start = 0usize;
        for range in &content_ranges {
            let segment = text.get(segment_start..range.start).ok_or_else(broken)?;
            control.find_matches(segment, segment_start, &mut matches);
            segment_start = range.end;
        }
        let segment = text.get(segment_start..).ok_or_else(broken)?;
        control.find_matches(segment, segment_start, &mut matches);
        // The text between control tokens is encoded as plain text: the pieces
        // `encode(.., true)` would cut the whole text into when contents are plain.
        self.encode_split(text, &matches)
    }

    /// Decodes ids to text (the concatenation of their pieces); invalid UTF-8 becomes
    /// U+FFFD. With `skip_special`, control and unknown-type tokens are dropped. Matches HF
    /// `decode(ids, skip_special_tokens=..)` for byte-level BPE.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let piece = self
                .piece_bytes(id)
                .ok_or(TokenizerError::TokenIdOutOfRange {
                    id,
                    vocab_size: self.vocab_size(),
                })?;
            if !(skip_special && self.is_special(id)) {
                bytes.extend_from_slice(piece);
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Raw bytes of one token (may be part of a UTF-8 char: byte-level pieces and `<0xXX>`
    /// byte tokens), or `None` if `id` is out of range.
    pub fn token_to_piece_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.piece_bytes(id).map(<[u8]>::to_vec)
    }

    /// Borrowed form of [`token_to_piece_bytes`](Self::token_to_piece_bytes).
    pub(crate) fn piece_bytes(&self, id: u32) -> Option<&[u8]> {
        self.inner.pieces.get(id as usize)
    }

    /// Number of tokens (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab.tokens().len()
    }

    /// Beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos
    }

    /// End-of-sequence id, if the model has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.inner.eos
    }

    /// Whether `encode_with_bos` prepends BOS (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos_token(&self) -> bool {
        self.inner.add_bos
    }

    /// Whether `encode_with_bos` appends EOS (`tokenizer.ggml.add_eos_token`).
    pub fn add_eos_token(&self) -> bool {
        self.inner.add_eos
    }

    /// End-of-generation ids: EOS, plus `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`,
    /// `<|eom_id|>`, `<end_of_turn>`, `<|end|>`, `<|end_of_text|>` and `<turn|>` when present
    /// in the vocabulary (no duplicates, EOS first).
    pub fn eog_ids(&self) -> &[u32] {
        &self.inner.eog_ids
    }

    /// Whether `id` is a control or unknown-type token (GGUF `token_type` 3 or 2), the
    /// tokens `decode(.., skip_special = true)` drops. False when out of range.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.inner.token_types.get(id as usize),
            Some(&(TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN))
        )
    }

    /// The vocabulary entry of `id` as stored (e.g. `"Ġthe"`, `"▁the"`).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.inner
            .vocab
            .tokens()
            .get(id as usize)
            .map(String::as_str)
    }

    /// The id of a vocabulary entry given in its stored spelling (the first id when the
    /// string is in the vocabulary twice).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.vocab.get(token)
    }

    /// The model's chat template, if it has one (one that failed to parse included:
    /// see [`ChatTemplate::parse_error`]).
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// This tokenizer with `source` as its chat template instead of the model's
    /// (`brigade serve --chat-template FILE`), compiled with the vocabulary's BOS / EOS
    /// strings; a source that does not parse is an error
    /// ([`TokenizerError::TemplateSyntax`]). The vocabulary tables are shared.
    pub fn with_chat_template(&self, source: &str) -> Result<Self, TokenizerError> {
        let token_string =
            |id: Option<u32>| id.and_then(|id| self.token_str(id)).map(str::to_owned);
        let template = ChatTemplate::new(
            source,
            token_string(self.inner.bos),
            token_string(self.inner.eos),
        )?;
        Ok(Self {
            inner: self.inner.clone(),
            chat_template: Some(template),
        })
    }
}

/// A piece of text between added-token matches, or a matched token.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// Calls `f` on the non-empty text between `matches` and on each match's id, in order,
/// dropping the ASCII whitespace after an `rstrip` match (and matches inside it), as
/// llama.cpp does.
fn for_each_fragment(
    text: &str,
    matches: &[ControlMatch],
    mut f: impl FnMut(Fragment<'_>) -> Result<(), TokenizerError>,
) -> Result<(), TokenizerError> {
    // Offsets come from the matcher, so they are in order and on char boundaries; `get`
    // only keeps a broken invariant from panicking.
    let broken = || TokenizerError::Encode("added-token matches out of order".into());
    let mut piece_start = 0usize;
    for found in matches {
        if found.start < piece_start {
            continue; // inside whitespace an rstrip token dropped
        }
        let piece = text.get(piece_start..found.start).ok_or_else(broken)?;
        if !piece.is_empty() {
            f(Fragment::Text(piece))?;
        }
        f(Fragment::Token(found.id))?;
        piece_start = if found.rstrip {
            skip_ascii_whitespace(text, found.end)
        } else {
            found.end
        };
    }
    let rest = text.get(piece_start..).ok_or_else(broken)?;
    if !rest.is_empty() {
        f(Fragment::Text(rest))?;
    }
    Ok(())
}

/// The first offset at or after `start` that is not C `isspace` whitespace.
fn skip_ascii_whitespace(text: &str, start: usize) -> usize {
    let rest = text.get(start..).unwrap_or_default();
    let num_space = rest
        .bytes()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0B' | b'\x0C'))
        .count();
    start + num_space
}

/// `text` cut into maximal runs of `'\n'` and of other chars (gemma4's only split).
fn newline_runs(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let first = rest.chars().next()?;
        let len = if first == '\n' {
            rest.find(|c| c != '\n')
        } else {
            rest.find('\n')
        }
        .unwrap_or(rest.len());
        let (run, after) = rest.split_at(len);
        rest = after;
        Some(run)
    })
}

/// The bytes token `token` of type `ty` decodes to, as llama.cpp's `token_to_piece`:
/// added tokens verbatim, `<0xXX>` byte tokens as that byte, normal tokens byte-level
/// decoded (`byte_level`) or with `▁` as a space, unused and undefined tokens as nothing.
fn push_piece_bytes(out: &mut Vec<u8>, token: &str, ty: i32, byte_level: bool) {
    match ty {
        TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_USER_DEFINED => {
            out.extend_from_slice(token.as_bytes())
        }
        TOKEN_TYPE_BYTE => match parse_byte_token(token) {
            Some(b) => out.push(b),
            None if byte_level => out.extend(byte_level::piece_bytes(token)),
            None => out.extend_from_slice(token.as_bytes()),
        },
        TOKEN_TYPE_NORMAL if byte_level => out.extend(byte_level::piece_bytes(token)),
        TOKEN_TYPE_NORMAL => {
            for part in token.split(SPM_SPACE).enumerate() {
                if part.0 > 0 {
                    out.push(b' ');
                }
                out.extend_from_slice(part.1.as_bytes());
            }
        }
        _ => {}
    }
}

/// The byte of a `<0xXX>` token.
fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The vocabulary in the form `tokenizers`' BPE builder takes.
fn bpe_vocab(vocab: &TokenIds) -> Vocab {
    vocab.entries().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Splits `"left right"` rules at the first space after the first byte (as llama.cpp
/// does, so a left part may itself be a space) and checks that left, right and their
/// concatenation are all vocabulary entries.
fn parse_merges(
    merges: &[String],
    vocab: &TokenIds,
) -> Result<Vec<(String, String)>, TokenizerError> {
    let mut out = Vec::with_capacity(merges.len());
    for (index, merge) in merges.iter().enumerate() {
        let bad = || TokenizerError::BadMerge {
            index,
            merge: merge.clone(),
        };
        let first_len = merge.chars().next().map_or(0, char::len_utf8);
        let split_at = merge
            .get(first_len..)
            .and_then(|rest| rest.find(' '))
            .map(|pos| pos + first_len)
            .ok_or_else(bad)?;
        let left = merge.get(..split_at).ok_or_else(bad)?;
        let right = merge.get(split_at + 1..).ok_or_else(bad)?;
        if right.is_empty() {
            return Err(bad());
        }
        let merged = format!("{left}{right}");
        for token in [left, right, merged.as_str()] {
            if !vocab.contains(token) {
                return Err(TokenizerError::MergeUnknownToken {
                    index,
                    merge: merge.clone(),
                    token: token.to_owned(),
                });
            }
        }
        out.push((left.to_owned(), right.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
