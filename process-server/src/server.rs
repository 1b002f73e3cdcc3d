//! `serve`: wires the cache, the disk registry, ingest, the forwarder and the janitor
//! together and runs the gRPC server until SIGTERM/SIGINT.
//!
//! A fatal cache error (a failed fdatasync, never retried) does not stop the server: it stays
//! up so that agents get a precise refusal (code Io, naming the volume and the errno) and
//! status shows `cache_failed`, but it takes no batch and forwards nothing until it is
//! restarted, when recovery re-reads the log from the disk. It then exits non-zero.
//!
//! Start-up order: registry -> cache recovery (torn tail truncated, index rebuilt) -> disk
//! state (damaged disks marked "resync required") -> cache writer -> forwarder and janitor ->
//! listener. Shutdown: stop accepting, end agent streams after their pending group commit is
//! acknowledged, close the writer (its last group completes), exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::auth::ServerAuth;
use protocol::limits::MAX_MESSAGE_BYTES;
use protocol::pb::differential_server::DifferentialServer;
use protocol::pb::process_server_server::{ProcessServer, ProcessServerServer};
use protocol::pb::{AgentMessage, ChallengeReply, ChallengeRequest, StatusReply, StatusRequest};
use protocol::transport::{TlsFiles, TransportError, WanTuning};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::budget::Budget;
use crate::cache::log::Damage;
use crate::cache::{Cache, CacheConfig, CacheError};
use crate::disks::Disks;
use crate::forward::{self, ForwardConfig, ForwarderHandle};
use crate::registry::{Registry, RegistryError};

/// How long shutdown waits for agent streams to end before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot listen on {addr}: {source}")]
    Binding {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the cache writer thread: {0}")]
    StartingWriter(std::io::Error),
    #[error("gRPC server failed: {0}")]
    Serving(#[from] tonic::transport::Error),
    /// The cache volume failed while serving (the message names it).
    #[error("{0}")]
    CacheFailed(String),
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Everything `serve` needs, resolved from flags and the config file.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    /// Where to serve Prometheus `/metrics`, if anywhere.
    pub metrics_listen: Option<String>,
    pub cache: CacheConfig,
    /// Bytes of batches held in memory, ingest and forwarding together (`--memory-budget`):
    /// ingest gets what the forward window leaves ([`crate::budget::ingest_share`]).
    pub memory_budget: u64,
    pub forward: ForwardConfig,
    pub tuning: WanTuning,
    pub tls: TlsFiles,
    pub auth_passphrase: protocol::auth::Passphrase,
    pub identity: String,
}

/// State shared by every task of a running server.
#[derive(Debug)]
pub struct Ctx {
    pub cache: Cache,
    /// Memory for batches between an agent stream and the cache (`crate::budget`).
    pub budget: Arc<Budget>,
    pub disks: Disks,
    pub registry: Registry,
    pub auth: ServerAuth,
    pub forwarder: ForwarderHandle,
    pub identity: String,
    pub master_target_url: String,
    /// The forwarding hop's limit (the forwarder has its own copy; this one is for status).
    pub bandwidth: crate::throttle::Bandwidth,
    /// `true` once shutdown began.
    pub shutdown: watch::Receiver<bool>,
    /// Wakes the janitor (an applied seq advanced).
    pub janitor: Notify,
}

/// Marks the disks that lost records to mid-log corruption, and those whose cached seqs have
/// a hole, as "resync required".
fn apply_damage(disks: &Disks, cache: &Cache, damage: &[Damage]) {
    for d in damage {
        let affected = match &d.disk_hint {
            Some(id) if disks.get(id).is_some() => vec![id.clone()],
            _ => cache.with_index(|ix| ix.disks_in_segment(d.segment)),
        };
        let affected = if affected.is_empty() {
            disks
                .snapshot()
                .into_iter()
                .map(|s| s.info.disk_id)
                .collect()
        } else {
            affected
        };
        for id in affected {
            disks.mark_resync_required(
                &id,
                format!(
                    "cache segment {} offset {}: {}",
                    d.segment, d.offset, d.what
                ),
            );
        }
    }
    for s in disks.snapshot() {
        let seqs = cache.with_index(|ix| ix.seqs(&s.info.disk_id));
        let above: Vec<u64> = seqs.into_iter().filter(|&q| q > s.floor).collect();
        let contiguous = above
            .iter()
            .enumerate()
            .all(|(i, &q)| q == s.floor + 1 + i as u64);
        if !contiguous {
            disks.mark_resync_required(
                &s.info.disk_id,
                format!(
                    "cached seqs above the applied floor {} have a hole",
                    s.floor
                ),
            );
        }
    }
}

/// The highest seq contiguous above `floor` in the index.
fn last_contiguous(cache: &Cache, id: &str, floor: u64) -> u64 {
    let mut last = floor;
    for q in cache.with_index(|ix| ix.seqs(id)) {
        if q == last + 1 {
            last = q;
        } else if q > last + 1 {
            break;
        }
    }
    last
}

/// Opens the cache and the registry and builds the shared state (blocking work off the
/// async workers). Returns the context and the forwarder's command queue.
async fn open(
    settings: &Settings,
    shutdown: watch::Receiver<bool>,
) -> Result<(Arc<Ctx>, tokio::sync::mpsc::Receiver<forward::AddDisk>), ServeError> {
    let cfg = settings.cache.clone();
    let (cache, damage, records, registry) = tokio::task::spawn_blocking(move || {
        let (cache, damage) = Cache::open(&cfg)?;
        let registry = Registry::new(&cfg.dir);
        let records = registry.load()?;
        Ok::<_, ServeError>((cache, damage, records, registry))
    })
    .await??;
    let disks = Disks::new(&records, |id, floor| last_contiguous(&cache, id, floor));
    apply_damage(&disks, &cache, &damage);
    let (usage, quota) = (cache.flow().usage(), cache.flow().quota());
    tracing::info!(
        dir = %settings.cache.dir.display(),
        disks = records.len(),
        usage,
        quota,
        "cache recovered"
    );
    let ingest = crate::budget::ingest_share(settings.memory_budget, settings.forward.window);
    tracing::info!(
        memory_budget = settings.memory_budget,
        ingest,
        forward_window = settings.forward.window,
        stream_window = settings.tuning.stream_window,
        "memory: batches in memory are bounded by the budget (ingest + forward window); each \
         agent stream may add up to its HTTP/2 stream window of unread data"
    );
    let (forwarder, cmds) = ForwarderHandle::new();
    let ctx = Arc::new(Ctx {
        cache,
        budget: Budget::new(ingest),
        disks,
        registry,
        auth: ServerAuth::new(settings.auth_passphrase.clone()),
        forwarder,
        identity: settings.identity.clone(),
        master_target_url: settings.forward.url.clone(),
        bandwidth: settings.forward.bandwidth.clone(),
        shutdown,
        janitor: Notify::new(),
    });
    // Weak: the writer thread must not keep the context (and the cache lock) alive.
    let hook = Arc::downgrade(&ctx);
    ctx.cache
        .start(Arc::new(move |id: &str, seq: u64, bytes: u64| {
            if let Some(c) = hook.upgrade() {
                c.disks.durable(id, seq, bytes);
            }
        }))
        .map_err(ServeError::StartingWriter)?;
    Ok((ctx, cmds))
}

/// Stores every disk's record in the registry (off the async workers), then marks their
/// floors persisted. The outer error: the blocking task failed.
pub(crate) async fn persist_records(
    ctx: &Arc<Ctx>,
) -> Result<Result<(), RegistryError>, tokio::task::JoinError> {
    let records = ctx.disks.records();
    let c = ctx.clone();
    let stored =
        tokio::task::spawn_blocking(move || c.registry.store(&records).map(|_| records)).await?;
    Ok(stored.map(|records| ctx.disks.floors_persisted(&records)))
}

/// Persists applied floors, then retires (reuses or deletes) the segments they make obsolete.
async fn janitor(ctx: Arc<Ctx>) {
    let mut shutdown = ctx.shutdown.clone();
    loop {
        if ctx.disks.floors_behind() {
            match persist_records(&ctx).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("cannot persist applied floors: {e}"),
                Err(e) => tracing::error!("registry task failed: {e}"),
            }
        }
        match ctx.cache.retire_applied(|id| ctx.disks.floor(id)).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(segments = n, "retired applied cache segments"),
            Err(e) => tracing::error!("cannot retire applied cache segments: {e}"),
        }
        tokio::select! {
            _ = ctx.janitor.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Once the cache volume failed: the disks whose batches it lost are marked "resync
/// required" (ingest refuses every agent and the forwarder stops on its own).
async fn on_cache_failure(ctx: Arc<Ctx>) {
    let mut fatal = ctx.cache.flow().fatal();
    let Ok(why) = fatal.wait_for(|f| f.is_some()).await.map(|f| f.clone()) else {
        return;
    };
    // The writer has logged the failure; this names the disks it cost.
    ctx.disks.cache_failed(&why.unwrap_or_default());
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service {
    ctx: Arc<Ctx>,
}

#[tonic::async_trait]
impl ProcessServer for Service {
    async fn challenge(
        &self,
        _request: tonic::Request<ChallengeRequest>,
    ) -> Result<tonic::Response<ChallengeReply>, tonic::Status> {
        Ok(tonic::Response::new(ChallengeReply {
            server_nonce: self.ctx.auth.challenge().into(),
        }))
    }

    type ReplicateStream =
        ReceiverStream<Result<protocol::pb::ProcessServerMessage, tonic::Status>>;

    async fn replicate(
        &self,
        request: tonic::Request<tonic::Streaming<AgentMessage>>,
    ) -> Result<tonic::Response<Self::ReplicateStream>, tonic::Status> {
        let rx = crate::ingest::start(self.ctx.clone(), request.into_inner());
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        request: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusReply>, tonic::Status> {
        let proof = self
            .ctx
            .auth
            .verify(request.get_ref().auth.as_ref())
            .map_err(|r| r.to_status())?;
        Ok(tonic::Response::new(crate::status::reply(&self.ctx, proof)))
    }
}

async fn bind(addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Binding {
            addr: addr.to_string(),
            source,
        })
}

/// Binds `settings.listen` (and `settings.metrics_listen`) and serves until `stop` resolves;
/// see [`serve_on`].
pub async fn serve(
    settings: Settings,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = bind(&settings.listen).await?;
    let metrics = match &settings.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    serve_on(settings, listener, metrics, stop).await
}

/// Serves on `listener` (and Prometheus metrics on `metrics`) until `stop` resolves (clean
/// exit) or the cache fails (error).
pub async fn serve_on(
    settings: Settings,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (ctx, cmds) = open(&settings, shutdown_rx).await?;
    let metrics = metrics.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!("metrics on http://{a}/metrics");
        }
        tokio::spawn(crate::metrics::serve(l, ctx.clone()))
    });
    let forwarder = tokio::spawn(forward::run(settings.forward.clone(), ctx.clone(), cmds));
    let janitor = tokio::spawn(janitor(ctx.clone()));

    let addr: SocketAddr = listener
        .local_addr()
        .map_err(|source| ServeError::Binding {
            addr: settings.listen.clone(),
            source,
        })?;
    let service = ProcessServerServer::new(Service { ctx: ctx.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let relay = DifferentialServer::new(crate::differential::Relay {
        ctx: ctx.clone(),
        upstream: settings.forward.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = settings
        .tuning
        .server(&settings.tls)?
        .add_service(service)
        .add_service(relay);
    tracing::info!("listening on {addr}");

    let fatal = tokio::spawn(on_cache_failure(ctx.clone()));
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_signal = async move {
        stop.await;
        // End agent streams and the forwarder; tonic then waits for the streams to close.
        let _ = shutdown_tx.send(true);
        let _ = stopped_tx.send(());
    };
    let server = router.serve_with_incoming_shutdown(
        protocol::incoming::guarded(listener, Default::default()),
        stop_signal,
    );
    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = stopped_rx.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("agent streams did not end within {SHUTDOWN_GRACE:?}; exiting anyway");
            Ok(())
        }
    };
    if let Some(m) = metrics {
        m.abort();
    }
    fatal.abort();
    let _ = forwarder.await;
    let _ = janitor.await;
    ctx.cache.close().await;
    served?;
    if let Some(why) = ctx.cache.flow().fatal().borrow().clone() {
        return Err(ServeError::CacheFailed(why));
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests;
