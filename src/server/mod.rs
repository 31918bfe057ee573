//! The OpenAI-compatible HTTP server (in progress).

use std::path::PathBuf;

/// `brigade serve` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model file (GGUF).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// Runs the server until shutdown.
pub fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("`brigade serve` is not built yet")
}
