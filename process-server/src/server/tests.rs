//! In-process end to end: a small agent client -> the process server -> a fake master target
//! (both in `tests/common`, shared with the failpoint tests).

use std::path::Path;

use protocol::auth::{ClientAuth, Passphrase};
use tokio::sync::oneshot;

use super::*;
use crate::cache::CacheConfig;
use crate::forward::ForwardConfig;

#[path = "../../tests/common/mod.rs"]
mod common;
use common::*;

fn settings(cache: &Path, mt_url: &str, quota: u64) -> Settings {
    let pass = Passphrase::new(PASS).unwrap();
    Settings {
        listen: "127.0.0.1:0".into(),
        metrics_listen: None,
        cache: CacheConfig {
            dir: cache.to_path_buf(),
            segment_size: 16 << 10,
            quota,
            high_water_percent: 50,
        },
        memory_budget: crate::cli::DEFAULT_MEMORY_BUDGET,
        forward: ForwardConfig {
            url: mt_url.into(),
            tuning: WanTuning::default(),
            tls: TlsFiles::default(),
            auth: ClientAuth::new(pass.clone(), "ps-test"),
            connections: 3,
            window: 64 << 10,
            bandwidth: crate::throttle::Bandwidth::default(),
            priorities: Default::default(),
        },
        tuning: WanTuning::default(),
        tls: TlsFiles::default(),
        auth_passphrase: pass,
        identity: "ps-test".into(),
    }
}

struct Running {
    url: String,
    /// HOST:PORT of its `/metrics`.
    metrics: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

async fn start_server(cache: &Path, mt_url: &str) -> Running {
    start_server_with_quota(cache, mt_url, 1 << 30).await
}

async fn start_server_with_quota(cache: &Path, mt_url: &str, quota: u64) -> Running {
    start_server_with(settings(cache, mt_url, quota)).await
}

async fn start_server_with(settings: Settings) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = metrics_listener.local_addr().unwrap().to_string();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_on(
        settings,
        listener,
        Some(metrics_listener),
        async {
            let _ = stop_rx.await;
        },
    ));
    Running {
        url,
        metrics,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

fn segments(dir: &Path) -> Vec<u64> {
    crate::cache::log::list_segments(dir).unwrap()
}

/// Waits (bounded) until the cache holds at most `n` segments.
async fn segments_drop_to(dir: &Path, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while segments(dir).len() > n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "segments left: {:?}",
            segments(dir)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_are_acked_forwarded_in_order_and_deleted_after_apply() {
    let cache = tempfile::tempdir().unwrap();
    let mt = FakeMt::new();
    let mt_url = start_fake_mt(mt.clone()).await;
    let server = start_server(cache.path(), &mt_url).await;

    let mut a = agent(&server.url).await;
    assert_eq!((a.welcome.cached_seq, a.welcome.applied_seq), (0, 0));
    a.send(1..=40).await;
    a.until(|p| p.cached_seq == 40).await;
    a.until(|p| p.applied_seq == 40).await;
    assert_eq!(mt.applied_order("disk-1"), (1..=40).collect::<Vec<_>>());
    // 40 records of ~3 KiB in 16 KiB segments: all but the active segment go once applied.
    segments_drop_to(cache.path(), 1).await;

    // A duplicate is dropped and re-acked; a gap is refused.
    a.send(40..=40).await;
    a.until(|p| p.cached_seq == 40).await;
    a.send(42..=42).await;
    assert_eq!(
        a.until_error().await.code,
        protocol::error::Code::OutOfSequence.value()
    );
    drop(a);
    server.stop().await;
}

/// A server forwarding to a fake master target, and an agent whose batches 1..=5 are
/// applied; the cache directory is returned to be kept alive.
async fn five_applied() -> (tempfile::TempDir, FakeMt, Running, Agent) {
    let cache = tempfile::tempdir().unwrap();
    let mt = FakeMt::new();
    let mt_url = start_fake_mt(mt.clone()).await;
    let server = start_server(cache.path(), &mt_url).await;
    let mut a = agent(&server.url).await;
    a.send(1..=5).await;
    a.until(|p| p.applied_seq == 5).await;
    (cache, mt, server, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_master_target_volume_is_retried_from_the_applied_seq_once_it_frees() {
    let (_cache, mt, server, mut a) = five_applied().await;
    mt.full.store(true, std::sync::atomic::Ordering::SeqCst);
    a.send(6..=20).await;
    a.until(|p| p.cached_seq == 20).await;
    // Refused (NoSpace, retryable), and retried while still full: the first round sends
    // each of 6..=20 once, so more than 15 refusals means a batch was re-sent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while mt.refused.load(std::sync::atomic::Ordering::SeqCst) <= 15 {
        assert!(tokio::time::Instant::now() < deadline, "never retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mt.progress("disk-1").applied_seq, 5);
    mt.full.store(false, std::sync::atomic::Ordering::SeqCst);
    // No new session and no agent action: the forwarder re-sends by itself after its backoff.
    a.until(|p| p.applied_seq == 20).await;
    assert_eq!(mt.applied_order("disk-1"), (1..=20).collect::<Vec<_>>());
    drop(a);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_the_master_target_drops_from_a_full_reorder_buffer_are_re_sent() {
    let (_cache, mt, server, mut a) = five_applied().await;
    mt.reorder_overflows
        .store(3, std::sync::atomic::Ordering::SeqCst);
    a.send(6..=20).await;
    // No new session and no agent action: the forwarder re-sends from the applied seq
    // after its backoff (the disk stayed stopped until the next session before).
    tokio::time::timeout(Duration::from_secs(20), a.until(|p| p.applied_seq == 20))
        .await
        .expect("the dropped batches were never re-sent");
    assert_eq!(mt.applied_order("disk-1"), (1..=20).collect::<Vec<_>>());
    drop(a);
    server.stop().await;
}

/// Registers disk-1 with a reachable (fake) master target, then has batches 1..=12
/// acknowledged while it is unreachable; returns the stopped server's cache and the fake.
async fn twelve_cached_while_the_master_target_is_away() -> (tempfile::TempDir, FakeMt, String) {
    let cache = tempfile::tempdir().unwrap();
    let mt = FakeMt::new();
    let mt_url = start_fake_mt(mt.clone()).await;
    let server = start_server(cache.path(), &mt_url).await;
    drop(agent(&server.url).await);
    server.stop().await;
    let unreachable = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let server = start_server(cache.path(), &unreachable).await;
    let mut a = agent(&server.url).await;
    a.send(1..=12).await;
    assert_eq!(a.until(|p| p.cached_seq == 12).await.applied_seq, 0);
    drop(a);
    server.stop().await;
    (cache, mt, mt_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_batches_survive_a_restart_and_are_forwarded_later() {
    let (cache, mt, mt_url) = twelve_cached_while_the_master_target_is_away().await;

    // Restart with the master target back: the cached batches go out without the agent.
    let server = start_server(cache.path(), &mt_url).await;
    let mut a = agent(&server.url).await;
    assert_eq!(a.welcome.cached_seq, 12);
    a.until(|p| p.applied_seq == 12).await;
    assert_eq!(mt.applied_order("disk-1"), (1..=12).collect::<Vec<_>>());
    drop(a);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_pause_above_high_water_and_resume_when_drained() {
    let cache = tempfile::tempdir().unwrap();
    let mt = FakeMt::new();
    let mt_url = start_fake_mt(mt.clone()).await;
    // High water = 50% of 64 KiB; each record is ~3 KiB, segments 16 KiB.
    let server = start_server_with_quota(cache.path(), &mt_url, 64 << 10).await;
    let mut a = agent(&server.url).await;
    mt.gate.send_replace(false);
    a.send(1..=30).await;
    // The master target is stuck: the cache fills to its high-water mark and the agent is
    // told to pause; nothing is refused.
    a.until_pause(true).await;
    let held = a.until(|p| p.cached_seq >= 10).await;
    assert!(
        held.cached_seq < 30,
        "reading went on while paused: {held:?}"
    );
    // Each of the 3 connections may have taken one batch before the gate closed.
    assert!(held.applied_seq <= 3, "{held:?}");
    // The master target catches up: segments go, usage falls, the agent resumes.
    mt.gate.send_replace(true);
    a.until_pause(false).await;
    a.until(|p| p.applied_seq == 30).await;
    assert_eq!(mt.applied_order("disk-1"), (1..=30).collect::<Vec<_>>());
    drop(a);
    server.stop().await;
}

/// Where the records of segment `seg` (its bytes `data`) end.
fn log_end(seg: u64, data: &[u8]) -> usize {
    use crate::cache::segment::{Decoded, HEADER_LEN, decode_record};
    let mut off = HEADER_LEN;
    while let Decoded::Record(r) = decode_record(seg, &data[off..]) {
        off += r.total_len;
    }
    off
}

/// Writes part of a record after the newest segment's last one and garbage at its end, as a
/// crash in the middle of a write (never acknowledged) can leave it; returns where the
/// records end.
fn tear_newest_segment(dir: &Path, disk: &str, seq: u64) -> usize {
    let newest = *segments(dir).last().expect("a segment");
    let path = crate::cache::log::segment_path(dir, newest);
    let mut data = std::fs::read(&path).unwrap();
    let end = log_end(newest, &data);
    let mut rec = Vec::new();
    crate::cache::segment::encode_record(&mut rec, newest, disk, seq, 0, &noise(seq, 3000));
    rec.truncate(rec.len() * 2 / 3);
    let n = rec.len();
    rec[n - 200..].fill(0xa5);
    data.truncate(end);
    data.extend_from_slice(&rec);
    std::fs::write(&path, &data).unwrap();
    end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_torn_tail_is_cut_at_restart_and_every_acked_batch_is_delivered() {
    let (cache, mt, mt_url) = twelve_cached_while_the_master_target_is_away().await;
    let newest = *segments(cache.path()).last().unwrap();
    let path = crate::cache::log::segment_path(cache.path(), newest);
    let end = tear_newest_segment(cache.path(), "disk-1", 13);

    // Restart: the torn record is cut, the 12 acked batches are delivered, and batches
    // appended after the cut are readable and delivered too.
    let server = start_server(cache.path(), &mt_url).await;
    let mut a = agent(&server.url).await;
    // The welcome comes after recovery, and nothing new has been appended yet: the torn
    // record is gone (the tail reads as zeros, preallocated again).
    let data = std::fs::read(&path).unwrap();
    assert!(data.len() > end && data[end..].iter().all(|&b| b == 0));
    assert_eq!(a.welcome.cached_seq, 12);
    a.until(|p| p.applied_seq == 12).await;
    a.send(13..=15).await;
    a.until(|p| p.applied_seq == 15).await;
    assert_eq!(mt.applied_order("disk-1"), (1..=15).collect::<Vec<_>>());
    drop(a);
    server.stop().await;
}

/// Flips a byte inside the record of `(disk, seq)`, wherever it lies in the cache.
fn corrupt_record(dir: &Path, disk: &str, seq: u64) {
    let (path, offset, len) = find_record(dir, disk, seq);
    let mut data = std::fs::read(&path).unwrap();
    data[offset + len - 10] ^= 0x40;
    std::fs::write(&path, &data).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mid_log_corruption_stops_only_its_disk_with_resync_required() {
    let cache = tempfile::tempdir().unwrap();
    let mt = FakeMt::new();
    let mt_url = start_fake_mt(mt.clone()).await;
    let (one, two) = (disk_info(), disk_info_for("disk-2", "vm1_disk2"));
    let server = start_server(cache.path(), &mt_url).await;
    drop(agent_for(&server.url, one.clone()).await.unwrap());
    drop(agent_for(&server.url, two.clone()).await.unwrap());
    server.stop().await;
    // Both disks cache 1..=8 while the master target is unreachable, interleaved.
    let unreachable = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let server = start_server(cache.path(), &unreachable).await;
    let mut a = agent_for(&server.url, one.clone()).await.unwrap();
    let mut b = agent_for(&server.url, two.clone()).await.unwrap();
    for s in 1..=8 {
        a.send(s..=s).await;
        b.send(s..=s).await;
    }
    a.until(|p| p.cached_seq == 8).await;
    b.until(|p| p.cached_seq == 8).await;
    drop((a, b));
    server.stop().await;
    corrupt_record(cache.path(), "disk-1", 3);

    let server = start_server(cache.path(), &mt_url).await;
    // disk-2 goes on: everything it cached arrives.
    let mut b = agent_for(&server.url, two).await.unwrap();
    b.until(|p| p.applied_seq == 8).await;
    assert_eq!(mt.applied_order("disk-2"), (1..=8).collect::<Vec<_>>());
    // disk-1 is refused with a precise reason; nothing past the hole was forwarded.
    let e = agent_for(&server.url, one).await.err().expect("refused");
    assert_eq!(e.code, protocol::error::Code::Io.value());
    assert_eq!(e.disk_id, "disk-1");
    assert!(e.message.contains("differential sync"), "{}", e.message);
    assert!(mt.applied_order("disk-1").iter().all(|&s| s < 3));
    drop(b);
    server.stop().await;
}

/// The value of the series `series` (name and labels exactly as exposed) on a metrics page.
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
        .parse()
        .unwrap()
}

/// Scrapes until `done(page)` (bounded): figures move as acks arrive.
async fn scrape_until(addr: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = protocol::metrics::scrape(addr).await.unwrap();
        if done(&page) {
            return page;
        }
        assert!(tokio::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_follow_the_data_in_the_cache_and_to_the_master_target() {
    let cache = tempfile::tempdir().unwrap();
    let mt = FakeMt::new();
    let mt_url = start_fake_mt(mt.clone()).await;
    let server = start_server(cache.path(), &mt_url).await;
    let link = "process_server_master_target_link_up";
    let page = scrape_until(&server.metrics, |p| sample(p, link) == 1.0).await;
    assert!(!page.contains("disk_id="), "{page}");
    assert_eq!(
        sample(&page, "process_server_cache_quota_bytes"),
        (1u64 << 30) as f64
    );
    assert_eq!(
        sample(&page, "process_server_forward_limit_bytes_per_second"),
        0.0
    );
    let firing = r#"process_server_alerts_firing{alert="rpo",severity="critical"}"#;
    assert_eq!(sample(&page, firing), 0.0);

    // The master target is stuck: bytes come in, a backlog builds, nothing goes out.
    let mut a = agent(&server.url).await;
    mt.gate.send_replace(false);
    a.send(1..=10).await;
    a.until(|p| p.cached_seq == 10).await;
    let d = |name: &str| format!(r#"process_server_disk_{name}{{disk_id="disk-1"}}"#);
    let page = scrape_until(&server.metrics, |p| sample(p, &d("cached_seq")) == 10.0).await;
    let received = sample(&page, &d("received_bytes_total"));
    // Ten records of a 3000-byte write each, plus headers.
    assert!(received > 30_000.0, "{received}");
    assert!(sample(&page, &d("backlog_bytes")) > 0.0);
    assert!(sample(&page, "process_server_cache_used_bytes") >= received);
    let backlog = r#"process_server_disk_state{disk_id="disk-1",state="backlog"}"#;
    assert_eq!(sample(&page, backlog), 1.0);

    // It catches up: everything received goes out, the backlog is gone and drains in 0 s.
    mt.gate.send_replace(true);
    a.until(|p| p.applied_seq == 10).await;
    let page = scrape_until(&server.metrics, |p| {
        sample(p, &d("forwarded_bytes_total")) == received
    })
    .await;
    assert_eq!(sample(&page, &d("backlog_bytes")), 0.0);
    assert_eq!(sample(&page, &d("drain_seconds")), 0.0);
    assert_eq!(sample(&page, &d("applied_seq")), 10.0);
    assert!(sample(&page, &d("rpo_seconds")) >= 0.0);
    let continuous = r#"process_server_disk_state{disk_id="disk-1",state="continuous"}"#;
    assert_eq!(sample(&page, continuous), 1.0);
    assert_eq!(sample(&page, backlog), 0.0);
    drop(a);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarding_keeps_to_the_bandwidth_limit() {
    let cache = tempfile::tempdir().unwrap();
    let mt = FakeMt::new();
    let mt_url = start_fake_mt(mt.clone()).await;
    let mut s = settings(cache.path(), &mt_url, 1 << 30);
    // 1 Mbit/s = 125 000 bytes/s, for ~100 KB of batches: about 0.8 s of forwarding.
    s.forward.bandwidth.mbit = 1;
    let rate = 125_000.0;
    let start = std::time::Instant::now();
    let server = start_server_with(s).await;
    let limit = "process_server_forward_limit_bytes_per_second";
    let page = protocol::metrics::scrape(&server.metrics).await.unwrap();
    assert_eq!(sample(&page, limit), rate);
    let mut a = agent(&server.url).await;
    a.send(1..=32).await;
    a.until(|p| p.cached_seq == 32).await;
    let forwarded = r#"process_server_disk_forwarded_bytes_total{disk_id="disk-1"}"#;
    let received = r#"process_server_disk_received_bytes_total{disk_id="disk-1"}"#;
    // Byte counts against an upper bound that only loosens if the machine is slow: what went
    // out never exceeds the bucket's burst and one batch of debt plus the rate so far.
    let slack = rate * crate::throttle::BURST.as_secs_f64() + 4096.0;
    let page = scrape_until(&server.metrics, |p| {
        let out = sample(p, forwarded);
        let bound = slack + rate * start.elapsed().as_secs_f64();
        assert!(out <= bound, "{out} bytes out, more than {bound}");
        out == sample(p, received)
    })
    .await;
    assert!(sample(&page, forwarded) > 90_000.0);
    a.until(|p| p.applied_seq == 32).await;
    assert_eq!(mt.applied_order("disk-1"), (1..=32).collect::<Vec<_>>());
    drop(a);
    server.stop().await;
}
