//! Kernel throughput: quantized matmul per dtype x activation rows x model
//! shape (SmolLM2-135M), each ISA side by side, in GFLOP/s (2 flops per
//! multiply-add); activation quantization; paged attention over the f16 KV
//! cache (`attention/row/9x64/ctx<n>/<isa>`: one query row, all 9 heads).
//!
//! `cargo bench --bench kernels -- matmul/q4_1/576x1536`
//!
//! Ids: `matmul/<dtype>/<rows>x<cols>/rows<n>/<isa>` where `<rows>x<cols>` is
//! the weight (output features x input features), `<isa>` is `scalar`,
//! `avx2` (raw ggml blocks) or `avx512` (packed, VNNI). Threads:
//! `BRIGADE_THREADS` (default 1; >1 uses a rayon pool as the model does).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use rand::{Rng, SeedableRng};

use brigade::kernels::{self, Activations, BlockQ8, Isa, PackedMatrix, QMatrix, QK};
use brigade::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, GgmlDType};

const SHAPES: [(usize, usize); 5] = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)];
const ROWS: [usize; 5] = [1, 4, 16, 64, 512];

fn threads() -> usize {
    std::env::var("BRIGADE_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// Random raw ggml blocks of `dtype` with realistic scales.
fn weights(rng: &mut rand::rngs::SmallRng, dtype: GgmlDType, rows: usize, cols: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * cols / QK * dtype.type_size());
    for _ in 0..rows * cols / QK {
        let d = f16::from_f32(rng.gen_range(0.001f32..0.05));
        match dtype {
            GgmlDType::Q4_1 => {
                let m = f16::from_f32(rng.gen_range(-0.2f32..0.0));
                out.extend_from_slice(bytemuck::bytes_of(&BlockQ4_1 { d, m, qs: std::array::from_fn(|_| rng.gen::<u8>()) }));
            }
            GgmlDType::Q4_0 => out.extend_from_slice(bytemuck::bytes_of(&BlockQ4_0 { d, qs: std::array::from_fn(|_| rng.gen::<u8>()) })),
            _ => out.extend_from_slice(bytemuck::bytes_of(&BlockQ8_0 { d, qs: std::array::from_fn(|_| rng.gen::<u8>() as i8) })),
        }
    }
    out
}

fn matmul(c: &mut Criterion) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let pool = (threads() > 1).then(|| rayon::ThreadPoolBuilder::new().num_threads(threads()).build().unwrap());
    let isas: Vec<Isa> = kernels::available_isas();
    for (dtype, name) in [(GgmlDType::Q4_0, "q4_0"), (GgmlDType::Q4_1, "q4_1"), (GgmlDType::Q8_0, "q8_0")] {
        let mut g = c.benchmark_group(format!("matmul/{name}"));
        g.sample_size(10);
        g.warm_up_time(std::time::Duration::from_millis(300));
        g.measurement_time(std::time::Duration::from_secs(1));
        for &(rows, cols) in &SHAPES {
            let data = weights(&mut rng, dtype, rows, cols);
            let w = QMatrix::new(dtype, rows, cols, &data).unwrap();
            let packed = PackedMatrix::new(&w).unwrap();
            for &n in &ROWS {
                // The 49152-row head only ever sees the sampled rows.
                if rows == 49152 && n > 64 {
                    continue;
                }
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
                    g.bench_function(id, |b| {
                        b.iter(|| match isa {
                            Isa::Avx512Vnni => kernels::matmul_packed_isa(isa, &packed, &x, &mut out, pool.as_ref()),
                            _ => kernels::matmul_isa(isa, &w, &x, &mut out, pool.as_ref()),
                        })
                    });
                }
            }
        }
        g.finish();
    }
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
    // The default model's shape: head_dim 64, 3 query heads per KV head, 3 KV
    // heads, 16-token blocks; one query row (all 9 heads) over n_ctx positions.
    let (hd, group, kvn, bs) = (64usize, 3usize, 3usize, 16usize);
    let kv_dim = hd * kvn;
    let shape = kernels::AttnShape { head_dim: hd, group, block_size: bs, kv_dim, scale: 0.125, softcap: None };
    for n_ctx in [256usize, 1024] {
        let nblk = n_ctx / bs;
        let k: Vec<f16> = (0..nblk * bs * kv_dim).map(|_| f16::from_f32(rng.gen_range(-1.0f32..1.0))).collect();
        let v: Vec<f16> = (0..nblk * bs * kv_dim).map(|_| f16::from_f32(rng.gen_range(-1.0f32..1.0))).collect();
        let table: Vec<u32> = (0..nblk as u32).rev().collect();
        let q: Vec<f32> = (0..group * kvn * hd).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut out = vec![0.0f32; group * kvn * hd];
        // Elements = query heads x positions attended.
        g.throughput(Throughput::Elements((group * kvn * n_ctx) as u64));
        for isa in kernels::available_isas() {
            g.bench_function(BenchmarkId::new(format!("row/9x64/ctx{n_ctx}"), isa.name()), |b| {
                b.iter(|| {
                    for (kvh, (qg, og)) in q.chunks_exact(group * hd).zip(out.chunks_exact_mut(group * hd)).enumerate() {
                        kernels::attend_f16_isa(isa, &shape, qg, kvh, &k, &v, &table, 0..n_ctx, og);
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, matmul, quantize, attention);
criterion_main!(benches);
