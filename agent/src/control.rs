//! The control API of `agent replicate --control-listen`: one JSON object per line each
//! way over plain TCP, authenticated with the shared passphrase.
//!
//! ```text
//! server: {"challenge":"<hex nonce>"}
//! client: {"auth":{"protocol_version":1,"identity":"..","server_nonce":"<hex>",
//!                  "client_nonce":"<hex>","proof":"<hex>"}}
//! server: {"ok":true,"server_proof":"<hex>"}     or {"ok":false,"error":".."} and close
//! then any number of requests, each answered by one reply line:
//! client: {"op":"status"}
//! server: {"ok":true,"disks":[{"disk_id":..,"mode":"continuous","last_seq_sent":..,..}]}
//! client: {"op":"marker","disk_id":"..","kind":"crash"|"app"|"user","tag":".."}
//!         (without "disk_id": on every disk of the agent at one instant, a group marker)
//! server: {"ok":true,"marker_id":".."}            or {"ok":false,"error":".."}
//! ```
//!
//! The proofs are those of `protocol::auth` (HMAC over the nonces and identity), so a client
//! without the passphrase learns nothing and can do nothing, and the client checks the
//! server's proof before it trusts an answer. Lines are bounded ([`MAX_LINE`]) since they
//! come from the network; a connection idle for [`IDLE`] is closed; at most
//! [`MAX_CONNECTIONS`] are served at once, and one more is answered
//! `{"ok":false,"error":"too many control connections ..."}` and closed.

use std::sync::Arc;
use std::time::Duration;

use protocol::auth::{ClientAuth, Passphrase, ServerAuth};
use protocol::pb::{Auth, Marker, MarkerKind};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::replicate::Controls;

/// Longest line accepted either way.
pub const MAX_LINE: u64 = 1 << 20;
/// A connection that sends nothing for this long is closed.
pub const IDLE: Duration = Duration::from_secs(300);
/// Connections served at once. Each costs a task and up to two [`MAX_LINE`] buffers, and an
/// unauthenticated one may sit for [`IDLE`]: without a cap, anyone who can reach the port
/// could hold any number. A few `status --watch` and scripts need far fewer.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest wait for the refusal of a connection over the cap to be written (a fresh socket
/// takes one short line at once; this only bounds a peer that misbehaves).
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for a reply by the client commands.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("control connection: a line over {MAX_LINE} bytes")]
    LineTooLong,
    #[error("control connection closed by the peer")]
    Closed,
    #[error("control connection: bad message: {0}")]
    BadMessage(String),
    #[error("{0}")]
    Refused(String),
    #[error("no answer within {}s", CLIENT_TIMEOUT.as_secs())]
    Timeout,
}

/// Marker kinds as the control API spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Crash,
    App,
    User,
}

impl From<Kind> for MarkerKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Crash => MarkerKind::Crash,
            Kind::App => MarkerKind::App,
            Kind::User => MarkerKind::User,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status,
    Marker {
        /// One disk alone; absent: every disk of the agent at one instant (a group marker).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk_id: Option<String>,
        kind: Kind,
        #[serde(default)]
        tag: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_proof: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker_id: Option<String>,
}

impl Reply {
    fn error(e: impl ToString) -> Reply {
        Reply {
            error: Some(e.to_string()),
            ..Reply::default()
        }
    }
}

/// The client's proof, hex-encoded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuthLine {
    pub auth: HexAuth,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HexAuth {
    pub protocol_version: u32,
    pub identity: String,
    pub server_nonce: String,
    pub client_nonce: String,
    pub proof: String,
}

impl HexAuth {
    fn from_auth(a: &Auth) -> Self {
        HexAuth {
            protocol_version: a.protocol_version,
            identity: a.identity.clone(),
            server_nonce: hex::encode(&a.server_nonce),
            client_nonce: hex::encode(&a.client_nonce),
            proof: hex::encode(&a.proof),
        }
    }

    fn to_auth(&self) -> Option<Auth> {
        Some(Auth {
            protocol_version: self.protocol_version,
            identity: self.identity.clone(),
            server_nonce: hex::decode(&self.server_nonce).ok()?.into(),
            client_nonce: hex::decode(&self.client_nonce).ok()?.into(),
            proof: hex::decode(&self.proof).ok()?.into(),
        })
    }
}

/// One disk as `agent status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskStatus {
    pub disk_id: String,
    pub name: String,
    /// full-sync, catch-up, continuous, paused (by the process server) or bitmap.
    pub mode: String,
    /// Highest seq cut into a batch.
    pub last_seq_produced: u64,
    pub last_seq_sent: u64,
    /// Highest seq durable in the process server's cache.
    pub cached_seq: u64,
    pub applied_seq: u64,
    /// Encoded bytes not yet durable at the process server.
    pub backlog_bytes: u64,
    pub last_marker: Option<MarkerStatus>,
    /// The last failure worth knowing about (e.g. a failed quiesce hook).
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MarkerStatus {
    pub id: String,
    pub kind: String,
    pub tag: String,
    pub time_unix_ms: i64,
}

impl From<&Marker> for MarkerStatus {
    fn from(m: &Marker) -> Self {
        MarkerStatus {
            id: m.id.clone(),
            kind: match MarkerKind::try_from(m.kind) {
                Ok(MarkerKind::App) => "app",
                Ok(MarkerKind::User) => "user",
                _ => "crash",
            }
            .to_string(),
            tag: m.tag.clone(),
            time_unix_ms: m.time_unix_ms,
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes; `Ok(None)` at a clean end of stream.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<String>, ControlError> {
    let mut buf = Vec::new();
    let n = (&mut *r).take(MAX_LINE).read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if n as u64 >= MAX_LINE {
            ControlError::LineTooLong
        } else {
            ControlError::Closed
        });
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|e| ControlError::BadMessage(e.to_string()))
}

async fn write_line<W: AsyncWriteExt + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), ControlError> {
    let mut line = serde_json::to_vec(msg).map_err(|e| ControlError::BadMessage(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await?;
    Ok(())
}

fn parse<T: for<'de> Deserialize<'de>>(line: &str) -> Result<T, ControlError> {
    serde_json::from_str(line).map_err(|e| ControlError::BadMessage(e.to_string()))
}

/// Serves the control API forever, one task per connection, at most [`MAX_CONNECTIONS`] at
/// once.
pub async fn serve(listener: TcpListener, passphrase: Passphrase, controls: Arc<Controls>) {
    let auth = Arc::new(ServerAuth::new(passphrase));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!("control client {peer}: refused, {MAX_CONNECTIONS} open");
                    refuse(stream).await;
                    continue;
                };
                let (auth, controls) = (auth.clone(), controls.clone());
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &auth, &controls).await {
                        tracing::debug!("control client {peer}: {e}");
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!("control accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Tells a connection over the cap why it is closed, in place of the challenge.
async fn refuse(mut stream: TcpStream) {
    let reply = Reply::error(format!(
        "too many control connections ({MAX_CONNECTIONS} open); try again later"
    ));
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, write_line(&mut stream, &reply)).await;
}

async fn connection(
    stream: TcpStream,
    auth: &ServerAuth,
    controls: &Controls,
) -> Result<(), ControlError> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let challenge = Reply {
        ok: true,
        challenge: Some(hex::encode(auth.challenge())),
        ..Reply::default()
    };
    write_line(&mut w, &challenge).await?;
    let line = next_line(&mut r).await?.ok_or(ControlError::Closed)?;
    let proof = parse::<AuthLine>(&line)
        .ok()
        .and_then(|a| a.auth.to_auth())
        .ok_or_else(|| ControlError::BadMessage("expected an auth line".into()))
        .and_then(|a| {
            auth.verify(Some(&a))
                .map_err(|r| ControlError::Refused(r.to_string()))
        });
    let proof = match proof {
        Ok(p) => p,
        Err(e) => {
            write_line(&mut w, &Reply::error(&e)).await?;
            return Err(e);
        }
    };
    let welcome = Reply {
        ok: true,
        server_proof: Some(hex::encode(proof)),
        ..Reply::default()
    };
    write_line(&mut w, &welcome).await?;
    while let Some(line) = next_line(&mut r).await? {
        let reply = match parse::<Request>(&line) {
            Ok(req) => answer(req, controls).await,
            Err(e) => Reply::error(e),
        };
        write_line(&mut w, &reply).await?;
    }
    Ok(())
}

async fn next_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<String>, ControlError> {
    tokio::time::timeout(IDLE, read_line(r))
        .await
        .map_err(|_| ControlError::Timeout)?
}

async fn answer(req: Request, controls: &Controls) -> Reply {
    match req {
        Request::Status => Reply {
            ok: true,
            disks: Some(controls.status()),
            ..Reply::default()
        },
        Request::Marker { disk_id, kind, tag } => {
            match controls.marker(disk_id.as_deref(), kind.into(), &tag).await {
                Ok(m) => Reply {
                    ok: true,
                    marker_id: Some(m.id),
                    ..Reply::default()
                },
                Err(e) => Reply::error(e),
            }
        }
    }
}

/// `agent status` as a table, one line per disk.
pub fn table(disks: &[DiskStatus]) -> String {
    let mut out = format!(
        "{:<24} {:<11} {:>10} {:>10} {:>10} {:>10} {:>14}  {}\n",
        "DISK", "MODE", "PRODUCED", "SENT", "CACHED", "APPLIED", "BACKLOG", "LAST MARKER"
    );
    for d in disks {
        let marker = d
            .last_marker
            .as_ref()
            .map(|m| format!("{} {} {}", m.kind, m.id, m.tag))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<24} {:<11} {:>10} {:>10} {:>10} {:>10} {:>14}  {}\n",
            d.disk_id,
            d.mode,
            d.last_seq_produced,
            d.last_seq_sent,
            d.cached_seq,
            d.applied_seq,
            d.backlog_bytes,
            marker.trim_end()
        ));
        if let Some(e) = &d.last_error {
            out.push_str(&format!("  last error: {e}\n"));
        }
    }
    out
}

/// `HOST:PORT`, optionally written as `tcp://HOST:PORT` (or with http://, as the other
/// commands' URLs are).
pub fn address(url: &str) -> &str {
    ["tcp://", "http://"]
        .iter()
        .find_map(|p| url.strip_prefix(p))
        .unwrap_or(url)
        .trim_end_matches('/')
}

/// Connects to a control API, authenticates both ways, sends `req` and returns the reply.
pub async fn call(url: &str, auth: &ClientAuth, req: &Request) -> Result<Reply, ControlError> {
    tokio::time::timeout(CLIENT_TIMEOUT, call_inner(url, auth, req))
        .await
        .map_err(|_| ControlError::Timeout)?
}

async fn call_inner(url: &str, auth: &ClientAuth, req: &Request) -> Result<Reply, ControlError> {
    let stream = TcpStream::connect(address(url)).await?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut next = async || -> Result<Reply, ControlError> {
        let line = read_line(&mut r).await?.ok_or(ControlError::Closed)?;
        let reply: Reply = parse(&line)?;
        if !reply.ok {
            return Err(ControlError::Refused(reply.error.unwrap_or_default()));
        }
        Ok(reply)
    };
    let nonce = next()
        .await?
        .challenge
        .and_then(|c| hex::decode(c).ok())
        .ok_or_else(|| ControlError::BadMessage("expected a challenge".into()))?;
    let pending = auth.respond(&nonce);
    write_line(
        &mut w,
        &AuthLine {
            auth: HexAuth::from_auth(&pending.auth),
        },
    )
    .await?;
    let proof = next()
        .await?
        .server_proof
        .and_then(|p| hex::decode(p).ok())
        .ok_or_else(|| ControlError::BadMessage("expected the server's proof".into()))?;
    auth.verify_server(&pending, &proof)
        .map_err(|r| ControlError::Refused(r.to_string()))?;
    write_line(&mut w, req).await?;
    next().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shape() {
        let r: Request =
            serde_json::from_str(r#"{"op":"marker","disk_id":"d","kind":"app","tag":"t"}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::Marker {
                disk_id: Some("d".into()),
                kind: Kind::App,
                tag: "t".into()
            }
        );
        let s: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(s, Request::Status);
        assert!(serde_json::from_str::<Request>(r#"{"op":"rm -rf"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Reply::error("x")).unwrap(),
            r#"{"ok":false,"error":"x"}"#
        );
    }

    #[test]
    fn addresses_accept_a_scheme() {
        assert_eq!(address("tcp://127.0.0.1:9"), "127.0.0.1:9");
        assert_eq!(address("http://h:9/"), "h:9");
        assert_eq!(address("h:9"), "h:9");
    }

    #[tokio::test]
    async fn long_lines_are_refused() {
        let data = vec![b'a'; MAX_LINE as usize + 10];
        let mut r = BufReader::new(&data[..]);
        assert!(matches!(
            read_line(&mut r).await,
            Err(ControlError::LineTooLong)
        ));
    }
}
