//! `KvCacheManager`: per-sequence block tables on top of a [`BlockPool`].
//!
//! Owns which blocks each sequence (`u64` id) holds, how many tokens each table has
//! room for and how many have been computed, and the prefix-cache bookkeeping (lookups,
//! registering full blocks, counters). It does not own the K/V data (workers do), the
//! token lists (the scheduler does) or any policy (who is preempted when `allocate`
//! returns `Ok(false)` is the scheduler's call).
//!
//! One sequence's table, `block_size` 4, after `allocate(s, 10, computed = [b3])` and
//! `commit_full_blocks(s, &tokens[..6])`:
//!
//! ```text
//!   positions   0 1 2 3 | 4 5 6 7 | 8 9 . .
//!   table       b3      | b0      | b1            num_tokens = 10 → ceil(10/4) = 3 blocks
//!               cached  | written | not yet       num_computed_tokens = 6
//!               (hit)   | 4..6    | written       full computed blocks: 1 (b3)
//! ```
//!
//! Typical step for one sequence (the caller owns the token list):
//! 1. new request: `(computed, n) = get_computed_blocks(&prompt)`, then
//!    `allocate(seq, prompt.len(), computed)` *before any other mutating call*; compute
//!    from position `n`;
//! 2. before writing K/V: `copy_on_write(seq, &mut copies)` (only needed after `fork`),
//!    copy each pushed `(src, dst)` block on every worker;
//! 3. after the forward pass: `commit_full_blocks(seq, &tokens[..num_computed])` with
//!    exactly the tokens whose K/V are now written;
//! 4. next token: `grow(seq, num_computed + 1)`; `Ok(false)` → preempt someone
//!    (`allocate_slots` does 2 and 4 in one all-or-nothing call);
//! 5. finished / preempted / aborted: `free(seq)`.
//!
//! "No room" and "bug" are different results: every call that needs free blocks answers
//! `Ok(false)` when there are too few (and changes nothing); an `Err(KvError)` always means
//! the caller's bookkeeping is broken (unknown or duplicate sequence, stale prefix blocks,
//! double free) and must fail that sequence, not wait for room.

use std::collections::HashMap;

use super::block_hash::{hash_block, BlockHash};
use super::block_pool::{BlockId, BlockPool, CachedBlockRef};
use super::KvError;

/// Default tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Counters and gauges of the KV cache, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KvStats {
    /// Total blocks.
    pub num_blocks: usize,
    /// Blocks with ref count 0 (free, possibly still cached).
    pub num_free_blocks: usize,
    /// Blocks held by at least one sequence.
    pub num_used_blocks: usize,
    /// Blocks in the prefix cache (in use or free).
    pub num_cached_blocks: usize,
    /// `get_computed_blocks` calls (prefix caching enabled only).
    pub num_prefix_queries: u64,
    /// Prompt tokens looked up (sum of `tokens.len()` over queries).
    pub prefix_query_tokens: u64,
    /// Tokens found cached (sum of returned `num_computed_tokens`).
    pub prefix_hit_tokens: u64,
    /// Cached blocks whose content was dropped because the block was reallocated.
    pub num_evictions: u64,
}

/// A full computed block of one sequence, as seen by the prefix cache.
#[derive(Clone, Copy, Debug)]
struct CommittedBlock {
    /// Chained hash of the block's tokens.
    hash: BlockHash,
    /// Block caching this content (this sequence's own block or an identical one), as of
    /// commit time; `None` if it could not be cached.
    canonical: Option<CachedBlockRef>,
}

/// Blocks of one sequence.
#[derive(Clone, Debug, Default)]
struct SeqBlocks {
    /// Block table: position `p` lives in `table[p / block_size]`.
    table: Vec<BlockId>,
    /// Tokens the table has room for (max over `allocate`/`grow`).
    num_tokens: usize,
    /// Tokens whose K/V are written (max over `commit_full_blocks`, or the prefix hit).
    num_computed_tokens: usize,
    /// Full computed blocks, in order (prefix caching only).
    committed: Vec<CommittedBlock>,
}

/// Per-sequence block tables over a fixed pool of KV-cache blocks, with prefix caching.
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    enable_prefix_caching: bool,
    seqs: HashMap<u64, SeqBlocks>,
    num_prefix_queries: u64,
    prefix_query_tokens: u64,
    prefix_hit_tokens: u64,
}

impl KvCacheManager {
    /// `num_blocks` blocks of `block_size` tokens ([`DEFAULT_BLOCK_SIZE`] is the usual choice).
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        enable_prefix_caching: bool,
    ) -> Result<Self, KvError> {
        Ok(Self {
            pool: BlockPool::new(num_blocks, block_size)?,
            enable_prefix_caching,
            seqs: HashMap::new(),
            num_prefix_queries: 0,
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    /// Blocks with ref count 0 (cached ones included: allocation evicts them).
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }

    /// Fraction of blocks held by sequences, in `[0, 1]`.
    pub fn usage(&self) -> f64 {
        self.pool.usage()
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching_enabled(&self) -> bool {
        self.enable_prefix_caching
    }

    /// Blocks needed to hold `num_tokens` tokens: `ceil(num_tokens / block_size)`.
    pub fn num_blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.pool.block_size())
    }

    /// Whether `num_tokens` tokens fit in the whole pool (with nothing else running).
    pub fn can_ever_fit(&self, num_tokens: usize) -> bool {
        self.num_blocks_for(num_tokens) <= self.pool.num_blocks()
    }

    /// Whether `seq` holds blocks.
    pub fn contains(&self, seq: u64) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Block table of `seq` (`None` if unknown), ready for the model's `&[u32]`.
    pub fn block_table(&self, seq: u64) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.table.as_slice())
    }

    /// Tokens `seq`'s table has room for (`None` if unknown).
    pub fn num_tokens(&self, seq: u64) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.num_tokens)
    }

    /// Tokens of `seq` whose K/V are written, as last reported (`None` if unknown).
    pub fn num_computed_tokens(&self, seq: u64) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.num_computed_tokens)
    }

    /// Gauges and counters.
    pub fn stats(&self) -> KvStats {
        let num_free_blocks = self.pool.num_free_blocks();
        KvStats {
            num_blocks: self.pool.num_blocks(),
            num_free_blocks,
            num_used_blocks: self.pool.num_blocks() - num_free_blocks,
            num_cached_blocks: self.pool.num_cached_blocks(),
            num_prefix_queries: self.num_prefix_queries,
            prefix_query_tokens: self.prefix_query_tokens,
            prefix_hit_tokens: self.prefix_hit_tokens,
            num_evictions: self.pool.num_evictions(),
        }
    }

    /// The pool (read only), e.g. for ref counts in tests.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Longest cached prefix of `tokens` in full blocks: `(block ids, num_computed_tokens)`
    /// with `num_computed_tokens = ids.len() * block_size`. At least one token is always
    /// left to compute, so at most `(len - 1) / block_size` blocks are returned.
    ///
    /// Takes no reference: pass the ids to [`Self::allocate`] before any other mutating
    /// call (a later allocation could evict them; `allocate` then fails with
    /// [`KvError::InvalidComputed`]). With prefix caching off, returns `(vec![], 0)` and
    /// counts nothing; otherwise counts one query, `tokens.len()` query tokens and
    /// `num_computed_tokens` hit tokens.
    pub fn get_computed_blocks(&mut self, tokens: &[u32]) -> (Vec<BlockId>, usize) {
        if !self.enable_prefix_caching {
            return (Vec::new(), 0);
        }
        let bs = self.pool.block_size();
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        let mut ids = Vec::new();
        let mut parent_hash = None;
        let mut parent = None;
        for block in tokens.chunks_exact(bs).take(max_blocks) {
            let hash = hash_block(parent_hash, block);
            match self.pool.lookup(hash, parent, block) {
                Some(r) => {
                    ids.push(r.id);
                    parent = Some(r);
                    parent_hash = Some(hash);
                }
                None => break,
            }
        }
        let num_computed_tokens = ids.len() * bs;
        self.num_prefix_queries += 1;
        self.prefix_query_tokens += tokens.len() as u64;
        self.prefix_hit_tokens += num_computed_tokens as u64;
        (ids, num_computed_tokens)
    }

    /// Gives new sequence `seq` a table with room for `num_tokens` tokens: the `computed`
    /// prefix blocks from [`Self::get_computed_blocks`] (ref +1, taken out of the free list
    /// if free) followed by fresh blocks. All or nothing: `Ok(false)` if not enough blocks
    /// are free, and then nothing changed (`computed` held no reference, so there is
    /// nothing to release).
    ///
    /// The free blocks needed are `ceil(num_tokens / block_size) - computed.len()` plus
    /// the computed blocks that are currently free.
    pub fn allocate(
        &mut self,
        seq: u64,
        num_tokens: usize,
        computed: Vec<BlockId>,
    ) -> Result<bool, KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::DuplicateSeq(seq));
        }
        let bs = self.pool.block_size();
        let invalid = |reason| KvError::InvalidComputed {
            num_computed_blocks: computed.len(),
            num_tokens,
            reason,
        };
        if computed.len().saturating_mul(bs) > num_tokens {
            return Err(invalid("more computed tokens than requested tokens"));
        }
        // The computed blocks must still be the cached chain the lookup found.
        let mut committed = Vec::with_capacity(computed.len());
        let mut parent = None;
        let mut num_free_computed = 0;
        for &id in &computed {
            let (Some(r), Some(hash)) = (self.pool.cached_ref(id), self.pool.block_hash(id)) else {
                return Err(invalid("block is not cached (evicted since the lookup?)"));
            };
            if self.pool.cached_parent(id) != Some(parent) {
                return Err(invalid("blocks do not form a cached prefix chain"));
            }
            if self.pool.ref_count(id) == Some(0) {
                num_free_computed += 1;
            }
            committed.push(CommittedBlock {
                hash,
                canonical: Some(r),
            });
            parent = Some(r);
        }
        let num_new = self.num_blocks_for(num_tokens) - computed.len();
        if self.pool.num_free_blocks() < num_new + num_free_computed {
            return Ok(false);
        }
        let mut table = computed;
        for &id in &table {
            self.pool.touch(id)?;
        }
        let allocated = self.pool.allocate_into(num_new, &mut table);
        debug_assert!(allocated, "free count checked above");
        let num_computed_tokens = committed.len() * bs;
        self.seqs.insert(
            seq,
            SeqBlocks {
                table,
                num_tokens,
                num_computed_tokens,
                committed,
            },
        );
        Ok(allocated)
    }

    /// Extends `seq`'s table to room for `num_tokens_total` tokens. All or nothing:
    /// `Ok(false)` if not enough blocks are free (nothing changed). A smaller total than
    /// before is a no-op returning `Ok(true)`.
    pub fn grow(&mut self, seq: u64, num_tokens_total: usize) -> Result<bool, KvError> {
        let bs = self.pool.block_size();
        let s = self.seqs.get_mut(&seq).ok_or(KvError::UnknownSeq(seq))?;
        let num_new = num_tokens_total.div_ceil(bs).saturating_sub(s.table.len());
        if !self.pool.allocate_into(num_new, &mut s.table) {
            return Ok(false);
        }
        s.num_tokens = s.num_tokens.max(num_tokens_total);
        Ok(true)
    }

    /// Records that the K/V of `tokens` (the sequence's first `tokens.len()` tokens,
    /// prompt + generated) are written, and with prefix caching puts every newly full
    /// block into the prefix cache. Pass *only* computed tokens: a block registered with
    /// a token whose K/V is not yet written would serve garbage to later hits.
    ///
    /// A block whose content is already cached in another block is left uncached (the
    /// other block stays canonical); so is every block after one whose cached parent was
    /// evicted meanwhile. Call after every step, also with prefix caching off (the computed
    /// count drives [`Self::copy_on_write`]). Tokens must not change between calls.
    pub fn commit_full_blocks(&mut self, seq: u64, tokens: &[u32]) -> Result<(), KvError> {
        let bs = self.pool.block_size();
        let s = self.seqs.get_mut(&seq).ok_or(KvError::UnknownSeq(seq))?;
        if tokens.len() > s.num_tokens {
            return Err(KvError::ComputedBeyondAllocation {
                seq,
                got: tokens.len(),
                max: s.num_tokens,
            });
        }
        s.num_computed_tokens = s.num_computed_tokens.max(tokens.len());
        if !self.enable_prefix_caching {
            return Ok(());
        }
        let num_full = tokens.len() / bs;
        for i in s.committed.len()..num_full {
            let block = &tokens[i * bs..(i + 1) * bs];
            let (parent_hash, parent) = match i.checked_sub(1).and_then(|p| s.committed.get(p)) {
                None => (None, Some(None)),
                Some(prev) => (Some(prev.hash), prev.canonical.map(Some)),
            };
            let hash = hash_block(parent_hash, block);
            // `parent == None`: the previous block could not be cached, so this one cannot be reached.
            let canonical = match (parent, s.table.get(i)) {
                (Some(parent), Some(&id)) => self.pool.register(id, hash, parent, block),
                _ => None,
            };
            s.committed.push(CommittedBlock { hash, canonical });
        }
        Ok(())
    }

    /// Releases `seq`'s blocks (ref −1 each; last block first, so that in the LRU order a
    /// prefix's tail is evicted before its head). Blocks reaching ref 0 return to the free
    /// list, cached ones reusable until evicted.
    ///
    /// Errors (bugs, not conditions): [`KvError::UnknownSeq`] if `seq` holds no blocks (a
    /// double free), [`KvError::InvalidBlock`] if its table held a free block (every other
    /// block is still released and the table is gone).
    pub fn free(&mut self, seq: u64) -> Result<(), KvError> {
        let s = self.seqs.remove(&seq).ok_or(KvError::UnknownSeq(seq))?;
        let mut result = Ok(());
        for &id in s.table.iter().rev() {
            if let Err(e) = self.pool.release(id) {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Makes `child` share all of `parent`'s blocks (ref +1 each) and counts. Never needs
    /// free blocks; before either writes K/V into a shared block, call
    /// [`Self::copy_on_write`] for it.
    pub fn fork(&mut self, parent: u64, child: u64) -> Result<(), KvError> {
        if parent == child || self.seqs.contains_key(&child) {
            return Err(KvError::DuplicateSeq(child));
        }
        let s = self
            .seqs
            .get(&parent)
            .ok_or(KvError::UnknownSeq(parent))?
            .clone();
        for &id in &s.table {
            self.pool.touch(id)?;
        }
        self.seqs.insert(child, s);
        Ok(())
    }

    /// Gives `seq` private copies of the shared (ref > 1) blocks it will write, i.e. those
    /// at or after position `num_computed_tokens`. Only the block holding that position can
    /// hold data (if `num_computed_tokens % block_size != 0`): for it `(src, dst)` is pushed
    /// to `copies`, and the caller must copy block `src` to `dst` on every worker before
    /// writing. Shared blocks after it hold nothing and are just replaced.
    ///
    /// All or nothing: `Ok(false)` if not enough blocks are free (nothing changed);
    /// `Ok(true)` when every block from the write position on is private (nothing to do
    /// included). [`KvError::UnknownSeq`] if `seq` holds no blocks.
    pub fn copy_on_write(
        &mut self,
        seq: u64,
        copies: &mut Vec<(BlockId, BlockId)>,
    ) -> Result<bool, KvError> {
        let needed = self.num_shared_to_write(seq)?;
        if needed == 0 {
            return Ok(true);
        }
        if needed > self.pool.num_free_blocks() {
            return Ok(false);
        }
        let bs = self.pool.block_size();
        let s = self.seqs.get_mut(&seq).ok_or(KvError::UnknownSeq(seq))?;
        let first_written = s.num_computed_tokens / bs;
        let pool = &mut self.pool;
        for j in first_written..s.table.len() {
            let src = s.table[j];
            if pool.ref_count(src).is_none_or(|r| r <= 1) {
                continue;
            }
            let Some(dst) = pool.allocate() else {
                // The free count was checked above; a pool that disagrees is broken.
                debug_assert!(false, "free count checked above");
                return Err(KvError::InvalidBlock(src));
            };
            pool.release(src)?;
            s.table[j] = dst;
            if j == first_written && s.num_computed_tokens % bs != 0 {
                copies.push((src, dst));
            }
        }
        Ok(true)
    }

    /// Makes `seq` ready to write K/V up to `num_tokens_total` tokens (vLLM's
    /// `allocate_slots`): private copies of the shared blocks it will write
    /// ([`Self::copy_on_write`], pushing a needed copy to `copies`) and room for
    /// `num_tokens_total` tokens ([`Self::grow`]). All or nothing across both:
    /// `Ok(false)` if the free blocks do not cover both (nothing changed, nothing pushed).
    ///
    /// Free blocks needed: shared blocks at or after the write position, plus
    /// `ceil(num_tokens_total / block_size) - table length` new ones.
    pub fn allocate_slots(
        &mut self,
        seq: u64,
        num_tokens_total: usize,
        copies: &mut Vec<(BlockId, BlockId)>,
    ) -> Result<bool, KvError> {
        let num_shared = self.num_shared_to_write(seq)?;
        let table_len = self.seqs.get(&seq).map_or(0, |s| s.table.len());
        let num_new = self
            .num_blocks_for(num_tokens_total)
            .saturating_sub(table_len);
        if num_shared + num_new > self.pool.num_free_blocks() {
            return Ok(false);
        }
        let copied = self.copy_on_write(seq, copies)?;
        let grown = self.grow(seq, num_tokens_total)?;
        debug_assert!(copied && grown, "free count checked above");
        Ok(copied && grown)
    }

    /// Shared (ref > 1) blocks of `seq` at or after its write position `num_computed_tokens`.
    fn num_shared_to_write(&self, seq: u64) -> Result<usize, KvError> {
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSeq(seq))?;
        let first_written = s.num_computed_tokens / self.pool.block_size();
        Ok(s.table
            .iter()
            .skip(first_written)
            .filter(|&&id| self.pool.ref_count(id).is_some_and(|r| r > 1))
            .count())
    }

    /// Rolls `seq`'s table back to room for `num_tokens` tokens (speculative
    /// decoding: drafts that were rejected): the blocks past
    /// `ceil(num_tokens / block_size)` are released (ref −1, last first), the
    /// computed count is capped at `num_tokens` and so are the committed blocks.
    /// The released blocks were allocated for the rejected positions and never
    /// committed, so the prefix cache holds none of their tokens. A total not
    /// below the current one is a no-op.
    pub fn truncate(&mut self, seq: u64, num_tokens: usize) -> Result<(), KvError> {
        let bs = self.pool.block_size();
        let s = self.seqs.get_mut(&seq).ok_or(KvError::UnknownSeq(seq))?;
        if num_tokens >= s.num_tokens {
            return Ok(());
        }
        let keep = num_tokens.div_ceil(bs);
        let mut result = Ok(());
        for id in s.table.drain(keep..).rev() {
            if let Err(e) = self.pool.release(id) {
                result = result.and(Err(e));
            }
        }
        s.num_tokens = num_tokens;
        s.num_computed_tokens = s.num_computed_tokens.min(num_tokens);
        s.committed.truncate(s.num_computed_tokens / bs);
        result
    }

    /// Sequences holding a block table (for invariant checks and stats).
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Checks every invariant (for tests): the pool's own (free list = exactly the blocks
    /// with ref 0, prefix cache consistent), ref counts = number of tables holding each
    /// block, no block twice in one table, table length = `ceil(num_tokens / block_size)`,
    /// computed ≤ allocated. O(num_blocks + total table length).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        let bs = self.pool.block_size();
        let n = self.pool.num_blocks();
        let mut refs = vec![0u32; n];
        let mut seen_in = vec![u64::MAX; n];
        for (&seq, s) in &self.seqs {
            if s.table.len() != s.num_tokens.div_ceil(bs) {
                return Err(format!(
                    "seq {seq}: {} blocks for {} tokens",
                    s.table.len(),
                    s.num_tokens
                ));
            }
            if s.num_computed_tokens > s.num_tokens {
                return Err(format!(
                    "seq {seq}: {} computed > {} tokens",
                    s.num_computed_tokens, s.num_tokens
                ));
            }
            if s.committed.len() > s.num_computed_tokens / bs {
                return Err(format!(
                    "seq {seq}: {} committed blocks > computed full blocks",
                    s.committed.len()
                ));
            }
            for &id in &s.table {
                let i = id as usize;
                if i >= n {
                    return Err(format!("seq {seq}: block {id} out of range"));
                }
                if seen_in[i] == seq {
                    return Err(format!("seq {seq}: block {id} twice in its table"));
                }
                seen_in[i] = seq;
                refs[i] += 1;
            }
        }
        for (id, &r) in refs.iter().enumerate() {
            let actual = self.pool.ref_count(id as u32).unwrap_or(u32::MAX);
            if actual != r {
                return Err(format!(
                    "block {id}: ref count {actual}, held by {r} tables"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn mgr(n: usize, bs: usize) -> KvCacheManager {
        KvCacheManager::new(n, bs, true).expect("valid config")
    }

    fn ok(m: &KvCacheManager) {
        if let Err(e) = m.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }

    #[test]
    fn truncate_releases_the_blocks_of_rejected_tokens() {
        let mut m = mgr(8, 4);
        let tokens: Vec<u32> = (0..13).collect();
        // 6 tokens computed (blocks 0, 1), then room for 6 + 5 drafts = 11 → 3 blocks.
        assert_eq!(m.allocate(1, 6, vec![]), Ok(true));
        m.commit_full_blocks(1, &tokens[..6]).unwrap();
        let mut copies = Vec::new();
        assert_eq!(m.allocate_slots(1, 11, &mut copies), Ok(true));
        assert_eq!(m.block_table(1), Some(&[0, 1, 2][..]));
        // 2 of 5 drafts accepted: 6 + 1 + 2 = 9 computed → ceil(9/4) = 3 blocks still.
        m.truncate(1, 9).unwrap();
        m.commit_full_blocks(1, &tokens[..9]).unwrap();
        assert_eq!(
            (
                m.num_tokens(1),
                m.num_computed_tokens(1),
                m.num_free_blocks()
            ),
            (Some(9), Some(9), 5)
        );
        ok(&m);
        // Next step: room for 9 + 5 = 14 → 4 blocks; nothing accepted → 10 tokens, 3 blocks.
        assert_eq!(m.allocate_slots(1, 14, &mut copies), Ok(true));
        assert_eq!(m.block_table(1), Some(&[0, 1, 2, 3][..]));
        m.truncate(1, 10).unwrap();
        assert_eq!(
            (m.block_table(1), m.num_free_blocks()),
            (Some(&[0, 1, 2][..]), 5)
        );
        m.commit_full_blocks(1, &tokens[..10]).unwrap();
        ok(&m);
        // Two full blocks cached, the partial third not: a new prompt sharing 12 tokens hits 8.
        let (hit, n) = m.get_computed_blocks(&tokens[..13]);
        assert_eq!((hit, n), (vec![0, 1], 8));
        // No-op above, unknown sequence is a bug.
        m.truncate(1, 50).unwrap();
        assert_eq!(m.num_tokens(1), Some(10));
        assert_eq!(m.truncate(9, 1), Err(KvError::UnknownSeq(9)));
        m.free(1).unwrap();
        assert_eq!(m.num_free_blocks(), 8);
        ok(&m);
    }

    #[test]
    fn allocate_exact_ids() {
        let mut m = mgr(8, 4);
        // 10 tokens, block 4 → ceil(10/4) = 3 blocks: 0, 1, 2.
        assert_eq!(m.allocate(1, 10, vec![]), Ok(true));
        assert_eq!(m.block_table(1), Some(&[0, 1, 2][..]));
        // 4 tokens → exactly 1 block: 3.
        assert_eq!(m.allocate(2, 4, vec![]), Ok(true));
        assert_eq!(m.block_table(2), Some(&[3][..]));
        assert_eq!(m.num_free_blocks(), 4); // 8 - 3 - 1
        assert!((m.usage() - 0.5).abs() < 1e-12);
        // Grow seq 1 from 10 to 13 tokens → ceil(13/4) = 4 blocks, one new: 4.
        assert_eq!(m.grow(1, 13), Ok(true));
        assert_eq!(m.block_table(1), Some(&[0, 1, 2, 4][..]));
        // 13 → 16 tokens still 4 blocks: no new block.
        assert_eq!(m.grow(1, 16), Ok(true));
        assert_eq!(m.block_table(1).map(<[u32]>::len), Some(4));
        // 0 tokens → 0 blocks.
        assert_eq!(m.allocate(3, 0, vec![]), Ok(true));
        assert_eq!(m.block_table(3), Some(&[][..]));
        ok(&m);
        assert!(m.can_ever_fit(32)); // 8 blocks * 4
        assert!(!m.can_ever_fit(33));
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut m = mgr(4, 4);
        assert_eq!(m.allocate(1, 8, vec![]), Ok(true)); // 2 blocks, 2 left
                                                        // 9 tokens → 3 blocks > 2 free: refused, nothing changes.
        assert_eq!(m.allocate(2, 9, vec![]), Ok(false));
        assert!(!m.contains(2));
        assert_eq!(m.num_free_blocks(), 2);
        // Grow seq 1 to 17 tokens → 5 blocks, needs 3 > 2: refused.
        assert_eq!(m.grow(1, 17), Ok(false));
        assert_eq!(m.block_table(1), Some(&[0, 1][..]));
        assert_eq!(m.num_tokens(1), Some(8));
        ok(&m);
        assert_eq!(m.allocate(1, 4, vec![]), Err(KvError::DuplicateSeq(1)));
        assert_eq!(m.grow(9, 4), Err(KvError::UnknownSeq(9)));
    }

    #[test]
    fn prefix_hit_after_free() {
        let mut m = mgr(8, 4);
        let prompt: Vec<u32> = (100..110).collect(); // 10 tokens → 2 full blocks + 2
        let (c, n) = m.get_computed_blocks(&prompt);
        assert_eq!((c.len(), n), (0, 0));
        assert_eq!(m.allocate(1, 10, c), Ok(true)); // blocks 0, 1, 2
        m.commit_full_blocks(1, &prompt).expect("known seq"); // caches blocks 0 and 1
        assert_eq!(m.stats().num_cached_blocks, 2);
        assert_eq!(m.free(1), Ok(()));
        ok(&m);
        // Free list: uncached 2 at the head, then 1, 0 (freed last-block-first).
        assert_eq!(m.pool().free_block_ids(), vec![2, 3, 4, 5, 6, 7, 1, 0]);
        // Same prompt again: 2 full blocks hit = 8 tokens; the last 2 are computed.
        let (c, n) = m.get_computed_blocks(&prompt);
        assert_eq!((c.clone(), n), (vec![0, 1], 8));
        // 10 tokens: 2 computed + 1 new block (2, the head).
        assert_eq!(m.allocate(2, 10, c), Ok(true));
        assert_eq!(m.block_table(2), Some(&[0, 1, 2][..]));
        assert_eq!(m.num_computed_tokens(2), Some(8));
        let st = m.stats();
        assert_eq!(
            (
                st.num_prefix_queries,
                st.prefix_query_tokens,
                st.prefix_hit_tokens
            ),
            (2, 20, 8)
        );
        assert_eq!(st.num_evictions, 0);
        ok(&m);
    }

    #[test]
    fn never_returns_the_whole_prompt() {
        let mut m = mgr(8, 4);
        let prompt: Vec<u32> = (0..8).collect(); // exactly 2 blocks
        assert_eq!(m.allocate(1, 8, vec![]), Ok(true));
        m.commit_full_blocks(1, &prompt).expect("known seq");
        // (8 - 1) / 4 = 1 block at most: one token (in fact 4) left to compute.
        assert_eq!(m.get_computed_blocks(&prompt), (vec![0], 4));
        // 9 tokens: (9 - 1) / 4 = 2 blocks.
        let mut longer = prompt.clone();
        longer.push(99);
        assert_eq!(m.get_computed_blocks(&longer), (vec![0, 1], 8));
        assert_eq!(m.get_computed_blocks(&[]), (vec![], 0));
        // A different first block: no hit even though block 2's tokens match.
        let mut other = longer.clone();
        other[0] = 55;
        assert_eq!(m.get_computed_blocks(&other), (vec![], 0));
    }

    #[test]
    fn shared_prefix_between_live_sequences() {
        let mut m = mgr(8, 4);
        let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(m.allocate(1, a.len(), vec![]), Ok(true)); // 0, 1, 2
        m.commit_full_blocks(1, &a).expect("known seq");
        let b: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 70, 71];
        let (c, n) = m.get_computed_blocks(&b);
        assert_eq!((c.clone(), n), (vec![0, 1], 8));
        assert_eq!(m.allocate(2, b.len(), c), Ok(true)); // 0, 1 shared + 3
        assert_eq!(m.block_table(2), Some(&[0, 1, 3][..]));
        assert_eq!(m.pool().ref_count(0), Some(2));
        ok(&m);
        m.free(1).expect("known seq");
        assert_eq!(m.pool().ref_count(0), Some(1));
        ok(&m);
    }

    #[test]
    fn lru_eviction_order() {
        // 4 blocks of 2 tokens.
        let mut m = mgr(4, 2);
        let p1 = [1, 1, 1, 1, 9]; // 2 full blocks
        let p2 = [2, 2, 9]; // 1 full block
        assert_eq!(m.allocate(1, 5, vec![]), Ok(true)); // 0, 1, 2
        m.commit_full_blocks(1, &p1).expect("known seq");
        m.free(1).expect("known seq"); // free list: 2 (uncached, head), then 1, 0 (cached, last block first)
        assert_eq!(m.pool().free_block_ids(), vec![2, 3, 1, 0]);
        assert_eq!(m.allocate(2, 3, vec![]), Ok(true)); // takes 2, 3: no eviction
        assert_eq!(m.block_table(2), Some(&[2, 3][..]));
        m.commit_full_blocks(2, &p2).expect("known seq"); // caches 2
        m.free(2).expect("known seq"); // free list: 3, then 1, 0, 2
        assert_eq!(m.pool().free_block_ids(), vec![3, 1, 0, 2]);
        assert_eq!(m.stats().num_evictions, 0);
        // 4 tokens → 2 blocks: 3 (uncached) and 1 (LRU cached: p1's second block) → 1 eviction.
        assert_eq!(m.allocate(3, 4, vec![]), Ok(true));
        assert_eq!(m.block_table(3), Some(&[3, 1][..]));
        assert_eq!(m.stats().num_evictions, 1);
        // p1 now hits only its first block; p2 still hits.
        assert_eq!(m.get_computed_blocks(&p1), (vec![0], 2));
        assert_eq!(m.get_computed_blocks(&p2), (vec![2], 2));
        ok(&m);
    }

    #[test]
    fn computed_blocks_evicted_before_allocate_are_rejected() {
        let mut m = mgr(2, 2);
        let p = [5, 5, 6];
        assert_eq!(m.allocate(1, 3, vec![]), Ok(true)); // 0, 1
        m.commit_full_blocks(1, &p).expect("known seq"); // caches 0
        m.free(1).expect("known seq");
        let (c, _) = m.get_computed_blocks(&p);
        assert_eq!(c, vec![0]);
        // Another allocation in between takes both blocks and evicts 0.
        assert_eq!(m.allocate(2, 4, vec![]), Ok(true));
        m.free(2).expect("known seq");
        assert!(matches!(
            m.allocate(3, 3, c),
            Err(KvError::InvalidComputed { .. })
        ));
        assert!(!m.contains(3));
        ok(&m);
    }

    #[test]
    fn allocate_with_hit_counts_revived_free_blocks() {
        // 3 blocks of 2. p = 5 tokens → 2 full blocks cached.
        let mut m = mgr(3, 2);
        let p = [1, 2, 3, 4, 5];
        assert_eq!(m.allocate(1, 5, vec![]), Ok(true));
        m.commit_full_blocks(1, &p).expect("known seq");
        m.free(1).expect("known seq"); // all 3 free, 0 and 1 cached
        let (c, n) = m.get_computed_blocks(&p);
        assert_eq!((c.clone(), n), (vec![0, 1], 4));
        assert_eq!(m.allocate(9, 4, vec![]), Ok(true)); // holds 2 blocks: 2 and (evicting) 1
        assert_eq!(m.block_table(9), Some(&[2, 1][..]));
        // The old lookup result is now stale.
        assert!(m.allocate(2, 5, c).is_err());
        let (c, n) = m.get_computed_blocks(&p);
        assert_eq!((c.clone(), n), (vec![0], 2));
        // 5 tokens → 3 blocks: reviving 0 (free) + 2 new = 3 free blocks needed, 1 free: refused.
        assert_eq!(m.allocate(2, 5, c), Ok(false));
        assert_eq!(m.pool().ref_count(0), Some(0));
        ok(&m);
    }

    #[test]
    fn fork_and_copy_on_write() {
        let mut m = mgr(8, 4);
        let toks: Vec<u32> = (0..6).collect(); // 6 tokens: 1 full block + 2 in a partial one
        assert_eq!(m.allocate(1, 6, vec![]), Ok(true)); // 0, 1
        m.commit_full_blocks(1, &toks).expect("known seq");
        m.fork(1, 2).expect("fork");
        assert_eq!(m.block_table(2), Some(&[0, 1][..]));
        assert_eq!(m.pool().ref_count(1), Some(2));
        ok(&m);
        // Next token goes to position 6 in block 1 (6 / 4 = 1), shared → seq 1 gets a copy: 2.
        assert_eq!(m.grow(1, 7), Ok(true));
        let mut copies = vec![];
        assert_eq!(m.copy_on_write(1, &mut copies), Ok(true));
        assert_eq!(copies, vec![(1, 2)]);
        assert_eq!(m.block_table(1), Some(&[0, 2][..]));
        // Seq 2 now holds block 1 alone: no copy.
        assert_eq!(m.copy_on_write(2, &mut copies), Ok(true));
        assert_eq!(copies, vec![(1, 2)]);
        assert_eq!(m.pool().ref_count(1), Some(1));
        assert_eq!(m.pool().ref_count(0), Some(2)); // full computed block stays shared
        ok(&m);
        assert_eq!(m.fork(1, 2), Err(KvError::DuplicateSeq(2)));
        assert_eq!(m.fork(7, 8), Err(KvError::UnknownSeq(7)));
    }

    #[test]
    fn copy_on_write_at_block_boundary_and_without_free_blocks() {
        let mut m = mgr(3, 4);
        // 8 computed tokens = 2 full blocks; table has room for 9 → 3 blocks (0, 1, 2).
        assert_eq!(m.allocate(1, 9, vec![]), Ok(true));
        m.commit_full_blocks(1, &[1, 2, 3, 4, 5, 6, 7, 8])
            .expect("known seq");
        m.fork(1, 2).expect("fork");
        // Position 8 is in block 2 (empty, shared): replaced, nothing to copy — but no free block.
        // No room is not an error: Ok(false), nothing changed.
        let mut copies = vec![];
        assert_eq!(m.copy_on_write(1, &mut copies), Ok(false));
        assert_eq!(m.block_table(1), Some(&[0, 1, 2][..]));
        assert!(copies.is_empty());
        ok(&m);
        m.free(2).expect("known seq");
        assert_eq!(m.copy_on_write(1, &mut copies), Ok(true)); // no longer shared
        assert!(copies.is_empty());
        ok(&m);
    }

    #[test]
    fn allocate_slots_is_all_or_nothing_across_copy_and_grow() {
        let mut m = mgr(4, 4);
        // 6 computed tokens: block 0 full, block 1 holds positions 4..6.
        assert_eq!(m.allocate(1, 6, vec![]), Ok(true)); // 0, 1
        m.commit_full_blocks(1, &[1, 2, 3, 4, 5, 6])
            .expect("known seq");
        m.fork(1, 2).expect("fork"); // 2 shares 0 and 1; free: 2, 3
        let mut copies = vec![];
        // Seq 2 to 14 tokens: copy of shared block 1 (1) + ceil(14/4) - 2 = 2 new = 3 > 2 free.
        assert_eq!(m.allocate_slots(2, 14, &mut copies), Ok(false));
        assert_eq!(m.block_table(2), Some(&[0, 1][..]));
        assert_eq!((copies.len(), m.num_free_blocks()), (0, 2));
        ok(&m);
        // To 10 tokens: 1 copy + ceil(10/4) - 2 = 1 new = 2 free blocks: block 1 → 2, new 3.
        assert_eq!(m.allocate_slots(2, 10, &mut copies), Ok(true));
        assert_eq!(copies, vec![(1, 2)]);
        assert_eq!(m.block_table(2), Some(&[0, 2, 3][..]));
        assert_eq!(m.num_tokens(2), Some(10));
        ok(&m);
        assert_eq!(
            m.allocate_slots(9, 4, &mut copies),
            Err(KvError::UnknownSeq(9))
        );
    }

    #[test]
    fn double_free_is_an_error_not_a_no_op() {
        let mut m = mgr(4, 4);
        assert_eq!(m.allocate(1, 5, vec![]), Ok(true));
        assert_eq!(m.free(1), Ok(()));
        assert_eq!(m.free(1), Err(KvError::UnknownSeq(1)));
        assert_eq!(m.num_free_blocks(), 4);
        ok(&m);
    }

    #[test]
    fn commit_rejects_uncomputed_and_unknown() {
        let mut m = mgr(4, 4);
        assert_eq!(m.allocate(1, 5, vec![]), Ok(true));
        assert_eq!(
            m.commit_full_blocks(1, &[0; 6]),
            Err(KvError::ComputedBeyondAllocation {
                seq: 1,
                got: 6,
                max: 5
            })
        );
        assert_eq!(
            m.commit_full_blocks(2, &[0; 1]),
            Err(KvError::UnknownSeq(2))
        );
        assert_eq!(m.free(2), Err(KvError::UnknownSeq(2)));
    }

    #[test]
    fn identical_block_in_two_sequences_is_cached_once() {
        let mut m = mgr(8, 2);
        let p = [4, 4, 5, 5, 6];
        assert_eq!(m.allocate(1, 5, vec![]), Ok(true)); // 0, 1, 2
        assert_eq!(m.allocate(2, 5, vec![]), Ok(true)); // 3, 4, 5 (no lookup: computed twice)
        m.commit_full_blocks(1, &p).expect("known seq");
        m.commit_full_blocks(2, &p).expect("known seq");
        assert_eq!(m.stats().num_cached_blocks, 2); // 0 and 1 only
        assert_eq!(m.pool().block_hash(3), None);
        // seq 2 grows and commits a third block: parent is seq 1's block 1 (canonical).
        let p2 = [4, 4, 5, 5, 6, 6, 7];
        assert_eq!(m.grow(2, 7), Ok(true)); // + 6
        m.commit_full_blocks(2, &p2).expect("known seq");
        assert_eq!(m.get_computed_blocks(&p2), (vec![0, 1, 5], 6));
        ok(&m);
    }

    #[test]
    fn prefix_caching_off() {
        let mut m = KvCacheManager::new(4, 2, false).expect("valid");
        let p = [1, 1, 2];
        assert_eq!(m.allocate(1, 3, vec![]), Ok(true));
        m.commit_full_blocks(1, &p).expect("known seq");
        m.free(1).expect("known seq");
        assert_eq!(m.get_computed_blocks(&p), (vec![], 0));
        assert_eq!(
            m.stats(),
            KvStats {
                num_blocks: 4,
                num_free_blocks: 4,
                ..KvStats::default()
            }
        );
        assert!(KvCacheManager::new(4, 0, true).is_err());
    }

    /// Randomized: 50k ops over a tiny alphabet so prefixes collide; invariants checked
    /// every 97 ops; at the end everything freed → all blocks free.
    ///
    /// A shadow of the physical cache (`written[block]` = the token prefix whose last K/V
    /// rows live in that block) checks end to end that every prefix hit returns blocks
    /// holding exactly the prompt's prefix, that K/V is only ever written into private
    /// blocks, and that copy-on-write copies the right content.
    #[test]
    fn randomized_invariants() {
        let mut rng = SmallRng::seed_from_u64(64);
        let bs = 4;
        let mut m = mgr(64, bs);
        // seq id → (token list, num computed tokens)
        let mut live: HashMap<u64, (Vec<u32>, usize)> = HashMap::new();
        let mut next_id = 0u64;
        let (mut num_hits, mut num_admitted, mut num_admitted_with_hit) = (0u64, 0u64, 0u64);
        let mut written: Vec<Vec<u32>> = vec![Vec::new(); 64];
        for step in 0..50_000 {
            let op = rng.gen_range(0..100);
            let ids: Vec<u64> = live.keys().copied().collect();
            let pick = |rng: &mut SmallRng| ids.get(rng.gen_range(0..ids.len().max(1))).copied();
            match op {
                // New sequence with a prefix lookup.
                0..=29 => {
                    let len = rng.gen_range(1..40);
                    let tokens: Vec<u32> = (0..len).map(|_| rng.gen_range(0..2)).collect();
                    let (c, n) = m.get_computed_blocks(&tokens);
                    assert_eq!(n, c.len() * bs);
                    assert!(n < tokens.len());
                    num_hits += u64::from(n > 0);
                    for (i, &b) in c.iter().enumerate() {
                        assert_eq!(
                            written[b as usize],
                            tokens[..(i + 1) * bs],
                            "hit on wrong content"
                        );
                    }
                    let id = next_id;
                    next_id += 1;
                    if m.allocate(id, tokens.len(), c)
                        .expect("fresh lookup is valid")
                    {
                        assert_eq!(m.num_computed_tokens(id), Some(n));
                        live.insert(id, (tokens, n));
                        num_admitted += 1;
                        num_admitted_with_hit += u64::from(n > 0);
                    } else {
                        assert!(!m.contains(id));
                        // Preempt a random sequence, as the scheduler would.
                        if let Some(victim) = pick(&mut rng) {
                            m.free(victim).expect("live");
                            live.remove(&victim);
                        }
                    }
                }
                // Compute some tokens and commit (copy-on-write first).
                30..=59 => {
                    if let Some(id) = pick(&mut rng) {
                        let free_before = m.num_free_blocks();
                        let mut copies = vec![];
                        // Cannot write without private blocks: skip this step.
                        if !m.copy_on_write(id, &mut copies).expect("live") {
                            assert_eq!(m.num_free_blocks(), free_before);
                            continue;
                        }
                        for &(src, dst) in &copies {
                            assert_ne!(src, dst);
                            written[dst as usize] = written[src as usize].clone();
                            assert!(m.num_free_blocks() < free_before);
                        }
                        let (tokens, computed) = live.get_mut(&id).expect("live");
                        let (old, new) = (*computed, rng.gen_range(*computed..=tokens.len()));
                        // "Write" K/V of positions old..new: only into private blocks, and a
                        // partially written block must hold this sequence's prefix.
                        let table = m.block_table(id).expect("live").to_vec();
                        for j in old / bs..new.div_ceil(bs) {
                            let b = table[j] as usize;
                            assert_eq!(
                                m.pool().ref_count(table[j]),
                                Some(1),
                                "write into a shared block"
                            );
                            if j == old / bs && old % bs != 0 {
                                assert_eq!(written[b], tokens[..old], "copy-on-write lost content");
                            }
                            written[b] = tokens[..new.min((j + 1) * bs)].to_vec();
                        }
                        *computed = new;
                        m.commit_full_blocks(id, &tokens[..new])
                            .expect("within allocation");
                    }
                }
                // Generate a token: grow by one.
                60..=79 => {
                    if let Some(id) = pick(&mut rng) {
                        let (tokens, _) = live.get_mut(&id).expect("live");
                        if m.grow(id, tokens.len() + 1).expect("live") {
                            tokens.push(rng.gen_range(0..2));
                        }
                    }
                }
                80..=94 => {
                    if let Some(id) = pick(&mut rng) {
                        m.free(id).expect("live");
                        live.remove(&id);
                    }
                }
                _ => {
                    if let Some(id) = pick(&mut rng) {
                        let child = next_id;
                        next_id += 1;
                        m.fork(id, child).expect("fork");
                        let state = live.get(&id).expect("live").clone();
                        live.insert(child, state);
                    }
                }
            }
            if step % 97 == 0 {
                ok(&m);
                for (&id, (tokens, _)) in &live {
                    let table = m.block_table(id).expect("live");
                    assert_eq!(table.len(), tokens.len().div_ceil(bs));
                }
            }
        }
        ok(&m);
        let st = m.stats();
        assert!(num_hits > 1000, "prefix hits: {num_hits}");
        assert!(
            num_admitted > 5000 && num_admitted_with_hit > 1000,
            "{num_admitted} {num_admitted_with_hit}"
        );
        assert!(st.num_evictions > 0);
        for id in live.keys().copied().collect::<Vec<_>>() {
            m.free(id).expect("live");
        }
        ok(&m);
        assert_eq!(m.num_free_blocks(), 64);
        let st = m.stats();
        assert_eq!(st.num_used_blocks, 0);
        assert!(st.num_cached_blocks <= 64);
    }
}
