//! The OpenAI-compatible HTTP server (`brigade serve`): axum on tokio in front
//! of the engine, with multi-tenant fair admission, Prometheus metrics,
//! request tracing and graceful shutdown.
//!
//! ```text
//!  client ─HTTP─► [request_context: id, span, drain gate] ─► auth (tenant) ─► body (≤ max_body_bytes)
//!     ─► routes: validate + tokenize (blocking pool) ─► admission actor (VTC fair queue, per-tenant bounds)
//!     ─► EngineHandle::submit ─► ResponseStream ─► stream.rs: JSON or SSE (`data: {…}` … `data: [DONE]`)
//! ```
//!
//! Modules: [`config`] (the `[server]` section), [`auth`] (key hashing, tenant
//! lookup), [`fair`] (pure Virtual Token Counter queue), [`admission`] (the
//! actor around it), [`api`] (request DTOs and the accepted-field lists),
//! [`responses`] (response DTOs), [`routes`] (handlers), [`stream`]
//! (event → response assembly), [`error`] (the one status table), [`bench`]
//! (the HTTP serving benchmark). Metrics live in [`crate::metrics`].
//!
//! Owns: HTTP, tenants, admission order. Does not own: tokenization rules,
//! sampling, batching (the engine's).

pub mod admission;
pub mod api;
pub mod auth;
pub mod bench;
pub mod config;
pub mod error;
pub mod fair;
pub mod responses;
pub mod routes;
pub mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

pub use auth::{hash_key, hash_key_main, HashKeyArgs};
pub use bench::{run_http_bench, HttpBenchArgs};
pub use config::{ServerConfig, TenantConfig};

use crate::engine::EngineHandle;
use crate::metrics::Metrics;

/// `brigade serve` arguments. Flags override the config file.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model file (GGUF).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Listen address (default 127.0.0.1, or `server.host`).
    #[arg(long)]
    pub host: Option<String>,
    /// Listen port (default 8000, or `server.port`; 0 = any free port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Model name served in `/v1/models` and required in `model` fields.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Log format: `pretty` (human-readable) or `json`. `RUST_LOG` sets the filter.
    #[arg(long, default_value = "pretty", value_parser = ["pretty", "json"])]
    pub log_format: String,
}

/// Errors serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Listener or connection I/O.
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Building the metrics registry.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Shared state of all handlers.
pub struct AppState {
    /// The engine.
    pub engine: EngineHandle,
    /// `[server]` settings in force.
    pub cfg: ServerConfig,
    /// Name served in `/v1/models`.
    pub model_name: String,
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
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("model_name", &self.model_name).finish_non_exhaustive()
    }
}

/// Handlers' view of the state.
pub type App = Arc<AppState>;

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Serves the API on `listener` until `shutdown` resolves, then drains: readiness and
/// new requests get 503, queued and running requests finish for up to
/// `server.shutdown_timeout_s`, the rest are aborted (`finish_reason: "abort"`),
/// and the function returns once every connection is closed.
pub async fn serve_with(
    engine: EngineHandle,
    cfg: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let model = engine.model().clone();
    let model_name = if cfg.served_model_name.is_empty() { model.config.name.clone() } else { cfg.served_model_name.clone() };
    let econf = engine.config().clone();
    let kv_tokens = econf.kv_blocks(model.config.n_layers, model.config.kv_dim) * econf.kv_cache.block_size;
    let max_len = model.config.context_length.min(kv_tokens);
    let metrics = Arc::new(Metrics::new(&model_name)?);
    let tenants = cfg.effective_tenants();
    let max_running = if cfg.max_running == 0 { econf.runtime.max_seqs } else { cfg.max_running };
    let admission = admission::AdmissionHandle::spawn(
        admission::AdmissionConfig {
            tenants: tenants.clone(),
            max_running,
            inbox: cfg.admission_inbox,
            input_weight: cfg.vtc_input_weight,
            output_weight: cfg.vtc_output_weight,
            retry_after_s: cfg.retry_after_s,
        },
        engine.clone(),
        metrics.clone(),
    );
    let app: App = Arc::new(AppState {
        keys: auth::KeyDirectory::new(&tenants, cfg.tenants.is_empty()),
        tenants,
        engine: engine.clone(),
        model_name,
        max_len,
        admission: admission.clone(),
        metrics,
        draining: AtomicBool::new(false),
        created: unix_now(),
        cfg: cfg.clone(),
    });
    let router = routes::router(app.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = stop_rx.await; // sender dropped = stop too
    });
    let mut server_task = tokio::spawn(async move { server.await });

    tokio::select! {
        _ = shutdown => {}
        r = &mut server_task => {
            // The server ended on its own (listener error).
            return match r {
                Ok(r) => r.map_err(ServeError::Io),
                Err(e) => Err(ServeError::Io(std::io::Error::other(e.to_string()))),
            };
        }
    }

    // Drain: refuse new work, let admitted and queued work finish up to the timeout.
    tracing::info!(timeout_s = cfg.shutdown_timeout_s, "shutdown requested: draining");
    app.draining.store(true, Ordering::SeqCst);
    admission.start_draining();
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.shutdown_timeout_s);
    while (admission.queued() > 0 || admission.in_flight() > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if admission.queued() > 0 || admission.in_flight() > 0 {
        tracing::warn!(queued = admission.queued(), in_flight = admission.in_flight(), "shutdown timeout: aborting the rest");
        admission.fail_queued().await;
        engine.abort_all();
        let grace = Instant::now() + Duration::from_secs(10);
        while admission.in_flight() > 0 && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    engine.drain();
    let _ = stop_tx.send(()); // server task may have ended
    match tokio::time::timeout(Duration::from_secs(10), &mut server_task).await {
        Ok(Ok(r)) => r.map_err(ServeError::Io)?,
        Ok(Err(e)) => return Err(ServeError::Io(std::io::Error::other(e.to_string()))),
        Err(_) => {
            tracing::warn!("connections still open 10 s after draining; closing them");
            server_task.abort();
        }
    }
    tracing::info!("shutdown complete");
    Ok(())
}

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

/// Installs the global tracing subscriber (`json` or `pretty`), filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // try_init: a subscriber may already be set (tests); keep it.
    let _ = if format == "json" { builder.json().with_current_span(true).try_init() } else { builder.try_init() };
}

/// Runs `brigade serve` until SIGTERM/SIGINT; returns after a graceful drain.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let cfg = match &args.config {
        Some(p) => crate::config::Config::load(p)?,
        None => crate::config::Config::default(),
    };
    let mut scfg = ServerConfig::from_table(cfg.server.as_ref())?;
    if let Some(h) = args.host {
        scfg.host = h;
    }
    if let Some(p) = args.port {
        scfg.port = p;
    }
    if let Some(n) = args.served_model_name {
        scfg.served_model_name = n;
    }
    let path = crate::paths::resolve_model(args.model.as_deref(), cfg.model.path.as_deref())?;
    let (model, tok) = crate::model::load_with_tokenizer(&path)?;
    let engine = crate::engine::Engine::start(model, tok, cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("http").build()?;
    rt.block_on(async move {
        let addr: SocketAddr = tokio::net::lookup_host((scfg.host.as_str(), scfg.port))
            .await
            .with_context(|| format!("resolving {}:{}", scfg.host, scfg.port))?
            .next()
            .with_context(|| format!("no address for {}", scfg.host))?;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(address = %local, model = %path.display(), "listening");
        // Machine-readable line for scripts that start the server on port 0.
        eprintln!("brigade: listening on http://{local}");
        serve_with(engine, scfg, listener, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
