//! Compute kernels: the one home of `unsafe` and SIMD in Brigade.
//!
//! Every kernel has a scalar reference in [`scalar`] (the test oracle and the
//! fallback) and, on x86-64, an AVX2/FMA/F16C version in `avx2` selected at run
//! time from cached CPU feature detection. Callers only see the safe functions
//! of this module, which validate slice sizes before dispatching.
//!
//! Batch invariance: each output element is computed with a fixed sequence of
//! operations that depends only on its own weight row and activation row, never
//! on the batch size, the tile size or how columns are split over threads.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod scalar;

use std::sync::OnceLock;

use half::f16;

use crate::gguf::GgmlDType;

/// Elements per quantization block (all supported quantized dtypes).
pub const QK: usize = 32;

/// One block of 32 activations quantized to two 8-bit digits.
///
/// `x ≈ d * (qs + qr / 128)`: `qs` is the usual 8-bit quantization (as in
/// ggml's Q8_0) and `qr` quantizes the remainder with a step of `d / 128`, so
/// the block keeps ~15 bits of precision while every product is still an
/// 8-bit integer dot product. A single 8-bit digit (what llama.cpp uses)
/// costs about 3% top-1 agreement with a float32 reference on the default
/// model; two digits match it (see `tests/reference_model.rs`).
/// `s = d * (sum(qs) + sum(qr) / 128)` lets Q4_0/Q4_1 apply their offsets.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    /// Scale of the first digit.
    pub d: f32,
    /// `d * (sum(qs) + sum(qr) / 128)`.
    pub s: f32,
    /// First digit, in [-127, 127].
    pub qs: [i8; QK],
    /// Second digit (remainder in units of `d / 128`), in [-64, 64].
    pub qr: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ8>() == 72);

/// Ratio of the two digits' scales (a power of two: exact in float).
pub const Q8_RESIDUAL_SCALE: f32 = 128.0;

/// Which instruction set the dispatching wrappers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable scalar code.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
}

/// The best instruction set of this CPU (detected once, cached).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("BRIGADE_FORCE_SCALAR").map(|v| v == "1").unwrap_or(false) {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

/// Errors from building kernel views over raw weight bytes.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The dtype has no matmul kernel.
    #[error("dtype {0:?} is not supported by the matmul kernels")]
    UnsupportedDType(GgmlDType),
    /// Row length is not a multiple of the dtype's block size.
    #[error("row length {cols} is not a multiple of the block size {block} of {dtype:?}")]
    BadRowLength { dtype: GgmlDType, cols: usize, block: usize },
    /// Byte buffer size does not match rows x cols.
    #[error("weight data has {got} bytes, expected {expected} for {rows}x{cols} {dtype:?}")]
    BadSize { dtype: GgmlDType, rows: usize, cols: usize, expected: usize, got: usize },
}

/// A row-major weight matrix in its on-disk dtype: `rows` output features, each
/// a row of `cols` input features (ggml dims `[cols, rows]`).
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    /// Storage dtype.
    pub dtype: GgmlDType,
    /// Number of rows (output features).
    pub rows: usize,
    /// Row length (input features).
    pub cols: usize,
    /// Raw bytes, `rows * row_bytes()`.
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Validates dtype, shape and byte size.
    pub fn new(dtype: GgmlDType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, KernelError> {
        match dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0 => {}
            #[allow(unreachable_patterns)]
            other => return Err(KernelError::UnsupportedDType(other)),
        }
        let block = dtype.block_size();
        if cols % block != 0 || ((dtype.block_size() > 1) && cols % QK != 0) {
            return Err(KernelError::BadRowLength { dtype, cols, block });
        }
        let expected = rows * (cols / block) * dtype.type_size();
        if data.len() != expected {
            return Err(KernelError::BadSize { dtype, rows, cols, expected, got: data.len() });
        }
        Ok(Self { dtype, rows, cols, data })
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// Raw bytes of row `i`.
    pub fn row(&self, i: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[i * rb..(i + 1) * rb]
    }

    /// Dequantizes row `i` into `out` (`out.len() == cols`).
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        scalar::dequantize_row(self.dtype, self.row(i), &mut out[..self.cols]);
    }
}

/// Quantizes `n` rows of `cols` activations to Q8 blocks.
pub fn quantize_rows_q8(x: &[f32], cols: usize, out: &mut [BlockQ8]) {
    let nb = cols / QK;
    for (row, blocks) in x.chunks_exact(cols).zip(out.chunks_exact_mut(nb)) {
        scalar::quantize_q8(row, blocks);
    }
}

/// A batch of `n` activation rows, in f32 and (for quantized weights) Q8.
#[derive(Clone, Copy, Debug)]
pub struct Activations<'a> {
    /// `n * cols` floats.
    pub f: &'a [f32],
    /// `n * cols / 32` blocks (may be empty when only float weights are used).
    pub q: &'a [BlockQ8],
    /// Number of rows.
    pub n: usize,
}

/// Raw pointer that may be shared between threads writing disjoint elements.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32, usize);
// SAFETY: used only by `matmul`, whose column chunks are disjoint, so no two
// threads ever write the same element and nobody reads during the call.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Reconstructs the output slice.
    ///
    /// # Safety
    /// The caller writes only elements no other thread touches concurrently.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0, self.1)
    }
}

/// `out[r * w.rows + o] = sum_k w[o, k] * x[r, k]` for all `r < x.n`, `o < w.rows`.
///
/// Output columns are split over the threads of `pool` (if any); results are
/// bit-identical for any pool size and any batch composition.
pub fn matmul(w: &QMatrix<'_>, x: &Activations<'_>, out: &mut [f32], pool: Option<&rayon::ThreadPool>) {
    let n = x.n;
    assert!(x.f.len() >= n * w.cols, "matmul: activations too short");
    if w.dtype.block_size() > 1 {
        assert!(x.q.len() >= n * (w.cols / QK), "matmul: q8 activations too short");
    }
    assert!(out.len() >= n * w.rows, "matmul: output too short");
    let shared = SharedOut(out.as_mut_ptr(), out.len());
    let run = |cols: std::ops::Range<usize>| {
        // SAFETY: `shared` spans `out`; each call writes only columns `cols`
        // of each row, and the column ranges of concurrent calls are disjoint.
        let out = unsafe { shared.slice() };
        matmul_cols(w, x, out, cols);
    };
    match pool {
        Some(p) if p.current_num_threads() > 1 && w.rows >= 64 => {
            let nt = p.current_num_threads();
            // A few chunks per thread for balance; multiple of 8 columns.
            let chunk = (w.rows.div_ceil(nt * 4)).next_multiple_of(8).max(8);
            let n_chunks = w.rows.div_ceil(chunk);
            p.scope(|s| {
                for c in 0..n_chunks {
                    let run = &run;
                    s.spawn(move |_| run(c * chunk..((c + 1) * chunk).min(w.rows)));
                }
            });
        }
        _ => run(0..w.rows),
    }
}

/// Computes output columns `cols` of every row. Sizes were checked by `matmul`.
fn matmul_cols(w: &QMatrix<'_>, x: &Activations<'_>, out: &mut [f32], cols: std::ops::Range<usize>) {
    let n = x.n;
    let stride = w.rows;
    if !(w.dtype.block_size() > 1) {
        for r in 0..n {
            let xr = &x.f[r * w.cols..(r + 1) * w.cols];
            for o in cols.clone() {
                out[r * stride + o] = scalar::vec_dot_f(w.dtype, w.row(o), xr);
            }
        }
        return;
    }
    let nb = w.cols / QK;
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        let kind = match w.dtype {
            GgmlDType::Q4_0 => avx2::QKind::Q4_0,
            GgmlDType::Q4_1 => avx2::QKind::Q4_1,
            _ => avx2::QKind::Q8_0,
        };
        let mut r = 0;
        while r < n {
            let take = (n - r).min(4);
            let xs = &x.q[r * nb..(r + take) * nb];
            let os = &mut out[r * stride..];
            // SAFETY: avx2/fma/f16c detected by `isa()`; `w.data` holds
            // `w.rows * nb` blocks (checked in QMatrix::new) and cols.end <=
            // w.rows; `xs` holds `take * nb` blocks; `os` holds at least
            // `(take - 1) * stride + cols.end` floats (checked in `matmul`).
            unsafe {
                match take {
                    4 => avx2::tile_q::<4>(kind, w.data, nb, xs, os, stride, cols.clone()),
                    3 => avx2::tile_q::<3>(kind, w.data, nb, xs, os, stride, cols.clone()),
                    2 => avx2::tile_q::<2>(kind, w.data, nb, xs, os, stride, cols.clone()),
                    _ => avx2::tile_q::<1>(kind, w.data, nb, xs, os, stride, cols.clone()),
                }
            }
            r += take;
        }
        return;
    }
    for r in 0..n {
        let xr = &x.q[r * nb..(r + 1) * nb];
        for o in cols.clone() {
            out[r * stride + o] = scalar::vec_dot_q(w.dtype, w.row(o), xr);
        }
    }
}

/// `sum_i a[i] * b[i]` with `b` in f16.
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f16: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        // SAFETY: features detected; lengths equal (asserted above).
        return unsafe { avx2::dot_f16(a, b) };
    }
    scalar::dot_f16(a, b)
}

/// `out[i] += w * v[i]` with `v` in f16.
pub fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    assert_eq!(out.len(), v.len(), "axpy_f16: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        // SAFETY: features detected; lengths equal (asserted above).
        return unsafe { avx2::axpy_f16(out, w, v) };
    }
    scalar::axpy_f16(out, w, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut rand::rngs::SmallRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    /// Builds random raw blocks of a quantized dtype (valid scales).
    fn rand_weights(rng: &mut rand::rngs::SmallRng, dtype: GgmlDType, rows: usize, cols: usize) -> Vec<u8> {
        let nb = rows * cols / QK;
        let mut out = Vec::new();
        for _ in 0..nb {
            let d = f16::from_f32(rng.gen_range(0.001f32..0.05)).to_bits().to_le_bytes();
            out.extend_from_slice(&d);
            match dtype {
                GgmlDType::Q4_1 => {
                    let m = f16::from_f32(rng.gen_range(-0.2f32..0.0)).to_bits().to_le_bytes();
                    out.extend_from_slice(&m);
                    out.extend((0..16).map(|_| rng.gen::<u8>()));
                }
                GgmlDType::Q4_0 => out.extend((0..16).map(|_| rng.gen::<u8>())),
                GgmlDType::Q8_0 => out.extend((0..32).map(|_| rng.gen_range(-128i32..=127) as i8 as u8)),
                _ => unreachable!(),
            }
        }
        out
    }

    #[test]
    fn simd_matmul_matches_scalar_reference() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for &(rows, cols, n) in &[(8, 32, 1), (17, 64, 3), (64, 256, 5), (100, 576, 9)] {
                let data = rand_weights(&mut rng, dtype, rows, cols);
                let w = QMatrix::new(dtype, rows, cols, &data).unwrap();
                let xf = rand_vec(&mut rng, n * cols);
                let mut xq = vec![BlockQ8::default(); n * cols / QK];
                quantize_rows_q8(&xf, cols, &mut xq);
                let x = Activations { f: &xf, q: &xq, n };
                let mut out = vec![0.0; n * rows];
                matmul(&w, &x, &mut out, None);
                for r in 0..n {
                    for o in 0..rows {
                        let want = scalar::vec_dot_q(dtype, w.row(o), &xq[r * cols / QK..(r + 1) * cols / QK]);
                        let got = out[r * rows + o];
                        let tol = 1e-4 * (1.0 + want.abs());
                        assert!((got - want).abs() <= tol, "{dtype:?} r{r} o{o}: {got} vs {want}");
                    }
                }
                // Against full-precision dequantized weights: the Q8 activation error budget.
                let mut wrow = vec![0.0; cols];
                for o in 0..rows {
                    w.dequantize_row(o, &mut wrow);
                    let exact: f32 = wrow.iter().zip(&xf[..cols]).map(|(a, b)| a * b).sum();
                    let norm: f32 = wrow.iter().map(|v| v.abs()).sum::<f32>() / 127.0 + 1e-3;
                    assert!((out[o] - exact).abs() <= norm, "{dtype:?} o{o}: {} vs {exact}", out[o]);
                }
            }
        }
    }

    #[test]
    fn matmul_rows_are_batch_invariant_and_thread_invariant() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols, n) = (200, 128, 7);
            let data = rand_weights(&mut rng, dtype, rows, cols);
            let w = QMatrix::new(dtype, rows, cols, &data).unwrap();
            let xf = rand_vec(&mut rng, n * cols);
            let mut xq = vec![BlockQ8::default(); n * cols / QK];
            quantize_rows_q8(&xf, cols, &mut xq);
            let mut all = vec![0.0; n * rows];
            matmul(&w, &Activations { f: &xf, q: &xq, n }, &mut all, Some(&pool));
            let nb = cols / QK;
            for r in 0..n {
                let mut one = vec![0.0; rows];
                let x1 = Activations { f: &xf[r * cols..(r + 1) * cols], q: &xq[r * nb..(r + 1) * nb], n: 1 };
                matmul(&w, &x1, &mut one, None);
                assert_eq!(&all[r * rows..(r + 1) * rows], &one[..], "{dtype:?} row {r}");
            }
        }
    }

    #[test]
    fn f16_kernels_match_scalar() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        for n in [1usize, 7, 8, 64, 67] {
            let a = rand_vec(&mut rng, n);
            let b: Vec<f16> = rand_vec(&mut rng, n).into_iter().map(f16::from_f32).collect();
            let want = scalar::dot_f16(&a, &b);
            assert!((dot_f16(&a, &b) - want).abs() < 1e-5 * (n as f32));
            let mut o1 = a.clone();
            let mut o2 = a.clone();
            axpy_f16(&mut o1, 0.37, &b);
            scalar::axpy_f16(&mut o2, 0.37, &b);
            for (x, y) in o1.iter().zip(&o2) {
                assert!((x - y).abs() < 1e-6);
            }
        }
    }
}
