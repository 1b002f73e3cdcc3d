//! Weighted fair order in which the forwarder takes disks' batches: deficit round robin
//! (Shreedhar and Varghese) over bytes.
//!
//! Disks are visited in turn. On each visit a disk with batches ready is granted
//! `QUANTUM x weight` bytes of credit and sends batches while its credit covers the next one;
//! what is left carries over to its next visit, and a disk with nothing ready loses its
//! credit (an idle disk cannot save up for a burst). So over any busy period every backlogged
//! disk gets bytes in proportion to its weight, whatever its batch sizes, and a disk with a
//! small backlog is served within one round however large the others' backlogs are.
//!
//! The state (credits, whose turn it is) lives across calls, so fairness holds over many
//! calls of [`Fair::choose`], each bounded by the forwarder's window and read size.

use std::collections::HashMap;

/// Credit granted per visit and unit of weight: one default-sized batch.
pub const QUANTUM: u64 = 1 << 20;
/// Weight of a disk without a configured priority.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Highest weight accepted.
pub const MAX_WEIGHT: u32 = 100;

/// The disks' batches that are ready to send, as the forwarder sees them.
pub trait Ready {
    /// Bytes of disk `i`'s next batch, or `None` when it has nothing ready.
    fn peek(&mut self, i: usize) -> Option<u64>;
    /// Takes disk `i`'s next batch (the one `peek` just described).
    fn take(&mut self, i: usize);
}

#[derive(Debug, Default)]
pub struct Fair {
    /// Credit of each disk, by disk id.
    credit: HashMap<String, u64>,
    /// Whose turn it is (an index into the disks of the call).
    turn: usize,
    /// Whether the disk whose turn it is has had its quantum for this visit.
    granted: bool,
}

impl Fair {
    fn next_turn(&mut self, n: usize) {
        self.turn = (self.turn + 1) % n;
        self.granted = false;
    }

    /// Takes up to `max` batches and about `budget` bytes (the last batch may pass it) from
    /// `disks` (id and weight, in a stable order) in weighted fair order.
    pub fn choose(
        &mut self,
        disks: &[(&str, u32)],
        ready: &mut impl Ready,
        max: usize,
        mut budget: u64,
    ) {
        let n = disks.len();
        if n == 0 {
            return;
        }
        self.turn %= n;
        let (mut taken, mut idle) = (0, 0);
        while taken < max && budget > 0 && idle < n {
            let (id, weight) = disks[self.turn];
            let Some(len) = ready.peek(self.turn) else {
                self.credit.remove(id);
                idle += 1;
                self.next_turn(n);
                continue;
            };
            idle = 0;
            let credit = self.credit.entry(id.to_string()).or_default();
            if !self.granted {
                *credit += QUANTUM * u64::from(weight.clamp(1, MAX_WEIGHT));
                self.granted = true;
            }
            if *credit < len {
                // Saved for its next visit: a batch larger than one quantum waits a round.
                self.next_turn(n);
                continue;
            }
            *credit -= len;
            ready.take(self.turn);
            taken += 1;
            budget = budget.saturating_sub(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Queues of batch sizes per disk; counts the bytes taken from each.
    struct Queues {
        queues: Vec<VecDeque<u64>>,
        taken: Vec<u64>,
        order: Vec<usize>,
    }

    impl Queues {
        fn new(queues: Vec<Vec<u64>>) -> Self {
            Queues {
                taken: vec![0; queues.len()],
                queues: queues.into_iter().map(VecDeque::from).collect(),
                order: Vec::new(),
            }
        }
    }

    impl Ready for Queues {
        fn peek(&mut self, i: usize) -> Option<u64> {
            self.queues[i].front().copied()
        }
        fn take(&mut self, i: usize) {
            self.taken[i] += self.queues[i].pop_front().expect("peeked");
            self.order.push(i);
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_small_backlog_is_served_within_a_round_of_a_huge_one() {
        let mut q = Queues::new(vec![vec![MIB; 100_000], vec![MIB; 3]]);
        let mut f = Fair::default();
        let disks = [("huge", 1), ("small", 1)];
        // The window allows 8 batches at a time.
        f.choose(&disks, &mut q, 8, 8 * MIB);
        assert_eq!(q.order, vec![0, 1, 0, 1, 0, 1, 0, 0]);
        // Once the small disk is drained the huge one gets everything.
        f.choose(&disks, &mut q, 8, 8 * MIB);
        assert_eq!(q.taken, vec![13 * MIB, 3 * MIB]);
    }

    #[test]
    fn weights_2_to_1_give_2_to_1_bytes_over_many_calls() {
        let mut q = Queues::new(vec![vec![MIB; 10_000], vec![MIB; 10_000]]);
        let mut f = Fair::default();
        let disks = [("gold", 2), ("bronze", 1)];
        for _ in 0..100 {
            f.choose(&disks, &mut q, 32, 5 * MIB);
        }
        let ratio = q.taken[0] as f64 / q.taken[1] as f64;
        assert!((ratio - 2.0).abs() < 0.05, "{ratio} from {:?}", q.taken);
    }

    #[test]
    fn fairness_is_in_bytes_not_batches() {
        // Disk 0 sends 4 KiB batches, disk 1 sends 4 MiB batches: equal weights, equal bytes.
        let mut q = Queues::new(vec![vec![4 << 10; 1_000_000], vec![4 * MIB; 10_000]]);
        let mut f = Fair::default();
        let disks = [("small-batches", 1), ("big-batches", 1)];
        for _ in 0..2_000 {
            f.choose(&disks, &mut q, 32, 64 * MIB);
        }
        let ratio = q.taken[0] as f64 / q.taken[1] as f64;
        assert!((ratio - 1.0).abs() < 0.1, "{ratio} from {:?}", q.taken);
    }

    #[test]
    fn an_idle_disk_does_not_save_credit() {
        let mut q = Queues::new(vec![vec![MIB; 100], vec![]]);
        let mut f = Fair::default();
        let disks = [("busy", 1), ("idle", 5)];
        f.choose(&disks, &mut q, 10, u64::MAX);
        assert_eq!(q.taken, vec![10 * MIB, 0]);
        // The idle disk gets batches now: it starts from one visit's credit (weight 5: five
        // batches), not from ten visits' worth, and the busy disk keeps its turns.
        q.queues[1].extend([MIB; 100]);
        f.choose(&disks, &mut q, 12, u64::MAX);
        assert_eq!(q.order[10..], [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0]);
    }

    #[test]
    fn nothing_ready_ends_the_call() {
        let mut q = Queues::new(vec![vec![], vec![]]);
        let mut f = Fair::default();
        f.choose(&[("a", 1), ("b", 1)], &mut q, 32, u64::MAX);
        assert!(q.order.is_empty());
        f.choose(&[], &mut q, 32, u64::MAX);
    }
}
