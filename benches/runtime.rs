//! Criterion benches of the runtime's pure parts: one scheduler step (form a
//! micro-batch of 64 decoding sequences and apply its result) and sampling a
//! batch of 64 rows over a 49152-token vocabulary.
//!
//! `cargo bench --bench runtime`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use brigade::engine::scheduler::{Scheduler, SchedulerConfig, Sequence, Status};
use brigade::engine::SamplingParams;
use brigade::sampling::{sample, RowParams};

fn seq(id: u64, prompt_len: usize) -> Sequence {
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 31 + id as u32) % 49152)
        .collect();
    Sequence {
        id,
        request_id: id,
        index: 0,
        tokens: prompt.clone(),
        num_prompt: prompt_len,
        num_computed: 0,
        num_cached: 0,
        in_flight: false,
        status: Status::Waiting,
        arrival: id,
        priority: 0,
        background: false,
        params: Arc::new(SamplingParams {
            max_tokens: 1_000_000,
            ..SamplingParams::greedy(1_000_000)
        }),
        seed: id,
        max_len: 1 << 20,
        cancelled: false,
        preemptions: 0,
        eog: Arc::new(vec![]),
        prompt: Arc::new(prompt),
        pending_forks: vec![],
        spec: Default::default(),
    }
}

fn scheduler_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler");
    for &n in &[16usize, 64, 256] {
        // n sequences with 128-token prompts, prefilled, now decoding.
        let cfg = SchedulerConfig {
            max_batched_tokens: 8192,
            max_seqs: n,
            prefill_chunk: 0,
            block_size: 16,
            num_blocks: n * 64,
            prefix_caching: true,
            background_rows: 0,
            admission_reserve: 0,
        };
        // Prefilled and decoding; rebuilt when the sequences outgrow the pool
        // (every ~900 steps, a small amortized cost).
        let build = || {
            let mut s = Scheduler::new(cfg.clone()).unwrap();
            for i in 0..n as u64 {
                s.add(seq(i, 128));
            }
            let b = s.schedule().unwrap();
            s.update_from_output(&b, &vec![Some(7); b.chunks.len()]);
            s
        };
        let mut s = build();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("decode_step", n), &n, |bench, _| {
            bench.iter(|| {
                let b = match s.schedule() {
                    Some(b) if b.chunks.len() == n => b,
                    _ => {
                        s = build();
                        s.schedule().unwrap()
                    }
                };
                let sampled = vec![Some(7u32); b.chunks.len()];
                s.update_from_output(&b, &sampled)
            })
        });
    }
    g.finish();
}

fn sampling_batch(c: &mut Criterion) {
    let vocab = 49152;
    let rows = 64;
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| (((i as u64 * 2654435761) % 10007) as f32 / 1000.0) - 5.0)
        .collect();
    let cases = [
        ("greedy", SamplingParams::greedy(1)),
        (
            "temperature",
            SamplingParams {
                temperature: 0.8,
                ..Default::default()
            },
        ),
        (
            "top_k40_top_p0.9",
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "top_p0.9",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "min_p0.05",
            SamplingParams {
                temperature: 0.8,
                min_p: 0.05,
                ..Default::default()
            },
        ),
        (
            "penalties_logprobs5",
            SamplingParams {
                temperature: 0.8,
                repetition_penalty: 1.1,
                presence_penalty: 0.5,
                logprobs: Some(5),
                ..Default::default()
            },
        ),
    ];
    let output: Vec<u32> = (0..256).map(|i| (i * 97) % 49152).collect();
    let prompt: Vec<u32> = (0..128).collect();
    let mut g = c.benchmark_group("sampling/batch64/vocab49152");
    g.throughput(Throughput::Elements(rows as u64));
    for (name, p) in cases {
        g.bench_function(name, |b| {
            b.iter_batched(
                || logits.clone(),
                |mut work| {
                    let mut out = 0u32;
                    for r in 0..rows {
                        let raw = &logits[r * vocab..(r + 1) * vocab];
                        let rp = RowParams {
                            params: &p,
                            seed: 1,
                            index: 0,
                            position: r,
                            prompt: &prompt,
                            output: &output,
                            masked: &[],
                        };
                        out ^= sample(raw, &mut work[r * vocab..(r + 1) * vocab], &rp).token;
                    }
                    out
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, scheduler_step, sampling_batch);
criterion_main!(benches);
