//! Kernel throughput: matmul per dtype x activation rows x model shape, each
//! ISA side by side, in GFLOP/s (2 flops per multiply-add); activation
//! quantization; paged attention over the f16 KV cache
//! (`attention/row/<heads>x<head_dim>/ctx<n>/<isa>`: one query row, all
//! heads; SmolLM2's 9x64 and Gemma 3's 4x256).
//!
//! `cargo bench --bench kernels -- matmul/q4_1/576x1536`
//!
//! Ids: `matmul/<dtype>/<rows>x<cols>/rows<n>/<isa>` where `<rows>x<cols>` is
//! the weight (output features x input features), `<isa>` is `scalar`,
//! `avx2` (raw ggml blocks) or `avx512` (packed, VNNI; only the dtypes with a
//! packed kind), `amx` (packed, AMX tiles for full 16-row tiles; CPUs with
//! AMX-INT8, 16 rows and more). Shapes: SmolLM2-135M's for Q4_0/Q4_1/Q8_0, and Gemma 3
//! 270M's (640x2048 for every dtype, 2048x640 for the 32-element ones), at
//! 1, 32 and 64 rows. Q2_K and Q3_K run packed on AVX-512 like Q4_K.
//! Threads: `BRIGADE_THREADS` (default 1; >1 uses a rayon pool as the model does).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use brigade::kernels::{self, Activations, BlockQ8, Isa, PackedMatrix, QMatrix, QK};
use brigade::quant::GgmlDType;

const SHAPES: [(usize, usize); 5] = [
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (49152, 576),
];
const ROWS: [usize; 5] = [1, 4, 16, 64, 512];
const GEMMA_SHAPES: [(usize, usize); 2] = [(640, 2048), (2048, 640)];
const GEMMA_ROWS: [usize; 3] = [1, 32, 64];

fn threads() -> usize {
    std::env::var("BRIGADE_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Byte offsets of a block's f16 scales and the range each gets.
fn scale_fields(dtype: GgmlDType) -> Vec<(usize, std::ops::Range<f32>)> {
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => vec![(0, 0.001..0.05), (2, -0.2..0.0)],
        GgmlDType::Q4_K | GgmlDType::Q5_K => vec![(0, 0.0005..0.002), (2, 0.0..0.003)],
        GgmlDType::Q2_K => vec![(80, 0.001..0.01), (82, 0.0..0.01)],
        GgmlDType::Q3_K => vec![(108, 0.0005..0.002)],
        GgmlDType::Q6_K => vec![(208, 0.0002..0.001)],
        GgmlDType::IQ4_XS | GgmlDType::IQ4_NL => vec![(0, 0.0002..0.001)],
        _ => vec![(0, 0.001..0.05)],
    }
}

/// Random raw ggml data of `dtype`: random quant bytes, realistic scales.
fn weights(rng: &mut rand::rngs::SmallRng, dtype: GgmlDType, rows: usize, cols: usize) -> Vec<u8> {
    let (bs, ts) = (dtype.block_size(), dtype.type_size());
    let mut out = Vec::with_capacity(rows * cols / bs * ts);
    for _ in 0..rows * cols / bs {
        match dtype {
            GgmlDType::F32 => out.extend_from_slice(&rng.gen_range(-0.1f32..0.1).to_le_bytes()),
            GgmlDType::F16 => {
                out.extend_from_slice(&f16::from_f32(rng.gen_range(-0.1f32..0.1)).to_le_bytes())
            }
            GgmlDType::BF16 => out.extend_from_slice(
                &half::bf16::from_f32(rng.gen_range(-0.1f32..0.1)).to_le_bytes(),
            ),
            _ => {
                let mut blk: Vec<u8> = (0..ts).map(|_| rng.gen::<u8>()).collect();
                for (at, range) in scale_fields(dtype) {
                    blk[at..at + 2]
                        .copy_from_slice(&f16::from_f32(rng.gen_range(range)).to_le_bytes());
                }
                out.extend_from_slice(&blk);
            }
        }
    }
    out
}

fn matmul(c: &mut Criterion) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let pool = (threads() > 1).then(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads())
            .build()
            .unwrap()
    });
    let isas: Vec<Isa> = kernels::available_isas();
    let legacy = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];
    for dtype in GgmlDType::ALL {
        let name = dtype.name().to_lowercase();
        let mut g = c.benchmark_group(format!("matmul/{name}"));
        g.sample_size(10);
        g.warm_up_time(std::time::Duration::from_millis(300));
        g.measurement_time(std::time::Duration::from_secs(1));
        let mut cases: Vec<((usize, usize), usize)> = Vec::new();
        if legacy.contains(&dtype) {
            cases.extend(
                SHAPES
                    .iter()
                    .flat_map(|&s| ROWS.iter().map(move |&n| (s, n))),
            );
        }
        cases.extend(
            GEMMA_SHAPES
                .iter()
                .flat_map(|&s| GEMMA_ROWS.iter().map(move |&n| (s, n))),
        );
        for ((rows, cols), n) in cases {
            // The 49152-row head only ever sees the sampled rows; K-quant
            // rows are multiples of 256 (Gemma's 640-wide inputs use Q5_0/Q8_0).
            if (rows == 49152 && n > 64) || !cols.is_multiple_of(dtype.block_size()) {
                continue;
            }
            let data = weights(&mut rng, dtype, rows, cols);
            let w = QMatrix::new(dtype, rows, cols, &data).unwrap();
            let packed = PackedMatrix::new(&w).ok();
            let xf: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let mut xq = vec![BlockQ8::default(); n * cols / QK];
            kernels::quantize_rows_q8(&xf, cols, &mut xq);
            let x = Activations { f: &xf, q: &xq, n };
            let mut out = vec![0.0f32; n * rows];
            g.throughput(Throughput::Elements((2 * n * rows * cols) as u64));
            for &isa in &isas {
                // Scalar is only informative at small sizes.
                if isa == Isa::Scalar && n * rows * cols > 64 * 576 * 576 {
                    continue;
                }
                let id = BenchmarkId::new(format!("{rows}x{cols}/rows{n}"), isa.name());
                match (isa, &packed) {
                    (Isa::Avx512Vnni, Some(p)) => {
                        g.bench_function(id, |b| {
                            b.iter(|| {
                                kernels::matmul_packed_opts(
                                    isa,
                                    false,
                                    p,
                                    &x,
                                    &mut out,
                                    pool.as_ref(),
                                )
                            })
                        });
                        if kernels::amx_available() && n >= 16 {
                            let id = BenchmarkId::new(format!("{rows}x{cols}/rows{n}"), "amx");
                            g.bench_function(id, |b| {
                                b.iter(|| {
                                    kernels::matmul_packed_opts(
                                        isa,
                                        true,
                                        p,
                                        &x,
                                        &mut out,
                                        pool.as_ref(),
                                    )
                                })
                            });
                        }
                    }
                    (Isa::Avx512Vnni, None) => {}
                    _ => {
                        g.bench_function(id, |b| {
                            b.iter(|| kernels::matmul_isa(isa, &w, &x, &mut out, pool.as_ref()))
                        });
                    }
                }
            }
        }
        g.finish();
    }
}

/// AMX against VNNI on the shapes where batched decode spends its time:
/// Gemma 3's Q8_0 output head (a 16384-column slice of the 640 x 262144
/// head; the full head is 16x the work) and a SmolLM2 Q4_K / Q6_K FFN
/// matrix, at 4 to 256 rows (`matmul_amx/<dtype>/<rows>x<cols>/rows<n>/{avx512,amx}`).
fn matmul_amx(c: &mut Criterion) {
    if !kernels::amx_available() {
        eprintln!("matmul_amx: no AMX on this machine, skipped");
        return;
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(4);
    let pool = (threads() > 1).then(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads())
            .build()
            .unwrap()
    });
    let mut g = c.benchmark_group("matmul_amx");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_millis(300));
    g.measurement_time(std::time::Duration::from_secs(1));
    for (dtype, rows, cols) in [
        (GgmlDType::Q8_0, 16384usize, 640usize),
        (GgmlDType::Q4_K, 576, 1536),
        (GgmlDType::Q6_K, 576, 1536),
        (GgmlDType::Q5_0, 2048, 640),
    ] {
        let data = weights(&mut rng, dtype, rows, cols);
        let w = QMatrix::new(dtype, rows, cols, &data).unwrap();
        let p = PackedMatrix::new(&w).unwrap();
        for n in [4usize, 5, 8, 16, 24, 32, 64, 256] {
            let xf: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let mut xq = vec![BlockQ8::default(); n * cols / QK];
            kernels::quantize_rows_q8(&xf, cols, &mut xq);
            let x = Activations { f: &xf, q: &xq, n };
            let mut out = vec![0.0f32; n * rows];
            g.throughput(Throughput::Elements((2 * n * rows * cols) as u64));
            for (name, amx) in [("avx512", false), ("amx", true)] {
                let id = BenchmarkId::new(
                    format!("{}/{rows}x{cols}/rows{n}", dtype.name().to_lowercase()),
                    name,
                );
                g.bench_function(id, |b| {
                    b.iter(|| {
                        kernels::matmul_packed_opts(
                            Isa::Avx512Vnni,
                            amx,
                            &p,
                            &x,
                            &mut out,
                            pool.as_ref(),
                        )
                    })
                });
            }
        }
    }
    g.finish();
}

fn quantize(c: &mut Criterion) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    let mut g = c.benchmark_group("quantize_q8");
    g.sample_size(20);
    for &(n, cols) in &[(64usize, 576usize), (64, 1536)] {
        let xf: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut xq = vec![BlockQ8::default(); n * cols / QK];
        g.throughput(Throughput::Elements((n * cols) as u64));
        for isa in kernels::available_isas() {
            g.bench_function(BenchmarkId::new(format!("{n}x{cols}"), isa.name()), |b| {
                b.iter(|| kernels::quantize_rows_q8_isa(isa, &xf, cols, &mut xq))
            });
        }
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let mut g = c.benchmark_group("attention");
    g.sample_size(20);
    // One query row (all heads) over n_ctx positions, 16-token blocks:
    // SmolLM2-135M (head_dim 64, 3 query heads per KV head, 3 KV heads) and
    // Gemma 3 270M (head_dim 256, 4 query heads on 1 KV head).
    for (name, hd, group, kvn) in [("9x64", 64usize, 3usize, 3usize), ("4x256", 256, 4, 1)] {
        let bs = 16usize;
        let kv_dim = hd * kvn;
        let scale = 1.0 / (hd as f32).sqrt();
        let shape = kernels::AttnShape {
            head_dim: hd,
            group,
            block_size: bs,
            kv_dim,
            scale,
            softcap: None,
        };
        for n_ctx in [256usize, 1024] {
            let nblk = n_ctx / bs;
            let k: Vec<f16> = (0..nblk * bs * kv_dim)
                .map(|_| f16::from_f32(rng.gen_range(-1.0f32..1.0)))
                .collect();
            let v: Vec<f16> = (0..nblk * bs * kv_dim)
                .map(|_| f16::from_f32(rng.gen_range(-1.0f32..1.0)))
                .collect();
            let table: Vec<u32> = (0..nblk as u32).rev().collect();
            let q: Vec<f32> = (0..group * kvn * hd)
                .map(|_| rng.gen_range(-1.0f32..1.0))
                .collect();
            let mut out = vec![0.0f32; group * kvn * hd];
            // Elements = query heads x positions attended.
            g.throughput(Throughput::Elements((group * kvn * n_ctx) as u64));
            for isa in kernels::available_isas() {
                g.bench_function(
                    BenchmarkId::new(format!("row/{name}/ctx{n_ctx}"), isa.name()),
                    |b| {
                        b.iter(|| {
                            for (kvh, (qg, og)) in q
                                .chunks_exact(group * hd)
                                .zip(out.chunks_exact_mut(group * hd))
                                .enumerate()
                            {
                                kernels::attend_f16_isa(
                                    isa,
                                    &shape,
                                    qg,
                                    kvh,
                                    &k,
                                    &v,
                                    &table,
                                    0..n_ctx,
                                    og,
                                );
                            }
                        })
                    },
                );
            }
        }
    }
    // Decode at long context as a model runs it: one row over 4,096 positions
    // in each of 30 layers (SmolLM2's shape), each layer's K/V in its own
    // arrays (94 MB in all, more than the L3 cache), blocks in a shuffled
    // order: measures the kernel when its K/V come from memory.
    {
        let (hd, group, kvn, bs, n_ctx, layers) =
            (64usize, 3usize, 3usize, 16usize, 4096usize, 30usize);
        let kv_dim = hd * kvn;
        let shape = kernels::AttnShape {
            head_dim: hd,
            group,
            block_size: bs,
            kv_dim,
            scale: 1.0 / (hd as f32).sqrt(),
            softcap: None,
        };
        let nblk = n_ctx / bs;
        let mut kv: Vec<(Vec<f16>, Vec<f16>)> = Vec::new();
        for _ in 0..layers {
            let mut gen = || -> Vec<f16> {
                (0..nblk * bs * kv_dim)
                    .map(|_| f16::from_f32(rng.gen_range(-1.0f32..1.0)))
                    .collect()
            };
            kv.push((gen(), gen()));
        }
        let mut table: Vec<u32> = (0..nblk as u32).collect();
        table.shuffle(&mut rng);
        let q: Vec<f32> = (0..group * kvn * hd)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        let mut out = vec![0.0f32; group * kvn * hd];
        g.throughput(Throughput::Elements((layers * group * kvn * n_ctx) as u64));
        for isa in kernels::available_isas() {
            g.bench_function(
                BenchmarkId::new("row/9x64/ctx4096/30-layers-from-memory", isa.name()),
                |b| {
                    b.iter(|| {
                        for (k, v) in &kv {
                            for (kvh, (qg, og)) in q
                                .chunks_exact(group * hd)
                                .zip(out.chunks_exact_mut(group * hd))
                                .enumerate()
                            {
                                kernels::attend_f16_isa(
                                    isa,
                                    &shape,
                                    qg,
                                    kvh,
                                    k,
                                    v,
                                    &table,
                                    0..n_ctx,
                                    og,
                                );
                            }
                        }
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, matmul, matmul_amx, quantize, attention);
criterion_main!(benches);
