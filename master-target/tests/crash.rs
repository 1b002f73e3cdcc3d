//! The real `master-target` binary, SIGKILLed in the middle of a stream: after a restart
//! it reports an applied seq whose data is durable, re-applying the rest is idempotent,
//! markers are recorded exactly once, SIGTERM exits 0, and qemu-img finds the image equal
//! to the source bytes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use protocol::auth::{ClientAuth, Passphrase};
use protocol::batch::BatchBuilder;
use protocol::pb::{
    Batch, DiskFormat, DiskInfo, ForwardHello, ForwardMessage, Marker, MarkerKind,
    apply_message::Body, forward_message,
};
use protocol::transport::{TlsFiles, WanTuning};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const PASS: &str = "correct horse battery";
const CAP: u64 = 8 << 20;
const BATCHES: u64 = 200;
const STEP: Duration = Duration::from_secs(20);

/// Starts `master-target serve` on a free port; returns the child and its URL.
fn start(dir: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_master-target"))
        .args(["serve", "--listen", "127.0.0.1:0", "--datastore"])
        .arg(dir.join("ds"))
        .arg("--retention")
        .arg(dir.join("ret"))
        .arg("--passphrase-file")
        .arg(dir.join("pass"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(i) = line.find("listening on ") {
            break line[i + "listening on ".len()..].trim().to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, format!("http://{addr}"))
}

fn workload() -> (Vec<Batch>, Vec<u8>) {
    let mut raw = vec![0u8; CAP as usize];
    let mut b = BatchBuilder::new();
    let mut out = Vec::new();
    let mut x = 7u64;
    for seq in 1..=BATCHES {
        for _ in 0..8 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 33) % (CAP / 4096 - 16) * 4096;
            let len = 16 * 4096;
            if b.overlaps(off, len) {
                continue;
            }
            let data: Vec<u8> = (0..len).map(|i| (i ^ x ^ seq) as u8).collect();
            b.push_write(off, &data);
            raw[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        if seq % 5 == 0 {
            b.push_marker(Marker {
                id: format!("m{seq}"),
                kind: MarkerKind::App as i32,
                time_unix_ms: seq as i64,
                group: String::new(),
                tag: String::new(),
            });
        }
        out.push(b.finish("d1", seq, seq as i64, 0));
    }
    (out, raw)
}

/// Connects, says hello for d1, and returns the stream and d1's applied seq.
async fn hello(
    url: &str,
) -> (
    mpsc::Sender<ForwardMessage>,
    Streaming<protocol::pb::ApplyMessage>,
    u64,
) {
    let mut client =
        protocol::client::master_target(url, &WanTuning::default(), &TlsFiles::default())
            .await
            .unwrap();
    let auth = ClientAuth::new(Passphrase::new(PASS).unwrap(), "crash-test");
    let pending = protocol::client::begin_auth(&mut client, &auth)
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(BATCHES as usize);
    tx.send(ForwardMessage {
        body: Some(forward_message::Body::Hello(ForwardHello {
            auth: Some(pending.auth),
            disks: vec![DiskInfo {
                disk_id: "d1".into(),
                name: "crashy".into(),
                capacity: CAP,
                format: DiskFormat::Vmfs as i32,
                group: String::new(),
            }],
            connection: 0,
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .apply(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let m = tokio::time::timeout(STEP, inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(Body::Welcome(w)) = m.body else {
        panic!("{m:?}")
    };
    (tx, inbound, w.disks[0].applied_seq)
}

async fn wait_ack(inbound: &mut Streaming<protocol::pb::ApplyMessage>, at_least: u64) -> u64 {
    loop {
        let m = tokio::time::timeout(STEP, inbound.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match m.body {
            Some(Body::Ack(p)) if p.applied_seq >= at_least => return p.applied_seq,
            Some(Body::Ack(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_acknowledged() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("ds")).unwrap();
    std::fs::create_dir_all(t.path().join("ret")).unwrap();
    let pass = t.path().join("pass");
    std::fs::write(&pass, PASS).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (batches, raw) = workload();

    let (mut child, url) = start(t.path());
    let (tx, mut inbound, applied) = hello(&url).await;
    assert_eq!(applied, 0);
    for b in &batches {
        tx.send(ForwardMessage {
            body: Some(forward_message::Body::Batch(b.clone())),
        })
        .await
        .unwrap();
    }
    let acked = wait_ack(&mut inbound, 20).await;
    child.kill().unwrap(); // SIGKILL, mid-stream
    child.wait().unwrap();
    drop((tx, inbound));

    let (mut child, url) = start(t.path());
    let (tx, mut inbound, applied) = hello(&url).await;
    assert!(applied >= acked, "applied {applied} < acknowledged {acked}");
    // Re-send from one batch below the applied seq (a harmless duplicate) to the end.
    for b in &batches[(applied.max(1) - 1) as usize..] {
        tx.send(ForwardMessage {
            body: Some(forward_message::Body::Batch(b.clone())),
        })
        .await
        .unwrap();
    }
    assert_eq!(wait_ack(&mut inbound, BATCHES).await, BATCHES);
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM exit: {status}");

    let vmdk = t.path().join("ds/crashy.vmdk");
    let rawp = t.path().join("ref.raw");
    std::fs::write(&rawp, &raw).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "vmdk", "-F", "raw"])
        .arg(&vmdk)
        .arg(&rawp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_master-target"))
        .args(["recovery-points", "--json", "--disk", "d1", "--retention"])
        .arg(t.path().join("ret"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let points = v["points"].as_array().unwrap();
    let markers: Vec<_> = points.iter().filter(|p| p["kind"] == "app").collect();
    assert_eq!(
        markers.len() as u64,
        BATCHES / 5,
        "each marker exactly once"
    );
    assert_eq!(points.last().unwrap()["seq"], BATCHES);
}
