//! Prefill and decode throughput of the forward pass on the real default model
//! (skipped with a note if it is not fetched), plus a tiny synthetic model.
//!
//! `cargo bench --bench forward`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use brigade::gguf::GgufFile;
use brigade::model::Model;
use brigade::runner::Runner;

fn load() -> Option<Arc<Model>> {
    let p = std::env::var_os("BRIGADE_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(brigade::paths::default_model_path);
    if !p.is_file() {
        eprintln!("note: {} missing; run scripts/fetch-model.sh", p.display());
        return None;
    }
    let file = Arc::new(GgufFile::open(&p).ok()?);
    Some(Arc::new(Model::from_gguf(file).ok()?))
}

fn threads() -> usize {
    std::env::var("BRIGADE_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

fn forward(c: &mut Criterion) {
    let Some(model) = load() else { return };
    let vocab = model.config.vocab_size as u32;
    let mut g = c.benchmark_group("forward/smollm2-q4_1");
    g.sample_size(10);
    for &n in &[128usize, 512] {
        let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let mut runner = Runner::new(model.clone(), n + 1, threads()).unwrap();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("prefill", n), &n, |b, _| {
            b.iter(|| {
                runner.reset();
                runner.feed(&tokens, false).unwrap()
            })
        });
    }
    // Single-stream decode at context 128: one token per iteration.
    let prompt: Vec<u32> = (0..128u32).map(|i| (i * 31 + 7) % vocab).collect();
    let mut runner = Runner::new(model.clone(), 4096, threads()).unwrap();
    runner.feed(&prompt, false).unwrap();
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode/ctx128+", |b| {
        b.iter(|| {
            if runner.pos() > 4000 {
                runner.reset();
                runner.feed(&prompt, false).unwrap();
            }
            runner.feed(&[42], false).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
