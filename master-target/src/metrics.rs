//! A tiny Prometheus endpoint: `GET /metrics` in the text exposition format.
//!
//! Hand-written HTTP/1.1 (one request per connection, bounded request size and time) so the
//! master target needs no web framework for a handful of counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::registry::Registry;

/// Largest request head read.
const MAX_REQUEST: usize = 8192;
/// A client must send its request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Process-wide counters (per-disk figures come from the registry).
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub refusals_total: AtomicU64,
}

/// Renders every metric.
pub async fn render(counters: &Counters, registry: &Registry) -> String {
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in rows {
            s.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    metric(
        "master_target_connections_total",
        "counter",
        "Apply streams accepted since start.",
        vec![(String::new(), get(&counters.connections_total))],
    );
    metric(
        "master_target_connections_open",
        "gauge",
        "Apply streams open now.",
        vec![(String::new(), get(&counters.connections_open))],
    );
    metric(
        "master_target_refusals_total",
        "counter",
        "Connections or disks refused (auth, conflicts, bad requests).",
        vec![(String::new(), get(&counters.refusals_total))],
    );
    let (open, _) = registry.snapshot().await;
    let label = |id: &str| format!("{{disk_id=\"{id}\"}}");
    metric(
        "master_target_disk_applied_seq",
        "gauge",
        "Highest seq applied and durable, per open disk.",
        open.iter()
            .map(|e| (label(&e.shared.disk_id), get(&e.shared.durable_seq)))
            .collect(),
    );
    metric(
        "master_target_disk_applied_bytes_total",
        "counter",
        "Uncompressed bytes applied since start, per open disk.",
        open.iter()
            .map(|e| (label(&e.shared.disk_id), get(&e.shared.bytes_applied)))
            .collect(),
    );
    metric(
        "master_target_disk_journal_bytes",
        "gauge",
        "Bytes of undo journal on the retention volume, per open disk.",
        open.iter()
            .map(|e| (label(&e.shared.disk_id), get(&e.shared.journal_bytes)))
            .collect(),
    );
    s
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, counters: Arc<Counters>, registry: Arc<Registry>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (counters, registry) = (counters.clone(), registry.clone());
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &counters, &registry)).await;
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    counters: &Counters,
    registry: &Registry,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let (status, body) = if head.starts_with("GET /metrics ") {
        ("200 OK", render(counters, registry).await)
    } else {
        (
            "404 Not Found",
            "only /metrics is served here\n".to_string(),
        )
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}
