//! The send window: every batch not yet acknowledged as durable by the process server, in
//! seq order, bounded in bytes.
//!
//! Invariants:
//! * `batches` holds seqs `acked + 1 ..= acked + batches.len()` with no gap, so
//!   `next_seq() == acked + len + 1` is the seq the producer must hand in next;
//! * `sent <= batches.len()`: the first `sent` batches went out on the current connection;
//!   a new connection starts again from the first batch the process server does not hold;
//! * `sent_ever` is the highest seq ever sent on any connection: an ack may cover up to it
//!   (a batch sent on a lost connection can still become durable after the next welcome),
//!   never beyond;
//! * `bytes` is the sum of the encoded sizes of `batches`. [`Window::has_room`] turns false
//!   once it reaches the limit (one batch is always admitted, whatever its size): the caller
//!   then stops pulling from the producer, which is the backpressure towards the disk reader.
//!
//! A batch is dropped only when a cumulative ack (or a welcome after a reconnect) says the
//! process server holds it durably, so a lost connection never loses a batch.

use std::collections::VecDeque;

use prost::Message;
use protocol::pb::Batch;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error(
        "the process server now holds this disk only up to seq {server} although it had \
         acknowledged seq {acked} as durable; its cache was lost: run the sync again"
    )]
    AckedBatchesLost { server: u64, acked: u64 },
    #[error(
        "the process server holds seq {server} for this disk but this agent has sent only up \
         to seq {produced}: is another agent replicating the same disk id?"
    )]
    AheadOfAgent { server: u64, produced: u64 },
}

#[derive(Debug)]
pub struct Window {
    batches: VecDeque<Batch>,
    bytes: usize,
    limit: usize,
    acked: u64,
    sent: usize,
    sent_ever: u64,
}

impl Window {
    /// An empty window after the process server said it holds the disk up to `cached_seq`.
    pub fn new(cached_seq: u64, limit: usize) -> Self {
        Window {
            batches: VecDeque::new(),
            bytes: 0,
            limit,
            acked: cached_seq,
            sent: 0,
            sent_ever: cached_seq,
        }
    }

    /// Highest seq the process server holds durably.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Seq the next batch from the producer must carry.
    pub fn next_seq(&self) -> u64 {
        self.acked + self.batches.len() as u64 + 1
    }

    /// Encoded bytes of the unacknowledged batches.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Whether another batch may be taken from the producer.
    pub fn has_room(&self) -> bool {
        self.batches.is_empty() || self.bytes < self.limit
    }

    /// Appends the producer's next batch.
    pub fn push(&mut self, batch: Batch) {
        assert_eq!(
            batch.seq,
            self.next_seq(),
            "producer seqs must follow the window"
        );
        self.bytes += batch.encoded_len();
        self.batches.push_back(batch);
    }

    /// The next batch to send on this connection, if any.
    pub fn next_unsent(&self) -> Option<&Batch> {
        self.batches.get(self.sent)
    }

    /// Records that [`Self::next_unsent`] went out; returns whether it was its first send
    /// (false for a resend after a reconnect).
    pub fn mark_sent(&mut self) -> bool {
        debug_assert!(self.sent < self.batches.len());
        self.sent += 1;
        let seq = self.acked + self.sent as u64;
        let first = seq > self.sent_ever;
        self.sent_ever = self.sent_ever.max(seq);
        first
    }

    /// A cumulative ack: drops every batch up to `cached_seq`. Returns the bytes freed.
    /// Stale acks (below what is already acked) are ignored.
    pub fn ack(&mut self, cached_seq: u64) -> Result<usize, WindowError> {
        if cached_seq > self.sent_ever {
            return Err(WindowError::AheadOfAgent {
                server: cached_seq,
                produced: self.sent_ever,
            });
        }
        Ok(self.drop_through(cached_seq))
    }

    /// A new connection's welcome said the server holds up to `cached_seq`: drop what it
    /// holds and start sending again from the first batch it lacks.
    pub fn resume(&mut self, cached_seq: u64) -> Result<usize, WindowError> {
        if cached_seq < self.acked {
            return Err(WindowError::AckedBatchesLost {
                server: cached_seq,
                acked: self.acked,
            });
        }
        let produced = self.next_seq() - 1;
        if cached_seq > produced {
            return Err(WindowError::AheadOfAgent {
                server: cached_seq,
                produced,
            });
        }
        let freed = self.drop_through(cached_seq);
        self.sent = 0;
        Ok(freed)
    }

    fn drop_through(&mut self, cached_seq: u64) -> usize {
        let mut freed = 0;
        while self.acked < cached_seq {
            let b = self
                .batches
                .pop_front()
                .expect("callers check cached_seq against what was produced");
            freed += b.encoded_len();
            self.acked += 1;
            self.sent = self.sent.saturating_sub(1);
        }
        self.bytes -= freed;
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::batch::BatchBuilder;

    fn batch(seq: u64) -> Batch {
        let mut b = BatchBuilder::new();
        b.push_write(seq * 4096, &[seq as u8; 4096]);
        b.finish("d", seq, 1, 0)
    }

    fn send_all(w: &mut Window) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(b) = w.next_unsent() {
            out.push(b.seq);
            w.mark_sent();
        }
        out
    }

    #[test]
    fn acks_drop_batches_in_order_and_free_their_bytes() {
        let mut w = Window::new(10, 1 << 20);
        for s in 11..=15 {
            w.push(batch(s));
        }
        let total = w.bytes();
        assert_eq!(send_all(&mut w), vec![11, 12, 13, 14, 15]);
        let freed = w.ack(12).unwrap();
        assert_eq!(w.bytes(), total - freed);
        assert_eq!((w.acked(), w.len(), w.next_seq()), (12, 3, 16));
        assert_eq!(w.ack(11).unwrap(), 0, "a stale ack changes nothing");
        assert!(w.next_unsent().is_none());
    }

    #[test]
    fn resume_after_reconnect_resends_only_what_the_server_lacks() {
        let mut w = Window::new(0, 1 << 20);
        for s in 1..=6 {
            w.push(batch(s));
        }
        send_all(&mut w);
        w.ack(2).unwrap();
        // Connection lost; the new welcome says 4 made it into the cache.
        w.resume(4).unwrap();
        assert_eq!(send_all(&mut w), vec![5, 6]);
        // Lost again, before any of 5, 6 was stored.
        w.resume(4).unwrap();
        assert_eq!(send_all(&mut w), vec![5, 6]);
        w.ack(6).unwrap();
        assert!(w.is_empty());
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn a_batch_from_the_lost_connection_may_be_acked_after_the_welcome() {
        let mut w = Window::new(0, 1 << 20);
        for s in 1..=3 {
            w.push(batch(s));
        }
        assert_eq!(send_all(&mut w), vec![1, 2, 3]);
        w.resume(1).unwrap();
        // Seq 2 reached the cache from the old stream after the new welcome.
        w.ack(2).unwrap();
        assert_eq!(send_all(&mut w), vec![3]);
        assert!(matches!(w.ack(4), Err(WindowError::AheadOfAgent { .. })));
    }

    #[test]
    fn a_server_that_forgot_acked_batches_is_an_error() {
        let mut w = Window::new(0, 1 << 20);
        w.push(batch(1));
        w.push(batch(2));
        send_all(&mut w);
        w.ack(2).unwrap();
        assert_eq!(
            w.resume(1),
            Err(WindowError::AckedBatchesLost {
                server: 1,
                acked: 2
            })
        );
    }

    #[test]
    fn an_ack_beyond_what_was_sent_is_an_error() {
        let mut w = Window::new(0, 1 << 20);
        w.push(batch(1));
        w.push(batch(2));
        w.mark_sent();
        assert!(matches!(w.ack(2), Err(WindowError::AheadOfAgent { .. })));
        assert!(matches!(w.resume(3), Err(WindowError::AheadOfAgent { .. })));
    }

    #[test]
    fn the_byte_limit_stops_intake_but_admits_one_batch() {
        let mut w = Window::new(0, 1);
        assert!(w.has_room());
        w.push(batch(1));
        assert!(!w.has_room());
        w.mark_sent();
        w.ack(1).unwrap();
        assert!(w.has_room());
    }
}
