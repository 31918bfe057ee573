//! Request bodies of the OpenAI-compatible API (and vLLM's extensions), their
//! accepted-field lists, and their conversion to engine [`SamplingParams`].
//! No engine logic here. A wrong type or range is a 400 naming the field (the
//! JSON path comes from `serde_path_to_error`).
//!
//! # Which fields are accepted
//!
//! Every top-level field of a body is one of four kinds; the first that
//! matches decides ([`check_fields`]):
//!
//! 1. **Honoured**: parsed into the structs below and acted on.
//!    - both generation endpoints ([`CommonParams`]): `model`, `n`,
//!      `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`,
//!      `presence_penalty`, `frequency_penalty`, `logit_bias`, `seed`, `stop`,
//!      `stop_token_ids`, `ignore_eos`, `min_tokens`, `skip_special_tokens`,
//!      `stream`, `stream_options`, `priority`;
//!    - structured output on both ([`crate::guidance::request`] parses them
//!      into one constraint; more than one is a 400): `response_format`
//!      (`text`, `json_object`, `json_schema`), vLLM's `structured_outputs`
//!      and `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`,
//!      `guided_whitespace_pattern`, `guided_decoding_backend` (llguidance
//!      only), llama.cpp's `grammar` (GBNF) and `json_schema`;
//!    - `/v1/completions`: `prompt`, `max_tokens`, `logprobs`, `echo`,
//!      `suffix` (400 unless empty);
//!    - `/v1/chat/completions`: `messages`, `max_tokens`,
//!      `max_completion_tokens`, `logprobs`, `top_logprobs`, `tools`,
//!      `tool_choice`, `parallel_tool_calls` (checked by [`super::tools`]);
//!    - `/tokenize`: `model`, `prompt`, `messages`, `add_special_tokens`,
//!      `add_generation_prompt`, `return_token_strs`; `/detokenize`: `model`,
//!      `tokens`.
//! 2. **Bookkeeping** ([`BOOKKEEPING_FIELDS`]), accepted and ignored because
//!    they do not change what is generated: `user`, `metadata`, `store`,
//!    `service_tier`, `parallel_tool_calls` (honoured by chat; meaningless elsewhere),
//!    `safety_identifier`, `prompt_cache_key`, `request_id` (vLLM),
//!    `cache_prompt` (llama.cpp).
//! 3. **Known but not supported** ([`unsupported_no_op`]): they would change
//!    the output and are not implemented, so any value other than a no-op is a
//!    400 naming the field. `null` is always a no-op; the other no-op values:
//!    - `tools` (completions,
//!      `/tokenize`), `functions` (the legacy form of `tools`: use `tools`): `[]`;
//!      `tool_choice` (completions, `/tokenize`): `"none"`, or `"auto"` without tools; `function_call`:
//!      `"none"`, or `"auto"` without functions; `best_of`: 1 or `n`;
//!      `modalities`: `["text"]`;
//!    - vLLM: `echo` (chat): false; `add_generation_prompt` (chat): true;
//!      `continue_final_message`: false; `add_special_tokens`: false on chat,
//!      true on completions; `include_stop_str_in_output`: false;
//!      `spaces_between_special_tokens`: true; `use_beam_search`: false;
//!      `length_penalty`: 1; `prompt_logprobs`, other `guided_*` fields,
//!      `truncate_prompt_tokens`, `allowed_token_ids`,
//!      `bad_words`, `logits_processors`, `return_tokens_as_token_ids`,
//!      `chat_template`, `chat_template_kwargs`, `documents`,
//!      `mm_processor_kwargs`: none;
//!    - llama.cpp / text-generation-webui: `n_predict`, `repeat_penalty`, `repeat_last_n`, `penalize_nl`,
//!      `samplers`, `dry_*`, `xtc_*`: none; `typical_p`, `tfs_z`: 1;
//!      `top_a`, `mirostat`, `n_probs`, `min_keep`, `dynatemp_range`: 0;
//!      `dynatemp_exponent`: 1;
//!    - OpenAI: `prediction`, `audio`, `reasoning_effort`, `reasoning`,
//!      `verbosity`, `web_search_options`: none.
//! 4. **Anything else** is a 400 naming it, as OpenAI answers:
//!    "Unrecognized request argument supplied: X".
//!
//! Inside `messages[i]` ([`check_message_fields`]): `role`, `content`, `name`,
//! `tool_calls` (an assistant's calls, see [`super::tools::history_tool_calls`])
//! and `tool_call_id` (required on `tool` messages) are honoured: they reach the
//! chat template; `function_call`, `audio`, `refusal`, `annotations` and
//! `reasoning_content` are accepted only empty (`null`, `""` or `[]`: what SDKs
//! send back with an assistant turn), since the chat template would drop them;
//! the legacy role `function` is refused (use `tool`); anything else is
//! unrecognized.
//!
//! Counts (`n`, `max_tokens`, `max_completion_tokens`, `min_tokens`,
//! `logprobs`, `top_logprobs`) accept any non-negative JSON integer, however
//! large: values past `usize` saturate, so the range checks answer with their
//! usual message (e.g. the context-length one for `max_tokens`) instead of an
//! overflow; negative or fractional values are a 400 naming the field.

use std::collections::HashMap;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::tools;
use crate::engine::SamplingParams;
use crate::tokenizer::ChatMessage;

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text prompt.
    Text(String),
    /// One token prompt.
    Tokens(Vec<u32>),
    /// Several text prompts.
    Texts(Vec<String>),
    /// Several token prompts.
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: a string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and `"usage": null` on the others).
    #[serde(default)]
    pub include_usage: bool,
}

/// A non-negative JSON integer as a `usize`, saturating: larger values become
/// `usize::MAX` (so range checks, not arithmetic, reject them).
struct Count(usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(usize::try_from(v).unwrap_or(usize::MAX)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "must be a non-negative integer, got {v}"
                    ))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                // JSON integers past u64 arrive as floats: saturate those; reject fractions.
                if v.is_finite() && v.fract() == 0.0 && v >= u64::MAX as f64 {
                    Ok(Count(usize::MAX))
                } else if v < 0.0 {
                    Err(E::custom(format!(
                        "must be a non-negative integer, got {v}"
                    )))
                } else {
                    Err(E::custom(format!("must be an integer, got {v}")))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `deserialize_with` for optional counts (see [`Count`]).
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    Ok(Option::<Count>::deserialize(d)?.map(|c| c.0))
}

/// Sampling fields shared by completions and chat.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CommonParams {
    /// Model name; must be the served name when present.
    pub model: Option<String>,
    /// Completions per prompt.
    #[serde(default, deserialize_with = "count")]
    pub n: Option<usize>,
    /// Sampling temperature (default 1).
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// vLLM: top-k (-1 = off).
    pub top_k: Option<i32>,
    /// vLLM: min-p.
    pub min_p: Option<f32>,
    /// vLLM: repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string key) → bias.
    pub logit_bias: Option<HashMap<String, f32>>,
    /// Random seed (any 64-bit integer).
    pub seed: Option<serde_json::Number>,
    /// Stop strings.
    pub stop: Option<StopInput>,
    /// vLLM: stop token ids.
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM: ignore end-of-generation tokens.
    pub ignore_eos: Option<bool>,
    /// vLLM: minimum tokens before stopping.
    #[serde(default, deserialize_with = "count")]
    pub min_tokens: Option<usize>,
    /// vLLM: skip special tokens when detokenizing (default true).
    pub skip_special_tokens: Option<bool>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Scheduling priority inside the tenant (lower first; vLLM extension).
    pub priority: Option<i32>,
    /// The structured-output constraint of the body's fields
    /// ([`crate::guidance::request::parse`]), set by [`ApiRequest::parse`].
    #[serde(skip)]
    pub constraint: Option<crate::guidance::Constraint>,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt(s).
    pub prompt: PromptInput,
    /// Most new tokens (default 16).
    #[serde(default, deserialize_with = "count")]
    pub max_tokens: Option<usize>,
    /// Log-probabilities of this many top tokens (0..=20).
    #[serde(default, deserialize_with = "count")]
    pub logprobs: Option<usize>,
    /// Return the prompt before the completion.
    pub echo: Option<bool>,
    /// Not supported (400 when non-empty).
    pub suffix: Option<String>,
    /// Shared sampling fields (parsed separately by [`ApiRequest::parse`], so
    /// errors keep their field path; serde's `flatten` would lose it).
    #[serde(skip)]
    pub common: CommonParams,
}

/// A content part of a chat message.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// Part type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// Text of a `text` part.
    pub text: Option<String>,
}

/// Message content: a string or parts.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ContentInput {
    /// Plain text.
    Text(String),
    /// Parts.
    Parts(Vec<ContentPart>),
}

/// A chat message as sent by clients.
#[derive(Clone, Debug, Deserialize)]
pub struct MessageInput {
    /// Role.
    pub role: String,
    /// Content (null for e.g. assistant tool calls).
    pub content: Option<ContentInput>,
    /// Author name (on `tool` messages: the tool that answered).
    pub name: Option<String>,
    /// An assistant turn's tool calls (checked by [`tools::history_tool_calls`]).
    pub tool_calls: Option<Value>,
    /// On a `tool` message: the id of the call it answers.
    pub tool_call_id: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<MessageInput>,
    /// Most new tokens (deprecated name).
    #[serde(default, deserialize_with = "count")]
    pub max_tokens: Option<usize>,
    /// Most new tokens (takes precedence).
    #[serde(default, deserialize_with = "count")]
    pub max_completion_tokens: Option<usize>,
    /// Return log-probabilities of chosen tokens.
    pub logprobs: Option<bool>,
    /// With `logprobs`: this many alternatives (0..=20).
    #[serde(default, deserialize_with = "count")]
    pub top_logprobs: Option<usize>,
    /// Function tools (checked by [`tools::ToolRequest::parse`]).
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or a named function.
    pub tool_choice: Option<Value>,
    /// false: at most one tool call.
    pub parallel_tool_calls: Option<bool>,
    /// Shared sampling fields (parsed separately by [`ApiRequest::parse`], so
    /// errors keep their field path; serde's `flatten` would lose it).
    #[serde(skip)]
    pub common: CommonParams,
}

impl ChatRequest {
    /// The request's tools, checked (`None` without tools).
    pub fn tool_request(&self) -> Result<Option<tools::ToolRequest>, ApiError> {
        tools::ToolRequest::parse(
            self.tools.as_ref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls,
        )
    }
}

/// `POST /tokenize` (vLLM): a prompt or messages.
#[derive(Clone, Debug, Deserialize)]
pub struct TokenizeRequest {
    /// Model name (optional).
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// Messages to render through the chat template and tokenize.
    pub messages: Option<Vec<MessageInput>>,
    /// Add BOS (default: true for `prompt`, false for `messages`).
    pub add_special_tokens: Option<bool>,
    /// With `messages`: append the assistant header (default true).
    pub add_generation_prompt: Option<bool>,
    /// Also return each token's string.
    pub return_token_strs: Option<bool>,
}

/// `POST /detokenize` (vLLM).
#[derive(Clone, Debug, Deserialize)]
pub struct DetokenizeRequest {
    /// Model name (optional).
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// Converts client messages to template messages.
pub fn messages(input: &[MessageInput]) -> Result<Vec<ChatMessage>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    input
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None => String::new(),
                Some(ContentInput::Text(t)) => t.clone(),
                Some(ContentInput::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::invalid(
                                &format!("messages[{i}].content"),
                                format!(
                                    "content part type `{}` is not supported (only `text`)",
                                    p.kind
                                ),
                            ));
                        }
                        s.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    s
                }
            };
            let mut msg = ChatMessage::new(m.role.clone(), content);
            msg.name = m.name.clone();
            msg.tool_call_id = m.tool_call_id.clone();
            if let Some(calls) = &m.tool_calls {
                msg.tool_calls = tools::history_tool_calls(i, calls)?;
            }
            if m.role == "tool" && m.tool_call_id.is_none() {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].tool_call_id"),
                    "`tool` messages need the `tool_call_id` of the call they answer",
                ));
            }
            Ok(msg)
        })
        .collect()
}

impl CommonParams {
    /// Sampling parameters from the shared fields; `max_tokens` and logprobs are set by the caller.
    pub fn sampling(&self) -> Result<SamplingParams, ApiError> {
        let mut p = SamplingParams::default();
        if let Some(v) = self.n {
            p.n = v;
        }
        if let Some(v) = self.temperature {
            p.temperature = v;
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(v) = self.top_k {
            p.top_k = v;
        }
        if let Some(v) = self.min_p {
            p.min_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            p.repetition_penalty = v;
        }
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = v;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = v;
        }
        if let Some(bias) = &self.logit_bias {
            for (k, &b) in bias {
                let id: u32 = k.trim().parse().map_err(|_| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("logit_bias keys must be token ids, got {k:?}"),
                    )
                })?;
                p.logit_bias.insert(id, b);
            }
        }
        if let Some(s) = &self.seed {
            // Negative seeds are valid in OpenAI's API: use their two's-complement bits.
            let v = s.as_u64().or_else(|| s.as_i64().map(|i| i as u64));
            p.seed = Some(v.ok_or_else(|| {
                ApiError::invalid("seed", format!("seed must be a 64-bit integer, got {s}"))
            })?);
        }
        p.stop = match &self.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) => v.clone(),
        };
        if let Some(v) = &self.stop_token_ids {
            p.stop_token_ids = v.clone();
        }
        if let Some(v) = self.ignore_eos {
            p.ignore_eos = v;
        }
        if let Some(v) = self.min_tokens {
            p.min_tokens = v;
        }
        if let Some(v) = self.skip_special_tokens {
            p.skip_special_tokens = v;
        }
        p.constraint = self.constraint.clone();
        Ok(p)
    }

    /// Whether to stream, and whether to send a usage chunk.
    pub fn streaming(&self) -> (bool, bool) {
        let stream = self.stream.unwrap_or(false);
        let usage = stream
            && self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage);
        (stream, usage)
    }
}

/// The body types, for their field lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /tokenize`.
    Tokenize,
    /// `POST /detokenize`.
    Detokenize,
}

/// Fields of [`CommonParams`] (both generation endpoints).
const COMMON_FIELDS: &[&str] = &[
    "model",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "stream",
    "stream_options",
    "priority",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "max_tokens", "logprobs", "echo", "suffix"];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];
const TOKENIZE_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "add_special_tokens",
    "add_generation_prompt",
    "return_token_strs",
];
const DETOKENIZE_FIELDS: &[&str] = &["model", "tokens"];

/// Accepted on every endpoint and ignored: they do not change what is generated.
pub const BOOKKEEPING_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
    "request_id",
    "cache_prompt",
];

impl Endpoint {
    /// Whether `field` is parsed and acted on by this endpoint.
    fn honours(self, field: &str) -> bool {
        let lists: &[&[&str]] = match self {
            Endpoint::Completions => &[
                COMMON_FIELDS,
                COMPLETION_FIELDS,
                crate::guidance::request::FIELDS,
            ],
            Endpoint::Chat => &[COMMON_FIELDS, CHAT_FIELDS, crate::guidance::request::FIELDS],
            Endpoint::Tokenize => &[TOKENIZE_FIELDS],
            Endpoint::Detokenize => &[DETOKENIZE_FIELDS],
        };
        lists.iter().any(|l| l.contains(&field))
    }
}

/// For a field that is known but not supported (it would change the output):
/// `Some(true)` when `v` is a no-op value that may be accepted, `Some(false)`
/// when it must be refused; `None` for fields this table does not know.
/// (`null`, a no-op for all of them, is accepted by [`check_fields`].)
pub fn unsupported_no_op(
    ep: Endpoint,
    field: &str,
    v: &Value,
    body: &Map<String, Value>,
) -> Option<bool> {
    let empty = |v: Option<&Value>| {
        v.is_none_or(|v| v.is_null() || v.as_array().is_some_and(|a| a.is_empty()))
    };
    let num = |x: f64| v.as_f64() == Some(x);
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1);
    Some(match field {
        "response_format" => v
            .as_object()
            .is_some_and(|o| o.len() == 1 && o.get("type").is_some_and(|t| t == "text")),
        "structured_outputs" | "grammar" | "json_schema" => false,
        "tools" | "functions" => empty(Some(v)),
        "tool_choice" => v == "none" || (v == "auto" && empty(body.get("tools"))),
        "function_call" => v == "none" || (v == "auto" && empty(body.get("functions"))),
        "best_of" => v.as_u64().is_some_and(|b| b == 1 || b == n),
        "modalities" => v
            .as_array()
            .is_some_and(|a| a.len() == 1 && a.first().is_some_and(|m| m == "text")),
        "echo" | "continue_final_message" | "include_stop_str_in_output" | "use_beam_search" => {
            v == false
        }
        "add_generation_prompt" | "spaces_between_special_tokens" => v == true,
        // Completions add BOS (true); chat renders its template without (false).
        "add_special_tokens" => *v == Value::Bool(ep == Endpoint::Completions),
        "length_penalty" | "typical_p" | "tfs_z" | "dynatemp_exponent" => num(1.0),
        "top_a" | "mirostat" | "n_probs" | "min_keep" | "dynatemp_range" => num(0.0),
        "prompt_logprobs"
        | "truncate_prompt_tokens"
        | "allowed_token_ids"
        | "bad_words"
        | "logits_processors"
        | "return_tokens_as_token_ids"
        | "chat_template"
        | "chat_template_kwargs"
        | "documents"
        | "mm_processor_kwargs"
        | "n_predict"
        | "repeat_penalty"
        | "repeat_last_n"
        | "penalize_nl"
        | "samplers"
        | "mirostat_tau"
        | "mirostat_eta"
        | "prediction"
        | "audio"
        | "reasoning_effort"
        | "reasoning"
        | "verbosity"
        | "web_search_options" => false,
        f if f.starts_with("dry_") || f.starts_with("xtc_") || f.starts_with("guided_") => false,
        _ => return None,
    })
}

/// Refuses (400 naming it) every top-level field that is neither honoured by
/// `ep`, nor bookkeeping, nor a known field with a no-op value (module docs).
pub fn check_fields(ep: Endpoint, body: &Map<String, Value>) -> Result<(), ApiError> {
    for (field, v) in body {
        if ep.honours(field) || BOOKKEEPING_FIELDS.contains(&field.as_str()) {
            continue;
        }
        match unsupported_no_op(ep, field, v, body) {
            Some(no_op) if no_op || v.is_null() => {}
            Some(_) if ep == Endpoint::Chat && (field == "functions" || field == "function_call") => {
                return Err(ApiError::invalid(
                    field,
                    format!("`{field}` (the deprecated function-calling API) is not supported; send `tools` and `tool_choice` instead"),
                ))
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    field,
                    format!("`{field}` is not supported by this server (it would change the output and is not implemented); remove it"),
                ))
            }
            None => return Err(ApiError::invalid(field, format!("Unrecognized request argument supplied: {field}"))),
        }
    }
    Ok(())
}

/// Fields of a message that the template would drop: accepted only empty.
const MESSAGE_EMPTY_ONLY_FIELDS: &[&str] = &[
    "function_call",
    "audio",
    "refusal",
    "annotations",
    "reasoning_content",
];

/// Refuses (400 naming `messages[i].field`) message fields that would be
/// silently dropped, and the legacy `function` role (module docs).
pub fn check_message_fields(body: &Map<String, Value>) -> Result<(), ApiError> {
    let Some(Value::Array(msgs)) = body.get("messages") else {
        return Ok(());
    }; // type errors: serde's
    for (i, m) in msgs.iter().enumerate() {
        let Some(m) = m.as_object() else { continue };
        for (field, v) in m {
            let param = format!("messages[{i}].{field}");
            match field.as_str() {
                "role" => {
                    if v.as_str() == Some("function") {
                        return Err(ApiError::invalid(&param, "`function` messages (the legacy function-calling API) are not supported; send `tool` messages with a `tool_call_id`"));
                    }
                }
                "content" | "name" | "tool_calls" | "tool_call_id" => {} // checked by `messages`
                f if MESSAGE_EMPTY_ONLY_FIELDS.contains(&f) => {
                    let empty = v.is_null()
                        || v.as_str().is_some_and(str::is_empty)
                        || v.as_array().is_some_and(|a| a.is_empty());
                    if !empty {
                        return Err(ApiError::invalid(
                            &param,
                            format!("`{param}` is not supported by this server (the chat template would drop it); remove it"),
                        ));
                    }
                }
                _ => {
                    return Err(ApiError::invalid(
                        &param,
                        format!("Unrecognized request argument supplied: {param}"),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// A request body type: parsed from JSON bytes with errors naming the field.
pub trait ApiRequest: Sized {
    /// Parses the body and checks its fields.
    fn parse(bytes: &[u8]) -> Result<Self, ApiError>;
}

/// Parses `bytes` as a JSON object whose fields pass [`check_fields`] for `ep`.
fn parse_object(ep: Endpoint, bytes: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::Invalid {
                param: None,
                message: format!("the body is not valid JSON: {e}"),
            }
        } else {
            ApiError::Invalid {
                param: None,
                message: format!("invalid request body: {e}"),
            }
        }
    })?;
    let Value::Object(body) = &v else {
        return Err(ApiError::Invalid {
            param: None,
            message: "invalid request body: expected a JSON object".into(),
        });
    };
    check_fields(ep, body)?;
    if matches!(ep, Endpoint::Chat | Endpoint::Tokenize) {
        check_message_fields(body)?;
    }
    Ok(v)
}

impl ApiRequest for TokenizeRequest {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        from_value(&parse_object(Endpoint::Tokenize, bytes)?)
    }
}

impl ApiRequest for DetokenizeRequest {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        from_value(&parse_object(Endpoint::Detokenize, bytes)?)
    }
}

impl ApiRequest for CompletionRequest {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let v = parse_object(Endpoint::Completions, bytes)?;
        let mut r: Self = from_value(&v)?;
        r.common = from_value(&v)?;
        r.common.constraint = constraint(&v)?;
        Ok(r)
    }
}

impl ApiRequest for ChatRequest {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let v = parse_object(Endpoint::Chat, bytes)?;
        let mut r: Self = from_value(&v)?;
        r.common = from_value(&v)?;
        r.common.constraint = constraint(&v)?;
        Ok(r)
    }
}

/// The structured-output constraint of a body (a 400 naming the field when wrong).
fn constraint(v: &Value) -> Result<Option<crate::guidance::Constraint>, ApiError> {
    let Value::Object(body) = v else {
        return Ok(None);
    };
    crate::guidance::request::parse(body).map_err(|e| ApiError::invalid(&e.param, e.message))
}

/// Deserializes a parsed body into `T`, naming the offending field in the 400.
fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = (path != "." && !path.is_empty()).then_some(path);
        let message = match &param {
            Some(p) => format!("invalid value for `{p}`: {inner}"),
            None => format!("invalid request body: {inner}"),
        };
        ApiError::Invalid { param, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_fields() {
        let e = CompletionRequest::parse(br#"{"prompt":"x","max_tokens":"many"}"#).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "max_tokens", "{e}");
        let e = CompletionRequest::parse(br#"{"prompt":"x","temperature":[1]}"#).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "temperature", "{e}");
        let e = ChatRequest::parse(br#"{"model":"m"}"#).unwrap_err();
        assert!(e.to_string().contains("messages"), "{e}");
        let e = ChatRequest::parse(b"{not json").unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let ok = CompletionRequest::parse(
            br#"{"prompt":[1,2,3],"user":"u","metadata":{"a":1},"seed":-1,"stop":"x"}"#,
        )
        .unwrap();
        assert!(matches!(ok.prompt, PromptInput::Tokens(_)));
        assert_eq!(ok.common.sampling().unwrap().seed, Some(u64::MAX));
        let e = CompletionRequest::parse(br#"{"prompt":"x","unknown_field":{"a":1}}"#).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "unknown_field", "{e}");
        assert!(
            e.to_string()
                .contains("Unrecognized request argument supplied: unknown_field"),
            "{e}"
        );
        let e = CompletionRequest::parse(b"[1]").unwrap_err();
        assert!(e.to_string().contains("JSON object"), "{e}");
    }

    /// Issue 10, observation 7: counts saturate instead of overflowing; negative
    /// and fractional ones are refused naming the field.
    #[test]
    fn counts_saturate_and_refuse_negatives() {
        let r = CompletionRequest::parse(br#"{"prompt":"x","max_tokens":18446744073709551615,"n":1e30,"min_tokens":100000000000000000000000}"#).unwrap();
        assert_eq!(
            (r.max_tokens, r.common.n, r.common.min_tokens),
            (Some(usize::MAX), Some(usize::MAX), Some(usize::MAX))
        );
        for (body, param) in [
            (r#"{"prompt":"x","max_tokens":-1}"#, "max_tokens"),
            (r#"{"prompt":"x","n":-3}"#, "n"),
            (
                r#"{"prompt":"x","min_tokens":-9223372036854775808}"#,
                "min_tokens",
            ),
            (r#"{"prompt":"x","logprobs":-1}"#, "logprobs"),
            (r#"{"prompt":"x","max_tokens":1.5}"#, "max_tokens"),
        ] {
            let e = CompletionRequest::parse(body.as_bytes()).unwrap_err();
            assert_eq!(e.body()["error"]["param"], param, "{body}: {e}");
        }
        for (body, param) in [
            (
                r#"{"messages":[],"max_completion_tokens":-1}"#,
                "max_completion_tokens",
            ),
            (r#"{"messages":[],"top_logprobs":-2}"#, "top_logprobs"),
        ] {
            let e = ChatRequest::parse(body.as_bytes()).unwrap_err();
            assert_eq!(e.body()["error"]["param"], param, "{body}: {e}");
            assert!(e.to_string().contains("non-negative"), "{e}");
        }
    }

    /// Issue 10, observation 5 (request side): unsupported output-changing
    /// fields are refused naming them, unless their value is a no-op.
    #[test]
    fn unsupported_fields_refused_unless_no_op() {
        for (body, param) in [
            (
                r#"{"messages":[],"response_format":{"type":"json_object"},"guided_regex":"a"}"#,
                "guided_regex",
            ),
            (r#"{"messages":[],"functions":[{"name":"f"}]}"#, "functions"),
            (
                r#"{"messages":[],"guided_json":{"type":"objekt"}}"#,
                "guided_json",
            ),
            (
                r#"{"messages":[],"modalities":["text","audio"]}"#,
                "modalities",
            ),
            (r#"{"messages":[],"dry_multiplier":0.8}"#, "dry_multiplier"),
            (r#"{"messages":[],"echo":true}"#, "echo"),
        ] {
            let e = ChatRequest::parse(body.as_bytes()).unwrap_err();
            assert_eq!(e.body()["error"]["param"], param, "{body}: {e}");
        }
        for body in [
            r#"{"messages":[],"response_format":{"type":"text"},"tools":[],"tool_choice":"auto","parallel_tool_calls":true}"#,
            r#"{"messages":[],"tool_choice":"none","functions":null,"function_call":"auto","modalities":["text"],"add_generation_prompt":true}"#,
            r#"{"messages":[],"user":"u","metadata":{"k":"v"},"store":false,"service_tier":"auto","typical_p":1.0,"mirostat":0}"#,
        ] {
            ChatRequest::parse(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
        }
        CompletionRequest::parse(br#"{"prompt":"x","n":3,"best_of":3,"add_special_tokens":true}"#)
            .unwrap();
        CompletionRequest::parse(br#"{"prompt":"x","n":3,"best_of":1}"#).unwrap();
        let e = CompletionRequest::parse(br#"{"prompt":"x","n":2,"best_of":4}"#).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "best_of", "{e}");
        let e =
            TokenizeRequest::parse(br#"{"prompt":"x","tools":[{"type":"function"}]}"#).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "tools", "{e}");
    }

    /// Message fields the template would drop are refused unless empty.
    #[test]
    fn message_fields_refused_unless_empty() {
        for (body, param) in [
            (
                r#"{"messages":[{"role":"function","content":"42","name":"f"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x","function_call":{"name":"f"}}]}"#,
                "messages[0].function_call",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x","weight":1}]}"#,
                "messages[0].weight",
            ),
        ] {
            let e = ChatRequest::parse(body.as_bytes()).unwrap_err();
            assert_eq!(e.body()["error"]["param"], param, "{body}: {e}");
        }
        // An assistant turn as the SDKs send it back.
        let ok = r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y","refusal":null,"tool_calls":[],"function_call":null,"audio":null,"annotations":[]}]}"#;
        ChatRequest::parse(ok.as_bytes()).unwrap();
        // Tool calls and tool results are honoured: they reach the template.
        let body = r#"{"messages":[{"role":"user","content":"x","name":"bob"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},{"role":"tool","content":"42","tool_call_id":"call_1","name":"f"}]}"#;
        let r = ChatRequest::parse(body.as_bytes()).unwrap();
        let msgs = messages(&r.messages).unwrap();
        assert_eq!(msgs[0].name.as_deref(), Some("bob"));
        let calls = msgs[1].tool_calls.as_ref().unwrap();
        assert_eq!(
            (
                calls[0].function.name.as_str(),
                &calls[0].function.arguments
            ),
            ("f", &serde_json::json!({"a": 1}))
        );
        assert_eq!(
            (msgs[2].role.as_str(), msgs[2].tool_call_id.as_deref()),
            ("tool", Some("call_1"))
        );
        let r = ChatRequest::parse(br#"{"messages":[{"role":"tool","content":"42"}]}"#).unwrap();
        assert_eq!(
            messages(&r.messages).unwrap_err().body()["error"]["param"],
            "messages[0].tool_call_id"
        );
        // tools / tool_choice are checked by the tools module, naming the field.
        let r = ChatRequest::parse(br#"{"messages":[],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"nope"}}}}}]}"#).unwrap();
        assert_eq!(
            r.tool_request().unwrap_err().body()["error"]["param"],
            "tools[0].function.parameters.properties.a.type"
        );
        let e = ChatRequest::parse(br#"{"messages":[],"function_call":{"name":"f"}}"#).unwrap_err();
        assert!(
            e.to_string().contains("send `tools` and `tool_choice`"),
            "{e}"
        );
        let r = ChatRequest::parse(br#"{"messages":[],"tool_choice":"required"}"#).unwrap();
        assert_eq!(
            r.tool_request().unwrap_err().body()["error"]["param"],
            "tool_choice"
        );
    }
}
