//! Differential sync through the real binaries: a disk is fully synced, 5 % of its 4 KiB
//! blocks change, and `agent sync --mode differential --chunk-size 4K --wait` sends only
//! those blocks (plus the hash exchange) and leaves the target equal to the source.
//!
//! The bytes the agent sends are counted on the TCP connections themselves: the agent talks
//! to the process server through a counting relay in this test, so the figure includes
//! everything the agent put on the wire (HTTP/2 and gRPC framing, authentication, the
//! hash requests, the batches, lz4 overhead on incompressible data, heartbeats), not a
//! counter the agent keeps about itself. The agent's own summary (`wire bytes`, `chunks
//! sent`) is checked against it.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bench::cluster::run_with_timeout;
use bench::{verify, workload};

const DISK_ID: &str = "disk-diff-1";
const NAME: &str = "diff";
const SIZE: u64 = 32 << 20;
const BLOCK: u64 = 4096;

/// Bytes relayed in each direction by [`relay`].
#[derive(Debug, Default)]
struct Counted {
    /// Agent -> process server.
    up: AtomicU64,
    /// Process server -> agent.
    down: AtomicU64,
}

/// Copies `from` into `to`, counting bytes into `n`, until EOF or an error; then half-closes
/// `to` so the other side sees the end too.
fn pump(mut from: TcpStream, mut to: TcpStream, n: Arc<Counted>, up: bool) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                if to.write_all(&buf[..k]).is_err() {
                    break;
                }
                let counter = if up { &n.up } else { &n.down };
                counter.fetch_add(k as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A TCP relay on 127.0.0.1 to `upstream` that counts the bytes of every connection;
/// returns its port. Its threads live as long as the test process.
fn relay(upstream: u16, counted: Arc<Counted>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (n1, n2) = (counted.clone(), counted.clone());
            std::thread::spawn(move || pump(client, server, n1, true));
            std::thread::spawn(move || pump(s2, c2, n2, false));
        }
    });
    port
}

/// The number on the summary line that starts with `label` (e.g. "wire bytes").
fn summary_figure(summary: &str, label: &str) -> u64 {
    summary
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(label))
        .and_then(|l| l[label.len()..].split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no '{label}' line in the agent's summary:\n{summary}"))
}

fn equal(a: &Path, b: &Path) -> bool {
    verify::files_equal(a, b).is_ok()
}

#[test]
fn a_differential_sync_sends_only_the_changed_blocks_and_converges() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::cluster(dir.path());
    let source = dir.path().join("source.raw");
    workload::generate_disk(&source, SIZE, 7).unwrap();

    // 1. A full sync: the target exists and equals the source.
    common::sync_ok(&c, &source, DISK_ID, NAME);
    let flat = c.flat_path(NAME);
    if let Err(e) = verify::files_equal(&flat, &source) {
        panic!("after the full sync the target differs from the source: {e:#}");
    }

    // 2. 5 % of the 4 KiB blocks change (random, incompressible data).
    let blocks = SIZE / BLOCK;
    let changed = blocks * 5 / 100;
    let changed_bytes = changed * BLOCK;
    workload::churn(&source, changed, 99).unwrap();
    assert!(!equal(&flat, &source), "the churn changed nothing");

    // 3. A differential sync through the counting relay.
    let counted = Arc::new(Counted::default());
    let port = relay(c.ps_port, counted.clone());
    let out = run_with_timeout(
        c.role("agent")
            .args([
                "sync",
                "--process-server",
                &format!("http://127.0.0.1:{port}"),
            ])
            .arg("--disk")
            .arg(&source)
            .args(["--disk-id", DISK_ID, "--name", NAME])
            .args(["--mode", "differential", "--chunk-size", "4K", "--wait"])
            .arg("--passphrase-file")
            .arg(&c.passphrase_file),
        Duration::from_secs(90),
    )
    .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    let agent_log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "agent sync --mode differential failed: {agent_log}\n{summary}\n{}",
        c.log_tails()
    );
    let up = counted.up.load(Ordering::Relaxed);
    let down = counted.down.load(Ordering::Relaxed);
    eprintln!(
        "differential sync of {SIZE} bytes, {changed} blocks ({changed_bytes} bytes) changed: \
         agent sent {up} bytes, received {down} bytes on the wire\n{summary}"
    );

    // The target equals the source, byte for byte.
    if let Err(e) = verify::files_equal(&flat, &source) {
        panic!("after the differential sync the target differs from the source: {e:#}\n{summary}");
    }

    if let Err(e) = verify::qemu_compare(&c.vmdk_path(NAME), &source) {
        panic!("{e:#}");
    }

    // Exactly the changed chunks were found and sent.
    assert!(
        summary.contains("differential sync done"),
        "the pass was not differential (the agent sent {up} bytes on the wire for \
         {changed_bytes} changed bytes):\n{summary}\nagent log:\n{agent_log}\n{}",
        c.log_tails()
    );
    assert_eq!(
        summary_figure(&summary, "chunks compared"),
        blocks,
        "{summary}"
    );
    assert_eq!(
        summary_figure(&summary, "chunks sent"),
        changed,
        "{summary}"
    );
    assert_eq!(
        summary_figure(&summary, "data sent"),
        changed_bytes,
        "{summary}"
    );

    // The hash exchange of 4 KiB chunks: one xxh3-128 hash (16 bytes) and one bit of the
    // all-zero bitmap per chunk. That is what a differential sync costs beyond the data;
    // the agent's own share of it (the page requests) is a small part of it.
    let hash_traffic = blocks * 16 + blocks.div_ceil(8);
    let allowed = changed_bytes + changed_bytes / 10 + hash_traffic;
    assert!(
        up <= allowed,
        "the agent sent {up} bytes on the wire for {changed_bytes} changed bytes; at most \
         {allowed} (1.1 x the changed bytes + {hash_traffic} bytes of hash traffic)\n{summary}"
    );
    // The hashes really came back over the counted connections (so the figure above is the
    // differential exchange's own), once, without bloat: the rest down is acknowledgements.
    assert!(
        down >= hash_traffic && down <= 2 * hash_traffic + (64 << 10),
        "the agent received {down} bytes on the wire; the hashes of {blocks} chunks are \
         {hash_traffic} bytes\n{summary}"
    );
    // What the agent says it sent fits in what crossed the wire (and is not made up).
    let wire = summary_figure(&summary, "wire bytes") + summary_figure(&summary, "resent bytes");
    assert!(
        wire >= changed_bytes && wire <= up,
        "agent summary: {wire} wire bytes; the relay counted {up} bytes sent\n{summary}"
    );
}
