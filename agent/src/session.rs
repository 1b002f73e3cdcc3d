//! One connection to the process server (`ProcessServer.Replicate`), following
//! `docs/internals.md`, hop 1:
//!
//! ```text
//! agent                                   process server
//!   Challenge ------------------------------> nonce
//!   hello{auth, [disk]} --------------------> verify
//!   <--------------- welcome{proof, [cached_seq, applied_seq]} | error (stream ends)
//!   batch seq cached+1, cached+2, ... ------>
//!   heartbeat every 5 s -------------------->
//!   <------------------ ack{cached_seq, applied_seq} (cumulative) | pause | error
//! ```
//!
//! Invariants: the hello is queued before the stream is opened (the server reads it before
//! it answers, so opening first could wait forever); the server's proof is checked before
//! anything is sent; the outbound queue is bounded ([`OUT_QUEUE`] messages), so HTTP/2 flow
//! control reaches the window; while paused, no new batch is sent but acks are still read
//! and heartbeats still go out. Every failure is a [`SessionError`] that says whether a new
//! connection could help.

use std::time::Duration;

use protocol::auth::ClientAuth;
use protocol::client::{error_chain, refusal_from_status};
use protocol::error::{Code, Refusal};
use protocol::pb::agent_message::Body as Out;
use protocol::pb::process_server_message::Body as In;
use protocol::pb::{AgentHello, AgentMessage, DiskInfo, DiskProgress, Heartbeat};
use protocol::pb::{ProcessServerMessage, ServerWelcome};
use protocol::transport::{TlsFiles, WanTuning, process_server_client};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::scan::ScanError;
use crate::transfer::Transfer;
use crate::window::WindowError;

/// Messages queued towards the stream; small, since HTTP/2 buffers behind it.
pub const OUT_QUEUE: usize = 4;
/// Longest wait for a connection to be welcomed (connect, challenge, hello). Generous, since
/// a process server registers a new disk with the master target before it answers.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a heartbeat is sent while the stream is open (internals.md: every 5 s).
pub const HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "error {}: cannot reach process server {url}: {cause}",
        Code::ProcessServerUnreachable
    )]
    Unreachable { url: String, cause: String },
    #[error("connection to the process server lost: {0}")]
    Lost(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the process server broke the protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error(transparent)]
    Scan(#[from] ScanError),
}

impl SessionError {
    /// Whether a new connection (after a backoff) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SessionError::Unreachable { .. } | SessionError::Lost(_) => true,
            SessionError::Refused(r) => r.code.is_retryable(),
            SessionError::Protocol(_) | SessionError::Window(_) | SessionError::Scan(_) => false,
        }
    }

    /// Classifies a gRPC status on an open connection: transport trouble (a reset, a
    /// cancelled stream, an unavailable server) is retryable, a refusal is not.
    fn from_status(url: &str, s: &tonic::Status) -> SessionError {
        use tonic::Code as G;
        match s.code() {
            G::Unauthenticated
            | G::PermissionDenied
            | G::InvalidArgument
            | G::NotFound
            | G::AlreadyExists
            | G::FailedPrecondition
            | G::OutOfRange
            | G::Unimplemented => SessionError::Refused(refusal_from_status(s)),
            _ => SessionError::Lost(format!("{url}: {}", status_cause(s))),
        }
    }
}

/// A status's message followed by the causes it does not already name (e.g. "h2 protocol
/// error: error reading a body from connection: connection reset"), without the debug dump
/// of `Status`'s own `Display`.
fn status_cause(s: &tonic::Status) -> String {
    let mut text = s.message().to_string();
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        let m = c.to_string();
        if !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        cause = c.source();
    }
    text
}

/// The first answer on a new stream: a welcome, or the refusal of the hello.
async fn await_welcome(
    inbound: &mut Streaming<ProcessServerMessage>,
    url: &str,
) -> Result<ServerWelcome, SessionError> {
    match inbound.next().await {
        Some(Ok(ProcessServerMessage {
            body: Some(In::Welcome(w)),
        })) => Ok(w),
        Some(Ok(ProcessServerMessage {
            body: Some(In::Error(e)),
        })) => Err(Refusal::from_report(&e).into()),
        Some(Ok(other)) => Err(SessionError::Protocol(format!(
            "expected a welcome, got {other:?}"
        ))),
        Some(Err(s)) => Err(SessionError::from_status(url, &s)),
        None => Err(SessionError::Lost(format!(
            "{url}: the stream ended before the welcome"
        ))),
    }
}

/// Where and how to connect, and what to declare.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub tuning: WanTuning,
    pub tls: TlsFiles,
    pub auth: ClientAuth,
    pub disk: DiskInfo,
    /// Heartbeat interval: [`HEARTBEAT`].
    pub heartbeat: Duration,
}

/// An authenticated, welcomed stream.
#[derive(Debug)]
pub struct Session {
    out: mpsc::Sender<AgentMessage>,
    inbound: Streaming<ProcessServerMessage>,
    state: Peer,
    /// What the welcome said about our disk.
    pub welcome: DiskProgress,
}

/// What the session knows about the server side of the stream.
#[derive(Debug)]
struct Peer {
    url: String,
    heartbeat: Duration,
    disk_id: String,
    paused: bool,
}

impl Session {
    /// Connects, authenticates, declares the disk and waits for the welcome, for at most
    /// [`OPEN_TIMEOUT`] (a server that accepts and then says nothing is as good as gone).
    pub async fn open(t: &Target) -> Result<Session, SessionError> {
        tokio::time::timeout(OPEN_TIMEOUT, Self::handshake(t))
            .await
            .unwrap_or_else(|_| {
                Err(SessionError::Unreachable {
                    url: t.url.clone(),
                    cause: format!("no welcome within {}s", OPEN_TIMEOUT.as_secs()),
                })
            })
    }

    async fn handshake(t: &Target) -> Result<Session, SessionError> {
        let unreachable = |cause: String| SessionError::Unreachable {
            url: t.url.clone(),
            cause,
        };
        let endpoint = t
            .tuning
            .endpoint(&t.url, &t.tls)
            .map_err(|e| Refusal::new(Code::BadRequest, e.to_string()))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        let mut client = process_server_client(channel);
        let pending = protocol::client::begin_auth(&mut client, &t.auth)
            .await
            .map_err(|r| match r.code {
                Code::Unavailable => unreachable(r.message),
                _ => SessionError::Refused(r),
            })?;
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let hello = AgentMessage {
            body: Some(Out::Hello(AgentHello {
                auth: Some(pending.auth.clone()),
                disks: vec![t.disk.clone()],
            })),
        };
        out.try_send(hello)
            .expect("a fresh queue has room for the hello");
        let mut inbound = client
            .replicate(ReceiverStream::new(rx))
            .await
            .map_err(|s| SessionError::from_status(&t.url, &s))?
            .into_inner();
        let welcome = await_welcome(&mut inbound, &t.url).await?;
        t.auth.verify_server(&pending, &welcome.server_proof)?;
        let progress = welcome
            .disks
            .into_iter()
            .find(|d| d.disk_id == t.disk.disk_id)
            .ok_or_else(|| {
                SessionError::Protocol(format!(
                    "the welcome says nothing about disk {}",
                    t.disk.disk_id
                ))
            })?;
        Ok(Session {
            out,
            inbound,
            state: Peer {
                url: t.url.clone(),
                heartbeat: t.heartbeat,
                disk_id: t.disk.disk_id.clone(),
                paused: false,
            },
            welcome: progress,
        })
    }

    /// Sends, reads acks and sends heartbeats until the pass is done (`Ok`) or the stream
    /// fails. Resumption after what the welcome said is the caller's job.
    pub async fn drive(&mut self, transfer: &mut Transfer) -> Result<(), SessionError> {
        let every = self.state.heartbeat;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat_due = false;
        while !transfer.done() {
            let can_send = heartbeat_due || (!self.state.paused && transfer.has_unsent());
            tokio::select! {
                msg = self.inbound.next() => self.state.receive(msg, transfer)?,
                permit = self.out.reserve(), if can_send => {
                    let permit = permit.map_err(|_| {
                        SessionError::Lost("the outbound stream closed".into())
                    })?;
                    if heartbeat_due {
                        heartbeat_due = false;
                        permit.send(AgentMessage {
                            body: Some(Out::Heartbeat(Heartbeat {
                                time_unix_ms: protocol::now_unix_ms(),
                            })),
                        });
                    } else {
                        let batch = transfer.next_to_send().expect("can_send checked it");
                        permit.send(AgentMessage { body: Some(Out::Batch(batch)) });
                    }
                }
                pulled = transfer.pull(), if transfer.wants_batch() => pulled?,
                _ = heartbeat.tick() => heartbeat_due = true,
            }
        }
        Ok(())
    }
}

impl Peer {
    fn receive(
        &mut self,
        msg: Option<Result<ProcessServerMessage, tonic::Status>>,
        transfer: &mut Transfer,
    ) -> Result<(), SessionError> {
        let body = match msg {
            Some(Ok(m)) => m.body,
            Some(Err(s)) => return Err(SessionError::from_status(&self.url, &s)),
            None => {
                return Err(SessionError::Lost(
                    "the process server closed the stream".into(),
                ));
            }
        };
        match body {
            Some(In::Ack(p)) if p.disk_id == self.disk_id => transfer.ack(&p)?,
            // Acks for disks of other agents' declarations are not ours to track.
            Some(In::Ack(_)) => {}
            Some(In::Pause(p)) => {
                if p.paused && !self.paused {
                    tracing::info!(
                        "the process server paused intake ({}); holding new batches",
                        p.reason
                    );
                } else if !p.paused && self.paused {
                    tracing::info!("the process server resumed intake");
                }
                self.paused = p.paused;
                transfer.paused(p.paused);
            }
            Some(In::Error(e)) => return Err(Refusal::from_report(&e).into()),
            Some(In::Welcome(_)) => {
                return Err(SessionError::Protocol("a second welcome".into()));
            }
            None => return Err(SessionError::Protocol("an empty message".into())),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_statuses_are_retryable_and_refusals_are_not() {
        let url = "http://ps:9443";
        for s in [
            tonic::Status::unavailable("gone"),
            tonic::Status::unknown("h2 protocol error"),
            tonic::Status::cancelled("reset"),
            tonic::Status::internal("broken pipe"),
        ] {
            let e = SessionError::from_status(url, &s);
            assert!(e.is_retryable(), "{s:?} -> {e}");
        }
        for s in [
            tonic::Status::unauthenticated("wrong passphrase"),
            tonic::Status::invalid_argument("bad hello"),
            tonic::Status::unimplemented("not a process server"),
        ] {
            let e = SessionError::from_status(url, &s);
            assert!(!e.is_retryable(), "{s:?} -> {e}");
        }
    }

    #[test]
    fn refusals_follow_the_codes_retry_policy() {
        let refused = |c| SessionError::Refused(Refusal::new(c, "x"));
        assert!(refused(Code::Unavailable).is_retryable());
        assert!(refused(Code::NoSpace).is_retryable());
        for c in [
            Code::AuthFailed,
            Code::BadBatch,
            Code::DiskConflict,
            Code::DiskNameCollision,
            Code::OutOfSequence,
        ] {
            assert!(!refused(c).is_retryable(), "{c:?}");
        }
        assert!(
            refused(Code::DiskNameCollision)
                .to_string()
                .starts_with("error 78052: ")
        );
    }
}
