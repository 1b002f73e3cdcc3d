//! `agent sync --mode full` against an in-process fake process server on 127.0.0.1:0.
//!
//! The fake follows `docs/internals.md` hop 1 strictly (challenge/auth, welcome, next seq
//! only, cumulative acks) and rebuilds the disk from the batches it receives, so the tests
//! can compare the result with the source byte for byte. Scripted faults: a stream dropped
//! once mid-transfer (after storing a batch, before acking it), a refusal of the hello, and
//! a pause.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::session::SessionError;
use agent::sync::{SyncConfig, SyncError, run};
use common::{PASS, Reply, apply, challenge, hash_page, msg, progress, serve, target, welcome};
use protocol::auth::{Passphrase, ServerAuth};
use protocol::batch::flags;
use protocol::error::{Code, Refusal};
use protocol::pb::agent_message::Body as AgentBody;
use protocol::pb::differential_server::Differential;
use protocol::pb::process_server_message::Body as ServerBody;
use protocol::pb::process_server_server::ProcessServer;
use protocol::pb::{
    AgentMessage, ChallengeReply, ChallengeRequest, DiskHashes, DiskHashesRequest, Marker, Pause,
    StatusReply, StatusRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const DISK: &str = "6000C29a-test";
/// Batches already on the wire when a pause is sent may still arrive within this time.
const PAUSE_GRACE: Duration = Duration::from_millis(100);

/// What the fake process server holds and saw.
#[derive(Debug, Default)]
struct State {
    /// The target disk, rebuilt from batches; starts as garbage so that a missing zero
    /// extent shows.
    disk: Vec<u8>,
    cached_seq: u64,
    /// Seqs in the order they were stored (each once).
    stored: Vec<u64>,
    markers: Vec<Marker>,
    last_flags: u32,
    connections: u32,
    /// Seqs received more than once (resends after a reconnect).
    duplicates: u32,
    /// When the pause was sent and lifted, and the seqs received while paused (after a
    /// grace period for what was already in flight).
    paused_at: Option<Instant>,
    unpaused_at: Option<Instant>,
    sent_while_paused: Vec<u64>,
    heartbeats_while_paused: u32,
}

#[derive(Debug, Default, Clone)]
struct Script {
    /// Drop the stream once, after storing this many batches of the pass (the last unacked).
    drop_after: Option<usize>,
    /// Answer the first hello(s) with this refusal.
    refuse: Option<(Code, u32)>,
    /// Pause intake for this long right after the first welcome.
    pause_for: Option<Duration>,
}

struct Fake {
    auth: Arc<ServerAuth>,
    state: Arc<Mutex<State>>,
    script: Mutex<Script>,
}

#[tonic::async_trait]
impl ProcessServer for Fake {
    async fn challenge(
        &self,
        _: Request<ChallengeRequest>,
    ) -> Result<Response<ChallengeReply>, Status> {
        challenge(&self.auth)
    }

    type ReplicateStream = ReceiverStream<Reply>;

    async fn replicate(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let first = inbound.message().await?.and_then(|m| m.body);
        let Some(AgentBody::Hello(hello)) = first else {
            return Err(Status::invalid_argument("first message must be hello"));
        };
        let proof = match self.auth.verify(hello.auth.as_ref()) {
            Ok(p) => p,
            Err(r) => {
                tx.send(msg(ServerBody::Error(r.to_report()))).await.ok();
                return Ok(Response::new(ReceiverStream::new(rx)));
            }
        };
        let (script, refusal) = {
            let mut s = self.script.lock().unwrap();
            let refusal = s.refuse.map(|(code, n)| {
                s.refuse = (n > 1).then_some((code, n - 1));
                Refusal::for_disk(code, DISK, "scripted refusal")
            });
            let script = s.clone();
            // Faults happen once: later connections run clean.
            s.pause_for = None;
            s.drop_after = None;
            (script, refusal)
        };
        if let Some(r) = refusal {
            tx.send(msg(ServerBody::Error(r.to_report()))).await.ok();
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let disk = &hello.disks[0];
        let cached = {
            let mut st = self.state.lock().unwrap();
            st.connections += 1;
            if st.disk.is_empty() {
                st.disk = vec![0xA5; disk.capacity as usize];
            }
            st.cached_seq
        };
        tx.send(welcome(proof, &disk.disk_id, cached)).await.ok();
        let state = self.state.clone();
        if let Some(d) = script.pause_for {
            pause(&tx, d, state.clone());
        }
        let capacity = disk.capacity;
        tokio::spawn(serve_stream(
            inbound,
            tx,
            state,
            capacity,
            script.drop_after,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

/// Pauses intake now and lifts the pause after `d`.
fn pause(tx: &mpsc::Sender<Reply>, d: Duration, state: Arc<Mutex<State>>) {
    let tx = tx.clone();
    tokio::spawn(async move {
        let body = |paused| {
            msg(ServerBody::Pause(Pause {
                paused,
                reason: "cache above its high-water mark".into(),
            }))
        };
        state.lock().unwrap().paused_at = Some(Instant::now());
        tx.send(body(true)).await.ok();
        tokio::time::sleep(d).await;
        state.lock().unwrap().unpaused_at = Some(Instant::now());
        tx.send(body(false)).await.ok();
    });
}

/// Stores batches in seq order and acks each; with `drop_after = N`, stores N batches,
/// leaves the Nth unacked, and ends the stream when the next batch arrives.
async fn serve_stream(
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Reply>,
    state: Arc<Mutex<State>>,
    capacity: u64,
    drop_after: Option<usize>,
) {
    let mut buf = Vec::new();
    let mut stored_here = 0usize;
    while let Ok(Some(m)) = inbound.message().await {
        let b = match m.body {
            Some(AgentBody::Batch(b)) => b,
            Some(AgentBody::Heartbeat(_)) => {
                let mut st = state.lock().unwrap();
                if st.paused_at.is_some() && st.unpaused_at.is_none() {
                    st.heartbeats_while_paused += 1;
                }
                continue;
            }
            _ => continue,
        };
        let ack = {
            let mut st = state.lock().unwrap();
            if st.unpaused_at.is_none() && st.paused_at.is_some_and(|t| t.elapsed() > PAUSE_GRACE) {
                st.sent_while_paused.push(b.seq);
            }
            if Some(stored_here) == drop_after {
                // The batch after the last stored one arrived: drop the stream, so this one
                // (and any behind it) must be resent and the unacked stored one must not.
                Err(None)
            } else if b.seq <= st.cached_seq {
                st.duplicates += 1;
                Ok(Some(st.cached_seq))
            } else if b.seq != st.cached_seq + 1 {
                Err(Some(Refusal::for_disk(
                    Code::OutOfSequence,
                    DISK,
                    format!("seq {}", b.seq),
                )))
            } else {
                apply(&mut st.disk, &b, capacity, &mut buf);
                st.markers.extend(b.markers.iter().cloned());
                st.last_flags = b.flags;
                st.cached_seq = b.seq;
                st.stored.push(b.seq);
                stored_here += 1;
                Ok((Some(stored_here) != drop_after).then_some(b.seq))
            }
        };
        let seq = match ack {
            Ok(Some(seq)) => seq,
            Ok(None) => continue,
            // Scripted drop: end the stream.
            Err(None) => return,
            Err(Some(r)) => {
                tx.send(msg(ServerBody::Error(r.to_report()))).await.ok();
                return;
            }
        };
        let p = progress(&b.disk_id, seq);
        if tx.send(msg(ServerBody::Ack(p))).await.is_err() {
            return;
        }
    }
}

/// The fake's `Differential` service: hashes of its rebuilt disk, at most [`PAGE_MAX`]
/// chunks per page (so that several pages are needed); `exists = false` while it holds no
/// disk.
struct FakeHashes {
    auth: Arc<ServerAuth>,
    state: Arc<Mutex<State>>,
}

const PAGE_MAX: u64 = 100;

#[tonic::async_trait]
impl Differential for FakeHashes {
    async fn disk_hashes(
        &self,
        req: Request<DiskHashesRequest>,
    ) -> Result<Response<DiskHashes>, Status> {
        let r = req.into_inner();
        let proof = self
            .auth
            .verify(r.auth.as_ref())
            .map_err(|e| e.to_status())?;
        let st = self.state.lock().unwrap();
        let mut reply = DiskHashes {
            server_proof: proof.into(),
            exists: !st.disk.is_empty(),
            first_chunk: r.first_chunk,
            chunk_size: r.chunk_size,
            ..DiskHashes::default()
        };
        let chunk = r.chunk_size as usize;
        let total = st.disk.len().div_ceil(chunk.max(1)) as u64;
        let end = (r.first_chunk + u64::from(r.max_chunks).min(PAGE_MAX)).min(total);
        let (hashes, zeros) = hash_page(&st.disk, r.first_chunk, end, chunk);
        reply.hashes = hashes.into();
        reply.zero_chunks = zeros.into();
        Ok(Response::new(reply))
    }
}

async fn start_fake(script: Script, cached_seq: u64) -> (String, Arc<Mutex<State>>) {
    start_fake_holding(script, cached_seq, Vec::new()).await
}

/// A fake whose target disk already holds `disk` (empty: no disk yet).
async fn start_fake_holding(
    script: Script,
    cached_seq: u64,
    disk: Vec<u8>,
) -> (String, Arc<Mutex<State>>) {
    let state = Arc::new(Mutex::new(State {
        cached_seq,
        disk,
        ..State::default()
    }));
    let auth = Arc::new(ServerAuth::new(Passphrase::new(PASS).unwrap()));
    let hashes = FakeHashes {
        auth: auth.clone(),
        state: state.clone(),
    };
    let fake = Fake {
        auth,
        state: state.clone(),
        script: Mutex::new(script),
    };
    let url = serve(fake, hashes).await;
    (url, state)
}

/// A 6 MiB source: data, written zeros, a hole, more data, and a data tail.
fn source_disk() -> (tempfile::NamedTempFile, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let cap = 6 << 20;
    let mut content = vec![0u8; cap];
    for (i, b) in content[..(1 << 20)].iter_mut().enumerate() {
        *b = (i * 7 % 253) as u8 + 1;
    }
    for (i, b) in content[(3 << 20)..(3 << 20) + 1_500_000]
        .iter_mut()
        .enumerate()
    {
        *b = (i % 97) as u8;
    }
    content[cap - 512..].fill(0xEE);
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(cap as u64).unwrap();
    f.as_file().write_all_at(&content[..2 << 20], 0).unwrap();
    f.as_file()
        .write_all_at(&content[3 << 20..], 3 << 20)
        .unwrap();
    (f, content)
}

fn config(url: &str, disk: &std::path::Path) -> SyncConfig {
    SyncConfig {
        target: target(url, DISK),
        disk: disk.to_path_buf(),
        marker_tag: Some("after-sync".into()),
        wait: true,
        window_bytes: 256 << 10,
        batch_data: 64 << 10,
        retry_for: Duration::from_secs(10),
        differential: None,
    }
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("the sync finished in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_survives_a_dropped_stream_and_rebuilds_the_disk() {
    let (url, state) = start_fake(
        Script {
            drop_after: Some(10),
            ..Script::default()
        },
        41,
    )
    .await;
    let (file, content) = source_disk();
    let summary = bounded(run(config(&url, file.path()))).await.unwrap();

    let st = state.lock().unwrap();
    assert_eq!(st.connections, 2, "one reconnect");
    assert_eq!(summary.first_seq, 42, "seqs continue after the cached ones");
    let expected: Vec<u64> = (42..=summary.last_seq).collect();
    assert_eq!(st.stored, expected, "every seq stored once, in order");
    assert!(
        st.disk == content,
        "the rebuilt disk differs from the source"
    );
    assert_eq!(st.last_flags, flags::RESYNC | flags::RESYNC_END);
    assert_eq!(st.markers.len(), 1);
    assert_eq!(st.markers[0].tag, "after-sync");
    assert!(summary.applied);
    assert!(summary.resent_bytes > 0, "what was in flight is resent");
    assert_eq!(
        st.duplicates, 0,
        "nothing the welcome said was stored is resent"
    );
    assert_eq!(summary.data_bytes + summary.zero_bytes, 6 << 20);
    assert!(summary.read_bytes < 6 << 20, "the hole is not read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retryable_refusal_ends_the_sync_with_its_code() {
    let (url, state) = start_fake(
        Script {
            refuse: Some((Code::DiskConflict, 1)),
            ..Script::default()
        },
        0,
    )
    .await;
    let (file, _) = source_disk();
    let err = bounded(run(config(&url, file.path()))).await.unwrap_err();
    assert!(
        matches!(
            &err,
            SyncError::Session(SessionError::Refused(r)) if r.code == Code::DiskConflict
        ),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("error 8: scripted refusal"));
    assert!(state.lock().unwrap().stored.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_refusal_is_retried_until_it_clears() {
    let (url, state) = start_fake(
        Script {
            refuse: Some((Code::Unavailable, 2)),
            ..Script::default()
        },
        0,
    )
    .await;
    let (file, content) = source_disk();
    let summary = bounded(run(config(&url, file.path()))).await.unwrap();
    assert_eq!(summary.first_seq, 1);
    assert!(state.lock().unwrap().disk == content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_process_server_is_given_up_after_retry_for() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let (file, _) = source_disk();
    let mut cfg = config(&url, file.path());
    cfg.retry_for = Duration::from_millis(400);
    // `bounded` fails the test if giving up hangs; no wall-clock figure is asserted.
    let err = bounded(run(cfg)).await.unwrap_err();
    assert!(matches!(err, SyncError::GaveUp(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("error 95226: cannot reach process server {url}")),
        "{text}"
    );
    assert!(text.contains("gave up after"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_paused_no_batch_is_sent_but_heartbeats_go_on() {
    let (url, state) = start_fake(
        Script {
            pause_for: Some(Duration::from_millis(500)),
            ..Script::default()
        },
        0,
    )
    .await;
    let (file, content) = source_disk();
    let mut cfg = config(&url, file.path());
    cfg.target.heartbeat = Duration::from_millis(50);
    bounded(run(cfg)).await.unwrap();
    let st = state.lock().unwrap();
    assert!(st.unpaused_at.is_some());
    assert!(
        st.sent_while_paused.is_empty(),
        "sent while paused: {:?}",
        st.sent_while_paused
    );
    assert!(
        st.heartbeats_while_paused >= 3,
        "heartbeats go on while paused"
    );
    assert!(st.disk == content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_sync_sends_only_the_chunks_that_differ() {
    let (file, content) = source_disk();
    let chunk = 4096usize;
    // The target: the source with three chunks different (one changed, one holding data
    // where the source has zeros, one zero where the source has data), the last one in a
    // later page of hashes.
    let mut target = content.clone();
    target[5 * chunk + 17] ^= 0xff;
    target[(2 << 20) + 3 * chunk..(2 << 20) + 4 * chunk].fill(7);
    target[(1000 * chunk)..(1001 * chunk)].fill(0);
    assert!(content[1000 * chunk..1001 * chunk].iter().any(|&b| b != 0));
    let (url, state) = start_fake_holding(Script::default(), 0, target).await;
    let mut cfg = config(&url, file.path());
    cfg.differential = Some(chunk as u32);
    let summary = bounded(run(cfg)).await.unwrap();
    let st = state.lock().unwrap();
    assert!(st.disk == content, "the target differs from the source");
    assert_eq!(summary.differential, Some(((6 << 20) / chunk as u64, 3)));
    assert_eq!(summary.data_bytes + summary.zero_bytes, 3 * chunk as u64);
    assert_eq!(st.last_flags, flags::RESYNC | flags::RESYNC_END);
    assert_eq!(st.markers.len(), 1, "the user marker closes the pass");
    assert!(summary.to_string().starts_with("differential sync done"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_sync_falls_back_to_full_when_the_target_has_no_disk() {
    let (file, content) = source_disk();
    let (url, state) = start_fake(Script::default(), 0).await;
    let mut cfg = config(&url, file.path());
    cfg.differential = Some(65536);
    let summary = bounded(run(cfg)).await.unwrap();
    assert!(state.lock().unwrap().disk == content);
    assert_eq!(summary.differential, None);
    assert_eq!(summary.data_bytes + summary.zero_bytes, 6 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_differential_sync_of_5_percent_changed_blocks_sends_about_that_much() {
    let (file, content) = source_disk();
    let block = 4096usize;
    let blocks = content.len() / block;
    // 5 % of the blocks, scattered, made different on the target.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut changed = std::collections::BTreeSet::new();
    while changed.len() < blocks * 5 / 100 {
        changed.insert(next() as usize % blocks);
    }
    let mut target = content.clone();
    for &b in &changed {
        for byte in &mut target[b * block..(b + 1) * block] {
            *byte = next() as u8 | 1;
        }
    }
    let changed_bytes = (changed.len() * block) as u64;
    let (url, state) = start_fake_holding(Script::default(), 0, target).await;
    let mut cfg = config(&url, file.path());
    cfg.differential = Some(block as u32);
    let summary = bounded(run(cfg)).await.unwrap();
    assert!(
        state.lock().unwrap().disk == content,
        "the target differs from the source"
    );
    let sent = summary.data_bytes + summary.zero_bytes;
    let hashes = blocks as u64 * 16;
    eprintln!(
        "5% differential: {} blocks changed ({changed_bytes} bytes), {sent} bytes sent \
         ({} data, {} zero), {} wire bytes, {hashes} bytes of hashes, disk {} bytes",
        changed.len(),
        summary.data_bytes,
        summary.zero_bytes,
        summary.wire_bytes,
        content.len()
    );
    assert_eq!(
        summary.differential,
        Some((blocks as u64, changed.len() as u64))
    );
    assert!(
        sent * 10 <= changed_bytes * 11,
        "{sent} > 1.1 x {changed_bytes}"
    );
    assert!(
        summary.wire_bytes * 10 <= changed_bytes * 11 + hashes * 10,
        "{} wire bytes",
        summary.wire_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_json_lines_with_log_format_json() {
    let (file, content) = source_disk();
    let (url, state) = start_fake(Script::default(), 0).await;
    let out = bounded(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["sync", "--process-server", &url, "--disk"])
            .arg(file.path())
            .args([
                "--disk-id",
                DISK,
                "--name",
                "vm1_disk0",
                "--log-format",
                "json",
            ])
            .env("FAILBACK_PASSPHRASE", PASS)
            .env_remove("RUST_LOG")
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(state.lock().unwrap().disk == content);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("sync done"));
}
