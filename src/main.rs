//! The `brigade` command line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use brigade::config::Config;
use brigade::gguf::GgufFile;
use brigade::model::Model;
use brigade::paths;
use brigade::runner::Runner;
use brigade::tokenizer::{ChatMessage, Tokenizer};

#[derive(Parser, Debug)]
#[command(name = "brigade", version, about = "Throughput-oriented LLM inference on CPUs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Model file (GGUF). Default: $BRIGADE_MODEL, then the config, then the cached default model.
    #[arg(long, global = true)]
    model: Option<PathBuf>,
    /// Threads for compute.
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Print the token ids of TEXT (special tokens parsed).
    Tokenize {
        /// Text to tokenize.
        text: String,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        m: ModelArgs,
    },
    /// Perplexity of a text file, scored in windows of --ctx tokens.
    Perplexity {
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
    },
    /// Offline throughput benchmark through the full runtime.
    Bench(brigade::bench::BenchArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(brigade::server::ServeArgs),
    /// Print the SHA-256 hash of an API key for the config's `api_keys` (key from stdin if omitted).
    HashKey(brigade::server::HashKeyArgs),
    /// Print model metadata, tensors and memory use.
    Inspect {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        m: ModelArgs,
    },
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as one user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Random seed (default: drawn fresh and reported).
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    m: ModelArgs,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn load(m: &ModelArgs) -> Result<(Arc<Model>, Arc<Tokenizer>)> {
    let path = paths::resolve_model(m.model.as_deref(), None)?;
    let file = Arc::new(GgufFile::open(&path).with_context(|| format!("loading {}", path.display()))?);
    let tok = Tokenizer::from_gguf(&file).with_context(|| format!("tokenizer of {}", path.display()))?;
    let model = Model::from_gguf(file).with_context(|| format!("model {}", path.display()))?;
    Ok((Arc::new(model), Arc::new(tok)))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Tokenize { text, json, m } => {
            let (_, tok) = load(&m)?;
            let ids = tok.encode(&text, true)?;
            if json {
                println!("{}", serde_json::to_string(&ids)?);
            } else {
                println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
            }
            Ok(())
        }
        Cmd::Perplexity { file, ctx, json, m } => {
            if ctx < 2 {
                bail!("--ctx must be at least 2, got {ctx}");
            }
            let (model, tok) = load(&m)?;
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let ids = tok.encode(&text, false)?;
            let mut runner = Runner::new(model.clone(), ctx, m.threads.unwrap_or_else(default_threads))?;
            let r = brigade::runner::perplexity(&mut runner, &ids, ctx)?;
            if json {
                println!("{}", serde_json::json!({"perplexity": r.perplexity, "tokens": r.tokens, "nll": r.nll}));
            } else {
                println!("perplexity {:.4} over {} tokens (ctx {ctx})", r.perplexity, r.tokens);
            }
            Ok(())
        }
        Cmd::Inspect { json, m } => inspect(&m, json),
        Cmd::Serve(args) => brigade::server::run(args),
        Cmd::HashKey(args) => brigade::server::hash_key_main(args),
        Cmd::Bench(args) => {
            let cfg = load_config(args.config.as_deref())?;
            let m = ModelArgs { model: args.model.clone(), threads: None };
            let (model, tok) = load_with(&m, &cfg)?;
            let r = brigade::bench::run_offline(&args, model, tok, cfg)?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                brigade::bench::print_table(&r);
            }
            Ok(())
        }
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    use brigade::engine::{Engine, Event, GenerateRequest, Prompt, SamplingParams};
    let cfg = load_config(a.config.as_deref())?;
    let (model, tok) = load_with(&a.m, &cfg)?;
    let prompt = if a.chat {
        Prompt::Chat(vec![ChatMessage { role: "user".into(), content: a.prompt.clone() }])
    } else {
        Prompt::Text(a.prompt.clone())
    };
    let params = SamplingParams { max_tokens: a.max_tokens, temperature: a.temperature, seed: a.seed, logprobs: Some(0), ..SamplingParams::default() };
    let engine = Engine::start(model, tok, cfg)?;
    let mut stream = engine.submit(GenerateRequest { prompt, params, priority: 0 })?;
    let mut prompt_ids = Vec::new();
    let mut seed = 0;
    let mut out_ids = Vec::new();
    let mut logprobs = Vec::new();
    let mut text = String::new();
    let mut finish = "abort";
    let stdout = std::io::stdout();
    while let Some(ev) = stream.blocking_next() {
        match ev {
            Event::Started { prompt_tokens, seed: s } => {
                prompt_ids = prompt_tokens;
                seed = s;
            }
            Event::PromptLogprobs(_) => {}
            Event::Token { token, text: piece, .. } => {
                out_ids.push(token.token);
                logprobs.push(token.logprob);
                text.push_str(&piece);
                if !a.json {
                    let mut lock = stdout.lock();
                    write!(lock, "{piece}")?;
                    lock.flush()?;
                }
            }
            Event::Finished { reason, text: rest, .. } => {
                text.push_str(&rest);
                if !a.json {
                    println!("{rest}");
                }
                finish = reason.as_str();
                // The last token of a `stop` finish is the stop token itself: not part of the text.
                break;
            }
            Event::Error(e) => bail!("{e}"),
        }
    }
    if a.json {
        let v = serde_json::json!({
            "prompt_token_ids": prompt_ids,
            "token_ids": out_ids,
            "text": text,
            "finish_reason": finish,
            "logprobs": logprobs,
            "seed": seed,
        });
        println!("{v}");
    }
    Ok(())
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

fn load_with(m: &ModelArgs, cfg: &Config) -> Result<(Arc<Model>, Arc<Tokenizer>)> {
    let path = paths::resolve_model(m.model.as_deref(), cfg.model.path.as_deref())?;
    let file = Arc::new(GgufFile::open(&path).with_context(|| format!("loading {}", path.display()))?);
    let tok = Tokenizer::from_gguf(&file).with_context(|| format!("tokenizer of {}", path.display()))?;
    let model = Model::from_gguf(file).with_context(|| format!("model {}", path.display()))?;
    Ok((Arc::new(model), Arc::new(tok)))
}

fn inspect(m: &ModelArgs, json: bool) -> Result<()> {
    let path = paths::resolve_model(m.model.as_deref(), None)?;
    let file = Arc::new(GgufFile::open(&path)?);
    let model = Model::from_gguf(file.clone())?;
    let kv_per_token = brigade::model::kv::KvStore::bytes_per_token(model.config.n_layers, model.config.kv_dim);
    if json {
        let tensors: Vec<_> = file
            .tensors()
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "dims": t.dims, "dtype": t.dtype.name(), "bytes": t.size_bytes}))
            .collect();
        let v = serde_json::json!({
            "path": path.display().to_string(),
            "version": file.version(),
            "config": model.config,
            "weight_bytes": model.weight_bytes(),
            "file_bytes": file.data_bytes(),
            "kv_bytes_per_token": kv_per_token,
            "tensors": tensors,
        });
        println!("{v}");
        return Ok(());
    }
    println!("file: {} (GGUF v{}, {} bytes)", path.display(), file.version(), file.data_bytes());
    println!("metadata:");
    for (k, v) in file.metadata() {
        let s = match v.as_array() {
            Some(a) => format!("[{} values]", a.len()),
            None => format!("{v:?}"),
        };
        let s: String = s.chars().take(100).collect();
        println!("  {k} = {s}");
    }
    println!("tensors ({}):", file.tensors().len());
    for t in file.tensors() {
        println!("  {:<32} {:>6} {:?} {} bytes", t.name, t.dtype.name(), t.dims, t.size_bytes);
    }
    let c = &model.config;
    println!("memory:");
    println!("  weights (mmapped): {:.1} MiB", model.weight_bytes() as f64 / (1 << 20) as f64);
    println!("  kv cache per token (f16): {} bytes ({:.1} MiB per 1k tokens)", kv_per_token, kv_per_token as f64 * 1024.0 / (1 << 20) as f64);
    println!("  context length: {}", c.context_length);
    Ok(())
}
