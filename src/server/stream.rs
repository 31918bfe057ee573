//! From engine events to OpenAI responses: one [`Generation`] per HTTP request
//! (several prompts × `n` completions), assembled into a JSON body or streamed
//! as server-sent events (`data: {…}\n\n` chunks, then `data: [DONE]\n\n`).
//!
//! The whole request goes through admission as one entry (all prompts × `n`,
//! admitted together under one [`Ticket`], whose slots are returned one per
//! finished completion). Dropping a `Generation` (the client went away: hyper
//! drops the handler future or the SSE body) drops every [`ResponseStream`],
//! which cancels the requests in the engine, and the ticket. Bodies and chunks
//! are the typed structs of [`super::responses`]. Metrics of each completion
//! are recorded here as its events arrive. With tools, each chat choice's
//! text goes through its [`ToolParser`] (super::tools): content outside calls
//! and `tool_calls` (deltas when streaming), `finish_reason: "tool_calls"`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::time::Instant;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{self as fstream, SelectAll, Stream, StreamExt};
use serde::Serialize;
use tracing::Instrument;

use super::admission::{Admitted, Ticket};
use super::error::ApiError;
use super::responses::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs,
    ChatMessageOut, ChatTokenLogprob, ChatTopLogprob, Chunk, Completion, CompletionChoice,
    CompletionChunk, CompletionLogprobs, PromptTokensDetails, TopLogprobMap, Usage,
};
use super::tools::{self, ToolItem, ToolParser};
use super::App;
use crate::engine::{Event, ResponseStream, SamplingParams, TokenLogprob, ValidRequest};
use crate::metrics::RequestTimes;

/// Which API shape to produce.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// `/v1/completions`.
    Completion {
        /// Prepend the prompt.
        echo: bool,
        /// Top log-probabilities requested.
        logprobs: Option<usize>,
    },
    /// `/v1/chat/completions`.
    Chat {
        /// Log-probabilities requested.
        logprobs: bool,
    },
}

/// One prompt of a request.
#[derive(Clone, Debug)]
pub struct PromptSpec {
    /// The prompt, checked and encoded by the engine's validator (once).
    pub valid: ValidRequest,
    /// Original text, if the prompt was text (for `echo`).
    pub text: Option<String>,
}

type EventStream = Pin<Box<dyn Stream<Item = (usize, Event)> + Send>>;

struct Sub {
    prompt_ids: Vec<u32>,
    prompt_text: Option<String>,
    prompt_lp: Option<Vec<Option<TokenLogprob>>>,
    remaining: usize,
    cached: usize,
}

#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    completion_tokens: usize,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    echoed: bool,
    /// The tool-call parser of this choice (chat with tools).
    tools: Option<ToolParser>,
}

/// The state of one HTTP generation request.
struct Generation {
    app: App,
    tenant: usize,
    kind: Kind,
    n: usize,
    arrival: Instant,
    admitted_at: Instant,
    /// The request's slots and token reservation (None once every choice ended).
    ticket: Option<Ticket>,
    id: String,
    created: u64,
    subs: Vec<Sub>,
    choices: Vec<Choice>,
    events: SelectAll<EventStream>,
    include_usage: bool,
}

fn event_stream(p: usize, rs: ResponseStream) -> EventStream {
    Box::pin(
        fstream::unfold(rs, |mut rs| async move { rs.next().await.map(|e| (e, rs)) })
            .map(move |e| (p, e)),
    )
}

/// Submits the request (every prompt, as one admission entry), waits for it to
/// start, and answers with a JSON body or an SSE stream.
#[allow(clippy::too_many_arguments)]
pub async fn generate(
    app: App,
    tenant: usize,
    kind: Kind,
    prompts: Vec<PromptSpec>,
    params: SamplingParams,
    streaming: bool,
    include_usage: bool,
    arrival: Instant,
) -> Result<Response, ApiError> {
    generate_with_tools(
        app,
        tenant,
        kind,
        prompts,
        params,
        streaming,
        include_usage,
        arrival,
        None,
    )
    .await
}

/// [`generate`] for a chat request with tools: every choice's output is parsed
/// by its own copy of `tools` (module docs).
#[allow(clippy::too_many_arguments)]
pub async fn generate_with_tools(
    app: App,
    tenant: usize,
    kind: Kind,
    prompts: Vec<PromptSpec>,
    params: SamplingParams,
    streaming: bool,
    include_usage: bool,
    arrival: Instant,
    tools: Option<ToolParser>,
) -> Result<Response, ApiError> {
    let n = params.n.max(1);
    let priority = prompts.first().map_or(0, |p| p.valid.priority());
    let reqs = prompts.iter().map(|p| p.valid.clone()).collect();
    let reply = app.admission.enqueue(tenant, priority, reqs)?;
    let Admitted {
        streams,
        ticket,
        admitted_at,
    } = reply
        .await
        .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))??;
    let tenant_name = app.admission.tenant_name(tenant).to_string();
    let mut subs = Vec::with_capacity(streams.len());
    let mut events: SelectAll<EventStream> = SelectAll::new();
    for (i, (mut stream, spec)) in streams.into_iter().zip(prompts).enumerate() {
        // First event: Started, or the engine's refusal (answered with its status).
        match stream.next().await {
            Some(Event::Started { prompt_tokens, .. }) => {
                app.metrics.on_prompt(&tenant_name, prompt_tokens.len());
                subs.push(Sub {
                    prompt_ids: prompt_tokens,
                    prompt_text: spec.text,
                    prompt_lp: None,
                    remaining: n,
                    cached: 0,
                });
                events.push(event_stream(i, stream));
            }
            Some(Event::Error(e)) => return Err(e.into()),
            Some(_) => {
                return Err(ApiError::Internal(
                    "the engine sent an event before `Started`".into(),
                ))
            }
            None => return Err(ApiError::Unavailable("the engine stopped".into())),
        }
    }
    let prefix = if matches!(kind, Kind::Chat { .. }) {
        "chatcmpl-"
    } else {
        "cmpl-"
    };
    let num_choices = subs.len() * n;
    let g = Generation {
        app,
        tenant,
        kind,
        n,
        arrival,
        admitted_at,
        ticket: Some(ticket),
        id: format!("{prefix}{}", uuid::Uuid::new_v4().simple()),
        created: super::unix_now(),
        subs,
        choices: (0..num_choices)
            .map(|_| Choice {
                tools: tools.clone(),
                ..Choice::default()
            })
            .collect(),
        events,
        include_usage,
    };
    if streaming {
        Ok(g.into_sse())
    } else {
        g.collect().await
    }
}

/// Token text as clients see it (raw bytes, lossy UTF-8).
fn token_text(app: &App, id: u32) -> (String, Vec<u8>) {
    let bytes = app
        .engine
        .tokenizer()
        .token_to_piece_bytes(id)
        .unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// One SSE frame: `data: {json}\n\n`.
fn frame<T: Serialize>(v: &T) -> Bytes {
    match serde_json::to_string(v) {
        Ok(s) => Bytes::from(format!("data: {s}\n\n")),
        Err(e) => {
            let err = ApiError::Internal(format!("serializing a chunk failed: {e}"));
            Bytes::from(format!("data: {}\n\n", err.body()))
        }
    }
}

impl Generation {
    fn tenant_name(&self) -> &str {
        self.app.admission.tenant_name(self.tenant)
    }

    fn all_done(&self) -> bool {
        self.subs.iter().all(|s| s.remaining == 0)
    }

    /// Whether generated tokens carry log-probabilities.
    fn wants_logprobs(&self) -> bool {
        matches!(
            self.kind,
            Kind::Completion {
                logprobs: Some(_),
                ..
            } | Kind::Chat { logprobs: true }
        )
    }

    /// Applies one event; returns the streaming chunks it produces (when `emit`).
    fn apply(&mut self, p: usize, ev: Event, emit: bool) -> Result<Vec<Chunk>, ApiError> {
        let mut out = Vec::new();
        match ev {
            Event::Started { .. } => {}
            Event::PromptLogprobs(lp) => {
                if let Some(s) = self.subs.get_mut(p) {
                    s.prompt_lp = Some(lp);
                }
            }
            Event::Token { index, token, text } => {
                let ci = p * self.n + index;
                let now = Instant::now();
                let since = self
                    .choices
                    .get(ci)
                    .and_then(|c| c.last_token_at)
                    .map(|t| now.duration_since(t).as_secs_f64());
                self.app
                    .metrics
                    .on_token(self.app.admission.tenant_name(self.tenant), since);
                if let Some(t) = self.ticket.as_mut() {
                    t.add_output(1);
                }
                let echo = emit.then(|| self.echo_chunk(p, ci)).flatten();
                out.extend(echo);
                let Some(c) = self.choices.get_mut(ci) else {
                    return Ok(out);
                };
                c.first_token_at.get_or_insert(now);
                c.last_token_at = Some(now);
                c.completion_tokens += 1;
                c.text.push_str(&text);
                if let Some(parser) = c.tools.as_mut() {
                    let items = parser.feed(&text);
                    if emit {
                        out.extend(self.tool_chunks(ci, items, Some(&token)));
                    }
                } else if emit && (!text.is_empty() || self.wants_logprobs()) {
                    out.push(self.delta_chunk(ci, &text, Some(&token), None));
                }
                if let Some(c) = self.choices.get_mut(ci) {
                    c.tokens.push(token);
                }
            }
            Event::Finished {
                index,
                reason,
                text,
                usage,
                timings,
            } => {
                let ci = p * self.n + index;
                let now = Instant::now();
                if emit {
                    if let Some(e) = self.echo_chunk(p, ci) {
                        out.push(e);
                    }
                }
                let tenant = self.tenant_name().to_string();
                let Some(sub) = self.subs.get_mut(p) else {
                    return Ok(out);
                };
                sub.cached = sub.cached.max(usage.cached_tokens);
                sub.remaining = sub.remaining.saturating_sub(1);
                // This completion's engine sequence is free again.
                if let Some(t) = self.ticket.as_mut() {
                    t.release(1);
                }
                if self.all_done() {
                    self.ticket = None; // refunds the unused token reservation
                }
                let admitted_at = self.admitted_at;
                let Some(c) = self.choices.get_mut(ci) else {
                    return Ok(out);
                };
                c.text.push_str(&text);
                c.finish = Some(reason.as_str());
                let tool_items = c.tools.as_mut().map(|parser| {
                    let mut items = parser.feed(&text);
                    items.extend(parser.finish());
                    (items, parser.num_calls())
                });
                let scheduled = admitted_at + timings.queue;
                let first = c.first_token_at.unwrap_or(now);
                let times = RequestTimes {
                    queue_s: scheduled
                        .saturating_duration_since(self.arrival)
                        .as_secs_f64(),
                    prefill_s: first.saturating_duration_since(scheduled).as_secs_f64(),
                    decode_s: now.saturating_duration_since(first).as_secs_f64(),
                    ttft_s: first.saturating_duration_since(self.arrival).as_secs_f64(),
                    e2e_s: now.saturating_duration_since(self.arrival).as_secs_f64(),
                };
                self.app.metrics.on_finish(
                    &tenant,
                    reason.as_str(),
                    usage.completion_tokens,
                    times,
                );
                match (emit, tool_items) {
                    (false, _) => {}
                    (true, None) => {
                        out.push(self.delta_chunk(ci, &text, None, Some(reason.as_str())))
                    }
                    (true, Some((items, num_calls))) => {
                        out.extend(self.tool_chunks(ci, items, None));
                        out.push(self.delta_chunk(
                            ci,
                            "",
                            None,
                            Some(tools::finish_reason(reason.as_str(), num_calls)),
                        ));
                    }
                }
            }
            Event::Error(e) => return Err(e.into()),
        }
        Ok(out)
    }

    /// The prompt text (and prompt log-probabilities) as the first chunk of an echoing choice.
    fn echo_chunk(&mut self, p: usize, ci: usize) -> Option<Chunk> {
        let Kind::Completion { echo: true, .. } = self.kind else {
            return None;
        };
        let c = self.choices.get_mut(ci)?;
        if c.echoed {
            return None;
        }
        c.echoed = true;
        let sub = self.subs.get(p)?;
        let choice = CompletionChoice {
            index: ci,
            text: self.prompt_text(sub),
            logprobs: self.prompt_logprobs(sub),
            finish_reason: None,
        };
        Some(self.completion_chunk(choice))
    }

    fn prompt_text(&self, sub: &Sub) -> String {
        match &sub.prompt_text {
            Some(t) => t.clone(),
            None => self
                .app
                .engine
                .tokenizer()
                .decode(&sub.prompt_ids, false)
                .unwrap_or_default(),
        }
    }

    /// Completions-style logprobs of the prompt tokens (first token: null); None when not requested.
    fn prompt_logprobs(&self, sub: &Sub) -> Option<CompletionLogprobs> {
        let Kind::Completion {
            logprobs: Some(_), ..
        } = self.kind
        else {
            return None;
        };
        let mut lp = CompletionLogprobs::default();
        let mut off = 0usize;
        for (i, &id) in sub.prompt_ids.iter().enumerate() {
            let (s, _) = token_text(&self.app, id);
            lp.text_offset.push(off);
            off += s.chars().count();
            lp.tokens.push(s);
            let entry = sub
                .prompt_lp
                .as_ref()
                .and_then(|v| v.get(i))
                .and_then(|x| x.as_ref());
            lp.token_logprobs.push(entry.map(|e| f64::from(e.logprob)));
            lp.top_logprobs.push(entry.map(|e| self.top_map(e)));
        }
        Some(lp)
    }

    fn top_map(&self, lp: &TokenLogprob) -> TopLogprobMap {
        let mut m = TopLogprobMap::new();
        for &(id, v) in &lp.top {
            m.entry(token_text(&self.app, id).0).or_insert(f64::from(v));
        }
        // OpenAI always lists the chosen token too.
        m.entry(token_text(&self.app, lp.token).0)
            .or_insert(f64::from(lp.logprob));
        m
    }

    /// Completions-style log-probabilities of generated tokens, offsets from `start_offset`.
    fn completion_logprobs(
        &self,
        tokens: &[TokenLogprob],
        start_offset: usize,
    ) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        let mut off = start_offset;
        for lp in tokens {
            let (s, _) = token_text(&self.app, lp.token);
            out.text_offset.push(off);
            off += s.chars().count();
            out.tokens.push(s);
            out.token_logprobs.push(Some(f64::from(lp.logprob)));
            out.top_logprobs.push(Some(self.top_map(lp)));
        }
        out
    }

    /// Chat-style log-probabilities of generated tokens.
    fn chat_logprobs(&self, tokens: &[TokenLogprob]) -> ChatLogprobs {
        let content = tokens
            .iter()
            .map(|lp| {
                let (token, bytes) = token_text(&self.app, lp.token);
                let top_logprobs = lp
                    .top
                    .iter()
                    .map(|&(id, v)| {
                        let (token, bytes) = token_text(&self.app, id);
                        ChatTopLogprob {
                            token,
                            logprob: f64::from(v),
                            bytes,
                        }
                    })
                    .collect();
                ChatTokenLogprob {
                    token,
                    logprob: f64::from(lp.logprob),
                    bytes,
                    top_logprobs,
                }
            })
            .collect();
        ChatLogprobs { content }
    }

    /// `usage` of chunks: absent without `include_usage`, else `null` until the last.
    fn chunk_usage(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    fn completion_chunk(&self, choice: CompletionChoice) -> Chunk {
        Chunk::Completion(CompletionChunk {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.app.model_name.clone(),
            choices: vec![choice],
            usage: self.chunk_usage(),
        })
    }

    fn chat_chunk(&self, choice: ChatChunkChoice) -> Chunk {
        Chunk::Chat(ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.app.model_name.clone(),
            choices: vec![choice],
            usage: self.chunk_usage(),
        })
    }

    /// The chunks of parsed tool output (content deltas and each call's two
    /// deltas); `token`'s log-probabilities ride on the first, or on an empty
    /// delta when the token produced nothing yet.
    fn tool_chunks(
        &self,
        ci: usize,
        items: Vec<ToolItem>,
        token: Option<&TokenLogprob>,
    ) -> Vec<Chunk> {
        let mut logprobs = token
            .filter(|_| self.wants_logprobs())
            .map(|t| self.chat_logprobs(std::slice::from_ref(t)));
        let family = self
            .choices
            .get(ci)
            .and_then(|c| c.tools.as_ref())
            .map(ToolParser::family);
        let mut deltas: Vec<ChatDelta> = Vec::new();
        let mut next_index = self
            .choices
            .get(ci)
            .and_then(|c| c.tools.as_ref())
            .map_or(0, ToolParser::num_calls);
        let num_new_calls = items
            .iter()
            .filter(|i| matches!(i, ToolItem::Call(_)))
            .count();
        next_index -= num_new_calls.min(next_index);
        for item in items {
            match item {
                ToolItem::Content(text) => deltas.push(ChatDelta {
                    content: Some(text),
                    ..ChatDelta::default()
                }),
                ToolItem::Call(call) => {
                    let Some(family) = family else { continue };
                    for d in tools::call_deltas(family, next_index, &call) {
                        deltas.push(ChatDelta {
                            tool_calls: Some(vec![d]),
                            ..ChatDelta::default()
                        });
                    }
                    next_index += 1;
                }
            }
        }
        if deltas.is_empty() && logprobs.is_some() {
            deltas.push(ChatDelta::default());
        }
        deltas
            .into_iter()
            .map(|delta| {
                self.chat_chunk(ChatChunkChoice {
                    index: ci,
                    delta,
                    logprobs: logprobs.take(),
                    finish_reason: None,
                })
            })
            .collect()
    }

    /// A chunk of new text (with the token's log-probabilities when requested) or a finish.
    fn delta_chunk(
        &self,
        ci: usize,
        text: &str,
        token: Option<&TokenLogprob>,
        finish: Option<&'static str>,
    ) -> Chunk {
        let token = token.filter(|_| self.wants_logprobs());
        match self.kind {
            Kind::Chat { .. } => {
                let delta = ChatDelta {
                    content: (!text.is_empty()).then(|| text.to_string()),
                    ..ChatDelta::default()
                };
                let logprobs = token.map(|t| self.chat_logprobs(std::slice::from_ref(t)));
                self.chat_chunk(ChatChunkChoice {
                    index: ci,
                    delta,
                    logprobs,
                    finish_reason: finish,
                })
            }
            Kind::Completion { .. } => {
                let logprobs = token.map(|t| self.completion_logprobs(std::slice::from_ref(t), 0));
                self.completion_chunk(CompletionChoice {
                    index: ci,
                    text: text.to_string(),
                    logprobs,
                    finish_reason: finish,
                })
            }
        }
    }

    /// The last chunk of a stream with `include_usage`: no choices, the usage.
    fn usage_chunk(&self) -> Chunk {
        let (id, created, model, usage) = (
            self.id.clone(),
            self.created,
            self.app.model_name.clone(),
            Some(Some(self.usage())),
        );
        match self.kind {
            Kind::Chat { .. } => Chunk::Chat(ChatCompletionChunk {
                id,
                object: "chat.completion.chunk",
                created,
                model,
                choices: vec![],
                usage,
            }),
            Kind::Completion { .. } => Chunk::Completion(CompletionChunk {
                id,
                object: "text_completion",
                created,
                model,
                choices: vec![],
                usage,
            }),
        }
    }

    fn usage(&self) -> Usage {
        let prompt: usize = self.subs.iter().map(|s| s.prompt_ids.len()).sum();
        let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
        let cached: usize = self.subs.iter().map(|s| s.cached).sum();
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }

    /// Non-streaming: waits for every completion and builds the body.
    async fn collect(mut self) -> Result<Response, ApiError> {
        while !self.all_done() {
            match self.events.next().await {
                Some((p, ev)) => {
                    self.apply(p, ev, false)?;
                }
                None => {
                    return Err(ApiError::Internal(
                        "the engine ended a request without finishing it".into(),
                    ))
                }
            }
        }
        let (id, created, model) = (self.id.clone(), self.created, self.app.model_name.clone());
        match self.kind {
            Kind::Chat { .. } => {
                let choices = self
                    .choices
                    .iter()
                    .enumerate()
                    .map(|(ci, c)| {
                        let finish = c.finish.unwrap_or("abort");
                        let (message, finish) = match c.tools.as_ref().map(ToolParser::family) {
                            None => (
                                ChatMessageOut {
                                    role: "assistant",
                                    content: Some(c.text.clone()),
                                    tool_calls: None,
                                },
                                finish,
                            ),
                            Some(family) => {
                                let (content, calls) = ToolParser::parse_all(family, &c.text);
                                let finish = tools::finish_reason(finish, calls.len());
                                let calls = (!calls.is_empty()).then(|| {
                                    calls
                                        .iter()
                                        .map(|call| tools::call_out(family, call))
                                        .collect()
                                });
                                (
                                    ChatMessageOut {
                                        role: "assistant",
                                        content,
                                        tool_calls: calls,
                                    },
                                    finish,
                                )
                            }
                        };
                        ChatChoice {
                            index: ci,
                            message,
                            logprobs: self.wants_logprobs().then(|| self.chat_logprobs(&c.tokens)),
                            finish_reason: Some(finish),
                        }
                    })
                    .collect();
                let body = ChatCompletion {
                    id,
                    object: "chat.completion",
                    created,
                    model,
                    choices,
                    usage: self.usage(),
                };
                Ok(axum::Json(body).into_response())
            }
            Kind::Completion { echo, .. } => {
                let mut choices = Vec::with_capacity(self.choices.len());
                for (ci, c) in self.choices.iter().enumerate() {
                    let (mut text, mut logprobs) = (String::new(), None);
                    if let (true, Some(sub)) = (echo, self.subs.get(ci / self.n)) {
                        text = self.prompt_text(sub);
                        logprobs = self.prompt_logprobs(sub);
                    }
                    if self.wants_logprobs() {
                        let generated = self.completion_logprobs(&c.tokens, text.chars().count());
                        logprobs = Some(match logprobs {
                            Some(mut prompt) => {
                                prompt.extend(generated);
                                prompt
                            }
                            None => generated,
                        });
                    }
                    text.push_str(&c.text);
                    choices.push(CompletionChoice {
                        index: ci,
                        text,
                        logprobs,
                        finish_reason: Some(c.finish.unwrap_or("abort")),
                    });
                }
                let body = Completion {
                    id,
                    object: "text_completion",
                    created,
                    model,
                    choices,
                    usage: self.usage(),
                };
                Ok(axum::Json(body).into_response())
            }
        }
    }

    /// Streaming: an SSE body; dropping it (client gone) cancels everything.
    fn into_sse(self) -> Response {
        struct St {
            g: Generation,
            pending: VecDeque<Bytes>,
            finished: bool,
        }
        let span = tracing::Span::current();
        let mut pending = VecDeque::new();
        if let Kind::Chat { .. } = self.kind {
            for ci in 0..self.choices.len() {
                let delta = ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    tool_calls: None,
                };
                let v = self.chat_chunk(ChatChunkChoice {
                    index: ci,
                    delta,
                    logprobs: None,
                    finish_reason: None,
                });
                pending.push_back(frame(&v));
            }
        }
        let st = St {
            g: self,
            pending,
            finished: false,
        };
        let body = fstream::unfold(st, move |mut st| {
            let span = span.clone();
            async move {
                loop {
                    if let Some(b) = st.pending.pop_front() {
                        return Some((Ok::<Bytes, Infallible>(b), st));
                    }
                    if st.finished {
                        return None;
                    }
                    match st.g.events.next().await {
                        Some((p, ev)) => match st.g.apply(p, ev, true) {
                            Ok(chunks) => {
                                st.pending.extend(chunks.iter().map(frame));
                                if st.g.all_done() {
                                    if st.g.include_usage {
                                        st.pending.push_back(frame(&st.g.usage_chunk()));
                                    }
                                    st.pending
                                        .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                                    st.finished = true;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "request failed mid-stream");
                                st.pending.push_back(frame(&e.body()));
                                st.pending
                                    .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                                st.finished = true;
                            }
                        },
                        None => {
                            let e = ApiError::Internal(
                                "the engine ended a request without finishing it".into(),
                            );
                            st.pending.push_back(frame(&e.body()));
                            st.pending
                                .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                            st.finished = true;
                        }
                    }
                }
            }
            .instrument(span)
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
}
