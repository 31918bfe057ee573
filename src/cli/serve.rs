//! `brigade serve`: the OpenAI-compatible server until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use brigade::engine::Engine;
use brigade::server::{serve_with, shutdown_signal};

/// `brigade serve` arguments. Flags override the config file.
#[derive(Args, Debug, Clone)]
pub(crate) struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model file (GGUF) or known model name (smollm2-135m, gemma3-270m).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Listen address (default 127.0.0.1, or `server.host`).
    #[arg(long)]
    host: Option<String>,
    /// Listen port (default 8000, or `server.port`; 0 = any free port).
    #[arg(long)]
    port: Option<u16>,
    /// Jinja chat template file to use instead of the model's (`model.chat_template`).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Model name served in `/v1/models` and required in `model` fields.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Log format: `pretty` (human-readable) or `json`. `RUST_LOG` sets the filter.
    #[arg(long, default_value = "pretty", value_parser = ["pretty", "json"])]
    log_format: String,
}

/// Installs the global tracing subscriber (`json` or `pretty`), filtered by `RUST_LOG` (default `info`).
fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // try_init: a subscriber may already be set (tests); keep it.
    let _ = if format == "json" { builder.json().with_current_span(true).try_init() } else { builder.try_init() };
}

/// Runs `brigade serve` until SIGTERM/SIGINT; returns after a graceful drain.
pub(crate) fn run(args: ServeArgs) -> Result<()> {
    init_logging(&args.log_format);
    let cfg = super::load_config(args.config.as_deref())?;
    let mut scfg = cfg.server.clone();
    if let Some(h) = args.host {
        scfg.host = h;
    }
    if let Some(p) = args.port {
        scfg.port = p;
    }
    if let Some(n) = args.served_model_name {
        scfg.served_model_name = n;
    }
    let path = brigade::paths::resolve_model(args.model.as_deref(), cfg.model.path.as_deref())?;
    // The template file is read before the model loads, so a wrong path fails at once.
    let template_file = args.chat_template.as_deref().or(cfg.model.chat_template.as_deref());
    let template = match template_file {
        Some(file) => Some((file, std::fs::read_to_string(file).with_context(|| format!("reading the chat template {}", file.display()))?)),
        None => None,
    };
    let (model, mut tok) = brigade::model::load_with_tokenizer(&path)?;
    if let Some((file, source)) = template {
        tok = std::sync::Arc::new(tok.with_chat_template(&source).with_context(|| format!("the chat template {} is not a valid template", file.display()))?);
        tracing::info!(template = %file.display(), "chat template overridden");
    }
    let engine = Engine::start(model, tok, cfg)?;
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
