//! `agent replicate` end to end in-process: the NBD export on 127.0.0.1:0 driven by
//! `qemu-io`/`qemu-img`, against a fake process server on 127.0.0.1:0 that applies the
//! batches it receives, in seq order, to a copy of the target disk and snapshots it at each
//! marker. The tests check that the rebuilt disk equals the source file, that a marker
//! follows every write acknowledged before its flush, and the control API.

mod common;

use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::control::{self, Kind, Request};
use agent::replicate::{DiskConfig, Mode, Replica, ReplicateConfig, Replication, start};
use common::{PASS, Reply, apply, challenge, hash_page, msg, progress, serve, target, welcome};
use protocol::auth::{ClientAuth, Passphrase, ServerAuth};
use protocol::batch::flags;
use protocol::pb::agent_message::Body as AgentBody;
use protocol::pb::differential_server::Differential;
use protocol::pb::process_server_message::Body as ServerBody;
use protocol::pb::process_server_server::ProcessServer;
use protocol::pb::{
    AgentMessage, ChallengeReply, ChallengeRequest, DiskHashes, DiskHashesRequest, Marker, Pause,
    StatusReply, StatusRequest,
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

const DISK: &str = "6000C29a-repl";
const CAP: usize = 8 << 20;

#[derive(Debug, Default)]
struct State {
    disk: Vec<u8>,
    cached_seq: u64,
    /// (seq, flags) of every stored batch, in order.
    stored: Vec<(u64, u32)>,
    /// Every marker with the disk as it stood once its batch was applied.
    markers: Vec<(Marker, Vec<u8>)>,
    /// The seq of the batch of each marker.
    marker_seqs: Vec<u64>,
    /// Streams refused while the fake was down.
    refused: usize,
    /// Every zero extent received, as (offset, length).
    zeros: Vec<(u64, u64)>,
}

struct Fake {
    auth: Arc<ServerAuth>,
    state: Arc<Mutex<State>>,
    stored: Arc<Notify>,
    /// Intake paused (sent to the agent as `Pause` messages).
    paused: tokio::sync::watch::Receiver<bool>,
    /// Unreachable: open streams fail and new ones are refused as unavailable.
    down: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl ProcessServer for Fake {
    async fn challenge(
        &self,
        _: GrpcRequest<ChallengeRequest>,
    ) -> Result<Response<ChallengeReply>, Status> {
        challenge(&self.auth)
    }

    type ReplicateStream = ReceiverStream<Reply>;

    async fn replicate(
        &self,
        req: GrpcRequest<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        if *self.down.borrow() {
            self.state.lock().unwrap().refused += 1;
            return Err(Status::unavailable("scripted outage"));
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let Some(AgentBody::Hello(hello)) = inbound.message().await?.and_then(|m| m.body) else {
            return Err(Status::invalid_argument("first message must be hello"));
        };
        let proof = self
            .auth
            .verify(hello.auth.as_ref())
            .map_err(|r| r.to_status())?;
        let disk = hello.disks[0].clone();
        let cached = {
            let mut st = self.state.lock().unwrap();
            if st.disk.is_empty() {
                st.disk = vec![0xA5; disk.capacity as usize];
            }
            st.cached_seq
        };
        tx.send(welcome(proof, &disk.disk_id, cached)).await.ok();
        let mut paused = self.paused.clone();
        let pauses = tx.clone();
        tokio::spawn(async move {
            while paused.changed().await.is_ok() {
                let p = *paused.borrow_and_update();
                let body = ServerBody::Pause(Pause {
                    paused: p,
                    reason: "scripted".into(),
                });
                if pauses.send(msg(body)).await.is_err() {
                    return;
                }
            }
        });
        let (state, stored) = (self.state.clone(), self.stored.clone());
        let mut down = self.down.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let m = tokio::select! {
                    m = inbound.message() => m,
                    _ = async { down.wait_for(|d| *d).await.is_ok() } => {
                        let _ = tx.send(Err(Status::unavailable("scripted outage"))).await;
                        return;
                    }
                };
                let Ok(Some(m)) = m else { return };
                let Some(AgentBody::Batch(b)) = m.body else {
                    continue;
                };
                let seq = {
                    let mut st = state.lock().unwrap();
                    assert_eq!(b.seq, st.cached_seq + 1, "batches arrive in seq order");
                    apply(&mut st.disk, &b, disk.capacity, &mut buf);
                    st.zeros
                        .extend(b.zeros.iter().map(|z| (z.offset, z.length)));
                    for m in &b.markers {
                        let snapshot = st.disk.clone();
                        st.markers.push((m.clone(), snapshot));
                        st.marker_seqs.push(b.seq);
                    }
                    st.cached_seq = b.seq;
                    st.stored.push((b.seq, b.flags));
                    b.seq
                };
                stored.notify_waiters();
                let ack = progress(&b.disk_id, seq);
                if tx.send(msg(ServerBody::Ack(ack))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(&self, _: GrpcRequest<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

/// The fake's `Differential` service: hashes of its disk; `exists = false` while it holds
/// none (then the agent's initial pass is a full one).
struct FakeHashes {
    auth: Arc<ServerAuth>,
    state: Arc<Mutex<State>>,
}

#[tonic::async_trait]
impl Differential for FakeHashes {
    async fn disk_hashes(
        &self,
        req: GrpcRequest<DiskHashesRequest>,
    ) -> Result<Response<DiskHashes>, Status> {
        let r = req.into_inner();
        let proof = self
            .auth
            .verify(r.auth.as_ref())
            .map_err(|e| e.to_status())?;
        let st = self.state.lock().unwrap();
        let chunk = r.chunk_size as usize;
        let total = st.disk.len().div_ceil(chunk) as u64;
        let end = (r.first_chunk + u64::from(r.max_chunks)).min(total);
        let (hashes, zeros) = hash_page(&st.disk, r.first_chunk, end, chunk);
        Ok(Response::new(DiskHashes {
            server_proof: proof.into(),
            exists: !st.disk.is_empty(),
            first_chunk: r.first_chunk,
            chunk_size: r.chunk_size,
            hashes: hashes.into(),
            zero_chunks: zeros.into(),
            applied_seq: st.cached_seq,
        }))
    }
}

struct Harness {
    url: String,
    state: Arc<Mutex<State>>,
    stored: Arc<Notify>,
    pause: tokio::sync::watch::Sender<bool>,
    down: tokio::sync::watch::Sender<bool>,
}

impl Harness {
    async fn start() -> Harness {
        Self::holding(Vec::new()).await
    }

    /// A fake whose target disk already holds `disk` (empty: no disk yet).
    async fn holding(disk: Vec<u8>) -> Harness {
        let state = Arc::new(Mutex::new(State {
            disk,
            ..State::default()
        }));
        let auth = Arc::new(ServerAuth::new(Passphrase::new(PASS).unwrap()));
        let hashes = FakeHashes {
            auth: auth.clone(),
            state: state.clone(),
        };
        let stored = Arc::new(Notify::new());
        let (pause, paused) = tokio::sync::watch::channel(false);
        let (down_tx, down) = tokio::sync::watch::channel(false);
        let fake = Fake {
            auth,
            state: state.clone(),
            stored: stored.clone(),
            paused,
            down,
        };
        let url = serve(fake, hashes).await;
        Harness {
            url,
            state,
            stored,
            pause,
            down: down_tx,
        }
    }

    /// Waits until `done` holds for the fake's state (checked after every stored batch).
    async fn wait(&self, mut done: impl FnMut(&State) -> bool) {
        loop {
            let n = self.stored.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if done(&self.state.lock().unwrap()) {
                return;
            }
            n.await;
        }
    }
}

/// An 8 MiB source: patterned data, a hole, and a data tail.
fn source_disk(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.join("source.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(CAP as u64).unwrap();
    let data: Vec<u8> = (0..(2 << 20)).map(|i| (i * 7 % 251) as u8 + 1).collect();
    f.write_all_at(&data, 0).unwrap();
    f.write_all_at(&[0xEE; 4096], CAP as u64 - 4096).unwrap();
    path
}

/// A fake with no disk yet and an 8 MiB source disk in a fresh temporary directory.
async fn fresh() -> (Harness, tempfile::TempDir, std::path::PathBuf) {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = source_disk(dir.path());
    (h, dir, path)
}

/// Starts replicating `path` to `h` with the default config but a window of `window` bytes.
async fn start_windowed(h: &Harness, path: &std::path::Path, window: usize) -> Replication {
    let mut cfg = config(&h.url, path, None);
    cfg.window_bytes = window;
    start(cfg).await.unwrap()
}

/// Runs `write` and a flush through `r`, then reads the source at `path` and waits until the
/// fake holds a marker of exactly it.
async fn write_flush_marked(
    r: &Replication,
    h: &Harness,
    path: &std::path::Path,
    write: &str,
) -> Vec<u8> {
    bounded(qemu_io(&r.disks[0], &[write, "flush"])).await;
    let after = std::fs::read(path).unwrap();
    bounded(h.wait(|st| st.markers.last().is_some_and(|m| m.1 == after))).await;
    after
}

/// Runs `during` through `r` while the initial pass goes on, waits for continuous mode, then
/// runs one more write (`last`) and a flush, so that there is a marker to wait for, and waits
/// for it: returns the source as it then stands.
async fn caught_up(
    r: &Replication,
    h: &Harness,
    path: &std::path::Path,
    during: &[&str],
    last: &str,
) -> Vec<u8> {
    bounded(qemu_io(&r.disks[0], during)).await;
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    write_flush_marked(r, h, path, last).await
}

fn config(url: &str, disk: &std::path::Path, quiesce: Option<String>) -> ReplicateConfig {
    ReplicateConfig {
        disks: vec![DiskConfig {
            target: target(url, DISK),
            path: disk.to_path_buf(),
            nbd_listen: "127.0.0.1:0".into(),
        }],
        group: String::new(),
        control: Some(("127.0.0.1:0".into(), Passphrase::new(PASS).unwrap())),
        window_bytes: 256 << 10,
        batch_data: 64 << 10,
        linger: Duration::from_millis(20),
        crash_interval: Duration::from_secs(3600),
        app_interval: Duration::from_secs(3600),
        app_quiesce_cmd: quiesce,
        retry_for: Duration::from_secs(30),
        overflow_grace: Duration::from_millis(200),
    }
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(40), f)
        .await
        .expect("finished in time")
}

/// Runs `qemu-io` against the export with these commands; panics unless it succeeds.
async fn qemu_io(disk: &Replica, cmds: &[&str]) {
    let mut c = tokio::process::Command::new("qemu-io");
    c.args(["-f", "raw", &format!("nbd://{}", disk.nbd_addr)]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.output().await.expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io {cmds:?}: {text}");
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
}

/// A marker request for the test disk.
fn marker(kind: Kind, tag: &str) -> Request {
    Request::Marker {
        disk_id: Some(DISK.into()),
        kind,
        tag: tag.into(),
    }
}

/// Calls the control API at `url` as the test client.
async fn call(url: &str, req: &Request) -> Result<control::Reply, control::ControlError> {
    control::call(url, &client(), req).await
}

/// Runs `qemu-img` with `args` then `files` and asserts that it succeeded (showing what it
/// wrote when it did not).
async fn qemu_img(args: &[&OsStr], files: [&OsStr; 2]) {
    let out = bounded(
        tokio::process::Command::new("qemu-img")
            .args(args)
            .args(files)
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn client() -> ClientAuth {
    ClientAuth::new(Passphrase::new(PASS).unwrap(), "test-cli")
}

fn markers(st: &State) -> usize {
    st.markers.len()
}

fn check_replica(st: &State, before: &[u8], after: &[u8]) {
    assert!(
        st.disk == after,
        "the rebuilt disk differs from the source file"
    );
    // The first flush's marker covers the first write and nothing after it.
    let mut at_first = before.to_vec();
    at_first[1 << 20..(1 << 20) + (64 << 10)].fill(0xab);
    assert!(st.markers[0].1 == at_first, "first marker's disk is wrong");
    assert!(st.markers[1].1 == after, "second marker's disk is wrong");
    assert!(
        st.stored
            .iter()
            .skip_while(|(_, f)| f & flags::RESYNC_END == 0)
            .skip(1)
            .all(|(_, f)| *f == 0),
        "continuous batches carry no resync flag"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_writes_are_replicated_in_order_with_a_marker_at_each_flush() {
    let (h, _dir, path) = fresh().await;
    let r = start(config(&h.url, &path, None)).await.unwrap();
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    bounded(h.wait(|st| st.stored.iter().any(|(_, f)| f & flags::RESYNC_END != 0))).await;
    {
        let st = h.state.lock().unwrap();
        let last = st.stored.last().unwrap().1;
        assert_eq!(
            last,
            flags::RESYNC | flags::RESYNC_END,
            "the pass ends the interval"
        );
        assert!(
            st.markers.is_empty(),
            "no marker inside the initial interval"
        );
    }
    let before = std::fs::read(&path).unwrap();
    let initial_zeros = h.state.lock().unwrap().zeros.len();
    bounded(qemu_io(
        &r.disks[0],
        &[
            "write -P 0xab 1M 64k",
            "flush",
            "write -P 0xcd 1032k 8k",
            "write -z 3M 128k",
            "discard 7M 64k",
            "write -P 0x11 -f 5M 4k",
            "flush",
        ],
    ))
    .await;
    let after = std::fs::read(&path).unwrap();
    bounded(h.wait(|st| markers(st) >= 2)).await;
    check_replica(&h.state.lock().unwrap(), &before, &after);
    // WRITE_ZEROES and TRIM travel as zero extents, not as data.
    {
        let st = h.state.lock().unwrap();
        let covered = |off: u64, len: u64| {
            st.zeros[initial_zeros..]
                .iter()
                .any(|&(o, l)| o <= off && off + len <= o + l)
        };
        let sent = &st.zeros[initial_zeros..];
        assert!(covered(3 << 20, 128 << 10), "zeros: {sent:?}");
        assert!(covered(7 << 20, 64 << 10), "zeros: {sent:?}");
    }
    // Reads through the export see the file.
    let nbd = format!("nbd://{}", r.disks[0].nbd_addr);
    let args = ["compare", "-f", "raw", "-F", "raw"].map(OsStr::new);
    qemu_img(&args, [OsStr::new(&nbd), path.as_os_str()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_the_initial_pass_are_caught_up() {
    let (h, _dir, path) = fresh().await;
    // A small window keeps the pass going while the writes arrive.
    let r = start_windowed(&h, &path, 64 << 10).await;
    let during = [
        "write -P 0x21 0 64k",
        "write -P 0x22 6M 1M",
        "write -z 8k 4k",
        "flush",
    ];
    let after = caught_up(&r, &h, &path, &during, "write -P 0x23 4M 4k").await;
    assert!(h.state.lock().unwrap().disk == after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_cuts_markers_and_reports_status() {
    let (h, dir, path) = fresh().await;
    let log = dir.path().join("hook.log");
    let r = start(config(
        &h.url,
        &path,
        Some(format!("echo >> {}", log.display())),
    ))
    .await
    .unwrap();
    let url = format!("tcp://{}", r.control_addr.unwrap());
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;

    let user = marker(Kind::User, "before-upgrade");
    let id = bounded(call(&url, &user)).await.unwrap().marker_id.unwrap();
    let app = marker(Kind::App, "");
    bounded(call(&url, &app)).await.unwrap();
    bounded(h.wait(|st| markers(st) >= 2)).await;
    {
        let st = h.state.lock().unwrap();
        assert_eq!(st.markers[0].0.id, id);
        assert_eq!(st.markers[0].0.tag, "before-upgrade");
        assert_eq!(st.markers[1].0.kind, protocol::pb::MarkerKind::App as i32);
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze\nthaw\n");

    let status = bounded(call(&url, &Request::Status)).await.unwrap();
    let d = &status.disks.unwrap()[0];
    assert_eq!(d.mode, "continuous");
    assert_eq!(d.disk_id, DISK);
    assert!(d.cached_seq >= 1 && d.last_seq_produced >= d.cached_seq);
    assert_eq!(d.last_marker.as_ref().unwrap().kind, "app");

    // A wrong passphrase gets nothing.
    let wrong = ClientAuth::new(Passphrase::new("not the passphrase").unwrap(), "x");
    let e = bounded(control::call(&url, &wrong, &Request::Status))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("passphrase"), "{e}");
    // Unknown disk.
    let e = bounded(control::call(
        &url,
        &client(),
        &Request::Marker {
            disk_id: Some("other".into()),
            kind: Kind::Crash,
            tag: String::new(),
        },
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().contains("unknown disk"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_freeze_cuts_no_marker_and_shows_in_status() {
    let (h, _dir, path) = fresh().await;
    let r = start(config(&h.url, &path, Some("false".into())))
        .await
        .unwrap();
    let url = format!("{}", r.control_addr.unwrap());
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    let app = marker(Kind::App, "");
    let e = bounded(call(&url, &app)).await.unwrap_err();
    assert!(e.to_string().contains("freeze"), "{e}");
    let status = bounded(call(&url, &Request::Status)).await.unwrap();
    let d = &status.disks.unwrap()[0];
    assert!(d.last_error.as_ref().unwrap().contains("freeze"));
    assert!(d.last_marker.is_none());
    // A crash marker still works and is the first marker the target sees.
    let crash = marker(Kind::Crash, "");
    bounded(call(&url, &crash)).await.unwrap();
    bounded(h.wait(|st| markers(st) >= 1)).await;
    let st = h.state.lock().unwrap();
    assert_eq!(st.markers.len(), 1);
    assert_eq!(st.markers[0].0.kind, protocol::pb::MarkerKind::Crash as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_process_server_turns_writes_into_a_bitmap_then_a_resync() {
    let (h, _dir, path) = fresh().await;
    // Patterned writes compress to almost nothing: a one-batch window fills all the same.
    let r = start_windowed(&h, &path, 1).await;
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    bounded(h.wait(|st| st.stored.iter().any(|(_, f)| f & flags::RESYNC_END != 0))).await;
    let resync_ends = |st: &State| {
        st.stored
            .iter()
            .filter(|(_, f)| f & flags::RESYNC_END != 0)
            .count()
    };
    h.pause.send(true).unwrap();
    // Far more batches than the window holds: without the bitmap these writes would wait for the
    // pause to end, which only comes after them.
    bounded(qemu_io(
        &r.disks[0],
        &[
            "write -P 0x31 0 1M",
            "write -P 0x32 2M 1M",
            "write -P 0x33 4M 1M",
            "flush",
            "write -P 0x34 6M 512k",
        ],
    ))
    .await;
    bounded(r.disks[0].state.wait_until(|s| s.mode() == Mode::Bitmap)).await;
    h.pause.send(false).unwrap();
    bounded(h.wait(|st| resync_ends(st) >= 2)).await;
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    let after = write_flush_marked(&r, &h, &path, "write -P 0x35 7M 4k").await;
    let st = h.state.lock().unwrap();
    assert!(
        st.disk == after,
        "the rebuilt disk differs from the source file"
    );
    // The second resync interval (after the pause) has no marker inside: a flush made once
    // the disk was in the bitmap cut none.
    let interval: Vec<u64> = st
        .stored
        .iter()
        .skip_while(|(_, f)| f & flags::RESYNC_END == 0)
        .skip(1)
        .skip_while(|(_, f)| f & flags::RESYNC == 0)
        .take_while(|(_, f)| f & flags::RESYNC_END == 0)
        .map(|(seq, _)| *seq)
        .collect();
    let end = st
        .stored
        .iter()
        .filter(|(_, f)| f & flags::RESYNC_END != 0)
        .nth(1)
        .unwrap()
        .0;
    let first = interval.first().copied().unwrap_or(end);
    assert!(
        st.marker_seqs.iter().all(|&s| s < first || s > end),
        "a marker inside the resync interval {first}..={end}: {:?}",
        st.marker_seqs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_target_gets_only_the_differing_chunks_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = source_disk(dir.path());
    let content = std::fs::read(&path).unwrap();
    let mut target = content.clone();
    target[100_000] ^= 0x5a;
    let h = Harness::holding(target).await;
    let r = start(config(&h.url, &path, None)).await.unwrap();
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    bounded(h.wait(|st| st.stored.iter().any(|(_, f)| f & flags::RESYNC_END != 0))).await;
    let st = h.state.lock().unwrap();
    assert!(st.disk == content, "the target differs from the source");
    // One 64 KiB chunk fits in one batch, closed by the (empty) last batch of the interval.
    assert!(st.stored.len() <= 2, "sent {:?}", st.stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_cut_between_workload_steps_hold_the_source_as_it_was() {
    let (h, _dir, path) = fresh().await;
    let r = start(config(&h.url, &path, None)).await.unwrap();
    let url = format!("tcp://{}", r.control_addr.unwrap());
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    let steps: [&[&str]; 5] = [
        &["write -P 0x41 0 256k", "write -P 0x42 128k 4k"],
        &[
            "write -z 64k 64k",
            "discard 6M 512k",
            "write -P 0x43 6200k 4k",
        ],
        // Overlapping writes in flight together: the target must end as the file did.
        &[
            "aio_write -P 0x51 1M 64k",
            "aio_write -P 0x52 1056k 64k",
            "aio_write -P 0x53 1040k 8k",
            "aio_flush",
        ],
        &["write -P 0x44 -f 8188k 4k", "write -P 0x45 3M 1M"],
        &["write -P 0x46 2044k 8k", "write -z 0 4k"],
    ];
    let mut copies = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        bounded(qemu_io(&r.disks[0], step)).await;
        let cut = marker(Kind::User, &format!("step-{i}"));
        let id = bounded(call(&url, &cut)).await.unwrap().marker_id.unwrap();
        copies.push((id, std::fs::read(&path).unwrap()));
    }
    let last = copies.last().unwrap().0.clone();
    bounded(h.wait(|st| st.markers.iter().any(|(m, _)| m.id == last))).await;
    let st = h.state.lock().unwrap();
    let mut seqs = Vec::new();
    for (i, (id, copy)) in copies.iter().enumerate() {
        let at = st
            .markers
            .iter()
            .position(|(m, _)| &m.id == id)
            .expect("every cut marker reached the target");
        assert_eq!(st.markers[at].0.tag, format!("step-{i}"));
        assert!(
            st.markers[at].1 == *copy,
            "the target at marker step-{i} differs from the source as it was then"
        );
        seqs.push(st.marker_seqs[at]);
    }
    assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
    assert!(st.disk == copies.last().unwrap().1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_process_server_turns_writes_into_a_bitmap_and_the_target_converges() {
    let (h, _dir, path) = fresh().await;
    let r = start_windowed(&h, &path, 1).await;
    let url = format!("tcp://{}", r.control_addr.unwrap());
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    // A point before the outage.
    bounded(qemu_io(&r.disks[0], &["write -P 0x61 512k 64k"])).await;
    let cut = marker(Kind::User, "before-outage");
    let id = bounded(call(&url, &cut)).await.unwrap().marker_id.unwrap();
    let at_marker = std::fs::read(&path).unwrap();
    bounded(h.wait(|st| st.markers.iter().any(|(m, _)| m.id == id))).await;

    h.down.send(true).unwrap();
    // Writes go on while the process server cannot be reached: they must not wait for it.
    bounded(qemu_io(
        &r.disks[0],
        &[
            "write -P 0x62 0 1M",
            "write -P 0x63 2M 1M",
            "flush",
            "write -z 4M 256k",
            "write -P 0x64 6M 1M",
            "write -P 0x65 1M 4k",
        ],
    ))
    .await;
    bounded(r.disks[0].state.wait_until(|s| s.mode() == Mode::Bitmap)).await;
    let status = bounded(call(&url, &Request::Status)).await.unwrap();
    assert_eq!(status.disks.unwrap()[0].mode, "bitmap");
    // No point can be cut while the disk is only tracked in the bitmap.
    let during = marker(Kind::User, "during-outage");
    let e = bounded(call(&url, &during)).await.unwrap_err();
    assert!(e.to_string().contains("resync"), "{e}");
    let stored_during = h.state.lock().unwrap().stored.len();
    // The agent keeps trying to reconnect meanwhile.
    let tried = std::time::Instant::now();
    while h.state.lock().unwrap().refused == 0 {
        assert!(
            tried.elapsed() < Duration::from_secs(20),
            "no reconnect attempt"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    h.down.send(false).unwrap();
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    let after = write_flush_marked(&r, &h, &path, "write -P 0x66 7M 4k").await;
    let st = h.state.lock().unwrap();
    assert!(
        st.stored.len() > stored_during,
        "nothing sent after the outage"
    );
    assert!(
        st.disk == after,
        "the target did not converge to the source"
    );
    let (_, before) = st.markers.iter().find(|(m, _)| m.id == id).unwrap();
    assert!(
        *before == at_marker,
        "the point before the outage is no longer the source as it was"
    );
    assert!(
        st.stored
            .iter()
            .filter(|(_, f)| f & flags::RESYNC_END != 0)
            .count()
            >= 2,
        "the outage ended with a resync interval"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_crash_and_app_markers_are_cut_without_any_flush() {
    let (h, dir, path) = fresh().await;
    let log = dir.path().join("hook.log");
    let mut cfg = config(&h.url, &path, Some(format!("echo >> {}", log.display())));
    cfg.crash_interval = Duration::from_millis(200);
    cfg.app_interval = Duration::from_millis(300);
    let r = start(cfg).await.unwrap();
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    let kind = |st: &State, k: protocol::pb::MarkerKind| {
        st.markers
            .iter()
            .filter(|(m, _)| m.kind == k as i32)
            .count()
    };
    bounded(h.wait(|st| {
        kind(st, protocol::pb::MarkerKind::Crash) >= 2
            && kind(st, protocol::pb::MarkerKind::App) >= 1
    }))
    .await;
    let hook = std::fs::read_to_string(&log).unwrap();
    assert!(hook.starts_with("freeze\nthaw\n"), "{hook:?}");
    let source = std::fs::read(&path).unwrap();
    let st = h.state.lock().unwrap();
    assert!(st.markers.iter().all(|(_, d)| *d == source));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_writes_through_the_export_and_is_replicated() {
    let (h, dir, path) = fresh().await;
    let r = start(config(&h.url, &path, None)).await.unwrap();
    bounded(
        r.disks[0]
            .state
            .wait_until(|s| s.mode() == Mode::Continuous),
    )
    .await;
    // An image to copy over the whole disk: other data, zeros where the source had data.
    let image = dir.path().join("image.raw");
    let mut content: Vec<u8> = (0..CAP).map(|i| (i * 13 % 241) as u8).collect();
    content[..1 << 20].fill(0);
    std::fs::write(&image, &content).unwrap();
    let nbd = format!("nbd://{}", r.disks[0].nbd_addr);
    let args = ["convert", "-n", "-f", "raw", "-O", "raw"].map(OsStr::new);
    qemu_img(&args, [image.as_os_str(), OsStr::new(&nbd)]).await;
    assert!(
        std::fs::read(&path).unwrap() == content,
        "FILE took the image"
    );
    // A flush so that there is a marker to wait for.
    bounded(qemu_io(&r.disks[0], &["flush"])).await;
    bounded(h.wait(|st| st.markers.last().is_some_and(|m| m.1 == content))).await;
    assert!(h.state.lock().unwrap().disk == content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_differential_initial_pass_are_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = source_disk(dir.path());
    let content = std::fs::read(&path).unwrap();
    // Every other 64 KiB chunk differs on the target: half the disk is sent.
    let mut target = content.clone();
    for c in (0..CAP / (64 << 10)).step_by(2) {
        target[c * (64 << 10)] ^= 0x5a;
    }
    let h = Harness::holding(target).await;
    let r = start_windowed(&h, &path, 64 << 10).await;
    let during = [
        "write -P 0x71 64k 64k",
        "write -P 0x72 5M 1M",
        "write -z 0 4k",
        "discard 7M 64k",
        "flush",
    ];
    // Measured: the differential pass is still running after `during` (mode full-sync) in 3
    // of 3 runs.
    let after = caught_up(&r, &h, &path, &during, "write -P 0x73 4M 4k").await;
    let st = h.state.lock().unwrap();
    assert!(st.disk == after, "the target differs from the source");
    assert!(
        st.stored
            .iter()
            .take_while(|(_, f)| f & flags::RESYNC_END == 0)
            .all(|(_, f)| f & flags::RESYNC != 0),
        "the initial interval is one resync interval"
    );
    let end = st
        .stored
        .iter()
        .find(|(_, f)| f & flags::RESYNC_END != 0)
        .unwrap()
        .0;
    assert!(
        st.marker_seqs.iter().all(|&s| s > end),
        "a marker inside the initial interval"
    );
}

/// A minimal NBD client (fixed newstyle, `NBD_OPT_EXPORT_NAME`) that sends one write at a
/// time and waits for its reply, so that the test knows exactly when each was acknowledged.
struct NbdClient {
    stream: tokio::net::TcpStream,
    cookie: u64,
}

impl NbdClient {
    async fn connect(addr: std::net::SocketAddr) -> NbdClient {
        use agent::nbd::proto::{
            FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, OPT_EXPORT_NAME,
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        // One small request after another: Nagle would hold each for the delayed ack.
        stream.set_nodelay(true).unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).await.unwrap();
        let flags = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        stream.write_all(&flags.to_be_bytes()).await.unwrap();
        let mut option = IHAVEOPT.to_be_bytes().to_vec();
        option.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        option.extend_from_slice(&0u32.to_be_bytes());
        stream.write_all(&option).await.unwrap();
        // Size and transmission flags, without the zeroes.
        let mut export = [0u8; 10];
        stream.read_exact(&mut export).await.unwrap();
        NbdClient { stream, cookie: 0 }
    }

    /// Writes `data` at `offset` and returns once the server acknowledged it.
    async fn write(&mut self, offset: u64, data: &[u8]) {
        use agent::nbd::proto::{Command, Request, SIMPLE_REPLY_MAGIC};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.cookie += 1;
        let header = Request {
            flags: 0,
            command: Command::Write,
            cookie: self.cookie,
            offset,
            length: data.len() as u32,
        }
        .encode();
        self.stream
            .write_all(&[&header[..], data].concat())
            .await
            .unwrap();
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[0..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(reply[4..8], [0; 4], "write {offset} failed");
    }
}

const DISK_B: &str = "6000C29b-repl";
/// Blocks of the chained workload of the group test.
const CHAIN: usize = 1000;
/// The group test cuts a marker each time the writer passes this many blocks.
const CUT_EVERY: usize = 100;

/// The content of block `i` of the chained workload: unlike any block of `source_disk`.
fn chain_block(i: usize) -> Vec<u8> {
    vec![(i % 200) as u8 + 40; 4096]
}

/// How many blocks of the chained workload `disk` holds; they must be a prefix.
fn chain_prefix(disk: &[u8]) -> usize {
    let written = |i: usize| disk[i * 4096..(i + 1) * 4096] == chain_block(i)[..];
    let k = (0..CHAIN).take_while(|&i| written(i)).count();
    assert!(
        (k..CHAIN).all(|i| !written(i)),
        "the chained writes at a marker are not a prefix"
    );
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_marker_is_cut_on_every_disk_at_one_instant() {
    let (ha, dir, path_a) = fresh().await;
    let hb = Harness::start().await;
    let dir_b = tempfile::tempdir().unwrap();
    let path_b = source_disk(dir_b.path());
    let log = dir.path().join("hook.log");
    let mut cfg = config(&ha.url, &path_a, Some(format!("echo >> {}", log.display())));
    cfg.disks.push(DiskConfig {
        target: target(&hb.url, DISK_B),
        path: path_b.clone(),
        nbd_listen: "127.0.0.1:0".into(),
    });
    cfg.group = "vm1".into();
    let r = start(cfg).await.unwrap();
    let url = format!("tcp://{}", r.control_addr.unwrap());
    for d in &r.disks {
        bounded(d.state.wait_until(|s| s.mode() == Mode::Continuous)).await;
    }
    // One writer goes A[0], B[0], A[1], B[1], ..., each write acknowledged before the next
    // starts: at any one instant, disk A holds k or k + 1 of its blocks when B holds k.
    let (a, b) = (r.disks[0].nbd_addr, r.disks[1].nbd_addr);
    // The writer says where it stands every few blocks, without waiting: a marker is cut at
    // each of these while the writes go on.
    let (progress, mut stands) = mpsc::channel(CHAIN / CUT_EVERY);
    let writer = tokio::spawn(async move {
        let (mut a, mut b) = (NbdClient::connect(a).await, NbdClient::connect(b).await);
        for i in 0..CHAIN {
            a.write(i as u64 * 4096, &chain_block(i)).await;
            b.write(i as u64 * 4096, &chain_block(i)).await;
            if i % CUT_EVERY == 0 {
                let _ = progress.try_send(i);
            }
        }
    });
    let mut ids = Vec::new();
    while let Some(i) = stands.recv().await {
        let cut = Request::Marker {
            disk_id: None,
            kind: Kind::User,
            tag: format!("at-{i}"),
        };
        ids.push(bounded(call(&url, &cut)).await.unwrap().marker_id.unwrap());
    }
    bounded(writer).await.unwrap();
    // The quiesce hook runs once for the whole group.
    let app = Request::Marker {
        disk_id: None,
        kind: Kind::App,
        tag: "app".into(),
    };
    ids.push(bounded(call(&url, &app)).await.unwrap().marker_id.unwrap());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze\nthaw\n");

    let last = ids.last().unwrap().clone();
    for h in [&ha, &hb] {
        bounded(h.wait(|st| st.markers.iter().any(|(m, _)| m.id == last))).await;
    }
    {
        let (sa, sb) = (ha.state.lock().unwrap(), hb.state.lock().unwrap());
        let mut inside = 0;
        for id in &ids {
            let find = |st: &State| {
                st.markers
                    .iter()
                    .find(|(m, _)| &m.id == id)
                    .cloned()
                    .expect("every group marker reached both disks")
            };
            let ((ma, disk_a), (mb, disk_b)) = (find(&sa), find(&sb));
            assert_eq!(ma, mb, "the disks' markers differ");
            assert_eq!(ma.group, "vm1");
            let (ka, kb) = (chain_prefix(&disk_a), chain_prefix(&disk_b));
            assert!(
                ka == kb || ka == kb + 1,
                "marker {id}: disk A holds {ka} chained writes, disk B {kb}: not one instant"
            );
            if 0 < ka && ka < CHAIN {
                inside += 1;
            }
        }
        assert!(inside > 0, "no marker was cut while the writes went on");
    }
    // A marker for one disk of the group is that disk's alone.
    let one = Request::Marker {
        disk_id: Some(DISK_B.into()),
        kind: Kind::User,
        tag: "b-only".into(),
    };
    let id = bounded(call(&url, &one)).await.unwrap().marker_id.unwrap();
    bounded(hb.wait(|st| st.markers.iter().any(|(m, _)| m.id == id))).await;
    let (sa, sb) = (ha.state.lock().unwrap(), hb.state.lock().unwrap());
    let (m, _) = sb.markers.iter().find(|(m, _)| m.id == id).unwrap();
    assert_eq!((m.group.as_str(), m.tag.as_str()), ("", "b-only"));
    assert!(sa.markers.iter().all(|(m, _)| m.id != id));
    assert!(sa.disk == std::fs::read(&path_a).unwrap());
    assert!(sb.disk == std::fs::read(&path_b).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_connections_over_the_cap_are_refused_with_a_reason() {
    use tokio::io::AsyncBufReadExt;
    let (h, _dir, path) = fresh().await;
    let r = start(config(&h.url, &path, None)).await.unwrap();
    let addr = r.control_addr.unwrap();
    // Connections that got their challenge and say nothing hold their slots.
    let mut held = Vec::new();
    for _ in 0..control::MAX_CONNECTIONS {
        let mut c = tokio::io::BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let mut challenge = String::new();
        bounded(c.read_line(&mut challenge)).await.unwrap();
        assert!(challenge.contains("challenge"), "{challenge}");
        held.push(c);
    }
    let url = format!("tcp://{addr}");
    let e = bounded(call(&url, &Request::Status)).await.unwrap_err();
    assert!(
        e.to_string().contains("too many control connections"),
        "{e}"
    );
    // Once they go, clients are served again (as soon as the agent has seen them close).
    drop(held);
    let served = async {
        loop {
            match call(&url, &Request::Status).await {
                Ok(reply) => return reply,
                Err(e) => assert!(e.to_string().contains("too many"), "{e}"),
            }
            tokio::task::yield_now().await;
        }
    };
    assert!(bounded(served).await.disks.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_refreshes_until_interrupted() {
    use tokio::io::AsyncBufReadExt;
    let (h, _dir, path) = fresh().await;
    let r = start(config(&h.url, &path, None)).await.unwrap();
    let addr = r.control_addr.unwrap().to_string();
    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["status", "--connect", &addr, "--json", "--watch", "0.1"])
        .env("FAILBACK_PASSPHRASE", PASS)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        let line = bounded(lines.next_line()).await.unwrap().unwrap();
        let disks: Vec<control::DiskStatus> = serde_json::from_str(&line).unwrap();
        assert_eq!(disks[0].disk_id, DISK);
    }
    let pid = watch.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(bounded(watch.wait()).await.unwrap().success());
}
