//! Requests and the events a request's stream carries back. Sampling
//! parameters are [`crate::sampling`]'s; checks are [`super::validation`]'s.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::sampling::SamplingParams;

use crate::tokenizer::ChatMessage;

/// What to condition on.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Raw text (special tokens in it are parsed).
    Text(String),
    /// Messages rendered through the model's chat template (with generation prompt).
    Chat(Vec<ChatMessage>),
    /// Token ids as they are.
    Tokens(Vec<u32>),
}

/// A generation request.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt.
    pub prompt: Prompt,
    /// Sampling parameters.
    pub params: SamplingParams,
    /// Scheduling priority inside the engine (lower runs first; default 0).
    pub priority: i32,
}

impl GenerateRequest {
    /// A text prompt with the given parameters.
    pub fn text(prompt: impl Into<String>, params: SamplingParams) -> Self {
        Self {
            prompt: Prompt::Text(prompt.into()),
            params,
            priority: 0,
        }
    }
    /// A token prompt with the given parameters.
    pub fn tokens(prompt: Vec<u32>, params: SamplingParams) -> Self {
        Self {
            prompt: Prompt::Tokens(prompt),
            params,
            priority: 0,
        }
    }
}

/// Why a completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-generation token, stop token or stop string.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
    /// Cancelled by the caller (explicitly or by dropping the stream) or by shutdown.
    Abort,
    /// Internal failure.
    Error,
}

impl FinishReason {
    /// The OpenAI/vLLM spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
        }
    }
}

/// Token counts of a finished completion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens of this completion.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// Latencies of a finished completion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Submission → first scheduled.
    pub queue: Duration,
    /// Submission → first token.
    pub ttft: Duration,
    /// Submission → finish.
    pub e2e: Duration,
}

/// One token with its log-probability and the top alternatives.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// Token id.
    pub token: u32,
    /// log p(token) under the model's raw distribution (before any processor).
    pub logprob: f32,
    /// Most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// What a request's stream carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Accepted: prompt tokens and the seed in use (first event of every request).
    Started {
        /// Prompt token ids.
        prompt_tokens: Vec<u32>,
        /// Seed of the random stream.
        seed: u64,
    },
    /// Log-probabilities of the prompt tokens (the first has none), when requested.
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// A generated token of completion `index`, with the text it completes.
    Token {
        /// Completion index (0..n).
        index: usize,
        /// The token and its log-probabilities.
        token: TokenLogprob,
        /// Newly decodable text (may be empty while bytes or a stop string are pending).
        text: String,
    },
    /// Completion `index` ended.
    Finished {
        /// Completion index.
        index: usize,
        /// Why.
        reason: FinishReason,
        /// Text held back and released at the end (normally empty).
        text: String,
        /// Token counts.
        usage: Usage,
        /// Latencies.
        timings: Timings,
    },
    /// The request was rejected or failed; no more events follow.
    Error(crate::engine::EngineError),
}
