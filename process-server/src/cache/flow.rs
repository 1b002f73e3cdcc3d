//! Backpressure of the cache volume: usage against the quota's high-water mark, a full
//! volume (ENOSPC), and the fatal-error latch. Before the pause, a ladder of health events:
//! warning below 30 % of the quota free, critical below 25 % ([`Flow::space_alert`]).
//!
//! Ingest watches [`Flow::pause`]: while it holds a reason, agent streams are told
//! `pause { paused: true, reason }` and their next batches are simply not read (nothing is
//! refused or dropped); when it clears they get `pause { paused: false }`.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

/// Free space of the quota, in percent, below which a warning health event is raised.
pub const WARN_FREE_PERCENT: u64 = 30;
/// Free space of the quota, in percent, below which a critical health event is raised.
pub const CRITICAL_FREE_PERCENT: u64 = 25;

/// Health of the cache's free space (the ladder below the high-water pause).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpaceLevel {
    Ok = 0,
    /// Less than [`WARN_FREE_PERCENT`] of the quota free.
    Warning = 1,
    /// Less than [`CRITICAL_FREE_PERCENT`] of the quota free.
    Critical = 2,
}

impl SpaceLevel {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => SpaceLevel::Ok,
            1 => SpaceLevel::Warning,
            _ => SpaceLevel::Critical,
        }
    }
}

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
    /// The last [`SpaceLevel`] reported, so each change is logged once.
    level: AtomicU8,
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
            level: AtomicU8::new(SpaceLevel::Ok as u8),
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

    /// Whether the writer found the volume full (ENOSPC) and waits for space.
    pub fn out_of_space(&self) -> bool {
        self.no_space.load(Ordering::Relaxed)
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

    /// The free-space level of the cache right now.
    pub fn space_level(&self) -> SpaceLevel {
        self.level_at(self.usage())
    }

    /// The free-space level with `used` bytes in the cache.
    fn level_at(&self, used: u64) -> SpaceLevel {
        let free = self.quota.saturating_sub(used) as u128 * 100;
        let quota = u128::from(self.quota);
        if free < quota * u128::from(CRITICAL_FREE_PERCENT) {
            SpaceLevel::Critical
        } else if free < quota * u128::from(WARN_FREE_PERCENT) {
            SpaceLevel::Warning
        } else {
            SpaceLevel::Ok
        }
    }

    /// The health alert for the cache's free space, if any.
    pub fn space_alert(&self) -> Option<String> {
        self.alert_at(self.usage())
    }

    /// The alert with `used` bytes in the cache: level and numbers from one reading.
    fn alert_at(&self, used: u64) -> Option<String> {
        let free = self.quota.saturating_sub(used);
        let (word, limit) = match self.level_at(used) {
            SpaceLevel::Ok => return None,
            SpaceLevel::Warning => ("warning", WARN_FREE_PERCENT),
            SpaceLevel::Critical => ("critical", CRITICAL_FREE_PERCENT),
        };
        Some(format!(
            "{word}: cache has {free} of {} bytes free, less than {limit}% (agents pause at {}% used)",
            self.quota, self.high_water_percent
        ))
    }

    /// Logs a health event when the free-space level changes.
    fn report_level(&self) {
        let used = self.usage();
        let now = self.level_at(used);
        let before = SpaceLevel::from_u8(self.level.swap(now as u8, Ordering::Relaxed));
        if now == before {
            return;
        }
        match (now, self.alert_at(used)) {
            (SpaceLevel::Critical, Some(a)) => tracing::error!("cache space {a}"),
            (SpaceLevel::Warning, Some(a)) => tracing::warn!("cache space {a}"),
            _ => tracing::info!("cache space back above {WARN_FREE_PERCENT}% free"),
        }
    }

    /// Recomputes the pause reason from usage and the no-space flag.
    fn refresh(&self) {
        self.report_level();
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
                    None => tracing::info!(
                        "cache has room again (below its high-water mark, the volume no longer \
                         full): resuming agents"
                    ),
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

    #[test]
    fn space_ladder_warns_below_30_and_is_critical_below_25_percent_free() {
        let f = Flow::new(0, 1000, 80);
        f.grew(700);
        assert_eq!(f.space_level(), SpaceLevel::Ok);
        assert!(f.space_alert().is_none());
        f.grew(1);
        assert_eq!(f.space_level(), SpaceLevel::Warning);
        assert!(
            f.space_alert()
                .unwrap()
                .starts_with("warning: cache has 299 of 1000")
        );
        f.grew(50);
        assert_eq!(f.space_level(), SpaceLevel::Critical);
        assert!(f.space_alert().unwrap().starts_with("critical"));
        // Still below the high-water mark: warnings only, agents not paused.
        assert!(f.pause().borrow().is_none());
        f.shrank(751);
        assert_eq!(f.space_level(), SpaceLevel::Ok);
    }
}
