//! `brigade serve`: the OpenAI-compatible server until SIGTERM/SIGINT.
//!
//! Takes the flags users type for vLLM (`vllm serve MODEL --api-key K
//! --max-model-len N --max-num-seqs N --max-num-batched-tokens N
//! --served-model-name A B --allowed-origins …`) and llama-server (`-m FILE
//! --host H --port P --api-key K`), mapped onto the config file's keys
//! (flags override the file; conflicting inputs fail at start naming both).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use brigade::config::Config;
use brigade::engine::Engine;
use brigade::server::{serve_with, shutdown_signal, TenantConfig};

/// `brigade serve` arguments. Flags override the config file.
#[derive(Args, Debug, Clone)]
pub(crate) struct ServeArgs {
    /// Model file (GGUF) or known model name, as in `vllm serve MODEL`.
    #[arg(value_name = "MODEL")]
    model_pos: Option<PathBuf>,
    /// Configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model file (GGUF) or known model name (smollm2-135m, gemma3-270m); same as MODEL.
    #[arg(short = 'm', long)]
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
    /// Model names served in `/v1/models` and accepted in `model` fields (aliases;
    /// the first is echoed in responses). Default: the model file's stem.
    #[arg(long, num_args = 1.., value_name = "NAME")]
    served_model_name: Option<Vec<String>>,
    /// One API key shared by every client (`Authorization: Bearer KEY`): the
    /// server gets one tenant `default` with this key. Not with configured tenants.
    #[arg(long, env = "BRIGADE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Longest prompt + completion in tokens (`runtime.max_model_len`).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Most sequences in one engine step (`runtime.max_seqs`; also bounds the
    /// sequences admitted at once unless `server.max_running` is set).
    #[arg(long)]
    max_num_seqs: Option<usize>,
    /// Token budget of one engine step (`runtime.max_batched_tokens`).
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    /// Origins allowed by CORS (`server.allowed_origins`): `*`, or origins,
    /// space- or comma-separated, or a JSON list as vLLM takes it (`'["*"]'`).
    #[arg(long, num_args = 1.., value_name = "ORIGIN")]
    allowed_origins: Option<Vec<String>>,
    /// Metric name prefix (`server.metrics_prefix`): `brigade` or `vllm`.
    #[arg(long, value_parser = ["brigade", "vllm"])]
    metrics_prefix: Option<String>,
    /// Directory of the Batch API's state (`server.batch_data_dir`): turns on
    /// `/v1/files` and `/v1/batches`; batches left running there resume.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log format: `pretty` (human-readable) or `json`. `RUST_LOG` sets the filter.
    #[arg(long, default_value = "pretty", value_parser = ["pretty", "json"])]
    log_format: String,
    #[command(flatten)]
    spec: super::SpecArgs,
}

/// Installs the global tracing subscriber (`json` or `pretty`), filtered by `RUST_LOG` (default `info`).
fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a subscriber may already be set (tests); keep it.
    let _ = if format == "json" {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
}

/// `--allowed-origins` values: each a JSON list, or comma-separated origins.
fn origins(values: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for v in values {
        let v = v.trim();
        if v.starts_with('[') {
            let list: Vec<String> = serde_json::from_str(v).with_context(|| {
                format!("--allowed-origins: {v:?} is not a JSON list of strings")
            })?;
            out.extend(list);
        } else {
            out.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            );
        }
    }
    Ok(out)
}

/// The model's default served name: the file's stem, whitespace replaced by `-`.
pub(crate) fn stem_name(path: &std::path::Path) -> Option<String> {
    let stem = path.file_stem()?.to_string_lossy();
    let name = stem.split_whitespace().collect::<Vec<_>>().join("-");
    (!name.is_empty()).then_some(name)
}

/// Applies the flags to `cfg` (which they override), refusing conflicts; returns the model flag.
fn apply_flags(args: &ServeArgs, cfg: &mut Config) -> Result<Option<PathBuf>> {
    let model = match (&args.model_pos, &args.model) {
        (Some(a), Some(b)) if a != b => bail!(
            "the model is given twice: MODEL {} and --model {}; give one",
            a.display(),
            b.display()
        ),
        (a, b) => a.clone().or_else(|| b.clone()),
    };
    let s = &mut cfg.server;
    if let Some(h) = &args.host {
        s.host = h.clone();
    }
    if let Some(p) = args.port {
        s.port = p;
    }
    if let Some(n) = &args.served_model_name {
        s.served_model_name = n.clone();
    }
    if let Some(o) = &args.allowed_origins {
        s.allowed_origins = origins(o)?;
    }
    if let Some(p) = &args.metrics_prefix {
        s.metrics_prefix = p.clone();
    }
    if let Some(d) = &args.data_dir {
        s.batch_data_dir = Some(d.clone());
    }
    if let Some(key) = &args.api_key {
        if key.is_empty() {
            bail!("--api-key is empty");
        }
        if !s.tenants.is_empty() {
            bail!("--api-key sets one shared key, but the config defines [[server.tenants]] with their own keys; use one or the other");
        }
        let mut t = TenantConfig::named("default");
        t.api_keys = vec![brigade::server::auth::KeyHash::of_key(key)];
        t.max_queued = s.default_max_queued;
        s.tenants = vec![t];
    }
    if let Some(n) = args.max_model_len {
        if n == 0 {
            bail!("--max-model-len must be at least 1");
        }
        cfg.runtime.max_model_len = n;
    }
    if let Some(n) = args.max_num_seqs {
        cfg.runtime.max_seqs = n;
    }
    if let Some(n) = args.max_num_batched_tokens {
        cfg.runtime.max_batched_tokens = n;
    }
    args.spec.apply(cfg)?;
    cfg.validate().context("the command-line flags")?;
    Ok(model)
}

/// Loads the model and its tokenizer, with the chat template replaced by
/// `template_file` when given (`--chat-template` / `model.chat_template`). The
/// file is read before the model loads, so a wrong path fails at once.
pub(crate) fn load_model(
    path: &std::path::Path,
    template_file: Option<&std::path::Path>,
) -> Result<(
    std::sync::Arc<brigade::model::Model>,
    std::sync::Arc<brigade::tokenizer::Tokenizer>,
)> {
    let template = match template_file {
        Some(file) => Some((
            file,
            std::fs::read_to_string(file)
                .with_context(|| format!("reading the chat template {}", file.display()))?,
        )),
        None => None,
    };
    let (model, mut tok) = brigade::model::load_with_tokenizer(path)?;
    if let Some((file, source)) = template {
        tok = std::sync::Arc::new(tok.with_chat_template(&source).with_context(|| {
            format!(
                "the chat template {} is not a valid template",
                file.display()
            )
        })?);
        tracing::info!(template = %file.display(), "chat template overridden");
    }
    Ok((model, tok))
}

/// Runs `brigade serve` until SIGTERM/SIGINT; returns after a graceful drain.
pub(crate) fn run(args: ServeArgs) -> Result<()> {
    init_logging(&args.log_format);
    let mut cfg = super::load_config(args.config.as_deref())?;
    let model_flag = apply_flags(&args, &mut cfg)?;
    let path = brigade::paths::resolve_model(model_flag.as_deref(), cfg.model.path.as_deref())?;
    if cfg.server.served_model_name.is_empty() {
        cfg.server.served_model_name = stem_name(&path).into_iter().collect();
    }
    let template_file = args
        .chat_template
        .clone()
        .or(cfg.model.chat_template.clone());
    let (model, tok) = load_model(&path, template_file.as_deref())?;
    let context = model.config.context_length;
    if cfg.runtime.max_model_len > context {
        bail!("--max-model-len (runtime.max_model_len) {} is more than the model's context length {context}", cfg.runtime.max_model_len);
    }
    let scfg = cfg.server.clone();
    let engine = Engine::start(model, tok, cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("http")
        .build()?;
    rt.block_on(async move {
        let addr: SocketAddr = tokio::net::lookup_host((scfg.host.as_str(), scfg.port))
            .await
            .with_context(|| format!("resolving {}:{}", scfg.host, scfg.port))?
            .next()
            .with_context(|| format!("no address for {}", scfg.host))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .unwrap()
            .serve
    }

    #[test]
    fn vllm_and_llama_server_flags_map_onto_the_config() {
        let a = parse(&[
            "m.gguf",
            "--api-key",
            "k",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "1024",
            "--served-model-name",
            "a",
            "b",
            "--allowed-origins",
            "[\"http://x.com\"]",
            "--metrics-prefix",
            "vllm",
        ]);
        let mut cfg = Config::default();
        let model = apply_flags(&a, &mut cfg).unwrap();
        assert_eq!(model, Some(PathBuf::from("m.gguf")));
        assert_eq!(
            (
                cfg.runtime.max_model_len,
                cfg.runtime.max_seqs,
                cfg.runtime.max_batched_tokens
            ),
            (512, 8, 1024)
        );
        assert_eq!(cfg.server.served_model_name, ["a", "b"]);
        assert_eq!(cfg.server.allowed_origins, ["http://x.com"]);
        assert_eq!(cfg.server.metrics_prefix, "vllm");
        assert_eq!(cfg.server.batch_data_dir, None);
        assert_eq!(cfg.server.tenants.len(), 1);
        assert_eq!(
            cfg.server.tenants[0].api_keys,
            [brigade::server::auth::KeyHash::of_key("k")]
        );
        let a = parse(&[
            "-m",
            "x.gguf",
            "--allowed-origins",
            "http://a.com,http://b.com",
            "*",
        ]);
        let mut cfg = Config::default();
        assert_eq!(
            apply_flags(&a, &mut cfg).unwrap(),
            Some(PathBuf::from("x.gguf"))
        );
        assert_eq!(
            cfg.server.allowed_origins,
            ["http://a.com", "http://b.com", "*"]
        );
        let mut cfg = Config::default();
        apply_flags(&parse(&["m.gguf", "--data-dir", "/tmp/b"]), &mut cfg).unwrap();
        assert_eq!(cfg.server.batch_data_dir, Some(PathBuf::from("/tmp/b")));
        // Speculative decoding flags.
        let mut cfg = Config::default();
        apply_flags(&parse(&["m.gguf", "--spec-ngram", "6"]), &mut cfg).unwrap();
        assert_eq!(
            (cfg.speculative.method, cfg.speculative.num_tokens),
            (brigade::config::SpecMethod::Ngram, 6)
        );
        apply_flags(&parse(&["m.gguf", "--no-spec"]), &mut cfg).unwrap();
        assert_eq!(cfg.speculative.method, brigade::config::SpecMethod::Off);
        let e = apply_flags(
            &parse(&["m.gguf", "--spec-ngram", "0"]),
            &mut Config::default(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("speculative.num_tokens"), "{e:#}");
    }

    #[test]
    fn conflicts_and_bad_values_are_refused() {
        let e = apply_flags(
            &parse(&["a.gguf", "--model", "b.gguf"]),
            &mut Config::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
        apply_flags(
            &parse(&["a.gguf", "--model", "a.gguf"]),
            &mut Config::default(),
        )
        .unwrap();
        let mut cfg = Config::parse(
            &format!(
                "[[server.tenants]]\nname = \"t\"\napi_keys = [\"{}\"]\n",
                brigade::server::hash_key("x")
            ),
            "t",
        )
        .unwrap();
        let e = apply_flags(&parse(&["--api-key", "k"]), &mut cfg).unwrap_err();
        assert!(e.to_string().contains("tenants"), "{e}");
        let e = apply_flags(&parse(&["--max-num-seqs", "0"]), &mut Config::default()).unwrap_err();
        assert!(format!("{e:#}").contains("runtime.max_seqs"), "{e:#}");
        let e = apply_flags(
            &parse(&["--served-model-name", "a b"]),
            &mut Config::default(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("served_model_name"), "{e:#}");
        let e = apply_flags(
            &parse(&["--allowed-origins", "not an origin"]),
            &mut Config::default(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("allowed_origins"), "{e:#}");
        assert!(apply_flags(&parse(&["--max-model-len", "0"]), &mut Config::default()).is_err());
    }

    #[test]
    fn default_name_is_the_file_stem() {
        assert_eq!(
            stem_name(std::path::Path::new("/c/SmolLM2-135M-Instruct.Q4_1.gguf")).as_deref(),
            Some("SmolLM2-135M-Instruct.Q4_1")
        );
        assert_eq!(
            stem_name(std::path::Path::new("/c/my model v2.gguf")).as_deref(),
            Some("my-model-v2")
        );
    }
}
