//! Hop 2: forwarding cached batches to the master target (`MasterTarget.Apply`).
//!
//! One *session* = K authenticated connections (default 4). Each disk's durable batches are
//! read from the cache and sent in seq order, spread round-robin over the K connections (the
//! master target reorders), with at most `window` record bytes in flight in total. Disks
//! share the window in weighted fair order (`[priorities]`, [`crate::fair`]). Acks
//! (`applied_seq`, cumulative) advance the disk's applied seq, release window, wake agent
//! streams and the janitor (which persists the floor and retires applied segments).
//!
//! Any connection failure ends the session: all K are dropped, and after a backoff of
//! 100 ms doubling to 5 s a new session re-hellos and resends from each disk's applied + 1
//! (the master target drops what it already applied). A per-disk `error` from the master
//! target marks that disk failed (status shows it) and stops forwarding it; others go on.
//!
//! With `--bandwidth-mbit`/`--bandwidth-schedule` every batch first draws from one token
//! bucket ([`crate::throttle`]); while it is empty the session stops filling until it refills,
//! but keeps taking acks and commands.
//!
//! Invariant: only batches at or below a disk's `cached` seq (durable) are forwarded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::try_join_all;
use prost::Message;
use protocol::auth::ClientAuth;
use protocol::client::{begin_auth, error_chain, master_target, refusal_from_status};
use protocol::error::{Code, Refusal};
use protocol::pb::{
    ApplyMessage, Batch, DiskInfo, DiskProgress, ForwardHello, ForwardMessage, apply_message,
    forward_message,
};
use protocol::transport::{TlsFiles, WanTuning};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::cache::index::Loc;
use crate::disks::DiskState;
use crate::fair::{DEFAULT_WEIGHT, Fair, Ready};
use crate::server::Ctx;
use crate::throttle::{Bandwidth, Throttle};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Messages queued towards one connection (its bytes are bounded by the window).
const CONN_QUEUE: usize = 256;
/// Batches read from the cache per read call.
const READ_CHUNK: usize = 32;
/// How long an agent's hello waits for the master target to register a new disk.
const ADD_DISK_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach the master target.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub url: String,
    pub tuning: WanTuning,
    pub tls: TlsFiles,
    pub auth: ClientAuth,
    pub connections: usize,
    /// Record bytes in flight to the master target, all disks together.
    pub window: u64,
    /// Rate limit of the hop, all connections together.
    pub bandwidth: Bandwidth,
    /// Forwarding weight per disk id ([`crate::fair`]); others weigh [`DEFAULT_WEIGHT`].
    pub priorities: BTreeMap<String, u32>,
}

#[derive(Debug)]
pub struct AddDisk {
    info: DiskInfo,
    reply: oneshot::Sender<Result<u64, Refusal>>,
}

/// State of the link to the master target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// The first session is being opened.
    Connecting,
    /// A session is up with this many connections.
    Up { connections: usize },
    /// The last session failed (why); a new one is tried after a backoff.
    Down(String),
}

impl Link {
    pub fn is_up(&self) -> bool {
        matches!(self, Link::Up { .. })
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::Connecting => f.write_str("connecting"),
            Link::Up { connections } => write!(f, "up ({connections} connections)"),
            Link::Down(why) => write!(f, "down: {why}"),
        }
    }
}

/// What the rest of the server holds to talk to the forwarder.
#[derive(Debug)]
pub struct ForwarderHandle {
    cmd: mpsc::Sender<AddDisk>,
    link: watch::Sender<Link>,
}

impl ForwarderHandle {
    pub fn new() -> (Self, mpsc::Receiver<AddDisk>) {
        let (cmd, rx) = mpsc::channel(64);
        (
            ForwarderHandle {
                cmd,
                link: watch::Sender::new(Link::Connecting),
            },
            rx,
        )
    }

    /// Registers a new disk with the master target; its applied seq there.
    pub async fn add_disk(&self, info: DiskInfo) -> Result<u64, Refusal> {
        let (reply, rx) = oneshot::channel();
        let disk_id = info.disk_id.clone();
        if self.cmd.send(AddDisk { info, reply }).await.is_err() {
            return Err(Refusal::for_disk(
                Code::Unavailable,
                &disk_id,
                "the process server is shutting down",
            ));
        }
        match tokio::time::timeout(ADD_DISK_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Refusal::for_disk(
                Code::Unavailable,
                &disk_id,
                "the forwarder stopped",
            )),
            Err(_) => Err(Refusal::for_disk(
                Code::Unavailable,
                &disk_id,
                "the master target did not answer the disk registration in time; retry later",
            )),
        }
    }

    pub fn link(&self) -> Link {
        self.link.borrow().clone()
    }

    fn set_link(&self, link: Link) {
        self.link.send_replace(link);
    }
}

fn unavailable_for(info: &DiskInfo, why: &str) -> Refusal {
    Refusal::for_disk(
        Code::Unavailable,
        &info.disk_id,
        format!("the master target is unreachable ({why}); retry later"),
    )
}

/// Whether forwarding must end: at shutdown, or once the cache volume failed (its page cache
/// can no longer be trusted, so nothing more is read from it; after a restart the log is
/// re-read from the disk and forwarded from there).
fn stopping(ctx: &Ctx) -> bool {
    *ctx.shutdown.borrow() || ctx.cache.flow().fatal().borrow().is_some()
}

/// Resolves once [`stopping`] holds.
async fn must_stop(ctx: &Ctx) {
    let mut shutdown = ctx.shutdown.clone();
    let mut fatal = ctx.cache.flow().fatal();
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => {}
        _ = fatal.wait_for(|f| f.is_some()) => {}
    }
}

/// Runs sessions until shutdown or a cache failure ([`stopping`]).
pub async fn run(cfg: ForwardConfig, ctx: Arc<Ctx>, cmds: mpsc::Receiver<AddDisk>) {
    run_sessions(&cfg, &ctx, cmds).await;
    if ctx.cache.flow().fatal().borrow().is_some() {
        tracing::error!("forwarding to the master target stopped: the cache volume failed");
        ctx.forwarder.set_link(Link::Down(
            "forwarding stopped: the cache volume failed".into(),
        ));
    }
}

async fn run_sessions(cfg: &ForwardConfig, ctx: &Arc<Ctx>, mut cmds: mpsc::Receiver<AddDisk>) {
    let mut backoff = BACKOFF_MIN;
    let mut last_why = String::new();
    loop {
        if stopping(ctx) {
            return;
        }
        let why = match Session::open(cfg, ctx).await {
            Ok(mut s) => {
                backoff = BACKOFF_MIN;
                last_why.clear();
                ctx.forwarder.set_link(Link::Up {
                    connections: cfg.connections,
                });
                tracing::info!(url = %cfg.url, connections = cfg.connections, "connected to the master target");
                match s.run(cfg, ctx, &mut cmds).await {
                    Ok(()) => return,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        let why_text = why.to_string();
        // Repeating the same failure every few seconds would drown the log.
        if why_text != last_why {
            tracing::warn!(url = %cfg.url, "master target link down: {why_text}; retrying with backoff");
        } else {
            tracing::debug!(url = %cfg.url, "master target still down: {why_text}; retrying in {backoff:?}");
        }
        last_why.clone_from(&why_text);
        ctx.forwarder.set_link(Link::Down(why_text.clone()));
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = must_stop(ctx) => return,
                cmd = cmds.recv() => match cmd {
                    Some(c) => { let _ = c.reply.send(Err(unavailable_for(&c.info, &why_text))); }
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("connection {0} closed: {1}")]
    Closed(usize, String),
    #[error("connection {0}: unexpected first message from the master target")]
    NoWelcome(usize),
}

enum Event {
    Msg(ApplyMessage),
    Closed(usize, String),
}

struct Session {
    conns: Vec<mpsc::Sender<ForwardMessage>>,
    events: mpsc::Receiver<Event>,
    /// Next seq to send, per disk.
    next: HashMap<String, u64>,
    /// Sent and not yet acknowledged: (seq, record bytes), per disk.
    inflight: HashMap<String, VecDeque<(u64, u64)>>,
    inflight_bytes: u64,
    pending_adds: HashMap<String, Vec<oneshot::Sender<Result<u64, Refusal>>>>,
    rr: usize,
    /// The bandwidth limit, drawn from by every batch on every connection.
    throttle: Throttle,
    /// While the throttle makes the session wait: when to fill again.
    resume: Option<tokio::time::Instant>,
    /// Whose turn it is to send, and the disks' credit.
    fair: Fair,
    /// Disks refused with a retryable code (a full volume at the master target, say): when to
    /// send again from their applied seq, and how many tries in a row have failed.
    retry: HashMap<String, Retry>,
}

/// A disk waiting to be re-sent after a retryable refusal.
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: Option<tokio::time::Instant>,
    failures: u32,
}

/// Backoff after `failures` retryable refusals in a row: 1 s, doubling, at most a minute.
fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

impl Session {
    /// Opens and authenticates every connection and takes the master target's welcome.
    async fn open(cfg: &ForwardConfig, ctx: &Arc<Ctx>) -> Result<Session, SessionError> {
        let (ev_tx, events) = mpsc::channel(1024);
        ctx.disks.clear_failures();
        // All at once: over a 100 ms path, one after another would cost 2 RTTs each.
        let conns =
            try_join_all((0..cfg.connections).map(|i| open_conn(cfg, ctx, i, ev_tx.clone())))
                .await?;
        Ok(Session {
            conns,
            events,
            next: HashMap::new(),
            inflight: HashMap::new(),
            inflight_bytes: 0,
            pending_adds: HashMap::new(),
            rr: 0,
            throttle: Throttle::new(cfg.bandwidth.clone()),
            resume: None,
            fair: Fair::default(),
            retry: HashMap::new(),
        })
    }

    async fn run(
        &mut self,
        cfg: &ForwardConfig,
        ctx: &Arc<Ctx>,
        cmds: &mut mpsc::Receiver<AddDisk>,
    ) -> Result<(), SessionError> {
        loop {
            if stopping(ctx) {
                return Ok(());
            }
            self.fill(cfg, ctx).await?;
            let retry_at = self.next_retry();
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(Event::Msg(m)) => self.on_message(ctx, m)?,
                    Some(Event::Closed(i, why)) => return Err(SessionError::Closed(i, why)),
                    None => return Err(SessionError::Closed(0, "all connections ended".into())),
                },
                cmd = cmds.recv() => match cmd {
                    Some(c) => self.add_disk(c).await?,
                    None => return Ok(()),
                },
                _ = ctx.disks.data_ready() => {}
                _ = must_stop(ctx) => return Ok(()),
                _ = sleep_until(self.resume) => self.resume = None,
                _ = sleep_until(retry_at) => self.retry_due(ctx),
            }
        }
    }

    async fn send(&mut self, msg: ForwardMessage) -> Result<(), SessionError> {
        let i = self.rr % self.conns.len();
        self.rr = self.rr.wrapping_add(1);
        self.conns[i]
            .send(msg)
            .await
            .map_err(|_| SessionError::Closed(i, "stream ended".into()))
    }

    async fn add_disk(&mut self, c: AddDisk) -> Result<(), SessionError> {
        // Every connection may carry the disk's batches, so each one learns about it; the
        // first answer settles the request.
        for (i, tx) in self.conns.iter().enumerate() {
            let msg = ForwardMessage {
                body: Some(forward_message::Body::AddDisk(c.info.clone())),
            };
            tx.send(msg)
                .await
                .map_err(|_| SessionError::Closed(i, "stream ended".into()))?;
        }
        self.pending_adds
            .entry(c.info.disk_id.clone())
            .or_default()
            .push(c.reply);
        Ok(())
    }

    fn on_message(&mut self, ctx: &Arc<Ctx>, m: ApplyMessage) -> Result<(), SessionError> {
        match m.body {
            Some(apply_message::Body::Ack(p)) => self.on_ack(ctx, &p),
            Some(apply_message::Body::DiskAdded(p)) => {
                for reply in self.pending_adds.remove(&p.disk_id).unwrap_or_default() {
                    let _ = reply.send(Ok(p.applied_seq));
                }
            }
            Some(apply_message::Body::Error(r)) => {
                let refusal = Refusal::from_report(&r);
                if r.disk_id.is_empty() {
                    return Err(SessionError::Refused(refusal));
                }
                tracing::error!(disk = %r.disk_id, "master target refused the disk: {refusal}");
                for reply in self.pending_adds.remove(&r.disk_id).unwrap_or_default() {
                    let _ = reply.send(Err(refusal.clone()));
                }
                // OutOfSequence from the master target: its reorder buffer overflowed and it
                // dropped what it held above the gap; re-sending from the applied seq is the
                // remedy (an agent's gap, by contrast, is its own error to report).
                let retryable = refusal.code.is_retryable()
                    || refusal.code == protocol::error::Code::OutOfSequence;
                ctx.disks.set_failed(&r.disk_id, Some(refusal));
                self.next.remove(&r.disk_id);
                if let Some(q) = self.inflight.remove(&r.disk_id) {
                    self.inflight_bytes -= q.iter().map(|(_, b)| b).sum::<u64>();
                }
                if !retryable {
                    self.retry.remove(&r.disk_id);
                } else {
                    let entry = self.retry.entry(r.disk_id.clone()).or_insert(Retry {
                        at: None,
                        failures: 0,
                    });
                    // Every batch in flight is refused: one round counts once.
                    if entry.at.is_none() {
                        entry.failures += 1;
                        let delay = retry_delay(entry.failures);
                        entry.at = Some(tokio::time::Instant::now() + delay);
                        tracing::warn!(disk = %r.disk_id, "re-sending from the applied seq in {delay:?}");
                    }
                }
            }
            Some(apply_message::Body::Welcome(_)) | None => {}
        }
        Ok(())
    }

    fn on_ack(&mut self, ctx: &Arc<Ctx>, p: &DiskProgress) {
        let time = ctx
            .cache
            .with_index(|ix| ix.get(&p.disk_id, p.applied_seq).map(|l| l.time_unix_ms));
        if ctx.disks.applied(&p.disk_id, p.applied_seq, time) {
            ctx.cache
                .with_index(|ix| ix.prune(&p.disk_id, p.applied_seq));
            ctx.janitor.notify_one();
        }
        if let Some(q) = self.inflight.get_mut(&p.disk_id) {
            let mut drained = 0;
            while q.front().is_some_and(|&(s, _)| s <= p.applied_seq) {
                let (_, b) = q.pop_front().expect("front exists");
                drained += b;
            }
            self.inflight_bytes -= drained;
            // A repeated ack drains nothing and must not make a stalled flow look active.
            if drained > 0 {
                ctx.disks.drained(&p.disk_id, drained);
            }
        }
        if let Some(n) = self.next.get_mut(&p.disk_id) {
            // Saturating: the seq is the master target's word, u64::MAX included.
            *n = (*n).max(p.applied_seq.saturating_add(1));
        }
        // Progress after a retry: the fault cleared, the backoff starts over.
        if self.retry.get(&p.disk_id).is_some_and(|r| r.at.is_none()) {
            self.retry.remove(&p.disk_id);
        }
    }

    /// The earliest pending re-send.
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.retry.values().filter_map(|r| r.at).min()
    }

    /// Lets the disks whose backoff has passed be sent again, from their applied seq.
    fn retry_due(&mut self, ctx: &Arc<Ctx>) {
        let now = tokio::time::Instant::now();
        for (id, r) in &mut self.retry {
            if r.at.is_some_and(|at| at <= now) {
                r.at = None;
                self.next.remove(id);
                ctx.disks.set_failed(id, None);
                tracing::info!(disk = %id, "re-sending from the applied seq");
            }
        }
    }

    /// Sends durable batches until the window is full or nothing is left.
    async fn fill(&mut self, cfg: &ForwardConfig, ctx: &Arc<Ctx>) -> Result<(), SessionError> {
        loop {
            if self.inflight_bytes >= cfg.window || self.resume.is_some() {
                return Ok(());
            }
            let allowed = match self
                .throttle
                .allowance(std::time::Instant::now(), std::time::SystemTime::now())
            {
                Ok(n) => n,
                Err(wait) => {
                    self.resume = Some(tokio::time::Instant::now() + wait);
                    return Ok(());
                }
            };
            let picks = self.pick((cfg.window - self.inflight_bytes).min(allowed), cfg, ctx);
            if picks.is_empty() {
                return Ok(());
            }
            let datas = ctx.cache.read(picks.clone()).await;
            for ((disk, seq, loc), data) in picks.into_iter().zip(datas) {
                if ctx.disks.get(&disk).is_some_and(|s| s.failed.is_some()) {
                    continue;
                }
                let batch = match data
                    .map_err(|e| e.to_string())
                    .and_then(|b| Batch::decode(b).map_err(|e| e.to_string()))
                {
                    Ok(b) => b,
                    Err(e) => {
                        let r = Refusal::for_disk(
                            Code::Io,
                            &disk,
                            format!("cannot read cached batch seq {seq}: {e}"),
                        );
                        tracing::error!(disk = %disk, "{r}");
                        ctx.disks.set_failed(&disk, Some(r));
                        continue;
                    }
                };
                self.send(ForwardMessage {
                    body: Some(forward_message::Body::Batch(batch)),
                })
                .await?;
                self.inflight
                    .entry(disk)
                    .or_default()
                    .push_back((seq, u64::from(loc.len)));
                self.inflight_bytes += u64::from(loc.len);
                self.throttle.spend(u64::from(loc.len));
            }
        }
    }

    /// Up to `READ_CHUNK` next batches (about `budget` bytes), disks in weighted fair order.
    fn pick(&mut self, budget: u64, cfg: &ForwardConfig, ctx: &Arc<Ctx>) -> Vec<Pick> {
        let disks = ctx.disks.snapshot();
        let weights: Vec<(&str, u32)> = disks
            .iter()
            .map(|s| {
                let id = s.info.disk_id.as_str();
                let w = cfg.priorities.get(id).copied();
                (id, w.unwrap_or(DEFAULT_WEIGHT))
            })
            .collect();
        let mut ready = Candidates {
            disks: &disks,
            next: &mut self.next,
            ctx,
            peeked: None,
            picks: Vec::new(),
        };
        self.fair.choose(&weights, &mut ready, READ_CHUNK, budget);
        ready.picks
    }
}

/// A batch to send: disk, seq, where it lies in the cache.
type Pick = (String, u64, Loc);

/// Each disk's next durable batch, for [`Fair::choose`].
struct Candidates<'a> {
    disks: &'a [DiskState],
    /// Next seq to send, per disk (the session's).
    next: &'a mut HashMap<String, u64>,
    ctx: &'a Ctx,
    /// The batch the last `peek` found.
    peeked: Option<Pick>,
    picks: Vec<Pick>,
}

impl Ready for Candidates<'_> {
    fn peek(&mut self, i: usize) -> Option<u64> {
        let s = &self.disks[i];
        if s.failed.is_some() {
            return None;
        }
        let id = &s.info.disk_id;
        let n = self.next.entry(id.clone()).or_insert(s.applied + 1);
        *n = (*n).max(s.applied + 1);
        if *n > s.cached {
            return None;
        }
        // A missing entry is a hole left by cache corruption: stop before it.
        let loc = self.ctx.cache.with_index(|ix| ix.get(id, *n))?;
        self.peeked = Some((id.clone(), *n, loc));
        Some(u64::from(loc.len))
    }

    fn take(&mut self, _: usize) {
        let pick = self.peeked.take().expect("take follows a successful peek");
        *self.next.get_mut(&pick.0).expect("peek set it") = pick.1 + 1;
        self.picks.push(pick);
    }
}

/// Resolves at `at`, never when `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Opens connection `i`: challenge, hello, welcome (server proof checked); then a task
/// forwards its messages into `events`.
async fn open_conn(
    cfg: &ForwardConfig,
    ctx: &Arc<Ctx>,
    i: usize,
    events: mpsc::Sender<Event>,
) -> Result<mpsc::Sender<ForwardMessage>, SessionError> {
    let mut client = master_target(&cfg.url, &cfg.tuning, &cfg.tls).await?;
    let pending = begin_auth(&mut client, &cfg.auth).await?;
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    let hello = ForwardMessage {
        body: Some(forward_message::Body::Hello(ForwardHello {
            auth: Some(pending.auth.clone()),
            disks: ctx.disks.infos(),
            connection: i as u32,
        })),
    };
    tx.send(hello)
        .await
        .map_err(|_| SessionError::Closed(i, "stream ended".into()))?;
    let mut inbound = client
        .apply(ReceiverStream::new(rx))
        .await
        .map_err(|s| refusal_from_status(&s))?
        .into_inner();
    loop {
        let m = inbound
            .message()
            .await
            .map_err(|s| SessionError::Closed(i, error_chain(&s)))?
            .ok_or(SessionError::NoWelcome(i))?;
        match m.body {
            Some(apply_message::Body::Welcome(w)) => {
                cfg.auth.verify_server(&pending, &w.server_proof)?;
                for p in &w.disks {
                    ctx.disks.applied(&p.disk_id, p.applied_seq, None);
                    ctx.cache
                        .with_index(|ix| ix.prune(&p.disk_id, p.applied_seq));
                }
                ctx.janitor.notify_one();
                break;
            }
            Some(apply_message::Body::Error(r)) if !r.disk_id.is_empty() => {
                let refusal = Refusal::from_report(&r);
                tracing::error!(disk = %r.disk_id, "master target refused the disk: {refusal}");
                ctx.disks.set_failed(&r.disk_id, Some(refusal));
            }
            Some(apply_message::Body::Error(r)) => {
                return Err(SessionError::Refused(Refusal::from_report(&r)));
            }
            _ => return Err(SessionError::NoWelcome(i)),
        }
    }
    tokio::spawn(async move {
        loop {
            let ev = match inbound.message().await {
                Ok(Some(m)) => Event::Msg(m),
                Ok(None) => Event::Closed(i, "ended by the master target".into()),
                Err(s) => Event::Closed(i, error_chain(&s)),
            };
            let closed = matches!(ev, Event::Closed(..));
            if events.send(ev).await.is_err() || closed {
                return;
            }
        }
    });
    Ok(tx)
}
