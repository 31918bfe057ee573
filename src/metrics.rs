//! THE Prometheus registry: every metric's name, help, labels and buckets are
//! defined here, and updated only through the methods below.
//!
//! Names follow vLLM's (`vllm:` → `brigade:`) so existing dashboards and
//! autoscalers work; labels are `model_name` and `tenant` (tenants come from
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
//! [`observe_guided_mask`]).

use std::sync::{LazyLock, Mutex};

use prometheus::{Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::engine::EngineStats;

/// Errors building the registry (a name or label set is invalid: a bug).
pub type MetricsError = prometheus::Error;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
];
const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0];
const TOKEN_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];

const MASK_BUCKETS: &[f64] = &[1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0];

/// Per-token mask time of constrained completions (the sampler observes it
/// outside any request; every registry shows the same series).
static GUIDED_MASK: LazyLock<Option<Histogram>> = LazyLock::new(|| {
    Histogram::with_opts(hist("brigade:guided_decoding_mask_seconds", "Time to compute one constrained token's allowed-token mask.", MASK_BUCKETS))
        .ok()
});

/// Records one allowed-token mask computation of `seconds`.
pub fn observe_guided_mask(seconds: f64) {
    if let Some(h) = GUIDED_MASK.as_ref() {
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
    last: Mutex<EngineStats>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
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
        let r = Registry::new();
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
            running: reg!(IntGaugeVec::new(opts("brigade:num_requests_running", "Sequences running in the engine (holding KV blocks)."), m)),
            waiting: reg!(IntGaugeVec::new(opts("brigade:num_requests_waiting", "Requests waiting: in the fair queue plus in the engine's waiting queue."), m)),
            kv_usage: reg!(GaugeVec::new(opts("brigade:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)."), m)),
            prefix_queries: reg!(IntCounterVec::new(opts("brigade:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."), m)),
            prefix_hits: reg!(IntCounterVec::new(opts("brigade:prefix_cache_hits_total", "Prompt tokens found in the prefix cache."), m)),
            preemptions: reg!(IntCounterVec::new(opts("brigade:num_preemptions_total", "Sequences preempted (recomputed later) for lack of KV blocks."), m)),
            steps: reg!(IntCounterVec::new(opts("brigade:engine_steps_total", "Micro-batches run by the engine."), m)),
            worker_busy: reg!(prometheus::CounterVec::new(opts("brigade:worker_busy_seconds_total", "Seconds each layer-group worker spent computing."), &["model_name", "worker"])),
            bubble: reg!(Gauge::with_opts(opts("brigade:pipeline_bubble_ratio", "Idle share of the pipeline between the last two scrapes: 1 - sum(busy_k) / (workers * max_k busy_k)."))),
            channel_occupancy: reg!(IntGaugeVec::new(opts("brigade:channel_occupancy", "Messages waiting in a bounded channel."), &["channel"])),
            prompt_tokens: reg!(IntCounterVec::new(opts("brigade:prompt_tokens_total", "Prompt tokens processed."), mt)),
            generation_tokens: reg!(IntCounterVec::new(opts("brigade:generation_tokens_total", "Tokens generated."), mt)),
            request_success: reg!(IntCounterVec::new(opts("brigade:request_success_total", "Completions finished, by finish reason."), &["model_name", "tenant", "finished_reason"])),
            request_errors: reg!(IntCounterVec::new(opts("brigade:request_errors_total", "API requests answered with an error, by error type."), &["model_name", "error_type"])),
            ttft: reg!(HistogramVec::new(hist("brigade:time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS), mt)),
            itl: reg!(HistogramVec::new(hist("brigade:inter_token_latency_seconds", "Time between consecutive tokens of a completion.", ITL_BUCKETS), mt)),
            tpot: reg!(HistogramVec::new(hist("brigade:time_per_output_token_seconds", "Mean time per output token after the first, per completion.", ITL_BUCKETS), mt)),
            e2e: reg!(HistogramVec::new(hist("brigade:e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS), mt)),
            queue_time: reg!(HistogramVec::new(hist("brigade:request_queue_time_seconds", "Arrival to first scheduled (fair queue + engine queue).", LATENCY_BUCKETS), mt)),
            prefill_time: reg!(HistogramVec::new(hist("brigade:request_prefill_time_seconds", "First scheduled to first token.", LATENCY_BUCKETS), mt)),
            decode_time: reg!(HistogramVec::new(hist("brigade:request_decode_time_seconds", "First token to finish.", LATENCY_BUCKETS), mt)),
            request_prompt_tokens: reg!(HistogramVec::new(hist("brigade:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS), mt)),
            request_generation_tokens: reg!(HistogramVec::new(hist("brigade:request_generation_tokens", "Generated tokens per completion.", TOKEN_BUCKETS), mt)),
            tenant_counter: reg!(GaugeVec::new(opts("brigade:tenant_virtual_counter", "Virtual Token Counter of each tenant (weighted tokens served)."), &["tenant"])),
            tenant_queue: reg!(IntGaugeVec::new(opts("brigade:tenant_queue_depth", "Requests of each tenant waiting in the fair queue."), &["tenant"])),
            tenant_in_flight: reg!(IntGaugeVec::new(opts("brigade:tenant_requests_in_flight", "Sequences of each tenant admitted into the engine."), &["tenant"])),
            registry: r,
            model_name: model_name.to_string(),
            last: Mutex::new(EngineStats::default()),
        };
        if let Some(h) = GUIDED_MASK.as_ref() {
            s.registry.register(Box::new(h.clone()))?;
        }
        Ok(s)
    }

    /// Refreshes engine-wide series from a stats snapshot (`fair_queued` = requests in the fair queue).
    pub fn refresh_engine(&self, st: &EngineStats, fair_queued: usize) {
        let m = [self.model_name.as_str()];
        self.running.with_label_values(&m).set(st.running as i64);
        self.waiting.with_label_values(&m).set((st.waiting + fair_queued) as i64);
        self.kv_usage.with_label_values(&m).set(st.kv_usage);
        for (name, len, _cap) in &st.channels {
            self.set_channel_occupancy(name, *len);
        }
        let Ok(mut last) = self.last.lock() else { return };
        self.prefix_queries.with_label_values(&m).inc_by(st.prefix_queries.saturating_sub(last.prefix_queries));
        self.prefix_hits.with_label_values(&m).inc_by(st.prefix_hits.saturating_sub(last.prefix_hits));
        self.preemptions.with_label_values(&m).inc_by(st.preemptions.saturating_sub(last.preemptions));
        self.steps.with_label_values(&m).inc_by(st.steps.saturating_sub(last.steps));
        let mut deltas = Vec::with_capacity(st.worker_busy_s.len());
        for (k, &b) in st.worker_busy_s.iter().enumerate() {
            let d = (b - last.worker_busy_s.get(k).copied().unwrap_or(0.0)).max(0.0);
            deltas.push(d);
            self.worker_busy.with_label_values(&[self.model_name.as_str(), &k.to_string()]).inc_by(d);
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
        self.channel_occupancy.with_label_values(&[channel]).set(n as i64);
    }

    /// Publishes a tenant's fair-queue state.
    pub fn set_tenant(&self, tenant: &str, counter: f64, queued: usize, in_flight: usize) {
        self.tenant_counter.with_label_values(&[tenant]).set(counter);
        self.tenant_queue.with_label_values(&[tenant]).set(queued as i64);
        self.tenant_in_flight.with_label_values(&[tenant]).set(in_flight as i64);
    }

    /// A request's prompt was accepted by the engine.
    pub fn on_prompt(&self, tenant: &str, prompt_tokens: usize) {
        let l = [self.model_name.as_str(), tenant];
        self.prompt_tokens.with_label_values(&l).inc_by(prompt_tokens as u64);
        self.request_prompt_tokens.with_label_values(&l).observe(prompt_tokens as f64);
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
        self.request_success.with_label_values(&[self.model_name.as_str(), tenant, reason]).inc();
        self.request_generation_tokens.with_label_values(&l).observe(completion_tokens as f64);
        self.e2e.with_label_values(&l).observe(t.e2e_s);
        self.queue_time.with_label_values(&l).observe(t.queue_s);
        if completion_tokens > 0 {
            self.ttft.with_label_values(&l).observe(t.ttft_s);
            self.prefill_time.with_label_values(&l).observe(t.prefill_s);
            self.decode_time.with_label_values(&l).observe(t.decode_s);
        }
        if completion_tokens > 1 {
            self.tpot.with_label_values(&l).observe(t.decode_s / (completion_tokens - 1) as f64);
        }
    }

    /// An API request was answered with an error of `error_type`.
    pub fn on_error(&self, error_type: &str) {
        self.request_errors.with_label_values(&[self.model_name.as_str(), error_type]).inc();
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
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
        m.on_finish("a", "stop", 3, RequestTimes { e2e_s: 0.5, ..Default::default() });
        let st = EngineStats { running: 2, worker_busy_s: vec![1.0, 0.5], prefix_queries: 10, ..Default::default() };
        m.refresh_engine(&st, 3);
        let text = m.render();
        assert!(text.contains("brigade:num_requests_waiting{model_name=\"tiny\"} 3"), "{text}");
        assert!(text.contains("brigade:request_success_total{finished_reason=\"stop\",model_name=\"tiny\",tenant=\"a\"} 1"), "{text}");
        assert!(text.contains("brigade:pipeline_bubble_ratio 0.25"), "{text}");
        observe_guided_mask(2e-4);
        assert!(m.render().contains("brigade:guided_decoding_mask_seconds_bucket{le=\"0.00025\"}"), "{}", m.render());
    }
}
