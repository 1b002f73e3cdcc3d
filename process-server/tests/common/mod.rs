//! Test doubles shared by the in-process server tests (`src/server/tests.rs`, which includes
//! this file) and the failpoint tests: a fake master target (implements `MasterTarget`:
//! challenge/auth, applies batches in seq order across connections, acks them) and a minimal
//! agent client. Both speak only the public protocol, so they serve the real binary too.
//! Also: where a record lies in a cache directory, to damage it.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::auth::{ClientAuth, Passphrase, ServerAuth};
use protocol::batch::BatchBuilder;
use protocol::pb::master_target_server::{MasterTarget, MasterTargetServer};
use protocol::pb::{
    AgentHello, AgentMessage, ApplyMessage, ApplyWelcome, ChallengeReply, ChallengeRequest,
    DiskProgress, ErrorReport, ForwardMessage, ProcessServerMessage, StatusReply, StatusRequest,
    agent_message, apply_message, forward_message, process_server_message,
};
use protocol::transport::{TlsFiles, WanTuning};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;

pub const PASS: &str = "a test passphrase";

#[derive(Default)]
struct Applied {
    applied: u64,
    early: BTreeSet<u64>,
    order: Vec<u64>,
}

#[derive(Clone)]
pub struct FakeMt {
    auth: Arc<ServerAuth>,
    disks: Arc<parking_lot::Mutex<HashMap<String, Applied>>>,
    /// While `false`, batches are not read (the master target is stuck).
    pub gate: Arc<watch::Sender<bool>>,
    /// While `true`, batches are refused with NoSpace (its volume is full) and not applied.
    pub full: Arc<std::sync::atomic::AtomicBool>,
    /// Batches refused because of `full`, so far.
    pub refused: Arc<std::sync::atomic::AtomicU64>,
    /// The next this-many batches are refused with OutOfSequence and dropped, as a master
    /// target whose reorder buffer overflowed does.
    pub reorder_overflows: Arc<std::sync::atomic::AtomicU64>,
}

impl FakeMt {
    pub fn new() -> Self {
        FakeMt {
            auth: Arc::new(ServerAuth::new(Passphrase::new(PASS).unwrap())),
            disks: Arc::default(),
            gate: Arc::new(watch::Sender::new(true)),
            full: Arc::default(),
            refused: Arc::default(),
            reorder_overflows: Arc::default(),
        }
    }

    pub fn progress(&self, id: &str) -> DiskProgress {
        let applied = self.disks.lock().entry(id.to_string()).or_default().applied;
        DiskProgress {
            disk_id: id.to_string(),
            cached_seq: applied,
            applied_seq: applied,
        }
    }

    /// Applies `seq` (or holds it until its predecessors came); returns the applied seq.
    pub fn apply(&self, id: &str, seq: u64) -> u64 {
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

    pub fn applied_order(&self, id: &str) -> Vec<u64> {
        self.disks
            .lock()
            .get(id)
            .map(|d| d.order.clone())
            .unwrap_or_default()
    }
}

pub fn msg(body: apply_message::Body) -> Result<ApplyMessage, tonic::Status> {
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
                    Some(forward_message::Body::Batch(b))
                        if mt.full.load(std::sync::atomic::Ordering::SeqCst) =>
                    {
                        mt.refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        apply_message::Body::Error(protocol::pb::ErrorReport {
                            code: protocol::error::Code::NoSpace.value(),
                            disk_id: b.disk_id,
                            message: "the retention volume is full".into(),
                        })
                    }
                    Some(forward_message::Body::Batch(b))
                        if mt
                            .reorder_overflows
                            .fetch_update(
                                std::sync::atomic::Ordering::SeqCst,
                                std::sync::atomic::Ordering::SeqCst,
                                |n| n.checked_sub(1),
                            )
                            .is_ok() =>
                    {
                        apply_message::Body::Error(protocol::pb::ErrorReport {
                            code: protocol::error::Code::OutOfSequence.value(),
                            disk_id: b.disk_id,
                            message: "the reorder buffer is full; re-send".into(),
                        })
                    }
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

pub async fn start_fake_mt(mt: FakeMt) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(MasterTargetServer::new(mt))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

pub fn disk_info() -> protocol::pb::DiskInfo {
    disk_info_for("disk-1", "vm1_disk1")
}

pub fn disk_info_for(id: &str, name: &str) -> protocol::pb::DiskInfo {
    protocol::pb::DiskInfo {
        disk_id: id.into(),
        name: name.into(),
        capacity: 1 << 30,
        format: 0,
        group: String::new(),
    }
}

/// Incompressible bytes (xorshift), so records have a predictable size.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
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
pub struct Agent {
    tx: mpsc::Sender<AgentMessage>,
    rx: tonic::Streaming<ProcessServerMessage>,
    pub welcome: DiskProgress,
    /// The latest ack (cumulative).
    pub last: DiskProgress,
    /// `paused` of every pause message seen.
    pub pauses: Vec<bool>,
}

pub async fn agent(url: &str) -> Agent {
    match agent_for(url, disk_info()).await {
        Ok(a) => a,
        Err(e) => panic!("expected welcome, got {e:?}"),
    }
}

/// An agent for one disk; the process server's refusal if it sends one instead of a welcome.
pub async fn agent_for(url: &str, info: protocol::pb::DiskInfo) -> Result<Agent, ErrorReport> {
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
            disks: vec![info],
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
    let w = match first.body {
        Some(process_server_message::Body::Welcome(w)) => w,
        Some(process_server_message::Body::Error(e)) => return Err(e),
        other => panic!("expected welcome, got {other:?}"),
    };
    auth.verify_server(&pending, &w.server_proof).unwrap();
    Ok(Agent {
        tx,
        rx,
        welcome: w.disks[0].clone(),
        last: w.disks[0].clone(),
        pauses: Vec::new(),
    })
}

impl Agent {
    pub async fn send(&self, seqs: std::ops::RangeInclusive<u64>) {
        let mut b = BatchBuilder::new();
        for s in seqs {
            b.push_write(s * 4096, &noise(s, 3000));
            let batch = b.finish(&self.welcome.disk_id, s, protocol::now_unix_ms(), 0);
            self.tx
                .send(AgentMessage {
                    body: Some(agent_message::Body::Batch(batch)),
                })
                .await
                .unwrap();
        }
    }

    /// Reads until the latest ack satisfies `done`; returns it.
    pub async fn until(&mut self, done: impl Fn(&DiskProgress) -> bool) -> DiskProgress {
        while !done(&self.last) {
            self.next_message().await;
        }
        self.last.clone()
    }

    /// Reads until a pause message with `paused`.
    pub async fn until_pause(&mut self, paused: bool) {
        while self.pauses.last() != Some(&paused) {
            self.next_message().await;
        }
    }

    /// Reads until an error; returns it.
    pub async fn until_error(&mut self) -> ErrorReport {
        loop {
            if let Some(e) = self.next_message().await {
                return e;
            }
        }
    }

    /// Reads one message: an ack updates `last`, a pause is recorded in `pauses`, an error
    /// is returned.
    pub async fn next_message(&mut self) -> Option<ErrorReport> {
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
            Some(process_server_message::Body::Error(e)) => return Some(e),
            other => panic!("unexpected {other:?}"),
        }
        None
    }
}

/// Where the record of `(disk, seq)` lies in the cache in `dir`: its segment file, offset
/// and length.
pub fn find_record(dir: &Path, disk: &str, seq: u64) -> (PathBuf, usize, usize) {
    use process_server::cache::log::{list_segments, segment_path};
    use process_server::cache::segment::{Decoded, HEADER_LEN, decode_record};
    for seg in list_segments(dir).unwrap() {
        let path = segment_path(dir, seg);
        let data = std::fs::read(&path).unwrap();
        let mut off = HEADER_LEN;
        while let Decoded::Record(r) = decode_record(seg, &data[off..]) {
            if r.disk_id == disk && r.seq == seq {
                return (path, off, r.total_len);
            }
            off += r.total_len;
        }
    }
    panic!("no record of {disk} seq {seq}");
}
