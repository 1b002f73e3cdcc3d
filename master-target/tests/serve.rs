//! The master target's server in-process on 127.0.0.1:0, driven by a small hop-2 client:
//! real batches over real gRPC, images checked with qemu-img against the source bytes.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use master_target::server::{ServeOptions, serve};
use protocol::auth::{ClientAuth, Passphrase, ServerAuth};
use protocol::batch::BatchBuilder;
use protocol::error::Code;
use protocol::pb::{
    ApplyMessage, Batch, DiskFormat, DiskHashesRequest, DiskInfo, ForwardMessage, Marker,
    MarkerKind, apply_message::Body, forward_message,
};
use protocol::transport::{TlsFiles, WanTuning};
use tokio::sync::{mpsc, oneshot};
use tonic::Streaming;

const PASS: &str = "correct horse battery";
const STEP: Duration = Duration::from_secs(20);

struct Running {
    url: String,
    metrics_addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(ds: &Path, ret: &Path) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let opts = ServeOptions {
        datastore: ds.to_path_buf(),
        retention: ret.to_path_buf(),
        auth: ServerAuth::new(Passphrase::new(PASS).unwrap()),
        tls: TlsFiles::default(),
        tuning: WanTuning::default(),
        identity: "test".into(),
        metrics: Some(metrics),
        retention_policy: Default::default(),
        data_io: Default::default(),
    };
    let task = tokio::spawn(async move {
        serve(opts, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running {
        url,
        metrics_addr,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(STEP, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

struct Conn {
    tx: mpsc::Sender<ForwardMessage>,
    rx: Streaming<ApplyMessage>,
}

/// Opens an Apply stream, sends hello, and returns the connection with the messages the
/// server sent until (and including) the welcome or a connection-level error.
async fn connect(url: &str, pass: &str, disks: Vec<DiskInfo>) -> (Conn, Vec<Body>) {
    let (tx, mut rx, auth, pending) = common::open_apply(url, pass, "ps-test", disks, 256).await;
    let mut first = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(STEP, rx.message()).await.unwrap() {
        let body = m.body.unwrap();
        let done = matches!(&body, Body::Welcome(_))
            || matches!(&body, Body::Error(e) if e.disk_id.is_empty());
        if let Body::Welcome(w) = &body {
            auth.verify_server(&pending, &w.server_proof).unwrap();
        }
        first.push(body);
        if done {
            break;
        }
    }
    (Conn { tx, rx }, first)
}

fn disk(id: &str, name: &str, capacity: u64, format: DiskFormat) -> DiskInfo {
    DiskInfo {
        disk_id: id.into(),
        name: name.into(),
        capacity,
        format: format as i32,
        group: String::new(),
    }
}

/// `n` batches of pseudo-random writes and zero extents for a disk of `cap` bytes, and the
/// disk's contents after all of them.
fn workload(disk_id: &str, cap: u64, n: u64, seed: u64) -> (Vec<Batch>, Vec<u8>) {
    let mut raw = vec![0u8; cap as usize];
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    let mut b = BatchBuilder::new();
    let mut out = Vec::new();
    for seq in 1..=n {
        for _ in 0..4 {
            let len = (next() % 64 + 1) * 512;
            let off = next() % ((cap - len) / 512) * 512;
            if b.overlaps(off, len) {
                continue;
            }
            if next() % 4 == 0 {
                b.push_zero(off, len);
                raw[off as usize..(off + len) as usize].fill(0);
            } else {
                let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                b.push_write(off, &data);
                raw[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        if seq % 5 == 0 {
            b.push_marker(Marker {
                id: format!("{disk_id}-m{seq}"),
                kind: MarkerKind::Crash as i32,
                time_unix_ms: 1_700_000_000_000 + seq as i64,
                group: String::new(),
                tag: format!("t{seq}"),
            });
        }
        out.push(b.finish(disk_id, seq, 1_700_000_000_000 + seq as i64, 0));
    }
    (out, raw)
}

fn send(b: Batch) -> ForwardMessage {
    ForwardMessage {
        body: Some(forward_message::Body::Batch(b)),
    }
}

/// Reads acks from every connection until each disk in `want` reached its seq.
async fn wait_acks(conns: &mut [&mut Conn], want: &HashMap<String, u64>) -> Vec<Body> {
    let mut got: HashMap<String, u64> = HashMap::new();
    let mut other = Vec::new();
    let done = |got: &HashMap<String, u64>| want.iter().all(|(d, s)| got.get(d) >= Some(s));
    while !done(&got) {
        for c in conns.iter_mut() {
            if let Ok(m) = tokio::time::timeout(Duration::from_millis(50), c.rx.message()).await {
                match m.unwrap().unwrap().body.unwrap() {
                    Body::Ack(p) => {
                        let e = got.entry(p.disk_id).or_default();
                        *e = (*e).max(p.applied_seq);
                    }
                    b => other.push(b),
                }
            }
        }
    }
    other
}

/// Asks `Differential.DiskHashes` for `d`'s chunks after `after_seq` and compares them with
/// hashes of `raw`; a disk that does not exist answers `exists = false`.
async fn check_hashes(url: &str, d: &DiskInfo, after_seq: u64, raw: &[u8]) {
    let tuning = WanTuning::default();
    let ch = protocol::client::connect(url, &tuning, &TlsFiles::default())
        .await
        .unwrap();
    let mut main = protocol::transport::master_target_client(ch.clone());
    let mut diff = protocol::transport::differential_client(ch);
    let auth = ClientAuth::new(Passphrase::new(PASS).unwrap(), "agent");
    let mut ask = async |disk: DiskInfo| {
        let pending = protocol::client::begin_auth(&mut main, &auth)
            .await
            .unwrap();
        let reply = diff
            .disk_hashes(DiskHashesRequest {
                auth: Some(pending.auth.clone()),
                disk: Some(disk),
                chunk_size: 64 * 1024,
                after_seq,
                first_chunk: 0,
                max_chunks: 0,
            })
            .await
            .unwrap()
            .into_inner();
        auth.verify_server(&pending, &reply.server_proof).unwrap();
        reply
    };
    let reply = ask(d.clone()).await;
    assert!(reply.exists);
    assert_eq!(reply.applied_seq, after_seq);
    for (i, chunk) in raw.chunks(64 * 1024).enumerate() {
        let zero = reply.zero_chunks[i / 8] & (1 << (i % 8)) != 0;
        assert_eq!(zero, chunk.iter().all(|&b| b == 0), "chunk {i}");
        if !zero {
            let h = xxhash_rust::xxh3::xxh3_128(chunk).to_le_bytes();
            assert_eq!(&reply.hashes[i * 16..i * 16 + 16], &h, "chunk {i}");
        }
    }
    let missing = ask(disk("new-disk", "not-there", 1 << 20, DiskFormat::Vmfs)).await;
    assert!(!missing.exists);
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let ds = t.path().join("datastore");
    let ret = t.path().join("retention");
    std::fs::create_dir_all(&ds).unwrap();
    std::fs::create_dir_all(&ret).unwrap();
    (t, ds, ret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_two_connections_apply_in_order_and_survive_a_restart() {
    let (t, ds, ret) = dirs();
    let server = start(&ds, &ret).await;
    let disks = vec![
        disk("d1", "vm1_disk0", 4 << 20, DiskFormat::Vmfs),
        disk("d2", "vm1_disk1", 2 << 20, DiskFormat::MonolithicFlat),
    ];
    let (mut a, first) = connect(&server.url, PASS, disks.clone()).await;
    let Some(Body::Welcome(w)) = first.last() else {
        panic!("{first:?}")
    };
    assert!(w.disks.iter().all(|d| d.applied_seq == 0), "{w:?}");
    let (mut b, _) = connect(&server.url, PASS, disks.clone()).await;

    let (b1, raw1) = workload("d1", 4 << 20, 40, 1);
    let (b2, raw2) = workload("d2", 2 << 20, 30, 2);
    // Odd seqs on one connection, even on the other, each in reverse within chunks of 8:
    // the applier must reorder across connections.
    for batches in [&b1, &b2] {
        for chunk in batches.chunks(8) {
            for batch in chunk.iter().rev() {
                let conn = if batch.seq % 2 == 1 { &a } else { &b };
                conn.tx.send(send(batch.clone())).await.unwrap();
            }
        }
    }
    let want = HashMap::from([("d1".to_string(), 40), ("d2".to_string(), 30)]);
    let other = tokio::time::timeout(STEP, wait_acks(&mut [&mut a, &mut b], &want))
        .await
        .unwrap();
    assert!(other.is_empty(), "{other:?}");
    // A duplicate is dropped and re-acknowledged.
    a.tx.send(send(b1[3].clone())).await.unwrap();
    let want1 = HashMap::from([("d1".to_string(), 40)]);
    tokio::time::timeout(STEP, wait_acks(&mut [&mut a], &want1))
        .await
        .unwrap();
    let mut client =
        protocol::client::master_target(&server.url, &WanTuning::default(), &TlsFiles::default())
            .await
            .unwrap();
    let auth = ClientAuth::new(Passphrase::new(PASS).unwrap(), "cli");
    let status = protocol::client::status(&mut client, &auth).await.unwrap();
    let rows: Vec<_> = status
        .disks
        .iter()
        .map(|d| {
            (
                d.disk_id.as_str(),
                d.name.as_str(),
                d.state.as_str(),
                d.applied_seq,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("d1", "vm1_disk0", "continuous", 40),
            ("d2", "vm1_disk1", "continuous", 30)
        ]
    );
    check_hashes(&server.url, &disks[0], 40, &raw1).await;
    let metrics = scrape(server.metrics_addr).await;
    assert!(
        metrics.contains("master_target_disk_applied_seq{disk_id=\"d1\"} 40"),
        "{metrics}"
    );
    assert!(
        metrics.contains("master_target_connections_open 2"),
        "{metrics}"
    );
    drop((a, b));
    server.stop().await;

    common::assert_qemu_identical(&ds.join("vm1_disk0.vmdk"), &raw1, t.path());
    common::assert_qemu_identical(&ds.join("vm1_disk1.vmdk"), &raw2, t.path());
    let points = master_target::recovery::points(&ret, "d1").unwrap();
    let markers = points.iter().filter(|p| p.kind != "batch").count();
    assert_eq!(markers, 40 / 5, "{points:?}");
    assert_eq!(points.iter().filter(|p| p.kind == "batch").count(), 40);
    assert_eq!(points.last().unwrap().seq, 40);

    // After a restart the disk resumes where it stood.
    let server = start(&ds, &ret).await;
    let (_c, first) = connect(&server.url, PASS, disks).await;
    let Some(Body::Welcome(w)) = first.last() else {
        panic!("{first:?}")
    };
    let applied: HashMap<_, _> = w
        .disks
        .iter()
        .map(|d| (d.disk_id.as_str(), d.applied_seq))
        .collect();
    assert_eq!(applied, HashMap::from([("d1", 40), ("d2", 30)]));
    drop(_c);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_passphrase_is_refused_and_changes_nothing() {
    let (_t, ds, ret) = dirs();
    let server = start(&ds, &ret).await;
    let disks = vec![disk("d1", "vm", 1 << 20, DiskFormat::Vmfs)];
    let (mut c, first) = connect(&server.url, "a wrong passphrase", disks).await;
    let [Body::Error(e)] = &first[..] else {
        panic!("{first:?}")
    };
    assert_eq!(e.code, Code::AuthFailed.value());
    assert!(e.message.contains("wrong passphrase"), "{}", e.message);
    let end = tokio::time::timeout(STEP, c.rx.message()).await.unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "stream ends: {end:?}");
    assert_eq!(
        std::fs::read_dir(&ds).unwrap().count(),
        0,
        "datastore untouched"
    );
    assert_eq!(
        std::fs::read_dir(ret.join("disks")).unwrap().count(),
        0,
        "retention untouched"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_disks_are_refused_one_by_one() {
    let (_t, ds, ret) = dirs();
    let server = start(&ds, &ret).await;
    let disks = vec![
        disk("d1", "shared-name", 1 << 20, DiskFormat::Vmfs),
        disk("d2", "shared-name", 1 << 20, DiskFormat::Vmfs),
        disk("d3", "other", 1 << 20, DiskFormat::TwoGbMaxExtentFlat),
        disk("d5", "too-big", 60 << 40, DiskFormat::Vmfs),
    ];
    let (mut c, first) = connect(&server.url, PASS, disks).await;
    let Some(Body::Welcome(w)) = first.last() else {
        panic!("{first:?}")
    };
    // d3 is accepted: twoGbMaxExtentFlat is a layout the master target writes.
    let mut welcomed: Vec<_> = w.disks.iter().map(|d| d.disk_id.as_str()).collect();
    welcomed.sort();
    assert_eq!(welcomed, ["d1", "d3"]);
    assert!(ds.join("other.vmdk").exists() && ds.join("other-f001.vmdk").exists());
    let mut errors = HashMap::new();
    while errors.len() < 2 {
        let m = tokio::time::timeout(STEP, c.rx.message()).await.unwrap();
        if let Some(Body::Error(e)) = m.unwrap().unwrap().body {
            errors.insert(e.disk_id.clone(), e.code);
        }
    }
    assert_eq!(errors["d2"], Code::DiskNameCollision.value());
    assert_eq!(errors["d5"], Code::NoSpace.value());
    for leftover in ["too-big.vmdk", "too-big-flat.vmdk"] {
        assert!(!ds.join(leftover).exists(), "{leftover} left behind");
    }
    assert!(
        !ret.join("disks/d5.state").exists(),
        "claim of a refused disk removed"
    );
    // The same disk id under another name, and a batch for an undeclared disk.
    c.tx.send(ForwardMessage {
        body: Some(forward_message::Body::AddDisk(disk(
            "d1",
            "renamed",
            1 << 20,
            DiskFormat::Vmfs,
        ))),
    })
    .await
    .unwrap();
    let (batches, _) = workload("nope", 1 << 20, 1, 3);
    c.tx.send(send(batches[0].clone())).await.unwrap();
    let mut codes = Vec::new();
    while codes.len() < 2 {
        let m = tokio::time::timeout(STEP, c.rx.message()).await.unwrap();
        if let Some(Body::Error(e)) = m.unwrap().unwrap().body {
            codes.push(e.code);
        }
    }
    codes.sort();
    assert_eq!(
        codes,
        vec![Code::UnknownDisk.value(), Code::DiskConflict.value()]
    );
    c.tx.send(ForwardMessage {
        body: Some(forward_message::Body::AddDisk(disk(
            "d4",
            "fourth",
            1 << 20,
            DiskFormat::MonolithicFlat,
        ))),
    })
    .await
    .unwrap();
    let m = tokio::time::timeout(STEP, c.rx.message()).await.unwrap();
    let Some(Body::DiskAdded(p)) = m.unwrap().unwrap().body else {
        panic!("expected disk_added")
    };
    assert_eq!((p.disk_id.as_str(), p.applied_seq), ("d4", 0));
    assert!(ds.join("fourth.vmdk").exists() && ds.join("fourth-flat.vmdk").exists());
    drop(c);
    server.stop().await;
}

/// Not a check, a figure: `cargo test -p master-target --release --test serve -- --ignored
/// --nocapture` prints the apply throughput of 512 MiB in 1 MiB batches over 2 connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_report() {
    const MIB: u64 = 1 << 20;
    let (_t, ds, ret) = dirs();
    let server = start(&ds, &ret).await;
    let disks = vec![disk("big", "big", 512 * MIB, DiskFormat::Vmfs)];
    let (mut a, _) = connect(&server.url, PASS, disks.clone()).await;
    let (mut b, _) = connect(&server.url, PASS, disks).await;
    let mut builder = BatchBuilder::new();
    let mut x = 1u64;
    let batches: Vec<Batch> = (1..=512u64)
        .map(|seq| {
            // Half random, half repeated bytes: compresses about 2:1, like real disks.
            let data: Vec<u8> = (0..MIB)
                .map(|i| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    if i % 2 == 0 { (x >> 40) as u8 } else { 7 }
                })
                .collect();
            builder.push_write((seq - 1) * MIB, &data);
            builder.finish("big", seq, 0, 0)
        })
        .collect();
    let started = std::time::Instant::now();
    let (ta, tb) = (a.tx.clone(), b.tx.clone());
    let sender = tokio::spawn(async move {
        for batch in batches {
            let tx = if batch.seq % 2 == 0 { &ta } else { &tb };
            tx.send(send(batch)).await.unwrap();
        }
    });
    let want = HashMap::from([("big".to_string(), 512)]);
    wait_acks(&mut [&mut a, &mut b], &want).await;
    let secs = started.elapsed().as_secs_f64();
    sender.await.unwrap();
    println!("applied 512 MiB in {secs:.2} s: {:.0} MiB/s", 512.0 / secs);
    drop((a, b));
    server.stop().await;
}

/// The binary prints the effective configuration of the shipped example and exits 0, and
/// what it prints is a config it reads back to the same text.
#[test]
fn serve_print_config_round_trips_through_the_binary() {
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/master-target.toml");
    let out = common::run(&["serve", "--config", deploy, "--print-config"]);
    assert!(out.status.success(), "{out:?}");
    let first = String::from_utf8(out.stdout).unwrap();
    assert!(
        first.contains("datastore = \"/vmfs/volumes/datastore1/failback\""),
        "{first}"
    );
    let dir = tempfile::tempdir().unwrap();
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &first).unwrap();
    let out = common::run(&[
        "serve",
        "--config",
        printed.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), first);
}
