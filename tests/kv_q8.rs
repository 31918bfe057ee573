//! Tiled prefill attention and the `q8_0` KV cache (issue 14), end to end:
//!
//! - every tiny family, f16 and q8_0: a 61-token sequence's logits are bit
//!   identical prefilled whole (several 16-row tiles) and in chunks of 7, 30
//!   and 23 rows mixed with other sequences plus decode rows, on shuffled
//!   block tables (tiles never change a row's result);
//! - q8_0 sliding windows read no block wholly before the window;
//! - the real model through the engine with q8_0: alone vs 2 workers
//!   concurrent, chunked prefill and a pool small enough to preempt give the
//!   same tokens and logprob bits; the answer stays right;
//! - a `capacity_bytes` budget holds about twice the blocks in q8_0.

mod common;

use std::sync::Arc;

use brigade::engine::{Engine, GenerateRequest, SamplingParams};
use brigade::gguf::GgufFile;
use brigade::model::kv::{KvDType, KvStore};
use brigade::model::llama::Scratch;
use brigade::model::Model;
use brigade::testing::{tiny_family_gguf, TinyFamily, TinyFamilySpec};
use common::batch::{family_model as model, run_batch, tokens, Chunk};
use common::{engine_config, engine_outputs};

const BS: usize = 4;

fn store(m: &Model, blocks: usize, dtype: KvDType) -> KvStore {
    KvStore::with_dtype(
        0,
        m.config.n_layers,
        blocks,
        BS,
        m.config.kv_dim,
        m.config.head_dim,
        dtype,
    )
}

#[test]
fn tiles_and_chunking_never_change_a_row_f16_and_q8() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    for dtype in [KvDType::F16, KvDType::Q8] {
        for family in TinyFamily::ALL {
            let m = model(family);
            let vocab = m.config.vocab_size;
            let (a, b) = (tokens(5, 61, vocab), tokens(6, 12, vocab));
            let nb = 61usize.div_ceil(BS);
            let table_alone: Vec<u32> = (0..nb as u32).collect();
            let mut kv = store(&m, nb, dtype);
            let alone = run_batch(
                &m,
                &mut kv,
                &mut Scratch::default(),
                &[Chunk {
                    pos: 0,
                    tokens: &a,
                    table: &table_alone,
                }],
                Some(&pool),
            );
            // Interleaved tables; A as 7 + 30 + 23 rows and one decode row.
            let ta: Vec<u32> = (0..nb as u32).map(|i| 3 + 2 * i).collect();
            let tb: Vec<u32> = vec![0, 2, 4, 6];
            let mut kv = store(&m, 3 + 2 * nb, dtype);
            let mut s = Scratch::default();
            let mut got = Vec::new();
            let l = run_batch(
                &m,
                &mut kv,
                &mut s,
                &[
                    Chunk {
                        pos: 0,
                        tokens: &b[..5],
                        table: &tb,
                    },
                    Chunk {
                        pos: 0,
                        tokens: &a[..7],
                        table: &ta,
                    },
                ],
                None,
            );
            got.extend_from_slice(&l[5 * vocab..]);
            let l = run_batch(
                &m,
                &mut kv,
                &mut s,
                &[
                    Chunk {
                        pos: 7,
                        tokens: &a[7..37],
                        table: &ta,
                    },
                    Chunk {
                        pos: 5,
                        tokens: &b[5..],
                        table: &tb,
                    },
                ],
                Some(&pool),
            );
            got.extend_from_slice(&l[..30 * vocab]);
            let l = run_batch(
                &m,
                &mut kv,
                &mut s,
                &[
                    Chunk {
                        pos: 12,
                        tokens: &b[..1],
                        table: &tb,
                    },
                    Chunk {
                        pos: 37,
                        tokens: &a[37..60],
                        table: &ta,
                    },
                ],
                Some(&pool),
            );
            got.extend_from_slice(&l[vocab..]);
            let l = run_batch(
                &m,
                &mut kv,
                &mut s,
                &[Chunk {
                    pos: 60,
                    tokens: &a[60..],
                    table: &ta,
                }],
                Some(&pool),
            );
            got.extend_from_slice(&l);
            assert_eq!(got.len(), alone.len());
            let same = got
                .iter()
                .zip(&alone)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "{} {dtype:?}: logits differ between whole prefill and chunked / mixed batches",
                family.name()
            );
        }
    }
}

#[test]
fn q8_sliding_windows_do_not_read_before_the_window() {
    for family in TinyFamily::ALL {
        let m = model(family);
        let Some(window) = m.config.sliding_window else {
            continue;
        };
        let vocab = m.config.vocab_size;
        let n = 3 * window + 5;
        let a = tokens(7, n + 1, vocab);
        let nblk = (n + 1).div_ceil(BS);
        let table: Vec<u32> = (0..nblk as u32).collect();
        let run = |poison: bool| {
            let mut kv = store(&m, nblk, KvDType::Q8);
            let mut s = Scratch::default();
            run_batch(
                &m,
                &mut kv,
                &mut s,
                &[Chunk {
                    pos: 0,
                    tokens: &a[..n],
                    table: &table,
                }],
                None,
            );
            if poison {
                // Every block wholly before the decode row's window, on
                // sliding layers, overwritten with huge keys and values.
                let first_read = n + 1 - window;
                let big = vec![3.0e4f32; m.config.kv_dim];
                for l in (0..m.config.n_layers).filter(|&l| m.config.swa_layers[l]) {
                    for slot in 0..first_read / BS * BS {
                        kv.write(l, slot, &big, &big);
                    }
                }
            }
            run_batch(
                &m,
                &mut kv,
                &mut s,
                &[Chunk {
                    pos: n,
                    tokens: &a[n..],
                    table: &table,
                }],
                None,
            )
        };
        let (clean, poisoned) = (run(false), run(true));
        assert!(
            clean
                .iter()
                .zip(&poisoned)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{}: read before the window",
            family.name()
        );
    }
}

#[test]
fn q8_engine_is_batch_invariant_and_right() {
    let Some((model, tok)) = common::real_model() else {
        return;
    };
    let prompts: Vec<String> = [
        "The capital of France is",
        "def fibonacci(n):",
        "Water boils at",
        "List three colours of the rainbow and explain briefly where the light of each one comes from when the sun shines through rain:",
    ]
    .map(String::from)
    .to_vec();
    let p = SamplingParams {
        logprobs: Some(0),
        ..SamplingParams::greedy(40)
    };
    let run = |workers, chunk, kv_tokens, copies: usize| {
        let mut c = engine_config(workers, chunk, kv_tokens, true);
        c.kv_cache.dtype = KvDType::Q8;
        let h = Engine::start(model.clone(), tok.clone(), c).expect("engine");
        let outs: Vec<Vec<(u32, u32)>> = if copies > 0 {
            let all = prompts.iter().cycle().take(copies * prompts.len());
            let streams: Vec<_> = all
                .map(|t| {
                    h.submit(GenerateRequest::text(t.clone(), p.clone()))
                        .expect("submit")
                })
                .collect();
            streams.into_iter().map(engine_outputs).collect()
        } else {
            prompts
                .iter()
                .map(|t| {
                    engine_outputs(
                        h.submit(GenerateRequest::text(t.clone(), p.clone()))
                            .expect("submit"),
                    )
                })
                .collect()
        };
        (outs, h.stats().preemptions)
    };
    let (alone, _) = run(1, 0, 4096, 0);
    for (workers, chunk, kv_tokens, name) in [
        (2, 0, 4096, "2 workers"),
        (2, 5, 4096, "5-token prefill chunks"),
        (2, 0, 160, "160-token pool"),
    ] {
        let (got, preempted) = run(workers, chunk, kv_tokens, 4);
        for (i, g) in got.iter().enumerate() {
            assert_eq!(
                g,
                &alone[i % prompts.len()],
                "q8_0 {name}: request {i} differs from running alone"
            );
        }
        if kv_tokens < 1000 {
            assert!(preempted > 0, "q8_0 {name}: expected preemptions");
        }
    }
    let first = tok
        .decode(&alone[0].iter().map(|t| t.0).collect::<Vec<_>>(), true)
        .expect("decode");
    assert!(first.contains("Paris"), "q8_0: {first:?}");
}

#[test]
fn q8_budget_holds_about_twice_the_blocks() {
    let mut c = brigade::config::Config::default();
    c.kv_cache.capacity_tokens = 0;
    c.kv_cache.capacity_bytes = 64 << 20;
    let f16 = c.kv_blocks(30, 192);
    c.kv_cache.dtype = KvDType::Q8;
    let q8 = c.kv_blocks(30, 192);
    // 192 + 2 * 6 bytes per row against 384.
    assert_eq!(f16, (64 << 20) / (2 * 30 * 384) / 16);
    assert_eq!(q8, (64 << 20) / (2 * 30 * 204) / 16);
    let s = KvStore::with_dtype(0, 30, q8, 16, 192, 64, KvDType::Q8);
    assert!(
        s.bytes() <= 64 << 20 && s.bytes() * 100 > (64 << 20) * 99,
        "{} bytes",
        s.bytes()
    );
    let parsed =
        brigade::config::Config::parse("[kv_cache]\ndtype = \"q8_0\"\n", "t").expect("q8_0 parses");
    assert_eq!(parsed.kv_cache.dtype, KvDType::Q8);
}

/// K/V rows written through [`KvStore::write`] in q8_0 attend like the same
/// rows in f32 (the store's layout is the kernels' layout), within the
/// quantization error, for every KV head and a sliding window.
#[test]
fn q8_store_writes_the_kernel_layout() {
    use brigade::kernels::attention::{attend_rows, tile_rows};
    use brigade::kernels::AttnShape;
    let (hd, nkv, group, bs, n) = (64usize, 3usize, 3usize, 16usize, 150usize);
    let kv_dim = hd * nkv;
    let nblk = n.div_ceil(bs) + 2;
    let table: Vec<u32> = (0..n.div_ceil(bs) as u32)
        .map(|i| (i * 5 + 1) % nblk as u32)
        .collect();
    let mut q8 = KvStore::with_dtype(3, 2, nblk, bs, kv_dim, hd, KvDType::Q8);
    let mut f32s = KvStore::with_dtype(3, 2, nblk, bs, kv_dim, hd, KvDType::F32);
    let mut x = 0x9e3779b9u32;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x as f32 / u32::MAX as f32) * 2.0 - 1.0
    };
    for pos in 0..n {
        // Per-dimension magnitudes differ (as K's channels do).
        let k: Vec<f32> = (0..kv_dim)
            .map(|e| rnd() * (1.0 + (e % 7) as f32))
            .collect();
        let v: Vec<f32> = (0..kv_dim).map(|_| rnd()).collect();
        let slot = q8.slot(&table, pos);
        q8.write(4, slot, &k, &v);
        f32s.write(4, slot, &k, &v);
    }
    let s = AttnShape {
        head_dim: hd,
        group,
        block_size: bs,
        kv_dim,
        scale: 0.05,
        softcap: None,
    };
    let keys: Vec<std::ops::Range<usize>> = (n - tile_rows(&s)..n)
        .map(|p| p.saturating_sub(100)..p + 1)
        .collect();
    let w = group * hd;
    let q: Vec<f32> = (0..keys.len() * w).map(|_| rnd()).collect();
    for kvh in 0..nkv {
        let mut a = vec![0.0f32; keys.len() * w];
        let mut b = vec![0.0f32; keys.len() * w];
        attend_rows(&s, q8.layer(4), kvh, &table, &keys, &q, w, &mut a, w);
        attend_rows(&s, f32s.layer(4), kvh, &table, &keys, &q, w, &mut b, w);
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        let mag = b.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        assert!(
            err < 0.01 * mag && mag > 0.0,
            "KV head {kvh}: q8_0 vs f32 max error {err} (max |out| {mag})"
        );
    }
    // Copying a block copies its scales too.
    let mut c = KvStore::with_dtype(0, 1, 4, bs, kv_dim, hd, KvDType::Q8);
    let row: Vec<f32> = (0..kv_dim).map(|e| e as f32 - 90.0).collect();
    c.write(0, bs + 3, &row, &row);
    c.copy_block(1, 2);
    let (k1, k2) = match (c.layer(0), c.layer(0)) {
        (brigade::model::kv::KvLayer::Q8(a), brigade::model::kv::KvLayer::Q8(b)) => (a, b),
        _ => unreachable!("q8_0 store"),
    };
    let per = bs * kv_dim;
    let ps = bs * kv_dim.div_ceil(32);
    assert_eq!(k1.k[per..2 * per], k2.k[2 * per..3 * per]);
    assert_eq!(k1.v_scale[ps..2 * ps], k2.v_scale[2 * ps..3 * ps]);
    assert!(k1.k_scale[2 * ps..3 * ps].iter().any(|d| d.to_f32() > 0.0));
}
