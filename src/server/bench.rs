//! The HTTP serving benchmark (`brigade bench --url …`): drives a running
//! server with streaming requests at a fixed concurrency or a Poisson arrival
//! rate, optionally spread over several tenants' API keys, and reports what
//! `vllm bench serve` reports: request/token throughput, TTFT, TPOT, ITL and
//! end-to-end latency percentiles, goodput under latency SLOs, errors by
//! status, and tokens served per tenant.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// `brigade bench --url` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct HttpBenchArgs {
    /// Base URL of the server, e.g. `http://127.0.0.1:8000`.
    #[arg(long)]
    pub url: String,
    /// API: `completions` or `chat`.
    #[arg(long, default_value = "completions", value_parser = ["completions", "chat"])]
    pub endpoint: String,
    /// Model name to send (default: the first of `/v1/models`).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Requests to send.
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Most requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Poisson arrival rate in requests/s (default: all at once, limited by --concurrency).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// API keys, `KEY` or `TENANT=KEY`; requests go round-robin over them.
    #[arg(long = "api-key")]
    pub api_keys: Vec<String>,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Generated tokens per request (`max_tokens`, with `ignore_eos`).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// SLO on time to first token, ms (goodput counts requests meeting every SLO given).
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// SLO on time per output token, ms.
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// SLO on end-to-end latency, ms.
    #[arg(long)]
    pub slo_e2e_ms: Option<f64>,
    /// Seed of the arrival process and prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout_s: f64,
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    tenant: String,
    status: Option<u16>,
    error: Option<String>,
    ttft_s: Option<f64>,
    itl_s: Vec<f64>,
    e2e_s: f64,
    prompt_tokens: u64,
    output_tokens: u64,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Percentile summary in milliseconds.
fn summary_ms(v: &[f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let mut s: Vec<f64> = v.iter().map(|x| x * 1e3).collect();
    s.sort_by(f64::total_cmp);
    let pct = |p: f64| s[((p / 100.0) * (s.len() - 1) as f64).round() as usize];
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    json!({"mean": mean, "p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0), "max": pct(100.0)})
}

async fn one_request(client: reqwest::Client, url: String, key: Option<(String, String)>, body: Value, chat: bool) -> Outcome {
    let tenant = key.as_ref().map(|k| k.0.clone()).unwrap_or_else(|| "default".into());
    let mut o = Outcome { tenant, ..Default::default() };
    let t0 = Instant::now();
    let mut req = client.post(&url).json(&body);
    if let Some((_, k)) = &key {
        req = req.bearer_auth(k);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            o.error = Some(e.to_string());
            o.e2e_s = t0.elapsed().as_secs_f64();
            return o;
        }
    };
    o.status = Some(resp.status().as_u16());
    if !resp.status().is_success() {
        o.error = Some(resp.text().await.unwrap_or_default());
        o.e2e_s = t0.elapsed().as_secs_f64();
        return o;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut last: Option<Instant> = None;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            o.error = Some("stream broken".into());
            break;
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buf.drain(..pos + 2).collect();
            let line = String::from_utf8_lossy(&frame);
            let Some(data) = line.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            if v.get("error").is_some() {
                o.error = Some(data.to_string());
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                o.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                o.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
            }
            let c = &v["choices"][0];
            let text = if chat { c["delta"]["content"].as_str() } else { c["text"].as_str() };
            if text.is_some_and(|t| !t.is_empty()) {
                let now = Instant::now();
                match last {
                    None => o.ttft_s = Some(now.duration_since(t0).as_secs_f64()),
                    Some(l) => o.itl_s.push(now.duration_since(l).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    o.e2e_s = t0.elapsed().as_secs_f64();
    o
}

/// Runs the benchmark and returns the report (also suitable for `--json`).
pub fn run_http_bench(args: HttpBenchArgs) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(bench(args))
}

async fn bench(a: HttpBenchArgs) -> anyhow::Result<Value> {
    let base = a.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder().timeout(Duration::from_secs_f64(a.timeout_s)).build()?;
    let keys: Vec<(String, String)> = a
        .api_keys
        .iter()
        .enumerate()
        .map(|(i, k)| match k.split_once('=') {
            Some((t, k)) => (t.to_string(), k.to_string()),
            None => (format!("key{i}"), k.clone()),
        })
        .collect();
    let model = match &a.model_name {
        Some(m) => m.clone(),
        None => {
            let mut req = client.get(format!("{base}/v1/models"));
            if let Some((_, k)) = keys.first() {
                req = req.bearer_auth(k);
            }
            let v: Value = req.send().await.context("GET /v1/models")?.json().await.context("/v1/models body")?;
            v["data"][0]["id"].as_str().context("no model in /v1/models")?.to_string()
        }
    };
    let chat = a.endpoint == "chat";
    let url = if chat { format!("{base}/v1/chat/completions") } else { format!("{base}/v1/completions") };
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let mut rng = a.seed ^ 0x5EED;
    let words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"];
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(a.num_prompts);
    for i in 0..a.num_prompts {
        if let Some(rate) = a.request_rate.filter(|r| *r > 0.0 && r.is_finite()) {
            let u = ((splitmix(&mut rng) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            tokio::time::sleep(Duration::from_secs_f64(-u.ln() / rate)).await;
        }
        let mut prompt = format!("Request {i}:");
        for _ in 0..a.input_len.saturating_sub(4) {
            prompt.push(' ');
            prompt.push_str(words[(splitmix(&mut rng) % words.len() as u64) as usize]);
        }
        let mut body = json!({
            "model": model,
            "max_tokens": a.output_len,
            "temperature": 0,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if chat {
            body["messages"] = json!([{"role": "user", "content": prompt}]);
        } else {
            body["prompt"] = json!(prompt);
        }
        let key = if keys.is_empty() { None } else { keys.get(i % keys.len()).cloned() };
        let permit = sem.clone().acquire_owned().await?;
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let o = one_request(client, url, key, body, chat).await;
            drop(permit);
            o
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await?);
    }
    let duration = start.elapsed().as_secs_f64().max(1e-9);
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none() && o.status == Some(200)).collect();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.error.is_some() || o.status != Some(200)) {
        *errors.entry(o.status.map_or("connection".to_string(), |s| s.to_string())).or_default() += 1;
    }
    let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft_s).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|o| o.itl_s.iter().copied()).collect();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|o| o.output_tokens > 1)
        .filter_map(|o| o.ttft_s.map(|t| (o.e2e_s - t) / (o.output_tokens - 1) as f64))
        .collect();
    let e2e: Vec<f64> = ok.iter().map(|o| o.e2e_s).collect();
    let good = ok
        .iter()
        .filter(|o| {
            let tp = if o.output_tokens > 1 { o.ttft_s.map(|t| (o.e2e_s - t) / (o.output_tokens - 1) as f64) } else { Some(0.0) };
            a.slo_ttft_ms.is_none_or(|s| o.ttft_s.is_some_and(|t| t * 1e3 <= s))
                && a.slo_tpot_ms.is_none_or(|s| tp.is_some_and(|t| t * 1e3 <= s))
                && a.slo_e2e_ms.is_none_or(|s| o.e2e_s * 1e3 <= s)
        })
        .count();
    let input: u64 = ok.iter().map(|o| o.prompt_tokens).sum();
    let output: u64 = ok.iter().map(|o| o.output_tokens).sum();
    let mut per_tenant: BTreeMap<String, Value> = BTreeMap::new();
    for o in &outcomes {
        let e = per_tenant.entry(o.tenant.clone()).or_insert_with(|| json!({"completed": 0, "failed": 0, "prompt_tokens": 0, "output_tokens": 0}));
        let okk = o.error.is_none() && o.status == Some(200);
        let key = if okk { "completed" } else { "failed" };
        e[key] = json!(e[key].as_u64().unwrap_or(0) + 1);
        e["prompt_tokens"] = json!(e["prompt_tokens"].as_u64().unwrap_or(0) + o.prompt_tokens);
        e["output_tokens"] = json!(e["output_tokens"].as_u64().unwrap_or(0) + o.output_tokens);
    }
    Ok(json!({
        "url": base,
        "endpoint": a.endpoint,
        "model": model,
        "num_prompts": a.num_prompts,
        "concurrency": a.concurrency,
        "request_rate": a.request_rate,
        "completed": ok.len(),
        "failed": outcomes.len() - ok.len(),
        "errors_by_status": errors,
        "duration_s": duration,
        "total_input_tokens": input,
        "total_output_tokens": output,
        "request_throughput": ok.len() as f64 / duration,
        "output_throughput": output as f64 / duration,
        "total_token_throughput": (input + output) as f64 / duration,
        "goodput": good as f64 / duration,
        "slo": {"ttft_ms": a.slo_ttft_ms, "tpot_ms": a.slo_tpot_ms, "e2e_ms": a.slo_e2e_ms},
        "ttft_ms": summary_ms(&ttft),
        "tpot_ms": summary_ms(&tpot),
        "itl_ms": summary_ms(&itl),
        "e2e_ms": summary_ms(&e2e),
        "per_tenant": per_tenant,
    }))
}
