//! The master target's Prometheus metrics (names, units and labels: docs/metrics.md),
//! served by [`protocol::metrics::serve`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use protocol::metrics::{Exposition, Kind};
use tokio::net::TcpListener;

use crate::apply::DiskShared;
use crate::registry::Registry;

/// Process-wide counters (per-disk figures come from the registry).
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub refusals_total: AtomicU64,
}

/// Renders every metric.
pub async fn render(counters: &Counters, registry: &Registry) -> String {
    let mut e = Exposition::new();
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    e.single(
        "master_target_connections_total",
        Kind::Counter,
        "Apply streams accepted since start.",
        get(&counters.connections_total),
    );
    e.single(
        "master_target_connections_open",
        Kind::Gauge,
        "Apply streams open now.",
        get(&counters.connections_open),
    );
    e.single(
        "master_target_refusals_total",
        Kind::Counter,
        "Connections or disks refused (auth, conflicts, bad requests).",
        get(&counters.refusals_total),
    );
    let (open, _) = registry.snapshot().await;
    let now_ms = protocol::now_unix_ms();
    let per_disk = |value: &dyn Fn(&DiskShared) -> f64| {
        open.iter()
            .map(|o| {
                (
                    vec![("disk_id", o.shared.disk_id.as_str())],
                    value(&o.shared),
                )
            })
            .collect::<Vec<_>>()
    };
    e.family(
        "master_target_disk_applied_seq",
        Kind::Gauge,
        "Highest seq applied and durable, per open disk.",
        per_disk(&|d| get(&d.durable_seq)),
    );
    e.family(
        "master_target_disk_applied_bytes_total",
        Kind::Counter,
        "Uncompressed bytes applied since start, per open disk.",
        per_disk(&|d| get(&d.bytes_applied)),
    );
    e.family(
        "master_target_disk_journal_bytes",
        Kind::Gauge,
        "Bytes of undo journal on the retention volume, per open disk.",
        per_disk(&|d| get(&d.journal_bytes)),
    );
    e.family(
        "master_target_disk_rpo_seconds",
        Kind::Gauge,
        "Age (source clock) of the newest data durable here, per open disk.",
        per_disk(&|d| {
            let last = d.state.lock().last_batch_unix_ms;
            if last > 0 {
                (now_ms - last).max(0) as f64 / 1000.0
            } else {
                f64::NAN
            }
        }),
    );
    e.family(
        "master_target_disk_consistent_timestamp_seconds",
        Kind::Gauge,
        "Source time of the latest crash-consistent point, per open disk (Unix seconds).",
        per_disk(&|d| d.state.lock().consistent_unix_ms as f64 / 1000.0),
    );
    e.family(
        "master_target_disk_in_resync",
        Kind::Gauge,
        "1 while the disk is inside a resync interval (no points), else 0.",
        per_disk(&|d| f64::from(u8::from(d.state.lock().in_resync))),
    );
    e.finish()
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, counters: Arc<Counters>, registry: Arc<Registry>) {
    protocol::metrics::serve(listener, move || {
        let (counters, registry) = (counters.clone(), registry.clone());
        async move { render(&counters, &registry).await }
    })
    .await
}
