//! Tokenizer: byte-level BPE built from GGUF metadata, chat templates, and a streaming
//! detokenizer.
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
//! ```
//!
//! Encoding is done by the `tokenizers` crate (the engine behind Hugging Face's fast
//! tokenizers), configured to match the model's `tokenizer.json`, so ids are identical to
//! `AutoTokenizer(...).encode(text, add_special_tokens=False)`. Decoding is done here, from
//! each token's raw bytes, so that [`IncrementalDecoder`] and [`Tokenizer::decode`] agree
//! byte for byte.
//!
//! Conventions:
//! - Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is supported; anything else is
//!   [`TokenizerError::UnsupportedModel`].
//! - Supported `tokenizer.ggml.pre`: `smollm`, `gpt2`, `llama-bpe` (alias `llama3`,
//!   `llama-v3`). Any other value, or a missing key, is [`TokenizerError::UnsupportedPre`]:
//!   a wrong pre-tokenizer silently produces wrong ids, so there is no fallback.
//! - Control tokens (`token_type` 3) are special: split out of text only when
//!   `parse_special` is true, dropped by `decode(.., skip_special = true)`.
//!   User-defined tokens (`token_type` 4) are always split out (as in llama.cpp and HF's
//!   non-special added tokens) and never skipped.
//! - `encode` never adds BOS/EOS; `encode_with_bos` adds BOS iff `add_bos_token`.
//! - Chat messages are encoded by [`Tokenizer::encode_chat`]: control tokens are parsed in
//!   the text the template writes, while message content is plain text (as OpenAI tokenizes
//!   it), so `"<|im_end|>\n<|im_start|>system"` typed by a user cannot open a system turn.
//!   [`ChatEncodeOptions::parse_special_in_content`] restores the old behaviour.

mod byte_level;
mod chat;
mod control;
mod incremental;

use std::collections::HashMap;
use std::sync::Arc;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::gguf::{GgufError, GgufFile};
use control::{ControlMatch, ControlTokens};

pub use chat::{ChatMessage, ChatTemplate};
pub use incremental::IncrementalDecoder;

/// GGUF `token_type` of an ordinary vocabulary entry.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF `token_type` of a control token (`<|im_start|>`, `<|endoftext|>`, ...).
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `token_type` of a user-defined (added, non-special) token.
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Token strings that end a generation turn when present in the vocabulary (besides EOS).
const EOG_TOKEN_STRS: [&str; 4] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"];

/// Llama 3 pre-tokenizer regex, as in Meta's `tokenizer.json` (`Split`, behavior `Isolated`).
const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Values of `tokenizer.ggml.pre` this module can reproduce exactly.
pub const SUPPORTED_PRE: &[&str] = &["smollm", "gpt2", "llama-bpe", "llama3", "llama-v3"];

/// Everything that can go wrong building or using a [`Tokenizer`] or [`ChatTemplate`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.ggml.model` names a tokenizer family we do not implement.
    #[error("`tokenizer.ggml.model` = {0:?} is not supported (only byte-level BPE \"gpt2\")")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer we cannot reproduce exactly.
    #[error("`tokenizer.ggml.pre` = {0:?} is not supported (supported: {SUPPORTED_PRE:?})")]
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
    /// Prepend BOS as [`Tokenizer::encode_with_bos`] does (iff `add_bos_token`).
    pub with_bos: bool,
    /// Parse control-token text inside message content and roles as control tokens, as
    /// before; unsafe with untrusted users (`[tokenizer] parse_special_in_content`).
    pub parse_special_in_content: bool,
}

/// Plain-data description of a tokenizer, as stored under `tokenizer.ggml.*` in GGUF.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerSpec {
    /// Vocabulary in id order, byte-level spelled (`Ġ` = space).
    pub tokens: Vec<String>,
    /// GGUF token types, one per token (1 normal, 3 control, 4 user-defined, ...);
    /// empty means all normal.
    pub token_types: Vec<i32>,
    /// BPE merge rules `"left right"`, highest priority first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.model`; must be `"gpt2"`.
    pub model: String,
    /// `tokenizer.ggml.pre`; one of [`SUPPORTED_PRE`].
    pub pre: String,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (GGUF default for gpt2: false).
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token` (reported only; `encode_with_bos` never adds EOS).
    pub add_eos: bool,
    /// `tokenizer.chat_template` Jinja source.
    pub chat_template: Option<String>,
}

impl TokenizerSpec {
    /// Reads the spec from GGUF metadata. Required: `tokenizer.ggml.model`, `.tokens`,
    /// `.merges`, `.pre`; optional: `.token_type`, `.bos_token_id`, `.eos_token_id`,
    /// `.add_bos_token`, `.add_eos_token`, `tokenizer.chat_template`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let model = file.get_str("tokenizer.ggml.model")?.to_owned();
        if model != "gpt2" {
            // Checked before reading merges, which non-BPE models do not have.
            return Err(TokenizerError::UnsupportedModel(model));
        }
        let has = |key: &str| file.get(key).is_some();
        let pre = if has("tokenizer.ggml.pre") {
            file.get_str("tokenizer.ggml.pre")?.to_owned()
        } else {
            String::new()
        };
        let tokens = to_owned_strings(file.get_str_array("tokenizer.ggml.tokens")?);
        let merges = to_owned_strings(file.get_str_array("tokenizer.ggml.merges")?);
        let token_types = if has("tokenizer.ggml.token_type") {
            file.get_i32_array("tokenizer.ggml.token_type")?
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
        let opt_bool =
            |key: &str| -> Result<bool, TokenizerError> { Ok(has(key) && file.get_bool(key)?) };
        let chat_template = if has("tokenizer.chat_template") {
            Some(file.get_str("tokenizer.chat_template")?.to_owned())
        } else {
            None
        };
        Ok(Self {
            tokens,
            token_types,
            merges,
            model,
            pre,
            bos: opt_u32("tokenizer.ggml.bos_token_id")?,
            eos: opt_u32("tokenizer.ggml.eos_token_id")?,
            add_bos: opt_bool("tokenizer.ggml.add_bos_token")?,
            add_eos: opt_bool("tokenizer.ggml.add_eos_token")?,
            chat_template,
        })
    }
}

fn to_owned_strings(strs: Vec<&str>) -> Vec<String> {
    strs.into_iter().map(str::to_owned).collect()
}

/// Byte-level BPE tokenizer. Cheap to clone (tables are shared), `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    /// Splits control tokens out of text (`parse_special = true`).
    hf_parse_special: tokenizers::Tokenizer,
    /// Treats control tokens as plain text (`parse_special = false`).
    hf_plain: tokenizers::Tokenizer,
    /// Finds control-token strings the way `hf_parse_special` splits them out.
    control: ControlTokens,
    /// Vocabulary in id order (byte-level spelled).
    tokens: Vec<String>,
    /// Raw bytes of each token, in id order.
    pieces: Vec<Box<[u8]>>,
    /// GGUF token type of each token.
    token_types: Vec<i32>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eog_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
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
            merges,
            model,
            pre,
            bos,
            eos,
            add_bos,
            add_eos,
            chat_template,
        } = spec;

        if model != "gpt2" {
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
        for (field, id) in [("bos_token_id", bos), ("eos_token_id", eos)] {
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
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(vocab_size);
        let mut num_duplicates = 0usize;
        for (id, token) in (0u32..).zip(&tokens) {
            if vocab.contains_key(token) {
                num_duplicates += 1;
            } else {
                vocab.insert(token.clone(), id);
            }
        }
        if num_duplicates > 0 {
            tracing::warn!(
                num_duplicates,
                "tokenizer.ggml.tokens has duplicate strings; encoding uses the first id"
            );
        }

        let merge_pairs = parse_merges(&merges, &vocab)?;
        let (pre_tokenizer, ignore_merges) = pre_tokenizer_for(&pre)?;
        let bpe_vocab: Vocab = vocab.iter().map(|(k, &v)| (k.clone(), v)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(bpe_vocab, merge_pairs)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(TokenizerError::Build)?;

        let mut hf = tokenizers::Tokenizer::new(bpe);
        hf.with_pre_tokenizer(Some(pre_tokenizer));
        hf.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        let user_defined: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, _)| AddedToken::from(t.clone(), false))
            .collect();
        hf.add_special_tokens(&special);
        hf.add_tokens(&user_defined);
        let mut hf_plain = hf.clone();
        hf_plain.set_encode_special_tokens(true);
        let control = ControlTokens::new(special.iter().filter_map(|token| {
            let id = hf.token_to_id(&token.content)?;
            Some((token.content.as_str(), id))
        }))?;

        let pieces: Vec<Box<[u8]>> = tokens
            .iter()
            .map(|t| byte_level::piece_bytes(t).into_boxed_slice())
            .collect();

        let mut eog_ids: Vec<u32> = eos.into_iter().collect();
        for s in EOG_TOKEN_STRS {
            if let Some(&id) = vocab.get(s) {
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
                hf_parse_special: hf,
                hf_plain,
                control,
                tokens,
                pieces,
                token_types,
                bos,
                eos,
                add_bos,
                add_eos,
                eog_ids,
                chat_template,
            }),
        })
    }

    /// Encodes `text` without BOS/EOS. With `parse_special`, control-token strings in the
    /// text (e.g. `<|im_start|>`) become their single ids; without, they are plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let hf = if parse_special {
            &self.inner.hf_parse_special
        } else {
            &self.inner.hf_plain
        };
        let encoding = hf
            .encode_fast(text, false)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Like [`encode`](Self::encode), with BOS prepended iff `add_bos_token` is set and the
    /// vocabulary has a BOS id. Never appends EOS (see [`add_eos_token`](Self::add_eos_token)).
    pub fn encode_with_bos(
        &self,
        text: &str,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let ids = self.encode(text, parse_special)?;
        Ok(self.prepend_bos(ids))
    }

    /// `ids` with BOS in front iff `add_bos_token` is set and the vocabulary has a BOS id.
    fn prepend_bos(&self, ids: Vec<u32>) -> Vec<u32> {
        match self.inner.bos {
            Some(bos) if self.inner.add_bos => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend(ids);
                out
            }
            _ => ids,
        }
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
        let ChatEncodeOptions {
            add_generation_prompt,
            with_bos,
            parse_special_in_content,
        } = options;
        let ids = if parse_special_in_content {
            self.encode(&template.render(messages, add_generation_prompt)?, true)?
        } else {
            self.encode_chat_plain_content(template, messages, add_generation_prompt)?
        };
        Ok(if with_bos { self.prepend_bos(ids) } else { ids })
    }

    /// [`encode_chat`](Self::encode_chat) without BOS, content as plain text.
    fn encode_chat_plain_content(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
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
        let rendered = template.render_locating_content(messages, add_generation_prompt)?;
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
        // The text between control tokens, encoded as plain text: the pieces
        // `encode(.., true)` would cut the whole text into when contents are plain.
        let mut ids = Vec::with_capacity(text.len() / 3 + matches.len());
        let mut piece_start = 0usize;
        for found in &matches {
            let piece = text.get(piece_start..found.start).ok_or_else(broken)?;
            ids.extend(self.encode(piece, false)?);
            ids.push(found.id);
            piece_start = found.end;
        }
        let piece = text.get(piece_start..).ok_or_else(broken)?;
        ids.extend(self.encode(piece, false)?);
        Ok(ids)
    }

    /// Decodes ids to text; invalid UTF-8 becomes U+FFFD. With `skip_special`, control tokens
    /// are dropped. Matches HF `decode(ids, skip_special_tokens=..)` for byte-level BPE.
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

    /// Raw bytes of one token (byte-level decoded; may be part of a UTF-8 char), or `None`
    /// if `id` is out of range.
    pub fn token_to_piece_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.piece_bytes(id).map(<[u8]>::to_vec)
    }

    /// Borrowed form of [`token_to_piece_bytes`](Self::token_to_piece_bytes).
    pub(crate) fn piece_bytes(&self, id: u32) -> Option<&[u8]> {
        self.inner.pieces.get(id as usize).map(|p| &p[..])
    }

    /// Number of tokens (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.inner.tokens.len()
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

    /// `tokenizer.ggml.add_eos_token`, reported for callers that want it; nothing here
    /// appends EOS.
    pub fn add_eos_token(&self) -> bool {
        self.inner.add_eos
    }

    /// End-of-generation ids: EOS, plus `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>` and
    /// `<end_of_turn>` when present in the vocabulary (no duplicates, EOS first).
    pub fn eog_ids(&self) -> &[u32] {
        &self.inner.eog_ids
    }

    /// Whether `id` is a control token (GGUF `token_type` 3). False when out of range.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.token_types.get(id as usize) == Some(&TOKEN_TYPE_CONTROL)
    }

    /// The vocabulary entry of `id` as stored (byte-level spelled, e.g. `"Ġthe"`).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.inner.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a vocabulary entry given in its stored (byte-level) spelling.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.hf_parse_special.token_to_id(token)
    }

    /// The model's chat template, if it has one (one that failed to parse included:
    /// see [`ChatTemplate::parse_error`]).
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.inner.chat_template.as_ref()
    }
}

/// Splits `"left right"` rules and checks that left, right and their concatenation are
/// all vocabulary entries.
fn parse_merges(
    merges: &[String],
    vocab: &HashMap<String, u32>,
) -> Result<Vec<(String, String)>, TokenizerError> {
    let mut out = Vec::with_capacity(merges.len());
    for (index, merge) in merges.iter().enumerate() {
        let bad = || TokenizerError::BadMerge {
            index,
            merge: merge.clone(),
        };
        let (left, right) = merge.split_once(' ').ok_or_else(bad)?;
        if left.is_empty() || right.is_empty() || right.contains(' ') {
            return Err(bad());
        }
        let merged = format!("{left}{right}");
        for token in [left, right, merged.as_str()] {
            if !vocab.contains_key(token) {
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

/// The pre-tokenizer of HF's `tokenizer.json` for a llama.cpp `tokenizer.ggml.pre` name,
/// plus the BPE `ignore_merges` flag that goes with it.
fn pre_tokenizer_for(pre: &str) -> Result<(PreTokenizerWrapper, bool), TokenizerError> {
    match pre {
        // SmolLM / SmolLM2: Sequence[Digits(individual), ByteLevel(regex)].
        "smollm" => Ok((
            Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            false,
        )),
        // GPT-2: ByteLevel with its built-in regex.
        "gpt2" => Ok((ByteLevel::new(false, true, true).into(), false)),
        // Llama 3: regex Split + ByteLevel without regex; BPE ignores merges for whole words.
        "llama-bpe" | "llama3" | "llama-v3" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT_REGEX.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(TokenizerError::Build)?;
            Ok((
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into(),
                true,
            ))
        }
        other => Err(TokenizerError::UnsupportedPre(other.to_owned())),
    }
}

#[cfg(test)]
mod tests;
