//! The real `master-target` binary, SIGKILLed in the middle of a stream: after a restart
//! it reports an applied seq whose data is durable, re-applying the rest is idempotent,
//! markers are recorded exactly once, SIGTERM exits 0, and qemu-img finds the image equal
//! to the source bytes.

mod common;

use common::*;
use protocol::batch::BatchBuilder;
use protocol::pb::{Batch, DiskFormat, Marker, MarkerKind};
use std::process::Command;

const CAP: u64 = 8 << 20;
const BATCHES: u64 = 200;

fn workload() -> (Vec<Batch>, Vec<u8>) {
    let mut raw = vec![0u8; CAP as usize];
    let mut b = BatchBuilder::new();
    let mut out = Vec::new();
    let mut x = 7u64;
    for seq in 1..=BATCHES {
        for _ in 0..8 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 33) % (CAP / 4096 - 16) * 4096;
            let len = 16 * 4096;
            if b.overlaps(off, len) {
                continue;
            }
            let data: Vec<u8> = (0..len).map(|i| (i ^ x ^ seq) as u8).collect();
            b.push_write(off, &data);
            raw[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        if seq % 5 == 0 {
            b.push_marker(Marker {
                id: format!("m{seq}"),
                kind: MarkerKind::App as i32,
                time_unix_ms: seq as i64,
                group: String::new(),
                tag: String::new(),
            });
        }
        out.push(b.finish(DISK, seq, seq as i64, 0));
    }
    (out, raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_acknowledged() {
    let t = dirs();
    let (batches, raw) = workload();

    let (mut child, url) = start(t.path(), &[]);
    let mut conn = hello_queue(&url, CAP, DiskFormat::Vmfs, BATCHES as usize).await;
    assert_eq!(conn.applied, 0);
    for b in &batches {
        conn.send(b).await;
    }
    let acked = conn.acked(20).await;
    child.kill().unwrap(); // SIGKILL, mid-stream
    blocking(|| child.wait()).unwrap();
    drop(conn);

    let (child, url) = start(t.path(), &[]);
    let mut conn = hello_queue(&url, CAP, DiskFormat::Vmfs, BATCHES as usize).await;
    let applied = conn.applied;
    assert!(applied >= acked, "applied {applied} < acknowledged {acked}");
    // Re-send from one batch below the applied seq (a harmless duplicate) to the end.
    for b in &batches[(applied.max(1) - 1) as usize..] {
        conn.send(b).await;
    }
    assert_eq!(conn.acked(BATCHES).await, BATCHES);
    stop(child);

    let vmdk = t.path().join(format!("ds/{NAME}.vmdk"));
    let rawp = t.path().join("ref.raw");
    std::fs::write(&rawp, &raw).unwrap();
    let out = blocking(|| {
        Command::new("qemu-img")
            .args(["compare", "-f", "vmdk", "-F", "raw"])
            .arg(&vmdk)
            .arg(&rawp)
            .output()
    })
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = recovery_points(t.path());
    assert!(out.status.success());
    let points = points(&out);
    let markers: Vec<_> = points.iter().filter(|p| p["kind"] == "app").collect();
    assert_eq!(
        markers.len() as u64,
        BATCHES / 5,
        "each marker exactly once"
    );
    assert_eq!(points.last().unwrap()["seq"], BATCHES);
}
