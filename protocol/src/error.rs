//! Error codes users of the service know, and the typed errors of this crate.

use std::fmt;

/// Stable numeric error codes. Values named by the design keep the numbers the service
/// documents; the others are this product's own and never change once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Code {
    /// Something unexpected; the message says what.
    Internal = 1,
    /// The peer speaks another protocol version.
    VersionMismatch = 2,
    /// Wrong or missing passphrase proof.
    AuthFailed = 3,
    /// A message that breaks the protocol (wrong first message, missing field...).
    BadRequest = 4,
    /// A batch failed a check (CRC, size, extent out of range or overlapping...).
    BadBatch = 5,
    /// A batch's seq is not the next one expected.
    OutOfSequence = 6,
    /// A batch for a disk the hello did not declare.
    UnknownDisk = 7,
    /// A disk declaration that conflicts with what is stored (capacity, name, id).
    DiskConflict = 8,
    /// Storage is full (cache, retention or datastore).
    NoSpace = 9,
    /// An I/O error on stored data; the message names the file.
    Io = 10,
    /// The server is shutting down or overloaded; retry later.
    Unavailable = 11,
    /// The target disk has snapshots (delta disks); remove them first.
    DiskHasSnapshots = 12,
    /// The datastore is on NFS or not writable.
    DatastoreNotUsable = 8061,
    /// A new disk's name is already used by another disk on the datastore.
    DiskNameCollision = 78052,
    /// A disk whose agent stopped sending heartbeats.
    AgentNotRunning = 78093,
    /// The agent cannot reach its process server.
    ProcessServerUnreachable = 95226,
}

impl Code {
    /// The numeric value carried in `ErrorReport.code`.
    pub fn value(self) -> u32 {
        self as u32
    }

    /// The code for a numeric value, if it is one we know.
    pub fn from_value(v: u32) -> Option<Code> {
        use Code::*;
        [
            Internal,
            VersionMismatch,
            AuthFailed,
            BadRequest,
            BadBatch,
            OutOfSequence,
            UnknownDisk,
            DiskConflict,
            NoSpace,
            Io,
            Unavailable,
            DiskHasSnapshots,
            DatastoreNotUsable,
            DiskNameCollision,
            AgentNotRunning,
            ProcessServerUnreachable,
        ]
        .into_iter()
        .find(|c| c.value() == v)
    }

    /// Whether a client should retry after this error (with backoff) rather than give up.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Code::Unavailable | Code::NoSpace | Code::ProcessServerUnreachable
        )
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value())
    }
}

/// A refusal with its code, as sent in `ErrorReport` and shown to users as
/// `error <code>: <message>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("error {code}: {message}")]
pub struct Refusal {
    pub code: Code,
    pub disk_id: String,
    pub message: String,
}

impl Refusal {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Refusal {
            code,
            disk_id: String::new(),
            message: message.into(),
        }
    }

    pub fn for_disk(code: Code, disk_id: &str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            disk_id: disk_id.to_string(),
            message: message.into(),
        }
    }

    pub fn to_report(&self) -> crate::pb::ErrorReport {
        crate::pb::ErrorReport {
            code: self.code.value(),
            disk_id: self.disk_id.clone(),
            message: self.message.clone(),
        }
    }

    pub fn from_report(r: &crate::pb::ErrorReport) -> Self {
        Refusal {
            code: Code::from_value(r.code).unwrap_or(Code::Internal),
            disk_id: r.disk_id.clone(),
            message: r.message.clone(),
        }
    }

    /// The gRPC status for a refusal answered outside a stream (unary calls, stream open).
    pub fn to_status(&self) -> tonic::Status {
        let grpc = match self.code {
            Code::AuthFailed => tonic::Code::Unauthenticated,
            Code::VersionMismatch | Code::BadRequest | Code::BadBatch => {
                tonic::Code::InvalidArgument
            }
            Code::OutOfSequence => tonic::Code::FailedPrecondition,
            Code::UnknownDisk => tonic::Code::NotFound,
            Code::NoSpace => tonic::Code::ResourceExhausted,
            Code::Unavailable | Code::ProcessServerUnreachable => tonic::Code::Unavailable,
            _ => tonic::Code::FailedPrecondition,
        };
        tonic::Status::new(grpc, self.to_string())
    }
}
