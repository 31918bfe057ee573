//! From engine events to OpenAI responses: one [`Generation`] per HTTP request
//! (several prompts × `n` completions), assembled into a JSON body or streamed
//! as server-sent events (`data: {…}\n\n` chunks, then `data: [DONE]\n\n`).
//!
//! Dropping a `Generation` (the client went away: hyper drops the handler
//! future or the SSE body) drops every [`ResponseStream`], which cancels the
//! requests in the engine, and every admission ticket. Metrics of each
//! completion are recorded here as its events arrive.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::time::Instant;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{self as fstream, SelectAll, Stream, StreamExt};
use serde_json::{json, Map, Value};
use tracing::Instrument;

use super::admission::{Admitted, Ticket};
use super::error::ApiError;
use super::App;
use crate::engine::{Event, GenerateRequest, Prompt, ResponseStream, SamplingParams, TokenLogprob};
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
    /// Token ids (as the engine would encode them).
    pub ids: Vec<u32>,
    /// Original text, if the prompt was text (for `echo`).
    pub text: Option<String>,
}

type EventStream = Pin<Box<dyn Stream<Item = (usize, Event)> + Send>>;

struct Sub {
    ticket: Option<Ticket>,
    admitted_at: Instant,
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
}

/// The state of one HTTP generation request.
struct Generation {
    app: App,
    tenant: usize,
    kind: Kind,
    n: usize,
    arrival: Instant,
    id: String,
    created: u64,
    subs: Vec<Sub>,
    choices: Vec<Choice>,
    events: SelectAll<EventStream>,
    include_usage: bool,
}

fn event_stream(p: usize, rs: ResponseStream) -> EventStream {
    Box::pin(fstream::unfold(rs, |mut rs| async move { rs.next().await.map(|e| (e, rs)) }).map(move |e| (p, e)))
}

/// Submits every prompt through admission, waits for each to start, and answers
/// with a JSON body or an SSE stream.
#[allow(clippy::too_many_arguments)]
pub async fn generate(
    app: App,
    tenant: usize,
    kind: Kind,
    prompts: Vec<PromptSpec>,
    params: SamplingParams,
    priority: i32,
    streaming: bool,
    include_usage: bool,
    arrival: Instant,
) -> Result<Response, ApiError> {
    let n = params.n.max(1);
    // Queue every prompt, then wait for all admissions (dropping on error cancels the rest).
    let mut replies = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let req = GenerateRequest { prompt: Prompt::Tokens(p.ids.clone()), params: params.clone(), priority };
        replies.push(app.admission.enqueue(tenant, priority, p.ids.len(), req)?);
    }
    let mut admitted: Vec<Admitted> = Vec::with_capacity(replies.len());
    for r in replies {
        let a = r.await.map_err(|_| ApiError::Unavailable("the server is shutting down".into()))??;
        admitted.push(a);
    }
    let tenant_name = app.admission.tenant_name(tenant).to_string();
    let mut subs = Vec::with_capacity(admitted.len());
    let mut events: SelectAll<EventStream> = SelectAll::new();
    for (i, (mut a, spec)) in admitted.into_iter().zip(prompts).enumerate() {
        // First event: Started, or the engine's refusal (answered with its status).
        match a.stream.next().await {
            Some(Event::Started { prompt_tokens, .. }) => {
                app.metrics.on_prompt(&tenant_name, prompt_tokens.len());
                subs.push(Sub {
                    ticket: Some(a.ticket),
                    admitted_at: a.admitted_at,
                    prompt_ids: prompt_tokens,
                    prompt_text: spec.text,
                    prompt_lp: None,
                    remaining: n,
                    cached: 0,
                });
                events.push(event_stream(i, a.stream));
            }
            Some(Event::Error(e)) => return Err(e.into()),
            Some(_) => return Err(ApiError::Internal("the engine sent an event before `Started`".into())),
            None => return Err(ApiError::Unavailable("the engine stopped".into())),
        }
    }
    let prefix = if matches!(kind, Kind::Chat { .. }) { "chatcmpl-" } else { "cmpl-" };
    let num_choices = subs.len() * n;
    let g = Generation {
        app,
        tenant,
        kind,
        n,
        arrival,
        id: format!("{prefix}{}", uuid::Uuid::new_v4().simple()),
        created: super::unix_now(),
        subs,
        choices: (0..num_choices).map(|_| Choice::default()).collect(),
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
    let bytes = app.engine.tokenizer().token_to_piece_bytes(id).unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

impl Generation {
    fn tenant_name(&self) -> &str {
        self.app.admission.tenant_name(self.tenant)
    }

    fn all_done(&self) -> bool {
        self.subs.iter().all(|s| s.remaining == 0)
    }

    /// Applies one event; returns the streaming chunks it produces (when `emit`).
    fn apply(&mut self, p: usize, ev: Event, emit: bool) -> Result<Vec<Value>, ApiError> {
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
                let since = self.choices.get(ci).and_then(|c| c.last_token_at).map(|t| now.duration_since(t).as_secs_f64());
                self.app.metrics.on_token(self.app.admission.tenant_name(self.tenant), since);
                if let Some(t) = self.subs.get(p).and_then(|s| s.ticket.as_ref()) {
                    t.add_output(1);
                }
                let echo = emit.then(|| self.echo_chunk(p, ci)).flatten();
                out.extend(echo);
                let Some(c) = self.choices.get_mut(ci) else { return Ok(out) };
                c.first_token_at.get_or_insert(now);
                c.last_token_at = Some(now);
                c.completion_tokens += 1;
                c.text.push_str(&text);
                if emit {
                    let lp = self.logprobs_json(std::slice::from_ref(&token), None);
                    if !text.is_empty() || lp.is_some() {
                        out.push(self.delta_chunk(ci, &text, lp, None));
                    }
                }
                if let Some(c) = self.choices.get_mut(ci) {
                    c.tokens.push(token);
                }
            }
            Event::Finished { index, reason, text, usage, timings } => {
                let ci = p * self.n + index;
                let now = Instant::now();
                if emit {
                    if let Some(e) = self.echo_chunk(p, ci) {
                        out.push(e);
                    }
                }
                let tenant = self.tenant_name().to_string();
                let Some(sub) = self.subs.get_mut(p) else { return Ok(out) };
                sub.cached = sub.cached.max(usage.cached_tokens);
                sub.remaining = sub.remaining.saturating_sub(1);
                if sub.remaining == 0 {
                    sub.ticket = None; // engine slots are free again
                }
                let admitted_at = sub.admitted_at;
                let Some(c) = self.choices.get_mut(ci) else { return Ok(out) };
                c.text.push_str(&text);
                c.finish = Some(reason.as_str());
                let scheduled = admitted_at + timings.queue;
                let first = c.first_token_at.unwrap_or(now);
                let times = RequestTimes {
                    queue_s: scheduled.saturating_duration_since(self.arrival).as_secs_f64(),
                    prefill_s: first.saturating_duration_since(scheduled).as_secs_f64(),
                    decode_s: now.saturating_duration_since(first).as_secs_f64(),
                    ttft_s: first.saturating_duration_since(self.arrival).as_secs_f64(),
                    e2e_s: now.saturating_duration_since(self.arrival).as_secs_f64(),
                };
                self.app.metrics.on_finish(&tenant, reason.as_str(), usage.completion_tokens, times);
                if emit {
                    out.push(self.delta_chunk(ci, &text, None, Some(reason.as_str())));
                }
            }
            Event::Error(e) => return Err(e.into()),
        }
        Ok(out)
    }

    /// The prompt text (and prompt log-probabilities) as the first chunk of an echoing choice.
    fn echo_chunk(&mut self, p: usize, ci: usize) -> Option<Value> {
        let Kind::Completion { echo: true, .. } = self.kind else { return None };
        let c = self.choices.get_mut(ci)?;
        if c.echoed {
            return None;
        }
        c.echoed = true;
        let sub = self.subs.get(p)?;
        let text = self.prompt_text(sub);
        let lp = self.prompt_logprobs_json(sub);
        Some(self.chunk(json!({"index": ci, "text": text, "logprobs": lp, "finish_reason": Value::Null})))
    }

    fn prompt_text(&self, sub: &Sub) -> String {
        match &sub.prompt_text {
            Some(t) => t.clone(),
            None => self.app.engine.tokenizer().decode(&sub.prompt_ids, false).unwrap_or_default(),
        }
    }

    /// Completions-style logprobs of the prompt tokens (first token: null).
    fn prompt_logprobs_json(&self, sub: &Sub) -> Value {
        let Kind::Completion { logprobs: Some(_), .. } = self.kind else { return Value::Null };
        let mut tokens = Vec::new();
        let mut token_lps = Vec::new();
        let mut tops = Vec::new();
        let mut offsets = Vec::new();
        let mut off = 0usize;
        for (i, &id) in sub.prompt_ids.iter().enumerate() {
            let (s, _) = token_text(&self.app, id);
            offsets.push(off);
            off += s.chars().count();
            tokens.push(s);
            match sub.prompt_lp.as_ref().and_then(|v| v.get(i)).and_then(|x| x.as_ref()) {
                Some(lp) => {
                    token_lps.push(json!(lp.logprob));
                    tops.push(self.top_map(lp));
                }
                None => {
                    token_lps.push(Value::Null);
                    tops.push(Value::Null);
                }
            }
        }
        json!({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets})
    }

    fn top_map(&self, lp: &TokenLogprob) -> Value {
        let mut m = Map::new();
        for &(id, v) in &lp.top {
            m.entry(token_text(&self.app, id).0).or_insert(json!(v));
        }
        // OpenAI always lists the chosen token too.
        m.entry(token_text(&self.app, lp.token).0).or_insert(json!(lp.logprob));
        Value::Object(m)
    }

    /// Log-probabilities of generated tokens in the API's shape (None when not requested).
    fn logprobs_json(&self, tokens: &[TokenLogprob], start_offset: Option<usize>) -> Option<Value> {
        match self.kind {
            Kind::Completion { logprobs: Some(_), .. } => {
                let mut off = start_offset.unwrap_or(0);
                let mut t = Vec::new();
                let mut lps = Vec::new();
                let mut tops = Vec::new();
                let mut offsets = Vec::new();
                for lp in tokens {
                    let (s, _) = token_text(&self.app, lp.token);
                    offsets.push(off);
                    off += s.chars().count();
                    t.push(s);
                    lps.push(json!(lp.logprob));
                    tops.push(self.top_map(lp));
                }
                Some(json!({"tokens": t, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}))
            }
            Kind::Chat { logprobs: true } => {
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|lp| {
                        let (s, b) = token_text(&self.app, lp.token);
                        let top: Vec<Value> = lp
                            .top
                            .iter()
                            .map(|&(id, v)| {
                                let (s, b) = token_text(&self.app, id);
                                json!({"token": s, "logprob": v, "bytes": b})
                            })
                            .collect();
                        json!({"token": s, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
                    })
                    .collect();
                Some(json!({"content": content}))
            }
            _ => None,
        }
    }

    fn chunk(&self, choice: Value) -> Value {
        let object = if matches!(self.kind, Kind::Chat { .. }) { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.app.model_name, "choices": [choice]});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn delta_chunk(&self, ci: usize, text: &str, lp: Option<Value>, finish: Option<&str>) -> Value {
        let lp = lp.unwrap_or(Value::Null);
        let choice = match self.kind {
            Kind::Chat { .. } => {
                let delta = if text.is_empty() { json!({}) } else { json!({"content": text}) };
                json!({"index": ci, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Completion { .. } => json!({"index": ci, "text": text, "logprobs": lp, "finish_reason": finish}),
        };
        self.chunk(choice)
    }

    fn usage(&self) -> Value {
        let prompt: usize = self.subs.iter().map(|s| s.prompt_ids.len()).sum();
        let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
        let cached: usize = self.subs.iter().map(|s| s.cached).sum();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }

    /// Non-streaming: waits for every completion and builds the body.
    async fn collect(mut self) -> Result<Response, ApiError> {
        while !self.all_done() {
            match self.events.next().await {
                Some((p, ev)) => {
                    self.apply(p, ev, false)?;
                }
                None => return Err(ApiError::Internal("the engine ended a request without finishing it".into())),
            }
        }
        let mut choices = Vec::with_capacity(self.choices.len());
        for (ci, c) in self.choices.iter().enumerate() {
            let p = ci / self.n;
            let finish = c.finish.unwrap_or("abort");
            match self.kind {
                Kind::Chat { .. } => {
                    let lp = self.logprobs_json(&c.tokens, None).unwrap_or(Value::Null);
                    choices.push(json!({
                        "index": ci,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": lp,
                        "finish_reason": finish,
                    }));
                }
                Kind::Completion { echo, .. } => {
                    let sub = self.subs.get(p);
                    let (mut text, mut lp) = (String::new(), Value::Null);
                    if let (true, Some(sub)) = (echo, sub) {
                        text = self.prompt_text(sub);
                        lp = self.prompt_logprobs_json(sub);
                    }
                    let start = text.chars().count();
                    text.push_str(&c.text);
                    if let Some(gen) = self.logprobs_json(&c.tokens, Some(start)) {
                        if lp.is_null() {
                            lp = gen;
                        } else {
                            for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                                if let (Some(a), Some(b)) = (lp[key].as_array().cloned(), gen[key].as_array()) {
                                    let mut a = a;
                                    a.extend(b.iter().cloned());
                                    lp[key] = Value::Array(a);
                                }
                            }
                        }
                    }
                    choices.push(json!({"index": ci, "text": text, "logprobs": lp, "finish_reason": finish}));
                }
            }
        }
        let object = if matches!(self.kind, Kind::Chat { .. }) { "chat.completion" } else { "text_completion" };
        let body = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.app.model_name,
            "choices": choices,
            "usage": self.usage(),
        });
        Ok(axum::Json(body).into_response())
    }

    /// Streaming: an SSE body; dropping it (client gone) cancels everything.
    fn into_sse(self) -> Response {
        struct St {
            g: Generation,
            pending: VecDeque<Bytes>,
            finished: bool,
        }
        fn frame(v: &Value) -> Bytes {
            Bytes::from(format!("data: {v}\n\n"))
        }
        let span = tracing::Span::current();
        let mut pending = VecDeque::new();
        if let Kind::Chat { .. } = self.kind {
            for ci in 0..self.choices.len() {
                let v = self.chunk(json!({"index": ci, "delta": {"role": "assistant", "content": ""}, "logprobs": Value::Null, "finish_reason": Value::Null}));
                pending.push_back(frame(&v));
            }
        }
        let st = St { g: self, pending, finished: false };
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
                                        let object = if matches!(st.g.kind, Kind::Chat { .. }) { "chat.completion.chunk" } else { "text_completion" };
                                        let v = json!({"id": st.g.id, "object": object, "created": st.g.created, "model": st.g.app.model_name, "choices": [], "usage": st.g.usage()});
                                        st.pending.push_back(frame(&v));
                                    }
                                    st.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                                    st.finished = true;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "request failed mid-stream");
                                st.pending.push_back(frame(&e.body()));
                                st.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                                st.finished = true;
                            }
                        },
                        None => {
                            let e = ApiError::Internal("the engine ended a request without finishing it".into());
                            st.pending.push_back(frame(&e.body()));
                            st.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                            st.finished = true;
                        }
                    }
                }
            }
            .instrument(span)
        });
        (
            [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")],
            axum::body::Body::from_stream(body),
        )
            .into_response()
    }
}
