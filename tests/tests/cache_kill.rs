//! SIGKILL of the real process server while batches stream into its cache (group commits
//! in flight), five times over: every batch it acknowledged as cached is still there after
//! the restart (its welcome resumes at or past the last ack), and once the master target
//! is back, the target disk holds exactly the writes of every cached seq. Before the last
//! restart the newest segment also gets a torn tail (a record header with only part of its
//! bytes, the file truncated there): it is cut at recovery and appends go on after it.
//!
//! The master target is down during the kills, so what the welcome reports can only come
//! from the cache log's recovery, not from the master target's applied seq.

mod common;

use std::time::Duration;

use bench::cluster::Cluster;
use protocol::batch::BatchBuilder;
use protocol::pb::{
    AgentMessage, Batch, DiskInfo, DiskProgress, agent_message, process_server_message,
};
use tokio::sync::{mpsc, oneshot};

const DISK_ID: &str = "disk-cache-kill-1";
const NAME: &str = "cachekill";
const BLOCK: u64 = 64 << 10;
const BLOCKS: u64 = 128;
const CAPACITY: u64 = BLOCK * BLOCKS;
const ROUNDS: u64 = 5;
/// Bound of every wait.
const TIMEOUT: Duration = Duration::from_secs(60);

fn disk() -> DiskInfo {
    DiskInfo {
        disk_id: DISK_ID.into(),
        name: NAME.into(),
        capacity: CAPACITY,
        format: 0,
        group: String::new(),
    }
}

/// Where seq `seq` writes, and what: one 64 KiB block, a different one each seq (mod the
/// disk), filled from the seq so that any re-sent seq carries the same bytes.
fn block_of(seq: u64) -> (u64, Vec<u8>) {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data = (0..BLOCK / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    ((seq * 7 % BLOCKS) * BLOCK, data)
}

fn batch(seq: u64) -> Batch {
    let (offset, data) = block_of(seq);
    let mut b = BatchBuilder::new();
    b.push_write(offset, &data);
    b.finish(DISK_ID, seq, protocol::now_unix_ms(), 0)
}

/// One agent connection: its outbound queue, and the progress reports it receives.
struct Stream {
    tx: mpsc::Sender<AgentMessage>,
    rx: tonic::Streaming<protocol::pb::ProcessServerMessage>,
    welcome: DiskProgress,
}

async fn connect(c: &Cluster) -> Stream {
    let (tx, answer) = common::replicate_stream(c, vec![disk()], true).await;
    let mut rx = answer.unwrap();
    loop {
        let m = rx.message().await.unwrap().expect("a welcome");
        match m.body {
            Some(process_server_message::Body::Welcome(w)) => {
                let welcome = w.disks.into_iter().next().expect("the disk's progress");
                return Stream { tx, rx, welcome };
            }
            Some(process_server_message::Body::Error(e)) => panic!("refused: {e:?}"),
            _ => {}
        }
    }
}

/// Sends seqs from `next` on until the stream breaks (the process server was killed); says
/// on `first_ack` when the first of them is acknowledged; returns the highest cached seq
/// acknowledged.
async fn stream_until_killed(s: Stream, next: u64, first_ack: oneshot::Sender<()>) -> u64 {
    let Stream {
        tx,
        mut rx,
        welcome,
    } = s;
    let sender = tokio::spawn(async move {
        for seq in next.. {
            let m = AgentMessage {
                body: Some(agent_message::Body::Batch(batch(seq))),
            };
            if tx.send(m).await.is_err() {
                return;
            }
            // About 30 MB/s: many group commits per round, little for the master target to
            // apply at the end.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let mut acked = welcome.cached_seq;
    let mut first_ack = Some(first_ack);
    while let Ok(Some(m)) = rx.message().await {
        if let Some(process_server_message::Body::Ack(p)) = m.body {
            acked = acked.max(p.cached_seq);
            if acked >= next
                && let Some(tx) = first_ack.take()
            {
                let _ = tx.send(());
            }
        }
    }
    sender.abort();
    acked
}

/// Appends a torn record to the newest segment of the cache in `dir`: a header that
/// promises a 64 KiB batch, then 2,000 bytes of it, and the file ends there.
fn tear_newest_segment(dir: &std::path::Path) {
    use process_server::cache::segment::{HEADER_LEN, RECORD_FIXED_LEN, SUFFIX};
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(SUFFIX))
        .collect();
    segments.sort();
    let newest = segments.last().expect("a segment");
    let mut data = std::fs::read(newest).unwrap();
    // Walk the records (len u32 | crc u32 | seq u64 | time i64 | id_len u16 | id | batch)
    // to the zero header that ends the log.
    let mut end = HEADER_LEN;
    while end + RECORD_FIXED_LEN <= data.len() {
        let len = u32::from_le_bytes(data[end..end + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        let id_len = u16::from_le_bytes(data[end + 24..end + 26].try_into().unwrap()) as usize;
        end += RECORD_FIXED_LEN + id_len + len;
    }
    let mut torn = Vec::new();
    torn.extend_from_slice(&(64u32 << 10).to_le_bytes());
    torn.extend_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    torn.extend_from_slice(&u64::MAX.to_le_bytes());
    torn.extend_from_slice(&0i64.to_le_bytes());
    torn.extend_from_slice(&(DISK_ID.len() as u16).to_le_bytes());
    torn.extend_from_slice(DISK_ID.as_bytes());
    torn.extend((0..2000u32).map(|i| (i * 31 % 251) as u8));
    data.truncate(end);
    data.extend_from_slice(&torn);
    std::fs::write(newest, &data).unwrap();
}

#[test]
fn sigkill_during_group_commits_loses_no_acknowledged_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::cluster(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    // Registered while the master target is up; then it goes away.
    let first = rt.block_on(connect(&c));
    assert_eq!(first.welcome.cached_seq, 0);
    drop(first);
    c.kill_master_target();

    let mut acked = 0;
    for round in 0..ROUNDS {
        let s = rt.block_on(connect(&c));
        assert!(
            s.welcome.cached_seq >= acked,
            "round {round}: acknowledged up to seq {acked}, but the restarted process server \
             holds only up to {}\n{}",
            s.welcome.cached_seq,
            c.log_tails()
        );
        let next = s.welcome.cached_seq + 1;
        let (first_ack, acking) = oneshot::channel();
        let streaming = rt.spawn(stream_until_killed(s, next, first_ack));
        // Once batches are being acknowledged, kill at a different point each round.
        rt.block_on(tokio::time::timeout(TIMEOUT, acking))
            .expect("a first ack")
            .expect("the stream is still up");
        std::thread::sleep(Duration::from_millis(50 + 110 * round));
        c.kill_process_server();
        acked = rt
            .block_on(tokio::time::timeout(TIMEOUT, streaming))
            .expect("the stream ends once the process server is gone")
            .unwrap();
        assert!(acked >= next, "round {round}: nothing was acknowledged");
        if round == ROUNDS - 1 {
            tear_newest_segment(&c.cache);
        }
        eprintln!("round {round}: resumed at seq {next}, acknowledged up to {acked} when killed");
        c.start_process_server().unwrap();
    }

    // The last restart still holds every ack; appends go on after the cut; the master
    // target then applies all of it.
    let s = rt.block_on(connect(&c));
    assert!(
        s.welcome.cached_seq >= acked,
        "{} < {acked}\n{}",
        s.welcome.cached_seq,
        c.log_tails()
    );
    let recovered = std::fs::read_to_string(
        dir.path()
            .join("logs")
            .join(format!("process-server-{}.log", ROUNDS + 2)),
    )
    .unwrap();
    assert!(
        recovered.contains("truncating the torn tail of the newest cache segment"),
        "{recovered}"
    );
    let cached = s.welcome.cached_seq + 20;
    for seq in s.welcome.cached_seq + 1..=cached {
        let m = AgentMessage {
            body: Some(agent_message::Body::Batch(batch(seq))),
        };
        rt.block_on(s.tx.send(m)).unwrap();
    }
    c.start_master_target().unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut s = s;
    loop {
        let m = rt
            .block_on(tokio::time::timeout(TIMEOUT, s.rx.message()))
            .expect("progress from the process server")
            .unwrap()
            .expect("the stream stays open");
        if let Some(process_server_message::Body::Ack(p)) = m.body
            && p.applied_seq >= cached
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", c.log_tails());
    }
    drop(s);

    // Byte for byte: each block holds the write of the highest cached seq that wrote it.
    let mut expected = vec![0u8; CAPACITY as usize];
    for seq in 1..=cached {
        let (offset, data) = block_of(seq);
        expected[offset as usize..(offset + BLOCK) as usize].copy_from_slice(&data);
    }
    let got = std::fs::read(c.flat_path(NAME)).unwrap();
    assert!(
        got == expected,
        "the target differs from the cached writes 1..={cached}"
    );
}
