//! Backpressure of the cache volume: usage against the quota's high-water mark, a full
//! volume (ENOSPC), and the fatal-error latch.
//!
//! Ingest watches [`Flow::pause`]: while it holds a reason, agent streams are told
//! `pause { paused: true, reason }` and their next batches are simply not read (nothing is
//! refused or dropped); when it clears they get `pause { paused: false }`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

#[derive(Debug)]
pub struct Flow {
    /// Bytes of segment files.
    usage: AtomicU64,
    /// Record bytes queued for the writer, not yet written: counted against the high-water
    /// mark at once, so the queue cannot overshoot the quota.
    queued: AtomicU64,
    quota: u64,
    high_water_percent: u8,
    no_space: AtomicBool,
    pause: watch::Sender<Option<String>>,
    fatal: watch::Sender<Option<String>>,
    /// Signalled when a segment is deleted, to wake a writer waiting out ENOSPC.
    freed: (Mutex<u64>, Condvar),
}

impl Flow {
    pub fn new(usage: u64, quota: u64, high_water_percent: u8) -> Self {
        let f = Flow {
            usage: AtomicU64::new(usage),
            queued: AtomicU64::new(0),
            quota,
            high_water_percent,
            no_space: AtomicBool::new(false),
            pause: watch::Sender::new(None),
            fatal: watch::Sender::new(None),
            freed: (Mutex::new(0), Condvar::new()),
        };
        f.refresh();
        f
    }

    /// Bytes above which agents are paused.
    pub fn high_water_bytes(&self) -> u64 {
        (self.quota as u128 * u128::from(self.high_water_percent) / 100) as u64
    }

    pub fn quota(&self) -> u64 {
        self.quota
    }

    pub fn high_water_percent(&self) -> u8 {
        self.high_water_percent
    }

    pub fn usage(&self) -> u64 {
        self.usage.load(Ordering::Relaxed)
    }

    /// `bytes` more in segment files outside any record (a new segment's header).
    pub fn grew(&self, bytes: u64) {
        self.usage.fetch_add(bytes, Ordering::Relaxed);
        self.refresh();
    }

    /// `bytes` of records were queued for the writer.
    pub fn queued(&self, bytes: u64) {
        self.queued.fetch_add(bytes, Ordering::Relaxed);
        self.refresh();
    }

    /// `bytes` of queued records are now in segment files.
    pub fn committed(&self, bytes: u64) {
        self.usage.fetch_add(bytes, Ordering::Relaxed);
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(bytes))
            });
        self.refresh();
    }

    pub fn shrank(&self, bytes: u64) {
        let _ = self
            .usage
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
        let (lock, cv) = &self.freed;
        *lock.lock() += 1;
        cv.notify_all();
        self.refresh();
    }

    pub fn set_no_space(&self, full: bool) {
        self.no_space.store(full, Ordering::Relaxed);
        self.refresh();
    }

    /// Blocks the writer thread until a segment is deleted, at most a second (space may also
    /// be freed by others on the volume).
    pub fn wait_for_space(&self) {
        let (lock, cv) = &self.freed;
        let mut g = lock.lock();
        let _ = cv.wait_for(&mut g, Duration::from_secs(1));
    }

    /// Recomputes the pause reason from usage and the no-space flag.
    fn refresh(&self) {
        let usage = self.usage() + self.queued.load(Ordering::Relaxed);
        let reason = if self.no_space.load(Ordering::Relaxed) {
            Some(format!(
                "cache volume is full (ENOSPC) at {usage} bytes cached: waiting for the master \
                 target to drain it"
            ))
        } else if usage >= self.high_water_bytes() {
            Some(format!(
                "cache holds {usage} bytes, above its high-water mark of {}% of the {}-byte \
                 quota: waiting for the master target to drain it",
                self.high_water_percent, self.quota
            ))
        } else {
            None
        };
        self.pause.send_if_modified(|cur| {
            if cur.is_some() != reason.is_some() {
                match &reason {
                    Some(r) => tracing::warn!("pausing agents: {r}"),
                    None => tracing::info!("cache below its high-water mark: resuming agents"),
                }
                *cur = reason;
                true
            } else {
                false
            }
        });
    }

    /// `Some(reason)` while agents must pause.
    pub fn pause(&self) -> watch::Receiver<Option<String>> {
        self.pause.subscribe()
    }

    pub fn set_fatal(&self, message: String) {
        self.fatal.send_replace(Some(message));
    }

    /// `Some(message)` once the cache hit a fatal error.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_above_high_water_and_resumes_below() {
        let f = Flow::new(0, 1000, 80);
        let rx = f.pause();
        f.grew(700);
        f.queued(99);
        assert!(rx.borrow().is_none());
        f.queued(1);
        assert!(rx.borrow().as_deref().unwrap().contains("high-water"));
        f.committed(100);
        assert_eq!(f.usage(), 800);
        f.shrank(100);
        assert!(rx.borrow().is_none());
        f.set_no_space(true);
        assert!(rx.borrow().as_deref().unwrap().contains("ENOSPC"));
    }
}
