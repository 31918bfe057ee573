//! Paged KV-cache *metadata*: which blocks each sequence holds, reference counts,
//! the LRU free list and the prefix cache.
//!
//! Pure, synchronous structs (no threads, channels or clocks); the scheduler actor owns
//! one [`KvCacheManager`]. Physical K/V storage is not here: each worker keeps its
//! layers' K/V in `model::kv::KvStore`, indexed by the block ids handed out here
//! (slot = `block_id * block_size + offset`).
//!
//! - [`block_hash`]: chained 64-bit block hashes.
//! - [`block_pool`]: [`BlockPool`], the blocks, ref counts, LRU free list, `hash → block`.
//! - [`manager`]: [`KvCacheManager`], per-sequence block tables on top of the pool.

pub mod block_hash;
pub mod block_pool;
pub mod manager;

pub use block_hash::BlockHash;
pub use block_pool::{BlockId, BlockPool, CachedBlockRef};
pub use manager::{KvCacheManager, KvStats, DEFAULT_BLOCK_SIZE};

/// Errors of the KV-cache metadata layer: bad configuration or a caller's bookkeeping bug,
/// never "not enough free blocks" (`allocate`, `grow`, `copy_on_write` and
/// `allocate_slots` return `Ok(false)` for that, and then nothing changed). A caller that
/// gets one of these must not retry and wait: the state it asked about is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// `block_size` was 0.
    #[error("`block_size` must be >= 1, got 0")]
    ZeroBlockSize,
    /// `num_blocks` was 0 or too large for `u32` ids.
    #[error("`num_blocks` must be in 1..={max}, got {got}")]
    NumBlocks {
        /// Largest accepted value.
        max: usize,
        /// Value given.
        got: usize,
    },
    /// `allocate`/`fork` for a sequence that already holds blocks.
    #[error("sequence {0} already has blocks")]
    DuplicateSeq(u64),
    /// Operation on a sequence that holds no blocks.
    #[error("sequence {0} has no blocks")]
    UnknownSeq(u64),
    /// A block id out of range, or released while free.
    #[error("block {0} is out of range or not in use")]
    InvalidBlock(u32),
    /// The `computed` blocks passed to `allocate` are not a live cached prefix chain
    /// (another mutating call ran after `get_computed_blocks` and evicted them) or do
    /// not fit in `num_tokens`.
    #[error("computed prefix of {num_computed_blocks} blocks is invalid for {num_tokens} tokens: {reason}")]
    InvalidComputed {
        /// Blocks passed.
        num_computed_blocks: usize,
        /// Tokens requested.
        num_tokens: usize,
        /// What was wrong.
        reason: &'static str,
    },
    /// `commit_full_blocks` with more tokens than were allocated for the sequence.
    #[error("sequence {seq}: {got} computed tokens exceed its {max} allocated tokens")]
    ComputedBeyondAllocation {
        /// The sequence.
        seq: u64,
        /// Tokens passed.
        got: usize,
        /// Tokens allocated (`allocate`/`grow`).
        max: usize,
    },
}
