//! Status: the server's answer to `Status` (per disk: state, cached/applied seq, backlog,
//! RPO; facts: cache usage, quota, master-target link) and the `status` subcommand that
//! prints it as a table or JSON.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use protocol::auth::ClientAuth;
use protocol::error::Refusal;
use protocol::limits::PROTOCOL_VERSION;
use protocol::pb::{DiskStatus, StatusReply};
use protocol::transport::{TlsFiles, WanTuning};

use crate::disks::DiskState;
use crate::rate::drain_time;
use crate::server::Ctx;

/// An agent silent this long gets an alert (agents send a heartbeat every 5 s).
const HEARTBEAT_ALERT: Duration = Duration::from_secs(30);

/// RPO above which a disk gets an alert (the default policy threshold of the service).
pub const RPO_ALERT: Duration = Duration::from_secs(15 * 60);
/// Estimated drain time above which a disk gets a warning.
pub const DRAIN_WARNING: Duration = Duration::from_secs(30 * 60);
/// Estimated drain time above which the drain alert is critical.
pub const DRAIN_CRITICAL: Duration = Duration::from_secs(45 * 60);

/// The state of a disk (`DiskStatus.state`), most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The master target refused it: not forwarded until the next session, or, for a
    /// retryable refusal (a full volume), until the forwarder's backoff re-sends it.
    Failed,
    /// Acknowledged batches were lost to cache corruption: the agent must resync.
    ResyncRequired,
    /// An agent is connected and the cache asks it to pause.
    Paused,
    /// A backlog that cannot drain: the master-target link is down.
    Stalled,
    /// A backlog that is draining.
    Backlog,
    /// Nothing to forward and no agent connected.
    Disconnected,
    /// Nothing to forward and an agent connected.
    Continuous,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Failed,
        Phase::ResyncRequired,
        Phase::Paused,
        Phase::Stalled,
        Phase::Backlog,
        Phase::Disconnected,
        Phase::Continuous,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Failed => "failed",
            Phase::ResyncRequired => "resync-required",
            Phase::Paused => "paused",
            Phase::Stalled => "stalled",
            Phase::Backlog => "backlog",
            Phase::Disconnected => "disconnected",
            Phase::Continuous => "continuous",
        }
    }

    /// The disk's phase; `link_up`: the master-target link is up.
    fn of(s: &DiskState, paused: bool, link_up: bool) -> Phase {
        if s.failed.is_some() {
            Phase::Failed
        } else if s.resync_required.is_some() {
            Phase::ResyncRequired
        } else if s.agents > 0 && paused {
            Phase::Paused
        } else if s.cached > s.applied && !link_up {
            Phase::Stalled
        } else if s.cached > s.applied {
            Phase::Backlog
        } else if s.agents == 0 {
            Phase::Disconnected
        } else {
            Phase::Continuous
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 2] = [Severity::Warning, Severity::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What an alert is about (the `alert` label of `process_server_alerts_firing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    Failed,
    ResyncRequired,
    Heartbeat,
    Rpo,
    Drain,
    CacheSpace,
}

impl AlertKind {
    pub const ALL: [AlertKind; 6] = [
        AlertKind::Failed,
        AlertKind::ResyncRequired,
        AlertKind::Heartbeat,
        AlertKind::Rpo,
        AlertKind::Drain,
        AlertKind::CacheSpace,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Failed => "failed",
            AlertKind::ResyncRequired => "resync_required",
            AlertKind::Heartbeat => "heartbeat",
            AlertKind::Rpo => "rpo",
            AlertKind::Drain => "drain",
            AlertKind::CacheSpace => "cache_space",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub kind: AlertKind,
    pub severity: Severity,
    pub message: String,
}

impl std::fmt::Display for Alert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.severity.as_str(), self.message)
    }
}

/// The alert for a disk whose RPO passed `threshold`.
fn rpo_alert(rpo: Option<Duration>, threshold: Duration) -> Option<Alert> {
    let rpo = rpo.filter(|r| *r > threshold)?;
    Some(Alert {
        kind: AlertKind::Rpo,
        severity: Severity::Critical,
        message: format!(
            "RPO is {}s, above the policy threshold of {}s",
            rpo.as_secs(),
            threshold.as_secs()
        ),
    })
}

/// The alert for a backlog that takes longer than [`DRAIN_WARNING`] to drain at the recent
/// out rate. An unknown drain time (nothing drains) raises none: the state ("stalled") and the
/// RPO alert report that case.
fn drain_alert(backlog: u64, drain: Option<Duration>) -> Option<Alert> {
    let drain = drain.filter(|d| *d > DRAIN_WARNING)?;
    let (severity, limit) = if drain > DRAIN_CRITICAL {
        (Severity::Critical, DRAIN_CRITICAL)
    } else {
        (Severity::Warning, DRAIN_WARNING)
    };
    Some(Alert {
        kind: AlertKind::Drain,
        severity,
        message: format!(
            "backlog of {backlog} bytes drains in about {} at the recent rate, above {} min",
            format_duration(drain),
            limit.as_secs() / 60
        ),
    })
}

/// Everything status and metrics report about one disk, computed once from one snapshot.
#[derive(Debug, Clone)]
pub struct Health {
    pub phase: Phase,
    pub backlog_bytes: u64,
    /// Age (source clock) of the newest applied batch; `None` = unknown.
    pub rpo: Option<Duration>,
    /// Bytes/s made durable in the cache, recently.
    pub in_rate: f64,
    /// Bytes/s applied by the master target, recently.
    pub out_rate: f64,
    /// Time to drain the backlog at `out_rate`; `None` = unknown (nothing drains).
    pub drain: Option<Duration>,
    pub alerts: Vec<Alert>,
}

/// The health of disk `s` with `backlog` bytes to forward, at `now` (`now_ms` = the same
/// instant on the wall clock, for the RPO).
pub fn health(
    s: &DiskState,
    backlog: u64,
    (paused, link_up): (bool, bool),
    now: Instant,
    now_ms: i64,
) -> Health {
    let mut alerts = Vec::new();
    let critical = |kind, message| Alert {
        kind,
        severity: Severity::Critical,
        message,
    };
    if let Some(f) = &s.failed {
        alerts.push(critical(AlertKind::Failed, f.to_string()));
    }
    if let Some(r) = &s.resync_required {
        alerts.push(critical(
            AlertKind::ResyncRequired,
            format!("resync required: {r}"),
        ));
    }
    if let Some(t) = s.last_heard {
        let silent = now.saturating_duration_since(t);
        if s.agents > 0 && silent > HEARTBEAT_ALERT {
            alerts.push(Alert {
                kind: AlertKind::Heartbeat,
                severity: Severity::Warning,
                message: format!(
                    "error {}: no heartbeat from the agent for {}s",
                    protocol::error::Code::AgentNotRunning,
                    silent.as_secs()
                ),
            });
        }
    }
    let rpo = (s.applied_time_ms > 0)
        .then(|| Duration::from_millis((now_ms - s.applied_time_ms).max(0) as u64));
    alerts.extend(rpo_alert(rpo, RPO_ALERT));
    let out_rate = s.traffic.out_rate.rate(now);
    let drain = drain_time(backlog, out_rate);
    alerts.extend(drain_alert(backlog, drain));
    Health {
        phase: Phase::of(s, paused, link_up),
        backlog_bytes: backlog,
        rpo,
        in_rate: s.traffic.in_rate.rate(now),
        out_rate,
        drain,
        alerts,
    }
}

/// The health of every disk right now, with its state.
pub fn disks_health(ctx: &Ctx) -> Vec<(DiskState, Health)> {
    let paused = ctx.cache.flow().pause().borrow().is_some();
    let link_up = ctx.forwarder.link().is_up();
    let (now, now_ms) = (Instant::now(), protocol::now_unix_ms());
    ctx.disks
        .snapshot()
        .into_iter()
        .map(|s| {
            let backlog = ctx
                .cache
                .with_index(|ix| ix.backlog_bytes(&s.info.disk_id, s.applied));
            let h = health(&s, backlog, (paused, link_up), now, now_ms);
            (s, h)
        })
        .collect()
}

fn disk_status(s: &DiskState, h: &Health) -> DiskStatus {
    DiskStatus {
        disk_id: s.info.disk_id.clone(),
        name: s.info.name.clone(),
        state: h.phase.as_str().to_string(),
        capacity: s.info.capacity,
        cached_seq: s.cached,
        applied_seq: s.applied,
        backlog_bytes: h.backlog_bytes,
        rpo_seconds: h.rpo.map_or(-1.0, |r| r.as_secs_f64()),
        throughput_in_bytes_per_sec: h.in_rate,
        throughput_out_bytes_per_sec: h.out_rate,
        last_recovery_point_unix_ms: 0,
        alerts: h.alerts.iter().map(Alert::to_string).collect(),
    }
}

/// The reply to an authenticated `Status` call.
pub fn reply(ctx: &Ctx, server_proof: Vec<u8>) -> StatusReply {
    let flow = ctx.cache.flow();
    let pause = flow.pause().borrow().clone();
    let disks = disks_health(ctx)
        .iter()
        .map(|(s, h)| disk_status(s, h))
        .collect();
    let (segments, _) = ctx.cache.with_index(|ix| ix.segment_usage());
    let used = flow.usage();
    let mut facts = HashMap::new();
    facts.insert("cache_dir".into(), ctx.cache.dir().display().to_string());
    facts.insert("cache_used_bytes".into(), used.to_string());
    facts.insert("cache_quota_bytes".into(), flow.quota().to_string());
    facts.insert(
        "cache_free_bytes".into(),
        flow.quota().saturating_sub(used).to_string(),
    );
    facts.insert(
        "cache_high_water_percent".into(),
        flow.high_water_percent().to_string(),
    );
    facts.insert("cache_segments".into(), segments.to_string());
    facts.insert("cache_group_commits".into(), ctx.cache.syncs().to_string());
    // The ingest part of the memory budget: how much of it batches hold, and how many
    // streams wait for it (a budget always full with streams waiting holds agents back).
    facts.insert(
        "ingest_budget_bytes".into(),
        ctx.budget.capacity().to_string(),
    );
    facts.insert(
        "ingest_budget_used_bytes".into(),
        ctx.budget.used().to_string(),
    );
    facts.insert(
        "ingest_streams_waiting".into(),
        ctx.budget.waiting().to_string(),
    );
    facts.insert("agents_paused".into(), pause.unwrap_or_else(|| "no".into()));
    facts.insert("master_target_url".into(), ctx.master_target_url.clone());
    facts.insert(
        "master_target_link".into(),
        ctx.forwarder.link().to_string(),
    );
    facts.insert("forward_bandwidth_limit".into(), ctx.bandwidth.to_string());
    if let Some(a) = flow.space_alert() {
        facts.insert("cache_space_alert".into(), a);
    }
    if let Some(f) = ctx.cache.flow().fatal().borrow().clone() {
        facts.insert("cache_failed".into(), f);
    }
    StatusReply {
        server_proof: server_proof.into(),
        role: "process-server".into(),
        identity: ctx.identity.clone(),
        protocol_version: PROTOCOL_VERSION,
        disks,
        facts,
    }
}

/// Asks a running process server for its status.
pub async fn fetch(url: &str, tls: &TlsFiles, auth: &ClientAuth) -> Result<StatusReply, Refusal> {
    let mut client = protocol::client::process_server(url, &WanTuning::default(), tls).await?;
    protocol::client::status(&mut client, auth).await
}

/// The reply as JSON: `{role, identity, protocol_version, disks[], facts{}}`.
pub fn to_json(r: &StatusReply) -> serde_json::Value {
    let disks: Vec<serde_json::Value> = r
        .disks
        .iter()
        .map(|d| {
            serde_json::json!({
                "disk_id": d.disk_id,
                "name": d.name,
                "state": d.state,
                "capacity": d.capacity,
                "cached_seq": d.cached_seq,
                "applied_seq": d.applied_seq,
                "backlog_bytes": d.backlog_bytes,
                "rpo_seconds": d.rpo_seconds,
                "throughput_in_bytes_per_sec": d.throughput_in_bytes_per_sec,
                "throughput_out_bytes_per_sec": d.throughput_out_bytes_per_sec,
                // null = unknown: nothing drains.
                "drain_seconds": drain_of(d).map(|t| t.as_secs_f64()),
                "alerts": d.alerts,
            })
        })
        .collect();
    let facts: serde_json::Map<String, serde_json::Value> = r
        .facts
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "role": r.role,
        "identity": r.identity,
        "protocol_version": r.protocol_version,
        "disks": disks,
        "facts": facts,
    })
}

/// The drain time of a disk in a reply: the same estimate the server alerts on.
fn drain_of(d: &DiskStatus) -> Option<Duration> {
    drain_time(d.backlog_bytes, d.throughput_out_bytes_per_sec)
}

/// `1h02m`, `12m30s`, `45s`.
fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// Bytes/s with a decimal unit: `0 B/s`, `512 B/s`, `12.3 MB/s`.
fn format_rate(r: f64) -> String {
    let mut v = r.max(0.0);
    for unit in ["B/s", "kB/s", "MB/s", "GB/s"] {
        if v < 1000.0 || unit == "GB/s" {
            return if unit == "B/s" {
                format!("{v:.0} {unit}")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1000.0;
    }
    unreachable!("the loop returns at GB/s")
}

/// The reply as a human-readable table.
pub fn to_table(r: &StatusReply) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {} (protocol {})",
        r.role, r.identity, r.protocol_version
    );
    let row = |s: &mut String, c: [&str; 10]| {
        let _ = writeln!(
            s,
            "{:<38} {:<20} {:<16} {:>10} {:>10} {:>14} {:>8} {:>11} {:>11} {:>8}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]
        );
    };
    row(
        &mut s,
        [
            "DISK", "NAME", "STATE", "CACHED", "APPLIED", "BACKLOG", "RPO", "IN", "OUT", "DRAIN",
        ],
    );
    for d in &r.disks {
        let rpo = if d.rpo_seconds < 0.0 {
            "-".to_string()
        } else {
            format!("{:.0}s", d.rpo_seconds)
        };
        let drain = drain_of(d).map_or_else(|| "unknown".to_string(), format_duration);
        row(
            &mut s,
            [
                &d.disk_id,
                &d.name,
                &d.state,
                &d.cached_seq.to_string(),
                &d.applied_seq.to_string(),
                &d.backlog_bytes.to_string(),
                &rpo,
                &format_rate(d.throughput_in_bytes_per_sec),
                &format_rate(d.throughput_out_bytes_per_sec),
                &drain,
            ],
        );
        for a in &d.alerts {
            let _ = writeln!(s, "    ! {a}");
        }
    }
    let mut facts: Vec<_> = r.facts.iter().collect();
    facts.sort();
    for (k, v) in facts {
        let _ = writeln!(s, "{k}: {v}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(h: &Health) -> Vec<(AlertKind, Severity)> {
        h.alerts.iter().map(|a| (a.kind, a.severity)).collect()
    }

    #[test]
    fn a_backlog_is_stalled_while_the_master_target_link_is_down() {
        let disks = crate::disks::tests::disks();
        let s = disks.get("a").unwrap();
        assert_eq!(Phase::of(&s, false, true), Phase::Backlog);
        assert_eq!(Phase::of(&s, false, false), Phase::Stalled);
        disks.applied("a", 5, None);
        let s = disks.get("a").unwrap();
        assert_eq!(Phase::of(&s, false, false), Phase::Disconnected);
    }

    #[test]
    fn rpo_alert_fires_only_above_the_threshold() {
        assert_eq!(rpo_alert(None, RPO_ALERT), None);
        assert_eq!(rpo_alert(Some(RPO_ALERT), RPO_ALERT), None);
        let a = rpo_alert(Some(Duration::from_secs(901)), RPO_ALERT).unwrap();
        assert_eq!(a.severity, Severity::Critical);
        assert!(
            a.message.contains("901s") && a.message.contains("900s"),
            "{a}"
        );
    }

    #[test]
    fn drain_alert_warns_past_30_and_is_critical_past_45_minutes() {
        let min = |m: u64| Some(Duration::from_secs(m * 60));
        assert_eq!(drain_alert(1, None), None);
        assert_eq!(drain_alert(1, min(30)), None);
        let w = drain_alert(1, Some(DRAIN_WARNING + Duration::from_secs(1))).unwrap();
        assert_eq!(w.severity, Severity::Warning);
        assert!(
            w.to_string()
                .starts_with("warning: backlog of 1 bytes drains in about 30m01s")
        );
        assert_eq!(drain_alert(1, min(45)).unwrap().severity, Severity::Warning);
        let c = drain_alert(1, min(46)).unwrap();
        assert_eq!(c.severity, Severity::Critical);
        assert!(c.message.contains("above 45 min"), "{c}");
    }

    /// Disk `a` of the shared fixture, drained at `per_sec` bytes/s for a minute up to `now`.
    fn drained_for_a_minute(per_sec: u64, now: Instant) -> DiskState {
        let disks = crate::disks::tests::disks();
        let mut s = disks.get("a").unwrap();
        for i in (0..60).rev() {
            s.traffic.drained(now - Duration::from_secs(i), per_sec);
            s.traffic
                .received(now - Duration::from_secs(i), 2 * per_sec);
        }
        s
    }

    #[test]
    fn health_estimates_drain_time_from_the_recent_out_rate() {
        let now = Instant::now();
        let s = drained_for_a_minute(1_000_000, now);
        // 3.6 GB at ~1 MB/s: about an hour, a critical drain alert.
        let h = health(&s, 3_600_000_000, (false, true), now, 0);
        assert_eq!(h.phase, Phase::Backlog);
        assert!((h.out_rate / 1e6 - 1.0).abs() < 0.1, "{}", h.out_rate);
        assert!((h.in_rate / h.out_rate - 2.0).abs() < 1e-9);
        let drain = h.drain.unwrap().as_secs();
        assert!((3300..=4000).contains(&drain), "{drain}");
        assert_eq!(kinds(&h), vec![(AlertKind::Drain, Severity::Critical)]);
        // 1.2 GB: about 20 minutes, no alert.
        let h = health(&s, 1_200_000_000, (false, true), now, 0);
        assert!(h.alerts.is_empty(), "{:?}", h.alerts);
    }

    #[test]
    fn nothing_draining_gives_an_unknown_drain_time_and_no_drain_alert() {
        let now = Instant::now();
        let s = drained_for_a_minute(1_000_000, now);
        let later = now + crate::rate::IDLE_AFTER;
        let h = health(&s, 1 << 30, (false, false), later, 0);
        assert_eq!((h.out_rate, h.drain), (0.0, None));
        assert_eq!(h.phase, Phase::Stalled);
        assert!(h.alerts.is_empty(), "{:?}", h.alerts);
        // No backlog: drained, whatever the rate.
        let h = health(&s, 0, (false, true), later, 0);
        assert_eq!(h.drain, Some(Duration::ZERO));
    }

    #[test]
    fn the_table_shows_rates_and_drain_time_and_json_gives_null_when_unknown() {
        let disk = |backlog, out| DiskStatus {
            disk_id: "d".into(),
            state: "backlog".into(),
            backlog_bytes: backlog,
            throughput_in_bytes_per_sec: 2_500_000.0,
            throughput_out_bytes_per_sec: out,
            ..Default::default()
        };
        let reply = StatusReply {
            disks: vec![disk(6_000_000, 10_000.0), disk(5, 0.0)],
            ..Default::default()
        };
        let t = to_table(&reply);
        assert!(t.contains("2.5 MB/s") && t.contains("10.0 kB/s"), "{t}");
        assert!(t.contains("10m00s") && t.contains("unknown"), "{t}");
        let j = to_json(&reply);
        assert_eq!(j["disks"][0]["drain_seconds"], 600.0);
        assert!(j["disks"][1]["drain_seconds"].is_null());
    }
}
