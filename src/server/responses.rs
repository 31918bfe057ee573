//! Response bodies of the OpenAI-compatible API as serde structs (TGI's
//! `ChatCompletion` / `ChatCompletionChunk` naming): what `/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`, `/tokenize`, `/detokenize`, `/health`
//! and `/ready` answer, and the SSE chunks of streams.
//!
//! The shapes are OpenAI's: `Option` fields that OpenAI sends as `null`
//! (`logprobs`, `finish_reason`) serialize as `null`; fields OpenAI leaves out
//! are skipped (`usage` of chunks without `stream_options.include_usage`,
//! empty `delta` members). Log-probabilities are `f64` (widened from the
//! engine's `f32`) so the numbers print as before. Error bodies are built by
//! [`super::error`]. Owns: shapes only; filling them is [`super::stream`]'s.

use std::collections::BTreeMap;

use serde::Serialize;

/// `usage` of a response (or of the last chunk of a stream).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Usage {
    /// Prompt tokens over all prompts.
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// `prompt_tokens + completion_tokens`.
    pub total_tokens: usize,
    /// Prompt-cache details.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// A token → log-probability map (`top_logprobs` entries of completions).
pub type TopLogprobMap = BTreeMap<String, f64>;

/// `logprobs` of a completions choice (legacy parallel-array shape).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Log-probability of each token (`null` for the first prompt token).
    pub token_logprobs: Vec<Option<f64>>,
    /// Top alternatives of each token (`null` where `token_logprobs` is).
    pub top_logprobs: Vec<Option<TopLogprobMap>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends `other`'s entries (prompt entries, then generated ones).
    pub fn extend(&mut self, other: CompletionLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }
}

/// One choice of a completion (or of a completion chunk).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompletionChoice {
    /// `prompt index × n + completion index`.
    pub index: usize,
    /// Text (of the whole choice, or of this chunk).
    pub text: String,
    /// Log-probabilities when requested.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop`, `length`, `abort`…; `null` until the choice ends.
    pub finish_reason: Option<&'static str>,
}

/// `POST /v1/completions` body (`object: "text_completion"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Completion {
    /// `cmpl-…`.
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices, prompt-major.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// A streamed completions chunk (OpenAI also calls it `text_completion`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompletionChunk {
    /// The request's id.
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// One choice, or none in the final usage chunk.
    pub choices: Vec<CompletionChoice>,
    /// Absent without `include_usage`; `null` on all chunks but the last with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One alternative of a chat token's `top_logprobs`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatTopLogprob {
    /// Token text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// Its raw bytes.
    pub bytes: Vec<u8>,
}

/// One chosen token of a chat `logprobs.content` list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// Its raw bytes.
    pub bytes: Vec<u8>,
    /// The `top_logprobs` most likely alternatives.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// `logprobs` of a chat choice.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatLogprobs {
    /// Per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// The assistant message of a chat choice.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatMessageOut {
    /// Always `assistant`.
    pub role: &'static str,
    /// Generated text (`null` when tool calls took all of it).
    pub content: Option<String>,
    /// The tool calls parsed from the output (absent without tools).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// One entry of a message's `tool_calls`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolCallOut {
    /// `call_…`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The function called.
    pub function: FunctionOut,
}

/// `tool_calls[].function`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FunctionOut {
    /// Function name.
    pub name: String,
    /// The arguments: a JSON object, as a string.
    pub arguments: String,
}

/// One entry of a chunk's `delta.tool_calls`: the first of a call carries
/// `id`, `type` and `function.name`; later ones add `function.arguments` text.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolCallDelta {
    /// Position of the call in the message's `tool_calls`.
    pub index: usize,
    /// The call's id (first delta only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first delta only).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// Name and/or arguments text.
    pub function: FunctionDelta,
}

/// `delta.tool_calls[].function`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FunctionDelta {
    /// Function name (first delta only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// More arguments text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// One choice of a chat completion.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatChoice {
    /// Completion index.
    pub index: usize,
    /// The generated message.
    pub message: ChatMessageOut,
    /// Log-probabilities when requested.
    pub logprobs: Option<ChatLogprobs>,
    /// Why it ended.
    pub finish_reason: Option<&'static str>,
}

/// `POST /v1/chat/completions` body (`object: "chat.completion"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// `delta` of a chat chunk: members are present only when they change.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChatDelta {
    /// `assistant`, on each choice's first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// New or growing tool calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One choice of a chat chunk.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatChunkChoice {
    /// Completion index.
    pub index: usize,
    /// What changed.
    pub delta: ChatDelta,
    /// Log-probabilities of this chunk's tokens when requested.
    pub logprobs: Option<ChatLogprobs>,
    /// Set on the last chunk of the choice.
    pub finish_reason: Option<&'static str>,
}

/// A streamed chat chunk (`object: "chat.completion.chunk"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatCompletionChunk {
    /// The request's id.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// One choice, or none in the final usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// Absent without `include_usage`; `null` on all chunks but the last with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// A streamed chunk of either API.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Chunk {
    /// `/v1/completions`.
    Completion(CompletionChunk),
    /// `/v1/chat/completions`.
    Chat(ChatCompletionChunk),
}

/// One entry of `GET /v1/models`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelCard {
    /// Served model name.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds the server started.
    pub created: u64,
    /// Always `brigade`.
    pub owned_by: &'static str,
    /// The served name again (vLLM).
    pub root: String,
    /// Longest prompt + completion in tokens (vLLM).
    pub max_model_len: usize,
}

/// `GET /v1/models` body.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The one served model.
    pub data: Vec<ModelCard>,
}

/// `POST /tokenize` body (vLLM).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// Longest prompt + completion in tokens.
    pub max_model_len: usize,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Each token's text with `return_token_strs`, else `null`.
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize` body (vLLM).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DetokenizeResponse {
    /// The decoded text.
    pub prompt: String,
}

/// `GET /health` and `GET /ready` bodies.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatusResponse {
    /// `ok` or `ready`.
    pub status: &'static str,
    /// Served model name (`/ready` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The typed bodies serialize exactly as the `json!` bodies they replaced.
    #[test]
    fn shapes_match_the_openai_bodies() {
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            total_tokens: 5,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: 1 },
        };
        let chunk = CompletionChunk {
            id: "cmpl-1".into(),
            object: "text_completion",
            created: 7,
            model: "m".into(),
            choices: vec![CompletionChoice {
                index: 0,
                text: "a".into(),
                logprobs: None,
                finish_reason: None,
            }],
            usage: Some(None),
        };
        assert_eq!(
            serde_json::to_value(&chunk).unwrap(),
            json!({"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m", "choices": [{"index": 0, "text": "a", "logprobs": null, "finish_reason": null}], "usage": null})
        );
        let last = CompletionChunk {
            choices: vec![],
            usage: Some(Some(usage.clone())),
            ..chunk.clone()
        };
        assert_eq!(
            serde_json::to_value(&last).unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"],
            1
        );
        let plain = CompletionChunk {
            usage: None,
            ..chunk
        };
        assert!(serde_json::to_value(&plain).unwrap().get("usage").is_none());
        let first = ChatChunkChoice {
            index: 1,
            delta: ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
                tool_calls: None,
            },
            logprobs: None,
            finish_reason: None,
        };
        assert_eq!(
            serde_json::to_value(&first).unwrap(),
            json!({"index": 1, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})
        );
        let end = ChatChunkChoice {
            index: 0,
            delta: ChatDelta::default(),
            logprobs: None,
            finish_reason: Some("stop"),
        };
        assert_eq!(
            serde_json::to_value(&end).unwrap(),
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"})
        );
        let lp = CompletionLogprobs {
            tokens: vec!["a".into(), "b".into()],
            token_logprobs: vec![None, Some(-0.5)],
            top_logprobs: vec![None, Some(BTreeMap::from([("b".to_string(), -0.5)]))],
            text_offset: vec![0, 1],
        };
        assert_eq!(
            serde_json::to_value(&lp).unwrap(),
            json!({"tokens": ["a", "b"], "token_logprobs": [null, -0.5], "top_logprobs": [null, {"b": -0.5}], "text_offset": [0, 1]})
        );
        let msg = ChatMessageOut {
            role: "assistant",
            content: None,
            tool_calls: Some(vec![ToolCallOut {
                id: "call_1".into(),
                kind: "function",
                function: FunctionOut {
                    name: "f".into(),
                    arguments: "{}".into(),
                },
            }]),
        };
        assert_eq!(
            serde_json::to_value(&msg).unwrap(),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        );
        let plain = ChatMessageOut {
            role: "assistant",
            content: Some("hi".into()),
            tool_calls: None,
        };
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            json!({"role": "assistant", "content": "hi"})
        );
        let head = ToolCallDelta {
            index: 0,
            id: Some("call_1".into()),
            kind: Some("function"),
            function: FunctionDelta {
                name: Some("f".into()),
                arguments: Some(String::new()),
            },
        };
        let more = ToolCallDelta {
            index: 0,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: Some("{}".into()),
            },
        };
        let delta = ChatDelta {
            tool_calls: Some(vec![head, more]),
            ..ChatDelta::default()
        };
        assert_eq!(
            serde_json::to_value(&delta).unwrap(),
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}, {"index": 0, "function": {"arguments": "{}"}}]})
        );
        let t = TokenizeResponse {
            count: 1,
            max_model_len: 9,
            tokens: vec![4],
            token_strs: None,
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"count": 1, "max_model_len": 9, "tokens": [4], "token_strs": null})
        );
        assert_eq!(
            serde_json::to_value(StatusResponse {
                status: "ok",
                model: None
            })
            .unwrap(),
            json!({"status": "ok"})
        );
    }
}
