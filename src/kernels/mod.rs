//! Compute kernels: the one home of `unsafe` and SIMD in Brigade.
//!
//! Every kernel has a scalar reference in [`scalar`] / `packed` (the test
//! oracle and the fallback) and, on x86-64, SIMD versions selected at run time
//! from cached CPU feature detection ([`isa`]): AVX2/FMA/F16C in `avx2`
//! (quantized matmul over raw ggml blocks, float matmul, paged attention),
//! and AVX-512 VNNI in `avx512` (quantized matmul over [`PackedMatrix`]'s
//! interleaved layout, activation quantization, paged attention, SiLU,
//! softmax reductions). Callers only see the safe functions of this module,
//! which validate slice sizes before dispatching.
//!
//! Matmul kernels per weight type ([`QMatrix::new`] accepts every
//! [`GgmlDType`]):
//!
//! ```text
//! type                          AVX-512 VNNI (packed)   AVX2 (raw blocks)   scalar
//! Q4_0 Q4_1 Q8_0                gemm_group              tile_q              vec_dot_q
//! Q5_0 Q5_1 Q4_K Q5_K Q6_K      gemm_group              tile_qx             vec_dot_q (integer form)
//! IQ4_NL IQ4_XS                 gemm_group              -                   vec_dot_q (integer form)
//! Q2_K Q3_K                     -                       -                   vec_dot_q (integer form)
//! F32 F16 BF16 (f32 activations) -                      tile_f              vec_dot_f
//! ```
//!
//! A "-" falls back to the column to its right.
//!
//! On CPUs with AMX-INT8 (and the OS's permission, see `amx`), the packed
//! matmul runs the integer part of `gemm_group` on AMX tiles for every tile
//! of 16 activation rows, a batch's last 12 to 15 rows zero-padded to one
//! ([`amx_enabled`]; 1.5-2.2x the VNNI kernel's throughput from 16 rows on,
//! 1.1-1.2x for Q6_K, release build, one thread);
//! results are bit-identical.
//!
//! Environment: `BRIGADE_FORCE_SCALAR=1` forces the scalar kernels;
//! `BRIGADE_ISA=scalar|avx2|avx512` caps the instruction set (for comparisons);
//! `BRIGADE_AMX=0` keeps the packed matmul on AVX-512 VNNI.
//!
//! Batch invariance: each output element is computed with a fixed sequence of
//! operations that depends only on its own weight row and activation row, never
//! on the batch size, the tile size or how columns are split over threads.
#![allow(unsafe_code)]
// Kernels index several arrays with one loop counter, llama2.c style; iterator
// chains would hide the arithmetic the scalar references exist to show.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod memory;
mod packed;
pub mod scalar;

pub use memory::{release_free_heap, tune_allocator};
pub use packed::{PackedMatrix, GROUP};

use std::ops::Range;
use std::sync::OnceLock;

use half::f16;

use crate::quant::GgmlDType;

/// Elements per quantization block (all supported quantized dtypes; also the
/// block of [`BlockQ8`] activations).
pub use crate::quant::QK;

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

/// Which instruction set the dispatching wrappers use (ordered: each level
/// includes the ones before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable scalar code.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 level plus AVX-512 F/BW/VL and AVX-512 VNNI.
    Avx512Vnni,
}

impl Isa {
    /// Short lowercase name (`scalar`, `avx2`, `avx512`), as in bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512",
        }
    }
}

/// The best instruction set this CPU supports, ignoring the environment
/// (detected once, cached).
pub fn detected_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            if avx2 && avx512 {
                return Isa::Avx512Vnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

/// The instruction set the dispatching wrappers use: [`detected_isa`], capped
/// by `BRIGADE_FORCE_SCALAR=1` or `BRIGADE_ISA=scalar|avx2|avx512` (cached).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detected_isa();
        if std::env::var("BRIGADE_FORCE_SCALAR")
            .map(|v| v == "1")
            .unwrap_or(false)
        {
            return Isa::Scalar;
        }
        let cap = match std::env::var("BRIGADE_ISA").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512Vnni,
        };
        best.min(cap)
    })
}

/// Instruction sets available on this CPU, lowest first (for tests and benches).
pub fn available_isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
        .into_iter()
        .filter(|&i| i <= detected_isa())
        .collect()
}

/// Whether this CPU has AMX-TILE and AMX-INT8 and the OS lets this process
/// use the tile registers (Linux: permission requested once; cached).
pub fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        detected_isa() == Isa::Avx512Vnni && amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether [`matmul_packed`] uses AMX for full 16-row tiles: [`amx_available`],
/// [`isa`] is AVX-512 VNNI, and `BRIGADE_AMX` is not `0` (cached).
pub fn amx_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        isa() == Isa::Avx512Vnni
            && std::env::var("BRIGADE_AMX")
                .map(|v| v != "0")
                .unwrap_or(true)
            && amx_available()
    })
}

/// Errors from building kernel views over raw weight bytes.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The dtype has no kernel of the requested kind: [`QMatrix::new`]
    /// accepts every [`GgmlDType`]; [`PackedMatrix::new`] only the types of
    /// [`PackedMatrix::SUPPORTED`].
    #[error("ggml type {} has no packed matmul kernel (packed: {}; the others use the raw-block kernels)", .0.name(), PackedMatrix::SUPPORTED)]
    UnsupportedDType(GgmlDType),
    /// Row length is not a multiple of the dtype's block size.
    #[error("row length {cols} is not a multiple of the block size {block} of {dtype:?}")]
    BadRowLength {
        /// Weight type.
        dtype: GgmlDType,
        /// Row length.
        cols: usize,
        /// Block length it must be a multiple of.
        block: usize,
    },
    /// Byte buffer size does not match rows x cols.
    #[error("weight data has {got} bytes, expected {expected} for {rows}x{cols} {dtype:?}")]
    BadSize {
        /// Weight type.
        dtype: GgmlDType,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
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
    pub fn new(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        // Every dtype has a kernel: SIMD for the common ones, the scalar
        // integer dot (`scalar::vec_dot_q`) for Q2_K, Q3_K, IQ4_NL, IQ4_XS
        // on raw blocks (and all of them on CPUs without AVX2); on AVX-512
        // VNNI every quantized dtype runs packed (`PackedMatrix`).
        let block = dtype.block_size();
        if !cols.is_multiple_of(block) || ((dtype.block_size() > 1) && !cols.is_multiple_of(QK)) {
            return Err(KernelError::BadRowLength { dtype, cols, block });
        }
        let expected = rows * (cols / block) * dtype.type_size();
        if data.len() != expected {
            return Err(KernelError::BadSize {
                dtype,
                rows,
                cols,
                expected,
                got: data.len(),
            });
        }
        Ok(Self {
            dtype,
            rows,
            cols,
            data,
        })
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

    /// Dequantizes row `i` into `out` (`out.len() == cols`) with the reference
    /// dequantizer ([`crate::quant::dequantize_row`]).
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        crate::quant::dequantize_row(self.dtype, self.row(i), &mut out[..self.cols]);
    }
}

/// Quantizes `n` rows of `cols` activations to Q8 blocks (bit-identical on
/// every ISA).
pub fn quantize_rows_q8(x: &[f32], cols: usize, out: &mut [BlockQ8]) {
    quantize_rows_q8_isa(isa(), x, cols, out)
}

/// [`quantize_rows_q8`] with an explicit instruction set (capped at
/// [`detected_isa`]).
pub fn quantize_rows_q8_isa(isa: Isa, x: &[f32], cols: usize, out: &mut [BlockQ8]) {
    assert!(
        cols.is_multiple_of(QK),
        "quantize_rows_q8: cols must be a multiple of 32"
    );
    let nb = cols / QK;
    for (row, blocks) in x.chunks_exact(cols).zip(out.chunks_exact_mut(nb)) {
        #[cfg(target_arch = "x86_64")]
        if isa.min(detected_isa()) == Isa::Avx512Vnni {
            // SAFETY: avx512f/bw/vl detected; `row.len() == blocks.len() * 32`.
            unsafe { avx512::quantize_q8(row, blocks) };
            continue;
        }
        scalar::quantize_q8(row, blocks);
    }
}

/// Largest element of `v` (`-inf` when empty; NaNs are skipped): the
/// sampler's softmax and argmax over the vocabulary.
pub fn max_f32(v: &[f32]) -> f32 {
    max_f32_isa(isa(), v)
}

/// [`max_f32`] with an explicit instruction set (capped at [`detected_isa`]).
pub fn max_f32_isa(isa: Isa, v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.min(detected_isa()) == Isa::Avx512Vnni {
        // SAFETY: avx512f detected; the kernel reads within `v`.
        return unsafe { avx512::max_f32(v) };
    }
    scalar::max_f32(v)
}

/// `sum_i exp(v[i] - m)` for `m >= max(v)` (softmax normalizer; relative
/// error below 1e-6 against the f64 reference).
pub fn sum_exp(v: &[f32], m: f32) -> f64 {
    sum_exp_isa(isa(), v, m)
}

/// [`sum_exp`] with an explicit instruction set (capped at [`detected_isa`]).
pub fn sum_exp_isa(isa: Isa, v: &[f32], m: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if isa.min(detected_isa()) == Isa::Avx512Vnni {
        // SAFETY: avx512f detected; the kernel reads within `v`.
        return unsafe { avx512::sum_exp(v, m) };
    }
    scalar::sum_exp(v, m)
}

/// SwiGLU gate: `g[i] = silu(g[i]) * u[i]`, `silu(x) = x / (1 + exp(-x))`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    silu_mul_isa(isa(), g, u)
}

/// [`silu_mul`] with an explicit instruction set (capped at [`detected_isa`]).
pub fn silu_mul_isa(isa: Isa, g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "silu_mul: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if isa.min(detected_isa()) == Isa::Avx512Vnni {
        // SAFETY: avx512f detected; lengths equal (asserted above).
        return unsafe { avx512::silu_mul(g, u) };
    }
    scalar::silu_mul(g, u)
}

/// GeGLU gate: `g[i] = gelu_tanh(g[i]) * u[i]` (tanh-approximated GELU, as
/// PyTorch's `gelu(approximate="tanh")`; Gemma's feed-forward).
pub fn gelu_tanh_mul(g: &mut [f32], u: &[f32]) {
    gelu_tanh_mul_isa(isa(), g, u)
}

/// [`gelu_tanh_mul`] with an explicit instruction set (capped at
/// [`detected_isa`]; AVX-512 kernel, scalar elsewhere).
pub fn gelu_tanh_mul_isa(isa: Isa, g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "gelu_tanh_mul: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if isa.min(detected_isa()) == Isa::Avx512Vnni {
        // SAFETY: avx512f detected; lengths equal (asserted above).
        return unsafe { avx512::gelu_tanh_mul(g, u) };
    }
    scalar::gelu_tanh_mul(g, u)
}

/// Soft-capping: `v[i] = cap * tanh(v[i] / cap)` (Gemma 2's final logits;
/// `cap > 0`).
pub fn softcap(v: &mut [f32], cap: f32) {
    softcap_isa(isa(), v, cap)
}

/// [`softcap`] with an explicit instruction set (capped at [`detected_isa`];
/// AVX-512 kernel, scalar elsewhere).
pub fn softcap_isa(isa: Isa, v: &mut [f32], cap: f32) {
    #[cfg(target_arch = "x86_64")]
    if isa.min(detected_isa()) == Isa::Avx512Vnni {
        // SAFETY: avx512f detected; the kernel reads and writes within `v`.
        return unsafe { avx512::softcap(v, cap) };
    }
    scalar::softcap(v, cap)
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
pub fn matmul(
    w: &QMatrix<'_>,
    x: &Activations<'_>,
    out: &mut [f32],
    pool: Option<&rayon::ThreadPool>,
) {
    matmul_isa(isa(), w, x, out, pool)
}

/// [`matmul`] with an explicit instruction set (capped at [`detected_isa`]);
/// raw (unpacked) weights use the AVX2 kernel on AVX-512 CPUs too.
pub fn matmul_isa(
    isa: Isa,
    w: &QMatrix<'_>,
    x: &Activations<'_>,
    out: &mut [f32],
    pool: Option<&rayon::ThreadPool>,
) {
    let isa = isa.min(detected_isa());
    let n = x.n;
    assert!(x.f.len() >= n * w.cols, "matmul: activations too short");
    if w.dtype.block_size() > 1 {
        assert!(
            x.q.len() >= n * (w.cols / QK),
            "matmul: q8 activations too short"
        );
    }
    assert!(out.len() >= n * w.rows, "matmul: output too short");
    let shared = SharedOut(out.as_mut_ptr(), out.len());
    let run = |cols: std::ops::Range<usize>| {
        // SAFETY: `shared` spans `out`; each call writes only columns `cols`
        // of each row, and the column ranges of concurrent calls are disjoint.
        let out = unsafe { shared.slice() };
        matmul_cols(isa, w, x, out, cols);
    };
    split_columns(pool, w.rows, 8, &run);
}

/// Runs `run` over disjoint ranges of `0..n_units` (column units), split over
/// the threads of `pool` in chunks that are multiples of `align` units.
fn split_columns(
    pool: Option<&rayon::ThreadPool>,
    n_units: usize,
    align: usize,
    run: &(dyn Fn(std::ops::Range<usize>) + Sync),
) {
    match pool {
        Some(p) if p.current_num_threads() > 1 && n_units >= 2 * align => {
            let nt = p.current_num_threads();
            // A few chunks per thread for balance on a shared machine.
            let chunk = (n_units.div_ceil(nt * 4))
                .next_multiple_of(align)
                .max(align);
            let n_chunks = n_units.div_ceil(chunk);
            p.scope(|s| {
                for c in 1..n_chunks {
                    s.spawn(move |_| run(c * chunk..((c + 1) * chunk).min(n_units)));
                }
                run(0..chunk.min(n_units));
            });
        }
        _ => run(0..n_units),
    }
}

/// Computes output columns `cols` of every row. Sizes were checked by `matmul`.
fn matmul_cols(
    isa: Isa,
    w: &QMatrix<'_>,
    x: &Activations<'_>,
    out: &mut [f32],
    cols: std::ops::Range<usize>,
) {
    let n = x.n;
    let stride = w.rows;
    if w.dtype.block_size() <= 1 {
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            let kind = match w.dtype {
                GgmlDType::F16 => avx2::FKind::F16,
                GgmlDType::BF16 => avx2::FKind::BF16,
                _ => avx2::FKind::F32,
            };
            let k = w.cols;
            let mut r = 0;
            while r < n {
                let take = (n - r).min(4);
                let xs = &x.f[r * k..(r + take) * k];
                let os = &mut out[r * stride..];
                // SAFETY: avx2/fma/f16c detected (`isa` is capped at
                // `detected_isa()`); `w.data` holds `w.rows` rows of `k`
                // elements of the float dtype (checked in QMatrix::new) and
                // cols.end <= w.rows; `xs` holds `take * k` floats; `os`
                // holds at least `(take - 1) * stride + cols.end` floats
                // (checked in `matmul_isa`).
                unsafe {
                    match take {
                        4 => avx2::tile_f::<4>(kind, w.data, k, xs, os, stride, cols.clone()),
                        3 => avx2::tile_f::<3>(kind, w.data, k, xs, os, stride, cols.clone()),
                        2 => avx2::tile_f::<2>(kind, w.data, k, xs, os, stride, cols.clone()),
                        _ => avx2::tile_f::<1>(kind, w.data, k, xs, os, stride, cols.clone()),
                    }
                }
                r += take;
            }
            return;
        }
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
    if let (true, Some(kind)) = (isa >= Isa::Avx2, avx2::QKind::of(w.dtype)) {
        let mut r = 0;
        while r < n {
            let take = (n - r).min(4);
            let xs = &x.q[r * nb..(r + take) * nb];
            let os = &mut out[r * stride..];
            // SAFETY: avx2/fma/f16c detected (`isa` is capped at
            // `detected_isa()`); `w.data` holds `w.rows * nb` blocks (checked
            // in QMatrix::new) and cols.end <= w.rows; `xs` holds `take * nb`
            // blocks; `os` holds at least `(take - 1) * stride + cols.end`
            // floats (checked in `matmul_isa`).
            unsafe {
                match (kind.legacy(), take) {
                    (true, 4) => avx2::tile_q::<4>(kind, w.data, nb, xs, os, stride, cols.clone()),
                    (true, 3) => avx2::tile_q::<3>(kind, w.data, nb, xs, os, stride, cols.clone()),
                    (true, 2) => avx2::tile_q::<2>(kind, w.data, nb, xs, os, stride, cols.clone()),
                    (true, _) => avx2::tile_q::<1>(kind, w.data, nb, xs, os, stride, cols.clone()),
                    (false, 4) => {
                        avx2::tile_qx::<4>(kind, w.data, nb, xs, os, stride, cols.clone())
                    }
                    (false, 3) => {
                        avx2::tile_qx::<3>(kind, w.data, nb, xs, os, stride, cols.clone())
                    }
                    (false, 2) => {
                        avx2::tile_qx::<2>(kind, w.data, nb, xs, os, stride, cols.clone())
                    }
                    (false, _) => {
                        avx2::tile_qx::<1>(kind, w.data, nb, xs, os, stride, cols.clone())
                    }
                }
            }
            r += take;
        }
        return;
    }
    let _ = isa;
    if matches!(w.dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0) {
        for r in 0..n {
            let xr = &x.q[r * nb..(r + 1) * nb];
            for o in cols.clone() {
                out[r * stride + o] = scalar::vec_dot_q(w.dtype, w.row(o), xr);
            }
        }
        return;
    }
    // Every other type: each weight row decoded once to integer blocks, then
    // dotted with every activation row (the operations of `vec_dot_q`).
    let mut ib = Vec::with_capacity(nb);
    for o in cols {
        ib.clear();
        scalar::for_each_int_block(w.dtype, w.row(o), |_, b| ib.push(*b));
        for r in 0..n {
            out[r * stride + o] = scalar::vec_dot_int(&ib, &x.q[r * nb..(r + 1) * nb]);
        }
    }
}

/// `out[r * p.rows() + o] = sum_k w[o, k] * x[r, k]` over packed weights
/// (AVX-512 VNNI kernel; the scalar reference elsewhere — same results, bit
/// for bit). Column groups are split over the threads of `pool`; results are
/// bit-identical for any pool size and any batch composition.
pub fn matmul_packed(
    p: &PackedMatrix,
    x: &Activations<'_>,
    out: &mut [f32],
    pool: Option<&rayon::ThreadPool>,
) {
    matmul_packed_isa(isa(), p, x, out, pool)
}

/// [`matmul_packed`] with an explicit instruction set (capped at
/// [`detected_isa`]); AMX as [`amx_enabled`] says.
pub fn matmul_packed_isa(
    isa: Isa,
    p: &PackedMatrix,
    x: &Activations<'_>,
    out: &mut [f32],
    pool: Option<&rayon::ThreadPool>,
) {
    matmul_packed_opts(isa, amx_enabled(), p, x, out, pool)
}

/// [`matmul_packed_isa`] with AMX chosen explicitly (`amx` is ignored unless
/// `isa` is AVX-512 VNNI and [`amx_available`]; it never changes the results).
pub fn matmul_packed_opts(
    isa: Isa,
    amx: bool,
    p: &PackedMatrix,
    x: &Activations<'_>,
    out: &mut [f32],
    pool: Option<&rayon::ThreadPool>,
) {
    matmul_packed_digits(isa, amx, Digits::Two, p, x, out, pool)
}

/// How many digits of the Q8 activations a matmul reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Digits {
    /// Both (`qs` and the residual `qr`): about 15 bits per activation.
    #[default]
    Two,
    /// The first only: the caller zeroed every `qr` ([`zero_second_digit`]),
    /// so the AVX-512 kernel skips their products. The results equal, bit for
    /// bit, those of [`Digits::Two`] on the same activations (every kernel).
    One,
}

/// Drops the second digit of Q8 activations: `qr = 0` and `s` re-derived from
/// `qs` alone, so every kernel computes the dot products of weights with
/// `d * qs` (8-bit activations, round to nearest, as llama.cpp's Q8_0).
pub fn zero_second_digit(q: &mut [BlockQ8]) {
    for b in q {
        let sum: i32 = b.qs.iter().map(|&v| v as i32).sum();
        b.qr = [0; QK];
        b.s = b.d / Q8_RESIDUAL_SCALE * (sum * Q8_RESIDUAL_SCALE as i32) as f32;
    }
}

/// [`matmul_packed_opts`] reading `digits` of the activations (see [`Digits`]).
pub fn matmul_packed_digits(
    isa: Isa,
    amx: bool,
    digits: Digits,
    p: &PackedMatrix,
    x: &Activations<'_>,
    out: &mut [f32],
    pool: Option<&rayon::ThreadPool>,
) {
    debug_assert!(
        digits == Digits::Two || x.q.iter().all(|b| b.qr == [0; QK]),
        "Digits::One with a non-zero second digit"
    );
    let isa = isa.min(detected_isa());
    let amx = amx && isa == Isa::Avx512Vnni && amx_available();
    let (n, nb) = (x.n, p.nb);
    assert!(
        x.q.len() >= n * nb,
        "matmul_packed: q8 activations too short"
    );
    assert!(out.len() >= n * p.rows(), "matmul_packed: output too short");
    // Half-block activation sums for the kinds with 16-element sub-blocks
    // (exact integer sums, one rounding: the same for every split).
    let xh: Vec<[f32; 2]> = if p.kind.halves() == 2 {
        x.q[..n * nb].iter().map(scalar::half_sums).collect()
    } else {
        Vec::new()
    };
    // The rows AMX runs, repacked as tiles once for every thread.
    #[cfg(target_arch = "x86_64")]
    let act = {
        let mut act = Vec::new();
        if amx && n >= AMX_MIN_ROWS && nb > 0 {
            for r0 in (0..n).step_by(MACRO_ROWS) {
                let rows = amx_rows((r0 + MACRO_ROWS).min(n) - r0);
                amx::pack_activations(x.q, &xh, nb, r0..r0 + rows, &mut act);
            }
        }
        act
    };
    #[cfg(not(target_arch = "x86_64"))]
    let act: Vec<ActLine> = Vec::new();
    let shared = SharedOut(out.as_mut_ptr(), out.len());
    let run = |groups: std::ops::Range<usize>| {
        // SAFETY: `shared` spans `out`; each call writes only the columns of
        // `groups` of each row; the group ranges of concurrent calls are disjoint.
        let out = unsafe { shared.slice() };
        matmul_packed_groups(isa, p, x, &xh, &act, out, groups, digits == Digits::One);
    };
    split_columns(pool, p.n_groups(), 1, &run);
}

/// Activation rows whose Q8 blocks stay cache-resident while a thread sweeps
/// its column groups (weights are then read once per macro tile).
const MACRO_ROWS: usize = 64;

/// Fewest rows run on an AMX tile (zero-padded to 16); fewer stay on VNNI,
/// which is faster there. Measured (`benches/kernels.rs` group `matmul_amx`,
/// one thread, Xeon with AMX): a padded tile costs AMX the same at 5, 8 or
/// 16 rows, and VNNI's cost grows with the rows; they cross at about 8 rows
/// for Q8_0, 10 for Q5_0, 11 for Q4_K and 16 for Q6_K (at 5 rows AMX took
/// 1.2-2.7x VNNI's time). Outputs are the same bits either way.
#[cfg(target_arch = "x86_64")]
const AMX_MIN_ROWS: usize = 12;

/// Rows of a macro tile of `rows` rows that AMX runs: its 16-row tiles, and
/// its last rows too when there are [`AMX_MIN_ROWS`] of them.
#[cfg(target_arch = "x86_64")]
fn amx_rows(rows: usize) -> usize {
    let tail = rows % amx::TILE_ROWS;
    if tail >= AMX_MIN_ROWS {
        rows
    } else {
        rows - tail
    }
}

/// One line of repacked AMX activations.
#[cfg(target_arch = "x86_64")]
type ActLine = amx::Line;
#[cfg(not(target_arch = "x86_64"))]
type ActLine = ();

/// Computes the output columns of column groups `groups` for every row.
/// `act`: the [`amx_rows`] of every macro tile repacked for AMX (empty: VNNI
/// only; AMX checked available by the caller).
#[allow(clippy::too_many_arguments)]
fn matmul_packed_groups(
    isa: Isa,
    p: &PackedMatrix,
    x: &Activations<'_>,
    xh: &[[f32; 2]],
    act: &[ActLine],
    out: &mut [f32],
    groups: std::ops::Range<usize>,
    one_digit: bool,
) {
    let (n, nb, stride) = (x.n, p.nb, p.rows());
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni {
        const T: usize = avx512::MAX_TILE_ROWS;
        // AMX for the full 16-row tiles of a macro tile, and for its last
        // rows zero-padded to a tile when there are at least AMX_MIN_ROWS of
        // them; the session configures this thread's tiles for the chunk.
        const TR: usize = amx::TILE_ROWS;
        let tiles = if act.is_empty() {
            None
        } else {
            amx::Tiles::new(p.kind)
        };
        let mut scratch = match &tiles {
            Some(_) if !p.kind.byte_quants() => {
                vec![amx::Line([0; 64]); nb * amx::B_TILE_BYTES / 64]
            }
            _ => Vec::new(),
        };
        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + MACRO_ROWS).min(n);
            let amx_rows = if tiles.is_none() {
                0
            } else {
                amx_rows(r1 - r0)
            };
            // This macro tile's repacked tiles (every earlier one has MACRO_ROWS rows).
            let at = amx::act_lines(r0 / TR, nb);
            let act = &act[at.min(act.len())
                ..(at + amx::act_lines(amx_rows.div_ceil(TR), nb)).min(act.len())];
            for g in groups.clone() {
                let gp = p.group(g).as_ptr();
                let valid = (stride - g * GROUP).min(GROUP);
                let lanes = ((1u32 << valid) - 1) as u16;
                let mut r = r0;
                if let (Some(t), true) = (&tiles, amx_rows > 0) {
                    let op = out[r * stride + g * GROUP..].as_mut_ptr();
                    let last_rows = amx_rows - (amx_rows - 1) / TR * TR;
                    // SAFETY: AMX is available and `t` configured this
                    // thread for `p.kind`; `gp` spans packed group `g` of
                    // `nb` blocks; `act` holds `amx_rows.div_ceil(16)` tiles
                    // of `nb` blocks; `out` holds `n * stride` floats, so
                    // rows `r0..r0 + amx_rows` fit; only the `valid` lanes
                    // are stored; `scratch` holds `nb` B tiles for the kinds
                    // that unpack.
                    unsafe {
                        amx::gemm_group(
                            t,
                            p.kind,
                            gp,
                            nb,
                            act,
                            op,
                            stride,
                            lanes,
                            last_rows,
                            amx::lines_bytes_mut(&mut scratch),
                        )
                    };
                    r += amx_rows;
                }
                while r < r1 {
                    let take = (r1 - r).min(T);
                    let xp = x.q[r * nb..].as_ptr();
                    let hp = if xh.is_empty() {
                        std::ptr::null()
                    } else {
                        xh[r * nb..].as_ptr()
                    };
                    let op = out[r * stride + g * GROUP..].as_mut_ptr();
                    // SAFETY: avx512f/bw/vl/vnni detected (`isa` is capped at
                    // `detected_isa()`); `gp` spans packed group `g` of `nb`
                    // blocks; `x.q` holds `n * nb >= (r + take) * nb` blocks
                    // (and `xh`, when the kind reads it, as many pairs) and
                    // `out` holds `n * stride` floats, so rows `r..r +
                    // take` fit; only the `valid` lanes (columns `< stride`)
                    // are stored.
                    unsafe {
                        match take {
                            8 => avx512::gemm_group::<8>(
                                p.kind, gp, nb, xp, hp, nb, op, stride, lanes, one_digit,
                            ),
                            7 => avx512::gemm_group::<7>(
                                p.kind, gp, nb, xp, hp, nb, op, stride, lanes, one_digit,
                            ),
                            6 => avx512::gemm_group::<6>(
                                p.kind, gp, nb, xp, hp, nb, op, stride, lanes, one_digit,
                            ),
                            5 => avx512::gemm_group::<5>(
                                p.kind, gp, nb, xp, hp, nb, op, stride, lanes, one_digit,
                            ),
                            4 => avx512::gemm_group::<4>(
                                p.kind, gp, nb, xp, hp, nb, op, stride, lanes, one_digit,
                            ),
                            3 => avx512::gemm_group::<3>(
                                p.kind, gp, nb, xp, hp, nb, op, stride, lanes, one_digit,
                            ),
                            2 => avx512::gemm_group::<2>(
                                p.kind, gp, nb, xp, hp, nb, op, stride, lanes, one_digit,
                            ),
                            _ => avx512::gemm_group::<1>(
                                p.kind, gp, nb, xp, hp, nb, op, stride, lanes, one_digit,
                            ),
                        }
                    }
                    r += take;
                }
            }
            r0 = r1;
        }
        return;
    }
    let _ = (isa, act, one_digit);
    for r in 0..n {
        let xr = &x.q[r * nb..(r + 1) * nb];
        for o in groups.start * GROUP..(groups.end * GROUP).min(stride) {
            out[r * stride + o] = packed::ref_dot(p, o, xr);
        }
    }
}

/// [`matmul_packed`] when `packed` is given, else [`matmul`] on the raw `w`.
/// The model calls this with the `Option` from [`PackedMatrix::for_current_isa`].
pub fn matmul_best(
    w: &QMatrix<'_>,
    packed: Option<&PackedMatrix>,
    x: &Activations<'_>,
    out: &mut [f32],
    pool: Option<&rayon::ThreadPool>,
) {
    match packed {
        Some(p) => {
            debug_assert!(
                p.rows() == w.rows && p.cols() == w.cols,
                "matmul_best: packed matrix of another shape"
            );
            matmul_packed(p, x, out, pool)
        }
        None => matmul(w, x, out, pool),
    }
}

/// [`matmul_best`] reading `digits` of the activations (see [`Digits`]; the
/// unpacked kernels read both, which gives the same results).
pub fn matmul_best_digits(
    w: &QMatrix<'_>,
    packed: Option<&PackedMatrix>,
    digits: Digits,
    x: &Activations<'_>,
    out: &mut [f32],
    pool: Option<&rayon::ThreadPool>,
) {
    match packed {
        Some(p) => matmul_packed_digits(isa(), amx_enabled(), digits, p, x, out, pool),
        None => matmul(w, x, out, pool),
    }
}

/// Keys per online-softmax step of the attention kernels (one 512-bit
/// register of f32 lanes).
pub const ATT_CHUNK: usize = 16;

/// Most query heads per KV head the attention kernels support.
pub const MAX_GROUP: usize = 16;

/// Geometry of the paged KV cache for [`attend_f16`] / [`attend_ref`].
///
/// Per block and layer, K is stored transposed per KV head and V row-major:
///
/// ```text
/// k: [block][kv_head][head_dim][block_size]   (a key is a column of its head's slab)
/// v: [block][block_size][kv_dim]              (kv_dim = kv_heads * head_dim)
/// ```
///
/// so the scores of 16 consecutive keys are one vector of multiply-adds over
/// `head_dim`, and a value row is contiguous.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    /// Elements per head.
    pub head_dim: usize,
    /// Query heads per KV head (grouped-query attention).
    pub group: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// K (or V) elements per token: KV heads x head_dim.
    pub kv_dim: usize,
    /// Score scale, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Logit soft-cap: scores become `cap * tanh(score / cap)` (Gemma 2).
    pub softcap: Option<f32>,
}

impl AttnShape {
    /// Checks the arguments of one attention call (panics with a message on
    /// a violated precondition: these are internal invariants, never input).
    #[allow(clippy::too_many_arguments)]
    fn check<T>(
        &self,
        q: &[f32],
        kvh: usize,
        k: &[T],
        v: &[T],
        table: &[u32],
        keys: &Range<usize>,
        out: &[f32],
    ) {
        let (hd, bs) = (self.head_dim, self.block_size);
        assert!(
            hd > 0 && bs > 0 && (1..=MAX_GROUP).contains(&self.group),
            "attend: bad shape {self:?}"
        );
        assert!(
            self.softcap.is_none_or(|c| c > 0.0 && c.is_finite()),
            "attend: soft-cap must be > 0"
        );
        assert!(
            q.len() == self.group * hd && out.len() == q.len(),
            "attend: q/out must be group x head_dim"
        );
        assert!(
            (kvh + 1) * hd <= self.kv_dim && self.kv_dim.is_multiple_of(hd),
            "attend: KV head {kvh} outside kv_dim"
        );
        assert!(keys.start < keys.end, "attend: empty key range {keys:?}");
        assert!(
            table.len() >= keys.end.div_ceil(bs),
            "attend: block table shorter than the context"
        );
        // Only the blocks of the key range are read (blocks before a sliding
        // window may already be freed).
        let nblk = k.len().min(v.len()) / (bs * self.kv_dim);
        assert!(
            table[keys.start / bs..keys.end.div_ceil(bs)]
                .iter()
                .all(|&b| (b as usize) < nblk),
            "attend: block id out of range"
        );
    }
}

/// Attention of the query heads of KV head `kvh` (`q`, `out`: `group x
/// head_dim`) at position `keys.end - 1` over the keys at positions `keys`
/// (`0..pos + 1` for full causal attention, `pos + 1 - window..pos + 1` for a
/// sliding window: blocks before `keys.start` are not read), reading keys and
/// values through `table` (f16 cache; layout in [`AttnShape`]).
#[allow(clippy::too_many_arguments)]
pub fn attend_f16(
    s: &AttnShape,
    q: &[f32],
    kvh: usize,
    k: &[f16],
    v: &[f16],
    table: &[u32],
    keys: Range<usize>,
    out: &mut [f32],
) {
    attend_f16_isa(isa(), s, q, kvh, k, v, table, keys, out)
}

/// [`attend_f16`] with an explicit instruction set (capped at
/// [`detected_isa`]). AVX-512 covers head_dim 64 with up to 4 query heads per
/// KV head, head_dim 128 with up to 2 and head_dim 256 with 1, 2 or 4 (Gemma);
/// AVX2 head_dim 64 (groups up to 4), 128 and 256 (groups 1, 2, 4); other
/// shapes run the scalar reference.
#[allow(clippy::too_many_arguments)]
pub fn attend_f16_isa(
    isa: Isa,
    s: &AttnShape,
    q: &[f32],
    kvh: usize,
    k: &[f16],
    v: &[f16],
    table: &[u32],
    keys: Range<usize>,
    out: &mut [f32],
) {
    s.check(q, kvh, k, v, table, &keys, out);
    attention::run_segments(s, keys, out, |seg, m, l, acc| {
        attend_f16_part(isa, s, q, kvh, k, v, table, seg, m, l, acc)
    });
}

/// One segment of [`attend_f16_isa`] (`keys` inside one segment of
/// [`attention::segments`]): its running max
/// `m` and sum `l` per head and unnormalised output `acc`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_f16_part(
    isa: Isa,
    s: &AttnShape,
    q: &[f32],
    kvh: usize,
    k: &[f16],
    v: &[f16],
    table: &[u32],
    keys: Range<usize>,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
) {
    s.check(q, kvh, k, v, table, &keys, acc);
    assert!(
        m.len() >= s.group && l.len() >= s.group,
        "attend: state buffers too small"
    );
    #[cfg(target_arch = "x86_64")]
    {
        let (qp, kp, vp) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
        let (mp, lp, op) = (m.as_mut_ptr(), l.as_mut_ptr(), acc.as_mut_ptr());
        let (bs, kd, sc, cap) = (s.block_size, s.kv_dim, s.scale, s.softcap);
        let (start, n_ctx) = (keys.start, keys.end);
        macro_rules! go {
            ($m:ident, $g:literal, $hv:literal) => {
                go!(@ $m, $g, $hv, ::<$g, $hv>)
            };
            ($m:ident, $g:literal, $hv:literal, $hc:literal) => {
                go!(@ $m, $g, $hv, ::<$g, $hv, $hc>)
            };
            (@ $m:ident, $g:literal, $hv:literal, $($gen:tt)*) => {
                // SAFETY: the ISA's features were detected (`isa` is capped at
                // `detected_isa`); `check` verified the q/acc sizes (group x
                // head_dim), the KV head range, `start < n_ctx`, the table
                // length and that every block id of the key range lies
                // inside `k` and `v`; `m` and `l` hold group floats.
                return unsafe { $m::attend_f16$($gen)*(qp, kvh, kp, vp, bs, kd, table, start, n_ctx, sc, cap, mp, lp, op) }
            };
        }
        // Register-resident accumulators: (group, head_dim / lanes) pairs per ISA
        // (AVX-512: and the vectors of the head accumulated per pass over V).
        match (isa.min(detected_isa()), s.head_dim, s.group) {
            (Isa::Avx512Vnni, 64, 1) => go!(avx512, 1, 4, 4),
            (Isa::Avx512Vnni, 64, 2) => go!(avx512, 2, 4, 4),
            (Isa::Avx512Vnni, 64, 3) => go!(avx512, 3, 4, 4),
            (Isa::Avx512Vnni, 64, 4) => go!(avx512, 4, 4, 4),
            (Isa::Avx512Vnni, 128, 1) => go!(avx512, 1, 8, 8),
            (Isa::Avx512Vnni, 128, 2) => go!(avx512, 2, 8, 8),
            (Isa::Avx512Vnni, 256, 1) => go!(avx512, 1, 16, 8),
            (Isa::Avx512Vnni, 256, 2) => go!(avx512, 2, 16, 8),
            (Isa::Avx512Vnni, 256, 4) => go!(avx512, 4, 16, 4),
            (Isa::Avx2, 64, 1) => go!(avx2, 1, 8),
            (Isa::Avx2, 64, 2) => go!(avx2, 2, 8),
            (Isa::Avx2, 64, 3) => go!(avx2, 3, 8),
            (Isa::Avx2, 64, 4) => go!(avx2, 4, 8),
            (Isa::Avx2, 128, 1) => go!(avx2, 1, 16),
            (Isa::Avx2, 128, 2) => go!(avx2, 2, 16),
            (Isa::Avx2, 128, 4) => go!(avx2, 4, 16),
            (Isa::Avx2, 256, 1) => go!(avx2, 1, 32),
            (Isa::Avx2, 256, 2) => go!(avx2, 2, 32),
            (Isa::Avx2, 256, 4) => go!(avx2, 4, 32),
            _ => {}
        }
    }
    let _ = isa;
    scalar::attend_part(s, q, kvh, k, v, table, keys, m, l, acc, f16::to_f32)
}

/// Scalar attention for any stored element type (bf16 and f32 caches), with
/// the same layout and steps as [`attend_f16`].
#[allow(clippy::too_many_arguments)]
pub fn attend_ref<T: Copy>(
    s: &AttnShape,
    q: &[f32],
    kvh: usize,
    k: &[T],
    v: &[T],
    table: &[u32],
    keys: Range<usize>,
    out: &mut [f32],
    cvt: impl Fn(T) -> f32,
) {
    s.check(q, kvh, k, v, table, &keys, out);
    scalar::attend(s, q, kvh, k, v, table, keys, out, cvt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut rand::rngs::SmallRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn pack_kind_discriminants_round_trip() {
        // The specialised AVX-512 kernel gets its kind back from the discriminant.
        let kinds: Vec<_> = GgmlDType::ALL
            .iter()
            .filter_map(|&d| packed::PackKind::of(d))
            .collect();
        assert_eq!(kinds.len(), 12);
        for k in kinds {
            assert_eq!(packed::PackKind::from_u8(k as u8), k);
        }
    }

    /// Byte offsets of the f16 scale fields of a quantized dtype's block,
    /// with the range of values each gets in random blocks.
    fn scale_fields(dtype: GgmlDType) -> Vec<(usize, std::ops::Range<f32>)> {
        let d = 0.001f32..0.05;
        match dtype {
            GgmlDType::Q4_1 | GgmlDType::Q5_1 => vec![(0, d), (2, -0.2..0.0)],
            // K-quants: the sub-block scales multiply d (6-bit: up to 63).
            GgmlDType::Q4_K | GgmlDType::Q5_K => vec![(0, 0.0005..0.002), (2, 0.0..0.003)],
            GgmlDType::Q2_K => vec![(80, 0.001..0.01), (82, 0.0..0.01)],
            GgmlDType::Q3_K => vec![(108, 0.0005..0.002)],
            GgmlDType::Q6_K => vec![(208, 0.0002..0.001)],
            GgmlDType::IQ4_XS => vec![(0, 0.0001..0.001)],
            GgmlDType::IQ4_NL => vec![(0, 0.0002..0.001)],
            _ => vec![(0, d)],
        }
    }

    /// Builds random raw blocks of a quantized dtype: random quant and
    /// sub-scale bytes, small finite f16 scales.
    fn rand_weights(
        rng: &mut rand::rngs::SmallRng,
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
    ) -> Vec<u8> {
        let (bs, ts) = (dtype.block_size(), dtype.type_size());
        let mut out = Vec::with_capacity(rows * cols / bs * ts);
        for _ in 0..rows * cols / bs {
            let mut blk: Vec<u8> = (0..ts).map(|_| rng.gen::<u8>()).collect();
            for (at, range) in scale_fields(dtype) {
                blk[at..at + 2].copy_from_slice(&f16::from_f32(rng.gen_range(range)).to_le_bytes());
            }
            out.extend_from_slice(&blk);
        }
        out
    }

    /// Quantized dtypes (every one has a packed kernel, which the tests cover).
    fn packed_dtypes() -> impl Iterator<Item = GgmlDType> {
        GgmlDType::ALL.into_iter().filter(|d| d.block_size() > 1)
    }

    /// Every quantized dtype.
    const QUANT: [GgmlDType; 12] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2_K,
        GgmlDType::Q3_K,
        GgmlDType::Q4_K,
        GgmlDType::Q5_K,
        GgmlDType::Q6_K,
        GgmlDType::IQ4_NL,
        GgmlDType::IQ4_XS,
    ];

    #[test]
    fn int_blocks_dequantize_bit_identically() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        for dtype in QUANT {
            let cols = 512;
            let data = rand_weights(&mut rng, dtype, 3, cols);
            let w = QMatrix::new(dtype, 3, cols, &data).unwrap();
            for o in 0..3 {
                let mut want = vec![f32::NAN; cols];
                w.dequantize_row(o, &mut want);
                let mut got = vec![f32::NAN; cols];
                let mut seen = 0;
                scalar::for_each_int_block(dtype, w.row(o), |b, ib| {
                    let mut v = [0.0; QK];
                    ib.dequantize(&mut v);
                    got[b * QK..(b + 1) * QK].copy_from_slice(&v);
                    seen += 1;
                });
                assert_eq!(seen, cols / QK, "{dtype:?}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{dtype:?} row {o}");
            }
        }
    }

    #[test]
    fn every_dtype_loads_and_bad_shapes_are_one_line_errors() {
        for dtype in GgmlDType::ALL {
            let cols = 256;
            let data = vec![0u8; 2 * cols / dtype.block_size() * dtype.type_size()];
            assert!(QMatrix::new(dtype, 2, cols, &data).is_ok(), "{dtype:?}");
        }
        let e = QMatrix::new(GgmlDType::Q4_K, 1, 96, &[0; 54]).unwrap_err();
        assert!(
            matches!(e, KernelError::BadRowLength { block: 256, .. }),
            "{e}"
        );
        let e = QMatrix::new(GgmlDType::Q5_0, 1, 48, &[0; 33]).unwrap_err();
        assert!(matches!(e, KernelError::BadRowLength { .. }), "{e}");
        let w = QMatrix::new(GgmlDType::F16, 1, 256, &[0; 512]).unwrap();
        let e = PackedMatrix::new(&w).unwrap_err().to_string();
        assert!(
            !e.contains('\n') && e.contains("F16") && e.contains(PackedMatrix::SUPPORTED),
            "{e}"
        );
        // Every quantized dtype has a packed kind.
        for dtype in QUANT {
            let data = vec![0u8; 256 / dtype.block_size() * dtype.type_size()];
            assert!(
                PackedMatrix::new(&QMatrix::new(dtype, 1, 256, &data).unwrap()).is_ok(),
                "{dtype:?}"
            );
        }
    }

    /// Every output of `matmul_isa` / `matmul_packed_isa` for one ISA.
    fn run_isa(
        isa: Isa,
        packed: Option<&PackedMatrix>,
        w: &QMatrix<'_>,
        x: &Activations<'_>,
        pool: Option<&rayon::ThreadPool>,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; x.n * w.rows];
        match packed {
            Some(p) => matmul_packed_isa(isa, p, x, &mut out, pool),
            None => matmul_isa(isa, w, x, &mut out, pool),
        }
        out
    }

    #[test]
    fn simd_matmul_matches_scalar_reference() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for dtype in QUANT {
            for &(rows, cols, n) in &[
                (8usize, 32usize, 1usize),
                (17, 64, 3),
                (64, 256, 5),
                (100, 576, 9),
                (48, 96, 70),
                (40, 512, 4),
            ] {
                if !cols.is_multiple_of(dtype.block_size()) {
                    continue;
                }
                let data = rand_weights(&mut rng, dtype, rows, cols);
                let w = QMatrix::new(dtype, rows, cols, &data).unwrap();
                let p = PackedMatrix::new(&w).ok();
                let xf = rand_vec(&mut rng, n * cols);
                let mut xq = vec![BlockQ8::default(); n * cols / QK];
                quantize_rows_q8(&xf, cols, &mut xq);
                let x = Activations { f: &xf, q: &xq, n };
                let nb = cols / QK;
                for isa in available_isas() {
                    for packed in [None, p.as_ref()] {
                        let out = run_isa(isa, packed, &w, &x, None);
                        for r in 0..n {
                            let xr = &xq[r * nb..(r + 1) * nb];
                            for o in 0..rows {
                                let want = scalar::vec_dot_q(dtype, w.row(o), xr);
                                let got = out[r * rows + o];
                                let tol = 1e-4 * (1.0 + want.abs());
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{isa:?} packed={} {dtype:?} r{r} o{o}: {got} vs {want}",
                                    packed.is_some()
                                );
                                if let Some(p) = packed {
                                    // The packed kernel equals its scalar reference bit for bit.
                                    assert_eq!(
                                        got.to_bits(),
                                        packed::ref_dot(p, o, xr).to_bits(),
                                        "{isa:?} {dtype:?} r{r} o{o}"
                                    );
                                }
                            }
                        }
                        // Against full-precision dequantized weights: the Q8 activation error budget.
                        let mut wrow = vec![0.0; cols];
                        for o in 0..rows {
                            w.dequantize_row(o, &mut wrow);
                            let exact: f32 = wrow.iter().zip(&xf[..cols]).map(|(a, b)| a * b).sum();
                            let norm: f32 =
                                wrow.iter().map(|v| v.abs()).sum::<f32>() / 127.0 + 1e-3;
                            assert!(
                                (out[o] - exact).abs() <= norm,
                                "{dtype:?} o{o}: {} vs {exact}",
                                out[o]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn one_digit_matmul_equals_the_full_kernels_on_zeroed_residuals() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(23);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for dtype in QUANT {
            for &(rows, cols, n) in &[(17usize, 256usize, 3usize), (40, 512, 9), (64, 256, 70)] {
                let data = rand_weights(&mut rng, dtype, rows, cols);
                let w = QMatrix::new(dtype, rows, cols, &data).unwrap();
                let p = PackedMatrix::new(&w).unwrap();
                let xf = rand_vec(&mut rng, n * cols);
                let mut xq = vec![BlockQ8::default(); n * cols / QK];
                quantize_rows_q8(&xf, cols, &mut xq);
                let full = xq.clone();
                zero_second_digit(&mut xq);
                // s follows qs alone: d * sum(qs), exactly.
                for b in &xq {
                    let sum: i32 = b.qs.iter().map(|&v| v as i32).sum();
                    assert_eq!(b.s, b.d * sum as f32, "{dtype:?}");
                }
                let x = Activations { f: &xf, q: &xq, n };
                let nb = cols / QK;
                for isa in available_isas() {
                    let mut two = vec![f32::NAN; n * rows];
                    matmul_packed_digits(isa, false, Digits::Two, &p, &x, &mut two, Some(&pool));
                    for amx in [false, true] {
                        let mut one = vec![f32::NAN; n * rows];
                        matmul_packed_digits(isa, amx, Digits::One, &p, &x, &mut one, Some(&pool));
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&one),
                            bits(&two),
                            "{isa:?} amx={amx} {dtype:?} {rows}x{cols} n={n}"
                        );
                    }
                    // ... which is the scalar reference on the one-digit activations, and
                    // within 8-bit activation error of the two-digit result.
                    for r in 0..n {
                        for o in 0..rows {
                            let got = two[r * rows + o];
                            assert_eq!(
                                got.to_bits(),
                                packed::ref_dot(&p, o, &xq[r * nb..(r + 1) * nb]).to_bits(),
                                "{isa:?} {dtype:?}"
                            );
                            let precise = packed::ref_dot(&p, o, &full[r * nb..(r + 1) * nb]);
                            let mut wrow = vec![0.0; cols];
                            w.dequantize_row(o, &mut wrow);
                            let xr = &xf[r * cols..(r + 1) * cols];
                            let amax = xr.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                            let bound: f32 =
                                wrow.iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0 + 1e-4;
                            assert!(
                                (got - precise).abs() <= bound,
                                "{dtype:?} r{r} o{o}: {got} vs {precise} (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn float_matmul_matches_scalar_and_is_batch_invariant() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(19);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
            for &(rows, cols, n) in &[
                (5usize, 8usize, 1usize),
                (17, 40, 3),
                (64, 576, 9),
                (33, 256, 6),
            ] {
                let vals = rand_vec(&mut rng, rows * cols);
                let data: Vec<u8> = match dtype {
                    GgmlDType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    GgmlDType::F16 => vals
                        .iter()
                        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                        .collect(),
                    _ => vals
                        .iter()
                        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                        .collect(),
                };
                let w = QMatrix::new(dtype, rows, cols, &data).unwrap();
                let xf = rand_vec(&mut rng, n * cols);
                let x = Activations { f: &xf, q: &[], n };
                let mut wrow = vec![0.0; cols];
                for isa in available_isas() {
                    let all = run_isa(isa, None, &w, &x, Some(&pool));
                    for r in 0..n {
                        let xr = &xf[r * cols..(r + 1) * cols];
                        // Each row alone (and single-threaded) gives the same bits.
                        let one = run_isa(
                            isa,
                            None,
                            &w,
                            &Activations {
                                f: xr,
                                q: &[],
                                n: 1,
                            },
                            None,
                        );
                        assert_eq!(
                            &all[r * rows..(r + 1) * rows],
                            &one[..],
                            "{isa:?} {dtype:?} row {r}"
                        );
                        for o in 0..rows {
                            w.dequantize_row(o, &mut wrow);
                            let want = scalar::vec_dot_f(dtype, w.row(o), xr);
                            let mag: f32 = wrow.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                            let got = all[r * rows + o];
                            assert!(
                                (got - want).abs() <= 1e-5 * (mag + 1e-3),
                                "{isa:?} {dtype:?} r{r} o{o}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn packed_layout_round_trips() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        for dtype in packed_dtypes() {
            let (rows, cols) = (37, 512);
            let data = rand_weights(&mut rng, dtype, rows, cols);
            let w = QMatrix::new(dtype, rows, cols, &data).unwrap();
            let p = PackedMatrix::new(&w).unwrap();
            assert_eq!(p.size_bytes() % 64, 0);
            let mut want = vec![0.0; cols];
            for o in 0..rows {
                w.dequantize_row(o, &mut want);
                let mut got = vec![f32::NAN; cols];
                p.dequantize_row(o, &mut got);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{dtype:?} row {o}"
                );
                for b in 0..cols / QK {
                    let (d, m, u) = p.block(o, b);
                    for k in 0..QK {
                        let got = d[k / 16] * u[k] as f32 + m[k / 16];
                        assert!(
                            (got - want[b * QK + k]).abs() <= 1e-6 * (1.0 + got.abs()),
                            "{dtype:?} o{o} b{b} k{k}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_rows_are_batch_invariant_and_thread_invariant() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let pool3 = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for dtype in QUANT {
            // n > MACRO_ROWS: every tile size 1..=8 and a macro-tile boundary occur.
            let (rows, cols, n) = (200, 256, 75);
            let data = rand_weights(&mut rng, dtype, rows, cols);
            let w = QMatrix::new(dtype, rows, cols, &data).unwrap();
            let p = PackedMatrix::new(&w).ok();
            let xf = rand_vec(&mut rng, n * cols);
            let mut xq = vec![BlockQ8::default(); n * cols / QK];
            quantize_rows_q8(&xf, cols, &mut xq);
            let nb = cols / QK;
            for isa in available_isas() {
                for packed in [None, p.as_ref()] {
                    let all = run_isa(
                        isa,
                        packed,
                        &w,
                        &Activations { f: &xf, q: &xq, n },
                        Some(&pool),
                    );
                    let all3 = run_isa(
                        isa,
                        packed,
                        &w,
                        &Activations { f: &xf, q: &xq, n },
                        Some(&pool3),
                    );
                    let all1 = run_isa(isa, packed, &w, &Activations { f: &xf, q: &xq, n }, None);
                    assert_eq!(all, all3, "{isa:?} {dtype:?} 2 vs 3 threads");
                    assert_eq!(all, all1, "{isa:?} {dtype:?} 2 vs 1 thread");
                    // Sub-batches of every size 1..=9 at shifting offsets.
                    let mut start = 0;
                    for len in (1..=9).cycle() {
                        if start >= n {
                            break;
                        }
                        let len = len.min(n - start);
                        let x = Activations {
                            f: &xf[start * cols..(start + len) * cols],
                            q: &xq[start * nb..(start + len) * nb],
                            n: len,
                        };
                        let part = run_isa(
                            isa,
                            packed,
                            &w,
                            &x,
                            if len % 2 == 0 { Some(&pool) } else { None },
                        );
                        assert_eq!(
                            &all[start * rows..(start + len) * rows],
                            &part[..],
                            "{isa:?} packed={} {dtype:?} rows {start}..{}",
                            packed.is_some(),
                            start + len
                        );
                        start += len;
                    }
                }
            }
        }
    }

    #[test]
    fn quantize_simd_is_bit_identical_to_scalar() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(13);
        let cols = 576;
        let mut xf = rand_vec(&mut rng, 8 * cols);
        // Exact rounding ties (k + 0.5 steps of d), an all-zero block and huge values.
        for (i, v) in xf[..QK].iter_mut().enumerate() {
            *v = (i as f32 - 16.0 + 0.5) * (1.0 / 127.0);
        }
        xf[QK] = 1.0;
        for (i, v) in xf[QK + 1..2 * QK].iter_mut().enumerate() {
            *v = (i as f32 - 15.5) / 127.0;
        }
        xf[2 * QK..3 * QK].fill(0.0);
        xf[3 * QK] = 3.0e30;
        let mut want = vec![BlockQ8::default(); 8 * cols / QK];
        quantize_rows_q8_isa(Isa::Scalar, &xf, cols, &mut want);
        for isa in available_isas() {
            let mut got = vec![BlockQ8::default(); 8 * cols / QK];
            quantize_rows_q8_isa(isa, &xf, cols, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    (g.d.to_bits(), g.s.to_bits(), g.qs, g.qr),
                    (w.d.to_bits(), w.s.to_bits(), w.qs, w.qr),
                    "{isa:?} block {i}"
                );
            }
        }
    }

    /// Plain softmax attention in f64 over keys/values given position-major
    /// (scores soft-capped when `softcap` is given).
    fn attention_f64(
        q: &[f32],
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        scale: f32,
        softcap: Option<f32>,
    ) -> Vec<f64> {
        let sc: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .map(|x| match softcap {
                Some(c) => c as f64 * (x / c as f64).tanh(),
                None => x,
            })
            .collect();
        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..q.len())
            .map(|d| {
                e.iter()
                    .zip(vals)
                    .map(|(w, v)| w * v[d] as f64)
                    .sum::<f64>()
                    / z
            })
            .collect()
    }

    #[test]
    fn paged_attention_matches_reference() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
        // (head_dim, group, kv_heads, block_size, n_ctx, window, softcap): SIMD
        // shapes and fallbacks, partial chunks and blocks, block sizes not a
        // multiple of 16; sliding windows starting inside a block, on a block
        // boundary and inside a chunk; soft-capped scores (scores scaled up
        // so the cap bends them).
        for &(hd, group, kvn, bs, n_ctx, window, softcap) in &[
            (64usize, 3usize, 3usize, 16usize, 1usize, None, None),
            (64, 3, 3, 16, 37, None, None),
            (64, 3, 3, 16, 300, None, None),
            (64, 1, 2, 32, 70, None, None),
            (64, 4, 1, 8, 19, None, None),
            (64, 2, 2, 24, 50, None, None),
            (128, 2, 2, 16, 33, None, None),
            (128, 1, 1, 128, 130, None, None),
            (32, 5, 2, 16, 21, None, None),
            (48, 3, 1, 5, 12, None, None),
            (256, 4, 1, 16, 45, None, None),
            (256, 2, 2, 32, 20, None, None),
            (256, 1, 1, 16, 70, Some(33usize), None),
            (64, 2, 2, 16, 100, Some(37), None),
            (64, 3, 1, 16, 100, Some(32), None),
            (64, 4, 2, 8, 61, Some(7), None),
            (128, 2, 1, 16, 90, Some(50), Some(3.0f32)),
            (128, 1, 2, 32, 70, Some(70), None),
            (64, 1, 1, 16, 50, None, Some(1.5)),
            (48, 3, 1, 5, 40, Some(11), Some(2.0)),
            (256, 4, 1, 16, 30, Some(9), Some(5.0)),
        ] {
            let kv_dim = kvn * hd;
            let nblk = n_ctx.div_ceil(bs) + 3;
            // A shuffled block table over a pool with spare blocks.
            let mut table: Vec<u32> = (0..nblk as u32).collect();
            for i in (1..table.len()).rev() {
                table.swap(i, rng.gen_range(0..=i));
            }
            let mut k = vec![f16::ZERO; nblk * bs * kv_dim];
            let mut v = vec![f16::ZERO; nblk * bs * kv_dim];
            let mut keys = vec![vec![vec![0.0f32; hd]; n_ctx]; kvn];
            let mut vals = vec![vec![vec![0.0f32; hd]; n_ctx]; kvn];
            for pos in 0..n_ctx {
                let (blk, off) = (table[pos / bs] as usize, pos % bs);
                for h in 0..kvn {
                    for d in 0..hd {
                        let (kx, vx) = (
                            f16::from_f32(rng.gen_range(-2.0f32..2.0)),
                            f16::from_f32(rng.gen_range(-1.0f32..1.0)),
                        );
                        k[blk * bs * kv_dim + h * hd * bs + d * bs + off] = kx;
                        v[(blk * bs + off) * kv_dim + h * hd + d] = vx;
                        keys[h][pos][d] = kx.to_f32();
                        vals[h][pos][d] = vx.to_f32();
                    }
                }
            }
            let start = window.map_or(0, |w| n_ctx.saturating_sub(w));
            // Blocks wholly before the window are never read: point them
            // past the pool (check() and the kernels must not touch them).
            for b in table[..start / bs].iter_mut() {
                *b = u32::MAX;
            }
            let scale = if softcap.is_some() {
                4.0
            } else {
                1.0 / (hd as f32).sqrt()
            };
            let s = AttnShape {
                head_dim: hd,
                group,
                block_size: bs,
                kv_dim,
                scale,
                softcap,
            };
            let case = format!("{hd}/{group}/{bs}/{n_ctx} window {window:?} cap {softcap:?}");
            for kvh in 0..kvn {
                let q = rand_vec(&mut rng, group * hd);
                let mut want = vec![0.0f32; group * hd];
                scalar::attend(
                    &s,
                    &q,
                    kvh,
                    &k,
                    &v,
                    &table,
                    start..n_ctx,
                    &mut want,
                    f16::to_f32,
                );
                for g in 0..group {
                    let exact = attention_f64(
                        &q[g * hd..(g + 1) * hd],
                        &keys[kvh][start..],
                        &vals[kvh][start..],
                        s.scale,
                        softcap,
                    );
                    for (a, b) in want[g * hd..(g + 1) * hd].iter().zip(&exact) {
                        assert!((*a as f64 - b).abs() < 1e-5, "scalar {case}: {a} vs {b}");
                    }
                }
                // Soft-capped scores go through each ISA's tanh (abs. error
                // < 2e-7 of tanh, i.e. `cap * 2e-7` of a score).
                let tol = if softcap.is_some() { 1e-5 } else { 2e-6 };
                for isa in available_isas() {
                    let mut got = vec![f32::NAN; group * hd];
                    attend_f16_isa(isa, &s, &q, kvh, &k, &v, &table, start..n_ctx, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() < tol, "{isa:?} {case}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_reductions_match_scalar() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
        for n in [0usize, 1, 15, 17, 63, 64, 65, 1000, 49152] {
            let mut v: Vec<f32> = (0..n).map(|_| rng.gen_range(-20.0f32..20.0)).collect();
            if n > 3 {
                v[1] = f32::NAN;
                v[2] = f32::NEG_INFINITY;
            }
            let want_max = scalar::max_f32(&v);
            let finite: Vec<f32> = v.iter().copied().filter(|x| !x.is_nan()).collect();
            let want_sum = scalar::sum_exp(&finite, want_max);
            for isa in available_isas() {
                assert_eq!(
                    max_f32_isa(isa, &v).to_bits(),
                    want_max.to_bits(),
                    "{isa:?} n{n}"
                );
                if n > 0 {
                    let got = sum_exp_isa(isa, &finite, want_max);
                    assert!(
                        (got / want_sum - 1.0).abs() < 1e-6,
                        "{isa:?} n{n}: {got} vs {want_sum}"
                    );
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_scalar() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        for n in [1usize, 15, 16, 17, 100, 1536] {
            let mut g: Vec<f32> = (0..n).map(|_| rng.gen_range(-30.0f32..30.0)).collect();
            g[0] = -200.0; // exp(-x) saturates: silu -> -0
            if n > 1 {
                g[1] = 200.0;
            }
            let u = rand_vec(&mut rng, n);
            let mut want = g.clone();
            scalar::silu_mul(&mut want, &u);
            for isa in available_isas() {
                let mut got = g.clone();
                silu_mul_isa(isa, &mut got, &u);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                        "{isa:?} n{n}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "block id out of range")]
    fn paged_attention_checks_block_ids() {
        let s = AttnShape {
            head_dim: 64,
            group: 3,
            block_size: 16,
            kv_dim: 192,
            scale: 0.125,
            softcap: None,
        };
        let (k, v) = (vec![f16::ZERO; 2 * 16 * 192], vec![f16::ZERO; 2 * 16 * 192]);
        let mut out = vec![0.0; 192];
        attend_f16(&s, &[0.0; 192], 0, &k, &v, &[0, 2], 0..20, &mut out);
    }

    #[test]
    #[should_panic(expected = "block id out of range")]
    fn paged_attention_checks_block_ids_inside_the_window() {
        let s = AttnShape {
            head_dim: 64,
            group: 3,
            block_size: 16,
            kv_dim: 192,
            scale: 0.125,
            softcap: None,
        };
        let (k, v) = (vec![f16::ZERO; 2 * 16 * 192], vec![f16::ZERO; 2 * 16 * 192]);
        let mut out = vec![0.0; 192];
        // Block 0 lies before the window (never read); block 7 is inside it.
        attend_f16(&s, &[0.0; 192], 0, &k, &v, &[9, 1, 7], 17..40, &mut out);
    }

    #[test]
    fn gelu_tanh_and_softcap_match_scalar() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(21);
        for n in [1usize, 15, 16, 17, 100, 2048] {
            let mut g: Vec<f32> = (0..n).map(|_| rng.gen_range(-8.0f32..8.0)).collect();
            g[0] = -60.0; // tanh saturates
            if n > 2 {
                g[1] = 1e-4; // the Taylor branch near 0
                g[2] = 0.4999;
            }
            let u = rand_vec(&mut rng, n);
            let mut want = g.clone();
            scalar::gelu_tanh_mul(&mut want, &u);
            // The scalar reference against the formula in f64.
            for ((w, &x), &y) in want.iter().zip(&g).zip(&u) {
                let x = x as f64;
                let exact = 0.5
                    * x
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x))
                            .tanh())
                    * y as f64;
                assert!(
                    (*w as f64 - exact).abs() <= 1e-6 * (1.0 + exact.abs()),
                    "scalar gelu({x}): {w} vs {exact}"
                );
            }
            let cap = 30.0;
            let logits: Vec<f32> = g.iter().map(|x| x * 20.0).collect();
            let mut want_cap = logits.clone();
            scalar::softcap(&mut want_cap, cap);
            for isa in available_isas() {
                let mut got = g.clone();
                gelu_tanh_mul_isa(isa, &mut got, &u);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                        "{isa:?} gelu n{n}: {a} vs {b}"
                    );
                }
                let mut got = logits.clone();
                softcap_isa(isa, &mut got, cap);
                for (a, b) in got.iter().zip(&want_cap) {
                    assert!(
                        (a - b).abs() <= 1e-5 * cap,
                        "{isa:?} softcap n{n}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
