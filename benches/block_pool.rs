//! KV-cache metadata throughput: allocate+free cycles and a prefix lookup of a
//! 1k-token prompt whose first half is cached.

use std::hint::black_box;

use brigade::kv::KvCacheManager;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

const BLOCK_SIZE: usize = 16;

/// 64 sequences of 512 tokens (32 blocks each) allocated then freed, per iteration.
fn allocate_free(c: &mut Criterion) {
    let mut group = c.benchmark_group("kv/allocate_free");
    for prefix_caching in [false, true] {
        let mut m = KvCacheManager::new(4096, BLOCK_SIZE, prefix_caching).expect("valid config");
        let num_seqs = 64u64;
        let num_tokens = 512;
        group.throughput(Throughput::Elements(
            num_seqs * (num_tokens / BLOCK_SIZE) as u64,
        ));
        group.bench_function(
            BenchmarkId::new("64x512tok", if prefix_caching { "pc" } else { "nopc" }),
            |b| {
                b.iter(|| {
                    for seq in 0..num_seqs {
                        let ok = m
                            .allocate(seq, black_box(num_tokens), Vec::new())
                            .expect("fresh seq");
                        debug_assert!(ok);
                    }
                    for seq in 0..num_seqs {
                        m.free(seq).expect("allocated above");
                    }
                })
            },
        );
    }
    group.finish();
}

/// `get_computed_blocks` on a 1024-token prompt whose first 512 tokens (32 blocks) are
/// cached: 32 hits then a miss (50% of the lookable blocks hit).
fn prefix_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("kv/prefix_lookup");
    let mut m = KvCacheManager::new(4096, BLOCK_SIZE, true).expect("valid config");
    let cached: Vec<u32> = (0..512).map(|i| (i * 7919 % 32000) as u32).collect();
    assert!(m.allocate(0, cached.len(), Vec::new()).expect("fresh seq"));
    m.commit_full_blocks(0, &cached).expect("known seq");
    m.free(0).expect("allocated above");
    let mut prompt = cached.clone();
    prompt.extend((0..512).map(|i| (i * 104_729 % 32000 + 1) as u32));
    let (_, hit) = m.get_computed_blocks(&prompt);
    assert_eq!(hit, 512);
    group.throughput(Throughput::Elements(prompt.len() as u64));
    group.bench_function("1k_tok_50pct_hit", |b| {
        b.iter(|| m.get_computed_blocks(black_box(&prompt)))
    });
    // Lookup + allocate + free of the same prompt, as the scheduler does on admission.
    group.bench_function("1k_tok_50pct_hit_admit", |b| {
        b.iter_batched(
            || prompt.clone(),
            |p| {
                let (c, _) = m.get_computed_blocks(&p);
                let ok = m.allocate(1, p.len(), c).expect("fresh seq");
                debug_assert!(ok);
                m.free(1).expect("allocated above");
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, allocate_free, prefix_lookup);
criterion_main!(benches);
