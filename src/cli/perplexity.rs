//! `brigade perplexity`: perplexity of a text file through the single-sequence runner.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

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
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
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
    let mut runner = Runner::new(model.clone(), ctx, a.m.threads.unwrap_or_else(super::default_threads))?;
    let r = perplexity(&mut runner, &ids, ctx, bos)?;
    if a.json {
        println!("{}", serde_json::json!({"perplexity": r.perplexity, "tokens": r.tokens, "nll": r.nll, "bos_per_window": bos.is_some()}));
    } else {
        let scheme = if bos.is_some() { ", a BOS per window" } else { "" };
        println!("perplexity {:.4} over {} tokens (ctx {ctx}{scheme})", r.perplexity, r.tokens);
    }
    Ok(())
}
