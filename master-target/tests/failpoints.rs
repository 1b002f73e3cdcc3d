//! Crash consistency of a commit group, with the real binary killed (SIGKILL by its own
//! failpoint) right after each step: undo durable, data durable, commit record durable.
//! After a restart the target must equal, byte for byte, the disk before the batch (or
//! after it, once its commit record is durable), and the re-sent batch must apply.
//! Also a failed sync (`fsync-eio`): the disk stops at once, is never synced again, and
//! after a restart the uncommitted group is rolled back.
//!
//! Each runs with the default data path (`--data-io mmap`); the data-path-dependent ones
//! (a crash once the data is written, a failed data sync) also with `--data-io pwrite`.
//!
//! Needs the `failpoints` feature: `cargo test -p master-target --features failpoints`.

mod common;

use common::*;
use protocol::pb::apply_message::Body;

const CAP: u64 = 2 << 20;
const N: u64 = 7;
/// The batch during whose commit the process dies (it carries a marker).
const FAIL_AT: u64 = 5;

/// `data_written`: whether the batch's data is on the target when the process dies;
/// `io`: the `--data-io` of both runs.
async fn crash_at(point: &str, data_written: bool, committed: bool, io: &str) {
    let t = dirs();
    let dir = t.path();
    let s = script(CAP, N, &[FAIL_AT]);
    let env = [
        ("FAILBACK_FAILPOINT", point.to_string()),
        ("FAILBACK_FAILPOINT_SEQ", FAIL_AT.to_string()),
    ];
    let flags = ["--data-io", io];
    let (mut child, url, _) = start_logged_with(dir, &env, &flags);
    let mut c = hello(&url, CAP).await;
    for b in &s.batches[..FAIL_AT as usize - 1] {
        c.send(b).await;
        c.acked(b.seq).await;
    }
    c.send(&s.batches[FAIL_AT as usize - 1]).await;
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}: {status}");
    drop(c);
    let on_disk = if data_written { FAIL_AT } else { FAIL_AT - 1 };
    assert_bytes(
        &flat(dir),
        &s.states[on_disk as usize],
        "before the restart",
    );

    let (child, url, _) = start_logged_with(dir, &[], &flags);
    let mut c = hello(&url, CAP).await;
    let expect = if committed { FAIL_AT } else { FAIL_AT - 1 };
    assert_eq!(c.applied, expect, "{point}");
    assert_bytes(&flat(dir), &s.states[expect as usize], point);
    for b in &s.batches[expect as usize..] {
        c.send(b).await;
    }
    c.acked(N).await;
    assert_bytes(&flat(dir), &s.states[N as usize], point);
    drop(c);
    stop(child);

    let out = recovery_points(dir);
    let points = points(&out);
    let seqs = batch_seqs(&points);
    assert_eq!(
        seqs,
        (1..=N).collect::<Vec<_>>(),
        "{point}: each batch once"
    );
    assert_eq!(
        points.iter().filter(|p| p["kind"] == "app").count(),
        1,
        "{point}: the marker once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_undo_leaves_the_disk_before_the_batch() {
    crash_at("after-undo", false, false, "mmap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_data_is_rolled_back_to_before_the_batch() {
    crash_at("after-data", true, false, "mmap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pwrite_a_crash_after_data_is_rolled_back_to_before_the_batch() {
    crash_at("after-data", true, false, "pwrite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_commit_keeps_the_batch() {
    crash_at("after-commit", true, true, "mmap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pwrite_a_crash_after_commit_keeps_the_batch() {
    crash_at("after-commit", true, true, "pwrite").await;
}

/// `FAILBACK_FAILPOINT=fsync-eio` fails the sync of `what` (`journal` or `extent`) in the
/// group of batch [`FAIL_AT`]; `data_written`: whether its data reached the target first;
/// `io`: the `--data-io` of both runs.
async fn sync_fails(what: &str, data_written: bool, io: &str) {
    let t = dirs();
    let dir = t.path();
    let s = script(CAP, N, &[FAIL_AT]);
    let env = [
        ("FAILBACK_FAILPOINT", "fsync-eio".to_string()),
        ("FAILBACK_FAILPOINT_SEQ", FAIL_AT.to_string()),
        ("FAILBACK_FAILPOINT_SYNC", what.to_string()),
    ];
    let flags = ["--data-io", io];
    let (child, url, log) = start_logged_with(dir, &env, &flags);
    let mut c = hello(&url, CAP).await;
    for b in &s.batches[..FAIL_AT as usize - 1] {
        c.send(b).await;
        c.acked(b.seq).await;
    }
    // The failing batch, then the rest: each one is refused, none acknowledged.
    for b in &s.batches[FAIL_AT as usize - 1..] {
        c.send(b).await;
        match c.next().await {
            Some(Body::Error(e)) => {
                assert_eq!(e.code, protocol::error::Code::Io.value(), "{what}: {e:?}");
                for words in ["never retried", "needs a resync", "Input/output error"] {
                    assert!(e.message.contains(words), "{what}: {}", e.message);
                }
                let op = if what == "extent" && io == "mmap" {
                    "msync"
                } else {
                    "fdatasync"
                };
                assert!(e.message.starts_with(op), "{what}: {}", e.message);
            }
            other => panic!("{what}: seq {} got {other:?}", b.seq),
        }
    }
    drop(c);
    stop(child);
    let log = log.join().unwrap();
    let injected = log
        .iter()
        .filter(|l| l.contains("failpoint: injected EIO"))
        .count();
    assert_eq!(injected, 1, "{what}: the failed sync is never retried");
    let on_disk = if data_written { FAIL_AT } else { FAIL_AT - 1 };
    assert_bytes(
        &flat(dir),
        &s.states[on_disk as usize],
        "before the restart",
    );

    let (child, url, log) = start_logged_with(dir, &[], &flags);
    let mut c = hello(&url, CAP).await;
    assert_eq!(
        c.applied,
        FAIL_AT - 1,
        "{what}: nothing acked after the failure"
    );
    assert_bytes(&flat(dir), &s.states[FAIL_AT as usize - 1], "rolled back");
    for b in &s.batches[FAIL_AT as usize - 1..] {
        c.send(b).await;
    }
    c.acked(N).await;
    assert_bytes(&flat(dir), &s.states[N as usize], what);
    drop(c);
    stop(child);
    assert!(
        log.join()
            .unwrap()
            .iter()
            .any(|l| l.contains("rolled back an uncommitted group")),
        "{what}: the uncommitted group is rolled back on restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_undo_sync_stops_the_disk_and_is_never_retried() {
    sync_fails("journal", false, "mmap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_data_sync_stops_the_disk_and_the_group_is_rolled_back_on_restart() {
    sync_fails("extent", true, "mmap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pwrite_a_failed_data_sync_stops_the_disk_and_the_group_is_rolled_back() {
    sync_fails("extent", true, "pwrite").await;
}
