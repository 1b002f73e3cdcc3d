//! In-process end to end: a small agent client -> the process server -> a fake master target
//! (implements `MasterTarget`: challenge/auth, applies batches in seq order across
//! connections, acks them).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use protocol::auth::{ClientAuth, Passphrase};
use protocol::batch::BatchBuilder;
use protocol::pb::master_target_server::{MasterTarget, MasterTargetServer};
use protocol::pb::{
    AgentHello, ApplyMessage, ApplyWelcome, DiskProgress, ForwardMessage, ProcessServerMessage,
    agent_message, apply_message, forward_message, process_server_message,
};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Server;

use super::*;
use crate::cache::CacheConfig;
use crate::forward::ForwardConfig;

const PASS: &str = "a test passphrase";

#[derive(Default)]
struct Applied {
    applied: u64,
    early: BTreeSet<u64>,
    order: Vec<u64>,
}

#[derive(Clone)]
struct FakeMt {
    auth: Arc<ServerAuth>,
    disks: Arc<parking_lot::Mutex<HashMap<String, Applied>>>,
    /// While `false`, batches are not read (the master target is stuck).
    gate: Arc<watch::Sender<bool>>,
}

impl FakeMt {
    fn new() -> Self {
        FakeMt {
            auth: Arc::new(ServerAuth::new(Passphrase::new(PASS).unwrap())),
            disks: Arc::default(),
            gate: Arc::new(watch::Sender::new(true)),
        }
    }

    fn progress(&self, id: &str) -> DiskProgress {
        let applied = self.disks.lock().entry(id.to_string()).or_default().applied;
        DiskProgress {
            disk_id: id.to_string(),
            cached_seq: applied,
            applied_seq: applied,
        }
    }

    /// Applies `seq` (or holds it until its predecessors came); returns the applied seq.
    fn apply(&self, id: &str, seq: u64) -> u64 {
        let mut m = self.disks.lock();
        let d = m.entry(id.to_string()).or_default();
        if seq > d.applied {
            d.early.insert(seq);
        }
        while d.early.remove(&(d.applied + 1)) {
            d.applied += 1;
            let a = d.applied;
            d.order.push(a);
        }
        d.applied
    }

    fn applied_order(&self, id: &str) -> Vec<u64> {
        self.disks
            .lock()
            .get(id)
            .map(|d| d.order.clone())
            .unwrap_or_default()
    }
}

fn msg(body: apply_message::Body) -> Result<ApplyMessage, tonic::Status> {
    Ok(ApplyMessage { body: Some(body) })
}

#[tonic::async_trait]
impl MasterTarget for FakeMt {
    async fn challenge(
        &self,
        _: tonic::Request<ChallengeRequest>,
    ) -> Result<tonic::Response<ChallengeReply>, tonic::Status> {
        Ok(tonic::Response::new(ChallengeReply {
            server_nonce: self.auth.challenge().into(),
        }))
    }

    type ApplyStream = ReceiverStream<Result<ApplyMessage, tonic::Status>>;

    async fn apply(
        &self,
        request: tonic::Request<tonic::Streaming<ForwardMessage>>,
    ) -> Result<tonic::Response<Self::ApplyStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let mt = self.clone();
        tokio::spawn(async move {
            let Ok(Some(ForwardMessage {
                body: Some(forward_message::Body::Hello(h)),
            })) = inbound.message().await
            else {
                return;
            };
            let Ok(proof) = mt.auth.verify(h.auth.as_ref()) else {
                return;
            };
            let disks = h.disks.iter().map(|d| mt.progress(&d.disk_id)).collect();
            let welcome = apply_message::Body::Welcome(ApplyWelcome {
                server_proof: proof.into(),
                disks,
            });
            if tx.send(msg(welcome)).await.is_err() {
                return;
            }
            let mut gate = mt.gate.subscribe();
            loop {
                if gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let Ok(Some(m)) = inbound.message().await else {
                    return;
                };
                let reply = match m.body {
                    Some(forward_message::Body::Batch(b)) => {
                        protocol::batch::check(&b, 1 << 30).expect("forwarded batch is intact");
                        let applied = mt.apply(&b.disk_id, b.seq);
                        apply_message::Body::Ack(DiskProgress {
                            disk_id: b.disk_id,
                            cached_seq: applied,
                            applied_seq: applied,
                        })
                    }
                    Some(forward_message::Body::AddDisk(d)) => {
                        apply_message::Body::DiskAdded(mt.progress(&d.disk_id))
                    }
                    _ => return,
                };
                if tx.send(msg(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in the fake"))
    }
}

async fn start_fake_mt(mt: FakeMt) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(MasterTargetServer::new(mt))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

fn settings(cache: &Path, mt_url: &str, quota: u64) -> Settings {
    let pass = Passphrase::new(PASS).unwrap();
    Settings {
        listen: "127.0.0.1:0".into(),
        cache: CacheConfig {
            dir: cache.to_path_buf(),
            segment_size: 16 << 10,
            quota,
            high_water_percent: 50,
        },
        forward: ForwardConfig {
            url: mt_url.into(),
            tuning: WanTuning::default(),
            tls: TlsFiles::default(),
            auth: ClientAuth::new(pass.clone(), "ps-test"),
            connections: 3,
            window: 64 << 10,
        },
        tuning: WanTuning::default(),
        tls: TlsFiles::default(),
        auth_passphrase: pass,
        identity: "ps-test".into(),
    }
}

struct Running {
    url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

async fn start_server(cache: &Path, mt_url: &str) -> Running {
    start_server_with_quota(cache, mt_url, 1 << 30).await
}

async fn start_server_with_quota(cache: &Path, mt_url: &str, quota: u64) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_on(settings(cache, mt_url, quota), listener, async {
        let _ = stop_rx.await;
    }));
    Running { url, stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

fn disk_info() -> protocol::pb::DiskInfo {
    protocol::pb::DiskInfo {
        disk_id: "disk-1".into(),
        name: "vm1_disk1".into(),
        capacity: 1 << 30,
        format: 0,
        group: String::new(),
    }
}

/// Incompressible bytes (xorshift), so records have a predictable size.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A minimal agent: hello, then batches `seqs`; returns the welcome and the message stream.
struct Agent {
    tx: mpsc::Sender<AgentMessage>,
    rx: tonic::Streaming<ProcessServerMessage>,
    welcome: DiskProgress,
    /// The latest ack (cumulative).
    last: DiskProgress,
    /// `paused` of every pause message seen.
    pauses: Vec<bool>,
}

async fn agent(url: &str) -> Agent {
    let auth = ClientAuth::new(Passphrase::new(PASS).unwrap(), "agent-test");
    let mut client =
        protocol::client::process_server(url, &WanTuning::default(), &TlsFiles::default())
            .await
            .unwrap();
    let pending = protocol::client::begin_auth(&mut client, &auth)
        .await
        .unwrap();
    let (tx, out) = mpsc::channel(64);
    tx.send(AgentMessage {
        body: Some(agent_message::Body::Hello(AgentHello {
            auth: Some(pending.auth.clone()),
            disks: vec![disk_info()],
        })),
    })
    .await
    .unwrap();
    let mut rx = client
        .replicate(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    let first = rx.message().await.unwrap().unwrap();
    let Some(process_server_message::Body::Welcome(w)) = first.body else {
        panic!("expected welcome, got {first:?}");
    };
    auth.verify_server(&pending, &w.server_proof).unwrap();
    Agent {
        tx,
        rx,
        welcome: w.disks[0].clone(),
        last: w.disks[0].clone(),
        pauses: Vec::new(),
    }
}

impl Agent {
    async fn send(&self, seqs: std::ops::RangeInclusive<u64>) {
        let mut b = BatchBuilder::new();
        for s in seqs {
            b.push_write(s * 4096, &noise(s, 3000));
            let batch = b.finish("disk-1", s, protocol::now_unix_ms(), 0);
            self.tx
                .send(AgentMessage {
                    body: Some(agent_message::Body::Batch(batch)),
                })
                .await
                .unwrap();
        }
    }

    /// Reads until the latest ack satisfies `done`; returns it.
    async fn until(&mut self, done: impl Fn(&DiskProgress) -> bool) -> DiskProgress {
        while !done(&self.last) {
            self.next_message().await;
        }
        self.last.clone()
    }

    /// Reads until a pause message with `paused`.
    async fn until_pause(&mut self, paused: bool) {
        while self.pauses.last() != Some(&paused) {
            self.next_message().await;
        }
    }

    /// Reads until an error; returns its code.
    async fn until_error(&mut self) -> u32 {
        loop {
            if let Some(code) = self.next_message().await {
                return code;
            }
        }
    }

    /// Reads one message: an ack updates `last`, a pause is recorded in `pauses`, an error's
    /// code is returned.
    async fn next_message(&mut self) -> Option<u32> {
        let m = self.rx.message().await.unwrap().expect("stream open");
        match m.body {
            Some(process_server_message::Body::Ack(p)) => {
                assert!(p.applied_seq <= p.cached_seq);
                assert!(
                    p.cached_seq >= self.last.cached_seq && p.applied_seq >= self.last.applied_seq
                );
                self.last = p;
            }
            Some(process_server_message::Body::Pause(p)) => self.pauses.push(p.paused),
            Some(process_server_message::Body::Error(e)) => return Some(e.code),
            other => panic!("unexpected {other:?}"),
        }
        None
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
        a.until_error().await,
        protocol::error::Code::OutOfSequence.value()
    );
    drop(a);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_batches_survive_a_restart_and_are_forwarded_later() {
    let cache = tempfile::tempdir().unwrap();
    let mt = FakeMt::new();
    let mt_url = start_fake_mt(mt.clone()).await;
    // First run: register the disk, then lose the master target.
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
    let p = a.until(|p| p.cached_seq == 12).await;
    assert_eq!(p.applied_seq, 0);
    drop(a);
    server.stop().await;

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
