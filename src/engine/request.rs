//! Requests, sampling parameters, their validation, and the events a request's
//! stream carries back.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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

/// Sampling controls, named as in the OpenAI and vLLM APIs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Most new tokens per completion.
    pub max_tokens: usize,
    /// EOS and stop tokens are ignored until this many tokens were generated.
    pub min_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (-1 or 0 = off).
    pub top_k: i32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// Drop tokens with probability < min_p * max probability; in [0, 1].
    pub min_p: f32,
    /// Multiplicative penalty on logits of tokens seen in prompt or output (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted once from logits of tokens present in the output; in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output; in [-2, 2].
    pub frequency_penalty: f32,
    /// Token id → bias added to its logit; bias in [-100, 100].
    pub logit_bias: HashMap<u32, f32>,
    /// Seed of the counter-based random stream (None: drawn fresh, reported back).
    pub seed: Option<u64>,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
    /// Extra token ids that end a completion.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Return the log-probability of each chosen token and this many top alternatives (0..=20).
    pub logprobs: Option<usize>,
    /// Return log-probabilities of prompt tokens with this many alternatives (0..=20).
    pub prompt_logprobs: Option<usize>,
    /// Completions of this prompt.
    pub n: usize,
    /// Skip special tokens when detokenizing.
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            min_tokens: 0,
            temperature: 1.0,
            top_k: -1,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: HashMap::new(),
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            n: 1,
            skip_special_tokens: true,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self { max_tokens, temperature: 0.0, ..Self::default() }
    }
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
        Self { prompt: Prompt::Text(prompt.into()), params, priority: 0 }
    }
    /// A token prompt with the given parameters.
    pub fn tokens(prompt: Vec<u32>, params: SamplingParams) -> Self {
        Self { prompt: Prompt::Tokens(prompt), params, priority: 0 }
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
