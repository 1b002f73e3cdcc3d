//! One sync pass as the sender sees it, across any number of connections: the producer's
//! batches, the window of unacknowledged ones, and how far the process server and the
//! master target have come.
//!
//! Invariants: batches enter the window in seq order straight from the producer; the last
//! batch of the pass is the one flagged `RESYNC_END`, and `last_seq` is known from the
//! moment it enters the window; the pass is done when the process server holds every batch
//! durably (`cached_seq >= last_seq`) and, with `--wait`, the master target has applied them
//! all (`applied_seq >= last_seq`). Nothing here does I/O: the session drives it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prost::Message;
use protocol::batch::flags;
use protocol::pb::{Batch, DiskProgress};
use tokio::sync::mpsc;

use crate::progress::Meter;
use crate::scan::ScanError;
use crate::window::{Window, WindowError};

#[derive(Debug)]
pub struct Transfer {
    window: Window,
    batches: mpsc::Receiver<Result<Batch, ScanError>>,
    last_seq: Option<u64>,
    applied_seq: u64,
    wait_applied: bool,
    /// Set when an ack moved `cached_seq` forward; cleared by [`Self::take_progress`].
    progressed: bool,
    /// Whether "waiting for the master target" was logged.
    announced_wait: bool,
    /// Continuous replication: a `RESYNC_END` closes a resync interval, not the transfer,
    /// which then never ends by itself.
    endless: bool,
    meter: Arc<Meter>,
}

impl Transfer {
    /// A pass whose batches come from `batches`, starting after `welcome.cached_seq`.
    pub fn new(
        welcome: &DiskProgress,
        window_bytes: usize,
        batches: mpsc::Receiver<Result<Batch, ScanError>>,
        wait_applied: bool,
        meter: Arc<Meter>,
    ) -> Self {
        meter.acked_seq.store(welcome.cached_seq, Ordering::Relaxed);
        meter
            .applied_seq
            .store(welcome.applied_seq, Ordering::Relaxed);
        Transfer {
            window: Window::new(welcome.cached_seq, window_bytes),
            batches,
            last_seq: None,
            applied_seq: welcome.applied_seq,
            wait_applied,
            progressed: false,
            announced_wait: false,
            endless: false,
            meter,
        }
    }

    /// Makes this transfer endless (`agent replicate`): see the field.
    pub fn endless(mut self) -> Self {
        self.endless = true;
        self
    }

    /// Whether to pull another batch from the producer now.
    pub fn wants_batch(&self) -> bool {
        self.last_seq.is_none() && self.window.has_room()
    }

    /// Waits for the producer's next batch and puts it into the window.
    pub async fn pull(&mut self) -> Result<(), ScanError> {
        let batch = self.batches.recv().await.ok_or(ScanError::ProducerDied)??;
        if !self.endless && batch.flags & flags::RESYNC_END != 0 {
            self.last_seq = Some(batch.seq);
        }
        self.window.push(batch);
        self.store_backlog();
        Ok(())
    }

    /// Whether a batch waits to be sent on this connection.
    pub fn has_unsent(&self) -> bool {
        self.window.next_unsent().is_some()
    }

    /// The next batch to send on this connection, recorded as sent.
    pub fn next_to_send(&mut self) -> Option<Batch> {
        let batch = self.window.next_unsent()?.clone();
        let bytes = batch.encoded_len() as u64;
        let counter = if self.window.mark_sent() {
            &self.meter.wire_bytes
        } else {
            &self.meter.resent_bytes
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
        self.meter.sent_seq.fetch_max(batch.seq, Ordering::Relaxed);
        Some(batch)
    }

    /// A cumulative ack from the process server.
    pub fn ack(&mut self, p: &DiskProgress) -> Result<(), WindowError> {
        if self.window.ack(p.cached_seq)? > 0 {
            self.progressed = true;
        }
        self.applied(p.applied_seq);
        self.meter
            .acked_seq
            .store(self.window.acked(), Ordering::Relaxed);
        self.store_backlog();
        if self.waiting_for_apply() && !self.announced_wait {
            self.announced_wait = true;
            tracing::info!(
                "every batch is durable in the process server's cache; waiting for the master \
                 target to apply up to seq {}",
                self.last_seq.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// A new connection's welcome: resume after what the process server holds.
    pub fn resume(&mut self, welcome: &DiskProgress) -> Result<(), WindowError> {
        self.window.resume(welcome.cached_seq)?;
        self.applied(welcome.applied_seq);
        self.meter
            .acked_seq
            .store(self.window.acked(), Ordering::Relaxed);
        self.store_backlog();
        Ok(())
    }

    fn store_backlog(&self) {
        self.meter
            .window_bytes
            .store(self.window.bytes() as u64, Ordering::Relaxed);
    }

    fn applied(&mut self, applied_seq: u64) {
        if applied_seq > self.applied_seq {
            self.applied_seq = applied_seq;
            self.meter.applied_seq.store(applied_seq, Ordering::Relaxed);
        }
    }

    /// The process server paused or resumed intake (shown in the status).
    pub fn paused(&self, on: bool) {
        self.meter.paused.store(on, Ordering::Relaxed);
    }

    /// Whether the pass is complete (see the module invariants).
    pub fn done(&self) -> bool {
        self.last_seq.is_some_and(|last| {
            self.window.acked() >= last && (!self.wait_applied || self.applied_seq >= last)
        })
    }

    /// Whether every batch is durable in the cache but `--wait` still waits for the apply.
    fn waiting_for_apply(&self) -> bool {
        self.last_seq
            .is_some_and(|last| self.window.acked() >= last)
            && !self.done()
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Whether an ack advanced since the last call (used to reset the reconnect backoff).
    pub fn take_progress(&mut self) -> bool {
        std::mem::take(&mut self.progressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::batch::BatchBuilder;

    fn batch(seq: u64, last: bool) -> Batch {
        let mut b = BatchBuilder::new();
        b.push_write(seq * 4096, &[1; 4096]);
        let end = if last { flags::RESYNC_END } else { 0 };
        b.finish("d", seq, 1, flags::RESYNC | end)
    }

    fn progress(cached: u64, applied: u64) -> DiskProgress {
        DiskProgress {
            disk_id: "d".into(),
            cached_seq: cached,
            applied_seq: applied,
        }
    }

    async fn pass(wait: bool) -> Transfer {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Ok(batch(6, false))).await.unwrap();
        tx.send(Ok(batch(7, true))).await.unwrap();
        let mut t = Transfer::new(&progress(5, 5), 1 << 20, rx, wait, Arc::default());
        t.pull().await.unwrap();
        t.pull().await.unwrap();
        assert!(!t.wants_batch(), "nothing after the RESYNC_END batch");
        while t.next_to_send().is_some() {}
        t
    }

    #[tokio::test]
    async fn without_wait_the_pass_ends_when_everything_is_cached() {
        let mut t = pass(false).await;
        t.ack(&progress(6, 5)).unwrap();
        assert!(!t.done());
        assert!(t.take_progress());
        t.ack(&progress(7, 5)).unwrap();
        assert!(t.done());
    }

    #[tokio::test]
    async fn with_wait_the_pass_ends_when_everything_is_applied() {
        let mut t = pass(true).await;
        t.ack(&progress(7, 6)).unwrap();
        assert!(!t.done());
        t.ack(&progress(7, 7)).unwrap();
        assert!(t.done());
    }

    #[tokio::test]
    async fn a_reader_that_vanishes_mid_pass_is_an_error() {
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let mut t = Transfer::new(&progress(0, 0), 1 << 20, rx, false, Arc::default());
        assert!(matches!(t.pull().await, Err(ScanError::ProducerDied)));
    }
}
