//! `brigade bench` (offline, through the runtime) and `brigade bench-serve`
//! (a running server over HTTP): flags → [`brigade::bench`] options, report →
//! stdout (JSON or a table).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use brigade::bench::engine::{
    run_offline, BenchOptions, BenchReport, LenSpec, Structured, Workload,
};
use brigade::bench::http::{run_http_bench, Endpoint, HttpBenchOptions};

use super::ModelArgs;

/// `brigade bench` flags.
#[derive(Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Number of requests.
    #[arg(long, default_value_t = 64)]
    num_requests: usize,
    /// Prompt length in tokens: `N` or a uniform range `MIN:MAX`.
    #[arg(long, default_value = "128")]
    input_len: LenSpec,
    /// Output length in tokens: `N` or `MIN:MAX`.
    #[arg(long, default_value = "128")]
    output_len: LenSpec,
    /// JSONL file of requests: `{"prompt": "...", "output_len": N}` or `{"input_len": N, "output_len": N}`.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Most requests in flight at once (default: all).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Poisson arrival rate in requests/s (default: all at once).
    #[arg(long)]
    request_rate: Option<f64>,
    /// Layer-group workers (overrides the config).
    #[arg(long)]
    workers: Option<usize>,
    /// Threads per worker (overrides the config).
    #[arg(long)]
    threads_per_worker: Option<usize>,
    /// Pipeline depth (overrides the config).
    #[arg(long)]
    pipeline_depth: Option<usize>,
    /// Token budget per micro-batch (overrides the config).
    #[arg(long)]
    max_batched_tokens: Option<usize>,
    /// Shared prefix length in tokens prepended to every prompt (prefix caching).
    #[arg(long, default_value_t = 0)]
    prefix_len: usize,
    /// Seed for the synthetic prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Constrain every request's output: `json-schema` (each request its own
    /// JSON schema); the report adds the per-token mask time.
    #[arg(long)]
    structured: Option<Structured>,
    /// Text chat prompts instead of random tokens: `grounded` (copy a text,
    /// extract fields) or `prose` (free text); greedy, up to --output-len tokens, ending at
    /// end-of-generation. Speculative decoding's workloads (with --concurrency 1).
    #[arg(long)]
    workload: Option<Workload>,
    /// Run the benchmark twice, speculative decoding off then on (the config's
    /// `[speculative]` or --spec-ngram), and report both and the speed-up
    /// (see --rounds).
    #[arg(long, conflicts_with = "no_spec")]
    spec_compare: bool,
    /// With --spec-compare: alternate off and on this many times and report
    /// the median speed-up (with every round's), so that drift of a shared
    /// machine hits both sides alike. 1..=100.
    #[arg(long, default_value_t = 1, requires = "spec_compare",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    #[command(flatten)]
    spec: super::SpecArgs,
    /// Configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model file (GGUF) or known model name (smollm2-135m, gemma3-270m).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Jinja chat template file to use instead of the model's (`model.chat_template`),
    /// for `--workload` (its prompts are chats).
    #[arg(long, requires = "workload")]
    chat_template: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Disable the progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Write the requests this run would make (same seed and lengths) as an
    /// OpenAI batch input file for `brigade run-batch`, and exit without running.
    #[arg(long)]
    write_batch: Option<PathBuf>,
}

/// Runs `brigade bench` and prints its report.
pub(crate) fn run(a: BenchArgs) -> Result<()> {
    let mut cfg = super::load_config(a.config.as_deref())?;
    a.spec.apply(&mut cfg)?;
    if let Some(t) = &a.chat_template {
        cfg.model.chat_template = Some(t.clone());
    }
    let m = ModelArgs {
        model: a.model.clone(),
        threads: None,
        config: a.config.clone(),
    };
    let (model, tok) = super::load_with(&m, &cfg)?;
    let opts = BenchOptions {
        num_requests: a.num_requests,
        input_len: a.input_len,
        output_len: a.output_len,
        dataset: a.dataset,
        concurrency: a.concurrency,
        request_rate: a.request_rate,
        workers: a.workers,
        threads_per_worker: a.threads_per_worker,
        pipeline_depth: a.pipeline_depth,
        max_batched_tokens: a.max_batched_tokens,
        prefix_len: a.prefix_len,
        seed: a.seed,
        progress: !a.no_progress && !a.json,
        structured: a.structured,
        workload: a.workload,
    };
    if let Some(path) = &a.write_batch {
        let n =
            brigade::bench::engine::write_batch_file(&opts, &tok, model.config.vocab_size, path)?;
        eprintln!("brigade: wrote {n} requests to {}", path.display());
        return Ok(());
    }
    if a.spec_compare {
        let mut off = cfg.clone();
        off.speculative.method = brigade::config::SpecMethod::Off;
        let mut on = cfg;
        on.speculative.method = brigade::config::SpecMethod::Ngram;
        // Rounds of (off, on), alternating; the reports shown are the last round's.
        let (mut speedups, mut tok_off, mut tok_on) = (Vec::new(), Vec::new(), Vec::new());
        let mut last = None;
        for _ in 0..a.rounds {
            let r_off = run_offline(&opts, model.clone(), tok.clone(), off.clone())?;
            let r_on = run_offline(&opts, model.clone(), tok.clone(), on.clone())?;
            tok_off.push(r_off.output_tokens_per_s);
            tok_on.push(r_on.output_tokens_per_s);
            speedups.push(if r_off.output_tokens_per_s > 0.0 {
                r_on.output_tokens_per_s / r_off.output_tokens_per_s
            } else {
                0.0
            });
            last = Some((r_off, r_on));
        }
        let Some((r_off, r_on)) = last else {
            return Ok(());
        };
        let speedup = median(&speedups);
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "off": r_off,
                    "ngram": r_on,
                    "speedup": speedup,
                    "speedups": speedups,
                    "off_output_tokens_per_s": tok_off,
                    "ngram_output_tokens_per_s": tok_on,
                })
            );
        } else {
            for (name, r) in [("speculative off", &r_off), ("speculative ngram", &r_on)] {
                println!("== {name}");
                print_table(r);
            }
            if speedups.len() > 1 {
                let show = |v: &[f64], digits: usize| {
                    v.iter()
                        .map(|x| format!("{x:.digits$}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                println!(
                    "{:<34} {:>12}",
                    "off output tok/s per round",
                    show(&tok_off, 1)
                );
                println!(
                    "{:<34} {:>12}",
                    "ngram output tok/s per round",
                    show(&tok_on, 1)
                );
                println!("{:<34} {:>12}", "speed-up per round", show(&speedups, 3));
            }
            println!(
                "{:<34} {:>12.3}",
                "speed-up (output tok/s, ngram/off)", speedup
            );
        }
        return Ok(());
    }
    let r = run_offline(&opts, model, tok, cfg)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_table(&r);
    }
    Ok(())
}

/// The median of `v` (the mean of the middle two for an even count); 0 when empty.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Prints the report as a table.
fn print_table(r: &BenchReport) {
    println!(
        "{:<34} {:>12}",
        "requests (ok / failed)",
        format!("{} / {}", r.num_requests, r.failed)
    );
    if let Some(e) = &r.first_error {
        println!("{:<34} {}", "first failure", e);
    }
    println!(
        "{:<34} {:>12}",
        "workers x threads, concurrency",
        format!("{}x{}, {}", r.workers, r.threads_per_worker, r.concurrency)
    );
    println!("{:<34} {:>12.2}", "duration (s)", r.duration_s);
    println!("{:<34} {:>12.2}", "requests/s", r.requests_per_s);
    println!("{:<34} {:>12.1}", "input tokens/s", r.input_tokens_per_s);
    println!("{:<34} {:>12.1}", "output tokens/s", r.output_tokens_per_s);
    println!("{:<34} {:>12.1}", "total tokens/s", r.total_tokens_per_s);
    for (name, p) in [
        ("TTFT (ms)", r.ttft_ms),
        ("TPOT (ms)", r.tpot_ms),
        ("end-to-end (ms)", r.e2e_ms),
    ] {
        println!(
            "{:<34} {:>12}",
            format!("{name} p50/p90/p99"),
            format!("{:.1}/{:.1}/{:.1}", p.p50, p.p90, p.p99)
        );
    }
    println!(
        "{:<34} {:>12}",
        "steady decode tok/s (window s)",
        format!(
            "{:.1} ({:.2})",
            r.steady_decode_tokens_per_s, r.steady_window_s
        )
    );
    println!(
        "{:<34} {:>12.1}",
        "peak KV usage (%)",
        r.peak_kv_usage * 100.0
    );
    println!("{:<34} {:>12}", "preemptions", r.preemptions);
    println!(
        "{:<34} {:>12.1}",
        "prefix cache hit rate (%)",
        r.prefix_cache_hit_rate * 100.0
    );
    if let Some(s) = &r.structured {
        println!("{:<34} {:>12}", "structured output", s);
        println!(
            "{:<34} {:>12}",
            "mask time p50/p99 (us)",
            format!("{:.0}/{:.0}", r.mask_p50_us, r.mask_p99_us)
        );
        println!("{:<34} {:>12}", "masks computed", r.masks);
    }
    println!("{:<34} {:>12}", "speculative decoding", r.speculative);
    if r.spec_steps > 0 {
        println!(
            "{:<34} {:>12}",
            "verify steps, acceptance (%)",
            format!("{}, {:.1}", r.spec_steps, r.spec_acceptance_rate * 100.0)
        );
        println!(
            "{:<34} {:>12.2}",
            "tokens per verify step", r.spec_tokens_per_step
        );
        println!(
            "{:<34} {:>12}",
            "drafts per verify step, row price",
            format!("{:.2}, {:.2}", r.spec_draft_per_step, r.spec_row_cost_ratio)
        );
    }
    let busy: Vec<String> = r
        .worker_busy_fraction
        .iter()
        .map(|b| format!("{:.0}%", b * 100.0))
        .collect();
    println!("{:<34} {:>12}", "worker busy", busy.join(" "));
}

/// `brigade bench-serve` flags.
#[derive(Args, Debug, Clone)]
pub(crate) struct BenchServeArgs {
    /// Base URL of the server, e.g. `http://127.0.0.1:8000`.
    #[arg(long)]
    url: String,
    /// API: `completions` or `chat`.
    #[arg(long, default_value = "completions", value_parser = ["completions", "chat"])]
    endpoint: String,
    /// Model name to send (default: the first of `/v1/models`).
    #[arg(long)]
    model_name: Option<String>,
    /// Requests to send.
    #[arg(long, default_value_t = 64)]
    num_prompts: usize,
    /// Most requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Poisson arrival rate in requests/s (default: all at once, limited by --concurrency).
    #[arg(long)]
    request_rate: Option<f64>,
    /// API keys, `KEY` or `TENANT=KEY`; requests go round-robin over them.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Generated tokens per request (`max_tokens`, with `ignore_eos`).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// SLO on time to first token, ms (goodput counts requests meeting every SLO given).
    #[arg(long)]
    slo_ttft_ms: Option<f64>,
    /// SLO on time per output token, ms.
    #[arg(long)]
    slo_tpot_ms: Option<f64>,
    /// SLO on end-to-end latency, ms.
    #[arg(long)]
    slo_e2e_ms: Option<f64>,
    /// Seed of the arrival process and prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
}

/// Runs `brigade bench-serve` and prints its report as pretty JSON.
pub(crate) fn run_serve(a: BenchServeArgs) -> Result<()> {
    let opts = HttpBenchOptions {
        url: a.url,
        endpoint: if a.endpoint == "chat" {
            Endpoint::Chat
        } else {
            Endpoint::Completions
        },
        model_name: a.model_name,
        num_prompts: a.num_prompts,
        concurrency: a.concurrency,
        request_rate: a.request_rate,
        api_keys: a.api_keys,
        input_len: a.input_len,
        output_len: a.output_len,
        slo_ttft_ms: a.slo_ttft_ms,
        slo_tpot_ms: a.slo_tpot_ms,
        slo_e2e_ms: a.slo_e2e_ms,
        seed: a.seed,
        timeout_s: a.timeout_s,
    };
    let r = run_http_bench(opts)?;
    // Through `Value`, as before the report was typed: the same key order.
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::to_value(&r)?)?
    );
    Ok(())
}
