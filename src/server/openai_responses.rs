//! The OpenAI Responses API: `POST /v1/responses`, `GET` / `DELETE
//! /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`, and the bounded
//! in-memory store behind them.
//!
//! A Responses request is **translated** into the body of a chat request and
//! run through the one chat path ([`super::api::ChatRequest::parse`], then
//! [`super::routes::chat_completions`]: the same validation, admission, engine
//! and stream code), so constraints (`text.format` → `response_format`) and
//! tools come through exactly as chat handles them. The chat stream that comes
//! back (always streamed internally, with usage) is translated into the
//! Responses shapes by one [`Translator`]: typed SSE events for `stream: true`,
//! the final response object otherwise.
//!
//! ```text
//!  Responses body ─check fields─► translate ─► chat body ─► ChatRequest::parse ─► chat_completions
//!       ▲                                                                              │ SSE chunks
//!       └── response object / typed events ◄── Translator ◄── chat_frames ◄────────────┘
//!  400s of the chat side name the Responses field (`max_tokens` → `max_output_tokens`,
//!  `messages[k]` → `input[i]`, `response_format` → `text.format`, `tools[i].function.x` → `tools[i].x`)
//! ```
//!
//! # Fields
//! - honoured: `model`, `input` (a string, or items: messages with `role` +
//!   content as a string or `input_text` / `output_text` parts;
//!   `function_call` and `function_call_output` items, handed to chat as
//!   assistant `tool_calls` and `tool` messages), `instructions`,
//!   `max_output_tokens`, `temperature`, `top_p`, `text.format` (`text`,
//!   `json_schema`, `json_object`), `tools` (function tools, flat),
//!   `tool_choice`, `parallel_tool_calls`, `stream`, `store` (default true),
//!   `previous_response_id` (the stored conversation, then this input; the
//!   previous `instructions` are not carried over, as OpenAI does), and the
//!   sampling extensions chat honours (`top_k`, `min_p`, `repetition_penalty`,
//!   `presence_penalty`, `frequency_penalty`, `seed`, `priority`);
//! - bookkeeping, echoed or ignored: `metadata` (≤ 16 string pairs), `user`,
//!   `service_tier`, `safety_identifier`, `prompt_cache_key`;
//! - accepted only as no-ops: `background: false`, `include: []`,
//!   `truncation: "disabled"`, `reasoning: null`/`{}`, `max_tool_calls: null`,
//!   `top_logprobs: 0`, `stream_options` (`include_obfuscation`: no padding is
//!   sent either way), `conversation: null`, `prompt: null`,
//!   `text.verbosity: "medium"`;
//! - anything else: 400 naming it.
//!
//! # Store
//! At most `server.responses_store_max` responses (oldest evicted first), each
//! visible only to the tenant that made it; an unknown id is a 404 (`GET`,
//! `DELETE`) or a 400 naming `previous_response_id`. Owns: the translation and
//! the store. Does not own: validation or generation (chat's).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Mutex;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures_util::stream::{self as fstream, Stream, StreamExt};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::api::{ApiRequest, ChatRequest};
use super::error::ApiError;
use super::routes::{self, Body, Tenant};
use super::App;

// ---------------------------------------------------------------- shapes

/// `usage` of a response.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ResponseUsage {
    /// Prompt tokens (the whole conversation as rendered).
    pub input_tokens: usize,
    /// Prompt-cache details.
    pub input_tokens_details: InputTokensDetails,
    /// Generated tokens.
    pub output_tokens: usize,
    /// Reasoning details (always 0 reasoning tokens).
    pub output_tokens_details: OutputTokensDetails,
    /// `input_tokens + output_tokens`.
    pub total_tokens: usize,
}

/// `usage.input_tokens_details`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct InputTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// `usage.output_tokens_details`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OutputTokensDetails {
    /// Always 0 (no reasoning models).
    pub reasoning_tokens: usize,
}

/// One `output_text` content part of a message item.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutputText {
    /// Always `output_text`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The text.
    pub text: String,
    /// Always empty.
    pub annotations: Vec<Value>,
    /// Always empty (log-probabilities are not offered here).
    pub logprobs: Vec<Value>,
}

impl OutputText {
    fn new(text: String) -> Self {
        Self {
            kind: "output_text",
            text,
            annotations: Vec::new(),
            logprobs: Vec::new(),
        }
    }
}

/// An item of `output`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    /// The assistant's text.
    Message {
        /// `msg_…`.
        id: String,
        /// `in_progress`, `completed` or `incomplete`.
        status: &'static str,
        /// Always `assistant`.
        role: &'static str,
        /// The text parts (one).
        content: Vec<OutputText>,
    },
    /// A call of a function tool.
    FunctionCall {
        /// `fc_…`.
        id: String,
        /// The call's id (`call_…`), answered by a `function_call_output` item.
        call_id: String,
        /// Function name.
        name: String,
        /// Arguments, a JSON text.
        arguments: String,
        /// `in_progress` or `completed`.
        status: &'static str,
    },
}

/// `incomplete_details`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IncompleteDetails {
    /// `max_output_tokens`, or `abort` (the server stopped the request).
    pub reason: &'static str,
}

/// `error` of a failed response.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResponseError {
    /// `server_error`, `rate_limit_exceeded`, `invalid_prompt`…
    pub code: String,
    /// What went wrong.
    pub message: String,
}

/// `reasoning` (always empty).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Reasoning {
    /// Always null.
    pub effort: Option<String>,
    /// Always null.
    pub summary: Option<String>,
}

/// `text` of a response.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TextConfig {
    /// The requested format (`{"type": "text"}` by default).
    pub format: Value,
    /// Always `medium`.
    pub verbosity: &'static str,
}

/// The response object (`object: "response"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResponseObject {
    /// `resp_…`.
    pub id: String,
    /// Always `response`.
    pub object: &'static str,
    /// Unix seconds.
    pub created_at: u64,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    pub status: &'static str,
    /// Always false.
    pub background: bool,
    /// Set when `failed`.
    pub error: Option<ResponseError>,
    /// Set when `incomplete`.
    pub incomplete_details: Option<IncompleteDetails>,
    /// The request's `instructions`.
    pub instructions: Option<String>,
    /// The request's `max_output_tokens`.
    pub max_output_tokens: Option<usize>,
    /// Always null.
    pub max_tool_calls: Option<usize>,
    /// The model name (as requested, or the primary served name).
    pub model: String,
    /// Output items in order.
    pub output: Vec<OutputItem>,
    /// The request's `parallel_tool_calls` (default true).
    pub parallel_tool_calls: bool,
    /// The request's `previous_response_id`.
    pub previous_response_id: Option<String>,
    /// Always empty.
    pub reasoning: Reasoning,
    /// Always `default`.
    pub service_tier: &'static str,
    /// Whether the response is stored.
    pub store: bool,
    /// Sampling temperature in force.
    pub temperature: f64,
    /// Text format.
    pub text: TextConfig,
    /// The request's `tool_choice` (default `auto`).
    pub tool_choice: Value,
    /// The request's tools (Responses shape).
    pub tools: Vec<Value>,
    /// Always 0.
    pub top_logprobs: usize,
    /// Nucleus mass in force.
    pub top_p: f64,
    /// Always `disabled`.
    pub truncation: &'static str,
    /// Token counts (null until the response ends).
    pub usage: Option<ResponseUsage>,
    /// The request's `user`.
    pub user: Option<String>,
    /// The request's `metadata` (`{}` by default).
    pub metadata: Map<String, Value>,
}

/// A streamed event (`event: <type>` + `data: {...}` with `type` and `sequence_number`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum StreamEvent {
    /// The response exists (status `in_progress`).
    #[serde(rename = "response.created")]
    Created {
        /// Position in the stream, from 0.
        sequence_number: u64,
        /// The response so far.
        response: Box<ResponseObject>,
    },
    /// Generation runs.
    #[serde(rename = "response.in_progress")]
    InProgress {
        /// Position in the stream.
        sequence_number: u64,
        /// The response so far.
        response: Box<ResponseObject>,
    },
    /// An output item starts.
    #[serde(rename = "response.output_item.added")]
    OutputItemAdded {
        /// Position in the stream.
        sequence_number: u64,
        /// Index in `output`.
        output_index: usize,
        /// The item, in progress.
        item: OutputItem,
    },
    /// A content part of a message starts.
    #[serde(rename = "response.content_part.added")]
    ContentPartAdded {
        /// Position in the stream.
        sequence_number: u64,
        /// The message item.
        item_id: String,
        /// Index in `output`.
        output_index: usize,
        /// Index in the item's `content`.
        content_index: usize,
        /// The part, empty.
        part: OutputText,
    },
    /// New text.
    #[serde(rename = "response.output_text.delta")]
    OutputTextDelta {
        /// Position in the stream.
        sequence_number: u64,
        /// The message item.
        item_id: String,
        /// Index in `output`.
        output_index: usize,
        /// Index in the item's `content`.
        content_index: usize,
        /// The new text.
        delta: String,
        /// Always empty.
        logprobs: Vec<Value>,
    },
    /// The part's whole text.
    #[serde(rename = "response.output_text.done")]
    OutputTextDone {
        /// Position in the stream.
        sequence_number: u64,
        /// The message item.
        item_id: String,
        /// Index in `output`.
        output_index: usize,
        /// Index in the item's `content`.
        content_index: usize,
        /// The whole text.
        text: String,
        /// Always empty.
        logprobs: Vec<Value>,
    },
    /// A content part ends.
    #[serde(rename = "response.content_part.done")]
    ContentPartDone {
        /// Position in the stream.
        sequence_number: u64,
        /// The message item.
        item_id: String,
        /// Index in `output`.
        output_index: usize,
        /// Index in the item's `content`.
        content_index: usize,
        /// The whole part.
        part: OutputText,
    },
    /// New argument text of a function call.
    #[serde(rename = "response.function_call_arguments.delta")]
    FunctionCallArgumentsDelta {
        /// Position in the stream.
        sequence_number: u64,
        /// The function-call item.
        item_id: String,
        /// Index in `output`.
        output_index: usize,
        /// The new text.
        delta: String,
    },
    /// A function call's whole arguments.
    #[serde(rename = "response.function_call_arguments.done")]
    FunctionCallArgumentsDone {
        /// Position in the stream.
        sequence_number: u64,
        /// The function-call item.
        item_id: String,
        /// Index in `output`.
        output_index: usize,
        /// Function name.
        name: String,
        /// The whole arguments.
        arguments: String,
    },
    /// An output item ends.
    #[serde(rename = "response.output_item.done")]
    OutputItemDone {
        /// Position in the stream.
        sequence_number: u64,
        /// Index in `output`.
        output_index: usize,
        /// The whole item.
        item: OutputItem,
    },
    /// The response ended (status `completed`).
    #[serde(rename = "response.completed")]
    Completed {
        /// Position in the stream.
        sequence_number: u64,
        /// The whole response.
        response: Box<ResponseObject>,
    },
    /// The response ended early (status `incomplete`: `max_output_tokens`, or aborted).
    #[serde(rename = "response.incomplete")]
    Incomplete {
        /// Position in the stream.
        sequence_number: u64,
        /// The whole response.
        response: Box<ResponseObject>,
    },
    /// The response failed (status `failed`, with `error`).
    #[serde(rename = "response.failed")]
    Failed {
        /// Position in the stream.
        sequence_number: u64,
        /// The response, with its error.
        response: Box<ResponseObject>,
    },
}

impl StreamEvent {
    /// The `type` (the SSE `event:` name).
    pub fn kind(&self) -> &'static str {
        match self {
            StreamEvent::Created { .. } => "response.created",
            StreamEvent::InProgress { .. } => "response.in_progress",
            StreamEvent::OutputItemAdded { .. } => "response.output_item.added",
            StreamEvent::ContentPartAdded { .. } => "response.content_part.added",
            StreamEvent::OutputTextDelta { .. } => "response.output_text.delta",
            StreamEvent::OutputTextDone { .. } => "response.output_text.done",
            StreamEvent::ContentPartDone { .. } => "response.content_part.done",
            StreamEvent::FunctionCallArgumentsDelta { .. } => {
                "response.function_call_arguments.delta"
            }
            StreamEvent::FunctionCallArgumentsDone { .. } => {
                "response.function_call_arguments.done"
            }
            StreamEvent::OutputItemDone { .. } => "response.output_item.done",
            StreamEvent::Completed { .. } => "response.completed",
            StreamEvent::Incomplete { .. } => "response.incomplete",
            StreamEvent::Failed { .. } => "response.failed",
        }
    }

    /// The SSE frame: `event: <type>\ndata: <json>\n\n`.
    fn frame(&self) -> Bytes {
        match serde_json::to_string(self) {
            Ok(s) => Bytes::from(format!("event: {}\ndata: {s}\n\n", self.kind())),
            Err(e) => Bytes::from(format!(
                "event: error\ndata: {}\n\n",
                json!({"type": "error", "message": format!("serializing an event failed: {e}")})
            )),
        }
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

// ---------------------------------------------------------------- the store

/// A stored response: what `GET` returns and what `previous_response_id` continues.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The tenant that made it (others get 404).
    pub tenant: usize,
    /// The final response object.
    pub response: ResponseObject,
    /// The conversation as chat messages (without `instructions`), output included.
    pub conversation: Vec<Value>,
    /// This request's input items, with ids (`input_items`).
    pub input_items: Vec<Value>,
}

/// The bounded in-memory store of responses (oldest evicted first).
#[derive(Debug)]
pub struct ResponseStore {
    capacity: usize,
    inner: Mutex<StoreInner>,
}

#[derive(Debug, Default)]
struct StoreInner {
    map: HashMap<String, Stored>,
    order: VecDeque<String>,
}

impl ResponseStore {
    /// An empty store of at most `capacity` (>= 1) responses.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(StoreInner::default()),
        }
    }

    /// Stores `s` under its response id, evicting the oldest beyond capacity.
    pub fn put(&self, s: Stored) {
        let Ok(mut g) = self.inner.lock() else { return };
        let id = s.response.id.clone();
        if g.map.insert(id.clone(), s).is_none() {
            g.order.push_back(id);
        }
        while g.map.len() > self.capacity {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            g.map.remove(&old);
        }
    }

    /// The stored response `id` of `tenant`.
    pub fn get(&self, id: &str, tenant: usize) -> Option<Stored> {
        let g = self.inner.lock().ok()?;
        g.map.get(id).filter(|s| s.tenant == tenant).cloned()
    }

    /// Deletes `id` of `tenant`; false when there is none.
    pub fn remove(&self, id: &str, tenant: usize) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        if g.map.get(id).is_none_or(|s| s.tenant != tenant) {
            return false;
        }
        g.map.remove(id);
        g.order.retain(|x| x != id);
        true
    }

    /// Responses stored now.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.map.len()).unwrap_or(0)
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------- request → chat

/// The body of `POST /v1/responses` (a JSON object; fields checked by [`translate`]).
#[derive(Clone, Debug)]
pub struct ResponsesBody(pub Map<String, Value>);

impl ApiRequest for ResponsesBody {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::Invalid {
            param: None,
            message: if e.is_syntax() || e.is_eof() {
                format!("the body is not valid JSON: {e}")
            } else {
                format!("invalid request body: {e}")
            },
        })?;
        match v {
            Value::Object(m) => Ok(ResponsesBody(m)),
            _ => Err(ApiError::Invalid {
                param: None,
                message: "invalid request body: expected a JSON object".into(),
            }),
        }
    }
}

/// Honoured fields handled here.
const HONOURED: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "text",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "stream",
    "store",
    "previous_response_id",
    "metadata",
    "user",
];
/// Sampling extensions handed to chat unchanged (chat honours and checks them).
const PASSTHROUGH: &[&str] = &[
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "priority",
];
/// Accepted and ignored: they do not change what is generated.
const BOOKKEEPING: &[&str] = &["service_tier", "safety_identifier", "prompt_cache_key"];

/// Whether `v` is the no-op value of a known but unsupported field (`None`: not such a field).
fn no_op(field: &str, v: &Value) -> Option<bool> {
    let empty_obj = |v: &Value| {
        v.as_object()
            .is_some_and(|o| o.values().all(Value::is_null))
    };
    Some(match field {
        "background" => v == false,
        "include" => v.as_array().is_some_and(Vec::is_empty),
        "truncation" => v == "disabled",
        "reasoning" => empty_obj(v),
        "max_tool_calls" | "conversation" | "prompt" => false,
        "top_logprobs" => v.as_u64() == Some(0),
        "stream_options" => v.as_object().is_some_and(|o| {
            o.iter()
                .all(|(k, x)| k == "include_obfuscation" && (x.is_boolean() || x.is_null()))
        }),
        _ => return None,
    })
}

fn unsupported(field: &str, why: &str) -> ApiError {
    ApiError::invalid(
        field,
        format!("`{field}` {why}; this server does not support it"),
    )
}

/// A validated Responses request: the chat body it becomes, and how to name
/// its fields in errors and in the response object.
#[derive(Debug)]
pub struct Translation {
    /// The chat request body.
    pub chat: Map<String, Value>,
    /// For each chat message: the Responses field it came from.
    origins: Vec<String>,
    /// The conversation (previous + this input) as chat messages, without instructions.
    pub conversation: Vec<Value>,
    /// This request's input items, with ids.
    pub input_items: Vec<Value>,
    /// The response object before any output (status `in_progress`).
    pub skeleton: ResponseObject,
    /// `stream`.
    pub stream: bool,
}

/// Builds the chat body of a Responses request (checking every field), given
/// the stored previous response when `previous_response_id` names one.
pub fn translate(
    body: &Map<String, Value>,
    previous: Option<&Stored>,
    default_model: &str,
) -> Result<Translation, ApiError> {
    for (field, v) in body {
        let f = field.as_str();
        if HONOURED.contains(&f)
            || PASSTHROUGH.contains(&f)
            || BOOKKEEPING.contains(&f)
            || v.is_null()
        {
            continue;
        }
        match no_op(f, v) {
            Some(true) => {}
            Some(false) => return Err(unsupported(f, &format!("with value {v}"))),
            None => {
                return Err(ApiError::invalid(
                    f,
                    format!("Unrecognized request argument supplied: {f}"),
                ))
            }
        }
    }
    let get = |k: &str| body.get(k).filter(|v| !v.is_null());
    let string = |k: &str| -> Result<Option<String>, ApiError> {
        match get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(ApiError::invalid(
                k,
                format!("invalid value for `{k}`: expected a string, got {v}"),
            )),
        }
    };
    let boolean = |k: &str, default: bool| -> Result<bool, ApiError> {
        match get(k) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ApiError::invalid(
                k,
                format!("invalid value for `{k}`: expected a boolean, got {v}"),
            )),
        }
    };
    let number = |k: &str| -> Result<Option<f64>, ApiError> {
        match get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                ApiError::invalid(
                    k,
                    format!("invalid value for `{k}`: expected a number, got {v}"),
                )
            }),
        }
    };
    let model = string("model")?;
    let instructions = string("instructions")?;
    let user = string("user")?;
    let stream = boolean("stream", false)?;
    let store = boolean("store", true)?;
    let parallel = boolean("parallel_tool_calls", true)?;
    let temperature = number("temperature")?;
    let top_p = number("top_p")?;
    let metadata = check_metadata(get("metadata"))?;
    let max_output_tokens = match get("max_output_tokens") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                .ok_or_else(|| ApiError::invalid("max_output_tokens", format!("invalid value for `max_output_tokens`: must be a non-negative integer, got {v}")))?,
        ),
    };

    let mut chat = Map::new();
    if let Some(m) = &model {
        chat.insert("model".into(), Value::String(m.clone()));
    }
    // Messages: instructions, the previous conversation, this input.
    let mut messages: Vec<Value> = Vec::new();
    let mut origins: Vec<String> = Vec::new();
    if let Some(i) = &instructions {
        messages.push(json!({"role": "system", "content": i}));
        origins.push("instructions".into());
    }
    let mut conversation = previous.map(|p| p.conversation.clone()).unwrap_or_default();
    for m in &conversation {
        messages.push(m.clone());
        origins.push("previous_response_id".into());
    }
    let (input_msgs, input_origins, input_items) = input_messages(get("input"))?;
    messages.extend(input_msgs.iter().cloned());
    origins.extend(input_origins);
    conversation.extend(input_msgs);
    chat.insert("messages".into(), Value::Array(messages));

    if let Some(n) = max_output_tokens {
        chat.insert("max_tokens".into(), json!(n));
    }
    for k in ["temperature", "top_p"] {
        if let Some(v) = get(k) {
            chat.insert(k.into(), v.clone());
        }
    }
    for k in PASSTHROUGH {
        if let Some(v) = get(k) {
            chat.insert((*k).into(), v.clone());
        }
    }
    let format = match get("text") {
        None => json!({"type": "text"}),
        Some(t) => text_format(t, &mut chat)?,
    };
    let tools = match get("tools") {
        None => Vec::new(),
        Some(t) => {
            let (responses_tools, chat_tools) = tools_of(t)?;
            if !chat_tools.is_empty() {
                chat.insert("tools".into(), Value::Array(chat_tools));
            }
            responses_tools
        }
    };
    let tool_choice = match get("tool_choice") {
        None => json!("auto"),
        Some(tc) => {
            chat.insert("tool_choice".into(), tool_choice_of(tc)?);
            tc.clone()
        }
    };
    if get("parallel_tool_calls").is_some() {
        chat.insert("parallel_tool_calls".into(), Value::Bool(parallel));
    }
    chat.insert("stream".into(), Value::Bool(true));
    chat.insert("stream_options".into(), json!({"include_usage": true}));

    let skeleton = ResponseObject {
        id: new_id("resp_"),
        object: "response",
        created_at: super::unix_now(),
        status: "in_progress",
        background: false,
        error: None,
        incomplete_details: None,
        instructions,
        max_output_tokens,
        max_tool_calls: None,
        model: model.unwrap_or_else(|| default_model.to_string()),
        output: Vec::new(),
        parallel_tool_calls: parallel,
        previous_response_id: previous.map(|p| p.response.id.clone()),
        reasoning: Reasoning::default(),
        service_tier: "default",
        store,
        temperature: temperature.unwrap_or(1.0),
        text: TextConfig {
            format,
            verbosity: "medium",
        },
        tool_choice,
        tools,
        top_logprobs: 0,
        top_p: top_p.unwrap_or(1.0),
        truncation: "disabled",
        usage: None,
        user,
        metadata,
    };
    Ok(Translation {
        chat,
        origins,
        conversation,
        input_items,
        skeleton,
        stream,
    })
}

/// `metadata`: at most 16 pairs, keys ≤ 64 characters, string values ≤ 512 (OpenAI's limits).
fn check_metadata(v: Option<&Value>) -> Result<Map<String, Value>, ApiError> {
    let Some(v) = v else { return Ok(Map::new()) };
    let Some(m) = v.as_object() else {
        return Err(ApiError::invalid(
            "metadata",
            format!("invalid value for `metadata`: expected an object of strings, got {v}"),
        ));
    };
    if m.len() > 16 {
        return Err(ApiError::invalid(
            "metadata",
            format!("`metadata` may hold at most 16 pairs, got {}", m.len()),
        ));
    }
    for (k, x) in m {
        let param = format!("metadata.{k}");
        if k.chars().count() > 64 {
            return Err(ApiError::invalid(
                &param,
                "metadata keys are at most 64 characters",
            ));
        }
        match x.as_str() {
            Some(s) if s.chars().count() <= 512 => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    &param,
                    "metadata values are at most 512 characters",
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    &param,
                    format!("metadata values must be strings, got {x}"),
                ))
            }
        }
    }
    Ok(m.clone())
}

/// Refuses keys of `obj` outside `allowed`, naming `at.key`.
fn only_keys(obj: &Map<String, Value>, allowed: &[&str], at: &str) -> Result<(), ApiError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(
            &format!("{at}.{k}"),
            format!("Unrecognized request argument supplied: {at}.{k}"),
        )),
        None => Ok(()),
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a str, ApiError> {
    obj.get(key).and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            &format!("{at}.{key}"),
            format!("`{at}.{key}` is required and must be a string"),
        )
    })
}

/// The text of a content value: a string, or `input_text` / `output_text` parts.
fn content_text(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for (j, p) in parts.iter().enumerate() {
                let pat = format!("{at}[{j}]");
                let Some(o) = p.as_object() else {
                    return Err(ApiError::invalid(
                        &pat,
                        format!("`{pat}` must be an object"),
                    ));
                };
                match o.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text") => {
                        only_keys(o, &["type", "text", "annotations", "logprobs"], &pat)?;
                        s.push_str(str_field(o, "text", &pat)?);
                    }
                    Some(t) => return Err(ApiError::invalid(&format!("{pat}.type"), format!("content part type `{t}` is not supported (only `input_text` and `output_text`)"))),
                    None => return Err(ApiError::invalid(&format!("{pat}.type"), format!("`{pat}.type` is required"))),
                }
            }
            Ok(s)
        }
        Some(v) => Err(ApiError::invalid(
            at,
            format!("`{at}` must be a string or a list of content parts, got {v}"),
        )),
    }
}

/// `input` as chat messages (with the field each came from) and as stored items.
#[allow(clippy::type_complexity)]
fn input_messages(
    input: Option<&Value>,
) -> Result<(Vec<Value>, Vec<String>, Vec<Value>), ApiError> {
    let (mut msgs, mut origins, mut items) = (Vec::new(), Vec::new(), Vec::new());
    let list = match input {
        None => return Ok((msgs, origins, items)),
        Some(Value::String(s)) => {
            msgs.push(json!({"role": "user", "content": s}));
            origins.push("input".into());
            items.push(json!({"id": new_id("msg_"), "type": "message", "role": "user", "status": "completed", "content": [{"type": "input_text", "text": s}]}));
            return Ok((msgs, origins, items));
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::invalid(
                "input",
                format!("`input` must be a string or a list of items, got {v}"),
            ))
        }
    };
    for (i, item) in list.iter().enumerate() {
        let at = format!("input[{i}]");
        let Some(o) = item.as_object() else {
            return Err(ApiError::invalid(&at, format!("`{at}` must be an object")));
        };
        let kind = match o.get("type").and_then(Value::as_str) {
            Some(t) => t,
            None if o.contains_key("role") => "message",
            None => {
                return Err(ApiError::invalid(
                    &format!("{at}.type"),
                    format!("`{at}.type` is required"),
                ))
            }
        };
        let mut stored = o.clone();
        if !stored.contains_key("id") {
            let prefix = if kind == "message" { "msg_" } else { "item_" };
            stored.insert("id".into(), Value::String(new_id(prefix)));
        }
        match kind {
            "message" => {
                only_keys(o, &["type", "role", "content", "id", "status"], &at)?;
                let role = match str_field(o, "role", &at)? {
                    r @ ("user" | "assistant" | "system") => r,
                    // Chat templates know `system`; OpenAI's `developer` is its successor.
                    "developer" => "system",
                    r => return Err(ApiError::invalid(&format!("{at}.role"), format!("role `{r}` is not supported (user, assistant, system, developer)"))),
                };
                let text = content_text(o.get("content"), &format!("{at}.content"))?;
                msgs.push(json!({"role": role, "content": text}));
                origins.push(at);
            }
            "function_call" => {
                only_keys(o, &["type", "id", "call_id", "name", "arguments", "status"], &at)?;
                let call = json!({
                    "id": str_field(o, "call_id", &at)?,
                    "type": "function",
                    "function": {"name": str_field(o, "name", &at)?, "arguments": str_field(o, "arguments", &at)?},
                });
                // Calls of one turn (and the turn's text) form one assistant message.
                let joins = msgs.last().is_some_and(|m: &Value| m["role"] == "assistant");
                match msgs.last_mut().and_then(Value::as_object_mut).filter(|_| joins) {
                    Some(last) => {
                        let calls = last.entry("tool_calls").or_insert_with(|| Value::Array(Vec::new()));
                        if let Value::Array(a) = calls {
                            a.push(call);
                        }
                        if let Some(o) = origins.last_mut() {
                            *o = at;
                        }
                    }
                    None => {
                        msgs.push(json!({"role": "assistant", "content": Value::Null, "tool_calls": [call]}));
                        origins.push(at);
                    }
                }
            }
            "function_call_output" => {
                only_keys(o, &["type", "id", "call_id", "output", "status"], &at)?;
                let call_id = str_field(o, "call_id", &at)?;
                let output = content_text(o.get("output"), &format!("{at}.output"))?;
                msgs.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
                origins.push(at);
            }
            t => return Err(ApiError::invalid(&format!("{at}.type"), format!("input item type `{t}` is not supported (message, function_call, function_call_output)"))),
        }
        items.push(Value::Object(stored));
    }
    Ok((msgs, origins, items))
}

/// `text` → the response's `text.format`, and chat's `response_format` into `chat`.
fn text_format(t: &Value, chat: &mut Map<String, Value>) -> Result<Value, ApiError> {
    let Some(o) = t.as_object() else {
        return Err(ApiError::invalid(
            "text",
            format!("`text` must be an object, got {t}"),
        ));
    };
    only_keys(o, &["format", "verbosity"], "text")?;
    if let Some(v) = o.get("verbosity").filter(|v| !v.is_null()) {
        if v != "medium" {
            return Err(unsupported("text.verbosity", &format!("with value {v}")));
        }
    }
    let Some(f) = o.get("format").filter(|v| !v.is_null()) else {
        return Ok(json!({"type": "text"}));
    };
    let Some(fo) = f.as_object() else {
        return Err(ApiError::invalid(
            "text.format",
            format!("`text.format` must be an object, got {f}"),
        ));
    };
    match fo.get("type").and_then(Value::as_str) {
        Some("text") => only_keys(fo, &["type"], "text.format")?,
        Some("json_object") => {
            only_keys(fo, &["type"], "text.format")?;
            chat.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some("json_schema") => {
            only_keys(
                fo,
                &["type", "name", "schema", "strict", "description"],
                "text.format",
            )?;
            let name = str_field(fo, "name", "text.format")?;
            let Some(schema) = fo.get("schema").filter(|s| s.is_object()) else {
                return Err(ApiError::invalid(
                    "text.format.schema",
                    "`text.format.schema` is required and must be a JSON Schema object",
                ));
            };
            let mut js = Map::new();
            js.insert("name".into(), json!(name));
            js.insert("schema".into(), schema.clone());
            for k in ["strict", "description"] {
                if let Some(v) = fo.get(k).filter(|v| !v.is_null()) {
                    js.insert(k.into(), v.clone());
                }
            }
            chat.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": js}),
            );
        }
        Some(t) => {
            return Err(ApiError::invalid(
                "text.format.type",
                format!("format type `{t}` is not supported (text, json_schema, json_object)"),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                "text.format.type",
                "`text.format.type` is required",
            ))
        }
    }
    Ok(f.clone())
}

/// `tools` (Responses' flat function tools) → (as given, chat's nested shape).
fn tools_of(t: &Value) -> Result<(Vec<Value>, Vec<Value>), ApiError> {
    let Some(list) = t.as_array() else {
        return Err(ApiError::invalid(
            "tools",
            format!("`tools` must be a list, got {t}"),
        ));
    };
    let mut chat = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let at = format!("tools[{i}]");
        let Some(o) = tool.as_object() else {
            return Err(ApiError::invalid(&at, format!("`{at}` must be an object")));
        };
        match o.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(k) => {
                return Err(ApiError::invalid(
                    &format!("{at}.type"),
                    format!("tool type `{k}` is not supported (only `function` tools)"),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    &format!("{at}.type"),
                    format!("`{at}.type` is required"),
                ))
            }
        }
        only_keys(
            o,
            &["type", "name", "description", "parameters", "strict"],
            &at,
        )?;
        let mut f = Map::new();
        f.insert("name".into(), json!(str_field(o, "name", &at)?));
        for k in ["description", "parameters", "strict"] {
            if let Some(v) = o.get(k).filter(|v| !v.is_null()) {
                f.insert(k.into(), v.clone());
            }
        }
        chat.push(json!({"type": "function", "function": f}));
    }
    Ok((list.clone(), chat))
}

/// `tool_choice` → chat's shape.
fn tool_choice_of(tc: &Value) -> Result<Value, ApiError> {
    match tc {
        Value::String(s) if matches!(s.as_str(), "none" | "auto" | "required") => Ok(tc.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            only_keys(o, &["type", "name"], "tool_choice")?;
            Ok(json!({"type": "function", "function": {"name": str_field(o, "name", "tool_choice")?}}))
        }
        _ => Err(ApiError::invalid("tool_choice", format!("`tool_choice` must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"name\": …}}, got {tc}"))),
    }
}

impl Translation {
    /// The Responses name of a chat field path (`messages[3].content` → `input[1].content`).
    fn responses_param(&self, p: &str) -> String {
        if p == "max_tokens" {
            return "max_output_tokens".into();
        }
        if let Some(rest) = p.strip_prefix("response_format") {
            let rest = rest.strip_prefix(".json_schema").unwrap_or(rest);
            return format!("text.format{rest}");
        }
        if let Some(rest) = p.strip_prefix("tool_choice.function") {
            return format!("tool_choice{rest}");
        }
        if let Some(rest) = p.strip_prefix("tools[") {
            if let Some((i, tail)) = rest.split_once(']') {
                let tail = tail.strip_prefix(".function").unwrap_or(tail);
                return format!("tools[{i}]{tail}");
            }
        }
        if let Some(rest) = p.strip_prefix("messages[") {
            if let Some((k, tail)) = rest.split_once(']') {
                if let Some((k, origin)) = k
                    .parse::<usize>()
                    .ok()
                    .and_then(|k| Some((k, self.origins.get(k)?)))
                {
                    // Only message items share chat's fields (`role`, `content`); a
                    // string `input`, the instructions, the stored conversation and
                    // function-call items are named whole.
                    let m = &self.chat["messages"][k];
                    let message_item = origin.starts_with("input[")
                        && m["role"] != "tool"
                        && m.get("tool_calls").is_none();
                    let tail = if message_item { tail } else { "" };
                    return format!("{origin}{tail}");
                }
            }
        }
        if p == "messages" {
            return "input".into();
        }
        p.to_string()
    }

    /// A chat-side error, naming the Responses field.
    pub fn map_error(&self, e: ApiError) -> ApiError {
        match e {
            ApiError::Invalid {
                param: Some(p),
                message,
            } => {
                let q = self.responses_param(&p);
                let message = message
                    .replace(&format!("`{p}`"), &format!("`{q}`"))
                    .replace(&p, &q);
                let message = if p == "max_tokens" {
                    message
                } else {
                    message.replace("max_tokens", "max_output_tokens")
                };
                ApiError::Invalid {
                    param: Some(q),
                    message,
                }
            }
            ApiError::Invalid {
                param: None,
                message,
            } => ApiError::Invalid {
                param: None,
                message: message.replace("max_tokens", "max_output_tokens"),
            },
            e => e,
        }
    }
}

// ---------------------------------------------------------------- chat stream → Responses

/// One frame of the chat SSE stream.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatFrame {
    /// A `chat.completion.chunk`.
    Chunk(Value),
    /// An `{"error": {...}}` frame.
    Error(Value),
    /// `[DONE]`.
    Done,
}

/// Splits an SSE body into frames (`data: …` lines separated by blank lines).
fn chat_frames(resp: Response) -> impl Stream<Item = ChatFrame> + Send {
    struct St<S> {
        body: S,
        buf: Vec<u8>,
        pending: VecDeque<ChatFrame>,
        ended: bool,
    }
    let body = resp.into_body().into_data_stream();
    let st = St {
        body,
        buf: Vec::new(),
        pending: VecDeque::new(),
        ended: false,
    };
    fstream::unfold(st, |mut st| async move {
        loop {
            if let Some(f) = st.pending.pop_front() {
                return Some((f, st));
            }
            if st.ended {
                return None;
            }
            match st.body.next().await {
                Some(Ok(bytes)) => {
                    st.buf.extend_from_slice(&bytes);
                    while let Some(pos) = st.buf.windows(2).position(|w| w == b"\n\n") {
                        let frame: Vec<u8> = st.buf.drain(..pos + 2).collect();
                        st.pending
                            .extend(parse_frame(&String::from_utf8_lossy(&frame)));
                    }
                }
                Some(Err(e)) => {
                    st.pending.push_back(ChatFrame::Error(
                        ApiError::Internal(format!("reading the generation failed: {e}")).body(),
                    ));
                    st.ended = true;
                }
                None => st.ended = true,
            }
        }
    })
}

/// The frame of one SSE event's text.
fn parse_frame(frame: &str) -> Option<ChatFrame> {
    let data: String = frame
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n");
    if data.is_empty() {
        return None;
    }
    if data == "[DONE]" {
        return Some(ChatFrame::Done);
    }
    Some(match serde_json::from_str::<Value>(&data) {
        Ok(v) if v.get("error").is_some() => ChatFrame::Error(v),
        Ok(v) => ChatFrame::Chunk(v),
        Err(e) => ChatFrame::Error(ApiError::Internal(format!("an unreadable chunk: {e}")).body()),
    })
}

/// The [`ApiError`] of an `{"error": {...}}` body.
fn api_error_of(body: &Value) -> ApiError {
    let e = &body["error"];
    let message = e["message"]
        .as_str()
        .unwrap_or("generation failed")
        .to_string();
    match e["type"].as_str() {
        Some("invalid_request_error") => ApiError::Invalid {
            param: e["param"].as_str().map(str::to_string),
            message,
        },
        Some("rate_limit_error") => ApiError::RateLimited {
            message,
            retry_after_s: 1,
        },
        Some("service_unavailable_error") => ApiError::Unavailable(message),
        _ => ApiError::Internal(
            message
                .strip_prefix("internal error: ")
                .unwrap_or(&message)
                .to_string(),
        ),
    }
}

#[derive(Debug)]
struct TextState {
    output_index: usize,
    item_id: String,
    text: String,
}

#[derive(Debug)]
struct CallState {
    chat_index: u64,
    output_index: usize,
    item_id: String,
    call_id: String,
    name: String,
    arguments: String,
}

/// Chat chunks in, Responses events out; keeps the response object up to date.
#[derive(Debug)]
pub struct Translator {
    /// The response as built so far.
    pub resp: ResponseObject,
    seq: u64,
    text: Option<TextState>,
    call: Option<CallState>,
    finish: Option<String>,
}

impl Translator {
    /// A translator for the response `skeleton` (status `in_progress`, no output).
    pub fn new(skeleton: ResponseObject) -> Self {
        Self {
            resp: skeleton,
            seq: 0,
            text: None,
            call: None,
            finish: None,
        }
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq += 1;
        s
    }

    /// `response.created`, `response.in_progress`.
    pub fn begin(&mut self) -> Vec<StreamEvent> {
        let (a, b) = (self.next_seq(), self.next_seq());
        vec![
            StreamEvent::Created {
                sequence_number: a,
                response: Box::new(self.resp.clone()),
            },
            StreamEvent::InProgress {
                sequence_number: b,
                response: Box::new(self.resp.clone()),
            },
        ]
    }

    /// The events of one chat chunk (text deltas, tool-call deltas, usage, finish).
    pub fn chunk(&mut self, c: &Value) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if let Some(u) = c.get("usage").filter(|u| u.is_object()) {
            let count = |k: &str| u[k].as_u64().unwrap_or(0) as usize;
            self.resp.usage = Some(ResponseUsage {
                input_tokens: count("prompt_tokens"),
                input_tokens_details: InputTokensDetails {
                    cached_tokens: u["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0) as usize,
                },
                output_tokens: count("completion_tokens"),
                output_tokens_details: OutputTokensDetails {
                    reasoning_tokens: 0,
                },
                total_tokens: count("total_tokens"),
            });
        }
        let Some(choice) = c["choices"].as_array().and_then(|a| a.first()) else {
            return out;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            self.close_call(&mut out);
            self.text_delta(text, &mut out);
        }
        if let Some(calls) = delta["tool_calls"].as_array() {
            for tc in calls {
                self.call_delta(tc, &mut out);
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
        out
    }

    fn text_delta(&mut self, text: &str, out: &mut Vec<StreamEvent>) {
        if self.text.is_none() {
            let output_index = self.resp.output.len();
            let item_id = new_id("msg_");
            let item = OutputItem::Message {
                id: item_id.clone(),
                status: "in_progress",
                role: "assistant",
                content: Vec::new(),
            };
            self.resp.output.push(item.clone());
            let s = self.next_seq();
            out.push(StreamEvent::OutputItemAdded {
                sequence_number: s,
                output_index,
                item,
            });
            let s = self.next_seq();
            out.push(StreamEvent::ContentPartAdded {
                sequence_number: s,
                item_id: item_id.clone(),
                output_index,
                content_index: 0,
                part: OutputText::new(String::new()),
            });
            self.text = Some(TextState {
                output_index,
                item_id,
                text: String::new(),
            });
        }
        let s = self.next_seq();
        if let Some(t) = self.text.as_mut() {
            t.text.push_str(text);
            out.push(StreamEvent::OutputTextDelta {
                sequence_number: s,
                item_id: t.item_id.clone(),
                output_index: t.output_index,
                content_index: 0,
                delta: text.to_string(),
                logprobs: Vec::new(),
            });
        }
    }

    fn call_delta(&mut self, tc: &Value, out: &mut Vec<StreamEvent>) {
        let index = tc["index"].as_u64().unwrap_or(0);
        if self.call.as_ref().is_none_or(|c| c.chat_index != index) {
            self.close_text(out);
            self.close_call(out);
            let output_index = self.resp.output.len();
            let item_id = new_id("fc_");
            let call_id = tc["id"]
                .as_str()
                .map_or_else(|| new_id("call_"), str::to_string);
            let name = tc["function"]["name"].as_str().unwrap_or("").to_string();
            let item = OutputItem::FunctionCall {
                id: item_id.clone(),
                call_id: call_id.clone(),
                name: name.clone(),
                arguments: String::new(),
                status: "in_progress",
            };
            self.resp.output.push(item.clone());
            let s = self.next_seq();
            out.push(StreamEvent::OutputItemAdded {
                sequence_number: s,
                output_index,
                item,
            });
            self.call = Some(CallState {
                chat_index: index,
                output_index,
                item_id,
                call_id,
                name,
                arguments: String::new(),
            });
        }
        let Some(args) = tc["function"]["arguments"]
            .as_str()
            .filter(|a| !a.is_empty())
        else {
            return;
        };
        let s = self.next_seq();
        if let Some(c) = self.call.as_mut() {
            c.arguments.push_str(args);
            out.push(StreamEvent::FunctionCallArgumentsDelta {
                sequence_number: s,
                item_id: c.item_id.clone(),
                output_index: c.output_index,
                delta: args.to_string(),
            });
        }
    }

    /// Status of finished items: `incomplete` when generation was cut short.
    fn item_status(&self) -> &'static str {
        match self.finish.as_deref() {
            Some("length" | "abort") => "incomplete",
            _ => "completed",
        }
    }

    fn close_text(&mut self, out: &mut Vec<StreamEvent>) {
        let Some(t) = self.text.take() else { return };
        let status = self.item_status();
        let part = OutputText::new(t.text.clone());
        let item = OutputItem::Message {
            id: t.item_id.clone(),
            status,
            role: "assistant",
            content: vec![part.clone()],
        };
        if let Some(slot) = self.resp.output.get_mut(t.output_index) {
            *slot = item.clone();
        }
        let (a, b, c) = (self.next_seq(), self.next_seq(), self.next_seq());
        out.push(StreamEvent::OutputTextDone {
            sequence_number: a,
            item_id: t.item_id.clone(),
            output_index: t.output_index,
            content_index: 0,
            text: t.text,
            logprobs: Vec::new(),
        });
        out.push(StreamEvent::ContentPartDone {
            sequence_number: b,
            item_id: t.item_id,
            output_index: t.output_index,
            content_index: 0,
            part,
        });
        out.push(StreamEvent::OutputItemDone {
            sequence_number: c,
            output_index: t.output_index,
            item,
        });
    }

    fn close_call(&mut self, out: &mut Vec<StreamEvent>) {
        let Some(c) = self.call.take() else { return };
        let item = OutputItem::FunctionCall {
            id: c.item_id.clone(),
            call_id: c.call_id,
            name: c.name.clone(),
            arguments: c.arguments.clone(),
            status: "completed",
        };
        if let Some(slot) = self.resp.output.get_mut(c.output_index) {
            *slot = item.clone();
        }
        let (a, b) = (self.next_seq(), self.next_seq());
        out.push(StreamEvent::FunctionCallArgumentsDone {
            sequence_number: a,
            item_id: c.item_id,
            output_index: c.output_index,
            name: c.name,
            arguments: c.arguments,
        });
        out.push(StreamEvent::OutputItemDone {
            sequence_number: b,
            output_index: c.output_index,
            item,
        });
    }

    /// Closes open items and ends the response (`response.completed`, or
    /// `response.incomplete` when cut short). An empty output gets one empty message.
    pub fn end(&mut self) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.resp.output.is_empty() && self.text.is_none() && self.call.is_none() {
            // What OpenAI answers for an immediate end: one message with empty text.
            self.text_delta("", &mut out);
            out.retain(|e| !matches!(e, StreamEvent::OutputTextDelta { .. }));
        }
        self.close_text(&mut out);
        self.close_call(&mut out);
        let s = self.next_seq();
        match self.finish.as_deref() {
            Some("length") => {
                self.resp.status = "incomplete";
                self.resp.incomplete_details = Some(IncompleteDetails {
                    reason: "max_output_tokens",
                });
                out.push(StreamEvent::Incomplete {
                    sequence_number: s,
                    response: Box::new(self.resp.clone()),
                });
            }
            Some("abort") => {
                self.resp.status = "incomplete";
                self.resp.incomplete_details = Some(IncompleteDetails { reason: "abort" });
                out.push(StreamEvent::Incomplete {
                    sequence_number: s,
                    response: Box::new(self.resp.clone()),
                });
            }
            _ => {
                self.resp.status = "completed";
                out.push(StreamEvent::Completed {
                    sequence_number: s,
                    response: Box::new(self.resp.clone()),
                });
            }
        }
        out
    }

    /// Ends the response as `failed` with the error of an `{"error": {...}}` body.
    pub fn fail(&mut self, body: &Value) -> Vec<StreamEvent> {
        let e = api_error_of(body);
        let code = match &e {
            ApiError::RateLimited { .. } => "rate_limit_exceeded",
            ApiError::Invalid { .. } => "invalid_prompt",
            _ => "server_error",
        };
        self.text = None;
        self.call = None;
        self.resp.status = "failed";
        self.resp.error = Some(ResponseError {
            code: code.into(),
            message: e.to_string(),
        });
        let s = self.next_seq();
        vec![StreamEvent::Failed {
            sequence_number: s,
            response: Box::new(self.resp.clone()),
        }]
    }
}

/// The output as chat messages (for the stored conversation).
fn output_messages(output: &[OutputItem]) -> Vec<Value> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for item in output {
        match item {
            OutputItem::Message { content, .. } => {
                content.iter().for_each(|p| text.push_str(&p.text))
            }
            OutputItem::FunctionCall {
                call_id,
                name,
                arguments,
                ..
            } => {
                calls.push(json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}));
            }
        }
    }
    let mut m = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    vec![m]
}

/// What is stored once the response ends.
struct StoreCtx {
    app: App,
    tenant: usize,
    conversation: Vec<Value>,
    input_items: Vec<Value>,
}

impl StoreCtx {
    fn store(self, resp: &ResponseObject) {
        if !resp.store {
            return;
        }
        let mut conversation = self.conversation;
        conversation.extend(output_messages(&resp.output));
        self.app.responses.put(Stored {
            tenant: self.tenant,
            response: resp.clone(),
            conversation,
            input_items: self.input_items,
        });
    }
}

// ---------------------------------------------------------------- handlers

/// `POST /v1/responses`.
pub(crate) async fn create(
    State(app): State<App>,
    tenant: Tenant,
    Body(body): Body<ResponsesBody>,
) -> Result<Response, ApiError> {
    let previous = match body.0.get("previous_response_id").filter(|v| !v.is_null()) {
        None => None,
        Some(Value::String(id)) => Some(app.responses.get(id, tenant.0).ok_or_else(|| {
            ApiError::invalid(
                "previous_response_id",
                format!("Previous response with id '{id}' not found."),
            )
        })?),
        Some(v) => {
            return Err(ApiError::invalid(
                "previous_response_id",
                format!("invalid value for `previous_response_id`: expected a string, got {v}"),
            ))
        }
    };
    let tr = translate(&body.0, previous.as_ref(), &app.model_name)?;
    routes::check_model(&app, body.0.get("model").and_then(Value::as_str))?;
    let chat_body = serde_json::to_vec(&tr.chat)
        .map_err(|e| ApiError::Internal(format!("building the chat request failed: {e}")))?;
    let chat = ChatRequest::parse(&chat_body).map_err(|e| tr.map_error(e))?;
    let resp = routes::chat_completions(State(app.clone()), tenant, Body(chat))
        .await
        .map_err(|e| tr.map_error(e))?;
    let frames = Box::pin(chat_frames(resp));
    let ctx = StoreCtx {
        app,
        tenant: tenant.0,
        conversation: tr.conversation,
        input_items: tr.input_items,
    };
    let mut t = Translator::new(tr.skeleton);
    if tr.stream {
        return Ok(sse(t, frames, ctx));
    }
    let _ = t.begin();
    let mut frames = frames;
    while let Some(f) = frames.next().await {
        match f {
            ChatFrame::Chunk(c) => {
                t.chunk(&c);
            }
            ChatFrame::Error(e) => return Err(api_error_of(&e)),
            ChatFrame::Done => break,
        }
    }
    t.end();
    ctx.store(&t.resp);
    Ok(Json(t.resp).into_response())
}

/// The SSE body of a streamed response; dropping it (client gone) cancels generation.
fn sse(
    t: Translator,
    frames: std::pin::Pin<Box<dyn Stream<Item = ChatFrame> + Send>>,
    ctx: StoreCtx,
) -> Response {
    struct St {
        t: Translator,
        frames: std::pin::Pin<Box<dyn Stream<Item = ChatFrame> + Send>>,
        pending: VecDeque<Bytes>,
        ctx: Option<StoreCtx>,
        finished: bool,
    }
    let mut st = St {
        t,
        frames,
        pending: VecDeque::new(),
        ctx: Some(ctx),
        finished: false,
    };
    let begin = st.t.begin();
    st.pending.extend(begin.iter().map(StreamEvent::frame));
    let body = fstream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.pending.pop_front() {
                return Some((Ok::<Bytes, Infallible>(b), st));
            }
            if st.finished {
                return None;
            }
            let events = match st.frames.next().await {
                Some(ChatFrame::Chunk(c)) => st.t.chunk(&c),
                Some(ChatFrame::Error(e)) => {
                    st.finished = true;
                    st.t.fail(&e)
                }
                Some(ChatFrame::Done) | None => {
                    st.finished = true;
                    st.t.end()
                }
            };
            st.pending.extend(events.iter().map(StreamEvent::frame));
            if st.finished {
                if let Some(ctx) = st.ctx.take() {
                    ctx.store(&st.t.resp);
                }
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

fn not_found(id: &str) -> ApiError {
    ApiError::RouteNotFound(format!("no response with id '{id}' (it was not stored, was deleted or evicted, or belongs to another key)"))
}

/// Refuses query parameters other than `allowed`.
fn check_query(q: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match q.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(
            k,
            format!("query parameter `{k}` is not supported here"),
        )),
        None => Ok(()),
    }
}

/// `GET /v1/responses/{id}`.
pub(crate) async fn retrieve(
    State(app): State<App>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<ResponseObject>, ApiError> {
    check_query(&q, &["include"])?;
    if q.get("include").is_some_and(|v| !v.is_empty()) {
        return Err(unsupported("include", "with a value"));
    }
    app.responses
        .get(&id, tenant.0)
        .map(|s| Json(s.response))
        .ok_or_else(|| not_found(&id))
}

/// `DELETE /v1/responses/{id}` body.
#[derive(Debug, Serialize)]
pub struct Deleted {
    /// The id.
    pub id: String,
    /// Always `response`.
    pub object: &'static str,
    /// Always true.
    pub deleted: bool,
}

/// `DELETE /v1/responses/{id}`.
pub(crate) async fn delete(
    State(app): State<App>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    if app.responses.remove(&id, tenant.0) {
        Ok(Json(Deleted {
            id,
            object: "response",
            deleted: true,
        }))
    } else {
        Err(not_found(&id))
    }
}

/// `GET /v1/responses/{id}/input_items` body.
#[derive(Debug, Serialize)]
pub struct InputItemList {
    /// Always `list`.
    pub object: &'static str,
    /// The items of this page.
    pub data: Vec<Value>,
    /// Id of the first item of the page.
    pub first_id: Option<String>,
    /// Id of the last item of the page.
    pub last_id: Option<String>,
    /// Whether more follow.
    pub has_more: bool,
}

/// `GET /v1/responses/{id}/input_items` (`order` asc|desc, default desc; `limit` 1..=100, default 20; `after`).
pub(crate) async fn input_items(
    State(app): State<App>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<InputItemList>, ApiError> {
    check_query(&q, &["order", "limit", "after", "include"])?;
    if q.get("include").is_some_and(|v| !v.is_empty()) {
        return Err(unsupported("include", "with a value"));
    }
    let s = app
        .responses
        .get(&id, tenant.0)
        .ok_or_else(|| not_found(&id))?;
    let mut items = s.input_items;
    match q.get("order").map(String::as_str) {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(o) => {
            return Err(ApiError::invalid(
                "order",
                format!("`order` must be `asc` or `desc`, got {o:?}"),
            ))
        }
    }
    let limit = match q.get("limit") {
        None => 20,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| {
                ApiError::invalid("limit", format!("`limit` must be in 1..=100, got {l:?}"))
            })?,
    };
    if let Some(after) = q.get("after") {
        let pos = items
            .iter()
            .position(|i| i["id"] == after.as_str())
            .ok_or_else(|| {
                ApiError::invalid("after", format!("no input item with id {after:?}"))
            })?;
        items.drain(..=pos);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    let id_of = |v: Option<&Value>| v.and_then(|i| i["id"].as_str()).map(str::to_string);
    Ok(Json(InputItemList {
        object: "list",
        first_id: id_of(items.first()),
        last_id: id_of(items.last()),
        has_more,
        data: items,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn tr(v: Value) -> Result<Translation, ApiError> {
        translate(&body(v), None, "m")
    }

    #[test]
    fn translates_to_the_chat_body() {
        let t = tr(json!({
            "model": "m", "input": "Hi", "instructions": "Be brief.", "max_output_tokens": 7, "temperature": 0, "top_p": 0.9,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": true}},
            "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"}, "seed": 3, "metadata": {"k": "v"}, "user": "u", "store": false,
        }))
        .unwrap();
        let c = Value::Object(t.chat.clone());
        assert_eq!(
            c["messages"],
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
        );
        assert_eq!(c["max_tokens"], 7);
        assert_eq!(c["temperature"], 0);
        assert_eq!(c["seed"], 3);
        assert_eq!(
            c["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}})
        );
        assert_eq!(
            c["tools"],
            json!([{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}])
        );
        assert_eq!(
            c["tool_choice"],
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert_eq!(c["stream"], true);
        assert_eq!(c["stream_options"], json!({"include_usage": true}));
        assert!(c.get("metadata").is_none() && c.get("user").is_none() && c.get("store").is_none());
        assert_eq!(t.skeleton.temperature, 0.0);
        assert!(!t.skeleton.store);
        assert_eq!(t.skeleton.metadata["k"], "v");
        assert_eq!(
            t.conversation,
            vec![json!({"role": "user", "content": "Hi"})],
            "instructions are not part of the conversation"
        );
        // The chat side accepts every field of the translation it does not refuse itself.
        let ok = tr(json!({"input": [{"role": "developer", "content": "sys"}, {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]}]})).unwrap();
        assert_eq!(
            Value::Object(ok.chat.clone())["messages"],
            json!([{"role": "system", "content": "sys"}, {"role": "user", "content": "ab"}])
        );
        ChatRequest::parse(&serde_json::to_vec(&ok.chat).unwrap()).unwrap();
    }

    #[test]
    fn function_items_become_tool_messages() {
        let t = tr(json!({"input": [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "call_1", "name": "w", "arguments": "{}"},
            {"type": "function_call", "call_id": "call_2", "name": "w", "arguments": "{\"a\":1}", "id": "fc_x", "status": "completed"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ]}))
        .unwrap();
        let m = &Value::Object(t.chat.clone())["messages"];
        assert_eq!(m[1]["role"], "assistant");
        assert_eq!(
            m[1]["tool_calls"].as_array().unwrap().len(),
            2,
            "calls of one turn form one message"
        );
        assert_eq!(m[1]["tool_calls"][1]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(
            m[2],
            json!({"role": "tool", "tool_call_id": "call_1", "content": "sunny"})
        );
        assert_eq!(t.input_items.len(), 4);
        assert_eq!(t.input_items[2]["id"], "fc_x");
        assert!(t.input_items[0]["id"].as_str().unwrap().starts_with("msg_"));
        // The chat side's refusal of message fields names the Responses item.
        let e = t.map_error(ApiError::invalid(
            "messages[2].role",
            "`messages[2].role` is not supported",
        ));
        assert_eq!(e.body()["error"]["param"], "input[3]", "{e}");
        assert!(e.to_string().contains("`input[3]`"), "{e}");
    }

    #[test]
    fn bad_fields_are_named() {
        for (b, param) in [
            (json!({"input": "x", "frobnicate": 1}), "frobnicate"),
            (json!({"input": "x", "background": true}), "background"),
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
            (
                json!({"input": "x", "include": ["message.output_text.logprobs"]}),
                "include",
            ),
            (json!({"input": "x", "top_logprobs": 3}), "top_logprobs"),
            (
                json!({"input": "x", "conversation": "conv_1"}),
                "conversation",
            ),
            (
                json!({"input": "x", "reasoning": {"effort": "high"}}),
                "reasoning",
            ),
            (json!({"input": 5}), "input"),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}),
                "input[0].content[0].type",
            ),
            (
                json!({"input": [{"role": "critic", "content": "x"}]}),
                "input[0].role",
            ),
            (
                json!({"input": [{"type": "reasoning", "summary": []}]}),
                "input[0].type",
            ),
            (
                json!({"input": [{"role": "user", "content": "x", "weight": 2}]}),
                "input[0].weight",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}),
                "text.format.schema",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "grammar"}}}),
                "text.format.type",
            ),
            (
                json!({"input": "x", "text": {"verbosity": "high"}}),
                "text.verbosity",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}),
                "tools[0].function",
            ),
            (
                json!({"input": "x", "tool_choice": {"type": "file_search"}}),
                "tool_choice",
            ),
            (json!({"input": "x", "metadata": {"k": 1}}), "metadata.k"),
            (
                json!({"input": "x", "max_output_tokens": -1}),
                "max_output_tokens",
            ),
            (json!({"input": "x", "stream": "yes"}), "stream"),
        ] {
            let e = tr(b.clone()).unwrap_err();
            assert_eq!(e.body()["error"]["param"], param, "{b}: {e}");
        }
        for b in [
            json!({"input": "x", "background": false, "include": [], "truncation": "disabled", "reasoning": null, "top_logprobs": 0, "stream_options": {"include_obfuscation": false}, "service_tier": "auto", "prompt_cache_key": "k", "safety_identifier": "s", "max_tool_calls": null}),
            json!({"input": "x", "reasoning": {}, "text": {"format": {"type": "text"}, "verbosity": "medium"}, "parallel_tool_calls": false}),
        ] {
            tr(b.clone()).unwrap_or_else(|e| panic!("{b}: {e}"));
        }
    }

    #[test]
    fn chat_params_map_back() {
        let t = tr(json!({"input": "x", "instructions": "s"})).unwrap();
        for (chat, want) in [
            ("max_tokens", "max_output_tokens"),
            ("response_format", "text.format"),
            ("response_format.json_schema.schema", "text.format.schema"),
            ("tools[2].function.parameters", "tools[2].parameters"),
            ("tool_choice.function.name", "tool_choice.name"),
            ("messages[0].content", "instructions"),
            ("messages[1].content", "input"),
            ("messages", "input"),
            ("temperature", "temperature"),
        ] {
            assert_eq!(t.responses_param(chat), want, "{chat}");
        }
        let e = t.map_error(ApiError::invalid(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
        assert_eq!(e.to_string(), "`max_output_tokens` must be at least 1");
    }

    #[test]
    fn previous_response_continues_the_conversation() {
        let prev = Stored {
            tenant: 0,
            response: tr(json!({"input": "a"})).unwrap().skeleton,
            conversation: vec![
                json!({"role": "user", "content": "a"}),
                json!({"role": "assistant", "content": "b"}),
            ],
            input_items: vec![],
        };
        let t = translate(
            &body(json!({"input": "c", "instructions": "new"})),
            Some(&prev),
            "m",
        )
        .unwrap();
        let m = &Value::Object(t.chat.clone())["messages"];
        assert_eq!(m.as_array().unwrap().len(), 4);
        assert_eq!(
            (
                m[0]["role"].as_str(),
                m[1]["content"].as_str(),
                m[3]["content"].as_str()
            ),
            (Some("system"), Some("a"), Some("c"))
        );
        assert_eq!(
            t.skeleton.previous_response_id.as_deref(),
            Some(prev.response.id.as_str())
        );
        assert_eq!(
            t.responses_param("messages[2].content"),
            "previous_response_id"
        );
        assert_eq!(t.conversation.len(), 3);
    }

    fn chunk(delta: Value, finish: Option<&str>) -> Value {
        json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null})
    }

    #[test]
    fn translator_streams_text_in_order() {
        let mut t = Translator::new(tr(json!({"input": "x"})).unwrap().skeleton);
        let mut ev = t.begin();
        ev.extend(t.chunk(&chunk(json!({"role": "assistant", "content": ""}), None)));
        ev.extend(t.chunk(&chunk(json!({"content": "Hel"}), None)));
        ev.extend(t.chunk(&chunk(json!({"content": "lo"}), None)));
        ev.extend(t.chunk(&chunk(json!({}), Some("stop"))));
        ev.extend(t.chunk(&json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 1}}})));
        ev.extend(t.end());
        let kinds: Vec<&str> = ev.iter().map(StreamEvent::kind).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        let seqs: Vec<u64> = ev
            .iter()
            .map(|e| {
                serde_json::to_value(e).unwrap()["sequence_number"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, (0..ev.len() as u64).collect::<Vec<_>>());
        let done = serde_json::to_value(ev.last().unwrap()).unwrap();
        assert_eq!(done["type"], "response.completed");
        assert_eq!(done["response"]["status"], "completed");
        assert_eq!(done["response"]["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(done["response"]["output"][0]["status"], "completed");
        assert_eq!(
            done["response"]["usage"],
            json!({"input_tokens": 5, "input_tokens_details": {"cached_tokens": 1}, "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7})
        );
        let delta = serde_json::to_value(&ev[4]).unwrap();
        assert_eq!(delta["delta"], "Hel");
        assert_eq!(delta["item_id"], done["response"]["output"][0]["id"]);
        assert!(ev[4]
            .frame()
            .starts_with(b"event: response.output_text.delta\ndata: {"));
    }

    #[test]
    fn translator_streams_tool_calls_and_length() {
        let mut t = Translator::new(tr(json!({"input": "x"})).unwrap().skeleton);
        let _ = t.begin();
        let mut ev = t.chunk(&chunk(json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]}), None));
        ev.extend(t.chunk(&chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":"}}]}),
            None,
        )));
        ev.extend(t.chunk(&chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            None,
        )));
        ev.extend(t.chunk(&chunk(json!({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}), Some("tool_calls"))));
        ev.extend(t.end());
        let kinds: Vec<&str> = ev.iter().map(StreamEvent::kind).collect();
        assert_eq!(
            kinds,
            [
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        let out = serde_json::to_value(&t.resp.output).unwrap();
        assert_eq!(out[0]["type"], "function_call");
        assert_eq!(
            (out[0]["call_id"].as_str(), out[0]["arguments"].as_str()),
            (Some("call_a"), Some("{\"x\":1}"))
        );
        assert_eq!(
            (out[1]["name"].as_str(), out[1]["status"].as_str()),
            (Some("g"), Some("completed"))
        );
        let conv = output_messages(&t.resp.output);
        assert_eq!(
            conv[0]["tool_calls"][0]["function"]["arguments"],
            "{\"x\":1}"
        );

        let mut t = Translator::new(tr(json!({"input": "x"})).unwrap().skeleton);
        let _ = t.begin();
        let _ = t.chunk(&chunk(json!({"content": "abc"}), Some("length")));
        let ev = t.end();
        assert_eq!(ev.last().unwrap().kind(), "response.incomplete");
        assert_eq!(t.resp.status, "incomplete");
        assert_eq!(
            t.resp.incomplete_details,
            Some(IncompleteDetails {
                reason: "max_output_tokens"
            })
        );
        assert!(matches!(
            &t.resp.output[0],
            OutputItem::Message {
                status: "incomplete",
                ..
            }
        ));

        // Nothing generated: one empty message, as OpenAI answers.
        let mut t = Translator::new(tr(json!({"input": "x"})).unwrap().skeleton);
        let _ = t.begin();
        let _ = t.chunk(&chunk(json!({}), Some("stop")));
        let ev = t.end();
        assert!(ev.iter().all(|e| e.kind() != "response.output_text.delta"));
        assert!(
            matches!(&t.resp.output[..], [OutputItem::Message { content, .. }] if content[0].text.is_empty())
        );
    }

    #[test]
    fn failure_and_frames() {
        let mut t = Translator::new(tr(json!({"input": "x"})).unwrap().skeleton);
        let _ = t.begin();
        let ev = t.fail(&ApiError::Internal("boom".into()).body());
        assert_eq!(ev[0].kind(), "response.failed");
        assert_eq!(t.resp.error.as_ref().unwrap().code, "server_error");
        assert_eq!(
            t.resp.error.as_ref().unwrap().message,
            "internal error: boom"
        );
        assert_eq!(parse_frame("data: [DONE]\n\n"), Some(ChatFrame::Done));
        assert_eq!(
            parse_frame("data: {\"a\":1}\n\n"),
            Some(ChatFrame::Chunk(json!({"a": 1})))
        );
        assert!(matches!(
            parse_frame("data: {\"error\":{}}\n\n"),
            Some(ChatFrame::Error(_))
        ));
        assert_eq!(parse_frame(": keep-alive\n\n"), None);
    }

    #[test]
    fn store_is_bounded_and_per_tenant() {
        let s = ResponseStore::new(2);
        let mk = |tenant| Stored {
            tenant,
            response: tr(json!({"input": "x"})).unwrap().skeleton,
            conversation: vec![],
            input_items: vec![],
        };
        let (a, b, c) = (mk(0), mk(0), mk(1));
        let (ia, ib, ic) = (
            a.response.id.clone(),
            b.response.id.clone(),
            c.response.id.clone(),
        );
        s.put(a);
        s.put(b);
        assert!(
            s.get(&ia, 0).is_some() && s.get(&ia, 1).is_none(),
            "another tenant does not see it"
        );
        s.put(c);
        assert_eq!(s.len(), 2);
        assert!(s.get(&ia, 0).is_none(), "the oldest is evicted");
        assert!(s.get(&ib, 0).is_some() && s.get(&ic, 1).is_some());
        assert!(!s.remove(&ib, 1));
        assert!(s.remove(&ib, 0));
        assert!(s.get(&ib, 0).is_none() && !s.remove(&ib, 0));
    }
}
