//! Reconnecting: exponential backoff with jitter, and the bookkeeping of an outage (when it
//! started, what to log, when to give up).
//!
//! Invariants: the delay stays within `[MIN_DELAY / 2, MAX_DELAY]`; it grows while failures
//! follow each other and goes back to the minimum only once a connection made progress (an
//! ack advanced), so a server that accepts and then drops every stream is not hammered. An
//! outage is logged once when it starts, then every [`REMINDER`]; it ends at the next
//! successful welcome. Giving up happens once one outage has lasted `retry_for`.

use std::time::{Duration, Instant};

use rand::Rng;

use crate::session::SessionError;

pub const MIN_DELAY: Duration = Duration::from_millis(100);
pub const MAX_DELAY: Duration = Duration::from_secs(5);
/// How often a continuing outage is logged again.
pub const REMINDER: Duration = Duration::from_secs(60);

/// Exponential backoff: 100 ms, 200 ms, ... up to 5 s, each delay drawn at random from its
/// upper half so that many agents that lost the same server do not return in lockstep.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: MIN_DELAY }
    }
}

impl Backoff {
    /// The delay before the next attempt.
    pub fn delay(&mut self) -> Duration {
        let upper = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        let lower = upper / 2;
        rand::rng().random_range(lower..=upper)
    }

    pub fn reset(&mut self) {
        self.next = MIN_DELAY;
    }
}

/// Gave up after an outage of `retry_for`.
#[derive(Debug, thiserror::Error)]
pub struct GaveUp {
    pub last: SessionError,
    pub after: Duration,
}

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hint = match self.last {
            SessionError::Refused(_) => "see the process server's log, or raise --retry-for",
            _ => {
                "check that the process server runs and is reachable from this host, or raise \
                  --retry-for"
            }
        };
        write!(
            f,
            "{}; gave up after {} ({hint})",
            self.last,
            humantime::format_duration(round_secs(self.after))
        )
    }
}

/// The current run of failures towards one process server.
#[derive(Debug)]
pub struct Outage {
    retry_for: Duration,
    since: Option<Instant>,
    last_log: Option<Instant>,
    unreachable_logged: bool,
}

impl Outage {
    pub fn new(retry_for: Duration) -> Self {
        Outage {
            retry_for,
            since: None,
            last_log: None,
            unreachable_logged: false,
        }
    }

    /// Records a retryable failure; `Err` once the outage has lasted `retry_for`.
    pub fn failed(&mut self, err: SessionError) -> Result<(), GaveUp> {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        let elapsed = now.duration_since(since);
        if elapsed >= self.retry_for {
            return Err(GaveUp {
                last: err,
                after: elapsed,
            });
        }
        let due = match (&err, self.last_log) {
            // Every lost connection is worth a line; it is not a repeated symptom.
            (SessionError::Lost(_), _) => true,
            // The first "cannot reach" of an outage is logged even right after a "lost".
            (SessionError::Unreachable { .. }, _) if !self.unreachable_logged => {
                self.unreachable_logged = true;
                true
            }
            (_, None) => true,
            (_, Some(t)) => now.duration_since(t) >= REMINDER,
        };
        if due {
            self.last_log = Some(now);
            if elapsed.is_zero() {
                tracing::warn!("{err}; retrying");
            } else {
                tracing::warn!(
                    "{err}; retrying (for {} so far, giving up after {})",
                    humantime::format_duration(round_secs(elapsed)),
                    humantime::format_duration(self.retry_for)
                );
            }
        }
        Ok(())
    }

    /// A connection was established: the outage, if any, is over.
    pub fn recovered(&mut self) {
        self.last_log = None;
        self.unreachable_logged = false;
        if let Some(since) = self.since.take() {
            let took = round_secs(since.elapsed());
            tracing::info!(
                "reconnected to the process server after {}",
                humantime::format_duration(took)
            );
        }
    }
}

/// `d` without its sub-second part when it is a second or more (for readable logs).
fn round_secs(d: Duration) -> Duration {
    if d.as_secs() > 0 {
        Duration::from_secs(d.as_secs())
    } else {
        Duration::from_millis(d.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let first = b.delay();
        assert!(first >= MIN_DELAY / 2 && first <= MIN_DELAY);
        for _ in 0..20 {
            assert!(b.delay() <= MAX_DELAY);
        }
        assert!(b.delay() >= MAX_DELAY / 2);
        b.reset();
        assert!(b.delay() <= MIN_DELAY);
    }

    #[test]
    fn an_outage_gives_up_after_retry_for() {
        let unreachable = || SessionError::Unreachable {
            url: "http://x".into(),
            cause: "refused".into(),
        };
        let mut o = Outage::new(Duration::ZERO);
        let e = o.failed(unreachable()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("error 95226: cannot reach process server")
        );
        let mut o = Outage::new(Duration::from_secs(3600));
        o.failed(unreachable()).unwrap();
        o.recovered();
        assert!(o.since.is_none());
    }
}
