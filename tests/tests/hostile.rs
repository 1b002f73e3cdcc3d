//! A hostile agent against the real process server: every malformed or forged batch gets a
//! precise error code, nothing it sent reaches the target disk, and an honest agent keeps
//! replicating through the same servers.

mod common;

use std::time::Duration;

use bench::cluster::Cluster;
use bench::{verify, workload};
use protocol::batch::{BatchBuilder, header_crc};
use protocol::pb::{AgentMessage, Batch, DiskInfo, Extent, agent_message, process_server_message};

const CAPACITY: u64 = 8 << 20;

fn disk(id: &str) -> DiskInfo {
    DiskInfo {
        disk_id: id.into(),
        name: id.replace('-', "_"),
        capacity: CAPACITY,
        format: 0,
        group: String::new(),
    }
}

/// A well-formed batch of one 4 KiB write at `offset`.
fn batch(id: &str, seq: u64, offset: u64) -> Batch {
    let mut b = BatchBuilder::new();
    b.push_write(offset, &[0xA5; 4096]);
    b.finish(id, seq, protocol::now_unix_ms(), 0)
}

/// The code in an "error <code>: ..." text.
fn code_of(text: &str) -> Option<u32> {
    text.strip_prefix("error ")?.split(':').next()?.parse().ok()
}

/// Opens an authenticated Replicate stream declaring `declared`, sends `batches`, and returns
/// the code of the first error the server answers with (an ErrorReport or the stream's
/// status), or None if it acks everything and stays silent for two seconds.
async fn send_hostile(c: &Cluster, declared: DiskInfo, batches: Vec<Batch>) -> Option<u32> {
    send(c, declared, batches, true).await
}

/// As [`send_hostile`]; `with_proof: false` leaves the passphrase proof out of the hello.
async fn send(
    c: &Cluster,
    declared: DiskInfo,
    batches: Vec<Batch>,
    with_proof: bool,
) -> Option<u32> {
    let (tx, answer) = common::replicate_stream(c, vec![declared], with_proof).await;
    let mut rx = match answer {
        Ok(rx) => rx,
        Err(s) => return code_of(s.message()),
    };
    for b in batches {
        let m = AgentMessage {
            body: Some(agent_message::Body::Batch(b)),
        };
        // A server that refused the stream has stopped reading it: its answer says why.
        if tx.send(m).await.is_err() {
            break;
        }
    }
    loop {
        let next = tokio::time::timeout(Duration::from_secs(2), rx.message()).await;
        match next {
            Err(_silent) => return None,
            Ok(Err(status)) => return code_of(status.message()),
            Ok(Ok(None)) => return None,
            Ok(Ok(Some(m))) => {
                if let Some(process_server_message::Body::Error(e)) = m.body {
                    return Some(e.code);
                }
            }
        }
    }
}

#[test]
fn hostile_batches_get_precise_codes_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::cluster(dir.path());
    let source = dir.path().join("good.raw");
    workload::generate_disk(&source, CAPACITY, 3).unwrap();
    common::sync_ok(&c, &source, "disk-good", "good");
    let good_before = std::fs::read(c.flat_path("good")).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = "disk-hostile";
    let mut bad_crc = batch(id, 1, 0);
    bad_crc.payload_crc ^= 1;
    bad_crc.header_crc = header_crc(&bad_crc);
    let mut bomb = batch(id, 1, 0);
    bomb.data_len = u32::MAX; // declares 4 GiB behind a few bytes
    bomb.header_crc = header_crc(&bomb);
    let mut outside = batch(id, 1, 0);
    outside.writes = vec![Extent {
        offset: CAPACITY - 512,
        length: 4096,
    }];
    outside.header_crc = header_crc(&outside);
    let mut overlap = BatchBuilder::new();
    overlap.push_write(0, &[1; 4096]);
    overlap.push_zero(8192, 4096);
    let mut overlap = overlap.finish(id, 1, protocol::now_unix_ms(), 0);
    overlap.zeros = vec![Extent {
        offset: 2048,
        length: 4096,
    }];
    overlap.header_crc = header_crc(&overlap);
    let mut forged_header = batch(id, 1, 0);
    forged_header.seq = 2; // changed in flight, CRC not updated

    let cases: Vec<(&str, DiskInfo, Vec<Batch>, u32)> = vec![
        ("payload CRC", disk(id), vec![bad_crc], 5),
        ("decompression bomb", disk(id), vec![bomb], 5),
        ("extent outside the disk", disk(id), vec![outside], 5),
        ("overlapping extents", disk(id), vec![overlap], 5),
        ("header changed in flight", disk(id), vec![forged_header], 5),
        (
            "undeclared disk",
            disk(id),
            vec![batch("disk-nobody", 1, 0)],
            7,
        ),
        ("seq gap", disk(id), vec![batch(id, 5, 0)], 6),
    ];
    for (what, declared, batches, want) in cases {
        let got = rt.block_on(send_hostile(&c, declared, batches));
        assert_eq!(
            got,
            Some(want),
            "{what}: expected error {want}\n{}",
            c.log_tails()
        );
    }

    // No proof of the passphrase at all: refused as unauthenticated.
    assert_eq!(
        rt.block_on(send(&c, disk(id), vec![batch(id, 1, 0)], false)),
        Some(3),
        "missing passphrase proof\n{}",
        c.log_tails()
    );

    // A replay of seqs the honest disk already has, with other bytes: whatever the answer,
    // the stored disk must not change (a seq is applied once).
    let good = DiskInfo {
        disk_id: "disk-good".into(),
        name: "good".into(),
        capacity: CAPACITY,
        format: 0,
        group: String::new(),
    };
    let last = common::status(&c, common::Server::ProcessServer)
        .and_then(|s| s.disks.into_iter().find(|d| d.disk_id == "disk-good"))
        .map(|d| d.cached_seq)
        .expect("the process server reports the honest disk");
    assert!(last >= 1);
    let replayed = rt.block_on(send_hostile(
        &c,
        good,
        vec![batch("disk-good", 1, 0), batch("disk-good", last, 4096)],
    ));
    assert_eq!(
        replayed, None,
        "a replay is dropped as a duplicate, not an error"
    );
    // Nothing was taken in: the process server holds no seq past `last`, and everything it
    // holds is applied before the disk is compared (a cached replay could not hide).
    let good_progress = || {
        common::status(&c, common::Server::ProcessServer)
            .and_then(|s| s.disks.into_iter().find(|d| d.disk_id == "disk-good"))
            .map(|d| (d.cached_seq, d.applied_seq))
    };
    common::wait_until(
        "the honest disk fully applied",
        &c,
        Duration::from_secs(60),
        || good_progress().is_some_and(|(cached, applied)| applied == cached),
    );
    assert_eq!(
        good_progress().map(|p| p.0),
        Some(last),
        "a replayed seq was cached"
    );

    // Nothing hostile was stored: the hostile disk has no data (at most an empty, freshly
    // created image), and the honest disk is untouched.
    if let Ok(hostile) = std::fs::read(c.flat_path("disk_hostile")) {
        assert!(
            hostile.iter().all(|&b| b == 0),
            "a hostile byte was applied"
        );
    }
    let good_after = std::fs::read(c.flat_path("good")).unwrap();
    let differing: Vec<usize> = (0..good_after.len().max(good_before.len()))
        .step_by(4096)
        .filter(|&o| good_after.get(o..o + 4096) != good_before.get(o..o + 4096))
        .collect();
    assert!(
        differing.is_empty(),
        "the honest disk changed at 4 KiB blocks {differing:?} (sizes {} -> {})",
        good_before.len(),
        good_after.len()
    );

    // The servers still replicate honest work.
    workload::churn(&source, 7, 64).unwrap();
    common::sync_ok(&c, &source, "disk-good", "good");
    verify::files_equal(&c.flat_path("good"), &source).unwrap();
}
