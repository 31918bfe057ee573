//! The `brigade` command line: argument parsing (clap) and one-line error
//! reports (anyhow) around the library. Binary side only: the library takes
//! plain option structs and returns typed errors.
//!
//! One file per command; this file owns the command table and the model and
//! config flags they share.

mod bench;
mod generate;
mod hash_key;
mod inspect;
mod perplexity;
mod run_batch;
mod serve;
mod tokenize;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use brigade::config::Config;
use brigade::model::Model;
use brigade::paths;
use brigade::tokenizer::Tokenizer;

#[derive(Parser, Debug)]
#[command(
    name = "brigade",
    version,
    about = "Throughput-oriented LLM inference on CPUs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The model and config flags of the commands that load a model.
#[derive(Args, Debug, Clone)]
pub(crate) struct ModelArgs {
    /// Model file (GGUF) or known model name (smollm2-135m, gemma3-270m: fetched by
    /// `bash scripts/fetch-model.sh NAME`). Default: $BRIGADE_MODEL, then the config, then the
    /// cached default model.
    #[arg(long, global = true)]
    pub(crate) model: Option<PathBuf>,
    /// Threads for compute.
    #[arg(long, global = true)]
    pub(crate) threads: Option<usize>,
    /// Configuration file (TOML); command-line flags override it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
}

/// The speculative-decoding flags of the commands that start an engine
/// (override `[speculative]`).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct SpecArgs {
    /// N-gram (prompt-lookup) speculative decoding with this many draft tokens per step (1..=16).
    #[arg(long, value_name = "K", conflicts_with = "no_spec")]
    pub(crate) spec_ngram: Option<usize>,
    /// No speculative decoding.
    #[arg(long)]
    pub(crate) no_spec: bool,
}

impl SpecArgs {
    /// Applies the flags to `cfg` and checks the section.
    pub(crate) fn apply(&self, cfg: &mut Config) -> Result<()> {
        if let Some(k) = self.spec_ngram {
            cfg.speculative.method = brigade::config::SpecMethod::Ngram;
            cfg.speculative.num_tokens = k;
        }
        if self.no_spec {
            cfg.speculative.method = brigade::config::SpecMethod::Off;
        }
        cfg.speculative
            .validate()
            .map_err(|e| anyhow::anyhow!("--spec-ngram: {e}"))?;
        Ok(())
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Print the token ids of TEXT: BOS/EOS added as the vocabulary says (--no-bos: none),
    /// control-token text parsed as control tokens (--no-parse-special: plain text).
    Tokenize(tokenize::TokenizeArgs),
    /// Perplexity of a text file, scored in windows of --ctx tokens.
    Perplexity(perplexity::PerplexityArgs),
    /// Offline throughput benchmark through the full runtime.
    Bench(bench::BenchArgs),
    /// Serving benchmark: drive a running `brigade serve` over HTTP (like `vllm bench serve`).
    BenchServe(bench::BenchServeArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Run an OpenAI batch file (JSONL requests) offline into a results file; resumable, shardable.
    RunBatch(run_batch::RunBatchArgs),
    /// Print the SHA-256 hash of an API key for the config's `api_keys` (key from stdin if omitted).
    HashKey(hash_key::HashKeyArgs),
    /// Print model metadata, tensors and memory use.
    Inspect(inspect::InspectArgs),
}

/// Parses the command line and runs the command.
pub(crate) fn run() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Generate(a) => generate::run(a),
        Cmd::Tokenize(a) => tokenize::run(a),
        Cmd::Perplexity(a) => perplexity::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::BenchServe(a) => bench::run_serve(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::RunBatch(a) => run_batch::run(a),
        Cmd::HashKey(a) => hash_key::run(a),
        Cmd::Inspect(a) => inspect::run(a),
    }
}

/// The error and its causes on one line, `: `-separated; a cause whose text
/// the message already quotes (library errors name their source) is not
/// repeated.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

/// The configuration file, or the defaults.
pub(crate) fn load_config(path: Option<&Path>) -> Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

/// The model path from the flags, the environment or the config.
pub(crate) fn model_path(m: &ModelArgs, cfg: &Config) -> Result<PathBuf> {
    Ok(paths::resolve_model(
        m.model.as_deref(),
        cfg.model.path.as_deref(),
    )?)
}

/// Loads the model and its tokenizer named by the flags under `cfg`, with the
/// chat template of `model.chat_template` when given (`--chat-template` of
/// `generate` and `bench` sets it).
pub(crate) fn load_with(m: &ModelArgs, cfg: &Config) -> Result<(Arc<Model>, Arc<Tokenizer>)> {
    serve::load_model(&model_path(m, cfg)?, cfg.model.chat_template.as_deref())
}

/// Loads the config named by the flags, then the model under it.
pub(crate) fn load(m: &ModelArgs) -> Result<(Arc<Model>, Arc<Tokenizer>)> {
    load_with(m, &load_config(m.config.as_deref())?)
}

/// Threads for compute when `--threads` is not given: one per core.
pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("loading m.gguf: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[test]
    fn one_line_joins_causes_once() {
        let io = || std::io::Error::other("truncated at byte 0");
        // A library error that quotes its source: the source is not repeated.
        let e = anyhow::Error::new(Quoting { source: io() });
        assert_eq!(one_line(&e), "loading m.gguf: truncated at byte 0");
        // anyhow context over an error: both parts, once each.
        let e = anyhow::Error::new(io()).context("reading f.txt");
        assert_eq!(one_line(&e), "reading f.txt: truncated at byte 0");
    }
}
