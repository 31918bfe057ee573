//! The HTTP serving benchmark (`brigade bench-serve --url …`): drives a running
//! server with streaming requests at a fixed concurrency or a Poisson arrival
//! rate, optionally spread over several tenants' API keys, and reports what
//! `vllm bench serve` reports: request/token throughput, TTFT, TPOT, ITL and
//! end-to-end latency percentiles, goodput under latency SLOs, errors by
//! status, and tokens served per tenant.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

use super::{poisson_gap_s, Pct, PctMax};
use crate::sampling::SplitMix64;

/// Which OpenAI endpoint the benchmark drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// `brigade bench-serve` options.
#[derive(Debug, Clone)]
pub struct HttpBenchOptions {
    /// Base URL of the server, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// The API driven.
    pub endpoint: Endpoint,
    /// Model name to send (default: the first of `/v1/models`).
    pub model_name: Option<String>,
    /// Requests to send.
    pub num_prompts: usize,
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Poisson arrival rate in requests/s (default: all at once, limited by `concurrency`).
    pub request_rate: Option<f64>,
    /// API keys, `KEY` or `TENANT=KEY`; requests go round-robin over them.
    pub api_keys: Vec<String>,
    /// Approximate prompt length in tokens.
    pub input_len: usize,
    /// Generated tokens per request (`max_tokens`, with `ignore_eos`).
    pub output_len: usize,
    /// SLO on time to first token, ms (goodput counts requests meeting every SLO given).
    pub slo_ttft_ms: Option<f64>,
    /// SLO on time per output token, ms.
    pub slo_tpot_ms: Option<f64>,
    /// SLO on end-to-end latency, ms.
    pub slo_e2e_ms: Option<f64>,
    /// Seed of the arrival process and prompts.
    pub seed: u64,
    /// Per-request timeout in seconds.
    pub timeout_s: f64,
}

/// Why the HTTP benchmark could not run (failed requests are counted, not errors).
#[derive(Debug, thiserror::Error)]
pub enum HttpBenchError {
    /// The tokio runtime could not be built.
    #[error("bench runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(reqwest::Error),
    /// `GET /v1/models` failed.
    #[error("GET /v1/models: {0}")]
    Models(reqwest::Error),
    /// `/v1/models` answered a body that is not a model list.
    #[error("/v1/models body: {0}")]
    ModelsBody(reqwest::Error),
    /// `/v1/models` listed no model.
    #[error("no model in /v1/models")]
    NoModel,
    /// A request task panicked or was cancelled.
    #[error("request task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The latency SLOs goodput was measured against, ms (`None`: not set).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Slo {
    /// Time to first token.
    pub ttft_ms: Option<f64>,
    /// Time per output token.
    pub tpot_ms: Option<f64>,
    /// End-to-end latency.
    pub e2e_ms: Option<f64>,
}

/// One tenant's requests and tokens.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TenantTotals {
    /// Requests that completed with 200.
    pub completed: u64,
    /// Requests that did not.
    pub failed: u64,
    /// Prompt tokens of completed requests (from `usage`).
    pub prompt_tokens: u64,
    /// Generated tokens (from `usage`).
    pub output_tokens: u64,
}

/// What `brigade bench-serve` reports (the keys of `vllm bench serve` where they exist).
#[derive(Clone, Debug, Serialize)]
pub struct HttpBenchReport {
    /// Base URL driven.
    pub url: String,
    /// The API driven.
    pub endpoint: Endpoint,
    /// Model name sent.
    pub model: String,
    /// Requests sent.
    pub num_prompts: usize,
    /// Most requests in flight.
    pub concurrency: usize,
    /// Poisson arrival rate, requests/s (`None`: all at once).
    pub request_rate: Option<f64>,
    /// Requests answered 200 without a stream error.
    pub completed: usize,
    /// The others.
    pub failed: usize,
    /// Failed requests by HTTP status (`"connection"` when there was none).
    pub errors_by_status: BTreeMap<String, u64>,
    /// Wall time, seconds.
    pub duration_s: f64,
    /// Prompt tokens of completed requests.
    pub total_input_tokens: u64,
    /// Generated tokens of completed requests.
    pub total_output_tokens: u64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Generated tokens per second.
    pub output_throughput: f64,
    /// Prompt + generated tokens per second.
    pub total_token_throughput: f64,
    /// Completed requests meeting every SLO, per second.
    pub goodput: f64,
    /// The SLOs of `goodput`.
    pub slo: Slo,
    /// Time to first token (`None`: no sample).
    pub ttft_ms: Option<PctMax>,
    /// Time per output token after the first.
    pub tpot_ms: Option<PctMax>,
    /// Inter-token latency.
    pub itl_ms: Option<PctMax>,
    /// End-to-end latency.
    pub e2e_ms: Option<PctMax>,
    /// Requests and tokens per tenant (key name).
    pub per_tenant: BTreeMap<String, TenantTotals>,
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

/// Statistics of `v` (seconds) in milliseconds.
fn summary_ms(v: &[f64]) -> Option<PctMax> {
    Pct::with_max(&v.iter().map(|x| x * 1e3).collect::<Vec<_>>())
}

async fn one_request(
    client: reqwest::Client,
    url: String,
    key: Option<(String, String)>,
    body: Value,
    chat: bool,
) -> Outcome {
    let tenant = key
        .as_ref()
        .map(|k| k.0.clone())
        .unwrap_or_else(|| "default".into());
    let mut o = Outcome {
        tenant,
        ..Default::default()
    };
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
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if v.get("error").is_some() {
                o.error = Some(data.to_string());
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                o.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                o.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
            }
            let c = &v["choices"][0];
            let text = if chat {
                c["delta"]["content"].as_str()
            } else {
                c["text"].as_str()
            };
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

/// Runs the benchmark on its own tokio runtime and returns the report.
pub fn run_http_bench(opts: HttpBenchOptions) -> Result<HttpBenchReport, HttpBenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(opts))
}

async fn bench(a: HttpBenchOptions) -> Result<HttpBenchReport, HttpBenchError> {
    let base = a.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(a.timeout_s))
        .build()
        .map_err(HttpBenchError::Client)?;
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
            let v: Value = req
                .send()
                .await
                .map_err(HttpBenchError::Models)?
                .json()
                .await
                .map_err(HttpBenchError::ModelsBody)?;
            v["data"][0]["id"]
                .as_str()
                .ok_or(HttpBenchError::NoModel)?
                .to_string()
        }
    };
    let chat = a.endpoint == Endpoint::Chat;
    let url = if chat {
        format!("{base}/v1/chat/completions")
    } else {
        format!("{base}/v1/completions")
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let mut rng = SplitMix64::new(a.seed ^ 0x5EED);
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    ];
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(a.num_prompts);
    for i in 0..a.num_prompts {
        if let Some(rate) = a.request_rate.filter(|r| *r > 0.0 && r.is_finite()) {
            tokio::time::sleep(Duration::from_secs_f64(poisson_gap_s(&mut rng, rate))).await;
        }
        let mut prompt = format!("Request {i}:");
        for _ in 0..a.input_len.saturating_sub(4) {
            prompt.push(' ');
            prompt.push_str(words[(rng.next_u64() % words.len() as u64) as usize]);
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
        let key = if keys.is_empty() {
            None
        } else {
            keys.get(i % keys.len()).cloned()
        };
        // The semaphore is never closed.
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
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
    let ok: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.error.is_none() && o.status == Some(200))
        .collect();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for o in outcomes
        .iter()
        .filter(|o| o.error.is_some() || o.status != Some(200))
    {
        *errors
            .entry(o.status.map_or("connection".to_string(), |s| s.to_string()))
            .or_default() += 1;
    }
    let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft_s).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|o| o.itl_s.iter().copied()).collect();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|o| o.output_tokens > 1)
        .filter_map(|o| {
            o.ttft_s
                .map(|t| (o.e2e_s - t) / (o.output_tokens - 1) as f64)
        })
        .collect();
    let e2e: Vec<f64> = ok.iter().map(|o| o.e2e_s).collect();
    let good = ok
        .iter()
        .filter(|o| {
            let tp = if o.output_tokens > 1 {
                o.ttft_s
                    .map(|t| (o.e2e_s - t) / (o.output_tokens - 1) as f64)
            } else {
                Some(0.0)
            };
            a.slo_ttft_ms
                .is_none_or(|s| o.ttft_s.is_some_and(|t| t * 1e3 <= s))
                && a.slo_tpot_ms
                    .is_none_or(|s| tp.is_some_and(|t| t * 1e3 <= s))
                && a.slo_e2e_ms.is_none_or(|s| o.e2e_s * 1e3 <= s)
        })
        .count();
    let input: u64 = ok.iter().map(|o| o.prompt_tokens).sum();
    let output: u64 = ok.iter().map(|o| o.output_tokens).sum();
    let mut per_tenant: BTreeMap<String, TenantTotals> = BTreeMap::new();
    for o in &outcomes {
        let e = per_tenant.entry(o.tenant.clone()).or_default();
        if o.error.is_none() && o.status == Some(200) {
            e.completed += 1;
        } else {
            e.failed += 1;
        }
        e.prompt_tokens += o.prompt_tokens;
        e.output_tokens += o.output_tokens;
    }
    Ok(HttpBenchReport {
        url: base,
        endpoint: a.endpoint,
        model,
        num_prompts: a.num_prompts,
        concurrency: a.concurrency,
        request_rate: a.request_rate,
        completed: ok.len(),
        failed: outcomes.len() - ok.len(),
        errors_by_status: errors,
        duration_s: duration,
        total_input_tokens: input,
        total_output_tokens: output,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: output as f64 / duration,
        total_token_throughput: (input + output) as f64 / duration,
        goodput: good as f64 / duration,
        slo: Slo {
            ttft_ms: a.slo_ttft_ms,
            tpot_ms: a.slo_tpot_ms,
            e2e_ms: a.slo_e2e_ms,
        },
        ttft_ms: summary_ms(&ttft),
        tpot_ms: summary_ms(&tpot),
        itl_ms: summary_ms(&itl),
        e2e_ms: summary_ms(&e2e),
        per_tenant,
    })
}
