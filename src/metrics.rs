//! THE Prometheus registry: every metric's name, help, labels and buckets are
//! defined here, and updated only through the methods below.
//!
//! Names follow vLLM's (`vllm:` → `brigade:`; `server.metrics_prefix = "vllm"`
//! or `--metrics-prefix vllm` publishes them as `vllm:…`, so existing
//! dashboards, HPA rules and benchmark tools read them unchanged); labels are `model_name` and `tenant` (tenants come from
//! the config, so the label set is bounded). Engine-wide series are refreshed
//! from [`EngineStats`] at scrape time ([`Metrics::refresh_engine`]); request
//! series are updated by the server as events stream.
//!
//! Brigade-only series: `brigade:worker_busy_seconds_total{worker}`,
//! `brigade:pipeline_bubble_ratio`, `brigade:channel_occupancy{channel}`,
//! `brigade:tenant_virtual_counter{tenant}`, `brigade:tenant_queue_depth{tenant}`,
//! `brigade:tenant_requests_in_flight{tenant}`, `brigade:request_errors_total{error_type}`,
//! `brigade:guided_decoding_mask_seconds` (per-token allowed-token mask time of
//! constrained completions; process-wide, observed by the sampler through
//! [`observe_guided_mask`]; `vllm:…` under that prefix),
//! `brigade:spec_decode_tokens_per_step` and
//! `brigade:spec_decode_row_cost_ratio` (n-gram speculative decoding; with
//! vLLM's `spec_decode_num_drafts_total`, `…_num_draft_tokens_total` and
//! `…_num_accepted_tokens_total`).
//!
//! vLLM's rows also published: `request_inference_time_seconds`,
//! `iteration_tokens_total` (from the engine's per-step bucket counts),
//! `request_params_n`, `request_params_max_tokens`, `cache_config_info`; and,
//! unprefixed as the Prometheus client libraries and vLLM's HTTP
//! instrumentation name them, `process_*` (CPU seconds, resident and virtual
//! memory, file descriptors, threads, start time; read from `/proc/self`) and
//! `http_requests_total{handler,method,status}` / `http_request_duration_seconds`.

use std::sync::{LazyLock, Mutex};

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::engine::EngineStats;

/// Errors building the registry (a name or label set is invalid: a bug).
pub type MetricsError = prometheus::Error;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];
const N_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];

const MASK_BUCKETS: &[f64] = &[
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
];

/// The metric-name prefixes a registry can publish under.
const PREFIXES: [&str; 2] = ["brigade", "vllm"];

/// Per-token mask time of constrained completions, one series per prefix of
/// [`PREFIXES`] (the sampler observes it outside any request; every registry
/// shows the series of its own prefix).
static GUIDED_MASK: LazyLock<Vec<Option<Histogram>>> = LazyLock::new(|| {
    PREFIXES
        .iter()
        .map(|p| {
            let name = format!("{p}:guided_decoding_mask_seconds");
            Histogram::with_opts(hist(
                &name,
                "Time to compute one constrained token's allowed-token mask.",
                MASK_BUCKETS,
            ))
            .ok()
        })
        .collect()
});

/// Records one allowed-token mask computation of `seconds`.
pub fn observe_guided_mask(seconds: f64) {
    for h in GUIDED_MASK.iter().flatten() {
        h.observe(seconds);
    }
}

/// All metric handles.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    model_name: String,
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    kv_usage: GaugeVec,
    prefix_queries: IntCounterVec,
    prefix_hits: IntCounterVec,
    preemptions: IntCounterVec,
    steps: IntCounterVec,
    worker_busy: prometheus::CounterVec,
    bubble: Gauge,
    channel_occupancy: IntGaugeVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    request_success: IntCounterVec,
    request_errors: IntCounterVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    tpot: HistogramVec,
    e2e: HistogramVec,
    queue_time: HistogramVec,
    prefill_time: HistogramVec,
    decode_time: HistogramVec,
    request_prompt_tokens: HistogramVec,
    request_generation_tokens: HistogramVec,
    tenant_counter: GaugeVec,
    tenant_queue: IntGaugeVec,
    tenant_in_flight: IntGaugeVec,
    inference_time: HistogramVec,
    params_n: HistogramVec,
    params_max_tokens: HistogramVec,
    cache_config: GaugeVec,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    process: ProcessMetrics,
    prefix: String,
    last: Mutex<EngineStats>,
    spec: SpecMetrics,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

/// The KV-cache configuration published as `cache_config_info`.
#[derive(Clone, Debug, Default)]
pub struct CacheConfigInfo {
    /// Tokens per block.
    pub block_size: usize,
    /// Element type of stored K/V (`f16`, ...).
    pub dtype: String,
    /// Prefix caching on.
    pub prefix_caching: bool,
    /// Blocks in the pool (vLLM's `num_gpu_blocks` label).
    pub num_blocks: usize,
    /// Tokens the pool holds.
    pub num_tokens: usize,
}

/// The standard `process_*` series of the Prometheus client libraries, read
/// from `/proc/self` at scrape time (Linux; elsewhere they stay 0).
#[derive(Debug)]
struct ProcessMetrics {
    cpu: prometheus::Counter,
    rss: Gauge,
    vsize: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
    threads: Gauge,
}

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`: 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

impl ProcessMetrics {
    fn register(r: &Registry) -> Result<Self, MetricsError> {
        let counter = |name: &str, help: &str| -> Result<prometheus::Counter, MetricsError> {
            let c = prometheus::Counter::with_opts(opts(name, help))?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<Gauge, MetricsError> {
            let g = Gauge::with_opts(opts(name, help))?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            cpu: counter(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            )?,
            rss: gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            )?,
            vsize: gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            )?,
            open_fds: gauge("process_open_fds", "Number of open file descriptors.")?,
            max_fds: gauge(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            )?,
            start_time: gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            )?,
            threads: gauge("process_threads", "Number of OS threads in the process.")?,
        })
    }

    /// Reads `/proc/self` (missing files leave the values as they were).
    fn refresh(&self) {
        let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| ProcStat::parse(&s))
        else {
            return;
        };
        let cpu_s = (stat.utime + stat.stime) as f64 / USER_HZ;
        let delta = cpu_s - self.cpu.get();
        if delta > 0.0 {
            self.cpu.inc_by(delta);
        }
        self.vsize.set(stat.vsize as f64);
        self.threads.set(stat.num_threads as f64);
        if let Some(kb) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| status_kb(&s, "VmRSS:"))
        {
            self.rss.set((kb * 1024) as f64);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as f64);
        }
        if let Some(max) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| max_open_files(&s))
        {
            self.max_fds.set(max as f64);
        }
        if let Some(btime) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s))
        {
            self.start_time
                .set(btime as f64 + stat.starttime as f64 / USER_HZ);
        }
    }
}

/// The fields of `/proc/self/stat` the process series use.
#[derive(Debug, PartialEq)]
struct ProcStat {
    utime: u64,
    stime: u64,
    num_threads: u64,
    starttime: u64,
    vsize: u64,
}

impl ProcStat {
    /// Parses `pid (comm) state ppid ...` (`comm` may hold spaces and parentheses).
    fn parse(s: &str) -> Option<Self> {
        let rest = &s[s.rfind(')')? + 1..];
        // After `)`: field 3 (state) is index 0, so field k is index k - 3.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let at = |k: usize| f.get(k - 3).and_then(|v| v.parse::<u64>().ok());
        Some(Self {
            utime: at(14)?,
            stime: at(15)?,
            num_threads: at(20)?,
            starttime: at(22)?,
            vsize: at(23)?,
        })
    }
}

/// A `Key:   N kB` line of `/proc/self/status`.
fn status_kb(s: &str, key: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn max_open_files(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `btime` (boot time, unix seconds) of `/proc/stat`.
fn boot_time(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Timings of one finished completion, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestTimes {
    /// Arrival → first admitted by the engine (fair queue + engine queue).
    pub queue_s: f64,
    /// Admitted → first token.
    pub prefill_s: f64,
    /// First token → finish.
    pub decode_s: f64,
    /// Arrival → first token.
    pub ttft_s: f64,
    /// Arrival → finish.
    pub e2e_s: f64,
}

impl Metrics {
    /// Registers every series for `model_name`.
    pub fn new(model_name: &str) -> Result<Self, MetricsError> {
        Self::with_prefix(model_name, "brigade")
    }

    /// Registers every series for `model_name`, engine and request series named
    /// `{prefix}:…` (`brigade`, or `vllm` for vLLM's dashboards).
    pub fn with_prefix(model_name: &str, prefix: &str) -> Result<Self, MetricsError> {
        let r = Registry::new();
        let n = |name: &str| format!("{prefix}:{name}");
        let m = &["model_name"];
        let mt = &["model_name", "tenant"];
        macro_rules! reg {
            ($e:expr) => {{
                let v = $e?;
                r.register(Box::new(v.clone()))?;
                v
            }};
        }
        let s = Self {
            running: reg!(IntGaugeVec::new(opts(&n("num_requests_running"), "Sequences running in the engine (holding KV blocks)."), m)),
            waiting: reg!(IntGaugeVec::new(opts(&n("num_requests_waiting"), "Requests waiting: in the fair queue plus in the engine's waiting queue."), m)),
            kv_usage: reg!(GaugeVec::new(opts(&n("kv_cache_usage_perc"), "Fraction of KV-cache blocks in use (1 = full)."), m)),
            prefix_queries: reg!(IntCounterVec::new(opts(&n("prefix_cache_queries_total"), "Prompt tokens looked up in the prefix cache."), m)),
            prefix_hits: reg!(IntCounterVec::new(opts(&n("prefix_cache_hits_total"), "Prompt tokens found in the prefix cache."), m)),
            preemptions: reg!(IntCounterVec::new(opts(&n("num_preemptions_total"), "Sequences preempted (recomputed later) for lack of KV blocks."), m)),
            steps: reg!(IntCounterVec::new(opts(&n("engine_steps_total"), "Micro-batches run by the engine."), m)),
            worker_busy: reg!(prometheus::CounterVec::new(opts(&n("worker_busy_seconds_total"), "Seconds each layer-group worker spent computing."), &["model_name", "worker"])),
            bubble: reg!(Gauge::with_opts(opts(&n("pipeline_bubble_ratio"), "Idle share of the pipeline between the last two scrapes: 1 - sum(busy_k) / (workers * max_k busy_k)."))),
            channel_occupancy: reg!(IntGaugeVec::new(opts(&n("channel_occupancy"), "Messages waiting in a bounded channel."), &["channel"])),
            prompt_tokens: reg!(IntCounterVec::new(opts(&n("prompt_tokens_total"), "Prompt tokens processed."), mt)),
            generation_tokens: reg!(IntCounterVec::new(opts(&n("generation_tokens_total"), "Tokens generated."), mt)),
            request_success: reg!(IntCounterVec::new(opts(&n("request_success_total"), "Completions finished, by finish reason."), &["model_name", "tenant", "finished_reason"])),
            request_errors: reg!(IntCounterVec::new(opts(&n("request_errors_total"), "API requests answered with an error, by error type."), &["model_name", "error_type"])),
            ttft: reg!(HistogramVec::new(hist(&n("time_to_first_token_seconds"), "Arrival to first token.", LATENCY_BUCKETS), mt)),
            itl: reg!(HistogramVec::new(hist(&n("inter_token_latency_seconds"), "Time between consecutive tokens of a completion.", ITL_BUCKETS), mt)),
            tpot: reg!(HistogramVec::new(hist(&n("time_per_output_token_seconds"), "Mean time per output token after the first, per completion.", ITL_BUCKETS), mt)),
            e2e: reg!(HistogramVec::new(hist(&n("e2e_request_latency_seconds"), "Arrival to finish.", LATENCY_BUCKETS), mt)),
            queue_time: reg!(HistogramVec::new(hist(&n("request_queue_time_seconds"), "Arrival to first scheduled (fair queue + engine queue).", LATENCY_BUCKETS), mt)),
            prefill_time: reg!(HistogramVec::new(hist(&n("request_prefill_time_seconds"), "First scheduled to first token.", LATENCY_BUCKETS), mt)),
            decode_time: reg!(HistogramVec::new(hist(&n("request_decode_time_seconds"), "First token to finish.", LATENCY_BUCKETS), mt)),
            request_prompt_tokens: reg!(HistogramVec::new(hist(&n("request_prompt_tokens"), "Prompt tokens per request.", TOKEN_BUCKETS), mt)),
            request_generation_tokens: reg!(HistogramVec::new(hist(&n("request_generation_tokens"), "Generated tokens per completion.", TOKEN_BUCKETS), mt)),
            tenant_counter: reg!(GaugeVec::new(opts(&n("tenant_virtual_counter"), "Virtual Token Counter of each tenant (weighted tokens served)."), &["tenant"])),
            tenant_queue: reg!(IntGaugeVec::new(opts(&n("tenant_queue_depth"), "Requests of each tenant waiting in the fair queue."), &["tenant"])),
            tenant_in_flight: reg!(IntGaugeVec::new(opts(&n("tenant_requests_in_flight"), "Sequences of each tenant admitted into the engine."), &["tenant"])),
            inference_time: reg!(HistogramVec::new(hist(&n("request_inference_time_seconds"), "First scheduled to finish (prefill + decode).", LATENCY_BUCKETS), mt)),
            params_n: reg!(HistogramVec::new(hist(&n("request_params_n"), "The `n` parameter of each request.", N_BUCKETS), mt)),
            params_max_tokens: reg!(HistogramVec::new(hist(&n("request_params_max_tokens"), "The `max_tokens` parameter of each request (after defaults).", TOKEN_BUCKETS), mt)),
            cache_config: reg!(GaugeVec::new(
                opts(&n("cache_config_info"), "KV-cache configuration (value 1; the labels carry it)."),
                &["block_size", "cache_dtype", "enable_prefix_caching", "num_gpu_blocks", "num_cpu_blocks", "num_tokens"]
            )),
            http_requests: reg!(IntCounterVec::new(opts("http_requests_total", "HTTP requests answered, by route, method and status class."), &["handler", "method", "status"])),
            http_duration: reg!(HistogramVec::new(hist("http_request_duration_seconds", "Seconds to the HTTP response head, by route and method.", LATENCY_BUCKETS), &["handler", "method"])),
            process: ProcessMetrics::register(&r)?,
            spec: SpecMetrics::register(&r, prefix)?,
            prefix: prefix.to_string(),
            registry: r,
            model_name: model_name.to_string(),
            last: Mutex::new(EngineStats::default()),
        };
        let i = PREFIXES.iter().position(|p| *p == prefix).unwrap_or(0);
        if let Some(Some(h)) = GUIDED_MASK.get(i) {
            s.registry.register(Box::new(h.clone()))?;
        }
        Ok(s)
    }

    /// Refreshes engine-wide series from a stats snapshot (`fair_queued` = requests in the fair queue).
    pub fn refresh_engine(&self, st: &EngineStats, fair_queued: usize) {
        let m = [self.model_name.as_str()];
        self.running.with_label_values(&m).set(st.running as i64);
        self.waiting
            .with_label_values(&m)
            .set((st.waiting + fair_queued) as i64);
        self.kv_usage.with_label_values(&m).set(st.kv_usage);
        for (name, len, _cap) in &st.channels {
            self.set_channel_occupancy(name, *len);
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        self.spec.refresh(&self.model_name, st, &last);
        self.prefix_queries
            .with_label_values(&m)
            .inc_by(st.prefix_queries.saturating_sub(last.prefix_queries));
        self.prefix_hits
            .with_label_values(&m)
            .inc_by(st.prefix_hits.saturating_sub(last.prefix_hits));
        self.preemptions
            .with_label_values(&m)
            .inc_by(st.preemptions.saturating_sub(last.preemptions));
        self.steps
            .with_label_values(&m)
            .inc_by(st.steps.saturating_sub(last.steps));
        let mut deltas = Vec::with_capacity(st.worker_busy_s.len());
        for (k, &b) in st.worker_busy_s.iter().enumerate() {
            let d = (b - last.worker_busy_s.get(k).copied().unwrap_or(0.0)).max(0.0);
            deltas.push(d);
            self.worker_busy
                .with_label_values(&[self.model_name.as_str(), &k.to_string()])
                .inc_by(d);
        }
        let max = deltas.iter().cloned().fold(0.0, f64::max);
        if max > 0.0 {
            let sum: f64 = deltas.iter().sum();
            self.bubble.set(1.0 - sum / (deltas.len() as f64 * max));
        }
        *last = st.clone();
    }

    /// Sets a channel's occupancy.
    pub fn set_channel_occupancy(&self, channel: &str, n: usize) {
        self.channel_occupancy
            .with_label_values(&[channel])
            .set(n as i64);
    }

    /// Publishes a tenant's fair-queue state.
    pub fn set_tenant(&self, tenant: &str, counter: f64, queued: usize, in_flight: usize) {
        self.tenant_counter
            .with_label_values(&[tenant])
            .set(counter);
        self.tenant_queue
            .with_label_values(&[tenant])
            .set(queued as i64);
        self.tenant_in_flight
            .with_label_values(&[tenant])
            .set(in_flight as i64);
    }

    /// A request's prompt was accepted by the engine.
    pub fn on_prompt(&self, tenant: &str, prompt_tokens: usize) {
        let l = [self.model_name.as_str(), tenant];
        self.prompt_tokens
            .with_label_values(&l)
            .inc_by(prompt_tokens as u64);
        self.request_prompt_tokens
            .with_label_values(&l)
            .observe(prompt_tokens as f64);
    }

    /// A token was generated; `since_prev_s` is the gap to the previous token of the same completion.
    pub fn on_token(&self, tenant: &str, since_prev_s: Option<f64>) {
        let l = [self.model_name.as_str(), tenant];
        self.generation_tokens.with_label_values(&l).inc();
        if let Some(d) = since_prev_s {
            self.itl.with_label_values(&l).observe(d);
        }
    }

    /// A completion finished.
    pub fn on_finish(&self, tenant: &str, reason: &str, completion_tokens: usize, t: RequestTimes) {
        let l = [self.model_name.as_str(), tenant];
        self.request_success
            .with_label_values(&[self.model_name.as_str(), tenant, reason])
            .inc();
        self.request_generation_tokens
            .with_label_values(&l)
            .observe(completion_tokens as f64);
        self.e2e.with_label_values(&l).observe(t.e2e_s);
        self.queue_time.with_label_values(&l).observe(t.queue_s);
        self.inference_time
            .with_label_values(&l)
            .observe(t.prefill_s + t.decode_s);
        if completion_tokens > 0 {
            self.ttft.with_label_values(&l).observe(t.ttft_s);
            self.prefill_time.with_label_values(&l).observe(t.prefill_s);
            self.decode_time.with_label_values(&l).observe(t.decode_s);
        }
        if completion_tokens > 1 {
            self.tpot
                .with_label_values(&l)
                .observe(t.decode_s / (completion_tokens - 1) as f64);
        }
    }

    /// A generation request's `n` and `max_tokens` (after defaults), once per HTTP request.
    pub fn on_request_params(&self, tenant: &str, n: usize, max_tokens: usize) {
        let l = [self.model_name.as_str(), tenant];
        self.params_n.with_label_values(&l).observe(n as f64);
        self.params_max_tokens
            .with_label_values(&l)
            .observe(max_tokens as f64);
    }

    /// Publishes the KV-cache configuration (`cache_config_info`, value 1).
    pub fn set_cache_config(&self, c: &CacheConfigInfo) {
        let labels = [
            c.block_size.to_string(),
            c.dtype.clone(),
            c.prefix_caching.to_string(),
            c.num_blocks.to_string(),
            "0".to_string(),
            c.num_tokens.to_string(),
        ];
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.cache_config.with_label_values(&refs).set(1.0);
    }

    /// An HTTP request was answered: `handler` is the matched route template
    /// (`none` for no route), `status` the response status; `secs` to the head.
    pub fn on_http(&self, handler: &str, method: &str, status: u16, secs: f64) {
        // Bounded label sets: known methods, status classes ("2xx").
        let method = match method {
            "GET" | "POST" | "DELETE" | "OPTIONS" | "HEAD" | "PUT" | "PATCH" => method,
            _ => "other",
        };
        let class = match status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        self.http_requests
            .with_label_values(&[handler, method, class])
            .inc();
        self.http_duration
            .with_label_values(&[handler, method])
            .observe(secs);
    }

    /// The metric name prefix in force (`brigade` or `vllm`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// An API request was answered with an error of `error_type`.
    pub fn on_error(&self, error_type: &str) {
        self.request_errors
            .with_label_values(&[self.model_name.as_str(), error_type])
            .inc();
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        self.process.refresh();
        let mut families = self.registry.gather();
        if let Ok(last) = self.last.lock() {
            families.push(self.iteration_tokens_family(&last));
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }

    /// `{prefix}:iteration_tokens_total`: a histogram of the tokens (prefill +
    /// decode) of each engine micro-batch, built from the engine's own bucket
    /// counts ([`EngineStats::iteration_tokens`]; the engine observes every step).
    fn iteration_tokens_family(&self, st: &EngineStats) -> prometheus::proto::MetricFamily {
        use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
        let mut h = Histogram::default();
        let mut cumulative = 0u64;
        let buckets = crate::engine::ITERATION_TOKEN_BUCKETS
            .iter()
            .enumerate()
            .map(|(i, &ub)| {
                cumulative += st.iteration_tokens.counts.get(i).copied().unwrap_or(0);
                let mut b = Bucket::default();
                b.set_upper_bound(ub as f64);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        h.set_bucket(buckets);
        h.set_sample_count(st.iteration_tokens.count);
        h.set_sample_sum(st.iteration_tokens.sum as f64);
        let mut label = LabelPair::default();
        label.set_name("model_name".into());
        label.set_value(self.model_name.clone());
        let mut m = Metric::default();
        m.set_label(vec![label]);
        m.set_histogram(h);
        let mut f = MetricFamily::default();
        f.set_name(format!("{}:iteration_tokens_total", self.prefix));
        f.set_help("Tokens (prefill + decode) per engine micro-batch.".into());
        f.set_field_type(MetricType::HISTOGRAM);
        f.set_metric(vec![m]);
        f
    }
}

/// Speculative decoding series (vLLM's `spec_decode_*` names): verify
/// steps, draft and accepted tokens (counters; acceptance rate = accepted /
/// draft), and the mean tokens a verify step yields (gauge, `1 + accepted /
/// steps`: every verify step also samples one token of its own).
#[derive(Debug)]
struct SpecMetrics {
    drafts: IntCounterVec,
    draft_tokens: IntCounterVec,
    accepted_tokens: IntCounterVec,
    tokens_per_step: GaugeVec,
    row_cost_ratio: GaugeVec,
}

impl SpecMetrics {
    fn register(r: &Registry, prefix: &str) -> Result<Self, MetricsError> {
        let n = |name: &str| format!("{prefix}:{name}");
        let m = &["model_name"];
        let counter = |name: &str, help: &str| -> Result<IntCounterVec, MetricsError> {
            let c = IntCounterVec::new(opts(&n(name), help), m)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let g = GaugeVec::new(
            opts(
                &n("spec_decode_tokens_per_step"),
                "Mean tokens per speculative verify step (accepted drafts + 1).",
            ),
            m,
        )?;
        r.register(Box::new(g.clone()))?;
        let ratio = GaugeVec::new(
            opts(
                &n("spec_decode_row_cost_ratio"),
                "Measured cost of one more decode-step row over the step's fixed cost (prices draft tokens).",
            ),
            m,
        )?;
        r.register(Box::new(ratio.clone()))?;
        Ok(Self {
            row_cost_ratio: ratio,
            drafts: counter(
                "spec_decode_num_drafts_total",
                "Speculative verify steps (decode steps that carried n-gram drafts).",
            )?,
            draft_tokens: counter(
                "spec_decode_num_draft_tokens_total",
                "Draft tokens proposed by n-gram speculation.",
            )?,
            accepted_tokens: counter(
                "spec_decode_num_accepted_tokens_total",
                "Draft tokens accepted by verification.",
            )?,
            tokens_per_step: g,
        })
    }

    fn refresh(&self, model_name: &str, st: &EngineStats, last: &EngineStats) {
        let m = [model_name];
        self.drafts
            .with_label_values(&m)
            .inc_by(st.spec_steps.saturating_sub(last.spec_steps));
        self.draft_tokens
            .with_label_values(&m)
            .inc_by(st.spec_draft_tokens.saturating_sub(last.spec_draft_tokens));
        self.accepted_tokens.with_label_values(&m).inc_by(
            st.spec_accepted_tokens
                .saturating_sub(last.spec_accepted_tokens),
        );
        if st.spec_row_cost_ratio > 0.0 {
            self.row_cost_ratio
                .with_label_values(&m)
                .set(st.spec_row_cost_ratio);
        }
        if st.spec_steps > 0 {
            self.tokens_per_step
                .with_label_values(&m)
                .set(1.0 + st.spec_accepted_tokens as f64 / st.spec_steps as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_render() {
        let m = Metrics::new("tiny").unwrap();
        m.on_prompt("a", 5);
        m.on_token("a", Some(0.01));
        m.on_finish(
            "a",
            "stop",
            3,
            RequestTimes {
                e2e_s: 0.5,
                ..Default::default()
            },
        );
        let st = EngineStats {
            running: 2,
            worker_busy_s: vec![1.0, 0.5],
            prefix_queries: 10,
            ..Default::default()
        };
        m.refresh_engine(&st, 3);
        let text = m.render();
        assert!(
            text.contains("brigade:num_requests_waiting{model_name=\"tiny\"} 3"),
            "{text}"
        );
        assert!(text.contains("brigade:request_success_total{finished_reason=\"stop\",model_name=\"tiny\",tenant=\"a\"} 1"), "{text}");
        assert!(
            text.contains("brigade:pipeline_bubble_ratio 0.25"),
            "{text}"
        );
        observe_guided_mask(2e-4);
        assert!(
            m.render()
                .contains("brigade:guided_decoding_mask_seconds_bucket{le=\"0.00025\"}"),
            "{}",
            m.render()
        );
    }

    #[test]
    fn proc_files_parse() {
        // `comm` may hold spaces and parentheses; fields are counted after the last `)`.
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 987654321 2000 18446744073709551615";
        assert_eq!(
            ProcStat::parse(stat),
            Some(ProcStat {
                utime: 250,
                stime: 50,
                num_threads: 7,
                starttime: 12345,
                vsize: 987654321
            })
        );
        assert_eq!(ProcStat::parse("garbage"), None);
        assert_eq!(
            status_kb("Name:\tx\nVmRSS:\t  1234 kB\nVmSwap: 0 kB\n", "VmRSS:"),
            Some(1234)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn vllm_rows_render_under_either_prefix() {
        for prefix in ["brigade", "vllm"] {
            let m = Metrics::with_prefix("tiny", prefix).unwrap();
            let mut it = crate::engine::IterationTokens::default();
            for n in [1, 5, 8, 300, 100_000] {
                it.observe(n);
            }
            let st = EngineStats {
                iteration_tokens: it,
                ..Default::default()
            };
            m.refresh_engine(&st, 0);
            m.on_request_params("a", 2, 16);
            m.on_finish(
                "a",
                "stop",
                3,
                RequestTimes {
                    prefill_s: 0.25,
                    decode_s: 0.5,
                    ..Default::default()
                },
            );
            m.set_cache_config(&CacheConfigInfo {
                block_size: 16,
                dtype: "f16".into(),
                prefix_caching: true,
                num_blocks: 4,
                num_tokens: 64,
            });
            m.on_http("/v1/responses/{id}", "GET", 404, 0.001);
            m.on_http("none", "BREW", 405, 0.001);
            let text = m.render();
            let p = |s: &str| format!("{prefix}:{s}");
            // Buckets are cumulative: <=1: 1, <=8: 3, <=512: 4, +Inf: 5.
            assert!(
                text.contains(&format!(
                    "{}{{model_name=\"tiny\",le=\"1\"}} 1",
                    p("iteration_tokens_total_bucket")
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "{}{{model_name=\"tiny\",le=\"8\"}} 3",
                    p("iteration_tokens_total_bucket")
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "{}{{model_name=\"tiny\",le=\"512\"}} 4",
                    p("iteration_tokens_total_bucket")
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "{}{{model_name=\"tiny\",le=\"+Inf\"}} 5",
                    p("iteration_tokens_total_bucket")
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "{}{{model_name=\"tiny\"}} 100314",
                    p("iteration_tokens_total_sum")
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "{}{{model_name=\"tiny\",tenant=\"a\"}} 0.75",
                    p("request_inference_time_seconds_sum")
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "{}{{model_name=\"tiny\",tenant=\"a\"}} 2",
                    p("request_params_n_sum")
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "{}{{model_name=\"tiny\",tenant=\"a\"}} 16",
                    p("request_params_max_tokens_sum")
                )),
                "{text}"
            );
            assert!(text.contains("block_size=\"16\",cache_dtype=\"f16\",enable_prefix_caching=\"true\",num_cpu_blocks=\"0\",num_gpu_blocks=\"4\",num_tokens=\"64\"} 1"), "{text}");
            assert!(text.contains("http_requests_total{handler=\"/v1/responses/{id}\",method=\"GET\",status=\"4xx\"} 1"), "{text}");
            assert!(
                text.contains(
                    "http_requests_total{handler=\"none\",method=\"other\",status=\"4xx\"} 1"
                ),
                "{text}"
            );
            let other = if prefix == "vllm" {
                "brigade:"
            } else {
                "vllm:"
            };
            assert!(!text.contains(other), "{text}");
        }
    }

    #[test]
    fn speculative_series_follow_the_engine_counters() {
        let m = Metrics::new("tiny").unwrap();
        m.refresh_engine(
            &EngineStats {
                spec_steps: 10,
                spec_draft_tokens: 40,
                spec_accepted_tokens: 25,
                ..Default::default()
            },
            0,
        );
        m.refresh_engine(
            &EngineStats {
                spec_steps: 20,
                spec_draft_tokens: 80,
                spec_accepted_tokens: 30,
                spec_row_cost_ratio: 0.3,
                ..Default::default()
            },
            0,
        );
        let text = m.render();
        assert!(
            text.contains("brigade:spec_decode_num_drafts_total{model_name=\"tiny\"} 20"),
            "{text}"
        );
        assert!(
            text.contains("brigade:spec_decode_num_draft_tokens_total{model_name=\"tiny\"} 80"),
            "{text}"
        );
        assert!(
            text.contains("brigade:spec_decode_num_accepted_tokens_total{model_name=\"tiny\"} 30"),
            "{text}"
        );
        assert!(
            text.contains("brigade:spec_decode_row_cost_ratio{model_name=\"tiny\"} 0.3"),
            "{text}"
        );
        assert!(
            text.contains("brigade:spec_decode_tokens_per_step{model_name=\"tiny\"} 2.5"),
            "{text}"
        );
    }
}
