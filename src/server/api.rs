//! Request bodies of the OpenAI-compatible API (and vLLM's extensions), and
//! their conversion to engine [`SamplingParams`]. No engine logic here.
//!
//! Unknown fields are ignored, as OpenAI does; a wrong type or range is a 400
//! naming the field (the JSON path comes from `serde_path_to_error`).

use std::collections::HashMap;

use serde::Deserialize;

use super::error::ApiError;
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

/// Sampling fields shared by completions and chat.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CommonParams {
    /// Model name; must be the served name when present.
    pub model: Option<String>,
    /// Completions per prompt.
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
    pub min_tokens: Option<usize>,
    /// vLLM: skip special tokens when detokenizing (default true).
    pub skip_special_tokens: Option<bool>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Scheduling priority inside the tenant (lower first; vLLM extension).
    pub priority: Option<i32>,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt(s).
    pub prompt: PromptInput,
    /// Most new tokens (default 16).
    pub max_tokens: Option<usize>,
    /// Log-probabilities of this many top tokens (0..=20).
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
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<MessageInput>,
    /// Most new tokens (deprecated name).
    pub max_tokens: Option<usize>,
    /// Most new tokens (takes precedence).
    pub max_completion_tokens: Option<usize>,
    /// Return log-probabilities of chosen tokens.
    pub logprobs: Option<bool>,
    /// With `logprobs`: this many alternatives (0..=20).
    pub top_logprobs: Option<usize>,
    /// Shared sampling fields (parsed separately by [`ApiRequest::parse`], so
    /// errors keep their field path; serde's `flatten` would lose it).
    #[serde(skip)]
    pub common: CommonParams,
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
        return Err(ApiError::invalid("messages", "`messages` must contain at least one message"));
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
                                format!("content part type `{}` is not supported (only `text`)", p.kind),
                            ));
                        }
                        s.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    s
                }
            };
            Ok(ChatMessage { role: m.role.clone(), content })
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
                let id: u32 = k
                    .trim()
                    .parse()
                    .map_err(|_| ApiError::invalid("logit_bias", format!("logit_bias keys must be token ids, got {k:?}")))?;
                p.logit_bias.insert(id, b);
            }
        }
        if let Some(s) = &self.seed {
            // Negative seeds are valid in OpenAI's API: use their two's-complement bits.
            let v = s.as_u64().or_else(|| s.as_i64().map(|i| i as u64));
            p.seed = Some(v.ok_or_else(|| ApiError::invalid("seed", format!("seed must be a 64-bit integer, got {s}")))?);
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
        Ok(p)
    }

    /// Whether to stream, and whether to send a usage chunk.
    pub fn streaming(&self) -> (bool, bool) {
        let stream = self.stream.unwrap_or(false);
        let usage = stream && self.stream_options.as_ref().is_some_and(|o| o.include_usage);
        (stream, usage)
    }
}

/// A request body type: parsed from JSON bytes with errors naming the field.
pub trait ApiRequest: Sized {
    /// Parses the body.
    fn parse(bytes: &[u8]) -> Result<Self, ApiError>;
}

macro_rules! plain_request {
    ($($t:ty),*) => {$(
        impl ApiRequest for $t {
            fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
                parse_json(bytes)
            }
        }
    )*};
}
plain_request!(TokenizeRequest, DetokenizeRequest);

impl ApiRequest for CompletionRequest {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let mut r: Self = parse_json(bytes)?;
        r.common = parse_json(bytes)?;
        Ok(r)
    }
}

impl ApiRequest for ChatRequest {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let mut r: Self = parse_json(bytes)?;
        r.common = parse_json(bytes)?;
        Ok(r)
    }
}

/// Parses a JSON body into `T`, naming the offending field in the 400.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::Invalid { param: None, message: format!("the body is not valid JSON: {inner}") };
        }
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
        let ok = CompletionRequest::parse(br#"{"prompt":[1,2,3],"unknown_field":{"a":1},"seed":-1,"stop":"x"}"#).unwrap();
        assert!(matches!(ok.prompt, PromptInput::Tokens(_)));
        assert_eq!(ok.common.sampling().unwrap().seed, Some(u64::MAX));
    }
}
