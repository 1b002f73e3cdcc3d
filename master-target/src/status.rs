//! The status view: built by the server from its disks, printed by `master-target status`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use protocol::pb::{DiskStatus, StatusReply};
use serde_json::json;

use crate::registry::DiskEntry;
use crate::state::DiskState;

fn rpo_seconds(last_batch_unix_ms: i64) -> f64 {
    if last_batch_unix_ms <= 0 {
        return -1.0;
    }
    ((protocol::now_unix_ms() - last_batch_unix_ms).max(0) as f64) / 1000.0
}

fn from_state(s: &DiskState, state: &str, alerts: Vec<String>) -> DiskStatus {
    DiskStatus {
        disk_id: s.disk_id.clone(),
        name: s.name.clone(),
        state: state.to_string(),
        capacity: s.capacity,
        cached_seq: s.applied_seq,
        applied_seq: s.applied_seq,
        backlog_bytes: 0,
        rpo_seconds: rpo_seconds(s.last_batch_unix_ms),
        throughput_in_bytes_per_sec: 0.0,
        throughput_out_bytes_per_sec: 0.0,
        last_recovery_point_unix_ms: s.consistent_unix_ms,
        alerts,
    }
}

/// One row per disk: open disks with their live state, the others as `disconnected`.
pub fn disk_statuses(open: &[Arc<DiskEntry>], idle: &[DiskState]) -> Vec<DiskStatus> {
    let mut out: Vec<DiskStatus> = open
        .iter()
        .map(|e| {
            let s = e.shared.state.lock().clone();
            let stopped = e.shared.stopped.lock().clone();
            let (state, alerts) = match stopped {
                Some(r) => ("stopped", vec![r.to_string()]),
                None if s.in_resync => ("resync", Vec::new()),
                None => ("continuous", Vec::new()),
            };
            let mut d = from_state(&s, state, alerts);
            d.applied_seq = e.shared.durable_seq.load(Ordering::Acquire);
            d.cached_seq = d.applied_seq;
            d
        })
        .chain(
            idle.iter()
                .map(|s| from_state(s, "disconnected", Vec::new())),
        )
        .collect();
    out.sort_by(|a, b| a.disk_id.cmp(&b.disk_id));
    out
}

/// RFC 3339 UTC for ms since the epoch ("-" for none).
pub fn format_time(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The reply as JSON: `{role, identity, protocol_version, disks[], facts{}}`.
pub fn to_json(r: &StatusReply) -> serde_json::Value {
    let disks: Vec<_> = r
        .disks
        .iter()
        .map(|d| {
            json!({
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
                "last_recovery_point_unix_ms": d.last_recovery_point_unix_ms,
                "alerts": d.alerts,
            })
        })
        .collect();
    json!({
        "role": r.role,
        "identity": r.identity,
        "protocol_version": r.protocol_version,
        "disks": disks,
        "facts": r.facts,
    })
}

/// The reply as a table, one line per disk.
pub fn to_table(r: &StatusReply) -> String {
    let mut s = format!(
        "{} {} (protocol {})\n",
        r.role, r.identity, r.protocol_version
    );
    let mut facts: Vec<_> = r.facts.iter().collect();
    facts.sort();
    for (k, v) in facts {
        s.push_str(&format!("  {k}: {v}\n"));
    }
    s.push_str(&format!(
        "{:<24} {:<24} {:<13} {:>12} {:<24} {:>16}\n",
        "DISK ID", "NAME", "STATE", "APPLIED SEQ", "LAST RECOVERY POINT", "CAPACITY"
    ));
    for d in &r.disks {
        s.push_str(&format!(
            "{:<24} {:<24} {:<13} {:>12} {:<24} {:>16}\n",
            d.disk_id,
            d.name,
            d.state,
            d.applied_seq,
            format_time(d.last_recovery_point_unix_ms),
            d.capacity
        ));
        for a in &d.alerts {
            s.push_str(&format!("  alert: {a}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(format_time(0), "-");
        assert_eq!(format_time(1), "1970-01-01T00:00:00.001Z");
        assert_eq!(format_time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
