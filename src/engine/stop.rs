//! Incremental stop-string matching: one Aho-Corasick automaton per request
//! (built once at validation, shared by its completions), one `u32` state per
//! completion, fed the bytes of each newly decoded piece.
//!
//! Per byte the work is amortized O(1) whatever the number and length of the
//! stop strings, so a request with many long stop strings costs its own
//! output actor time in proportion to its own output, not to its stop strings
//! (the old matcher re-searched the held-back text for every prefix of every
//! string on each token). The state's depth is the length of the longest
//! suffix of the text seen that is a prefix of some stop string: exactly the
//! bytes that must be held back from the client until they are decided.
//!
//! Owns matching only; what is sent when is the output actor's.

/// An automaton over a request's stop strings.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    /// Children of each node, sorted by byte.
    children: Vec<Vec<(u8, u32)>>,
    /// Failure link of each node (longest proper suffix that is a trie node).
    fail: Vec<u32>,
    /// Depth of each node (bytes from the root).
    depth: Vec<u32>,
    /// Length of the longest stop string ending at this node or along its
    /// failure chain (0 = none): a match ends here.
    match_len: Vec<u32>,
}

/// Where a stop string was found in a fed piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopMatch {
    /// Bytes of the stop string that lay in earlier pieces (held back).
    pub from_held: usize,
    /// Byte offset in the fed piece where the match ends (exclusive).
    pub end: usize,
    /// Length of the matched stop string.
    pub len: usize,
}

impl StopMatcher {
    /// Builds the automaton (empty strings are ignored; validation refuses them).
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        let mut m = StopMatcher {
            children: vec![Vec::new()],
            fail: vec![0],
            depth: vec![0],
            match_len: vec![0],
        };
        for s in stops {
            let bytes = s.as_ref().as_bytes();
            if bytes.is_empty() {
                continue;
            }
            let mut node = 0u32;
            for &b in bytes {
                node = match m.child(node, b) {
                    Some(c) => c,
                    None => {
                        let id = m.children.len() as u32;
                        m.children.push(Vec::new());
                        m.fail.push(0);
                        m.depth.push(m.depth[node as usize] + 1);
                        m.match_len.push(0);
                        let kids = &mut m.children[node as usize];
                        let at = kids.partition_point(|&(k, _)| k < b);
                        kids.insert(at, (b, id));
                        id
                    }
                };
            }
            let n = node as usize;
            m.match_len[n] = m.match_len[n].max(bytes.len() as u32);
        }
        // Breadth-first: failure links and inherited matches.
        let mut queue = std::collections::VecDeque::new();
        for &(_, c) in &m.children[0] {
            queue.push_back(c);
        }
        while let Some(node) = queue.pop_front() {
            let kids = m.children[node as usize].clone();
            for (b, c) in kids {
                let mut f = m.fail[node as usize];
                let target = loop {
                    if let Some(t) = m.child(f, b) {
                        break t;
                    }
                    if f == 0 {
                        break 0;
                    }
                    f = m.fail[f as usize];
                };
                m.fail[c as usize] = target;
                let inherited = m.match_len[target as usize];
                m.match_len[c as usize] = m.match_len[c as usize].max(inherited);
                queue.push_back(c);
            }
        }
        m
    }

    fn child(&self, node: u32, b: u8) -> Option<u32> {
        let kids = self.children.get(node as usize)?;
        kids.binary_search_by_key(&b, |&(k, _)| k)
            .ok()
            .map(|i| kids[i].1)
    }

    fn step(&self, mut state: u32, b: u8) -> u32 {
        loop {
            if let Some(c) = self.child(state, b) {
                return c;
            }
            if state == 0 {
                return 0;
            }
            state = self.fail[state as usize];
        }
    }

    /// The start state.
    pub fn start(&self) -> u32 {
        0
    }

    /// Bytes at the end of the text seen that may still begin a stop string.
    pub fn held(&self, state: u32) -> usize {
        self.depth.get(state as usize).copied().unwrap_or(0) as usize
    }

    /// Feeds `piece`; returns the first stop string completed in it. `state`
    /// is advanced up to the end of the piece, or to the match.
    pub fn feed(&self, state: &mut u32, piece: &[u8]) -> Option<StopMatch> {
        for (i, &b) in piece.iter().enumerate() {
            *state = self.step(*state, b);
            let len = self.match_len[*state as usize] as usize;
            if len > 0 {
                let end = i + 1;
                return Some(StopMatch {
                    from_held: len.saturating_sub(end),
                    end,
                    len,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: the earliest-ending occurrence of any stop string in `text`, as a start offset.
    fn naive_first(text: &str, stops: &[&str]) -> Option<usize> {
        (1..=text.len()).find_map(|end| {
            stops
                .iter()
                .filter(|s| {
                    !s.is_empty()
                        && end >= s.len()
                        && text.as_bytes()[..end].ends_with(s.as_bytes())
                })
                .map(|s| end - s.len())
                .min()
        })
    }

    fn naive_held(text: &str, stops: &[&str]) -> usize {
        let mut keep = 0;
        for s in stops {
            for i in 1..s.len() {
                if text.as_bytes().ends_with(&s.as_bytes()[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        keep
    }

    /// Feeds `pieces` one by one; returns (start offset of the match in the whole text, held after each piece).
    fn run(stops: &[&str], pieces: &[&str]) -> (Option<usize>, Vec<usize>) {
        let m = StopMatcher::new(stops);
        let mut st = m.start();
        let mut seen = 0;
        let mut helds = Vec::new();
        for p in pieces {
            if let Some(hit) = m.feed(&mut st, p.as_bytes()) {
                return (Some(seen + hit.end - hit.len), helds);
            }
            seen += p.len();
            helds.push(m.held(st));
        }
        (None, helds)
    }

    #[test]
    fn matches_across_pieces_and_holds_prefixes() {
        assert_eq!(run(&["world"], &["hello wo", "rld!"]), (Some(6), vec![2]));
        assert_eq!(
            run(&["abcd", "bc"], &["a", "b", "c", "d"]),
            (Some(1), vec![1, 2])
        );
        assert_eq!(run(&["ab"], &["xa", "a", "b"]), (Some(2), vec![1, 1]));
        assert_eq!(run(&["</s>"], &["no stop here"]).0, None);
        // Multi-byte text.
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), (Some(3), vec![0, 2]));
    }

    #[test]
    fn agrees_with_naive_search_on_random_texts() {
        // Seeded LCG over a 3-letter alphabet: many overlaps and partial matches.
        let mut x: u64 = 64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize
        };
        let alphabet = ["a", "b", "c"];
        for _ in 0..2000 {
            let stops: Vec<String> = (0..1 + next() % 4)
                .map(|_| (0..1 + next() % 4).map(|_| alphabet[next() % 3]).collect())
                .collect();
            let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
            let pieces: Vec<String> = (0..1 + next() % 8)
                .map(|_| (0..next() % 4).map(|_| alphabet[next() % 3]).collect())
                .collect();
            let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let text: String = pieces.concat();
            let (got, helds) = run(&stops, &pieces);
            assert_eq!(got, naive_first(&text, &stops), "{stops:?} {pieces:?}");
            // Held-back bytes agree with the naive prefix scan wherever no match happened yet.
            let mut seen = String::new();
            for (p, h) in pieces.iter().zip(&helds) {
                seen.push_str(p);
                assert_eq!(*h, naive_held(&seen, &stops), "{stops:?} {seen:?}");
            }
        }
    }
}
