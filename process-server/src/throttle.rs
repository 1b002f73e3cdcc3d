//! Bandwidth limit of the forwarding (VPN) hop: a token bucket that every batch sent to the
//! master target draws from, whichever of the K connections carries it (the forwarder is
//! the one sender for all of them), at a rate from `--bandwidth-mbit` or a weekly schedule.
//!
//! Schedule grammar (`--bandwidth-schedule`), times in **UTC**:
//!
//! ```text
//! schedule := rule { "," rule }
//! rule     := selector "=" MBIT                 MBIT: 0..=1000000, 0 = unlimited
//! selector := "*" | days | span | days " " span
//! days     := day | day "-" day                 mon tue wed thu fri sat sun; may wrap (fri-mon)
//! span     := HH:MM "-" HH:MM                   start < end, end may be 24:00
//! ```
//!
//! The first rule that matches the current UTC day and time gives the rate; when none
//! matches, `--bandwidth-mbit` does. Example: `mon-fri 08:00-18:00=100,*=1000` = 100 Mbit/s
//! during office hours on weekdays, 1 Gbit/s otherwise.
//!
//! The bucket counts batch bytes as cached (the compressed payload plus a few header bytes),
//! not TLS or HTTP/2 framing. It holds at most [`BURST`] worth of the rate, and may go into
//! debt by one batch, so a batch larger than the bucket still goes out: the next one then
//! waits until the debt is paid. All methods take the time as an argument (tests inject
//! it).

use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

/// Most savings the bucket keeps: a quarter second at the current rate.
pub const BURST: Duration = Duration::from_millis(250);
/// Highest rate accepted, in Mbit/s (1 Tbit/s).
pub const MAX_MBIT: u64 = 1_000_000;
/// Longest single wait, so a schedule change (to a higher rate, or unlimited) is seen soon.
const MAX_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("bandwidth schedule rule '{0}' has no '=MBIT'")]
    MissingRate(String),
    #[error("bandwidth schedule rule '{rule}': '{rate}' is not 0..={MAX_MBIT} Mbit/s")]
    BadRate { rule: String, rate: String },
    #[error("bandwidth schedule rule '{rule}': '{day}' is not a day (mon tue wed thu fri sat sun)")]
    BadDay { rule: String, day: String },
    #[error("bandwidth schedule rule '{rule}': '{span}' is not HH:MM-HH:MM with start before end")]
    BadSpan { rule: String, span: String },
    #[error("bandwidth schedule rule '{0}' selects nothing: give '*', days, a time span or both")]
    BadSelector(String),
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One rule: on `days` (bit 0 = Monday), during minutes `span` of the UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    days: u8,
    span: (u32, u32),
    mbit: u64,
}

/// A weekly bandwidth schedule (see the module documentation for the grammar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    rules: Vec<Rule>,
    text: String,
}

fn day(rule: &str, s: &str) -> Result<u8, ScheduleError> {
    DAYS.iter()
        .position(|d| d.eq_ignore_ascii_case(s))
        .map(|i| i as u8)
        .ok_or_else(|| ScheduleError::BadDay {
            rule: rule.into(),
            day: s.into(),
        })
}

fn days(rule: &str, s: &str) -> Result<u8, ScheduleError> {
    let (from, to) = match s.split_once('-') {
        Some((a, b)) => (day(rule, a)?, day(rule, b)?),
        None => (day(rule, s)?, day(rule, s)?),
    };
    let mut mask = 0u8;
    let mut d = from;
    loop {
        mask |= 1 << d;
        if d == to {
            return Ok(mask);
        }
        d = (d + 1) % 7;
    }
}

fn span(rule: &str, s: &str) -> Result<(u32, u32), ScheduleError> {
    let bad = || ScheduleError::BadSpan {
        rule: rule.into(),
        span: s.into(),
    };
    let minute = |t: &str| -> Option<u32> {
        let (h, m) = t.split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
    if a < b { Ok((a, b)) } else { Err(bad()) }
}

fn rule(text: &str) -> Result<Rule, ScheduleError> {
    let (selector, rate) = text
        .rsplit_once('=')
        .ok_or_else(|| ScheduleError::MissingRate(text.into()))?;
    let mbit = rate
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&m| m <= MAX_MBIT)
        .ok_or_else(|| ScheduleError::BadRate {
            rule: text.into(),
            rate: rate.trim().into(),
        })?;
    let mut r = Rule {
        days: 0x7f,
        span: (0, 24 * 60),
        mbit,
    };
    let parts: Vec<&str> = selector.split_whitespace().collect();
    match parts.as_slice() {
        ["*"] => {}
        [one] if one.contains(':') => r.span = span(text, one)?,
        [one] => r.days = days(text, one)?,
        [d, s] => {
            r.days = days(text, d)?;
            r.span = span(text, s)?;
        }
        _ => return Err(ScheduleError::BadSelector(text.into())),
    }
    Ok(r)
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Schedule, ScheduleError> {
        let rules = s
            .split(',')
            .map(|r| rule(r.trim()))
            .collect::<Result<_, _>>()?;
        Ok(Schedule {
            rules,
            text: s.trim().to_string(),
        })
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Schedule {
    /// The rate of the first rule matching `at` (UTC), if any.
    fn mbit_at(&self, at: SystemTime) -> Option<u64> {
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // 1970-01-01 was a Thursday (3 days after a Monday).
        let weekday = ((secs / 86_400 + 3) % 7) as u8;
        let minute = (secs % 86_400 / 60) as u32;
        self.rules
            .iter()
            .find(|r| r.days & (1 << weekday) != 0 && (r.span.0..r.span.1).contains(&minute))
            .map(|r| r.mbit)
    }
}

/// The configured limit: a base rate and an optional schedule over it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bandwidth {
    /// Mbit/s when no schedule rule matches; 0 = unlimited.
    pub mbit: u64,
    pub schedule: Option<Schedule>,
}

impl Bandwidth {
    /// Bytes per second at wall-clock time `at`; `None` = unlimited.
    pub fn bytes_per_sec(&self, at: SystemTime) -> Option<f64> {
        let mbit = self
            .schedule
            .as_ref()
            .and_then(|s| s.mbit_at(at))
            .unwrap_or(self.mbit);
        (mbit > 0).then(|| mbit as f64 * 1e6 / 8.0)
    }
}

/// `unlimited`, `100 Mbit/s`, or the schedule over the base: `100 Mbit/s, schedule (UTC)
/// "mon-fri 08:00-18:00=50"`.
impl std::fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.mbit {
            0 => f.write_str("unlimited")?,
            n => write!(f, "{n} Mbit/s")?,
        }
        if let Some(s) = &self.schedule {
            write!(f, ", schedule (UTC) \"{s}\"")?;
        }
        Ok(())
    }
}

/// The token bucket of the forwarding hop.
#[derive(Debug)]
pub struct Throttle {
    bandwidth: Bandwidth,
    /// Bytes that may be sent; negative = debt.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Option<Instant>,
    /// Whether the last allowance was under a limit (only then does sending cost tokens).
    limited: bool,
}

impl Throttle {
    pub fn new(bandwidth: Bandwidth) -> Self {
        Throttle {
            bandwidth,
            tokens: 0.0,
            at: None,
            limited: false,
        }
    }

    /// How many bytes may go out now (`now` on the monotonic clock, `wall` the same instant
    /// on the wall clock, for the schedule): `Ok(u64::MAX)` when unlimited, or `Err(wait)`
    /// while the bucket is empty or in debt. A positive allowance lets at least one batch
    /// go, however large.
    pub fn allowance(&mut self, now: Instant, wall: SystemTime) -> Result<u64, Duration> {
        let Some(rate) = self.bandwidth.bytes_per_sec(wall) else {
            // Unlimited: no savings and no debt carried into a later limited period.
            self.tokens = 0.0;
            self.at = Some(now);
            self.limited = false;
            return Ok(u64::MAX);
        };
        let elapsed = self
            .at
            .map_or(Duration::ZERO, |a| now.saturating_duration_since(a));
        self.at = Some(now);
        self.limited = true;
        let burst = rate * BURST.as_secs_f64();
        self.tokens = (self.tokens + rate * elapsed.as_secs_f64()).min(burst);
        if self.tokens >= 1.0 {
            Ok(self.tokens as u64)
        } else {
            let wait = Duration::from_secs_f64((1.0 - self.tokens) / rate);
            Err(wait.min(MAX_WAIT))
        }
    }

    /// `bytes` went out.
    pub fn spend(&mut self, bytes: u64) {
        if self.limited {
            self.tokens -= bytes as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-30 was a Monday; `utc(day, hh, mm)` = that week's `day` (0 = Monday) at hh:mm.
    fn utc(day: u64, hh: u64, mm: u64) -> SystemTime {
        const MONDAY: u64 = 1_795_996_800;
        SystemTime::UNIX_EPOCH + Duration::from_secs(MONDAY + day * 86_400 + hh * 3600 + mm * 60)
    }

    #[test]
    fn weekdays_are_counted_from_the_epoch_in_utc() {
        // 1970-01-05 00:00 UTC was the first Monday after the epoch (a Thursday).
        let s: Schedule = "mon=1".parse().unwrap();
        let monday = SystemTime::UNIX_EPOCH + Duration::from_secs(4 * 86_400);
        assert_eq!(s.mbit_at(monday), Some(1));
        assert_eq!(s.mbit_at(monday - Duration::from_secs(1)), None);
        assert_eq!(s.mbit_at(utc(0, 23, 59)), Some(1));
        assert_eq!(s.mbit_at(utc(1, 0, 0)), None);
    }

    #[test]
    fn schedule_picks_the_first_matching_rule_in_utc() {
        let s: Schedule = "mon-fri 08:00-18:00=100, sat-sun=500 ,*=1000"
            .parse()
            .unwrap();
        assert_eq!(s.mbit_at(utc(0, 8, 0)), Some(100));
        assert_eq!(s.mbit_at(utc(4, 17, 59)), Some(100));
        assert_eq!(s.mbit_at(utc(4, 18, 0)), Some(1000));
        assert_eq!(s.mbit_at(utc(2, 7, 59)), Some(1000));
        assert_eq!(s.mbit_at(utc(5, 12, 0)), Some(500));
        assert_eq!(s.mbit_at(utc(6, 23, 59)), Some(500));
        assert_eq!(
            s.to_string(),
            "mon-fri 08:00-18:00=100, sat-sun=500 ,*=1000"
        );
    }

    #[test]
    fn day_ranges_wrap_and_unmatched_times_fall_back_to_the_base_rate() {
        let s: Schedule = "fri-mon=10,00:00-06:00=0,wed 12:00-24:00=20"
            .parse()
            .unwrap();
        let bw = Bandwidth {
            mbit: 50,
            schedule: Some(s),
        };
        for day in [4, 5, 6, 0] {
            assert_eq!(bw.bytes_per_sec(utc(day, 12, 0)), Some(10e6 / 8.0));
        }
        // 0 = unlimited during the night, every day the first rule does not cover.
        assert_eq!(bw.bytes_per_sec(utc(1, 3, 0)), None);
        assert_eq!(bw.bytes_per_sec(utc(2, 23, 59)), Some(20e6 / 8.0));
        assert_eq!(bw.bytes_per_sec(utc(1, 12, 0)), Some(50e6 / 8.0));
        assert_eq!(Bandwidth::default().bytes_per_sec(utc(0, 0, 0)), None);
        assert_eq!(Bandwidth::default().to_string(), "unlimited");
        assert_eq!(
            bw.to_string(),
            "50 Mbit/s, schedule (UTC) \"fri-mon=10,00:00-06:00=0,wed 12:00-24:00=20\""
        );
    }

    #[test]
    fn bad_schedules_are_refused_with_the_rule_named() {
        let err = |s: &str| s.parse::<Schedule>().unwrap_err();
        assert_eq!(err("mon-fri"), ScheduleError::MissingRate("mon-fri".into()));
        assert!(matches!(err("*=fast"), ScheduleError::BadRate { .. }));
        assert!(matches!(err("*=1000001"), ScheduleError::BadRate { .. }));
        assert!(matches!(err("mon-fry=1"), ScheduleError::BadDay { .. }));
        assert!(matches!(
            err("18:00-08:00=1"),
            ScheduleError::BadSpan { .. }
        ));
        assert!(matches!(err("8:00-18:00=1"), ScheduleError::BadSpan { .. }));
        assert!(matches!(
            err("00:00-24:01=1"),
            ScheduleError::BadSpan { .. }
        ));
        assert!(matches!(
            err("mon tue 08:00-09:00=1"),
            ScheduleError::BadSelector(_)
        ));
        assert!(matches!(err("=1"), ScheduleError::BadSelector(_)));
        let e = err("*=1,sun 10:00=2");
        assert!(e.to_string().contains("'sun 10:00=2'"), "{e}");
    }

    fn limited(mbit: u64) -> Throttle {
        Throttle::new(Bandwidth {
            mbit,
            schedule: None,
        })
    }

    /// Sends 64 KiB batches as fast as the bucket allows for `span`; returns the bytes sent.
    fn send_for(t: &mut Throttle, start: Instant, span: Duration) -> u64 {
        let wall = utc(0, 0, 0);
        let mut now = start;
        let mut sent = 0;
        while now < start + span {
            match t.allowance(now, wall) {
                Ok(_) => {
                    t.spend(64 << 10);
                    sent += 64 << 10;
                }
                Err(wait) => now += wait,
            }
        }
        sent
    }

    #[test]
    fn the_bucket_holds_the_rate_over_time() {
        // 80 Mbit/s = 10 MB/s: 100 s of saturation sends 1 GB, give or take a burst and a batch.
        let mut t = limited(80);
        let start = Instant::now();
        let sent = send_for(&mut t, start, Duration::from_secs(100)) as f64;
        assert!((sent / 1e9 - 1.0).abs() < 0.005, "{sent}");
    }

    #[test]
    fn savings_are_capped_at_a_burst_and_a_large_batch_goes_into_debt() {
        let mut t = limited(8); // 1 MB/s
        let start = Instant::now();
        let wall = utc(0, 0, 0);
        assert_eq!(t.allowance(start, wall), Err(Duration::from_micros(1)));
        // An idle minute saves only a quarter second of rate.
        let later = start + Duration::from_secs(60);
        assert_eq!(t.allowance(later, wall), Ok(250_000));
        // A 4 MB batch still goes; the debt then takes ~3.75 s to repay.
        t.spend(4_000_000);
        let mut now = later;
        let mut waited = Duration::ZERO;
        while let Err(w) = t.allowance(now, wall) {
            now += w;
            waited += w;
        }
        assert!((waited.as_secs_f64() - 3.75).abs() < 0.01, "{waited:?}");
    }

    #[test]
    fn unlimited_periods_neither_save_nor_owe() {
        let s: Schedule = "mon=0".parse().unwrap();
        let mut t = Throttle::new(Bandwidth {
            mbit: 8,
            schedule: Some(s),
        });
        let start = Instant::now();
        assert_eq!(t.allowance(start, utc(0, 12, 0)), Ok(u64::MAX));
        t.spend(10_000_000);
        // Tuesday, 100 ms later: limited again, with 100 ms of rate in an empty bucket and
        // no debt for Monday's 10 MB.
        let tue = start + Duration::from_millis(100);
        assert_eq!(t.allowance(tue, utc(1, 0, 0)), Ok(100_000));
    }
}
