//! The OpenAI-compatible HTTP server (`brigade serve`): axum on tokio in front
//! of the engine, with multi-tenant fair admission, Prometheus metrics,
//! request tracing and graceful shutdown.
//!
//! ```text
//!  client ─TCP─► edge: connection cap, header-read / keep-alive timeouts, hyper HTTP/1.1
//!     ─► [request_context: Host, URI length, /metrics key, id, span, drain gate]
//!     ─► [require_json: POST Content-Type] ─► auth (tenant) ─► body (≤ max_body_bytes)
//!     ─► routes: validate + tokenize (blocking pool) ─► admission actor (VTC fair queue, per-tenant bounds)
//!     ─► EngineHandle::submit ─► ResponseStream ─► stream.rs: JSON or SSE (`data: {…}` … `data: [DONE]`)
//! ```
//!
//! Modules: [`config`] (the `[server]` section), [`auth`] (key hashes, tenant
//! lookup), [`cors`] (allowed origins, preflight), [`openai_responses`] (the
//! Responses API, translated onto the chat path, and its store), [`openai_batches`]
//! (the Batch API: `/v1/files`, `/v1/batches`; state and runner in
//! [`crate::batch`]), `edge` (accept loop, connections, checks before routing), [`fair`] (pure Virtual Token Counter queue), [`admission`] (the
//! actor around it), [`api`] (request DTOs and the accepted-field lists),
//! [`responses`] (response DTOs), [`routes`] (handlers), [`stream`]
//! (event → response assembly), [`tools`] (tool calling: checks, grammar,
//! output parsing), [`error`] (the one status table). Metrics
//! live in [`crate::metrics`]; the HTTP serving benchmark in
//! [`crate::bench::http`]; `brigade serve` itself in the binary.
//!
//! Owns: HTTP, tenants, admission order. Does not own: tokenization rules,
//! sampling, batching (the engine's).

pub mod admission;
pub mod api;
pub mod auth;
pub mod config;
pub mod cors;
pub(crate) mod edge;
pub mod error;
pub mod fair;
pub mod openai_batches;
pub mod openai_responses;
pub mod responses;
pub mod routes;
pub mod stream;
pub mod tools;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use auth::hash_key;
pub use config::{ServerConfig, TenantConfig};

use crate::engine::EngineHandle;
use crate::metrics::Metrics;

/// Errors serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Listener or connection I/O.
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Building the metrics registry.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// An engine actor died for good; the server drained and stopped.
    #[error("the engine died: {0}")]
    EngineDead(String),
    /// The Batch API's data directory could not be opened.
    #[error("the Batch API data directory (server.batch_data_dir / --data-dir): {0}")]
    BatchStore(#[from] crate::batch::store::StoreError),
}

/// Shared state of all handlers.
pub struct AppState {
    /// The engine.
    pub engine: EngineHandle,
    /// `[server]` settings in force.
    pub cfg: ServerConfig,
    /// Primary name served in `/v1/models` (the first of `served_names`).
    pub model_name: String,
    /// Every served name (aliases): listed in `/v1/models`, accepted in `model`.
    pub served_names: Vec<String>,
    /// Stored `/v1/responses` responses.
    pub responses: openai_responses::ResponseStore,
    /// The Batch API's store and runner state (`None`: no `server.batch_data_dir`, the API is off).
    pub batches: Option<Arc<crate::batch::runner::BatchApi>>,
    /// CORS policy (`server.allowed_origins`).
    pub cors: cors::Cors,
    /// Longest prompt + completion in tokens.
    pub max_len: usize,
    /// API key → tenant.
    pub keys: auth::KeyDirectory,
    /// Tenant names by index.
    pub tenants: Vec<TenantConfig>,
    /// The admission actor.
    pub admission: admission::AdmissionHandle,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM/SIGINT: readiness and new requests get 503.
    pub draining: AtomicBool,
    /// Unix time the server started (`created` of `/v1/models`).
    pub created: u64,
    /// Host, URI-length and `/metrics` checks run before routing.
    pub(crate) checks: edge::RequestChecks,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("model_name", &self.model_name)
            .finish_non_exhaustive()
    }
}

/// Handlers' view of the state.
pub type App = Arc<AppState>;

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The handlers' state for `cfg` over `engine`: served names (default: the
/// model's name without spaces), metrics, the admission actor, keys and
/// request checks. Shared by [`serve_with`] and `brigade run-batch` (which
/// drives the same router in-process).
pub(crate) fn build_app(
    engine: &EngineHandle,
    cfg: ServerConfig,
    loopback: bool,
) -> Result<App, ServeError> {
    let model = engine.model().clone();
    let served_names = if cfg.served_model_name.is_empty() {
        // No spaces: clients put the name in URLs (`/v1/models/{id}`).
        vec![model
            .config
            .name
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("-")]
    } else {
        cfg.served_model_name.clone()
    };
    let model_name = served_names.first().cloned().unwrap_or_default();
    let econf = engine.config().clone();
    let max_len = engine.info().max_len;
    let metrics = Arc::new(Metrics::with_prefix(&model_name, &cfg.metrics_prefix)?);
    let num_blocks = econf.kv_blocks(model.config.n_layers, model.config.kv_dim);
    metrics.set_cache_config(&crate::metrics::CacheConfigInfo {
        block_size: econf.kv_cache.block_size,
        dtype: format!("{:?}", econf.kv_cache.dtype).to_ascii_lowercase(),
        prefix_caching: econf.kv_cache.prefix_caching,
        num_blocks,
        num_tokens: num_blocks * econf.kv_cache.block_size,
    });
    let tenants = cfg.effective_tenants();
    let max_running = if cfg.max_running == 0 {
        econf.runtime.max_seqs
    } else {
        cfg.max_running
    };
    let admission = admission::AdmissionHandle::spawn(
        admission::AdmissionConfig {
            tenants: tenants.clone(),
            max_running,
            inbox: cfg.admission_inbox,
            input_weight: cfg.vtc_input_weight,
            output_weight: cfg.vtc_output_weight,
            retry_after_s: cfg.retry_after_s,
            background_every: cfg.batch_background_every,
        },
        engine.clone(),
        metrics.clone(),
    );
    let batches = match &cfg.batch_data_dir {
        Some(dir) => Some(Arc::new(crate::batch::runner::BatchApi::open(dir)?)),
        None => None,
    };
    Ok(Arc::new(AppState {
        batches,
        keys: auth::KeyDirectory::new(
            tenants.iter().map(|t| t.api_keys.as_slice()),
            cfg.tenants.is_empty(),
        ),
        tenants,
        engine: engine.clone(),
        model_name,
        served_names,
        responses: openai_responses::ResponseStore::new(cfg.responses_store_max),
        cors: cors::Cors::new(&cfg.allowed_origins),
        max_len,
        admission,
        metrics,
        draining: AtomicBool::new(false),
        created: unix_now(),
        checks: edge::RequestChecks::new(&cfg, loopback),
        cfg,
    }))
}

/// Serves the API on `listener` until `shutdown` resolves, then drains: readiness and
/// new requests get 503, idle connections close, queued and running requests
/// finish for up to `server.shutdown_timeout_s`, the rest are aborted
/// (`finish_reason: "abort"`), and the function returns once every connection
/// is closed (those still open [`CONNECTION_CLOSE_GRACE`] later are dropped).
pub async fn serve_with(
    engine: EngineHandle,
    cfg: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let loopback = listener.local_addr()?.ip().is_loopback();
    let app = build_app(&engine, cfg.clone(), loopback)?;
    let admission = app.admission.clone();
    let edge = edge::Edge::spawn(
        listener,
        routes::router(app.clone()),
        &cfg,
        app.metrics.clone(),
    );
    // The Batch API's runner (when on): resumes the batches a previous run left.
    let _batch_runner = crate::batch::runner::spawn(app.clone());
    // Until asked to stop, or until the engine dies (then /health is already
    // 503, every open request has its error, and serving ends non-zero).
    let died = tokio::select! {
        _ = shutdown => false,
        _ = engine.dead() => true,
    };
    if died {
        // Every open request already has its error. Keep answering (503 for
        // /health, /ready and every request) for the drain timeout, so probes
        // and clients see why, then stop non-zero.
        tracing::error!(
            reason = engine.health().err().unwrap_or_default(),
            timeout_s = cfg.shutdown_timeout_s,
            "the engine died: answering 503 until the drain timeout, then exiting"
        );
        tokio::time::sleep(Duration::from_secs_f64(cfg.shutdown_timeout_s)).await;
    }

    // Drain: refuse new work, let admitted and queued work finish up to the timeout.
    // Idle connections close now; busy ones after their response.
    tracing::info!(
        timeout_s = cfg.shutdown_timeout_s,
        "shutdown requested: draining"
    );
    app.draining.store(true, Ordering::SeqCst);
    admission.start_draining();
    edge.start_draining();
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.shutdown_timeout_s);
    while (admission.queued() > 0 || admission.in_flight() > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if admission.queued() > 0 || admission.in_flight() > 0 {
        tracing::warn!(
            queued = admission.queued(),
            in_flight = admission.in_flight(),
            "shutdown timeout: aborting the rest"
        );
        admission.fail_queued().await;
        engine.abort_all();
        let grace = Instant::now() + Duration::from_secs(10);
        while admission.in_flight() > 0 && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    engine.drain();
    // Every request has ended: what is left is a response being written, or a
    // client that is slow to send its head or to read.
    edge.close(CONNECTION_CLOSE_GRACE).await;
    if let Err(reason) = engine.health() {
        return Err(ServeError::EngineDead(reason));
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// How long connections may take to close once every request has ended.
const CONNECTION_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
