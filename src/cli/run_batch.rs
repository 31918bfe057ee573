//! `brigade run-batch`: an OpenAI batch file in, a results file out
//! (like `vllm run-batch`), resumable; the work is [`brigade::batch`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use brigade::batch::{self, BatchOptions, Shard};
use brigade::engine::Engine;

/// `brigade run-batch` flags.
#[derive(Args, Debug, Clone)]
pub(crate) struct RunBatchArgs {
    /// Input file: JSONL, one `{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
    /// "/v1/completions", "body": {…}}` per line.
    #[arg(short = 'i', long = "input-file")]
    input: PathBuf,
    /// Results file (JSONL, appended to). Rerunning the same command after a crash completes it:
    /// `custom_id`s already there are skipped, a torn last line is redone.
    #[arg(short = 'o', long = "output-file")]
    output: PathBuf,
    /// Run only shard I of N: the lines whose 0-based line index % N == I. The N shards'
    /// results files, concatenated, are the whole batch's.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// Configuration file (TOML): `[runtime]` and `[server]` (limits, served model name) apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model file (GGUF) or known model name (smollm2-135m, gemma3-270m).
    #[arg(long)]
    model: Option<PathBuf>,
    /// No progress bar or progress lines (the summary is still printed).
    #[arg(long)]
    no_progress: bool,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, default_value_t = 10.0)]
    progress_interval_s: f64,
}

/// Runs the batch and prints its summary on stderr; fails only when the files or the engine do.
pub(crate) fn run(a: RunBatchArgs) -> Result<()> {
    let mut cfg = super::load_config(a.config.as_deref())?;
    let path = brigade::paths::resolve_model(a.model.as_deref(), cfg.model.path.as_deref())?;
    // Served names and chat template as `brigade serve` sets them, so the bodies are the server's.
    if cfg.server.served_model_name.is_empty() {
        cfg.server.served_model_name = super::serve::stem_name(&path).into_iter().collect();
    }
    let (model, tok) = super::serve::load_model(&path, cfg.model.chat_template.as_deref())?;
    let server = cfg.server.clone();
    let engine = Engine::start(model, tok, cfg)?;
    let opts = BatchOptions {
        input: a.input,
        output: a.output,
        shard: a.shard,
        progress: !a.no_progress,
        progress_interval: Duration::try_from_secs_f64(a.progress_interval_s)
            .unwrap_or(Duration::from_secs(10)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("batch")
        .build()?;
    let summary = rt.block_on(async { batch::run(&engine, &server, &opts).await })?;
    engine.drain();
    rt.shutdown_timeout(Duration::from_secs(1));
    eprintln!("{summary}");
    Ok(())
}
