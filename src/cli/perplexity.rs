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
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    m: ModelArgs,
}

/// Scores the file in windows of `--ctx` tokens and prints the perplexity.
pub(crate) fn run(a: PerplexityArgs) -> Result<()> {
    let ctx = a.ctx;
    if ctx < 2 {
        bail!("--ctx must be at least 2, got {ctx}");
    }
    let (model, tok) = super::load(&a.m)?;
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let ids = tok.encode(&text, false)?;
    let mut runner = Runner::new(model.clone(), ctx, a.m.threads.unwrap_or_else(super::default_threads))?;
    let r = perplexity(&mut runner, &ids, ctx)?;
    if a.json {
        println!("{}", serde_json::json!({"perplexity": r.perplexity, "tokens": r.tokens, "nll": r.nll}));
    } else {
        println!("perplexity {:.4} over {} tokens (ctx {ctx})", r.perplexity, r.tokens);
    }
    Ok(())
}
