//! Virtual Token Counter fair queuing (Sheng et al., "Fairness in Serving Large
//! Language Models", OSDI 2024), as a pure data structure: no channels, clocks
//! or threads, so it is tested like a scheduler.
//!
//! ```text
//!  tenant A: [r r r r r r]  c_A = 812.0   ─┐
//!  tenant B: [r r]          c_B = 640.5   ─┼─► pop(): backlogged tenant with the lowest
//!  tenant C: []             c_C = 120.0   ─┘   counter (and room under max_concurrent)
//!                                              c_k += w_in · prompt_tokens / weight_k
//!  on_output(k, n):  c_k += w_out · n / weight_k        (as tokens are generated)
//!  push(u, r) when u has nothing queued:  c_u = max(c_u, min{c_v : v backlogged})
//!                                         (or the counter of the last tenant to leave
//!                                         the backlog when none is): no banked credit.
//! ```
//!
//! Inside a tenant, requests leave by `priority` (lower first), then arrival.
//! Each tenant's queue is bounded (`max_queued`): `push` refuses beyond it.
//! A request is one entry however many sequences it runs (prompts × `n`), and
//! is admitted whole or not at all: `push` refuses at once an entry that could
//! never fit (more slots than `max_slots` or than the tenant's
//! `max_concurrent`), so nothing ever holds slots while waiting for more.
//!
//! Two classes of request ([`Class`]): interactive (HTTP clients) and
//! background (the Batch API's requests). Each tenant has one queue per class;
//! a background request leaves only when no interactive request of any tenant
//! can be admitted, except that after `background_every` interactive
//! admissions passed a waiting background request, one background request goes
//! first (so a batch progresses under any interactive load, at a bounded
//! share). Both classes charge the same per-tenant counters.
//! Owns: counters, per-tenant queues and in-flight counts. Does not own: the
//! engine, time, or token-rate limits ([`TokenBucket`] is separate).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Static parameters of one tenant.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantShare {
    /// Weight (> 0).
    pub weight: f64,
    /// Most sequences in flight (0 = unlimited).
    pub max_concurrent: usize,
    /// Most queued requests.
    pub max_queued: usize,
}

struct Entry<T> {
    priority: i32,
    seq: u64,
    input_tokens: usize,
    slots: usize,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, o: &Self) -> bool {
        self.priority == o.priority && self.seq == o.seq
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Entry<T> {
    /// Max-heap order: the entry that should leave first is the greatest.
    fn cmp(&self, o: &Self) -> Ordering {
        o.priority.cmp(&self.priority).then(o.seq.cmp(&self.seq))
    }
}

/// The class of a queued request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Class {
    /// A client waiting on a connection.
    #[default]
    Interactive,
    /// Background work (a batch's request): admitted after interactive ones.
    Background,
}

impl Class {
    fn index(self) -> usize {
        match self {
            Class::Interactive => 0,
            Class::Background => 1,
        }
    }
}

struct Tenant<T> {
    share: TenantShare,
    counter: f64,
    /// Queues by [`Class::index`].
    queues: [BinaryHeap<Entry<T>>; 2],
    in_flight: usize,
}

impl<T> Tenant<T> {
    fn queued(&self) -> usize {
        self.queues.iter().map(BinaryHeap::len).sum()
    }

    fn is_idle(&self) -> bool {
        self.queues.iter().all(BinaryHeap::is_empty)
    }
}

/// A request leaving the queue.
#[derive(Debug)]
pub struct Popped<T> {
    /// Tenant index.
    pub tenant: usize,
    /// Engine sequences it occupies (its `n`).
    pub slots: usize,
    /// Prompt tokens charged.
    pub input_tokens: usize,
    /// The queued item.
    pub item: T,
}

/// The queue refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The tenant already has `max_queued` requests waiting (or does not exist).
    TenantQueueFull,
    /// The request needs more slots than the server ever runs at once.
    ExceedsMaxSlots {
        /// The queue's `max_slots` (the server's `max_running`).
        limit: usize,
    },
    /// The request needs more slots than its tenant may hold at once.
    ExceedsTenantCap {
        /// The tenant's `max_concurrent`.
        limit: usize,
    },
}

/// Per-tenant bounded queues ordered across tenants by virtual token counters.
pub struct FairQueue<T> {
    tenants: Vec<Tenant<T>>,
    /// Most slots in flight over all tenants (the server's `max_running`).
    max_slots: usize,
    input_weight: f64,
    output_weight: f64,
    /// The tenant that most recently left the backlogged set.
    last_left: Option<usize>,
    next_seq: u64,
    /// Interactive admissions that passed a waiting background request since a background one went.
    passed_over: usize,
    /// After this many, a waiting background request goes first.
    background_every: usize,
}

impl<T> std::fmt::Debug for FairQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairQueue")
            .field("counters", &self.counters())
            .field("queued", &self.total_queued())
            .finish()
    }
}

impl<T> FairQueue<T> {
    /// Empty queues for `shares`, with at most `max_slots` slots in flight in all;
    /// `input_weight`/`output_weight` price prompt and generated tokens.
    pub fn new(
        shares: Vec<TenantShare>,
        max_slots: usize,
        input_weight: f64,
        output_weight: f64,
    ) -> Self {
        let tenants = shares
            .into_iter()
            .map(|share| Tenant {
                share,
                counter: 0.0,
                queues: [BinaryHeap::new(), BinaryHeap::new()],
                in_flight: 0,
            })
            .collect();
        Self {
            tenants,
            max_slots: max_slots.max(1),
            input_weight,
            output_weight,
            last_left: None,
            next_seq: 0,
            passed_over: 0,
            background_every: 16,
        }
    }

    /// Sets how many interactive admissions may pass a waiting background
    /// request before one background request goes first (at least 1; default 16).
    pub fn set_background_every(&mut self, n: usize) {
        self.background_every = n.max(1);
    }

    /// Whether a request of tenant `k` occupying `slots` sequences can ever be admitted.
    pub fn check_fits(&self, k: usize, slots: usize) -> Result<(), PushError> {
        let Some(t) = self.tenants.get(k) else {
            return Err(PushError::TenantQueueFull);
        };
        if slots > self.max_slots {
            return Err(PushError::ExceedsMaxSlots {
                limit: self.max_slots,
            });
        }
        let cap = t.share.max_concurrent;
        if cap > 0 && slots > cap {
            return Err(PushError::ExceedsTenantCap { limit: cap });
        }
        Ok(())
    }

    /// Number of tenants.
    pub fn num_tenants(&self) -> usize {
        self.tenants.len()
    }

    /// Virtual counter of each tenant.
    pub fn counters(&self) -> Vec<f64> {
        self.tenants.iter().map(|t| t.counter).collect()
    }

    /// Queued requests of tenant `k` (both classes).
    pub fn queued(&self, k: usize) -> usize {
        self.tenants.get(k).map_or(0, Tenant::queued)
    }

    /// Queued requests of `class` over all tenants.
    pub fn queued_class(&self, class: Class) -> usize {
        self.tenants
            .iter()
            .map(|t| t.queues[class.index()].len())
            .sum()
    }

    /// Sequences of tenant `k` in flight.
    pub fn in_flight(&self, k: usize) -> usize {
        self.tenants.get(k).map_or(0, |t| t.in_flight)
    }

    /// Queued requests over all tenants.
    pub fn total_queued(&self) -> usize {
        self.tenants.iter().map(Tenant::queued).sum()
    }

    /// Sequences in flight over all tenants.
    pub fn total_in_flight(&self) -> usize {
        self.tenants.iter().map(|t| t.in_flight).sum()
    }

    /// Enqueues a request of tenant `k` costing `input_tokens` prompt tokens and
    /// occupying `slots` engine sequences; lifts an idle tenant's counter first.
    /// Refuses a request that could never fit ([`FairQueue::check_fits`]).
    pub fn push(
        &mut self,
        k: usize,
        priority: i32,
        input_tokens: usize,
        slots: usize,
        item: T,
    ) -> Result<(), (PushError, T)> {
        self.push_class(k, Class::Interactive, priority, input_tokens, slots, item)
    }

    /// [`FairQueue::push`] in `class`; `max_queued` bounds both classes together.
    pub fn push_class(
        &mut self,
        k: usize,
        class: Class,
        priority: i32,
        input_tokens: usize,
        slots: usize,
        item: T,
    ) -> Result<(), (PushError, T)> {
        let slots = slots.max(1);
        if let Err(e) = self.check_fits(k, slots) {
            return Err((e, item));
        }
        let Some(t) = self.tenants.get(k) else {
            return Err((PushError::TenantQueueFull, item));
        };
        if t.queued() >= t.share.max_queued {
            return Err((PushError::TenantQueueFull, item));
        }
        if t.is_idle() {
            // Returning from idle: no credit for the time away.
            let floor = self
                .tenants
                .iter()
                .filter(|o| !o.is_idle())
                .map(|o| o.counter)
                .min_by(f64::total_cmp)
                .or_else(|| {
                    self.last_left
                        .and_then(|l| self.tenants.get(l))
                        .map(|o| o.counter)
                });
            if let (Some(floor), Some(t)) = (floor, self.tenants.get_mut(k)) {
                t.counter = t.counter.max(floor);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(t) = self.tenants.get_mut(k) {
            t.queues[class.index()].push(Entry {
                priority,
                seq,
                input_tokens,
                slots,
                item,
            });
        }
        Ok(())
    }

    /// The next request to admit when `free_slots` engine sequences are free: the
    /// backlogged tenant with the lowest counter among those whose head request
    /// fits both in `free_slots` and under the tenant's `max_concurrent`,
    /// interactive requests first (module docs for the background class's turn).
    /// Charges its prompt tokens.
    pub fn pop(&mut self, free_slots: usize) -> Option<Popped<T>> {
        let background_waiting = self.queued_class(Class::Background) > 0;
        let order = if background_waiting && self.passed_over >= self.background_every {
            [Class::Background, Class::Interactive]
        } else {
            [Class::Interactive, Class::Background]
        };
        let (k, class) = order
            .into_iter()
            .find_map(|c| self.pick(c, free_slots).map(|k| (k, c)))?;
        match class {
            Class::Interactive if background_waiting => self.passed_over += 1,
            Class::Interactive => {}
            Class::Background => self.passed_over = 0,
        }
        let iw = self.input_weight;
        let t = self.tenants.get_mut(k)?;
        let e = t.queues[class.index()].pop()?;
        t.counter += iw * e.input_tokens as f64 / t.share.weight;
        t.in_flight += e.slots;
        if t.is_idle() {
            self.last_left = Some(k);
        }
        Some(Popped {
            tenant: k,
            slots: e.slots,
            input_tokens: e.input_tokens,
            item: e.item,
        })
    }

    /// The tenant whose `class` head request would leave now (lowest counter among those that fit).
    fn pick(&self, class: Class, free_slots: usize) -> Option<usize> {
        self.tenants
            .iter()
            .enumerate()
            .filter(|(_, t)| match t.queues[class.index()].peek() {
                Some(e) => {
                    let cap = t.share.max_concurrent;
                    let under_cap = cap == 0 || t.in_flight.saturating_add(e.slots) <= cap;
                    under_cap && e.slots <= free_slots
                }
                None => false,
            })
            .min_by(|a, b| a.1.counter.total_cmp(&b.1.counter).then(a.0.cmp(&b.0)))
            .map(|(k, _)| k)
    }

    /// Charges `tokens` generated tokens to tenant `k`.
    pub fn on_output(&mut self, k: usize, tokens: u64) {
        let ow = self.output_weight;
        if let Some(t) = self.tenants.get_mut(k) {
            t.counter += ow * tokens as f64 / t.share.weight;
        }
    }

    /// Returns `slots` engine sequences of tenant `k` (its request ended).
    pub fn on_done(&mut self, k: usize, slots: usize) {
        if let Some(t) = self.tenants.get_mut(k) {
            debug_assert!(
                t.in_flight >= slots,
                "tenant {k}: done {slots} > in flight {}",
                t.in_flight
            );
            t.in_flight = t.in_flight.saturating_sub(slots);
        }
    }

    /// Removes the queued requests for which `drop_it` holds (e.g. the client went
    /// away); returns them with their tenant index.
    pub fn remove_where(&mut self, mut drop_it: impl FnMut(&T) -> bool) -> Vec<(usize, T)> {
        let mut out = Vec::new();
        for (k, t) in self.tenants.iter_mut().enumerate() {
            for queue in t.queues.iter_mut() {
                if !queue.iter().any(|e| drop_it(&e.item)) {
                    continue;
                }
                let old = std::mem::take(queue).into_vec();
                for e in old {
                    if drop_it(&e.item) {
                        out.push((k, e.item));
                    } else {
                        queue.push(e);
                    }
                }
            }
        }
        out
    }

    /// Removes and returns every queued request (with its tenant index).
    pub fn drain_all(&mut self) -> Vec<(usize, T)> {
        self.remove_where(|_| true)
    }
}

/// A token bucket refilled at `per_minute / 60` tokens per second, holding at most
/// `per_minute` tokens. A request reserves the most it can use (prompt + `n` ×
/// `max_tokens`) before it is admitted, and what it did not use is refunded when
/// it ends, so the bucket never goes below zero: over any interval of `t`
/// seconds a tenant gets at most `per_minute · (1 + t / 60)` tokens.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    per_minute: f64,
    level: f64,
    last_s: f64,
}

/// A reservation the bucket cannot grant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReserveError {
    /// Not enough tokens now; enough after this many seconds.
    Wait {
        /// Seconds until the bucket holds the reservation.
        wait_s: f64,
        /// Tokens in the bucket now (rounded down).
        available: u64,
    },
    /// More than the bucket ever holds (`per_minute`).
    TooLarge {
        /// The bucket's capacity.
        capacity: u64,
    },
}

impl TokenBucket {
    /// A full bucket at time `now_s`.
    pub fn new(per_minute: u64, now_s: f64) -> Self {
        Self {
            per_minute: per_minute as f64,
            level: per_minute as f64,
            last_s: now_s,
        }
    }

    fn refill(&mut self, now_s: f64) {
        let dt = (now_s - self.last_s).max(0.0);
        self.level = (self.level + dt * self.per_minute / 60.0).min(self.per_minute);
        self.last_s = self.last_s.max(now_s);
    }

    /// Takes `tokens` out of the bucket if it holds them now.
    pub fn reserve(&mut self, tokens: u64, now_s: f64) -> Result<(), ReserveError> {
        self.refill(now_s);
        let want = tokens as f64;
        if want > self.per_minute {
            return Err(ReserveError::TooLarge {
                capacity: self.per_minute as u64,
            });
        }
        if want > self.level {
            let wait_s = (want - self.level) * 60.0 / self.per_minute;
            return Err(ReserveError::Wait {
                wait_s,
                available: self.level.max(0.0) as u64,
            });
        }
        self.level -= want;
        Ok(())
    }

    /// Returns `tokens` reserved but not used (never beyond the capacity).
    pub fn refund(&mut self, tokens: u64, now_s: f64) {
        self.refill(now_s);
        self.level = (self.level + tokens as f64).min(self.per_minute);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(weight: f64) -> TenantShare {
        TenantShare {
            weight,
            max_concurrent: 0,
            max_queued: 1000,
        }
    }

    /// Simulates a server with `slots` sequences; each request has `inp` prompt
    /// tokens and generates `out` tokens, one per step. Returns the tokens served
    /// per tenant, the largest |counter difference| seen while all tenants were
    /// backlogged, and the order requests were admitted in.
    fn simulate(
        q: &mut FairQueue<u32>,
        slots: usize,
        inp: usize,
        out: u64,
        steps: usize,
    ) -> (Vec<f64>, f64, Vec<usize>) {
        let n = q.num_tenants();
        let mut running: Vec<(usize, u64)> = Vec::new();
        let mut served = vec![0.0; n];
        let mut max_gap: f64 = 0.0;
        let mut order = Vec::new();
        for _ in 0..steps {
            while running.len() < slots {
                let Some(p) = q.pop(slots - running.len()) else {
                    break;
                };
                served[p.tenant] += inp as f64;
                order.push(p.tenant);
                running.push((p.tenant, out));
            }
            for r in &mut running {
                q.on_output(r.0, 1);
                served[r.0] += 1.0;
                r.1 -= 1;
            }
            for r in running.iter().filter(|r| r.1 == 0) {
                q.on_done(r.0, 1);
            }
            running.retain(|r| r.1 > 0);
            if (0..n).all(|k| q.queued(k) > 0) {
                let c = q.counters();
                let gap = c.iter().cloned().fold(f64::MIN, f64::max)
                    - c.iter().cloned().fold(f64::MAX, f64::min);
                max_gap = max_gap.max(gap);
            }
        }
        (served, max_gap, order)
    }

    #[test]
    fn newcomer_is_not_stuck_behind_backlog() {
        let mut q = FairQueue::new(vec![share(1.0), share(1.0)], 64, 1.0, 2.0);
        for i in 0..200 {
            q.push(0, 0, 20, 1, i).unwrap();
        }
        // A runs alone for a while and accumulates counter.
        let _ = simulate(&mut q, 4, 20, 50, 300);
        let before = q.queued(0);
        for i in 0..20 {
            q.push(1, 0, 20, 1, 1000 + i).unwrap();
        }
        // B was lifted to A's counter, not to 0: it does not get unbounded priority either.
        let c = q.counters();
        assert!((c[1] - c[0]).abs() < 1e-9, "{c:?}");
        let (_, _, order) = simulate(&mut q, 4, 20, 50, 1000);
        // B's 20 requests are all admitted within the first ~40 admissions (alternating), not after A's backlog.
        let last_b = order.iter().rposition(|&t| t == 1).unwrap();
        assert!(order.iter().filter(|&&t| t == 1).count() == 20);
        assert!(
            last_b < 45,
            "last B admission at {last_b}; A had {before} queued; order {order:?}"
        );
    }

    #[test]
    fn shares_follow_weights_within_bound() {
        let (inp, out) = (16usize, 32u64);
        let mut q = FairQueue::new(vec![share(3.0), share(1.0)], 64, 1.0, 2.0);
        for i in 0..500 {
            q.push(0, 0, inp, 1, i).unwrap();
            q.push(1, 0, inp, 1, i).unwrap();
        }
        let (served, gap, _) = simulate(&mut q, 8, inp, out, 2000);
        // Paper's bound (Thm 4.4 style): backlogged counters differ by at most
        // max(w_in·L_in, w_out·M) per request in flight, over the smallest weight.
        let u = (1.0 * inp as f64).max(2.0 * out as f64) + 2.0 * 8.0;
        assert!(gap <= 2.0 * u * 8.0, "gap {gap} > bound");
        let ratio = served[0] / served[1];
        assert!(
            (ratio - 3.0).abs() < 0.35,
            "ratio {ratio}, served {served:?}"
        );
    }

    #[test]
    fn bounds_priorities_and_caps() {
        let mut q = FairQueue::new(
            vec![
                TenantShare {
                    weight: 1.0,
                    max_concurrent: 1,
                    max_queued: 2,
                },
                share(1.0),
            ],
            64,
            1.0,
            2.0,
        );
        q.push(0, 5, 1, 1, "late").unwrap();
        q.push(0, -1, 1, 1, "urgent").unwrap();
        assert_eq!(
            q.push(0, 0, 1, 1, "x").unwrap_err().0,
            PushError::TenantQueueFull
        );
        q.push(1, 0, 1, 1, "other").unwrap();
        let a = q.pop(10).unwrap();
        assert_eq!((a.tenant, a.item), (0, "urgent"));
        // Tenant 0 at max_concurrent: tenant 1 goes even with a higher counter.
        let b = q.pop(10).unwrap();
        assert_eq!(b.item, "other");
        assert!(q.pop(10).is_none());
        q.on_done(0, 1);
        assert_eq!(q.pop(10).unwrap().item, "late");
        // Slots: a request needing 3 sequences waits for 3 free ones.
        q.push(1, 0, 1, 3, "n3").unwrap();
        assert!(q.pop(2).is_none());
        assert_eq!(q.pop(3).unwrap().slots, 3);
        let gone = {
            q.push(1, 0, 1, 1, "gone").unwrap();
            q.remove_where(|s| *s == "gone")
        };
        assert_eq!(gone, vec![(1, "gone")]);
    }

    /// Issue 10, observation 1 (pure core): a request is one entry of prompts × n
    /// slots; one that can never fit is refused at push, and one that fits is
    /// admitted whole (never partly), counting all its slots against the caps.
    #[test]
    fn whole_requests_only_and_never_fitting_ones_refused() {
        let capped = TenantShare {
            weight: 1.0,
            max_concurrent: 8,
            max_queued: 10,
        };
        let mut q = FairQueue::new(vec![share(1.0), capped], 64, 1.0, 2.0);
        // 5 prompts × n=16 = 80 > 64: refused, nothing queued or held.
        assert_eq!(
            q.push(0, 0, 5, 80, "big").unwrap_err().0,
            PushError::ExceedsMaxSlots { limit: 64 }
        );
        // 2 prompts × n=8 = 16 > tenant 1's max_concurrent 8.
        assert_eq!(
            q.push(1, 0, 2, 16, "b16").unwrap_err().0,
            PushError::ExceedsTenantCap { limit: 8 }
        );
        assert_eq!((q.total_queued(), q.total_in_flight()), (0, 0));
        // Exactly at the limits: admitted whole.
        q.push(0, 0, 4, 64, "a64").unwrap();
        assert!(
            q.pop(63).is_none(),
            "64 slots do not fit in 63; nothing is taken partly"
        );
        let p = q.pop(64).unwrap();
        assert_eq!((p.item, p.slots), ("a64", 64));
        q.on_done(0, 64);
        q.push(1, 0, 1, 8, "b8").unwrap();
        q.push(1, 0, 1, 1, "b1").unwrap();
        assert_eq!(q.pop(64).unwrap().item, "b8");
        // Tenant 1 holds 8 of its 8: even a 1-slot request waits.
        assert!(q.pop(64).is_none());
        // One completion of the 8 finished early and returned its slot: 7 + 1 fits.
        q.on_done(1, 1);
        assert_eq!(q.pop(64).unwrap().item, "b1");
        assert_eq!(q.in_flight(1), 8);
    }

    #[test]
    fn token_bucket_reserves_and_refunds() {
        let mut b = TokenBucket::new(600, 0.0); // 10 tokens/s
        b.reserve(400, 0.0).unwrap();
        // 200 left: a 300-token reservation waits 10 s, never drives the level negative.
        assert_eq!(
            b.reserve(300, 0.0),
            Err(ReserveError::Wait {
                wait_s: 10.0,
                available: 200
            })
        );
        b.reserve(200, 0.0).unwrap();
        assert!(matches!(b.reserve(1, 0.0), Err(ReserveError::Wait { .. })));
        // More than the whole bucket: never.
        assert_eq!(
            b.reserve(601, 100.0),
            Err(ReserveError::TooLarge { capacity: 600 })
        );
        // A request that used 150 of its 400 refunds 250 (capped at the capacity).
        let mut b = TokenBucket::new(600, 0.0);
        b.reserve(400, 0.0).unwrap();
        b.refund(250, 0.0);
        assert_eq!(
            b.reserve(451, 0.0),
            Err(ReserveError::Wait {
                wait_s: 0.1,
                available: 450
            })
        );
        b.reserve(450, 0.0).unwrap();
        b.refund(10_000, 1.0);
        assert!(matches!(
            b.reserve(601, 1.0),
            Err(ReserveError::TooLarge { .. })
        ));
        b.reserve(600, 1.0).unwrap();
    }

    /// Eight reservations arriving together through a 200/min bucket: only what
    /// fits is granted (the HTTP test `tokens_per_minute_is_never_overshot`).
    #[test]
    fn token_bucket_is_never_overshot() {
        let mut b = TokenBucket::new(200, 0.0);
        let granted = (0..8).filter(|_| b.reserve(64, 0.0).is_ok()).count();
        assert_eq!(granted, 3);
    }

    /// The Batch API's class: background requests leave only when no
    /// interactive request of any tenant fits, and one goes after every
    /// `background_every` interactive admissions that passed it.
    #[test]
    fn background_waits_for_interactive_but_is_not_starved() {
        let mut q = FairQueue::new(vec![share(1.0), share(1.0)], 64, 1.0, 2.0);
        q.set_background_every(3);
        // Tenant 0's batch arrived first and its counter is the lowest: still after B's interactive work.
        for i in 0..4 {
            q.push_class(0, Class::Background, 0, 1, 1, 100 + i)
                .unwrap();
        }
        q.on_output(1, 1000);
        for i in 0..7 {
            q.push(1, 0, 1, 1, i).unwrap();
        }
        assert_eq!(q.queued_class(Class::Background), 4);
        assert_eq!(q.queued(0), 4);
        let order: Vec<i32> = std::iter::from_fn(|| q.pop(64).map(|p| p.item)).collect();
        // Three interactive, one background, three interactive, one background, then the rest.
        assert_eq!(order, vec![0, 1, 2, 100, 3, 4, 5, 101, 6, 102, 103]);
        // Interactive blocked by its tenant's cap: background uses the free slots.
        let capped = TenantShare {
            weight: 1.0,
            max_concurrent: 1,
            max_queued: 10,
        };
        let mut q = FairQueue::new(vec![capped, share(1.0)], 64, 1.0, 2.0);
        q.push(0, 0, 1, 1, "a1").unwrap();
        q.push(0, 0, 1, 1, "a2").unwrap();
        q.push_class(1, Class::Background, 0, 1, 1, "b").unwrap();
        assert_eq!(q.pop(64).unwrap().item, "a1");
        assert_eq!(q.pop(64).unwrap().item, "b");
        assert!(q.pop(64).is_none());
        // max_queued bounds both classes; removal sees both.
        let small = TenantShare {
            weight: 1.0,
            max_concurrent: 0,
            max_queued: 2,
        };
        let mut q = FairQueue::new(vec![small], 64, 1.0, 2.0);
        q.push(0, 0, 1, 1, 1).unwrap();
        q.push_class(0, Class::Background, 0, 1, 1, 2).unwrap();
        assert_eq!(
            q.push_class(0, Class::Background, 0, 1, 1, 3)
                .unwrap_err()
                .0,
            PushError::TenantQueueFull
        );
        assert_eq!(q.drain_all().len(), 2);
        assert_eq!(q.total_queued(), 0);
    }
}
