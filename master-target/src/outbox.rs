//! What the appliers have to tell one connection: coalesced acks and per-disk errors.
//!
//! Why not a channel: an applier serves every connection that delivers its disk's batches,
//! and must never wait for a slow or dead one (that would stall the disk for all). Acks are
//! cumulative, so only the highest per disk matters: the outbox keeps one number per disk
//! and a bounded list of errors, and the connection's writer task drains it at its own pace.
//! Its memory is bounded by the number of disks plus [`MAX_ERRORS`].

use std::collections::{BTreeMap, VecDeque};

use parking_lot::Mutex;
use protocol::error::Refusal;
use protocol::pb::{ApplyMessage, DiskProgress, apply_message::Body};
use tokio::sync::Notify;

/// Most errors kept for a connection that does not read them; older ones are dropped.
pub const MAX_ERRORS: usize = 256;

#[derive(Debug, Default)]
struct Pending {
    acks: BTreeMap<String, u64>,
    errors: VecDeque<Refusal>,
    closed: bool,
}

/// The outbox of one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `disk_id` is applied and durable up to `seq`.
    pub fn ack(&self, disk_id: &str, seq: u64) {
        let mut p = self.pending.lock();
        if p.closed {
            return;
        }
        let slot = p.acks.entry(disk_id.to_string()).or_default();
        *slot = (*slot).max(seq);
        drop(p);
        self.notify.notify_one();
    }

    /// Queues a refusal for the peer.
    pub fn error(&self, refusal: Refusal) {
        let mut p = self.pending.lock();
        if p.closed {
            return;
        }
        if p.errors.len() >= MAX_ERRORS {
            p.errors.pop_front();
        }
        p.errors.push_back(refusal);
        drop(p);
        self.notify.notify_one();
    }

    /// Marks the connection gone: later acks and errors are dropped, and [`Self::next`]
    /// returns `None` once drained.
    pub fn close(&self) {
        self.pending.lock().closed = true;
        self.notify.notify_one();
    }

    /// Waits for and returns everything pending, errors first; `None` once closed.
    pub async fn next(&self) -> Option<Vec<ApplyMessage>> {
        loop {
            {
                let mut p = self.pending.lock();
                if p.closed {
                    return None;
                }
                if !p.acks.is_empty() || !p.errors.is_empty() {
                    let errors = std::mem::take(&mut p.errors)
                        .into_iter()
                        .map(|r| ApplyMessage {
                            body: Some(Body::Error(r.to_report())),
                        });
                    let acks = std::mem::take(&mut p.acks)
                        .into_iter()
                        .map(|(disk_id, seq)| ApplyMessage {
                            body: Some(Body::Ack(DiskProgress {
                                disk_id,
                                cached_seq: seq,
                                applied_seq: seq,
                            })),
                        });
                    return Some(errors.chain(acks).collect());
                }
            }
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acks_coalesce_to_the_highest_seq_per_disk() {
        let o = Outbox::new();
        o.ack("a", 3);
        o.ack("a", 5);
        o.ack("a", 4);
        o.ack("b", 1);
        let msgs = o.next().await.unwrap();
        assert_eq!(msgs.len(), 2);
        let Some(Body::Ack(p)) = &msgs[0].body else {
            panic!()
        };
        assert_eq!((p.disk_id.as_str(), p.applied_seq), ("a", 5));
        o.close();
        assert!(o.next().await.is_none());
    }
}
