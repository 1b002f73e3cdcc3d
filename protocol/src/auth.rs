//! Passphrase authentication: challenge-response, mutual, the passphrase never on the wire.
//!
//! 1. The client calls `Challenge` and gets a single-use 32-byte server nonce.
//! 2. It sends `Auth { version, identity, server_nonce, client_nonce, proof }` with
//!    `proof = HMAC-SHA256(passphrase, transcript("client"))`.
//! 3. The server redeems the nonce (unknown, expired or reused nonces fail), checks the proof
//!    in constant time and answers `HMAC-SHA256(passphrase, transcript("server"))`, which the
//!    client checks, so a server that does not know the passphrase is detected too.
//!
//! transcript(side) = "failback-auth/1" 0x00 side 0x00 u32le(version) u64le(len(identity))
//!                    identity server_nonce(32) client_nonce(32)
//!
//! Without TLS an eavesdropper could try passphrases offline against a captured transcript:
//! use a long random passphrase, and TLS on links you do not trust.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use rand::RngCore;
use sha2::Sha256;

use crate::error::{Code, Refusal};
use crate::limits::{MAX_NAME_LEN, PROTOCOL_VERSION};
use crate::pb::Auth;

type HmacSha256 = Hmac<Sha256>;

pub const NONCE_LEN: usize = 32;
/// How long a server nonce stays redeemable.
pub const NONCE_TTL: Duration = Duration::from_secs(60);
/// Most outstanding nonces; the oldest are forgotten first, so a flood of `Challenge`
/// calls costs bounded memory.
pub const MAX_OUTSTANDING_NONCES: usize = 8192;
/// Environment variable read when no `--passphrase-file` is given.
pub const PASSPHRASE_ENV: &str = "FAILBACK_PASSPHRASE";
/// Shortest passphrase accepted.
pub const MIN_PASSPHRASE_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PassphraseError {
    #[error("cannot read passphrase file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "passphrase file {path} is readable by group or others (mode {mode:o}); \
         run `chmod 600 {path}`"
    )]
    TooOpen { path: String, mode: u32 },
    #[error("no passphrase: pass --passphrase-file FILE or set {PASSPHRASE_ENV}")]
    Missing,
    #[error("the passphrase is shorter than {MIN_PASSPHRASE_LEN} characters")]
    TooShort,
}

/// The shared secret. Its Debug output never shows it.
#[derive(Clone)]
pub struct Passphrase(Vec<u8>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

impl Passphrase {
    /// A passphrase from its text (trailing newline removed).
    pub fn new(text: &str) -> Result<Self, PassphraseError> {
        let t = text.trim_end_matches(['\r', '\n']);
        if t.len() < MIN_PASSPHRASE_LEN {
            return Err(PassphraseError::TooShort);
        }
        Ok(Passphrase(t.as_bytes().to_vec()))
    }

    /// Loads from `file` (which must not be readable by group or others) or, without a file,
    /// from `FAILBACK_PASSPHRASE`.
    pub fn load(file: Option<&Path>) -> Result<Self, PassphraseError> {
        match file {
            Some(path) => {
                use std::os::unix::fs::PermissionsExt;
                let shown = path.display().to_string();
                let meta = std::fs::metadata(path).map_err(|source| PassphraseError::Read {
                    path: shown.clone(),
                    source,
                })?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(PassphraseError::TooOpen { path: shown, mode });
                }
                let text =
                    std::fs::read_to_string(path).map_err(|source| PassphraseError::Read {
                        path: shown,
                        source,
                    })?;
                Passphrase::new(&text)
            }
            None => match std::env::var(PASSPHRASE_ENV) {
                Ok(text) if !text.is_empty() => Passphrase::new(&text),
                _ => Err(PassphraseError::Missing),
            },
        }
    }

    fn mac(
        &self,
        side: &str,
        version: u32,
        identity: &str,
        server_nonce: &[u8],
        client_nonce: &[u8],
    ) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"failback-auth/1\0");
        m.update(side.as_bytes());
        m.update(b"\0");
        m.update(&version.to_le_bytes());
        m.update(&(identity.len() as u64).to_le_bytes());
        m.update(identity.as_bytes());
        m.update(server_nonce);
        m.update(client_nonce);
        m
    }
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut n);
    n
}

/// Client side: builds the `Auth` for a server nonce and checks the server's answer.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    passphrase: Passphrase,
    identity: String,
}

/// One authentication attempt in progress on the client.
#[derive(Debug)]
pub struct PendingAuth {
    pub auth: Auth,
}

impl ClientAuth {
    pub fn new(passphrase: Passphrase, identity: impl Into<String>) -> Self {
        ClientAuth {
            passphrase,
            identity: identity.into(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The `Auth` to send after `Challenge` returned `server_nonce`.
    pub fn respond(&self, server_nonce: &[u8]) -> PendingAuth {
        let client_nonce = random_nonce();
        let proof = self
            .passphrase
            .mac(
                "client",
                PROTOCOL_VERSION,
                &self.identity,
                server_nonce,
                &client_nonce,
            )
            .finalize()
            .into_bytes()
            .to_vec();
        PendingAuth {
            auth: Auth {
                protocol_version: PROTOCOL_VERSION,
                identity: self.identity.clone(),
                server_nonce: server_nonce.to_vec().into(),
                client_nonce: client_nonce.to_vec().into(),
                proof: proof.into(),
            },
        }
    }

    /// Checks the server's proof for the attempt `pending`.
    pub fn verify_server(&self, pending: &PendingAuth, server_proof: &[u8]) -> Result<(), Refusal> {
        let a = &pending.auth;
        self.passphrase
            .mac("server", a.protocol_version, &a.identity, &a.server_nonce, &a.client_nonce)
            .verify_slice(server_proof)
            .map_err(|_| {
                Refusal::new(
                    Code::AuthFailed,
                    "the server could not prove it knows the passphrase: check that both sides use the same passphrase",
                )
            })
    }
}

/// Server side: hands out nonces and verifies client proofs.
pub struct ServerAuth {
    passphrase: Passphrase,
    nonces: Mutex<VecDeque<([u8; NONCE_LEN], Instant)>>,
}

impl std::fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServerAuth({} outstanding nonces)",
            self.nonces.lock().len()
        )
    }
}

impl ServerAuth {
    pub fn new(passphrase: Passphrase) -> Self {
        ServerAuth {
            passphrase,
            nonces: Mutex::new(VecDeque::new()),
        }
    }

    /// A fresh single-use nonce for `Challenge`.
    pub fn challenge(&self) -> Vec<u8> {
        let n = random_nonce();
        let mut q = self.nonces.lock();
        let now = Instant::now();
        while q
            .front()
            .is_some_and(|(_, t)| now.duration_since(*t) > NONCE_TTL)
            || q.len() >= MAX_OUTSTANDING_NONCES
        {
            q.pop_front();
        }
        q.push_back((n, now));
        n.to_vec()
    }

    /// Verifies a client's `Auth` (version, nonce, proof) and returns the server proof to
    /// send back. The nonce is used up whatever the outcome.
    pub fn verify(&self, auth: Option<&Auth>) -> Result<Vec<u8>, Refusal> {
        let Some(a) = auth else {
            return Err(Refusal::new(
                Code::AuthFailed,
                "no credentials: the first message must carry auth",
            ));
        };
        if a.protocol_version != PROTOCOL_VERSION {
            return Err(Refusal::new(
                Code::VersionMismatch,
                format!(
                    "protocol version {} is not supported; this server speaks {PROTOCOL_VERSION}",
                    a.protocol_version
                ),
            ));
        }
        if a.identity.len() > MAX_NAME_LEN {
            return Err(Refusal::new(Code::BadRequest, "identity too long"));
        }
        let fresh = {
            let mut q = self.nonces.lock();
            let now = Instant::now();
            match q.iter().position(|(n, _)| n[..] == a.server_nonce[..]) {
                Some(i) => q
                    .remove(i)
                    .is_some_and(|(_, t)| now.duration_since(t) <= NONCE_TTL),
                None => false,
            }
        };
        if !fresh {
            return Err(Refusal::new(
                Code::AuthFailed,
                "authentication failed: unknown, expired or reused challenge",
            ));
        }
        self.passphrase
            .mac(
                "client",
                a.protocol_version,
                &a.identity,
                &a.server_nonce,
                &a.client_nonce,
            )
            .verify_slice(&a.proof)
            .map_err(|_| {
                Refusal::new(
                    Code::AuthFailed,
                    format!(
                        "authentication failed for '{}': wrong passphrase",
                        a.identity
                    ),
                )
            })?;
        Ok(self
            .passphrase
            .mac(
                "server",
                a.protocol_version,
                &a.identity,
                &a.server_nonce,
                &a.client_nonce,
            )
            .finalize()
            .into_bytes()
            .to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(s).unwrap()
    }

    #[test]
    fn matching_passphrases_authenticate_both_ways() {
        let server = ServerAuth::new(pass("correct horse"));
        let client = ClientAuth::new(pass("correct horse\n"), "agent-1");
        let p = client.respond(&server.challenge());
        let proof = server.verify(Some(&p.auth)).unwrap();
        client.verify_server(&p, &proof).unwrap();
    }

    #[test]
    fn wrong_passphrase_is_refused() {
        let server = ServerAuth::new(pass("correct horse"));
        let client = ClientAuth::new(pass("battery staple"), "agent-1");
        let p = client.respond(&server.challenge());
        let e = server.verify(Some(&p.auth)).unwrap_err();
        assert_eq!(e.code, Code::AuthFailed);
        assert!(e.message.contains("wrong passphrase"));
    }

    #[test]
    fn a_nonce_is_single_use() {
        let server = ServerAuth::new(pass("correct horse"));
        let client = ClientAuth::new(pass("correct horse"), "a");
        let p = client.respond(&server.challenge());
        server.verify(Some(&p.auth)).unwrap();
        assert_eq!(
            server.verify(Some(&p.auth)).unwrap_err().code,
            Code::AuthFailed
        );
    }

    #[test]
    fn a_server_without_the_passphrase_is_detected() {
        let client = ClientAuth::new(pass("correct horse"), "a");
        let p = client.respond(&[1; 32]);
        assert!(client.verify_server(&p, &[0; 32]).is_err());
    }

    #[test]
    fn passphrase_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fb-pass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p");
        std::fs::write(&f, "long enough secret\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Passphrase::load(Some(&f)),
            Err(PassphraseError::TooOpen { .. })
        ));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Passphrase::load(Some(&f)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
