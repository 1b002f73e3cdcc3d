//! The process server's Prometheus metrics, served on `--metrics-listen` by
//! [`protocol::metrics::serve`]. Every figure comes from the same snapshot code as `status`
//! ([`crate::status::disks_health`]), so the two never disagree.
//!
//! Names are prefixed `process_server_` and carry their unit (`_bytes`, `_seconds`, `_total`);
//! per-disk series are labelled `disk_id`. An unknown RPO or drain time is `NaN`.

use std::sync::Arc;

use protocol::metrics::{Exposition, Kind};
use tokio::net::TcpListener;

use crate::cache::flow::SpaceLevel;
use crate::server::Ctx;
use crate::status::{AlertKind, Phase, Severity};

/// Renders every metric.
pub fn render(ctx: &Ctx) -> String {
    let mut e = Exposition::new();
    let disks = crate::status::disks_health(ctx);
    let per_disk = |value: &dyn Fn(&crate::disks::DiskState, &crate::status::Health) -> f64| {
        disks
            .iter()
            .map(|(s, h)| (vec![("disk_id", s.info.disk_id.as_str())], value(s, h)))
            .collect::<Vec<_>>()
    };
    e.family(
        "process_server_disk_state",
        Kind::Gauge,
        "1 for the disk's current state, 0 for the others (states as in `status`).",
        disks.iter().flat_map(|(s, h)| {
            Phase::ALL.iter().map(move |p| {
                (
                    vec![("disk_id", s.info.disk_id.as_str()), ("state", p.as_str())],
                    f64::from(u8::from(*p == h.phase)),
                )
            })
        }),
    );
    e.family(
        "process_server_disk_cached_seq",
        Kind::Gauge,
        "Highest seq durable in the cache (or applied).",
        per_disk(&|s, _| s.cached as f64),
    );
    e.family(
        "process_server_disk_applied_seq",
        Kind::Gauge,
        "Highest seq the master target acknowledged as applied.",
        per_disk(&|s, _| s.applied as f64),
    );
    e.family(
        "process_server_disk_rpo_seconds",
        Kind::Gauge,
        "Age (source clock) of the newest batch applied at the master target; NaN = unknown.",
        per_disk(&|_, h| h.rpo.map_or(f64::NAN, |r| r.as_secs_f64())),
    );
    e.family(
        "process_server_disk_backlog_bytes",
        Kind::Gauge,
        "Cached record bytes not yet applied at the master target.",
        per_disk(&|_, h| h.backlog_bytes as f64),
    );
    e.family(
        "process_server_disk_drain_seconds",
        Kind::Gauge,
        "Estimated time to drain the backlog at the recent out rate; NaN = nothing drains.",
        per_disk(&|_, h| h.drain.map_or(f64::NAN, |d| d.as_secs_f64())),
    );
    e.family(
        "process_server_disk_received_bytes_total",
        Kind::Counter,
        "Record bytes made durable in the cache since start (in).",
        per_disk(&|s, _| s.traffic.in_total as f64),
    );
    e.family(
        "process_server_disk_forwarded_bytes_total",
        Kind::Counter,
        "Record bytes the master target acknowledged as applied since start (out).",
        per_disk(&|s, _| s.traffic.out_total as f64),
    );
    let flow = ctx.cache.flow();
    let used = flow.usage();
    e.single(
        "process_server_cache_used_bytes",
        Kind::Gauge,
        "Bytes of cache segment files.",
        used as f64,
    );
    e.single(
        "process_server_cache_free_bytes",
        Kind::Gauge,
        "Quota minus used bytes.",
        flow.quota().saturating_sub(used) as f64,
    );
    e.single(
        "process_server_cache_quota_bytes",
        Kind::Gauge,
        "Bytes the cache may use (--cache-quota).",
        flow.quota() as f64,
    );
    e.single(
        "process_server_cache_high_water_bytes",
        Kind::Gauge,
        "Cache usage above which agents are paused.",
        flow.high_water_bytes() as f64,
    );
    e.single(
        "process_server_cache_group_commits_total",
        Kind::Counter,
        "Group commits (one fdatasync each) since start.",
        ctx.cache.syncs() as f64,
    );
    e.single(
        "process_server_ingest_budget_bytes",
        Kind::Gauge,
        "Ingest part of --memory-budget: batches read from agents, not yet durable.",
        ctx.budget.capacity() as f64,
    );
    e.single(
        "process_server_ingest_budget_used_bytes",
        Kind::Gauge,
        "Bytes of the ingest budget that batches hold now.",
        ctx.budget.used() as f64,
    );
    e.single(
        "process_server_ingest_streams_waiting",
        Kind::Gauge,
        "Agent streams waiting for the ingest budget (staying above 0: memory holds agents back).",
        ctx.budget.waiting() as f64,
    );
    e.single(
        "process_server_agents_paused",
        Kind::Gauge,
        "1 while agents are asked to pause (cache above high water or full).",
        f64::from(u8::from(flow.pause().borrow().is_some())),
    );
    e.single(
        "process_server_master_target_link_up",
        Kind::Gauge,
        "1 while a session to the master target is up, else 0.",
        f64::from(u8::from(ctx.forwarder.link().is_up())),
    );
    e.single(
        "process_server_forward_limit_bytes_per_second",
        Kind::Gauge,
        "Bandwidth limit of the forwarding hop in force now (schedule applied); 0 = unlimited.",
        ctx.bandwidth
            .bytes_per_sec(std::time::SystemTime::now())
            .unwrap_or(0.0),
    );
    let space = match flow.space_level() {
        SpaceLevel::Ok => None,
        SpaceLevel::Warning => Some(Severity::Warning),
        SpaceLevel::Critical => Some(Severity::Critical),
    };
    let firing = |kind: AlertKind, severity: Severity| {
        if kind == AlertKind::CacheSpace {
            return f64::from(u8::from(space == Some(severity)));
        }
        let n = disks
            .iter()
            .flat_map(|(_, h)| &h.alerts)
            .filter(|a| a.kind == kind && a.severity == severity)
            .count();
        n as f64
    };
    e.family(
        "process_server_alerts_firing",
        Kind::Gauge,
        "Alerts firing now, by kind and severity (disks concerned; 1 for cache_space).",
        AlertKind::ALL.iter().flat_map(|&k| {
            Severity::ALL.iter().map(move |&sev| {
                (
                    vec![("alert", k.as_str()), ("severity", sev.as_str())],
                    firing(k, sev),
                )
            })
        }),
    );
    e.finish()
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    protocol::metrics::serve(listener, move || {
        let ctx = ctx.clone();
        async move { render(&ctx) }
    })
    .await
}
