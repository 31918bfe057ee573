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
    /// Configuration file (TOML); command-line flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
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
    /// Serving benchmark: drive a running `brigade serve` over HTTP (like `vllm bench serve`).
    BenchServe(brigade::server::HttpBenchArgs),
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
    /// Keep the k most likely tokens (-1 or 0: off).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    top_k: i32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens below min_p x the top probability.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Presence penalty in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Frequency penalty in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Stop string (repeatable); not included in the output.
    #[arg(long)]
    stop: Vec<String>,
    /// Return this many top alternatives per token (0..=20) in --json output.
    #[arg(long)]
    logprobs: Option<usize>,
    /// Completions of the prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Generate at least this many tokens before end-of-generation may stop.
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    /// Keep going past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    m: ModelArgs,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn load(m: &ModelArgs) -> Result<(Arc<Model>, Arc<Tokenizer>)> {
    let cfg = load_config(m.config.as_deref())?;
    load_with(m, &cfg)
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
        Cmd::BenchServe(args) => {
            let v = brigade::server::run_http_bench(args)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::HashKey(args) => brigade::server::hash_key_main(args),
        Cmd::Bench(args) => {
            let cfg = load_config(args.config.as_deref())?;
            let m = ModelArgs { model: args.model.clone(), threads: None, config: args.config.clone() };
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
    let cfg = load_config(a.m.config.as_deref())?;
    let (model, tok) = load_with(&a.m, &cfg)?;
    let prompt = if a.chat {
        Prompt::Chat(vec![ChatMessage { role: "user".into(), content: a.prompt.clone() }])
    } else {
        Prompt::Text(a.prompt.clone())
    };
    let params = SamplingParams {
        max_tokens: a.max_tokens,
        min_tokens: a.min_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        stop: a.stop.clone(),
        seed: a.seed,
        logprobs: Some(a.logprobs.unwrap_or(0)),
        n: a.n,
        ignore_eos: a.ignore_eos,
        ..SamplingParams::default()
    };
    let engine = Engine::start(model, tok, cfg)?;
    let mut stream = engine.submit(GenerateRequest { prompt, params, priority: 0 })?;
    let mut prompt_ids = Vec::new();
    let mut seed = 0;
    #[derive(Default)]
    struct Choice {
        ids: Vec<u32>,
        logprobs: Vec<f32>,
        top: Vec<Vec<(u32, f32)>>,
        text: String,
        finish: Option<&'static str>,
    }
    let mut choices: Vec<Choice> = (0..a.n.max(1)).map(|_| Choice::default()).collect();
    let stdout = std::io::stdout();
    let stream_text = !a.json && a.n <= 1;
    while let Some(ev) = stream.blocking_next() {
        match ev {
            Event::Started { prompt_tokens, seed: s } => {
                prompt_ids = prompt_tokens;
                seed = s;
            }
            Event::PromptLogprobs(_) => {}
            Event::Token { index, token, text: piece } => {
                let Some(c) = choices.get_mut(index) else { continue };
                c.ids.push(token.token);
                c.logprobs.push(token.logprob);
                c.top.push(token.top);
                c.text.push_str(&piece);
                if stream_text {
                    let mut lock = stdout.lock();
                    write!(lock, "{piece}")?;
                    lock.flush()?;
                }
            }
            Event::Finished { index, reason, text: rest, .. } => {
                let Some(c) = choices.get_mut(index) else { continue };
                c.text.push_str(&rest);
                c.finish = Some(reason.as_str());
                if stream_text {
                    println!("{rest}");
                }
            }
            Event::Error(e) => bail!("{e}"),
        }
    }
    if !a.json && !stream_text {
        for (i, c) in choices.iter().enumerate() {
            println!("--- completion {i} ({})", c.finish.unwrap_or("abort"));
            println!("{}", c.text);
        }
    }
    if a.json {
        let choice_json = |c: &Choice| {
            let mut v = serde_json::json!({
                "token_ids": c.ids,
                "text": c.text,
                "finish_reason": c.finish.unwrap_or("abort"),
                "logprobs": c.logprobs,
            });
            if a.logprobs.unwrap_or(0) > 0 {
                v["top_logprobs"] = serde_json::json!(c.top);
            }
            v
        };
        let mut v = choice_json(&choices[0]);
        v["prompt_token_ids"] = serde_json::json!(prompt_ids);
        v["seed"] = serde_json::json!(seed);
        if choices.len() > 1 {
            v["choices"] = serde_json::Value::Array(choices.iter().map(choice_json).collect());
        }
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
    Ok(brigade::model::load_with_tokenizer(&path)?)
}

fn inspect(m: &ModelArgs, json: bool) -> Result<()> {
    let cfg = load_config(m.config.as_deref())?;
    let path = paths::resolve_model(m.model.as_deref(), cfg.model.path.as_deref())?;
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
