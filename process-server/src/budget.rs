//! The ingest memory budget: bytes of agent batches the process server holds between reading
//! them off an agent stream and their record being durable in the cache (the append queue
//! and the group commit in progress included). It is what `--memory-budget` configures,
//! less the forward window (docs/operations.md, "Memory").
//!
//! Backpressure, not refusal: a stream whose batch does not fit waits for a [`Share`], and
//! while it waits it reads nothing more, so HTTP/2 flow control stops its agent once the
//! stream window is full. Nothing is refused or dropped.
//!
//! Fairness while the budget is contended: the waiting stream that has been granted the
//! fewest bytes goes first (least attained service), ties in arrival order. Each stream has
//! at most one batch waiting, so among equal streams this is round robin by bytes, and a
//! stream that started late (its agent was slower to connect or to send) catches up instead
//! of finishing last by however late it started. The catch-up is bounded: a stream joining
//! (or coming back after being idle) counts as having been served at least
//! `clock - MAX_CATCH_UP`, where `clock` is the service of the last contended grant, so a
//! new agent cannot hold the others back for more than [`MAX_CATCH_UP`] bytes of its own.
//! A waiter larger than what is free blocks those behind it (no overtaking), so a large
//! batch is never starved by a stream of small ones.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// How far behind the others (in bytes granted) a stream may start or come back: a late
/// agent catches up by at most this much before it shares equally.
pub const MAX_CATCH_UP: u64 = 64 << 20;

/// Least ingest share of the memory budget: room for a few of the largest batches.
pub const MIN_INGEST: u64 = 16 << 20;

/// The ingest part of a memory budget of `total` bytes: what the forward window (batches
/// read back from the cache and in flight to the master target) leaves of it.
pub fn ingest_share(total: u64, forward_window: u64) -> u64 {
    total.saturating_sub(forward_window).max(MIN_INGEST)
}

/// Per-stream fairness state: the bytes granted to the stream so far (its "service").
#[derive(Debug, Default)]
pub struct Lane {
    served: u64,
}

#[derive(Debug)]
struct Waiter {
    /// The stream's service when it asked: the grant order.
    served: u64,
    /// Arrival order, for ties.
    ticket: u64,
    bytes: u64,
    tx: oneshot::Sender<Share>,
}

#[derive(Debug)]
struct State {
    available: u64,
    /// Service of the last grant made while streams were waiting (a virtual clock).
    clock: u64,
    next_ticket: u64,
    waiters: Vec<Waiter>,
}

/// A byte budget shared by every agent stream.
#[derive(Debug)]
pub struct Budget {
    capacity: u64,
    state: Mutex<State>,
}

/// Bytes of the budget held by one batch; given back when dropped (once its record is
/// durable, or it was never appended).
#[derive(Debug)]
#[must_use = "a share holds budget until it is dropped"]
pub struct Share {
    budget: Option<Arc<Budget>>,
    bytes: u64,
}

impl Share {
    /// A share of no budget (tests and callers outside ingest).
    pub fn untracked() -> Self {
        Share {
            budget: None,
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Some(b) = self.budget.take() {
            b.release(self.bytes);
        }
    }
}

/// A waiter's receiver; dropped before its share arrives (the stream went away), it gives
/// up its place at once, so that the waiters behind it are not held up until the next
/// release.
struct Waiting<'a> {
    budget: &'a Arc<Budget>,
    rx: Option<oneshot::Receiver<Share>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            // First the receiver (and any share already sent to it, which releases itself),
            // then the queue without it.
            drop(rx);
            let mut s = self.budget.state.lock();
            self.budget.grant(&mut s);
        }
    }
}

impl Budget {
    /// A budget of `capacity` bytes (at least 1).
    pub fn new(capacity: u64) -> Arc<Self> {
        let capacity = capacity.max(1);
        Arc::new(Budget {
            capacity,
            state: Mutex::new(State {
                available: capacity,
                clock: 0,
                next_ticket: 0,
                waiters: Vec::new(),
            }),
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes held by batches right now.
    pub fn used(&self) -> u64 {
        self.capacity - self.state.lock().available
    }

    /// Streams waiting for budget right now.
    pub fn waiting(&self) -> usize {
        self.state.lock().waiters.len()
    }

    /// Waits for `bytes` of the budget for a batch of the stream with `lane`, in fair order.
    /// A batch larger than the whole budget waits until all of it is free and takes it all.
    /// Cancel-safe: dropping the future gives back anything granted to it.
    pub async fn acquire(self: &Arc<Self>, lane: &mut Lane, bytes: u64) -> Share {
        let bytes = bytes.min(self.capacity);
        let rx = {
            let mut s = self.state.lock();
            // Bounded catch-up for a stream that is new or was idle.
            lane.served = lane.served.max(s.clock.saturating_sub(MAX_CATCH_UP));
            if s.waiters.is_empty() && s.available >= bytes {
                s.available -= bytes;
                lane.served += bytes;
                return Share {
                    budget: Some(self.clone()),
                    bytes,
                };
            }
            let (tx, rx) = oneshot::channel();
            let ticket = s.next_ticket;
            s.next_ticket += 1;
            s.waiters.push(Waiter {
                served: lane.served,
                ticket,
                bytes,
                tx,
            });
            self.grant(&mut s);
            rx
        };
        let mut waiting = Waiting {
            budget: self,
            rx: Some(rx),
        };
        let share = waiting
            .rx
            .as_mut()
            .expect("set above")
            .await
            .expect("a waiter is removed only by granting it or once its receiver is gone");
        waiting.rx = None;
        lane.served += share.bytes;
        share
    }

    fn release(self: &Arc<Self>, bytes: u64) {
        let mut s = self.state.lock();
        s.available += bytes;
        self.grant(&mut s);
    }

    /// Grants waiters in fair order while the first one fits.
    fn grant(self: &Arc<Self>, s: &mut State) {
        // Streams that stopped waiting (ended, cancelled) give up their place.
        s.waiters.retain(|w| !w.tx.is_closed());
        while let Some(i) = s
            .waiters
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| (w.served, w.ticket))
            .map(|(i, _)| i)
        {
            if s.waiters[i].bytes > s.available {
                return;
            }
            let w = s.waiters.swap_remove(i);
            s.available -= w.bytes;
            s.clock = s.clock.max(w.served);
            let share = Share {
                budget: Some(self.clone()),
                bytes: w.bytes,
            };
            if let Err(mut share) = w.tx.send(share) {
                // The waiter went away meanwhile: take the bytes back here (dropping the
                // share would re-enter this lock).
                share.budget = None;
                s.available += share.bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Runs until every spawned task is blocked.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn grants_at_once_while_free_and_gives_back_on_drop() {
        let b = Budget::new(4 * MIB);
        let mut lane = Lane::default();
        let s1 = b.acquire(&mut lane, 3 * MIB).await;
        assert_eq!(b.used(), 3 * MIB);
        drop(s1);
        assert_eq!(b.used(), 0);
        // Larger than the budget: takes all of it.
        let s2 = b.acquire(&mut lane, 10 * MIB).await;
        assert_eq!(s2.bytes(), 4 * MIB);
        assert_eq!(lane.served, 7 * MIB);
    }

    /// Equal streams, each with one batch waiting at a time (the next one queued while the
    /// previous is still held, as ingest does), are served round robin by bytes while the
    /// budget is contended; a stream that joined late goes first until it has caught up.
    #[tokio::test]
    async fn contended_grants_go_to_the_least_served_stream() {
        let b = Budget::new(MIB);
        let holder = b.acquire(&mut Lane::default(), MIB).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Streams 0 and 1 have been granted 3 MiB each before; stream 2 joins now.
        for (i, served) in [(0, 3 * MIB), (1, 3 * MIB), (2, 0)] {
            let (b, tx) = (b.clone(), tx.clone());
            tokio::spawn(async move {
                let mut lane = Lane { served };
                loop {
                    let share = b.acquire(&mut lane, MIB).await;
                    if tx.send((i, share)).is_err() {
                        return;
                    }
                }
            });
            settle().await;
        }
        assert_eq!(b.waiting(), 3);
        let mut held = holder;
        let mut order = Vec::new();
        for _ in 0..12 {
            // The held batch becomes durable; the next grant goes to the least served.
            drop(held);
            let (i, share) = rx.recv().await.unwrap();
            order.push(i);
            held = share;
            settle().await;
        }
        assert_eq!(order, [2, 2, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[tokio::test]
    async fn catch_up_is_bounded() {
        let b = Budget::new(MIB);
        let mut busy = Lane::default();
        // The busy stream has been served far more than MAX_CATCH_UP while contended.
        let holder = b.acquire(&mut Lane::default(), MIB).await;
        let b2 = b.clone();
        let t = tokio::spawn(async move {
            busy.served = 1000 * MIB;
            let s = b2.acquire(&mut busy, MIB).await;
            drop(s);
            busy
        });
        settle().await;
        drop(holder);
        let busy = t.await.unwrap();
        assert_eq!(b.state.lock().clock, 1000 * MIB);
        let mut late = Lane::default();
        drop(b.acquire(&mut late, MIB).await);
        assert_eq!(late.served, 1000 * MIB - MAX_CATCH_UP + MIB);
        assert_eq!(busy.served, 1001 * MIB);
    }

    #[tokio::test]
    async fn a_cancelled_first_waiter_lets_the_next_one_in_at_once() {
        let b = Budget::new(4 * MIB);
        let _holder = b.acquire(&mut Lane::default(), 3 * MIB).await;
        // First in line: 2 MiB, which does not fit; behind it, 1 MiB, which would.
        let (b1, b2) = (b.clone(), b.clone());
        let first = tokio::spawn(async move { b1.acquire(&mut Lane::default(), 2 * MIB).await });
        settle().await;
        let next = tokio::spawn(async move {
            let mut lane = Lane { served: 10 * MIB };
            b2.acquire(&mut lane, MIB).await
        });
        settle().await;
        assert!(!next.is_finished());
        // The first stream goes away; nothing is released, yet the next one is granted.
        first.abort();
        let _ = first.await;
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), next)
            .await
            .expect("granted without a release")
            .unwrap();
        assert_eq!(next.bytes(), MIB);
        assert_eq!(b.waiting(), 0);
    }

    #[tokio::test]
    async fn a_large_waiter_is_not_overtaken_and_cancelled_waiters_leave() {
        let b = Budget::new(4 * MIB);
        let holder = b.acquire(&mut Lane::default(), 3 * MIB).await;
        // A 2 MiB batch waits (1 MiB free); a cancelled waiter and a 1 MiB one queue behind.
        let (b1, b2, b3) = (b.clone(), b.clone(), b.clone());
        let big = tokio::spawn(async move { b1.acquire(&mut Lane::default(), 2 * MIB).await });
        settle().await;
        let gone = tokio::spawn(async move { b2.acquire(&mut Lane::default(), MIB).await });
        settle().await;
        gone.abort();
        let _ = gone.await;
        let small = tokio::spawn(async move {
            let mut lane = Lane {
                served: u64::MAX / 2,
            };
            b3.acquire(&mut lane, MIB).await
        });
        settle().await;
        assert!(!big.is_finished() && !small.is_finished());
        drop(holder);
        let big = big.await.unwrap();
        let small = small.await.unwrap();
        assert_eq!((big.bytes(), small.bytes()), (2 * MIB, MIB));
        assert_eq!(b.used(), 3 * MIB);
        assert_eq!(b.waiting(), 0);
    }
}
