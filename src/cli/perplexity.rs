//! `brigade perplexity`: perplexity of a text file through the single-sequence runner.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use brigade::model::kv::KvDType;
use brigade::runner::{perplexity, Runner};

use super::ModelArgs;

#[derive(Args, Debug)]
pub(crate) struct PerplexityArgs {
    /// Text file.
    #[arg(long)]
    file: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate each window as a BOS followed by `--ctx` - 1 text tokens, all
    /// of them scored (default when the model's tokenizer adds a BOS, as
    /// Gemma's does; such models are only meaningful with one).
    #[arg(long, conflicts_with = "no_bos_per_window")]
    bos_per_window: bool,
    /// Windows of `--ctx` text tokens, no BOS, the first of each unscored
    /// (default when the tokenizer adds no BOS, as SmolLM2's).
    #[arg(long)]
    no_bos_per_window: bool,
    /// Element type of the KV cache: f16, bf16, f32 or q8_0 (default: the
    /// config's `[kv_cache] dtype`).
    #[arg(long, value_parser = parse_kv_dtype)]
    kv_dtype: Option<KvDType>,
    /// Activation digits of the output head: 1 or 2 (default: the config's
    /// `[runtime] head_activation_digits`).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    head_digits: Option<u8>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    m: ModelArgs,
}

/// Scores the file in windows of `--ctx` tokens (with or without a BOS per
/// window, see [`perplexity`]) and prints the perplexity.
pub(crate) fn run(a: PerplexityArgs) -> Result<()> {
    let ctx = a.ctx;
    if ctx < 2 {
        bail!("--ctx must be at least 2, got {ctx}");
    }
    let (model, tok) = super::load(&a.m)?;
    let mut cfg = super::load_config(a.m.config.as_deref())?;
    let dtype = a.kv_dtype.unwrap_or(cfg.kv_cache.dtype);
    if let Some(d) = a.head_digits {
        cfg.runtime.head_activation_digits = d;
    }
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let ids = tok.encode(&text, false)?;
    let with_bos = if a.bos_per_window {
        true
    } else if a.no_bos_per_window {
        false
    } else {
        tok.add_bos_token()
    };
    let bos = match (with_bos, tok.bos_id()) {
        (false, _) => None,
        (true, Some(b)) => Some(b),
        (true, None) => bail!("--bos-per-window: the model's tokenizer has no BOS token (tokenizer.ggml.bos_token_id)"),
    };
    let mut runner = Runner::with_kv_dtype(
        model.clone(),
        ctx,
        a.m.threads.unwrap_or_else(super::default_threads),
        dtype,
    )?
    .with_head_digits(cfg.runtime.head_digits());
    let r = perplexity(&mut runner, &ids, ctx, bos)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"perplexity": r.perplexity, "tokens": r.tokens, "nll": r.nll, "bos_per_window": bos.is_some(), "head_activation_digits": cfg.runtime.head_activation_digits})
        );
    } else {
        let scheme = if bos.is_some() {
            ", a BOS per window"
        } else {
            ""
        };
        println!(
            "perplexity {:.4} over {} tokens (ctx {ctx}{scheme})",
            r.perplexity, r.tokens
        );
    }
    Ok(())
}

/// Parses a `--kv-dtype` value (the `[kv_cache] dtype` names).
fn parse_kv_dtype(s: &str) -> std::result::Result<KvDType, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("unknown KV dtype {s:?} (expected f16, bf16, f32 or q8_0)"))
}
