//! What the in-process fake process servers of `tests/sync.rs` and `tests/replicate.rs`
//! share: messages, the challenge, batch application, disk hashes, serving, and the target.

use std::time::Duration;

use agent::session::Target;
use agent::sync::disk_info;
use protocol::auth::{ClientAuth, Passphrase, ServerAuth};
use protocol::batch::decode_into;
use protocol::limits::MAX_MESSAGE_BYTES;
use protocol::pb::differential_server::{Differential, DifferentialServer};
use protocol::pb::process_server_message::Body as ServerBody;
use protocol::pb::process_server_server::{ProcessServer, ProcessServerServer};
use protocol::pb::{
    Batch, ChallengeReply, DiskFormat, DiskProgress, ProcessServerMessage, ServerWelcome,
};
use protocol::transport::{TlsFiles, WanTuning};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Response, Status};

pub const PASS: &str = "a test passphrase";

pub type Reply = Result<ProcessServerMessage, Status>;

pub fn msg(body: ServerBody) -> Reply {
    Ok(ProcessServerMessage { body: Some(body) })
}

/// The fake's answer to a challenge request.
pub fn challenge(auth: &ServerAuth) -> Result<Response<ChallengeReply>, Status> {
    Ok(Response::new(ChallengeReply {
        server_nonce: auth.challenge().into(),
    }))
}

/// Progress of `disk_id` with `seq` both cached and applied.
pub fn progress(disk_id: &str, seq: u64) -> DiskProgress {
    DiskProgress {
        disk_id: disk_id.to_string(),
        cached_seq: seq,
        applied_seq: seq,
    }
}

/// The welcome for one disk at `cached` seq.
pub fn welcome(proof: Vec<u8>, disk_id: &str, cached: u64) -> Reply {
    msg(ServerBody::Welcome(ServerWelcome {
        server_proof: proof.into(),
        disks: vec![progress(disk_id, cached)],
    }))
}

/// Applies the writes and zero extents of `b` to `disk` (`buf` is reused between calls).
pub fn apply(disk: &mut [u8], b: &Batch, capacity: u64, buf: &mut Vec<u8>) {
    let d = decode_into(b, capacity, buf).expect("a valid batch");
    for (off, data) in d.writes() {
        disk[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    for z in &b.zeros {
        disk[z.offset as usize..(z.offset + z.length) as usize].fill(0);
    }
}

/// The hashes and the zero-chunk bitmap of chunks `first..end` of `disk`, `chunk` bytes each.
pub fn hash_page(disk: &[u8], first: u64, end: u64, chunk: usize) -> (Vec<u8>, Vec<u8>) {
    let mut hashes = Vec::new();
    let mut zeros = vec![0u8; (end.saturating_sub(first) as usize).div_ceil(8)];
    for (i, c) in (first..end).enumerate() {
        let from = c as usize * chunk;
        let data = &disk[from..(from + chunk).min(disk.len())];
        if data.iter().all(|&b| b == 0) {
            zeros[i / 8] |= 1 << (i % 8);
            hashes.extend_from_slice(&[0u8; 16]);
        } else {
            hashes.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(data).to_le_bytes());
        }
    }
    (hashes, zeros)
}

/// Serves `fake` and `hashes` on 127.0.0.1:0 in the background; returns the URL.
pub async fn serve<P: ProcessServer, D: Differential>(fake: P, hashes: D) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let svc = ProcessServerServer::new(fake)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tokio::spawn(
        WanTuning::default()
            .server(&TlsFiles::default())
            .unwrap()
            .add_service(svc)
            .add_service(DifferentialServer::new(hashes))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    url
}

/// The fake at `url` as the agent's target for disk `disk_id`.
pub fn target(url: &str, disk_id: &str) -> Target {
    Target {
        url: url.to_string(),
        tuning: WanTuning::default(),
        tls: TlsFiles::default(),
        auth: ClientAuth::new(Passphrase::new(PASS).unwrap(), "test-agent"),
        disk: disk_info(disk_id, "vm1_disk0", DiskFormat::Vmfs),
        heartbeat: Duration::from_secs(5),
    }
}
