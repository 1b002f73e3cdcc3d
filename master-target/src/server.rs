//! The gRPC services: `MasterTarget` (`Challenge`, `Apply` = hop 2 of docs/internals.md,
//! `Status`) and, beside it, `Differential.DiskHashes` (chunk hashes for differential sync).
//!
//! One `Apply` stream = one process-server connection, served by two tasks:
//!
//! ```text
//!  inbound (reader task) --ApplyCmd (bounded, per disk)--> applier thread of the disk
//!        |  welcome / disk_added / errors                      | acks, per-disk errors
//!        v                                                     v
//!  response channel (bounded) <------ writer task <------ Outbox (coalesced, never blocks)
//! ```
//!
//! Invariants: nothing is opened, created or written before the hello's auth is verified; a
//! connection-level refusal (empty disk id) ends the stream; a slow connection only slows
//! its own reader (h2 flow control pushes back on the process server), never an applier.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::auth::ServerAuth;
use protocol::error::{Code, Refusal};
use protocol::limits::{HELLO_TIMEOUT, MAX_DISKS_PER_HELLO, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use protocol::pb::differential_server::{Differential, DifferentialServer};
use protocol::pb::master_target_server::{MasterTarget, MasterTargetServer};
use protocol::pb::{
    ApplyMessage, ApplyWelcome, ChallengeReply, ChallengeRequest, DiskHashes, DiskHashesRequest,
    DiskInfo, DiskProgress, ForwardMessage, StatusReply, StatusRequest, apply_message,
    forward_message,
};
use protocol::transport::{TlsFiles, TransportError, WanTuning};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::apply::{ApplyCmd, Checked};
use crate::hashes;
use crate::metrics::{self, Counters};
use crate::outbox::Outbox;
use crate::registry::{DiskEntry, Registry, SetupError};

/// Messages queued towards one connection before its writers wait.
const RESPONSE_DEPTH: usize = 64;
/// How long shutdown waits for streams to end before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Setup(#[from] SetupError),
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
}

impl ServeError {
    pub fn code(&self) -> Code {
        match self {
            ServeError::Setup(e) => e.code(),
            ServeError::Transport(_) => Code::BadRequest,
            ServeError::Server(_) => Code::Internal,
        }
    }
}

/// Everything `serve` needs besides the listener.
#[derive(Debug)]
pub struct ServeOptions {
    pub datastore: std::path::PathBuf,
    pub retention: std::path::PathBuf,
    pub auth: ServerAuth,
    pub tls: TlsFiles,
    pub tuning: WanTuning,
    /// Name reported by `Status`.
    pub identity: String,
    /// Where to serve Prometheus `/metrics`, if anywhere.
    pub metrics: Option<TcpListener>,
    /// How long and how much undo data the retention volume keeps per disk.
    pub retention_policy: crate::retention::journal::RetentionPolicy,
    /// How flat disks' data is written (mmap or pwrite).
    pub data_io: crate::vmdk::DataIo,
}

/// The service state shared by every stream.
#[derive(Debug)]
pub struct Service {
    auth: Arc<ServerAuth>,
    registry: Arc<Registry>,
    shutdown: watch::Receiver<bool>,
    next_conn: AtomicU64,
    identity: String,
    counters: Arc<Counters>,
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting, ends every stream,
/// lets every applier commit what it applied, and returns.
pub async fn serve(
    opts: ServeOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Start-up checks touch the disks: keep them off the async workers too.
    let (ds, rt, policy, data_io) = (
        opts.datastore.clone(),
        opts.retention.clone(),
        opts.retention_policy,
        opts.data_io,
    );
    let registry = tokio::task::spawn_blocking(move || {
        Registry::new(&ds, &rt, policy).map(|r| r.with_data_io(data_io))
    })
    .await
    .map_err(|e| SetupError::Retention {
        path: opts.retention.clone(),
        reason: format!("start-up task failed: {e}"),
    })??;
    let registry = Arc::new(registry);
    let (stop_tx, stop_rx) = watch::channel(false);
    let counters = Arc::new(Counters::default());
    let metrics = opts.metrics.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!("metrics on http://{a}/metrics");
        }
        tokio::spawn(metrics::serve(l, counters.clone(), registry.clone()))
    });
    let (svc, diff) = services(
        Arc::new(opts.auth),
        registry.clone(),
        counters,
        stop_rx,
        opts.identity,
    );
    let addr = listener.local_addr().ok();
    let incoming = protocol::incoming::guarded(listener, Default::default());
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        let _ = fired_tx.send(());
    };
    let mut builder = opts.tuning.server(&opts.tls)?;
    if let Some(a) = addr {
        tracing::info!("listening on {a}");
    }
    let server = builder
        .add_service(svc)
        .add_service(diff)
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    // Once shut down, every stream ends on its own (the readers watch `stop`); a peer that
    // does not read its responses must not hold the process up forever.
    let result = tokio::select! {
        biased;
        r = &mut server => r,
        _ = fired_rx => match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("streams did not end within {DRAIN_TIMEOUT:?}; closing them");
                Ok(())
            }
        },
    };
    if let Some(m) = metrics {
        m.abort();
    }
    registry.shutdown().await;
    tracing::info!("stopped");
    result.map_err(ServeError::from)
}

/// The two gRPC services, sharing one auth (nonces from either's challenge) and registry,
/// with the message limits set (never tonic's 4 MiB default).
fn services(
    auth: Arc<ServerAuth>,
    registry: Arc<Registry>,
    counters: Arc<Counters>,
    shutdown: watch::Receiver<bool>,
    identity: String,
) -> (MasterTargetServer<Service>, DifferentialServer<DiffService>) {
    let diff = DifferentialServer::new(DiffService {
        auth: auth.clone(),
        registry: registry.clone(),
        counters: counters.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let main = MasterTargetServer::new(Service {
        auth,
        registry,
        shutdown,
        next_conn: AtomicU64::new(0),
        identity,
        counters,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    (main, diff)
}

type Out = mpsc::Sender<Result<ApplyMessage, Status>>;

fn error_msg(r: &Refusal) -> Result<ApplyMessage, Status> {
    Ok(ApplyMessage {
        body: Some(apply_message::Body::Error(r.to_report())),
    })
}

#[tonic::async_trait]
impl MasterTarget for Service {
    async fn challenge(
        &self,
        _req: Request<ChallengeRequest>,
    ) -> Result<Response<ChallengeReply>, Status> {
        Ok(Response::new(ChallengeReply {
            server_nonce: self.auth.challenge().into(),
        }))
    }

    type ApplyStream = ReceiverStream<Result<ApplyMessage, Status>>;

    async fn apply(
        &self,
        req: Request<Streaming<ForwardMessage>>,
    ) -> Result<Response<Self::ApplyStream>, Status> {
        let (tx, rx) = mpsc::channel(RESPONSE_DEPTH);
        let conn = Connection {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            auth: self.auth.clone(),
            registry: self.registry.clone(),
            shutdown: self.shutdown.clone(),
            out: tx,
            outbox: Arc::new(Outbox::new()),
            disks: HashMap::new(),
            counters: self.counters.clone(),
        };
        self.counters
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        tokio::spawn(conn.run(req.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let proof = self.auth.verify(req.get_ref().auth.as_ref()).map_err(|r| {
            tracing::warn!("refused status request: {r}");
            self.counters.refusals_total.fetch_add(1, Ordering::Relaxed);
            r.to_status()
        })?;
        let (open, idle) = self.registry.snapshot().await;
        let mut facts = HashMap::new();
        facts.insert(
            "datastore".to_string(),
            self.registry.datastore().display().to_string(),
        );
        facts.insert(
            "retention".to_string(),
            self.registry.retention().display().to_string(),
        );
        Ok(Response::new(StatusReply {
            server_proof: proof.into(),
            role: "master-target".into(),
            identity: self.identity.clone(),
            protocol_version: PROTOCOL_VERSION,
            disks: crate::status::disk_statuses(&open, &idle),
            facts,
        }))
    }
}

/// `Differential.DiskHashes`, served beside `MasterTarget` with the same auth (the client
/// takes its challenge from the main service).
#[derive(Debug)]
pub struct DiffService {
    auth: Arc<ServerAuth>,
    registry: Arc<Registry>,
    counters: Arc<Counters>,
}

#[tonic::async_trait]
impl Differential for DiffService {
    async fn disk_hashes(
        &self,
        req: Request<DiskHashesRequest>,
    ) -> Result<Response<DiskHashes>, Status> {
        let r = req.into_inner();
        let proof = self.auth.verify(r.auth.as_ref()).map_err(|e| {
            tracing::warn!("refused disk hashes request: {e}");
            self.counters.refusals_total.fetch_add(1, Ordering::Relaxed);
            e.to_status()
        })?;
        let disk = r
            .disk
            .ok_or_else(|| Refusal::new(Code::BadRequest, "disk hashes request without a disk"))
            .map_err(|e| e.to_status())?;
        let chunk = hashes::chunk_size(r.chunk_size).map_err(|e| e.to_status())?;
        let mut reply = DiskHashes {
            server_proof: proof.into(),
            exists: false,
            first_chunk: r.first_chunk,
            chunk_size: chunk,
            ..Default::default()
        };
        let Some((extent, applied)) = self
            .registry
            .hash_target(&disk, r.after_seq)
            .await
            .map_err(|e| e.to_status())?
        else {
            return Ok(Response::new(reply));
        };
        let (capacity, first, max) = (disk.capacity, r.first_chunk, r.max_chunks);
        let page = tokio::task::spawn_blocking(move || {
            hashes::hash_page(&extent, capacity, chunk, first, max)
                .map_err(|e| format!("hashing {}: {e}", extent.path.display()))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Refusal::for_disk(Code::Io, &disk.disk_id, e).to_status())?;
        reply.exists = true;
        reply.hashes = page.hashes.into();
        reply.zero_chunks = page.zero_chunks.into();
        reply.applied_seq = applied;
        Ok(Response::new(reply))
    }
}

/// One `Apply` stream.
struct Connection {
    id: u64,
    auth: Arc<ServerAuth>,
    registry: Arc<Registry>,
    shutdown: watch::Receiver<bool>,
    out: Out,
    outbox: Arc<Outbox>,
    /// Disks this connection declared and the master target accepted.
    disks: HashMap<String, Arc<DiskEntry>>,
    counters: Arc<Counters>,
}

impl Connection {
    async fn run(self, inbound: Streaming<ForwardMessage>) {
        self.counters
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        let counters = self.counters.clone();
        self.converse(inbound).await;
        counters.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Hello, welcome, then batches until the stream ends.
    async fn converse(mut self, mut inbound: Streaming<ForwardMessage>) {
        let first = tokio::select! {
            m = tokio::time::timeout(HELLO_TIMEOUT, inbound.message()) => m,
            _ = self.shutdown.changed() => return,
        };
        let hello = match first {
            Ok(Ok(Some(ForwardMessage {
                body: Some(forward_message::Body::Hello(h)),
            }))) => h,
            Ok(Ok(None)) => return,
            refused => {
                let why = match refused {
                    Err(_) => format!("no hello within {HELLO_TIMEOUT:?}; closing the stream"),
                    Ok(Err(s)) => format!("bad first message: {}", s.message()),
                    _ => "the first message must be hello".to_string(),
                };
                let r = Refusal::new(Code::BadRequest, why);
                tracing::warn!(conn = self.id, "refused stream: {r}");
                self.counters.refusals_total.fetch_add(1, Ordering::Relaxed);
                let _ = self.out.send(error_msg(&r)).await;
                return;
            }
        };
        let proof = match self.auth.verify(hello.auth.as_ref()) {
            Ok(p) => p,
            Err(r) => {
                tracing::warn!(conn = self.id, "refused connection: {r}");
                self.counters.refusals_total.fetch_add(1, Ordering::Relaxed);
                let _ = self.out.send(error_msg(&r)).await;
                return;
            }
        };
        if hello.disks.len() > MAX_DISKS_PER_HELLO {
            let r = Refusal::new(
                Code::BadRequest,
                format!("a hello may declare at most {MAX_DISKS_PER_HELLO} disks"),
            );
            let _ = self.out.send(error_msg(&r)).await;
            return;
        }
        let identity = hello
            .auth
            .as_ref()
            .map(|a| a.identity.clone())
            .unwrap_or_default();
        tracing::info!(conn = self.id, peer = %identity, index = hello.connection, disks = hello.disks.len(), "connection accepted");
        let mut progress = Vec::new();
        let mut refusals = Vec::new();
        for d in &hello.disks {
            match self.attach(d).await {
                Ok(p) => progress.push(p),
                Err(r) => refusals.push(r),
            }
        }
        let welcome = ApplyMessage {
            body: Some(apply_message::Body::Welcome(ApplyWelcome {
                server_proof: proof.into(),
                disks: progress,
            })),
        };
        if self.out.send(Ok(welcome)).await.is_err() {
            return;
        }
        for r in &refusals {
            if self.out.send(error_msg(r)).await.is_err() {
                return;
            }
        }
        let writer = tokio::spawn(write_outbox(self.outbox.clone(), self.out.clone()));
        self.serve(&mut inbound).await;
        self.outbox.close();
        let _ = writer.await;
        tracing::info!(conn = self.id, "connection closed");
    }

    /// Reads messages until the peer closes, errs, breaks the protocol, or we shut down.
    async fn serve(&mut self, inbound: &mut Streaming<ForwardMessage>) {
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = self.shutdown.changed() => return,
            };
            let body = match msg {
                Ok(Some(m)) => m.body,
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(conn = self.id, "stream error: {status}");
                    return;
                }
            };
            match body {
                Some(forward_message::Body::Batch(b)) => self.batch(b).await,
                Some(forward_message::Body::AddDisk(d)) => {
                    let reply = match self.attach(&d).await {
                        Ok(p) => Ok(ApplyMessage {
                            body: Some(apply_message::Body::DiskAdded(p)),
                        }),
                        Err(r) => error_msg(&r),
                    };
                    if self.out.send(reply).await.is_err() {
                        return;
                    }
                }
                Some(forward_message::Body::Hello(_)) | None => {
                    let r = Refusal::new(
                        Code::BadRequest,
                        "unexpected message: hello is sent once, first",
                    );
                    let _ = self.out.send(error_msg(&r)).await;
                    return;
                }
            }
        }
    }

    async fn attach(&mut self, d: &DiskInfo) -> Result<DiskProgress, Refusal> {
        let entry = self.registry.attach(d).await.inspect_err(|r| {
            tracing::warn!(conn = self.id, disk = %d.disk_id, "refused disk: {r}");
            self.counters.refusals_total.fetch_add(1, Ordering::Relaxed);
        })?;
        let applied = entry.shared.durable_seq.load(Ordering::Acquire);
        self.disks.insert(d.disk_id.clone(), entry);
        Ok(DiskProgress {
            disk_id: d.disk_id.clone(),
            cached_seq: applied,
            applied_seq: applied,
        })
    }

    async fn batch(&mut self, batch: protocol::pb::Batch) {
        let Some(entry) = self.disks.get(&batch.disk_id) else {
            let r = Refusal::for_disk(
                Code::UnknownDisk,
                &batch.disk_id,
                format!(
                    "batch seq {} for disk '{}', which this connection did not declare (send hello or add_disk first)",
                    batch.seq,
                    batch.disk_id.escape_debug()
                ),
            );
            self.outbox.error(r);
            return;
        };
        // Decoded here, on the blocking pool, so that the batches of every connection are
        // checked and decompressed in parallel while the disk's applier writes.
        let shared = entry.shared.clone();
        let checked = if shared.is_durable(batch.seq) {
            Ok(Checked::durable(batch))
        } else {
            tokio::task::spawn_blocking(move || Checked::new(batch, &shared)).await
        };
        let checked = match checked {
            Ok(c) => c,
            Err(e) => {
                let r = Refusal::for_disk(
                    Code::Unavailable,
                    &entry.shared.disk_id,
                    format!("checking a batch failed ({e}); retry later"),
                );
                self.outbox.error(r);
                return;
            }
        };
        let cmd = ApplyCmd::Batch {
            batch: Box::new(checked),
            from: self.outbox.clone(),
        };
        if entry.tx.send(cmd).await.is_err() {
            let r = Refusal::for_disk(
                Code::Unavailable,
                &entry.shared.disk_id,
                "the disk's applier has stopped (shutting down); retry later",
            );
            self.outbox.error(r);
        }
    }
}

/// Forwards what appliers left in `outbox` to the connection until either side closes.
async fn write_outbox(outbox: Arc<Outbox>, out: Out) {
    while let Some(msgs) = outbox.next().await {
        for m in msgs {
            if out.send(Ok(m)).await.is_err() {
                outbox.close();
                return;
            }
        }
    }
}
