//! Physical paged K/V storage for a contiguous range of layers.
//!
//! Owns the K and V arrays of its layers only. Which block belongs to which
//! sequence (block tables, reference counts, prefix cache) is decided elsewhere
//! (the scheduler's block pool); every layer group uses the same block ids.
//!
//! Layout per layer (f16):
//!
//! ```text
//! k: [num_blocks][block_size][kv_dim]     slot = block_id * block_size + offset
//! v: [num_blocks][block_size][kv_dim]
//! ```

use half::f16;

/// Largest supported block size (attention keeps one block of scores on the stack).
pub const MAX_BLOCK_SIZE: usize = 128;

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
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl KvStore {
    /// Allocates zeroed storage for layers `first_layer..first_layer + n_layers`.
    pub fn new(first_layer: usize, n_layers: usize, num_blocks: usize, block_size: usize, kv_dim: usize) -> Self {
        assert!(block_size > 0 && block_size <= MAX_BLOCK_SIZE, "block size must be in 1..={MAX_BLOCK_SIZE}");
        let per_layer = num_blocks * block_size * kv_dim;
        Self {
            block_size,
            num_blocks,
            kv_dim,
            first_layer,
            // Zeroed allocations (calloc): pages become resident only when a
            // block is first written, so memory follows the KV actually used.
            k: (0..n_layers).map(|_| bytemuck::zeroed_vec::<f16>(per_layer)).collect(),
            v: (0..n_layers).map(|_| bytemuck::zeroed_vec::<f16>(per_layer)).collect(),
        }
    }

    /// Bytes of K/V storage held.
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.num_blocks * self.block_size * self.kv_dim * std::mem::size_of::<f16>()
    }

    /// Bytes one token occupies across `n_layers` layers (K and V, f16).
    pub fn bytes_per_token(n_layers: usize, kv_dim: usize) -> usize {
        2 * n_layers * kv_dim * std::mem::size_of::<f16>()
    }

    /// Physical slot of position `pos` through a block table.
    #[inline]
    pub fn slot(&self, block_table: &[u32], pos: usize) -> usize {
        block_table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Writes one token's K and V rows (f32 → f16) for absolute `layer`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let l = layer - self.first_layer;
        let d = self.kv_dim;
        for (dst, &x) in self.k[l][slot * d..(slot + 1) * d].iter_mut().zip(k) {
            *dst = f16::from_f32(x);
        }
        for (dst, &x) in self.v[l][slot * d..(slot + 1) * d].iter_mut().zip(v) {
            *dst = f16::from_f32(x);
        }
    }

    /// Copies block `src` to block `dst` in every layer held here.
    pub fn copy_block(&mut self, src: usize, dst: usize) {
        let n = self.block_size * self.kv_dim;
        for arr in self.k.iter_mut().chain(self.v.iter_mut()) {
            arr.copy_within(src * n..(src + 1) * n, dst * n);
        }
    }

    /// K and V arrays of absolute `layer`.
    pub fn layer(&self, layer: usize) -> (&[f16], &[f16]) {
        let l = layer - self.first_layer;
        (&self.k[l], &self.v[l])
    }
}
