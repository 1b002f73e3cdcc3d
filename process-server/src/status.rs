//! Status: the server's answer to `Status` (per disk: state, cached/applied seq, backlog,
//! RPO; facts: cache usage, quota, master-target link) and the `status` subcommand that
//! prints it as a table or JSON.

use std::collections::HashMap;
use std::time::Duration;

use protocol::auth::ClientAuth;
use protocol::error::Refusal;
use protocol::limits::PROTOCOL_VERSION;
use protocol::pb::{DiskStatus, StatusReply};
use protocol::transport::{TlsFiles, WanTuning};

use crate::disks::DiskState;
use crate::server::Ctx;

/// An agent silent this long gets an alert (agents send a heartbeat every 5 s).
const HEARTBEAT_ALERT: Duration = Duration::from_secs(30);

/// RPO above which a disk gets an alert (the default policy threshold of the service).
pub const RPO_ALERT: Duration = Duration::from_secs(15 * 60);

/// The alert for a disk whose RPO (`rpo_seconds`, negative = unknown) passed `threshold`.
fn rpo_alert(rpo_seconds: f64, threshold: Duration) -> Option<String> {
    (rpo_seconds > threshold.as_secs_f64()).then(|| {
        format!(
            "RPO is {:.0}s, above the policy threshold of {}s",
            rpo_seconds,
            threshold.as_secs()
        )
    })
}

/// The disk's state word (see `DiskStatus.state`). `link_up`: the master-target link is up;
/// a backlog that cannot drain because it is down is "stalled".
fn state_of(s: &DiskState, paused: bool, link_up: bool) -> &'static str {
    if s.failed.is_some() {
        "failed"
    } else if s.resync_required.is_some() {
        "resync-required"
    } else if s.agents > 0 && paused {
        "paused"
    } else if s.cached > s.applied && !link_up {
        "stalled"
    } else if s.cached > s.applied {
        "backlog"
    } else if s.agents == 0 {
        "disconnected"
    } else {
        "continuous"
    }
}

fn disk_status(ctx: &Ctx, s: &DiskState, paused: bool, now_ms: i64) -> DiskStatus {
    let id = &s.info.disk_id;
    let mut alerts = Vec::new();
    if let Some(f) = &s.failed {
        alerts.push(f.to_string());
    }
    if let Some(r) = &s.resync_required {
        alerts.push(format!("resync required: {r}"));
    }
    if let Some(t) = s.last_heard {
        let silent = t.elapsed();
        if s.agents > 0 && silent > HEARTBEAT_ALERT {
            alerts.push(format!(
                "error {}: no heartbeat from the agent for {}s",
                protocol::error::Code::AgentNotRunning,
                silent.as_secs()
            ));
        }
    }
    let rpo_seconds = if s.applied_time_ms > 0 {
        (now_ms - s.applied_time_ms).max(0) as f64 / 1000.0
    } else {
        -1.0
    };
    alerts.extend(rpo_alert(rpo_seconds, RPO_ALERT));
    DiskStatus {
        disk_id: id.clone(),
        name: s.info.name.clone(),
        state: state_of(s, paused, ctx.forwarder.link_state().starts_with("up")).to_string(),
        capacity: s.info.capacity,
        cached_seq: s.cached,
        applied_seq: s.applied,
        backlog_bytes: ctx.cache.with_index(|ix| ix.backlog_bytes(id, s.applied)),
        rpo_seconds,
        throughput_in_bytes_per_sec: 0.0,
        throughput_out_bytes_per_sec: 0.0,
        last_recovery_point_unix_ms: 0,
        alerts,
    }
}

/// The reply to an authenticated `Status` call.
pub fn reply(ctx: &Ctx, server_proof: Vec<u8>) -> StatusReply {
    let flow = ctx.cache.flow();
    let pause = flow.pause().borrow().clone();
    let now_ms = protocol::now_unix_ms();
    let disks = ctx
        .disks
        .snapshot()
        .iter()
        .map(|s| disk_status(ctx, s, pause.is_some(), now_ms))
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
    facts.insert("agents_paused".into(), pause.unwrap_or_else(|| "no".into()));
    facts.insert("master_target_url".into(), ctx.master_target_url.clone());
    facts.insert("master_target_link".into(), ctx.forwarder.link_state());
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

/// The reply as a human-readable table.
pub fn to_table(r: &StatusReply) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {} (protocol {})",
        r.role, r.identity, r.protocol_version
    );
    let _ = writeln!(
        s,
        "{:<38} {:<20} {:<16} {:>10} {:>10} {:>14} {:>8}",
        "DISK", "NAME", "STATE", "CACHED", "APPLIED", "BACKLOG", "RPO"
    );
    for d in &r.disks {
        let rpo = if d.rpo_seconds < 0.0 {
            "-".to_string()
        } else {
            format!("{:.0}s", d.rpo_seconds)
        };
        let _ = writeln!(
            s,
            "{:<38} {:<20} {:<16} {:>10} {:>10} {:>14} {:>8}",
            d.disk_id, d.name, d.state, d.cached_seq, d.applied_seq, d.backlog_bytes, rpo
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

    #[test]
    fn a_backlog_is_stalled_while_the_master_target_link_is_down() {
        let disks = crate::disks::tests::disks();
        let s = disks.get("a").unwrap();
        assert_eq!(state_of(&s, false, true), "backlog");
        assert_eq!(state_of(&s, false, false), "stalled");
        disks.applied("a", 5, None);
        let s = disks.get("a").unwrap();
        assert_eq!(state_of(&s, false, false), "disconnected");
    }

    #[test]
    fn rpo_alert_fires_only_above_the_threshold() {
        assert_eq!(rpo_alert(-1.0, RPO_ALERT), None);
        assert_eq!(rpo_alert(900.0, RPO_ALERT), None);
        let a = rpo_alert(901.0, RPO_ALERT).unwrap();
        assert!(a.contains("901s") && a.contains("900s"), "{a}");
    }
}
