//! `BlockPool`: the KV-cache blocks, their reference counts, the LRU free list
//! and the prefix cache (`hash → block`).
//!
//! Owns block *metadata* only. The K/V data of block `b` lives on the workers
//! (`model::kv::KvStore`, slot = `b * block_size + offset`); which sequence holds
//! which block is [`super::manager::KvCacheManager`]'s business.
//!
//! Properties:
//! - a flat `Vec<Block>`; block ids are indices (`u32`), all `num_blocks` usable
//!   (no reserved null block: block tables are per-sequence slices, nothing pads them);
//! - the free list is an intrusive doubly linked list over indices with one sentinel,
//!   so allocate, free and remove-from-the-middle are O(1);
//! - LRU order: allocation takes the head. A block whose ref count drops to 0 goes to
//!   the tail if it is cached (hashed), to the head if not (an uncached free block is
//!   worth nothing, so it is reused before any cached one);
//! - a cached block with ref count 0 stays in the free list *and* in the prefix cache
//!   until it is allocated again; that allocation drops its hash (= LRU eviction);
//! - a hit is exact: besides the 64-bit hash, the block's tokens and its parent's
//!   identity ([`CachedBlockRef`]: id + generation) are compared.
//!
//! ```text
//!   free list:  S ⇄ b7 ⇄ b2 ⇄ b9 ⇄ S      (S = sentinel; alloc pops b7; free pushes
//!               head            tail        cached blocks before S on the right)
//! ```

use std::collections::HashMap;

use super::block_hash::BlockHash;
use super::KvError;

/// Index of a block; also its position in the workers' physical K/V arrays.
pub type BlockId = u32;

/// Identity of one cached content of a block.
///
/// `generation` is bumped every time the block loses its hash, so an old
/// `CachedBlockRef` never matches a block that was evicted and cached again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CachedBlockRef {
    /// The block.
    pub id: BlockId,
    /// The block's generation when this content was cached.
    pub generation: u32,
}

/// Metadata of one block.
#[derive(Clone, Debug, Default)]
struct Block {
    /// Number of sequence block tables holding this block.
    ref_count: u32,
    /// Set while the block is in the prefix cache.
    hash: Option<BlockHash>,
    /// Identity of the previous block of the cached prefix (`None` = first block).
    /// Meaningful only while `hash` is set.
    parent: Option<CachedBlockRef>,
    /// Bumped whenever `hash` is dropped.
    generation: u32,
}

/// Free-list links; index `num_blocks` is the sentinel.
#[derive(Clone, Copy, Debug)]
struct Link {
    prev: u32,
    next: u32,
}

/// Fixed set of KV-cache blocks with ref counts, LRU free list and prefix cache.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// `num_blocks + 1` entries, the last is the sentinel.
    links: Vec<Link>,
    num_free: usize,
    /// Prefix cache: hash of a cached block → its id.
    cached: HashMap<BlockHash, BlockId>,
    /// Tokens of cached blocks, `block_size` per block (stale for uncached blocks).
    cached_tokens: Vec<u32>,
    num_evictions: u64,
}

impl BlockPool {
    /// Largest supported `num_blocks` (ids are `u32`, one index is the sentinel).
    pub const MAX_BLOCKS: usize = u32::MAX as usize - 1;

    /// Makes `num_blocks` free blocks of `block_size` tokens each.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, KvError> {
        if block_size == 0 {
            return Err(KvError::ZeroBlockSize);
        }
        if num_blocks == 0 || num_blocks > Self::MAX_BLOCKS {
            return Err(KvError::NumBlocks {
                max: Self::MAX_BLOCKS,
                got: num_blocks,
            });
        }
        let cached_tokens_len = num_blocks
            .checked_mul(block_size)
            .ok_or(KvError::NumBlocks {
                max: usize::MAX / block_size,
                got: num_blocks,
            })?;
        let sentinel = num_blocks as u32;
        let mut pool = Self {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            links: vec![
                Link {
                    prev: sentinel,
                    next: sentinel
                };
                num_blocks + 1
            ],
            num_free: 0,
            cached: HashMap::new(),
            cached_tokens: vec![0; cached_tokens_len],
            num_evictions: 0,
        };
        // Ascending ids: the first allocations get blocks 0, 1, 2, …
        for id in 0..num_blocks as u32 {
            pool.push_back(id);
        }
        Ok(pool)
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks with ref count 0 (including cached ones, which allocation may evict).
    pub fn num_free_blocks(&self) -> usize {
        self.num_free
    }

    /// Blocks currently in the prefix cache (in use or free).
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Fraction of blocks in use (ref count > 0), in `[0, 1]`.
    pub fn usage(&self) -> f64 {
        1.0 - self.num_free as f64 / self.blocks.len() as f64
    }

    /// Cached blocks whose hash was dropped because they were allocated again.
    pub fn num_evictions(&self) -> u64 {
        self.num_evictions
    }

    /// Ref count of `id`, `None` if out of range.
    pub fn ref_count(&self, id: BlockId) -> Option<u32> {
        self.blocks.get(id as usize).map(|b| b.ref_count)
    }

    /// Hash of `id` if it is in the prefix cache.
    pub fn block_hash(&self, id: BlockId) -> Option<BlockHash> {
        self.blocks.get(id as usize).and_then(|b| b.hash)
    }

    /// Current identity of `id` if it is in the prefix cache.
    pub fn cached_ref(&self, id: BlockId) -> Option<CachedBlockRef> {
        let b = self.blocks.get(id as usize)?;
        b.hash.map(|_| CachedBlockRef {
            id,
            generation: b.generation,
        })
    }

    /// Parent identity recorded for cached block `id` (`Some(None)` = first block of a prefix).
    pub fn cached_parent(&self, id: BlockId) -> Option<Option<CachedBlockRef>> {
        let b = self.blocks.get(id as usize)?;
        b.hash.map(|_| b.parent)
    }

    /// Whether `r` still names the content it was taken from (not evicted since).
    pub fn is_live(&self, r: CachedBlockRef) -> bool {
        self.blocks
            .get(r.id as usize)
            .is_some_and(|b| b.hash.is_some() && b.generation == r.generation)
    }

    /// Free block ids in allocation order (head first). O(num_free); for tests and debugging.
    pub fn free_block_ids(&self) -> Vec<BlockId> {
        let sentinel = self.sentinel();
        let mut out = Vec::with_capacity(self.num_free);
        let mut cur = self.links[sentinel as usize].next;
        while cur != sentinel && out.len() <= self.blocks.len() {
            out.push(cur);
            cur = self.links[cur as usize].next;
        }
        out
    }

    /// Takes the head of the free list (ref count 1), evicting its cached content if any.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.links[self.sentinel() as usize].next;
        if id == self.sentinel() {
            return None;
        }
        self.unlink(id);
        if self.blocks[id as usize].hash.is_some() {
            self.uncache(id);
            self.num_evictions += 1;
        }
        self.blocks[id as usize].ref_count = 1;
        Some(id)
    }

    /// Allocates `n` blocks onto the end of `out`, all or nothing: returns `false`
    /// (and changes nothing) if fewer than `n` blocks are free.
    pub fn allocate_into(&mut self, n: usize, out: &mut Vec<BlockId>) -> bool {
        if n > self.num_free {
            return false;
        }
        out.reserve(n);
        for _ in 0..n {
            match self.allocate() {
                Some(id) => out.push(id),
                None => {
                    debug_assert!(false, "free list shorter than num_free");
                    return false;
                }
            }
        }
        true
    }

    /// Adds a holder to `id`; a free block (ref 0) leaves the free list, keeping its hash
    /// (this is how a prefix-cache hit on a free block is taken).
    pub fn touch(&mut self, id: BlockId) -> Result<(), KvError> {
        let b = self
            .blocks
            .get(id as usize)
            .ok_or(KvError::InvalidBlock(id))?;
        if b.ref_count == 0 {
            self.unlink(id);
        }
        let b = &mut self.blocks[id as usize];
        b.ref_count = b
            .ref_count
            .checked_add(1)
            .ok_or(KvError::InvalidBlock(id))?;
        Ok(())
    }

    /// Drops a holder of `id`. At ref count 0 the block rejoins the free list: at the tail
    /// if cached (reusable until evicted), at the head if not.
    pub fn release(&mut self, id: BlockId) -> Result<(), KvError> {
        let b = self
            .blocks
            .get_mut(id as usize)
            .ok_or(KvError::InvalidBlock(id))?;
        if b.ref_count == 0 {
            return Err(KvError::InvalidBlock(id));
        }
        b.ref_count -= 1;
        if b.ref_count == 0 {
            if b.hash.is_some() {
                self.push_back(id);
            } else {
                self.push_front(id);
            }
        }
        Ok(())
    }

    /// Finds the cached block with `hash` whose tokens equal `tokens` and whose parent is
    /// `parent` (`None` = first block of a prefix). Does not touch the block.
    pub fn lookup(
        &self,
        hash: BlockHash,
        parent: Option<CachedBlockRef>,
        tokens: &[u32],
    ) -> Option<CachedBlockRef> {
        let &id = self.cached.get(&hash)?;
        let b = &self.blocks[id as usize];
        (b.parent == parent && self.tokens_of(id) == tokens).then_some(CachedBlockRef {
            id,
            generation: b.generation,
        })
    }

    /// Puts in-use block `id`, holding `tokens` after the prefix `parent` (`None` = first
    /// block), into the prefix cache under `hash`. Returns the identity that now stands
    /// for this content:
    /// - `id` itself if it is already cached (e.g. shared with a forked sequence) or was
    ///   cached now;
    /// - another block if that one already caches identical content (`id` stays uncached);
    /// - `None` if the content cannot be cached: `parent` was evicted since, `tokens` is
    ///   not one full block, or `id` is not in use.
    ///
    /// A different block cached under the same hash (a collision, or a stale entry whose
    /// parent was evicted) is replaced: newest wins.
    pub fn register(
        &mut self,
        id: BlockId,
        hash: BlockHash,
        parent: Option<CachedBlockRef>,
        tokens: &[u32],
    ) -> Option<CachedBlockRef> {
        let b = self.blocks.get(id as usize)?;
        if b.ref_count == 0 || tokens.len() != self.block_size {
            return None;
        }
        if let Some(p) = parent {
            if !self.is_live(p) {
                return None;
            }
        }
        if b.hash.is_some() {
            // Already cached: only the same content may be cached in one block.
            return (b.hash == Some(hash) && b.parent == parent && self.tokens_of(id) == tokens)
                .then_some(CachedBlockRef {
                    id,
                    generation: b.generation,
                });
        }
        if let Some(&other) = self.cached.get(&hash) {
            if let Some(r) = self.lookup(hash, parent, tokens) {
                return Some(r);
            }
            self.uncache(other);
            if self.blocks[other as usize].ref_count == 0 {
                // Uncached and free: reuse it before any cached block.
                self.unlink(other);
                self.push_front(other);
            }
        }
        let start = id as usize * self.block_size;
        self.cached_tokens[start..start + self.block_size].copy_from_slice(tokens);
        let b = &mut self.blocks[id as usize];
        b.hash = Some(hash);
        b.parent = parent;
        self.cached.insert(hash, id);
        Some(CachedBlockRef {
            id,
            generation: b.generation,
        })
    }

    /// Checks the pool's own invariants: free list well formed and holding exactly the
    /// blocks with ref count 0, prefix cache and block hashes agreeing. O(num_blocks).
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.blocks.len();
        let sentinel = self.sentinel();
        let mut in_list = vec![false; n];
        let mut count = 0usize;
        let mut prev = sentinel;
        let mut cur = self.links[sentinel as usize].next;
        while cur != sentinel {
            let i = cur as usize;
            if i >= n {
                return Err(format!("free list holds out-of-range id {cur}"));
            }
            if in_list[i] {
                return Err(format!("block {cur} twice in the free list"));
            }
            if self.links[i].prev != prev {
                return Err(format!(
                    "block {cur}: prev link {} != {prev}",
                    self.links[i].prev
                ));
            }
            in_list[i] = true;
            count += 1;
            prev = cur;
            cur = self.links[i].next;
        }
        if self.links[sentinel as usize].prev != prev {
            return Err("sentinel prev link is not the tail".into());
        }
        if count != self.num_free {
            return Err(format!(
                "free list has {count} blocks, num_free = {}",
                self.num_free
            ));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            if (b.ref_count == 0) != in_list[i] {
                return Err(format!(
                    "block {i}: ref count {} but in free list = {}",
                    b.ref_count, in_list[i]
                ));
            }
            if let Some(h) = b.hash {
                if self.cached.get(&h) != Some(&(i as u32)) {
                    return Err(format!(
                        "block {i} has hash {h:?} but the cache maps it elsewhere"
                    ));
                }
            }
        }
        for (h, &id) in &self.cached {
            match self.blocks.get(id as usize) {
                Some(b) if b.hash == Some(*h) => {}
                _ => {
                    return Err(format!(
                        "cache entry {h:?} → {id} does not match the block's hash"
                    ))
                }
            }
        }
        Ok(())
    }

    fn sentinel(&self) -> u32 {
        self.blocks.len() as u32
    }

    fn tokens_of(&self, id: BlockId) -> &[u32] {
        let start = id as usize * self.block_size;
        &self.cached_tokens[start..start + self.block_size]
    }

    /// Drops `id`'s hash (if the cache maps it to `id`) and bumps its generation.
    fn uncache(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        if let Some(h) = b.hash.take() {
            if self.cached.get(&h) == Some(&id) {
                self.cached.remove(&h);
            }
            b.parent = None;
            b.generation = b.generation.wrapping_add(1);
        }
    }

    fn push_back(&mut self, id: BlockId) {
        let s = self.sentinel();
        let tail = self.links[s as usize].prev;
        self.links[id as usize] = Link {
            prev: tail,
            next: s,
        };
        self.links[tail as usize].next = id;
        self.links[s as usize].prev = id;
        self.num_free += 1;
    }

    fn push_front(&mut self, id: BlockId) {
        let s = self.sentinel();
        let head = self.links[s as usize].next;
        self.links[id as usize] = Link {
            prev: s,
            next: head,
        };
        self.links[head as usize].prev = id;
        self.links[s as usize].next = id;
        self.num_free += 1;
    }

    /// Removes `id` from the free list; the caller knows it is in there (ref count 0).
    fn unlink(&mut self, id: BlockId) {
        let Link { prev, next } = self.links[id as usize];
        self.links[prev as usize].next = next;
        self.links[next as usize].prev = prev;
        let s = self.sentinel();
        self.links[id as usize] = Link { prev: s, next: s };
        self.num_free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::super::block_hash::hash_block;
    use super::*;

    fn pool(n: usize, bs: usize) -> BlockPool {
        BlockPool::new(n, bs).expect("valid pool")
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(BlockPool::new(4, 0).err(), Some(KvError::ZeroBlockSize));
        assert!(matches!(
            BlockPool::new(0, 4),
            Err(KvError::NumBlocks { got: 0, .. })
        ));
    }

    #[test]
    fn allocates_in_id_order_and_counts() {
        let mut p = pool(4, 16);
        assert_eq!(p.allocate(), Some(0));
        assert_eq!(p.allocate(), Some(1));
        assert_eq!(p.num_free_blocks(), 2);
        assert!((p.usage() - 0.5).abs() < 1e-12); // 2 of 4 in use
        let mut out = vec![];
        assert!(!p.allocate_into(3, &mut out)); // only 2 free: nothing taken
        assert!(out.is_empty());
        assert_eq!(p.num_free_blocks(), 2);
        assert!(p.allocate_into(2, &mut out));
        assert_eq!(out, vec![2, 3]);
        assert_eq!(p.allocate(), None);
        p.check_invariants().expect("invariants");
    }

    #[test]
    fn release_errors_on_free_block_and_out_of_range() {
        let mut p = pool(2, 4);
        assert_eq!(p.release(0), Err(KvError::InvalidBlock(0)));
        assert_eq!(p.release(7), Err(KvError::InvalidBlock(7)));
        assert_eq!(p.touch(7), Err(KvError::InvalidBlock(7)));
    }

    #[test]
    fn uncached_free_goes_to_head_cached_to_tail() {
        let mut p = pool(4, 2);
        let ids: Vec<_> = (0..4).filter_map(|_| p.allocate()).collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        // Cache block 1 and 2, then free all in order 0,1,2,3.
        let h1 = hash_block(None, &[1, 1]);
        let h2 = hash_block(None, &[2, 2]);
        assert!(p.register(1, h1, None, &[1, 1]).is_some());
        assert!(p.register(2, h2, None, &[2, 2]).is_some());
        for id in 0..4 {
            p.release(id).expect("in use");
        }
        // Uncached 0 then 3 pushed to the head (3 last → first); cached 1, 2 at the tail in free order.
        assert_eq!(p.free_block_ids(), vec![3, 0, 1, 2]);
        // Allocation order: 3, 0, then evicts 1 (LRU), then 2.
        assert_eq!(p.allocate(), Some(3));
        assert_eq!(p.allocate(), Some(0));
        assert_eq!(p.num_evictions(), 0);
        assert_eq!(p.allocate(), Some(1));
        assert_eq!(p.num_evictions(), 1);
        assert_eq!(p.lookup(h1, None, &[1, 1]), None); // evicted
        assert!(p.lookup(h2, None, &[2, 2]).is_some()); // still cached while free
        p.check_invariants().expect("invariants");
    }

    #[test]
    fn touch_removes_from_middle_of_free_list() {
        let mut p = pool(5, 1);
        let ids: Vec<_> = (0..5).filter_map(|_| p.allocate()).collect();
        for &id in &ids {
            assert!(p
                .register(id, hash_block(None, &[id]), None, &[id])
                .is_some());
        }
        for &id in &ids {
            p.release(id).expect("in use");
        }
        assert_eq!(p.free_block_ids(), vec![0, 1, 2, 3, 4]);
        p.touch(2).expect("valid");
        assert_eq!(p.free_block_ids(), vec![0, 1, 3, 4]);
        assert_eq!(p.ref_count(2), Some(1));
        assert!(p.block_hash(2).is_some()); // a hit keeps the hash
        p.check_invariants().expect("invariants");
    }

    #[test]
    fn lookup_is_exact_on_tokens_and_parent() {
        let mut p = pool(4, 2);
        let a = p.allocate().expect("free");
        let b = p.allocate().expect("free");
        let ha = hash_block(None, &[5, 6]);
        let ra = p.register(a, ha, None, &[5, 6]).expect("cached");
        let hb = hash_block(Some(ha), &[7, 8]);
        let rb = p.register(b, hb, Some(ra), &[7, 8]).expect("cached");
        assert_eq!(p.lookup(hb, Some(ra), &[7, 8]), Some(rb));
        // Same hash but other tokens (a forged collision) or another parent: miss.
        assert_eq!(p.lookup(hb, Some(ra), &[7, 9]), None);
        assert_eq!(p.lookup(hb, None, &[7, 8]), None);
        assert_eq!(
            p.lookup(
                hb,
                Some(CachedBlockRef {
                    id: a,
                    generation: ra.generation + 1
                }),
                &[7, 8]
            ),
            None
        );
    }

    #[test]
    fn register_duplicate_returns_existing_and_collision_replaces() {
        let mut p = pool(4, 2);
        let a = p.allocate().expect("free");
        let b = p.allocate().expect("free");
        let c = p.allocate().expect("free");
        let h = hash_block(None, &[1, 2]);
        let ra = p.register(a, h, None, &[1, 2]).expect("cached");
        // Identical content in b: a stays canonical, b is left uncached.
        assert_eq!(p.register(b, h, None, &[1, 2]), Some(ra));
        assert_eq!(p.block_hash(b), None);
        // Forged collision: same hash, other tokens → c replaces a.
        let rc = p.register(c, h, None, &[3, 4]).expect("cached");
        assert_eq!(rc.id, c);
        assert!(!p.is_live(ra));
        assert_eq!(p.block_hash(a), None);
        // A child registered under the replaced parent identity is refused.
        assert_eq!(
            p.register(b, hash_block(Some(h), &[9, 9]), Some(ra), &[9, 9]),
            None
        );
        // Wrong length, free block: refused.
        assert_eq!(p.register(b, h, None, &[1]), None);
        assert_eq!(p.register(3, h, None, &[1, 2]), None);
        p.check_invariants().expect("invariants");
    }
}
