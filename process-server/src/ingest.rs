//! Hop 1: agent streams (`ProcessServer.Replicate`), following docs/internals.md.
//!
//! Per stream: this task reads (hello, then batches and heartbeats) and an *acker* task writes
//! cumulative acks; both feed one bounded outbound channel, so a slow agent only ever blocks
//! its own tasks. A batch is acknowledged only once its disk's `cached` seq covers it, i.e.
//! after the group commit's fdatasync (`crate::disks`).
//!
//! A batch read off a stream holds its share of the ingest memory budget (`crate::budget`)
//! until its record is durable; while the budget is spent the reader waits for a share
//! before it reads on (so HTTP/2 flow control holds the agent back), and waiting streams are
//! served least-served first: equal agents get equal shares of the cache writer.
//!
//! While the cache is above its high-water mark (or the volume is full) the reader tells the
//! agent `pause { paused: true, reason }` and stops reading; nothing is refused or dropped.
//!
//! Once the cache volume failed (a failed fdatasync) every agent is refused with code Io,
//! naming the volume and the errno, at hello and on its stream, until a restart.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::disk::check_disk_info;
use protocol::error::{Code, Refusal};
use protocol::limits::{HELLO_TIMEOUT, MAX_DISKS_PER_HELLO};
use protocol::pb::{
    AgentHello, AgentMessage, Batch, DiskInfo, DiskProgress, Pause, ProcessServerMessage,
    ServerWelcome, agent_message, process_server_message,
};
use tokio::sync::mpsc;
use tonic::Streaming;

use crate::budget::Lane;
use crate::cache::{Payload, segment};
use crate::disks::Reserve;
use crate::server::Ctx;

/// Messages queued towards one agent.
const OUT_QUEUE: usize = 256;
/// At the end of a stream, how long to wait for its last batches to become durable.
const FINAL_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub type Outbound = mpsc::Receiver<Result<ProcessServerMessage, tonic::Status>>;
type Out = mpsc::Sender<Result<ProcessServerMessage, tonic::Status>>;

/// Starts serving one agent stream; returns the outbound half for tonic.
pub fn start(ctx: Arc<Ctx>, inbound: Streaming<AgentMessage>) -> Outbound {
    let (out, rx) = mpsc::channel(OUT_QUEUE);
    tokio::spawn(async move {
        if let Err(r) = serve(&ctx, inbound, &out).await {
            tracing::info!(disk = %r.disk_id, "agent stream refused: {r}");
            let _ = out.send(Ok(msg_error(&r))).await;
        }
    });
    rx
}

fn msg_error(r: &Refusal) -> ProcessServerMessage {
    ProcessServerMessage {
        body: Some(process_server_message::Body::Error(r.to_report())),
    }
}

fn msg_ack(p: DiskProgress) -> ProcessServerMessage {
    ProcessServerMessage {
        body: Some(process_server_message::Body::Ack(p)),
    }
}

fn msg_pause(paused: bool, reason: String) -> ProcessServerMessage {
    ProcessServerMessage {
        body: Some(process_server_message::Body::Pause(Pause {
            paused,
            reason,
        })),
    }
}

/// Detaches the stream from its disks however it ends.
struct Attached<'a> {
    ctx: &'a Ctx,
    disks: Vec<String>,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        for d in &self.disks {
            self.ctx.disks.detach(d);
        }
    }
}

async fn serve(
    ctx: &Arc<Ctx>,
    mut inbound: Streaming<AgentMessage>,
    out: &Out,
) -> Result<(), Refusal> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| {
            Refusal::new(
                Code::BadRequest,
                format!("no hello within {HELLO_TIMEOUT:?}; closing the stream"),
            )
        })?;
    let hello = match first {
        Ok(Some(AgentMessage {
            body: Some(agent_message::Body::Hello(h)),
        })) => h,
        Ok(_) => {
            return Err(Refusal::new(
                Code::BadRequest,
                "the first message must be hello",
            ));
        }
        Err(s) => {
            return Err(Refusal::new(
                Code::BadRequest,
                format!("bad first message: {}", s.message()),
            ));
        }
    };
    let proof = ctx.auth.verify(hello.auth.as_ref())?;
    cache_healthy(ctx)?;
    let identity = hello
        .auth
        .as_ref()
        .map(|a| a.identity.clone())
        .unwrap_or_default();
    let declared = declare(ctx, &hello).await?;
    let mut progress = Vec::new();
    let mut attached = Attached {
        ctx,
        disks: Vec::new(),
    };
    let mut tokens = HashMap::new();
    for id in declared.keys() {
        tokens.insert(id.clone(), ctx.disks.attach(id));
        attached.disks.push(id.clone());
        progress.push(
            ctx.disks
                .get(id)
                .expect("declared disks are registered")
                .progress(),
        );
    }
    tracing::info!(agent = %identity, disks = declared.len(), "agent connected");
    let welcome = ProcessServerMessage {
        body: Some(process_server_message::Body::Welcome(ServerWelcome {
            server_proof: proof.into(),
            disks: progress.clone(),
        })),
    };
    if out.send(Ok(welcome)).await.is_err() {
        return Ok(());
    }
    let acker = tokio::spawn(ack_loop(ctx.clone(), progress, out.clone()));
    let result = read_loop(ctx, &mut inbound, out, &declared, &tokens).await;
    if result.is_ok() {
        // Let the group commit in progress finish so its batches are acknowledged.
        let ids: Vec<String> = declared.keys().cloned().collect();
        let _ = tokio::time::timeout(FINAL_ACK_WAIT, wait_durable(ctx, &ids)).await;
        for id in &ids {
            if let Some(s) = ctx.disks.get(id) {
                let _ = out.send(Ok(msg_ack(s.progress()))).await;
            }
        }
    }
    acker.abort();
    tracing::info!(agent = %identity, "agent stream ended");
    drop(attached);
    result
}

/// Checks the declared disks; registers new ones with the master target first.
async fn declare(ctx: &Arc<Ctx>, hello: &AgentHello) -> Result<HashMap<String, u64>, Refusal> {
    if hello.disks.len() > MAX_DISKS_PER_HELLO {
        return Err(Refusal::new(
            Code::BadRequest,
            format!(
                "hello declares {} disks, more than {MAX_DISKS_PER_HELLO}",
                hello.disks.len()
            ),
        ));
    }
    let mut declared = HashMap::new();
    for d in &hello.disks {
        check_disk_info(d)?;
        match ctx.disks.get(&d.disk_id) {
            Some(known) => {
                check_same(&known.info, d)?;
                if let Some(why) = known.resync_required {
                    return Err(Refusal::for_disk(
                        Code::Io,
                        &d.disk_id,
                        format!("{why}: run a differential sync of this disk"),
                    ));
                }
            }
            None => register(ctx, d).await?,
        }
        declared.insert(d.disk_id.clone(), d.capacity);
    }
    Ok(declared)
}

fn check_same(known: &DiskInfo, d: &DiskInfo) -> Result<(), Refusal> {
    if known.capacity != d.capacity || known.name != d.name {
        return Err(Refusal::for_disk(
            Code::DiskConflict,
            &d.disk_id,
            format!(
                "disk {} is registered as '{}' with {} bytes, not '{}' with {} bytes",
                d.disk_id, known.name, known.capacity, d.name, d.capacity
            ),
        ));
    }
    Ok(())
}

async fn register(ctx: &Arc<Ctx>, d: &DiskInfo) -> Result<(), Refusal> {
    let applied = ctx.forwarder.add_disk(d.clone()).await?;
    if ctx.disks.register(d.clone(), applied) {
        crate::server::persist_records(ctx)
            .await
            .map_err(|e| Refusal::new(Code::Internal, e.to_string()))?
            .map_err(|e| Refusal::for_disk(Code::Io, &d.disk_id, e.to_string()))?;
        tracing::info!(disk = %d.disk_id, name = %d.name, applied, "registered new disk");
    }
    Ok(())
}

/// The refusal every agent gets once the cache volume failed (a failed fdatasync): its page
/// cache can no longer be trusted, so nothing is taken until a restart re-reads the log.
fn cache_healthy(ctx: &Ctx) -> Result<(), Refusal> {
    match ctx.cache.flow().fatal().borrow().as_deref() {
        None => Ok(()),
        Some(why) => Err(Refusal::new(
            Code::Io,
            format!(
                "{why}; no batch is accepted until the process server is restarted (check the \
                 volume and restart the process server, which re-reads the cache from disk; \
                 batches not acknowledged must be sent again: the disk needs a resync)"
            ),
        )),
    }
}

/// Waits while the cache asks agents to pause; tells the agent both edges. A cache failure
/// ends the wait with its refusal: nothing drains the cache any more, so the pause would
/// never end.
async fn hold_while_paused(ctx: &Ctx, out: &Out) -> Result<bool, Refusal> {
    let mut pause = ctx.cache.flow().pause();
    let reason = pause.borrow_and_update().clone();
    let Some(reason) = reason else {
        return Ok(true);
    };
    if out.send(Ok(msg_pause(true, reason))).await.is_err() {
        return Ok(false);
    }
    let mut shutdown = ctx.shutdown.clone();
    let mut fatal = ctx.cache.flow().fatal();
    loop {
        tokio::select! {
            r = pause.changed() => if r.is_err() { return Ok(false) },
            _ = shutdown.changed() => return Ok(false),
            _ = fatal.wait_for(|f| f.is_some()) => {}
        }
        cache_healthy(ctx)?;
        if pause.borrow_and_update().is_none() {
            break;
        }
    }
    Ok(out.send(Ok(msg_pause(false, String::new()))).await.is_ok())
}

async fn read_loop(
    ctx: &Arc<Ctx>,
    inbound: &mut Streaming<AgentMessage>,
    out: &Out,
    declared: &HashMap<String, u64>,
    tokens: &HashMap<String, u64>,
) -> Result<(), Refusal> {
    let mut shutdown = ctx.shutdown.clone();
    let mut fatal = ctx.cache.flow().fatal();
    // Wakes the reader while it waits for the agent, so a pause is announced at once.
    let mut pause = ctx.cache.flow().pause();
    // This stream's service from the memory budget, for its fair order.
    let mut lane = Lane::default();
    loop {
        // Marks the value seen, so that `fatal.changed()` below wakes only on a failure.
        fatal.borrow_and_update();
        cache_healthy(ctx)?;
        if !hold_while_paused(ctx, out).await? {
            return Ok(());
        }
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = shutdown.changed() => return Ok(()),
            _ = fatal.changed() => continue,
            _ = pause.changed() => continue,
        };
        let body = match msg {
            Ok(Some(m)) => m.body,
            Ok(None) => return Ok(()),
            Err(s) => {
                tracing::debug!("agent stream error: {}", s.message());
                return Ok(());
            }
        };
        match body {
            Some(agent_message::Body::Batch(b)) => {
                if !on_batch(ctx, out, declared, tokens, &mut lane, b).await? {
                    return Ok(());
                }
            }
            Some(agent_message::Body::Heartbeat(_)) => {
                for id in declared.keys() {
                    ctx.disks.heard(id);
                }
            }
            Some(agent_message::Body::Hello(_)) | None => {
                return Err(Refusal::new(
                    Code::BadRequest,
                    "unexpected message after hello",
                ));
            }
        }
    }
}

/// Checks and caches one batch; `Ok(false)` when shutdown began while it waited for budget.
async fn on_batch(
    ctx: &Arc<Ctx>,
    out: &Out,
    declared: &HashMap<String, u64>,
    tokens: &HashMap<String, u64>,
    lane: &mut Lane,
    b: Batch,
) -> Result<bool, Refusal> {
    let id = b.disk_id.clone();
    let Some(&capacity) = declared.get(&id) else {
        return Err(Refusal::for_disk(
            Code::UnknownDisk,
            &id,
            format!(
                "batch seq {} is for disk '{}', which the hello did not declare",
                b.seq,
                id.escape_debug()
            ),
        ));
    };
    ctx.disks.heard(&id);
    let state = ctx.disks.get(&id).expect("declared disks are registered");
    if b.seq <= state.appended {
        // A harmless duplicate: drop it and repeat where we stand.
        let _ = out.send(Ok(msg_ack(state.progress()))).await;
        return Ok(true);
    }
    // Fully checked before it takes budget or is cached; what is cached is this message.
    protocol::batch::check(&b, capacity).map_err(|e| e.refusal(&id, b.seq))?;
    let seq = b.seq;
    let time = b.time_unix_ms;
    let payload = Payload::batch(b);
    // Backpressure: nothing more is read from this stream until the batch has its share.
    let need = segment::record_len(&id, payload.len()) as u64;
    let mut shutdown = ctx.shutdown.clone();
    // The budget is also what a stuck cache writer holds (a full volume): a pause of the
    // cache is announced from here too, so the agent learns why it is held.
    let mut pause = ctx.cache.flow().pause();
    let mut announced = false;
    let acquire = ctx.budget.acquire(lane, need);
    tokio::pin!(acquire);
    let hold = loop {
        let changed = tokio::select! {
            h = &mut acquire => break h,
            _ = shutdown.wait_for(|s| *s) => return Ok(false),
            r = pause.changed(), if !announced => r,
        };
        let reason = pause.borrow_and_update().clone();
        if changed.is_err() {
            return Ok(false);
        }
        if let Some(reason) = reason {
            announced = true;
            if out.send(Ok(msg_pause(true, reason))).await.is_err() {
                return Ok(false);
            }
        }
    };
    // Still paused: the read loop holds the stream and announces the resume; cleared
    // meanwhile: say so here.
    let cleared = pause.borrow().is_none();
    if announced && cleared && out.send(Ok(msg_pause(false, String::new()))).await.is_err() {
        return Ok(false);
    }
    let order = ctx
        .disks
        .order_lock(&id)
        .expect("declared disks are registered");
    let _in_order = order.lock().await;
    match ctx.disks.reserve(&id, seq, tokens[&id]) {
        Reserve::Next => {}
        Reserve::Duplicate => {
            let p = ctx.disks.get(&id).expect("known").progress();
            let _ = out.send(Ok(msg_ack(p))).await;
            return Ok(true);
        }
        Reserve::Gap { expected } => {
            return Err(Refusal::for_disk(
                Code::OutOfSequence,
                &id,
                format!("batch seq {seq} is out of sequence: expected {expected}"),
            ));
        }
        Reserve::NotOwner => {
            return Err(Refusal::for_disk(
                Code::Unavailable,
                &id,
                "a newer connection took over this disk",
            ));
        }
        Reserve::Unknown => return Err(Refusal::for_disk(Code::UnknownDisk, &id, "unknown disk")),
    }
    // The ack comes from the acker once `cached` covers the seq; the receiver is not needed.
    if let Err(e) = ctx.cache.append(&id, seq, time, payload, hold).await {
        // The writer stops only on a cache failure (then its refusal) or at shutdown.
        cache_healthy(ctx)?;
        return Err(Refusal::for_disk(Code::Io, &id, e.to_string()));
    }
    Ok(true)
}

/// Resolves once everything appended for `ids` is durable.
async fn wait_durable(ctx: &Ctx, ids: &[String]) {
    let mut progress = ctx.disks.progress();
    let targets: Vec<(String, u64)> = ids
        .iter()
        .filter_map(|id| ctx.disks.get(id).map(|s| (id.clone(), s.appended)))
        .collect();
    loop {
        let done = targets
            .iter()
            .all(|(id, t)| ctx.disks.get(id).is_none_or(|s| s.cached >= *t));
        if done || progress.changed().await.is_err() {
            return;
        }
    }
}

/// Sends a cumulative ack whenever a declared disk's cached or applied seq advances.
async fn ack_loop(ctx: Arc<Ctx>, mut sent: Vec<DiskProgress>, out: Out) {
    let mut progress = ctx.disks.progress();
    loop {
        for last in sent.iter_mut() {
            let Some(now) = ctx.disks.get(&last.disk_id) else {
                continue;
            };
            let p = now.progress();
            if p.cached_seq > last.cached_seq || p.applied_seq > last.applied_seq {
                *last = p.clone();
                if out.send(Ok(msg_ack(p))).await.is_err() {
                    return;
                }
            }
        }
        if progress.changed().await.is_err() {
            return;
        }
    }
}
