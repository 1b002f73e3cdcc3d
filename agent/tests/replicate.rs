//! `agent replicate` end to end in-process: the NBD export on 127.0.0.1:0 driven by
//! `qemu-io`/`qemu-img`, against a fake process server on 127.0.0.1:0 that applies the
//! batches it receives, in seq order, to a copy of the target disk and snapshots it at each
//! marker. The tests check that the rebuilt disk equals the source file, that a marker
//! follows every write acknowledged before its flush, and the control API.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::control::{self, Kind, Request};
use agent::replicate::{Mode, ReplicateConfig, Replication, start};
use agent::session::Target;
use agent::sync::disk_info;
use protocol::auth::{ClientAuth, Passphrase, ServerAuth};
use protocol::batch::{decode_into, flags};
use protocol::limits::MAX_MESSAGE_BYTES;
use protocol::pb::agent_message::Body as AgentBody;
use protocol::pb::differential_server::{Differential, DifferentialServer};
use protocol::pb::process_server_message::Body as ServerBody;
use protocol::pb::process_server_server::{ProcessServer, ProcessServerServer};
use protocol::pb::{
    AgentMessage, ChallengeReply, ChallengeRequest, DiskFormat, DiskHashes, DiskHashesRequest,
    DiskProgress, Marker, Pause, ProcessServerMessage, ServerWelcome, StatusReply, StatusRequest,
};
use protocol::transport::{TlsFiles, WanTuning};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

const PASS: &str = "a test passphrase";
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
}

struct Fake {
    auth: Arc<ServerAuth>,
    state: Arc<Mutex<State>>,
    stored: Arc<Notify>,
    /// Intake paused (sent to the agent as `Pause` messages).
    paused: tokio::sync::watch::Receiver<bool>,
}

type Reply = Result<ProcessServerMessage, Status>;

fn msg(body: ServerBody) -> Reply {
    Ok(ProcessServerMessage { body: Some(body) })
}

#[tonic::async_trait]
impl ProcessServer for Fake {
    async fn challenge(
        &self,
        _: GrpcRequest<ChallengeRequest>,
    ) -> Result<Response<ChallengeReply>, Status> {
        Ok(Response::new(ChallengeReply {
            server_nonce: self.auth.challenge().into(),
        }))
    }

    type ReplicateStream = ReceiverStream<Reply>;

    async fn replicate(
        &self,
        req: GrpcRequest<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
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
        tx.send(msg(ServerBody::Welcome(ServerWelcome {
            server_proof: proof.into(),
            disks: vec![DiskProgress {
                disk_id: disk.disk_id.clone(),
                cached_seq: cached,
                applied_seq: cached,
            }],
        })))
        .await
        .ok();
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
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Ok(Some(m)) = inbound.message().await {
                let Some(AgentBody::Batch(b)) = m.body else {
                    continue;
                };
                let seq = {
                    let mut st = state.lock().unwrap();
                    assert_eq!(b.seq, st.cached_seq + 1, "batches arrive in seq order");
                    let d = decode_into(&b, disk.capacity, &mut buf).expect("a valid batch");
                    for (off, data) in d.writes() {
                        st.disk[off as usize..off as usize + data.len()].copy_from_slice(data);
                    }
                    for z in &b.zeros {
                        st.disk[z.offset as usize..(z.offset + z.length) as usize].fill(0);
                    }
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
                let ack = DiskProgress {
                    disk_id: b.disk_id.clone(),
                    cached_seq: seq,
                    applied_seq: seq,
                };
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
        let mut hashes = Vec::new();
        let mut zeros = vec![0u8; (end.saturating_sub(r.first_chunk) as usize).div_ceil(8)];
        for (i, c) in (r.first_chunk..end).enumerate() {
            let from = c as usize * chunk;
            let data = &st.disk[from..(from + chunk).min(st.disk.len())];
            if data.iter().all(|&b| b == 0) {
                zeros[i / 8] |= 1 << (i % 8);
                hashes.extend_from_slice(&[0u8; 16]);
            } else {
                hashes.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(data).to_le_bytes());
            }
        }
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
        let hashes = DifferentialServer::new(FakeHashes {
            auth: auth.clone(),
            state: state.clone(),
        });
        let stored = Arc::new(Notify::new());
        let (pause, paused) = tokio::sync::watch::channel(false);
        let fake = Fake {
            auth,
            state: state.clone(),
            stored: stored.clone(),
            paused,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let svc = ProcessServerServer::new(fake)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        tokio::spawn(
            WanTuning::default()
                .server(&TlsFiles::default())
                .unwrap()
                .add_service(svc)
                .add_service(hashes)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Harness {
            url,
            state,
            stored,
            pause,
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

fn config(url: &str, disk: &std::path::Path, quiesce: Option<String>) -> ReplicateConfig {
    ReplicateConfig {
        target: Target {
            url: url.to_string(),
            tuning: WanTuning::default(),
            tls: TlsFiles::default(),
            auth: ClientAuth::new(Passphrase::new(PASS).unwrap(), "test-agent"),
            disk: disk_info(DISK, "vm1_disk0", DiskFormat::Vmfs),
            heartbeat: Duration::from_secs(5),
        },
        disk: disk.to_path_buf(),
        nbd_listen: "127.0.0.1:0".into(),
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
async fn qemu_io(r: &Replication, cmds: &[&str]) {
    let mut c = tokio::process::Command::new("qemu-io");
    c.args(["-f", "raw", &format!("nbd://{}", r.nbd_addr)]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.output().await.expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io {cmds:?}: {text}");
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
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
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = source_disk(dir.path());
    let r = start(config(&h.url, &path, None)).await.unwrap();
    bounded(r.state.wait_until(|s| s.mode() == Mode::Continuous)).await;
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
    bounded(qemu_io(
        &r,
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
    // Reads through the export see the file.
    let out = bounded(
        tokio::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(format!("nbd://{}", r.nbd_addr))
            .arg(&path)
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_the_initial_pass_are_caught_up() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = source_disk(dir.path());
    let mut cfg = config(&h.url, &path, None);
    // A small window keeps the pass going while the writes arrive.
    cfg.window_bytes = 64 << 10;
    let r = start(cfg).await.unwrap();
    bounded(qemu_io(
        &r,
        &[
            "write -P 0x21 0 64k",
            "write -P 0x22 6M 1M",
            "write -z 8k 4k",
            "flush",
        ],
    ))
    .await;
    bounded(r.state.wait_until(|s| s.mode() == Mode::Continuous)).await;
    // One more write and flush, so that there is a marker to wait for.
    bounded(qemu_io(&r, &["write -P 0x23 4M 4k", "flush"])).await;
    let after = std::fs::read(&path).unwrap();
    bounded(h.wait(|st| st.markers.last().is_some_and(|m| m.1 == after))).await;
    assert!(h.state.lock().unwrap().disk == after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_cuts_markers_and_reports_status() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = source_disk(dir.path());
    let log = dir.path().join("hook.log");
    let r = start(config(
        &h.url,
        &path,
        Some(format!("echo >> {}", log.display())),
    ))
    .await
    .unwrap();
    let url = format!("tcp://{}", r.control_addr.unwrap());
    bounded(r.state.wait_until(|s| s.mode() == Mode::Continuous)).await;

    let user = Request::Marker {
        disk_id: DISK.into(),
        kind: Kind::User,
        tag: "before-upgrade".into(),
    };
    let id = bounded(control::call(&url, &client(), &user))
        .await
        .unwrap()
        .marker_id
        .unwrap();
    let app = Request::Marker {
        disk_id: DISK.into(),
        kind: Kind::App,
        tag: String::new(),
    };
    bounded(control::call(&url, &client(), &app)).await.unwrap();
    bounded(h.wait(|st| markers(st) >= 2)).await;
    {
        let st = h.state.lock().unwrap();
        assert_eq!(st.markers[0].0.id, id);
        assert_eq!(st.markers[0].0.tag, "before-upgrade");
        assert_eq!(st.markers[1].0.kind, protocol::pb::MarkerKind::App as i32);
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze\nthaw\n");

    let status = bounded(control::call(&url, &client(), &Request::Status))
        .await
        .unwrap();
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
            disk_id: "other".into(),
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
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = source_disk(dir.path());
    let r = start(config(&h.url, &path, Some("false".into())))
        .await
        .unwrap();
    let url = format!("{}", r.control_addr.unwrap());
    bounded(r.state.wait_until(|s| s.mode() == Mode::Continuous)).await;
    let app = Request::Marker {
        disk_id: DISK.into(),
        kind: Kind::App,
        tag: String::new(),
    };
    let e = bounded(control::call(&url, &client(), &app))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("freeze"), "{e}");
    let status = bounded(control::call(&url, &client(), &Request::Status))
        .await
        .unwrap();
    let d = &status.disks.unwrap()[0];
    assert!(d.last_error.as_ref().unwrap().contains("freeze"));
    assert!(d.last_marker.is_none());
    // A crash marker still works and is the first marker the target sees.
    let crash = Request::Marker {
        disk_id: DISK.into(),
        kind: Kind::Crash,
        tag: String::new(),
    };
    bounded(control::call(&url, &client(), &crash))
        .await
        .unwrap();
    bounded(h.wait(|st| markers(st) >= 1)).await;
    let st = h.state.lock().unwrap();
    assert_eq!(st.markers.len(), 1);
    assert_eq!(st.markers[0].0.kind, protocol::pb::MarkerKind::Crash as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_process_server_turns_writes_into_a_bitmap_then_a_resync() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = source_disk(dir.path());
    let mut cfg = config(&h.url, &path, None);
    // Patterned writes compress to almost nothing: a one-batch window fills all the same.
    cfg.window_bytes = 1;
    let r = start(cfg).await.unwrap();
    bounded(r.state.wait_until(|s| s.mode() == Mode::Continuous)).await;
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
        &r,
        &[
            "write -P 0x31 0 1M",
            "write -P 0x32 2M 1M",
            "write -P 0x33 4M 1M",
            "flush",
            "write -P 0x34 6M 512k",
        ],
    ))
    .await;
    bounded(r.state.wait_until(|s| s.mode() == Mode::Bitmap)).await;
    h.pause.send(false).unwrap();
    bounded(h.wait(|st| resync_ends(st) >= 2)).await;
    bounded(r.state.wait_until(|s| s.mode() == Mode::Continuous)).await;
    bounded(qemu_io(&r, &["write -P 0x35 7M 4k", "flush"])).await;
    let after = std::fs::read(&path).unwrap();
    bounded(h.wait(|st| st.markers.last().is_some_and(|m| m.1 == after))).await;
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
    bounded(r.state.wait_until(|s| s.mode() == Mode::Continuous)).await;
    bounded(h.wait(|st| st.stored.iter().any(|(_, f)| f & flags::RESYNC_END != 0))).await;
    let st = h.state.lock().unwrap();
    assert!(st.disk == content, "the target differs from the source");
    // One 64 KiB chunk fits in one batch, closed by the (empty) last batch of the interval.
    assert!(st.stored.len() <= 2, "sent {:?}", st.stored);
}
