//! Routes and handlers: `/v1/completions`, `/v1/chat/completions`,
//! `/v1/responses` (handlers in [`super::openai_responses`]), `/v1/models`,
//! `/v1/models/{id}`, `/tokenize`, `/detokenize`, `/tokenizer_info`,
//! `/version`, `/health`, `/ready`, `/metrics`; the request context middleware
//! (request id, span, drain gate, error and HTTP metrics), CORS (outermost,
//! [`super::cors`]) and the tenant and body extractors.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{header, request::Parts, HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::Instrument;

use super::api::{
    self, ChatRequest, CompletionRequest, DetokenizeRequest, PromptInput, TokenizeRequest,
};
use super::error::{ApiError, ErrorKind};
use super::openai_responses;
use super::responses::{
    DetokenizeResponse, ModelCard, ModelList, StatusResponse, TokenizeResponse,
};
use super::stream::{self, Kind, PromptSpec};
use super::tools;
use super::App;
use crate::engine::{GenerateRequest, Prompt};
use crate::tokenizer::ChatMessage;

/// The request id (from `x-request-id` or generated).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Builds the router.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/responses", post(openai_responses::create))
        .route(
            "/v1/responses/{id}",
            get(openai_responses::retrieve).delete(openai_responses::delete),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(openai_responses::input_items),
        )
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/version", get(version))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        // Matched routes only: an unknown path stays 404 whatever its Content-Type.
        .route_layer(axum::middleware::from_fn(super::edge::require_json))
        // The Batch API (multipart uploads: its own Content-Type checks).
        .merge(super::openai_batches::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            request_context,
        ))
        // Outermost: preflights are answered before any check, and every
        // response (errors of the checks too) carries the CORS headers.
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            super::cors::layer,
        ))
        .with_state(app)
}

/// Fixed routes (the router's table above, without parameters).
const FIXED_ROUTES: &[&str] = &[
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/version",
    "/health",
    "/ready",
    "/metrics",
    "/v1/files",
    "/v1/batches",
];

/// The route template of `path` (`/v1/responses/{id}`): a bounded metric label; `none` for no route.
fn route_label(path: &str) -> &'static str {
    if let Some(r) = FIXED_ROUTES.iter().copied().find(|r| *r == path) {
        return r;
    }
    let segment = |s: &str| !s.is_empty() && !s.contains('/');
    if let Some(rest) = path.strip_prefix("/v1/responses/") {
        if segment(rest) {
            return "/v1/responses/{id}";
        }
        if rest.strip_suffix("/input_items").is_some_and(segment) {
            return "/v1/responses/{id}/input_items";
        }
    }
    if path.strip_prefix("/v1/models/").is_some_and(segment) {
        return "/v1/models/{id}";
    }
    if let Some(rest) = path.strip_prefix("/v1/files/") {
        if segment(rest) {
            return "/v1/files/{id}";
        }
        if rest.strip_suffix("/content").is_some_and(segment) {
            return "/v1/files/{id}/content";
        }
    }
    if let Some(rest) = path.strip_prefix("/v1/batches/") {
        if segment(rest) {
            return "/v1/batches/{id}";
        }
        if rest.strip_suffix("/cancel").is_some_and(segment) {
            return "/v1/batches/{id}/cancel";
        }
    }
    "none"
}

fn valid_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Request id, span, the checks before routing (Host, URI length, `/metrics`
/// key), drain gate, error metrics, access log.
async fn request_context(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| valid_request_id(s))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %path, tenant = tracing::field::Empty);
    req.extensions_mut().insert(RequestId(id.clone()));
    let probe = matches!(path.as_str(), "/health" | "/ready" | "/metrics");
    let handler = route_label(&path);
    let method = req.method().clone();
    let t0 = Instant::now();
    let mut resp = if let Err(e) = app.checks.check(&req) {
        e.into_response()
    } else if app.draining.load(Ordering::Relaxed) && !probe {
        ApiError::Unavailable("the server is shutting down".into()).into_response()
    } else {
        next.run(req).instrument(span.clone()).await
    };
    if let Some(kind) = resp.extensions().get::<ErrorKind>() {
        app.metrics.on_error(kind.0);
    }
    app.metrics.on_http(
        handler,
        method.as_str(),
        resp.status().as_u16(),
        t0.elapsed().as_secs_f64(),
    );
    if !probe {
        let _g = span.enter();
        tracing::info!(
            status = resp.status().as_u16(),
            latency_ms = t0.elapsed().as_secs_f64() * 1e3,
            "response"
        );
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    // While draining, every answer closes its connection: a client must not
    // reuse a kept-alive connection the drain is about to close under it.
    if app.draining.load(Ordering::SeqCst) {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            HeaderValue::from_static("close"),
        );
    }
    resp
}

/// The authenticated tenant (index into the tenant list).
#[derive(Clone, Copy, Debug)]
pub struct Tenant(pub usize);

/// Set by the Batch API's runner on its in-process requests: they run as the
/// batch's tenant, which authenticated when it created the batch. Request
/// extensions never come from the network, so no client can set it.
#[derive(Clone, Copy, Debug)]
pub struct BatchCaller {
    /// The batch's tenant.
    pub tenant: usize,
}

impl FromRequestParts<App> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, ApiError> {
        if let Some(c) = parts.extensions.get::<BatchCaller>() {
            let name = app
                .tenants
                .get(c.tenant)
                .map_or("unknown", |t| t.name.as_str());
            tracing::Span::current().record("tenant", name);
            return Ok(Tenant(c.tenant));
        }
        let auth = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match app.keys.authenticate(auth) {
            Ok(k) => {
                let name = app.tenants.get(k).map_or("unknown", |t| t.name.as_str());
                tracing::Span::current().record("tenant", name);
                Ok(Tenant(k))
            }
            Err(super::auth::AuthFailure::Missing) => Err(ApiError::Unauthorized(
                "Missing API key: send `Authorization: Bearer <key>`".into(),
            )),
            Err(super::auth::AuthFailure::Unknown) => {
                Err(ApiError::Unauthorized("Incorrect API key provided".into()))
            }
        }
    }
}

/// A JSON body of at most `server.max_body_bytes`, parsed with field-naming errors.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: api::ApiRequest> FromRequest<App> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &App) -> Result<Self, ApiError> {
        let limit = app.cfg.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::TooLarge { limit });
        }
        let bytes = match axum::body::to_bytes(req.into_body(), limit).await {
            Ok(b) => b,
            Err(e) => {
                let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                while let Some(s) = src {
                    if s.is::<http_body_util::LengthLimitError>() {
                        return Err(ApiError::TooLarge { limit });
                    }
                    src = s.source();
                }
                return Err(ApiError::invalid(
                    "body",
                    format!("reading the body failed: {e}"),
                ));
            }
        };
        Ok(Body(T::parse(&bytes)?))
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_string())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

/// Liveness: 503 once an engine actor died for good (so the orchestrator restarts the pod).
async fn health(State(app): State<App>) -> Result<Json<StatusResponse>, ApiError> {
    app.engine
        .health()
        .map_err(|why| ApiError::Unavailable(format!("the engine has stopped: {why}")))?;
    Ok(Json(StatusResponse {
        status: "ok",
        model: None,
    }))
}

/// Readiness: 503 while draining or once the engine is dead.
async fn ready(State(app): State<App>) -> Result<Json<StatusResponse>, ApiError> {
    app.engine
        .health()
        .map_err(|why| ApiError::Unavailable(format!("the engine has stopped: {why}")))?;
    if app.draining.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable(
            "draining: the server is shutting down".into(),
        ));
    }
    Ok(Json(StatusResponse {
        status: "ready",
        model: Some(app.model_name.clone()),
    }))
}

async fn metrics(State(app): State<App>) -> Response {
    app.metrics
        .refresh_engine(&app.engine.stats(), app.admission.queued());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// Refuses a `model` that is none of the served names (aliases included).
pub(crate) fn check_model(app: &App, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !app.served_names.iter().any(|n| n == m) => {
            Err(ApiError::ModelNotFound(m.to_string()))
        }
        _ => Ok(()),
    }
}

fn model_card(app: &App, name: &str) -> ModelCard {
    ModelCard {
        id: name.to_string(),
        object: "model",
        created: app.created,
        owned_by: "brigade",
        root: app.model_name.clone(),
        max_model_len: app.max_len,
    }
}

async fn models(State(app): State<App>, _t: Tenant) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: app
            .served_names
            .iter()
            .map(|n| model_card(&app, n))
            .collect(),
    })
}

/// `GET /v1/models/{id}`: the card of a served name, or 404 naming it.
async fn model(
    State(app): State<App>,
    _t: Tenant,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    check_model(&app, Some(&id))?;
    Ok(Json(model_card(&app, &id)))
}

/// `GET /version` body (vLLM).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VersionResponse {
    /// The server's version (`CARGO_PKG_VERSION`).
    pub version: &'static str,
}

/// `GET /tokenizer_info` body (vLLM's: the tokenizer's configuration).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenizerInfo {
    /// Always `PreTrainedTokenizerFast` (the class transformers loads GGUF vocabularies as).
    pub tokenizer_class: &'static str,
    /// Longest prompt + completion in tokens.
    pub model_max_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The BOS token's text.
    pub bos_token: Option<String>,
    /// The EOS token's text.
    pub eos_token: Option<String>,
    /// Whether prompts get a BOS.
    pub add_bos_token: bool,
    /// Whether prompts get an EOS.
    pub add_eos_token: bool,
    /// The chat template's Jinja source.
    pub chat_template: Option<String>,
}

/// `GET /version` (vLLM): the server's version.
async fn version(_t: Tenant) -> Json<VersionResponse> {
    Json(VersionResponse {
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// `GET /tokenizer_info` (vLLM): what a client needs to tokenize as the server does.
async fn tokenizer_info(State(app): State<App>, _t: Tenant) -> Json<TokenizerInfo> {
    let tok = app.engine.tokenizer();
    let name = |id: Option<u32>| id.and_then(|i| tok.token_str(i)).map(str::to_string);
    Json(TokenizerInfo {
        tokenizer_class: "PreTrainedTokenizerFast",
        model_max_length: app.max_len,
        vocab_size: tok.vocab_size(),
        bos_token: name(tok.bos_id()),
        eos_token: name(tok.eos_id()),
        add_bos_token: tok.add_bos_token(),
        add_eos_token: tok.add_eos_token(),
        chat_template: tok.chat_template().map(|t| t.source().to_string()),
    })
}

/// Runs `f` on the blocking pool (tokenization can take a while on long prompts).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
}

/// Prompt ids of a text prompt, through the engine's one validator.
fn encode_text(app: &App, text: &str, max_tokens: usize) -> Result<Vec<u32>, ApiError> {
    app.engine
        .validator()
        .encode_prompt(&crate::engine::Prompt::Text(text.to_string()), max_tokens)
        .map_err(ApiError::from)
}

/// Prompt ids of messages, through the engine's one validator.
fn encode_chat(
    app: &App,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    add_bos: bool,
) -> Result<Vec<u32>, ApiError> {
    app.engine
        .validator()
        .encode_chat(messages, add_generation_prompt, add_bos)
        .map_err(ApiError::from)
}

const MAX_PROMPTS: usize = 64;

async fn completions(
    State(app): State<App>,
    tenant: Tenant,
    Body(req): Body<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    check_model(&app, req.common.model.as_deref())?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    let mut params = req.common.sampling()?;
    params.max_tokens = req.max_tokens.unwrap_or(16);
    let echo = req.echo.unwrap_or(false);
    if let Some(k) = req.logprobs {
        if k > 20 {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be in [0, 20], got {k}"),
            ));
        }
        params.logprobs = Some(k);
        if echo {
            params.prompt_logprobs = Some(k);
        }
    }
    if params.max_tokens == 0 && !(echo && req.logprobs.is_some()) {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1 (0 only with `echo` and `logprobs`)",
        ));
    }
    app.engine
        .validator()
        .validate_params(&params)
        .map_err(ApiError::from)?; // cheap checks before any encoding
    let n_prompts = match &req.prompt {
        PromptInput::Text(_) | PromptInput::Tokens(_) => 1,
        PromptInput::Texts(v) => v.len(),
        PromptInput::TokenLists(v) => v.len(),
    };
    if n_prompts == 0 || n_prompts > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompt",
            format!("between 1 and {MAX_PROMPTS} prompts are accepted, got {n_prompts}"),
        ));
    }
    // Every prompt through the engine's one validator (texts keep their text for `echo`).
    let priority = req.common.priority.unwrap_or(0);
    let app2 = app.clone();
    let p2 = params.clone();
    let prompts: Vec<PromptSpec> = blocking(move || {
        let v = app2.engine.validator();
        let check = |prompt: Prompt, text: Option<String>| -> Result<PromptSpec, ApiError> {
            let valid = v
                .validate(GenerateRequest {
                    prompt,
                    params: p2.clone(),
                    priority,
                })
                .map_err(ApiError::from)?;
            Ok(PromptSpec { valid, text })
        };
        match req.prompt {
            PromptInput::Text(t) => Ok(vec![check(Prompt::Text(t.clone()), Some(t))?]),
            PromptInput::Texts(ts) => ts
                .into_iter()
                .map(|t| check(Prompt::Text(t.clone()), Some(t)))
                .collect(),
            PromptInput::Tokens(ids) => Ok(vec![check(Prompt::Tokens(ids), None)?]),
            PromptInput::TokenLists(l) => l
                .into_iter()
                .map(|ids| check(Prompt::Tokens(ids), None))
                .collect(),
        }
    })
    .await?;
    app.metrics.on_request_params(
        app.admission.tenant_name(tenant.0),
        params.n.max(1),
        params.max_tokens,
    );
    let (streaming, include_usage) = req.common.streaming();
    let kind = Kind::Completion {
        echo,
        logprobs: req.logprobs,
    };
    stream::generate(
        app,
        tenant.0,
        kind,
        prompts,
        params,
        streaming,
        include_usage,
        arrival,
    )
    .await
}

/// `POST /v1/chat/completions` (also the engine path of `/v1/responses`).
pub(crate) async fn chat_completions(
    State(app): State<App>,
    tenant: Tenant,
    Body(req): Body<ChatRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    check_model(&app, req.common.model.as_deref())?;
    let tool_plan = match req.tool_request()? {
        Some(r) => Some(tools::ToolPlan::new(
            r,
            app.engine.tokenizer().chat_template().map(|t| t.source()),
        )?),
        None => None,
    };
    let messages = api::messages(&req.messages)?;
    let mut params = req.common.sampling()?;
    let had_constraint = params.constraint.is_some();
    if let Some(plan) = &tool_plan {
        plan.apply(app.engine.tokenizer(), &mut params)?;
    }
    let has_tool_constraint = !had_constraint && params.constraint.is_some();
    let want_logprobs = req.logprobs.unwrap_or(false);
    if let Some(k) = req.top_logprobs {
        if k > 20 {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be in [0, 20], got {k}"),
            ));
        }
        if !want_logprobs {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs: true`",
            ));
        }
    }
    if want_logprobs {
        params.logprobs = Some(req.top_logprobs.unwrap_or(0));
    }
    let app2 = app.clone();
    let template_tools = tool_plan.as_ref().map(tools::ToolPlan::template_tools);
    let ids = blocking(move || {
        app2.engine
            .validator()
            .encode_chat_with_tools(&messages, template_tools.as_deref(), true, true)
            .map_err(ApiError::from)
    })
    .await?;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the prompt must contain at least one token",
        ));
    }
    let requested = req.max_completion_tokens.or(req.max_tokens);
    let param = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    params.max_tokens = match requested {
        Some(m) => m,
        None => {
            if ids.len() >= app.max_len {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "the prompt has {} tokens; this model's maximum context length is {}",
                        ids.len(),
                        app.max_len
                    ),
                ));
            }
            app.max_len - ids.len()
        }
    };
    if params.max_tokens == 0 {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be at least 1"),
        ));
    }
    let priority = req.common.priority.unwrap_or(0);
    let greq = GenerateRequest {
        prompt: Prompt::Tokens(ids),
        params: params.clone(),
        priority,
    };
    let valid = app.engine.validator().validate(greq).map_err(|e| match e {
        crate::engine::EngineError::Invalid {
            param: Some(p),
            message,
        } if p == "max_tokens" => ApiError::invalid(param, message),
        // The tools' grammar (their parameters schemas) did not compile.
        crate::engine::EngineError::Invalid {
            param: Some(p),
            message,
        } if p == "constraint" && has_tool_constraint => ApiError::invalid("tools", message),
        e => ApiError::from(e),
    })?;
    app.metrics.on_request_params(
        app.admission.tenant_name(tenant.0),
        params.n.max(1),
        params.max_tokens,
    );
    let (streaming, include_usage) = req.common.streaming();
    let kind = Kind::Chat {
        logprobs: want_logprobs,
    };
    let prompts = vec![PromptSpec { valid, text: None }];
    let parser = tool_plan.as_ref().and_then(tools::ToolPlan::parser);
    stream::generate_with_tools(
        app,
        tenant.0,
        kind,
        prompts,
        params,
        streaming,
        include_usage,
        arrival,
        parser,
    )
    .await
}

async fn tokenize(
    State(app): State<App>,
    _t: Tenant,
    Body(req): Body<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    check_model(&app, req.model.as_deref())?;
    let tok = app.engine.tokenizer().clone();
    let want_strs = req.return_token_strs.unwrap_or(false);
    let app2 = app.clone();
    let (ids, strs) = blocking(move || {
        let app = app2;
        let ids = match (&req.prompt, &req.messages) {
            (Some(p), None) => {
                if req.add_special_tokens.unwrap_or(true) {
                    encode_text(&app, p, 0)?
                } else {
                    tok.encode(p, true)
                        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?
                }
            }
            (None, Some(m)) => {
                let msgs = api::messages(m)?;
                encode_chat(
                    &app,
                    &msgs,
                    req.add_generation_prompt.unwrap_or(true),
                    req.add_special_tokens.unwrap_or(false),
                )?
            }
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "exactly one of `prompt` or `messages` is required",
                ))
            }
        };
        let strs: Option<Vec<String>> = want_strs.then(|| {
            ids.iter()
                .map(|&i| tok.token_str(i).unwrap_or("").to_string())
                .collect()
        });
        Ok((ids, strs))
    })
    .await?;
    Ok(Json(TokenizeResponse {
        count: ids.len(),
        max_model_len: app.max_len,
        tokens: ids,
        token_strs: strs,
    }))
}

async fn detokenize(
    State(app): State<App>,
    _t: Tenant,
    Body(req): Body<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    check_model(&app, req.model.as_deref())?;
    let vocab = app.engine.tokenizer().vocab_size();
    if let Some(&t) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {t} is out of range (vocabulary size {vocab})"),
        ));
    }
    let text = app
        .engine
        .tokenizer()
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(DetokenizeResponse { prompt: text }))
}

#[cfg(test)]
mod tests {
    use super::route_label;

    #[test]
    fn route_labels_are_templates() {
        assert_eq!(route_label("/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(route_label("/v1/responses/resp_1"), "/v1/responses/{id}");
        assert_eq!(
            route_label("/v1/responses/resp_1/input_items"),
            "/v1/responses/{id}/input_items"
        );
        assert_eq!(route_label("/v1/models/a"), "/v1/models/{id}");
        assert_eq!(
            route_label("/v1/files/file-1/content"),
            "/v1/files/{id}/content"
        );
        assert_eq!(
            route_label("/v1/batches/batch_1/cancel"),
            "/v1/batches/{id}/cancel"
        );
        assert_eq!(route_label("/v1/batches"), "/v1/batches");
        for other in [
            "/v1/models/a/b",
            "/v1/responses/",
            "/x",
            "/v1/chat/completions/",
        ] {
            assert_eq!(route_label(other), "none", "{other}");
        }
    }
}
