//! Helpers for tests that run the real `master-target` binary: start it, speak hop 2 to
//! it, and keep the expected bytes of the disk after every batch.

#![allow(dead_code)] // each test target uses part of this module

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use protocol::auth::{ClientAuth, Passphrase, PendingAuth};
use protocol::batch::BatchBuilder;
use protocol::pb::{
    ApplyMessage, Batch, DiskFormat, DiskInfo, ForwardHello, ForwardMessage, Marker, MarkerKind,
    apply_message::Body, forward_message,
};
use protocol::transport::{TlsFiles, WanTuning};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

pub const PASS: &str = "correct horse battery";
pub const STEP: Duration = Duration::from_secs(20);
pub const DISK: &str = "d1";
pub const NAME: &str = "target";
/// Source time of batch 1; batch n is n seconds later.
pub const T0: i64 = 1_790_000_000_000;

/// Runs blocking `f` (a child process, a wait, a big read) without stalling the async
/// runtime: inside a multi-thread tokio test it moves the worker's other tasks off the
/// thread first (`block_in_place`); elsewhere it just calls `f`.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// A temporary datastore, retention volume and passphrase file.
pub fn dirs() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("ds")).unwrap();
    std::fs::create_dir_all(t.path().join("ret")).unwrap();
    let pass = t.path().join("pass");
    std::fs::write(&pass, PASS).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    t
}

pub fn flat(dir: &Path) -> PathBuf {
    dir.join(format!("ds/{NAME}-flat.vmdk"))
}

/// Starts `master-target serve` with extra environment; returns the child and its URL.
pub fn start(dir: &Path, env: &[(&str, String)]) -> (Child, String) {
    let (child, url, _log) = start_logged(dir, env);
    (child, url)
}

/// Like [`start`], and also returns the server's log: joining the handle gives every
/// line it wrote to stderr once it has exited.
pub fn start_logged(
    dir: &Path,
    env: &[(&str, String)],
) -> (Child, String, std::thread::JoinHandle<Vec<String>>) {
    start_logged_with(dir, env, &[])
}

/// Like [`start_logged`], with more `serve` flags.
pub fn start_logged_with(
    dir: &Path,
    env: &[(&str, String)],
    flags: &[&str],
) -> (Child, String, std::thread::JoinHandle<Vec<String>>) {
    blocking(|| start_logged_blocking(dir, env, flags))
}

fn start_logged_blocking(
    dir: &Path,
    env: &[(&str, String)],
    flags: &[&str],
) -> (Child, String, std::thread::JoinHandle<Vec<String>>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_master-target"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--datastore"])
        .arg(dir.join("ds"))
        .arg("--retention")
        .arg(dir.join("ret"))
        .arg("--passphrase-file")
        .arg(dir.join("pass"))
        .args(flags)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(i) = line.find("listening on ") {
            break line[i + "listening on ".len()..].trim().to_string();
        }
        seen.push(line);
    };
    let log = std::thread::spawn(move || {
        seen.extend(lines.map_while(Result::ok));
        seen
    });
    (child, format!("http://{addr}"), log)
}

/// SIGTERM, and the exit must be clean.
pub fn stop(mut child: Child) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(blocking(|| child.wait()).unwrap().success());
}

/// Runs the binary with `args` and returns its output.
pub fn run(args: &[&str]) -> Output {
    blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_master-target"))
            .args(args)
            .env("NO_COLOR", "1")
            .output()
    })
    .unwrap()
}

/// Runs `recovery-points --json` for [`DISK`] on the retention volume under `dir`.
pub fn recovery_points(dir: &Path) -> Output {
    run(&[
        "recovery-points",
        "--json",
        "--disk",
        DISK,
        "--retention",
        dir.join("ret").to_str().unwrap(),
    ])
}

/// The `points` array of `recovery-points --json` output.
pub fn points(out: &Output) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["points"].as_array().unwrap().clone()
}

/// The seqs of the batch points among `points`, in order.
pub fn batch_seqs(points: &[serde_json::Value]) -> Vec<u64> {
    points
        .iter()
        .filter(|p| p["kind"] == "batch")
        .map(|p| p["seq"].as_u64().unwrap())
        .collect()
}

pub struct Conn {
    pub tx: mpsc::Sender<ForwardMessage>,
    pub rx: Streaming<ApplyMessage>,
    pub applied: u64,
}

/// Connects, declares the disk (vmfs), and returns the stream and its applied seq.
pub async fn hello(url: &str, capacity: u64) -> Conn {
    hello_as(url, capacity, DiskFormat::Vmfs).await
}

/// Connects, declares the disk in `format`, and returns the stream and its applied seq.
pub async fn hello_as(url: &str, capacity: u64, format: DiskFormat) -> Conn {
    hello_queue(url, capacity, format, 64).await
}

/// Like [`hello_as`], with room for `queue` outbound messages before `send` waits.
pub async fn hello_queue(url: &str, capacity: u64, format: DiskFormat, queue: usize) -> Conn {
    let disks = vec![DiskInfo {
        disk_id: DISK.into(),
        name: NAME.into(),
        capacity,
        format: format as i32,
        group: String::new(),
    }];
    let (tx, mut rx, _, _) = open_apply(url, PASS, "test", disks, queue).await;
    let m = tokio::time::timeout(STEP, rx.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(Body::Welcome(w)) = m.body else {
        panic!("{m:?}")
    };
    Conn {
        tx,
        rx,
        applied: w.disks[0].applied_seq,
    }
}

/// Authenticates as `client_id` with `pass`, opens an Apply stream with room for `queue`
/// outbound messages, and sends the hello for `disks`; returns both ends of the stream and
/// the client's half of the handshake.
pub async fn open_apply(
    url: &str,
    pass: &str,
    client_id: &str,
    disks: Vec<DiskInfo>,
    queue: usize,
) -> (
    mpsc::Sender<ForwardMessage>,
    Streaming<ApplyMessage>,
    ClientAuth,
    PendingAuth,
) {
    let mut client =
        protocol::client::master_target(url, &WanTuning::default(), &TlsFiles::default())
            .await
            .unwrap();
    let auth = ClientAuth::new(Passphrase::new(pass).unwrap(), client_id);
    let pending = protocol::client::begin_auth(&mut client, &auth)
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(queue);
    tx.send(ForwardMessage {
        body: Some(forward_message::Body::Hello(ForwardHello {
            auth: Some(pending.auth.clone()),
            disks,
            connection: 0,
        })),
    })
    .await
    .unwrap();
    let rx = client
        .apply(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, rx, auth, pending)
}

impl Conn {
    pub async fn send(&self, b: &Batch) {
        self.tx
            .send(ForwardMessage {
                body: Some(forward_message::Body::Batch(b.clone())),
            })
            .await
            .unwrap();
    }

    /// The next message from the server.
    pub async fn next(&mut self) -> Option<Body> {
        tokio::time::timeout(STEP, self.rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .body
    }

    /// Waits for an ack of at least `seq`; returns the acknowledged seq.
    pub async fn acked(&mut self, seq: u64) -> u64 {
        loop {
            let m = tokio::time::timeout(STEP, self.rx.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            match m.body {
                Some(Body::Ack(p)) if p.applied_seq >= seq => return p.applied_seq,
                Some(Body::Ack(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// A scripted disk: batches that overwrite each other's blocks, zero ranges over data, and
/// markers, with the expected disk after every seq (`states[seq]`).
pub struct Script {
    pub batches: Vec<Batch>,
    pub states: Vec<Vec<u8>>,
}

/// `n` batches on a disk of `cap` bytes; batch `seq` carries an app marker `m{seq}` with
/// tag `t{seq}` when `seq` is in `markers`.
pub fn script(cap: u64, n: u64, markers: &[u64]) -> Script {
    let mut states = vec![vec![0u8; cap as usize]];
    let mut batches = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut b = BatchBuilder::new();
    for seq in 1..=n {
        let mut disk = states.last().unwrap().clone();
        for i in 0..6 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let blocks = cap / 4096;
            let off = (x >> 33) % (blocks - 32) * 4096;
            let len = ((x >> 20) % 24 + 1) * 4096;
            if b.overlaps(off, len) {
                continue;
            }
            if i == 5 && seq % 3 == 0 {
                b.push_zero(off, len);
                disk[off as usize..(off + len) as usize].fill(0);
            } else {
                let data: Vec<u8> = (0..len).map(|k| (k ^ x ^ seq) as u8 | 1).collect();
                b.push_write(off, &data);
                disk[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        if markers.contains(&seq) {
            b.push_marker(Marker {
                id: format!("m{seq}"),
                kind: MarkerKind::App as i32,
                time_unix_ms: T0 + seq as i64 * 1000,
                group: String::new(),
                tag: format!("t{seq}"),
            });
        }
        batches.push(b.finish(DISK, seq, T0 + seq as i64 * 1000, 0));
        states.push(disk);
    }
    Script { batches, states }
}

/// Asserts that `path` holds exactly `want`, naming the first differing byte.
pub fn assert_bytes(path: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// qemu-img accepts `vmdk` and finds it identical to `raw`.
pub fn assert_qemu_identical(vmdk: &Path, raw: &[u8], scratch: &Path) {
    let rawp = scratch.join("expected.raw");
    std::fs::write(&rawp, raw).unwrap();
    for args in [
        vec!["check".into(), vmdk.display().to_string()],
        vec![
            "compare".into(),
            "-f".into(),
            "vmdk".into(),
            "-F".into(),
            "raw".into(),
            vmdk.display().to_string(),
            rawp.display().to_string(),
        ],
    ] {
        let out = blocking(|| Command::new("qemu-img").args(&args).output()).unwrap();
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
