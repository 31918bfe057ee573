//! Physical paged K/V storage for a contiguous range of layers.
//!
//! Owns the K and V arrays of its layers only. Which block belongs to which
//! sequence (block tables, reference counts, prefix cache) is decided elsewhere
//! (the scheduler's block pool); every layer group uses the same block ids.
//!
//! Layout per layer (element type f16 by default, bf16 or f32 selectable):
//!
//! ```text
//! k: [num_blocks][block_size][kv_dim]     slot = block_id * block_size + offset
//! v: [num_blocks][block_size][kv_dim]
//! ```

use half::f16;

pub use crate::config::KvDType;

/// Largest supported block size (attention keeps one block of scores on the stack).
pub const MAX_BLOCK_SIZE: usize = 128;

/// Element type of stored K/V (`f16` default; `bf16` or `f32` selectable).
pub trait KvElem: Copy + Send + Sync + bytemuck::Zeroable + 'static {
    /// Converts from f32 (round to nearest).
    fn from_f32(x: f32) -> Self;
    /// `out[j] = dot(q, rows[j * stride..][..q.len()])` for each `j < out.len()`.
    fn dot_rows(q: &[f32], rows: &[Self], stride: usize, out: &mut [f32]);
    /// `acc += sum_j w[j] * rows[j * stride..][..acc.len()]`.
    fn axpy_rows(acc: &mut [f32], w: &[f32], rows: &[Self], stride: usize);
}

impl KvElem for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn dot_rows(q: &[f32], rows: &[Self], stride: usize, out: &mut [f32]) {
        crate::kernels::dot_f16_rows(q, rows, stride, out)
    }
    fn axpy_rows(acc: &mut [f32], w: &[f32], rows: &[Self], stride: usize) {
        crate::kernels::axpy_f16_rows(acc, w, rows, stride)
    }
}

/// Scalar attention helpers for element types without SIMD kernels.
macro_rules! scalar_kv_elem {
    ($t:ty, $from:expr, $to:expr) => {
        impl KvElem for $t {
            fn from_f32(x: f32) -> Self {
                $from(x)
            }
            fn dot_rows(q: &[f32], rows: &[Self], stride: usize, out: &mut [f32]) {
                for (j, o) in out.iter_mut().enumerate() {
                    let r = &rows[j * stride..j * stride + q.len()];
                    *o = q.iter().zip(r).map(|(&a, &b)| a * $to(b)).sum();
                }
            }
            fn axpy_rows(acc: &mut [f32], w: &[f32], rows: &[Self], stride: usize) {
                for (j, &wj) in w.iter().enumerate() {
                    let r = &rows[j * stride..j * stride + acc.len()];
                    for (a, &b) in acc.iter_mut().zip(r) {
                        *a += wj * $to(b);
                    }
                }
            }
        }
    };
}
scalar_kv_elem!(half::bf16, half::bf16::from_f32, half::bf16::to_f32);
scalar_kv_elem!(f32, std::convert::identity, std::convert::identity);

/// K and V arrays of every layer, in one element type.
#[derive(Debug)]
enum Arrays {
    F16 { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
    Bf16 { k: Vec<Vec<half::bf16>>, v: Vec<Vec<half::bf16>> },
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
}

/// The K and V arrays of one layer.
#[derive(Clone, Copy, Debug)]
pub enum KvLayer<'a> {
    /// f16 storage.
    F16(&'a [f16], &'a [f16]),
    /// bf16 storage.
    Bf16(&'a [half::bf16], &'a [half::bf16]),
    /// f32 storage.
    F32(&'a [f32], &'a [f32]),
}

/// Paged K/V storage of `n_layers` consecutive layers.
#[derive(Debug)]
pub struct KvStore {
    /// Tokens per block.
    pub block_size: usize,
    /// Number of physical blocks.
    pub num_blocks: usize,
    /// Width of one K (or V) row.
    pub kv_dim: usize,
    /// First layer index stored here.
    pub first_layer: usize,
    /// Element type.
    pub dtype: KvDType,
    arrays: Arrays,
}

fn zeroed<T: bytemuck::Zeroable>(n_layers: usize, per_layer: usize) -> Vec<Vec<T>> {
    // Zeroed allocations (calloc): pages become resident only when a block is
    // first written, so memory follows the KV actually used.
    (0..n_layers).map(|_| bytemuck::zeroed_vec::<T>(per_layer)).collect()
}

fn write_row<T: KvElem>(dst: &mut [T], src: &[f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = T::from_f32(x);
    }
}

impl KvStore {
    /// Allocates zeroed f16 storage for layers `first_layer..first_layer + n_layers`.
    pub fn new(first_layer: usize, n_layers: usize, num_blocks: usize, block_size: usize, kv_dim: usize) -> Self {
        Self::with_dtype(first_layer, n_layers, num_blocks, block_size, kv_dim, KvDType::F16)
    }

    /// Allocates zeroed storage of element type `dtype`.
    pub fn with_dtype(
        first_layer: usize,
        n_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_dim: usize,
        dtype: KvDType,
    ) -> Self {
        assert!(block_size > 0 && block_size <= MAX_BLOCK_SIZE, "block size must be in 1..={MAX_BLOCK_SIZE}");
        let per_layer = num_blocks * block_size * kv_dim;
        let arrays = match dtype {
            KvDType::F16 => Arrays::F16 { k: zeroed(n_layers, per_layer), v: zeroed(n_layers, per_layer) },
            KvDType::Bf16 => Arrays::Bf16 { k: zeroed(n_layers, per_layer), v: zeroed(n_layers, per_layer) },
            KvDType::F32 => Arrays::F32 { k: zeroed(n_layers, per_layer), v: zeroed(n_layers, per_layer) },
        };
        Self { block_size, num_blocks, kv_dim, first_layer, dtype, arrays }
    }

    fn n_layers(&self) -> usize {
        match &self.arrays {
            Arrays::F16 { k, .. } => k.len(),
            Arrays::Bf16 { k, .. } => k.len(),
            Arrays::F32 { k, .. } => k.len(),
        }
    }

    /// Bytes of K/V storage held (reserved; resident only where written).
    pub fn bytes(&self) -> usize {
        2 * self.n_layers() * self.num_blocks * self.block_size * self.kv_dim * elem_bytes(self.dtype)
    }

    /// Bytes one token occupies across `n_layers` layers (K and V, f16).
    pub fn bytes_per_token(n_layers: usize, kv_dim: usize) -> usize {
        2 * n_layers * kv_dim * elem_bytes(KvDType::F16)
    }

    /// Physical slot of position `pos` through a block table.
    #[inline]
    pub fn slot(&self, block_table: &[u32], pos: usize) -> usize {
        block_table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Writes one token's K and V rows (f32 → storage type) for absolute `layer`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let l = layer - self.first_layer;
        let r = slot * self.kv_dim..(slot + 1) * self.kv_dim;
        match &mut self.arrays {
            Arrays::F16 { k: ka, v: va } => {
                write_row(&mut ka[l][r.clone()], k);
                write_row(&mut va[l][r], v);
            }
            Arrays::Bf16 { k: ka, v: va } => {
                write_row(&mut ka[l][r.clone()], k);
                write_row(&mut va[l][r], v);
            }
            Arrays::F32 { k: ka, v: va } => {
                write_row(&mut ka[l][r.clone()], k);
                write_row(&mut va[l][r], v);
            }
        }
    }

    /// Copies block `src` to block `dst` in every layer held here.
    pub fn copy_block(&mut self, src: usize, dst: usize) {
        let n = self.block_size * self.kv_dim;
        fn copy<T: Copy>(arrs: &mut [Vec<T>], src: usize, dst: usize, n: usize) {
            for a in arrs {
                a.copy_within(src * n..(src + 1) * n, dst * n);
            }
        }
        match &mut self.arrays {
            Arrays::F16 { k, v } => {
                copy(k, src, dst, n);
                copy(v, src, dst, n);
            }
            Arrays::Bf16 { k, v } => {
                copy(k, src, dst, n);
                copy(v, src, dst, n);
            }
            Arrays::F32 { k, v } => {
                copy(k, src, dst, n);
                copy(v, src, dst, n);
            }
        }
    }

    /// K and V arrays of absolute `layer`.
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        let l = layer - self.first_layer;
        match &self.arrays {
            Arrays::F16 { k, v } => KvLayer::F16(&k[l], &v[l]),
            Arrays::Bf16 { k, v } => KvLayer::Bf16(&k[l], &v[l]),
            Arrays::F32 { k, v } => KvLayer::F32(&k[l], &v[l]),
        }
    }
}

/// Bytes per stored element.
pub fn elem_bytes(dtype: KvDType) -> usize {
    match dtype {
        KvDType::F16 | KvDType::Bf16 => 2,
        KvDType::F32 => 4,
    }
}
