//! Physical paged K/V storage for a contiguous range of layers.
//!
//! Owns the K and V arrays of its layers only. Which block belongs to which
//! sequence (block tables, reference counts, prefix cache) is decided elsewhere
//! (the scheduler's block pool); every layer group uses the same block ids.
//!
//! Layout per layer (element type f16 by default, bf16, f32 or q8_0 selectable):
//!
//! ```text
//! k: [num_blocks][kv_heads][head_dim][block_size]   (per head transposed: a key is a column)
//! v: [num_blocks][block_size][kv_dim]                slot = block_id * block_size + offset
//! ```
//!
//! (the layout of [`crate::kernels::AttnShape`]: 16 consecutive keys of a head
//! are one SIMD load per dimension). A block occupies `block_size * kv_dim`
//! elements in both arrays, so copying a block is one contiguous copy.
//!
//! `q8_0` stores the same layout in i8 plus f16 scale arrays (one scale per
//! 32 elements of a K or V row; see [`crate::kernels::attention`]). Each row
//! is quantized on its own when written, so its bytes depend on nothing else.

use half::f16;

use crate::kernels::attention::{q8_groups, quantize_q8_group, KvView, Q8Kv, Q8_GROUP};

/// Element type of the K/V storage (the `[kv_cache] dtype` config key).
#[derive(Clone, Copy, Debug, serde::Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KvDType {
    /// IEEE half precision.
    #[default]
    F16,
    /// bfloat16.
    Bf16,
    /// f32.
    F32,
    /// 8-bit integers with one f16 scale per 32 elements of a row (ggml's
    /// Q8_0; layout in [`crate::kernels::attention`]): about half of f16's
    /// bytes.
    #[serde(rename = "q8_0")]
    Q8,
}

impl KvDType {
    /// Bytes of one stored K (or V) row of `kv_dim` elements.
    pub fn row_bytes(self, kv_dim: usize) -> usize {
        match self {
            KvDType::F16 | KvDType::Bf16 => 2 * kv_dim,
            KvDType::F32 => 4 * kv_dim,
            KvDType::Q8 => kv_dim + 2 * q8_groups(kv_dim),
        }
    }
}

/// Largest supported block size (attention keeps one block of scores on the stack).
pub const MAX_BLOCK_SIZE: usize = 128;

/// Element type of stored K/V (`f16` default; `bf16` or `f32` selectable).
pub trait KvElem: Copy + Send + Sync + bytemuck::Zeroable + 'static {
    /// Converts from f32 (round to nearest).
    fn from_f32(x: f32) -> Self;
}

impl KvElem for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl KvElem for half::bf16 {
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl KvElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
}

/// K and V arrays of every layer, in one element type.
#[derive(Debug)]
enum Arrays {
    F16 {
        k: Vec<Vec<f16>>,
        v: Vec<Vec<f16>>,
    },
    Bf16 {
        k: Vec<Vec<half::bf16>>,
        v: Vec<Vec<half::bf16>>,
    },
    F32 {
        k: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    },
    Q8 {
        k: Vec<Vec<i8>>,
        ks: Vec<Vec<f16>>,
        v: Vec<Vec<i8>>,
        vs: Vec<Vec<f16>>,
    },
}

/// The K and V arrays of one layer (the attention kernels' view).
pub type KvLayer<'a> = KvView<'a>;

/// Paged K/V storage of `n_layers` consecutive layers.
#[derive(Debug)]
pub struct KvStore {
    /// Tokens per block.
    pub block_size: usize,
    /// Number of physical blocks.
    pub num_blocks: usize,
    /// Width of one K (or V) row.
    pub kv_dim: usize,
    /// Elements per head (`kv_dim` is a multiple).
    pub head_dim: usize,
    /// First layer index stored here.
    pub first_layer: usize,
    /// Element type.
    pub dtype: KvDType,
    arrays: Arrays,
}

fn zeroed<T: bytemuck::Zeroable>(n_layers: usize, per_layer: usize) -> Vec<Vec<T>> {
    // Zeroed allocations (calloc): pages become resident only when a block is
    // first written, so memory follows the KV actually used.
    (0..n_layers)
        .map(|_| bytemuck::zeroed_vec::<T>(per_layer))
        .collect()
}

fn write_row<T: KvElem>(dst: &mut [T], src: &[f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = T::from_f32(x);
    }
}

/// Writes one key (`src`, kv_dim) at offset `off` of its block's transposed
/// per-head slabs (`dst`: the block, `block_size * kv_dim` elements).
fn write_key<T: KvElem>(dst: &mut [T], src: &[f32], head_dim: usize, bs: usize, off: usize) {
    for (h, kh) in src.chunks_exact(head_dim).enumerate() {
        let slab = &mut dst[h * head_dim * bs..(h + 1) * head_dim * bs];
        for (d, &x) in kh.iter().enumerate() {
            slab[d * bs + off] = T::from_f32(x);
        }
    }
}

impl KvStore {
    /// Allocates zeroed f16 storage for layers `first_layer..first_layer + n_layers`.
    pub fn new(
        first_layer: usize,
        n_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_dim: usize,
        head_dim: usize,
    ) -> Self {
        Self::with_dtype(
            first_layer,
            n_layers,
            num_blocks,
            block_size,
            kv_dim,
            head_dim,
            KvDType::F16,
        )
    }

    /// Allocates zeroed storage of element type `dtype`.
    pub fn with_dtype(
        first_layer: usize,
        n_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_dim: usize,
        head_dim: usize,
        dtype: KvDType,
    ) -> Self {
        assert!(
            block_size > 0 && block_size <= MAX_BLOCK_SIZE,
            "block size must be in 1..={MAX_BLOCK_SIZE}"
        );
        assert!(
            head_dim > 0 && kv_dim.is_multiple_of(head_dim),
            "kv_dim must be a multiple of head_dim"
        );
        let per_layer = num_blocks * block_size * kv_dim;
        let arrays = match dtype {
            KvDType::F16 => Arrays::F16 {
                k: zeroed(n_layers, per_layer),
                v: zeroed(n_layers, per_layer),
            },
            KvDType::Bf16 => Arrays::Bf16 {
                k: zeroed(n_layers, per_layer),
                v: zeroed(n_layers, per_layer),
            },
            KvDType::F32 => Arrays::F32 {
                k: zeroed(n_layers, per_layer),
                v: zeroed(n_layers, per_layer),
            },
            KvDType::Q8 => {
                let scales = num_blocks * block_size * q8_groups(kv_dim);
                Arrays::Q8 {
                    k: zeroed(n_layers, per_layer),
                    ks: zeroed(n_layers, scales),
                    v: zeroed(n_layers, per_layer),
                    vs: zeroed(n_layers, scales),
                }
            }
        };
        Self {
            block_size,
            num_blocks,
            kv_dim,
            head_dim,
            first_layer,
            dtype,
            arrays,
        }
    }

    fn n_layers(&self) -> usize {
        match &self.arrays {
            Arrays::F16 { k, .. } => k.len(),
            Arrays::Bf16 { k, .. } => k.len(),
            Arrays::F32 { k, .. } => k.len(),
            Arrays::Q8 { k, .. } => k.len(),
        }
    }

    /// Bytes of K/V storage held (reserved; resident only where written).
    pub fn bytes(&self) -> usize {
        2 * self.n_layers() * self.num_blocks * self.block_size * self.dtype.row_bytes(self.kv_dim)
    }

    /// Bytes one token occupies across `n_layers` layers (K and V, f16).
    pub fn bytes_per_token(n_layers: usize, kv_dim: usize) -> usize {
        2 * n_layers * KvDType::F16.row_bytes(kv_dim)
    }

    /// Physical slot of position `pos` through a block table.
    #[inline]
    pub fn slot(&self, block_table: &[u32], pos: usize) -> usize {
        block_table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Writes one token's K and V rows (f32 → storage type) for absolute `layer`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let l = layer - self.first_layer;
        let (bs, hd) = (self.block_size, self.head_dim);
        let blk = (slot / bs) * bs * self.kv_dim..(slot / bs + 1) * bs * self.kv_dim;
        let off = slot % bs;
        let r = slot * self.kv_dim..(slot + 1) * self.kv_dim;
        match &mut self.arrays {
            Arrays::F16 { k: ka, v: va } => {
                write_key(&mut ka[l][blk], k, hd, bs, off);
                write_row(&mut va[l][r], v);
            }
            Arrays::Bf16 { k: ka, v: va } => {
                write_key(&mut ka[l][blk], k, hd, bs, off);
                write_row(&mut va[l][r], v);
            }
            Arrays::F32 { k: ka, v: va } => {
                write_key(&mut ka[l][blk], k, hd, bs, off);
                write_row(&mut va[l][r], v);
            }
            Arrays::Q8 {
                k: ka,
                ks,
                v: va,
                vs,
            } => {
                let (kd, ng) = (self.kv_dim, q8_groups(self.kv_dim));
                let kblk = &mut ka[l][(slot / bs) * bs * kd..(slot / bs + 1) * bs * kd];
                let kscale = &mut ks[l][(slot / bs) * bs * ng..(slot / bs + 1) * bs * ng];
                let mut qk = [0i8; Q8_GROUP];
                for (gi, x) in k.chunks(Q8_GROUP).enumerate() {
                    kscale[gi * bs + off] = quantize_q8_group(x, &mut qk[..x.len()]);
                    for (e, &qx) in qk[..x.len()].iter().enumerate() {
                        let e = gi * Q8_GROUP + e;
                        kblk[(e / hd) * hd * bs + (e % hd) * bs + off] = qx;
                    }
                }
                let vrow = &mut va[l][r];
                let vscale = &mut vs[l][slot * ng..(slot + 1) * ng];
                for ((x, o), d) in v
                    .chunks(Q8_GROUP)
                    .zip(vrow.chunks_mut(Q8_GROUP))
                    .zip(vscale.iter_mut())
                {
                    *d = quantize_q8_group(x, o);
                }
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
            Arrays::Q8 { k, ks, v, vs } => {
                let ns = self.block_size * q8_groups(self.kv_dim);
                copy(k, src, dst, n);
                copy(v, src, dst, n);
                copy(ks, src, dst, ns);
                copy(vs, src, dst, ns);
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
            Arrays::Q8 { k, ks, v, vs } => KvLayer::Q8(Q8Kv {
                k: &k[l],
                k_scale: &ks[l],
                v: &v[l],
                v_scale: &vs[l],
            }),
        }
    }
}
