//! Hostile connections against the real servers: messages over the size limit, a thousand
//! streams that never say hello, and clients that send one byte a second. Each is refused
//! or cut off after a timeout while an honest agent keeps replicating, and no stored byte
//! changes.

mod common;

use std::time::Duration;

use bench::cluster::Cluster;
use bench::{verify, workload};
use protocol::limits::{HELLO_TIMEOUT, MAX_MESSAGE_BYTES};
use protocol::pb::master_target_client::MasterTargetClient;
use protocol::pb::process_server_client::ProcessServerClient;
use protocol::pb::{
    AgentMessage, ApplyMessage, Batch, ForwardMessage, ProcessServerMessage, agent_message,
    apply_message, forward_message, process_server_message,
};
use protocol::transport::{TlsFiles, WanTuning};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const CAPACITY: u64 = 8 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A plain channel to `url`, with no client-side message limit: the server's limit is what
/// is under test.
async fn channel(url: &str) -> Channel {
    WanTuning::default()
        .endpoint(url, &TlsFiles::default())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A batch whose encoding is larger than any message the servers accept.
fn oversized_batch() -> Batch {
    Batch {
        disk_id: "disk-huge".into(),
        seq: 1,
        payload: vec![0x5a; MAX_MESSAGE_BYTES + (1 << 20)].into(),
        ..Default::default()
    }
}

/// What a server answered on a stream: an error report or the stream's status, as text.
enum Reply {
    Refused(String),
    Ended,
    Silent,
}

async fn first_refusal<M>(
    mut rx: tonic::Streaming<M>,
    wait: Duration,
    error_of: fn(M) -> Option<String>,
) -> Reply {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, rx.message()).await {
            Err(_) => return Reply::Silent,
            Ok(Ok(None)) => return Reply::Ended,
            Ok(Err(status)) => return Reply::Refused(status.message().to_string()),
            Ok(Ok(Some(m))) => {
                if let Some(text) = error_of(m) {
                    return Reply::Refused(text);
                }
            }
        }
    }
}

fn ps_error(m: ProcessServerMessage) -> Option<String> {
    match m.body {
        Some(process_server_message::Body::Error(e)) => {
            Some(format!("error {}: {}", e.code, e.message))
        }
        _ => None,
    }
}

fn mt_error(m: ApplyMessage) -> Option<String> {
    match m.body {
        Some(apply_message::Body::Error(e)) => Some(format!("error {}: {}", e.code, e.message)),
        _ => None,
    }
}

/// Opens a Replicate stream that sends `first` (or nothing) and keeps it open.
async fn ps_stream(
    ch: Channel,
    first: Option<AgentMessage>,
) -> Result<
    (
        tonic::Streaming<ProcessServerMessage>,
        mpsc::Sender<AgentMessage>,
    ),
    String,
> {
    let (tx, out) = mpsc::channel(1);
    if let Some(m) = first {
        tx.send(m).await.unwrap();
    }
    let mut client = ProcessServerClient::new(ch).max_encoding_message_size(usize::MAX);
    match client.replicate(ReceiverStream::new(out)).await {
        Ok(r) => Ok((r.into_inner(), tx)),
        Err(s) => Err(s.message().to_string()),
    }
}

async fn mt_stream(
    ch: Channel,
    first: Option<ForwardMessage>,
) -> Result<(tonic::Streaming<ApplyMessage>, mpsc::Sender<ForwardMessage>), String> {
    let (tx, out) = mpsc::channel(1);
    if let Some(m) = first {
        tx.send(m).await.unwrap();
    }
    let mut client = MasterTargetClient::new(ch).max_encoding_message_size(usize::MAX);
    match client.apply(ReceiverStream::new(out)).await {
        Ok(r) => Ok((r.into_inner(), tx)),
        Err(s) => Err(s.message().to_string()),
    }
}

fn refused(r: Result<Reply, String>) -> String {
    match r {
        Ok(Reply::Refused(text)) | Err(text) => text,
        Ok(Reply::Ended) => panic!("stream ended without a refusal"),
        Ok(Reply::Silent) => panic!("stream was neither refused nor cut off"),
    }
}

/// A synced honest disk, and its replica's bytes.
fn honest_cluster(dir: &std::path::Path) -> (Cluster, std::path::PathBuf, Vec<u8>) {
    let c = common::cluster(dir);
    let source = dir.join("good.raw");
    workload::generate_disk(&source, CAPACITY, 11).unwrap();
    common::sync_ok(&c, &source, "disk-good", "good");
    let before = std::fs::read(c.flat_path("good")).unwrap();
    (c, source, before)
}

#[test]
fn oversized_messages_are_refused_before_anything_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (c, source, before) = honest_cluster(dir.path());
    let rt = runtime();
    let (ps, mt) = rt.block_on(async {
        let ps = ps_stream(
            channel(&c.ps_url()).await,
            Some(AgentMessage {
                body: Some(agent_message::Body::Batch(oversized_batch())),
            }),
        )
        .await;
        let ps = match ps {
            Ok((rx, _tx)) => Ok(first_refusal(rx, Duration::from_secs(20), ps_error).await),
            Err(e) => Err(e),
        };
        let mt = mt_stream(
            channel(&c.mt_url()).await,
            Some(ForwardMessage {
                body: Some(forward_message::Body::Batch(oversized_batch())),
            }),
        )
        .await;
        let mt = match mt {
            Ok((rx, _tx)) => Ok(first_refusal(rx, Duration::from_secs(20), mt_error).await),
            Err(e) => Err(e),
        };
        (ps, mt)
    });
    for (who, r) in [("process server", ps), ("master target", mt)] {
        let text = refused(r);
        assert!(
            text.contains("too large") || text.contains("length"),
            "{who}: expected a size refusal, got {text:?}\n{}",
            c.log_tails()
        );
    }
    assert!(!c.flat_path("disk_huge").exists() && !c.flat_path("huge").exists());
    assert_eq!(std::fs::read(c.flat_path("good")).unwrap(), before);

    workload::churn(&source, 5, 17).unwrap();
    common::sync_ok(&c, &source, "disk-good", "good");
    verify::files_equal(&c.flat_path("good"), &source).unwrap();
}

/// Streams per connection and connections: 16 x 63 = 1008 silent streams.
const SILENT_CONNECTIONS: usize = 16;
const SILENT_PER_CONNECTION: usize = 63;

#[test]
fn silent_streams_and_one_byte_a_second_clients_are_cut_off_while_replication_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (c, source, _) = honest_cluster(dir.path());
    let rt = runtime();

    // A thousand Replicate streams that never send their hello, and a few Apply streams on
    // the master target, plus raw clients dribbling the HTTP/2 preface a byte a second.
    let ps_url = c.ps_url();
    let mt_url = c.mt_url();
    let hostile = rt.spawn(async move {
        let mut streams = Vec::new();
        for _ in 0..SILENT_CONNECTIONS {
            let ch = channel(&ps_url).await;
            for _ in 0..SILENT_PER_CONNECTION {
                let ch = ch.clone();
                streams.push(tokio::spawn(async move {
                    match ps_stream(ch, None).await {
                        Ok((rx, _tx)) => Ok(first_refusal(rx, HELLO_TIMEOUT * 4, ps_error).await),
                        Err(e) => Err(e),
                    }
                }));
            }
        }
        let mt_ch = channel(&mt_url).await;
        let mut mt_streams = Vec::new();
        for _ in 0..32 {
            let ch = mt_ch.clone();
            mt_streams.push(tokio::spawn(async move {
                match mt_stream(ch, None).await {
                    Ok((rx, _tx)) => Ok(first_refusal(rx, HELLO_TIMEOUT * 4, mt_error).await),
                    Err(e) => Err(e),
                }
            }));
        }
        let mut dribblers = Vec::new();
        for addr in [&ps_url, &mt_url, &ps_url] {
            let addr = addr.trim_start_matches("http://").to_string();
            dribblers.push(tokio::spawn(dribble_preface(addr)));
        }
        let mut ps_out = Vec::new();
        for s in streams {
            ps_out.push(s.await.unwrap());
        }
        let mut mt_out = Vec::new();
        for s in mt_streams {
            mt_out.push(s.await.unwrap());
        }
        let mut cut = Vec::new();
        for d in dribblers {
            cut.push(d.await.unwrap());
        }
        (ps_out, mt_out, cut)
    });

    // Meanwhile an honest agent replicates through the same servers.
    workload::churn(&source, 9, 23).unwrap();
    common::sync_ok(&c, &source, "disk-good", "good");
    verify::files_equal(&c.flat_path("good"), &source).unwrap();

    let (ps_out, mt_out, cut) = rt.block_on(hostile).unwrap();
    assert_eq!(ps_out.len(), SILENT_CONNECTIONS * SILENT_PER_CONNECTION);
    for (who, outcomes) in [("process server", ps_out), ("master target", mt_out)] {
        for r in outcomes {
            let text = refused(r);
            assert!(
                text.contains("no hello"),
                "{who}: a silent stream got {text:?}\n{}",
                c.log_tails()
            );
        }
    }
    for (i, sent) in cut.into_iter().enumerate() {
        let sent = sent.unwrap_or_else(|e| panic!("dribbler {i}: {e}"));
        assert!(
            sent < 24,
            "dribbler {i} was allowed to finish the preface ({sent} bytes)"
        );
    }

    // The servers still answer and replicate after the storm.
    workload::churn(&source, 4, 29).unwrap();
    common::sync_ok(&c, &source, "disk-good", "good");
    verify::files_equal(&c.flat_path("good"), &source).unwrap();
}

/// Sends the HTTP/2 client preface one byte a second until the server closes the
/// connection; returns how many bytes it got to send.
async fn dribble_preface(addr: String) -> Result<usize, String> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    for (i, b) in PREFACE.iter().enumerate() {
        if s.write_all(&[*b]).await.is_err() {
            return Ok(i);
        }
        // Whatever the server sends (its SETTINGS), a closed read means we were cut off.
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            match r {
                Ok(0) | Err(_) => return Ok(i + 1),
                Ok(_) => {}
            }
        }
    }
    // Sent it all: see whether the server now closes (it should have long before).
    Ok(PREFACE.len())
}
