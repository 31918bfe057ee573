//! The one place a request is checked: [`Validator::validate`] turns a
//! [`GenerateRequest`] into a [`ValidRequest`] (TGI's `Valid*` naming: the type
//! shows the request was checked), run once per request, by the HTTP handlers
//! on the blocking pool or by the engine's tokenizer actor for direct callers.
//!
//! Owns: parameter ranges, prompt encoding (text, chat template, token ids),
//! the context-length rule, the byte-length pre-check that refuses a prompt
//! before tokenizing it when no tokenization of that many bytes could fit,
//! the stop-string budget, drawing a seed, and constraints (the grammar
//! compiles against this vocabulary, through the [`LazyGuidance`] the sampler
//! shares; `ignore_eos` and `min_tokens` are refused next to one, as they
//! would contradict it). Does not own: HTTP shapes
//! (server/api.rs), admission, scheduling.

use std::sync::Arc;

use super::error::EngineError;
use super::request::{GenerateRequest, Prompt};
use super::stop::StopMatcher;
use crate::guidance::LazyGuidance;
use crate::sampling::{self, SamplingParams};
use crate::tokenizer::{ChatEncodeOptions, ChatMessage, Tokenizer};

/// The engine's request limits, computed once at start ([`super::EngineHandle::info`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EngineInfo {
    /// Longest prompt + completion in tokens (model context and KV capacity).
    pub max_len: usize,
    /// Vocabulary size (valid token ids are below it).
    pub vocab_size: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Most bytes of all stop strings of one request.
    pub max_stop_bytes: usize,
    /// Longest text one token can stand for, in bytes: a prompt of more than
    /// `max_len * max_token_bytes` bytes cannot fit and is refused unread.
    pub max_token_bytes: usize,
}

/// A checked request: prompt ids within the limits, parameters in range, a seed.
/// Only [`Validator::validate`] makes one.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub(crate) prompt: Arc<Vec<u32>>,
    pub(crate) params: Arc<SamplingParams>,
    pub(crate) seed: u64,
    pub(crate) priority: i32,
    pub(crate) stop: Option<Arc<StopMatcher>>,
    /// Background work (a served batch's request): scheduled after interactive
    /// sequences, at most `runtime.background_rows` per micro-batch while any runs.
    pub(crate) background: bool,
}

impl ValidRequest {
    /// The prompt token ids.
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt
    }
    /// The sampling parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }
    /// The seed in use (drawn when the request had none).
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// Scheduling priority (lower first).
    pub fn priority(&self) -> i32 {
        self.priority
    }
    /// Whether this is background work (see `runtime.background_rows`).
    pub fn background(&self) -> bool {
        self.background
    }
}

/// Checks requests against the engine's limits.
#[derive(Clone, Debug)]
pub struct Validator {
    tok: Arc<Tokenizer>,
    info: EngineInfo,
    /// `[tokenizer] parse_special_in_content`: control-token text in messages is parsed.
    parse_special_in_content: bool,
    /// Constrained decoding over this vocabulary (built on the first constraint).
    guidance: Arc<LazyGuidance>,
}

fn invalid(param: &str, message: impl Into<String>) -> EngineError {
    EngineError::Invalid {
        param: Some(param.to_string()),
        message: message.into(),
    }
}

impl Validator {
    /// A validator for `tok` with the given limits (`max_token_bytes` is measured from `tok`).
    pub fn new(
        tok: Arc<Tokenizer>,
        max_len: usize,
        max_n: usize,
        max_stop_bytes: usize,
        parse_special_in_content: bool,
    ) -> Self {
        let vocab_size = tok.vocab_size();
        let max_token_bytes = (0..vocab_size as u32)
            .map(|id| {
                let piece = tok.token_to_piece_bytes(id).map_or(0, |b| b.len());
                let text = tok.token_str(id).map_or(0, str::len);
                piece.max(text)
            })
            .max()
            .unwrap_or(1)
            .max(1);
        let guidance = Arc::new(LazyGuidance::new(tok.clone()));
        Self {
            tok,
            info: EngineInfo {
                max_len,
                vocab_size,
                max_n,
                max_stop_bytes,
                max_token_bytes,
            },
            parse_special_in_content,
            guidance,
        }
    }

    /// Constrained decoding over this vocabulary (shared with the sampler).
    pub fn guidance(&self) -> &Arc<LazyGuidance> {
        &self.guidance
    }

    /// The limits.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tok
    }

    /// Checks every parameter, encodes the prompt and applies the context rule.
    pub fn validate(&self, req: GenerateRequest) -> Result<ValidRequest, EngineError> {
        let p = req.params;
        self.validate_params(&p)?;
        let prompt = self.encode_prompt(&req.prompt, p.max_tokens)?;
        self.check_prompt(&prompt, p.max_tokens, p.min_tokens)?;
        let seed = p.seed.unwrap_or_else(fresh_seed);
        let stop = (!p.stop.is_empty()).then(|| Arc::new(StopMatcher::new(&p.stop)));
        Ok(ValidRequest {
            prompt: Arc::new(prompt),
            params: Arc::new(p),
            seed,
            priority: req.priority,
            stop,
            background: false,
        })
    }

    /// Token ids of `prompt` (text with control tokens parsed and BOS as the model
    /// adds it; chat messages through the template with the generation prompt;
    /// token ids as given), refusing unread any text that could not fit in the
    /// context next to `max_tokens` new tokens.
    pub fn encode_prompt(
        &self,
        prompt: &Prompt,
        max_tokens: usize,
    ) -> Result<Vec<u32>, EngineError> {
        match prompt {
            Prompt::Text(t) => {
                self.check_bytes("prompt", t.len(), max_tokens)?;
                self.tok
                    .encode_with_bos(t, true)
                    .map_err(|e| invalid("prompt", e.to_string()))
            }
            Prompt::Tokens(ids) => Ok(ids.clone()),
            Prompt::Chat(messages) => {
                let bytes = messages
                    .iter()
                    .map(|m| m.content.len())
                    .fold(0usize, usize::saturating_add);
                self.check_bytes("messages", bytes, max_tokens)?;
                self.encode_chat(messages, true, true)
            }
        }
    }

    /// Chat messages through the model's template. Message contents and roles
    /// are plain text: control-token text in them stays text (OpenAI's rule),
    /// unless `[tokenizer] parse_special_in_content` is on.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        add_bos: bool,
    ) -> Result<Vec<u32>, EngineError> {
        self.encode_chat_with_tools(messages, None, add_generation_prompt, add_bos)
    }

    /// [`encode_chat`](Self::encode_chat) with OpenAI `tools` (function specs) passed
    /// to the template.
    pub fn encode_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        add_bos: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let tmpl = self
            .tok
            .chat_template()
            .ok_or_else(|| invalid("messages", "the model has no chat template"))?;
        let options = ChatEncodeOptions {
            add_generation_prompt,
            with_bos: add_bos,
            parse_special_in_content: self.parse_special_in_content,
        };
        self.tok
            .encode_chat_with(tmpl, messages, tools, None, options)
            .map_err(|e| {
                invalid(
                    &e.param().unwrap_or_else(|| "messages".into()),
                    e.to_string(),
                )
            })
    }

    /// Refuses a text of `bytes` bytes that no tokenization could fit.
    fn check_bytes(&self, param: &str, bytes: usize, max_tokens: usize) -> Result<(), EngineError> {
        let room = self.info.max_len.saturating_sub(max_tokens);
        // Every token stands for at most max_token_bytes bytes of text.
        let min_tokens = bytes / self.info.max_token_bytes;
        if min_tokens > room {
            return Err(invalid(
                param,
                format!(
                    "this model's maximum context length is {} tokens; the prompt ({bytes} bytes, at least {min_tokens} tokens) and {max_tokens} tokens to generate cannot fit",
                    self.info.max_len
                ),
            ));
        }
        Ok(())
    }

    /// Prompt ids: non-empty, in the vocabulary, and with `max_tokens` within the context.
    pub fn check_prompt(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        min_tokens: usize,
    ) -> Result<(), EngineError> {
        let (vocab, max_len) = (self.info.vocab_size, self.info.max_len);
        if prompt.is_empty() {
            return Err(invalid(
                "prompt",
                "the prompt must contain at least one token",
            ));
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid(
                "prompt",
                format!("token id {t} is out of range (vocabulary size {vocab})"),
            ));
        }
        let total = prompt.len().saturating_add(max_tokens);
        if total > max_len {
            return Err(invalid(
                "max_tokens",
                format!(
                    "this model's maximum context length is {max_len} tokens; the request asks for {total} tokens ({} in the prompt, {max_tokens} to generate)",
                    prompt.len()
                ),
            ));
        }
        if prompt.len().saturating_add(min_tokens) > max_len {
            return Err(invalid("min_tokens", format!("min_tokens ({min_tokens}) plus the prompt ({} tokens) exceed the context length {max_len}", prompt.len())));
        }
        Ok(())
    }

    /// Range checks on sampling parameters, naming the field.
    pub fn validate_params(&self, p: &SamplingParams) -> Result<(), EngineError> {
        let (vocab, max_n) = (self.info.vocab_size, self.info.max_n);
        let fin = |v: f32| v.is_finite();
        if !(fin(p.temperature) && p.temperature >= 0.0) {
            return Err(invalid(
                "temperature",
                format!("temperature must be >= 0, got {}", p.temperature),
            ));
        }
        if p.temperature > 100.0 {
            return Err(invalid(
                "temperature",
                format!("temperature must be <= 100, got {}", p.temperature),
            ));
        }
        if !(fin(p.top_p) && p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {}", p.top_p),
            ));
        }
        if p.top_k < -1 {
            return Err(invalid(
                "top_k",
                format!(
                    "top_k must be -1 (off), 0 (off) or positive, got {}",
                    p.top_k
                ),
            ));
        }
        if !(fin(p.min_p) && (0.0..=1.0).contains(&p.min_p)) {
            return Err(invalid(
                "min_p",
                format!("min_p must be in [0, 1], got {}", p.min_p),
            ));
        }
        if !(fin(p.repetition_penalty)
            && p.repetition_penalty > 0.0
            && p.repetition_penalty <= 10.0)
        {
            return Err(invalid(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be in (0, 10], got {}",
                    p.repetition_penalty
                ),
            ));
        }
        if !(fin(p.presence_penalty) && (-2.0..=2.0).contains(&p.presence_penalty)) {
            return Err(invalid(
                "presence_penalty",
                format!(
                    "presence_penalty must be in [-2, 2], got {}",
                    p.presence_penalty
                ),
            ));
        }
        if !(fin(p.frequency_penalty) && (-2.0..=2.0).contains(&p.frequency_penalty)) {
            return Err(invalid(
                "frequency_penalty",
                format!(
                    "frequency_penalty must be in [-2, 2], got {}",
                    p.frequency_penalty
                ),
            ));
        }
        for (&t, &b) in &p.logit_bias {
            if t as usize >= vocab {
                return Err(invalid(
                    "logit_bias",
                    format!("token id {t} in logit_bias is out of range (vocabulary size {vocab})"),
                ));
            }
            if !(fin(b) && (-100.0..=100.0).contains(&b)) {
                return Err(invalid(
                    "logit_bias",
                    format!("bias for token {t} must be in [-100, 100], got {b}"),
                ));
            }
        }
        if let Some(&t) = p.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid(
                "stop_token_ids",
                format!("token id {t} is out of range (vocabulary size {vocab})"),
            ));
        }
        if p.stop.iter().any(|s| s.is_empty()) {
            return Err(invalid("stop", "stop strings must not be empty"));
        }
        if p.stop.len() > 16 {
            return Err(invalid(
                "stop",
                format!("at most 16 stop strings, got {}", p.stop.len()),
            ));
        }
        let stop_bytes = p
            .stop
            .iter()
            .map(String::len)
            .fold(0usize, usize::saturating_add);
        if stop_bytes > self.info.max_stop_bytes {
            return Err(invalid(
                "stop",
                format!("stop strings may have at most {} bytes in all (runtime.max_stop_bytes), got {stop_bytes}", self.info.max_stop_bytes),
            ));
        }
        if let Some(n) = p.logprobs {
            if n > 20 {
                return Err(invalid(
                    "top_logprobs",
                    format!("top_logprobs must be in [0, 20], got {n}"),
                ));
            }
        }
        if let Some(n) = p.prompt_logprobs {
            if n > 20 {
                return Err(invalid(
                    "prompt_logprobs",
                    format!("prompt_logprobs must be in [0, 20], got {n}"),
                ));
            }
        }
        if p.n == 0 || p.n > max_n {
            return Err(invalid(
                "n",
                format!("n must be in [1, {max_n}], got {}", p.n),
            ));
        }
        if p.max_tokens == 0 && p.prompt_logprobs.is_none() {
            return Err(invalid(
                "max_tokens",
                "max_tokens must be at least 1 (0 only with prompt log-probabilities)",
            ));
        }
        if p.min_tokens > p.max_tokens {
            return Err(invalid(
                "min_tokens",
                format!(
                    "min_tokens ({}) must be <= max_tokens ({})",
                    p.min_tokens, p.max_tokens
                ),
            ));
        }
        if let Some(c) = &p.constraint {
            if p.ignore_eos {
                return Err(invalid("ignore_eos", "ignore_eos cannot be combined with structured output: the completion ends when the grammar is complete"));
            }
            if p.min_tokens > 0 {
                return Err(invalid("min_tokens", "min_tokens cannot be combined with structured output: the grammar decides where the output ends"));
            }
            let g = self
                .guidance
                .get()
                .map_err(|e| invalid("constraint", e.to_string()))?;
            g.check(c).map_err(|e| {
                invalid(
                    "constraint",
                    format!("the output constraint cannot be used: {e}"),
                )
            })?;
        }
        Ok(())
    }
}

/// A seed for a request that brought none.
fn fresh_seed() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    sampling::mix64(t ^ sampling::mix64(c))
}
