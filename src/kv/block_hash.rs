//! Chained block hashes for prefix caching.
//!
//! Owns the hash function only: `hash(block i) = H(hash(block i-1), tokens of block i)`,
//! so one 64-bit value stands for a full block *and* every token before it.
//!
//! ```text
//!   tokens:  | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9      (block_size 4)
//!   hashes:    h0=H(-,t0..t3) h1=H(h0,t4..t7)         (partial block: no hash)
//! ```
//!
//! The hash is FxHash-style (rotate, xor, multiply) with a murmur3 finalizer: fast,
//! deterministic across runs and platforms, not keyed and not collision resistant.
//! It does not decide a cache hit on its own: [`super::block_pool::BlockPool`]
//! compares the stored tokens and the parent block's identity on every hit.

/// Hash of one full block and, through its parent, of every token before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// Seed of the first block of a sequence (no parent).
const ROOT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// FxHash multiplier.
const FX_K: u64 = 0x517c_c1b7_2722_0a95;

#[inline]
fn fx(h: u64, word: u64) -> u64 {
    (h.rotate_left(5) ^ word).wrapping_mul(FX_K)
}

/// murmur3 `fmix64`: spreads every input bit over the whole word.
#[inline]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Hashes one block of token ids chained onto `parent` (`None` for the first block).
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = match parent {
        Some(p) => fx(ROOT_SEED, p.0),
        None => ROOT_SEED,
    };
    h = fx(h, tokens.len() as u64);
    // Two token ids per 64-bit word.
    let mut pairs = tokens.chunks_exact(2);
    for pair in &mut pairs {
        h = fx(h, u64::from(pair[0]) | (u64::from(pair[1]) << 32));
    }
    for &t in pairs.remainder() {
        h = fx(h, u64::from(t));
    }
    BlockHash(fmix64(h))
}

/// Chained hashes of every *full* block of `tokens` (a trailing partial block has none).
/// Returns an empty list for `block_size == 0`.
pub fn full_block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(tokens.len() / block_size);
    let mut parent = None;
    for block in tokens.chunks_exact(block_size) {
        let h = hash_block(parent, block);
        out.push(h);
        parent = Some(h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_pinned() {
        // Pinned so that an accidental change of the function shows up in review.
        let h = hash_block(None, &[1, 2, 3, 4]);
        assert_eq!(h, hash_block(None, &[1, 2, 3, 4]));
        assert_eq!(h, BlockHash(PINNED_ROOT_1234));
    }
    const PINNED_ROOT_1234: u64 = 4_412_390_863_804_950_268;

    #[test]
    fn depends_on_tokens_order_length_and_parent() {
        let a = hash_block(None, &[1, 2, 3, 4]);
        assert_ne!(a, hash_block(None, &[1, 2, 4, 3]));
        assert_ne!(a, hash_block(None, &[1, 2, 3]));
        assert_ne!(a, hash_block(None, &[1, 2, 3, 4, 0]));
        let p = hash_block(None, &[9, 9, 9, 9]);
        let b = hash_block(Some(p), &[1, 2, 3, 4]);
        assert_ne!(a, b);
        assert_ne!(b, hash_block(Some(a), &[1, 2, 3, 4]));
    }

    #[test]
    fn full_block_hashes_chain_and_skip_partial() {
        // 10 tokens, block 4 → 2 full blocks (tokens 8..10 are a partial block, no hash).
        let tokens: Vec<u32> = (0..10).collect();
        let hs = full_block_hashes(&tokens, 4);
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[0], hash_block(None, &[0, 1, 2, 3]));
        assert_eq!(hs[1], hash_block(Some(hs[0]), &[4, 5, 6, 7]));
        assert!(full_block_hashes(&tokens, 0).is_empty());
        assert!(full_block_hashes(&tokens[..3], 4).is_empty());
    }

    #[test]
    fn no_collisions_in_small_exhaustive_space() {
        // All 4-token blocks over a 6-token alphabet, with and without a parent: 2 * 6^4 hashes.
        let mut seen = std::collections::HashSet::new();
        let parent = Some(hash_block(None, &[7]));
        for n in 0..6u32.pow(4) {
            let t = [n % 6, n / 6 % 6, n / 36 % 6, n / 216 % 6];
            assert!(seen.insert(hash_block(None, &t)));
            assert!(seen.insert(hash_block(parent, &t)));
        }
    }
}
