//! Recent throughput of a disk and the drain-time estimate built on it.
//!
//! A rate is an exponentially weighted moving average over time (time constant [`TAU`]): every
//! byte counts with weight `e^(-age/TAU)`, and the weighted sum divided by `TAU` is the rate.
//! For a steady flow of `r` bytes/s it converges to `r`; after the flow stops it decays to 5%
//! within `3 TAU`. It costs O(1) per event and never keeps a list of samples, whatever the
//! batch rate. Every method takes the time as an argument, so tests drive it without sleeping.

use std::time::{Duration, Instant};

/// Time constant of the moving averages: "recent" means roughly the last 10 s.
pub const TAU: Duration = Duration::from_secs(10);
/// A flow silent this long counts as stopped: its rate reads 0 (not a decaying tail), so a
/// backlog that is not draining gets an "unknown" drain time rather than a made-up one.
pub const IDLE_AFTER: Duration = Duration::from_secs(30);

/// Bytes per second over the recent past.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ewma {
    /// The rate as of `at`.
    rate: f64,
    /// Time of the last event; `None` before the first.
    at: Option<Instant>,
}

impl Ewma {
    /// `bytes` passed at `now`.
    pub fn add(&mut self, now: Instant, bytes: u64) {
        self.rate = self.decayed(now) + bytes as f64 / TAU.as_secs_f64();
        self.at = Some(self.at.map_or(now, |a| a.max(now)));
    }

    /// The rate at `now` (0 once idle for [`IDLE_AFTER`]).
    pub fn rate(&self, now: Instant) -> f64 {
        match self.at {
            Some(at) if now.saturating_duration_since(at) < IDLE_AFTER => self.decayed(now),
            _ => 0.0,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        let Some(at) = self.at else {
            return 0.0;
        };
        let age = now.saturating_duration_since(at).as_secs_f64();
        self.rate * (-age / TAU.as_secs_f64()).exp()
    }
}

/// A disk's traffic through the process server, in record bytes (the cached batch bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// Bytes made durable in the cache since start.
    pub in_total: u64,
    /// Bytes the master target acknowledged as applied since start.
    pub out_total: u64,
    pub in_rate: Ewma,
    pub out_rate: Ewma,
}

impl Traffic {
    pub fn received(&mut self, now: Instant, bytes: u64) {
        self.in_total += bytes;
        self.in_rate.add(now, bytes);
    }

    pub fn drained(&mut self, now: Instant, bytes: u64) {
        self.out_total += bytes;
        self.out_rate.add(now, bytes);
    }
}

/// How long `backlog` bytes take to drain at `out_rate` bytes/s: zero without a backlog,
/// `None` (unknown) when nothing drains.
pub fn drain_time(backlog: u64, out_rate: f64) -> Option<Duration> {
    if backlog == 0 {
        Some(Duration::ZERO)
    } else if out_rate > 0.0 {
        Duration::try_from_secs_f64(backlog as f64 / out_rate).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `per_tick` bytes every `tick` for `span`, starting at `from`; returns the end.
    fn feed(e: &mut Ewma, from: Instant, tick: Duration, span: Duration, per_tick: u64) -> Instant {
        let mut t = from;
        while t < from + span {
            t += tick;
            e.add(t, per_tick);
        }
        t
    }

    #[test]
    fn a_steady_flow_converges_to_its_rate() {
        let t0 = Instant::now();
        let mut e = Ewma::default();
        assert_eq!(e.rate(t0), 0.0);
        // 100 000 bytes every 100 ms = 1 MB/s, for 60 s (6 time constants).
        let end = feed(
            &mut e,
            t0,
            Duration::from_millis(100),
            Duration::from_secs(60),
            100_000,
        );
        let r = e.rate(end);
        assert!((r / 1e6 - 1.0).abs() < 0.01, "{r}");
    }

    #[test]
    fn a_rate_change_shows_within_a_few_time_constants() {
        let t0 = Instant::now();
        let mut e = Ewma::default();
        let tick = Duration::from_millis(100);
        let t1 = feed(&mut e, t0, tick, Duration::from_secs(60), 100_000);
        // The flow halves: after 3 TAU, 5% (e^-3) of the old rate's excess is left.
        let t2 = feed(&mut e, t1, tick, 3 * TAU, 50_000);
        let r = e.rate(t2) / 1e6;
        assert!((0.5..0.53).contains(&r), "{r}");
    }

    #[test]
    fn a_stopped_flow_decays_then_reads_zero_once_idle() {
        let t0 = Instant::now();
        let mut e = Ewma::default();
        let end = feed(
            &mut e,
            t0,
            Duration::from_secs(1),
            Duration::from_secs(60),
            1000,
        );
        let r0 = e.rate(end);
        let r1 = e.rate(end + TAU);
        assert!((r1 / r0 - (-1.0f64).exp()).abs() < 1e-9, "{r0} {r1}");
        assert!(e.rate(end + IDLE_AFTER - Duration::from_millis(1)) > 0.0);
        assert_eq!(e.rate(end + IDLE_AFTER), 0.0);
    }

    #[test]
    fn traffic_counts_totals_and_rates_separately() {
        let t0 = Instant::now();
        let mut t = Traffic::default();
        t.received(t0, 500);
        t.received(t0, 500);
        t.drained(t0, 300);
        assert_eq!((t.in_total, t.out_total), (1000, 300));
        assert!(t.in_rate.rate(t0) > t.out_rate.rate(t0));
    }

    #[test]
    fn drain_time_is_backlog_over_rate_zero_when_empty_and_unknown_when_stuck() {
        assert_eq!(drain_time(0, 0.0), Some(Duration::ZERO));
        assert_eq!(drain_time(1000, 0.0), None);
        assert_eq!(drain_time(1000, 100.0), Some(Duration::from_secs(10)));
    }
}
