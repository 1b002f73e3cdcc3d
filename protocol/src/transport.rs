//! gRPC transport set up for a long fat pipe, with optional TLS.
//!
//! tonic's defaults are wrong for a WAN (PITFALLS.md §1): a server advertises a 1 MiB
//! HTTP/2 stream window, which caps one upload at 1 MiB per round trip (7 MB/s at 150 ms).
//! [`WanTuning`] sets every window, frame, message and keepalive limit explicitly; its
//! defaults suit 1 Gbit/s at 100 ms (bandwidth x delay = 12.5 MB).

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};

use crate::limits::MAX_MESSAGE_BYTES;
use crate::pb::master_target_client::MasterTargetClient;
use crate::pb::process_server_client::ProcessServerClient;

/// Streams one client connection may have open on a server; further streams are refused
/// by HTTP/2 until earlier ones end (an idle stream ends at the role's hello timeout).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Window, frame and keepalive settings for one side of a hop.
#[derive(Debug, Clone)]
pub struct WanTuning {
    /// HTTP/2 stream window in bytes: at least bandwidth x RTT (default 32 MiB).
    pub stream_window: u32,
    /// HTTP/2 connection window in bytes: stream window x concurrent streams (default 64 MiB).
    pub connection_window: u32,
    /// Largest HTTP/2 frame the receiver accepts (default 1 MiB; h2 default is 16 KiB).
    pub max_frame: u32,
    /// HTTP/2 PING interval, so VPN/NAT gear does not drop an idle flow (default 15 s).
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the connection (default 20 s).
    pub keepalive_timeout: Duration,
    /// TCP keepalive (default 30 s).
    pub tcp_keepalive: Duration,
    /// Connect timeout of clients (default 10 s).
    pub connect_timeout: Duration,
}

impl Default for WanTuning {
    fn default() -> Self {
        WanTuning {
            stream_window: 32 << 20,
            connection_window: 64 << 20,
            max_frame: 1 << 20,
            keepalive_interval: Duration::from_secs(15),
            keepalive_timeout: Duration::from_secs(20),
            tcp_keepalive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Certificate files. A server serves TLS when it has `cert` and `key`, and requires client
/// certificates signed by `client_ca` when that is set (mutual TLS). A client trusts servers
/// signed by `ca` and presents `cert`/`key` when it has them.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("TLS needs both --tls-cert and --tls-key")]
    HalfIdentity,
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    KeyTooOpen { path: String, mode: u32 },
    #[error("https:// URL {0} needs --tls-ca (the CA that signed the server's certificate)")]
    NoCa(String),
    #[error("invalid URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("TLS setup: {0}")]
    Tls(#[from] tonic::transport::Error),
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl TlsFiles {
    /// Whether a server with these files serves TLS.
    pub fn serves_tls(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.client_ca.is_some()
    }

    fn identity(&self) -> Result<Option<Identity>, TransportError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(key)
                    .map_err(|source| TransportError::Read {
                        what: "TLS key",
                        path: key.display().to_string(),
                        source,
                    })?
                    .permissions()
                    .mode()
                    & 0o777;
                if mode & 0o077 != 0 {
                    return Err(TransportError::KeyTooOpen {
                        path: key.display().to_string(),
                        mode,
                    });
                }
                Ok(Some(Identity::from_pem(
                    read("TLS certificate", cert)?,
                    read("TLS key", key)?,
                )))
            }
            (None, None) => Ok(None),
            _ => Err(TransportError::HalfIdentity),
        }
    }

    /// The server-side TLS configuration, or `None` when TLS is off.
    pub fn server_config(&self) -> Result<Option<ServerTlsConfig>, TransportError> {
        if !self.serves_tls() {
            return Ok(None);
        }
        let identity = self.identity()?.ok_or(TransportError::HalfIdentity)?;
        let mut cfg = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read("TLS client CA", ca)?));
        }
        Ok(Some(cfg))
    }

    fn client_config(&self, url: &str) -> Result<Option<ClientTlsConfig>, TransportError> {
        if !url.starts_with("https://") {
            return Ok(None);
        }
        let ca = self
            .ca
            .as_ref()
            .ok_or_else(|| TransportError::NoCa(url.to_string()))?;
        let mut cfg =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("TLS CA", ca)?));
        if let Some(identity) = self.identity()? {
            cfg = cfg.identity(identity);
        }
        Ok(Some(cfg))
    }
}

impl WanTuning {
    /// A server builder with these windows, frame size and keepalives (and TLS if given).
    pub fn server(&self, tls: &TlsFiles) -> Result<Server, TransportError> {
        let mut s = Server::builder()
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
            .tcp_keepalive(Some(self.tcp_keepalive))
            .tcp_nodelay(true)
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
        if let Some(cfg) = tls.server_config()? {
            s = s.tls_config(cfg)?;
        }
        Ok(s)
    }

    /// A client endpoint for `url` (`http://` or `https://HOST:PORT`).
    pub fn endpoint(&self, url: &str, tls: &TlsFiles) -> Result<Endpoint, TransportError> {
        let bad = |reason: String| TransportError::BadUrl {
            url: url.to_string(),
            reason,
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad("expected http://HOST:PORT or https://HOST:PORT".into()));
        }
        let mut e = Endpoint::from_shared(url.to_string())
            .map_err(|e| bad(e.to_string()))?
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .http2_keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(self.tcp_keepalive))
            .tcp_nodelay(true)
            .connect_timeout(self.connect_timeout);
        if let Some(cfg) = tls.client_config(url)? {
            e = e.tls_config(cfg)?;
        }
        Ok(e)
    }
}

/// A process-server client with the message limits set (never tonic's 4 MiB default).
pub fn process_server_client(ch: Channel) -> ProcessServerClient<Channel> {
    ProcessServerClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A master-target client with the message limits set.
pub fn master_target_client(ch: Channel) -> MasterTargetClient<Channel> {
    MasterTargetClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A client of the `Differential` service (chunk hashes) with the message limits set.
pub fn differential_client(
    ch: Channel,
) -> crate::pb::differential_client::DifferentialClient<Channel> {
    crate::pb::differential_client::DifferentialClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}
