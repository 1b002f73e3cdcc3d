//! Helpers shared by the end-to-end tests: a cluster of real role processes in a temp dir,
//! and status polling through the real gRPC API.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use bench::cluster::Cluster;
use protocol::auth::{ClientAuth, Passphrase};
use protocol::pb::StatusReply;
use protocol::transport::{TlsFiles, WanTuning};

/// The multi-call executable that runs as each role (built by this package).
pub fn roles_exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_failback-roles"))
}

/// A child process (an agent) killed and reaped at any exit of the test, so that none
/// outlives it.
pub struct Reap(pub Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` for at most `timeout` and panics, with its output and the servers' logs,
/// unless it succeeds.
pub fn run_ok(c: &Cluster, what: &str, cmd: &mut Command, timeout: Duration) -> Output {
    let out = bench::cluster::run_with_timeout(cmd, timeout)
        .unwrap_or_else(|e| panic!("{what}: {e:#}\n{}", c.log_tails()));
    assert!(
        out.status.success(),
        "{what}: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.log_tails()
    );
    out
}

/// Runs `master-target ARGS` (at most 60 s) and panics, with the servers' logs, unless it
/// succeeds.
pub fn master_target(c: &Cluster, args: &[&str]) -> Output {
    run_ok(
        c,
        &format!("master-target {args:?}"),
        c.role("master-target").args(args),
        Duration::from_secs(60),
    )
}

/// Runs `agent sync --wait` of `source` to completion and panics, with the servers' logs,
/// unless it succeeds.
pub fn sync_ok(c: &Cluster, source: &Path, disk_id: &str, name: &str) {
    run_ok(
        c,
        &format!("agent sync of {name}"),
        &mut c.agent_sync(source, disk_id, name, &["--wait"]),
        Duration::from_secs(240),
    );
}

/// A started master target + process server in a fresh temp dir.
pub fn cluster(dir: &Path) -> Cluster {
    let mut c = Cluster::new(roles_exe(), dir).expect("cluster dirs");
    if let Err(e) = c.start() {
        panic!("starting the cluster: {e:#}\n{}", c.log_tails());
    }
    c
}

/// Which server to ask.
#[derive(Debug, Clone, Copy)]
pub enum Server {
    ProcessServer,
    MasterTarget,
}

/// One authenticated Status call, or None when the server does not answer.
pub fn status(c: &Cluster, server: Server) -> Option<StatusReply> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let pass = Passphrase::load(Some(&c.passphrase_file)).ok()?;
    let auth = ClientAuth::new(pass, "e2e-test");
    rt.block_on(async {
        let tuning = WanTuning {
            connect_timeout: Duration::from_secs(2),
            ..WanTuning::default()
        };
        match server {
            Server::ProcessServer => {
                let mut cl =
                    protocol::client::process_server(&c.ps_url(), &tuning, &TlsFiles::default())
                        .await
                        .ok()?;
                protocol::client::status(&mut cl, &auth).await.ok()
            }
            Server::MasterTarget => {
                let mut cl =
                    protocol::client::master_target(&c.mt_url(), &tuning, &TlsFiles::default())
                        .await
                        .ok()?;
                protocol::client::status(&mut cl, &auth).await.ok()
            }
        }
    })
}

/// Polls `server`'s status until `pred` holds for disk `disk_id` (cached seq, applied seq),
/// or panics after `timeout`.
pub fn wait_for_disk(
    c: &Cluster,
    server: Server,
    disk_id: &str,
    timeout: Duration,
    pred: impl Fn(u64, u64) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = status(c, server)
            && let Some(d) = s.disks.iter().find(|d| d.disk_id == disk_id)
            && pred(d.cached_seq, d.applied_seq)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting on {server:?} status for {disk_id}\n{}",
            c.log_tails()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs qemu-io on the NBD export at 127.0.0.1:`nbd` with these commands; panics, with the
/// servers' logs, unless it succeeds.
pub fn qemu_io(c: &Cluster, nbd: u16, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &format!("nbd://127.0.0.1:{nbd}")]);
    for x in cmds {
        cmd.args(["-c", x]);
    }
    run_ok(
        c,
        &format!("qemu-io {cmds:?}"),
        &mut cmd,
        Duration::from_secs(60),
    );
}

/// Polls `ok` every 50 ms; panics with the servers' logs unless it holds within `timeout`.
pub fn wait_until(what: &str, c: &Cluster, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what} within {timeout:?}\n{}",
            c.log_tails()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sending half of an agent stream, and the process server's answer to it.
pub type ReplicateStream = (
    tokio::sync::mpsc::Sender<protocol::pb::AgentMessage>,
    Result<tonic::Streaming<protocol::pb::ProcessServerMessage>, tonic::Status>,
);

/// Opens an authenticated `Replicate` stream to the process server whose first message is
/// a hello declaring `disks` (`with_proof: false` leaves the passphrase proof out); further
/// messages go into the returned sender.
pub async fn replicate_stream(
    c: &Cluster,
    disks: Vec<protocol::pb::DiskInfo>,
    with_proof: bool,
) -> ReplicateStream {
    use protocol::pb::{AgentHello, AgentMessage, agent_message};
    let auth = ClientAuth::new(Passphrase::load(Some(&c.passphrase_file)).unwrap(), "e2e");
    let mut client =
        protocol::client::process_server(&c.ps_url(), &WanTuning::default(), &TlsFiles::default())
            .await
            .unwrap();
    let pending = protocol::client::begin_auth(&mut client, &auth)
        .await
        .unwrap();
    let (tx, out) = tokio::sync::mpsc::channel(64);
    tx.send(AgentMessage {
        body: Some(agent_message::Body::Hello(AgentHello {
            auth: with_proof.then(|| pending.auth.clone()),
            disks,
        })),
    })
    .await
    .unwrap();
    let answer = client
        .replicate(tokio_stream::wrappers::ReceiverStream::new(out))
        .await
        .map(tonic::Response::into_inner);
    (tx, answer)
}

/// `master-target recover --disk DISK_ID --point POINT --out OUT` against the cluster's
/// datastore and retention volume (as a new monolithic VMDK); panics, with the servers'
/// logs, unless it succeeds.
pub fn recover(c: &Cluster, disk_id: &str, point: &str, out: &Path) {
    let path = |p: &'_ Path| p.to_str().expect("test paths are UTF-8").to_string();
    let (ds, ret, out) = (path(&c.datastore), path(&c.retention), path(out));
    master_target(
        c,
        &[
            "recover",
            "--datastore",
            &ds,
            "--retention",
            &ret,
            "--disk",
            disk_id,
            "--point",
            point,
            "--out",
            &out,
        ],
    );
}

/// Sends SIGTERM to `child` (an agent) and waits until it has exited, at most 20 s.
pub fn stop_on_sigterm(c: &Cluster, child: &mut std::process::Child) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_until(
        "the agent stops on SIGTERM",
        c,
        Duration::from_secs(20),
        || child.try_wait().unwrap().is_some(),
    );
}

/// `agent marker --kind user --tag TAG` against the agent's control address, for `disk_id`
/// or, with None, for every disk of the agent at one instant (a group marker); retried while
/// the agent says a resync interval is running (no consistent point then), for at most
/// `timeout`; panics with `context` and the servers' logs on any other failure.
pub fn user_marker(
    c: &Cluster,
    control: u16,
    disk_id: Option<&str>,
    tag: &str,
    timeout: Duration,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = bench::cluster::run_with_timeout(
            c.role("agent")
                .args(["marker", "--connect", &format!("127.0.0.1:{control}")])
                .args(disk_id.map_or(vec![], |d| vec!["--disk-id", d]))
                .args(["--kind", "user", "--tag", tag])
                .arg("--passphrase-file")
                .arg(&c.passphrase_file),
            Duration::from_secs(30),
        )
        .unwrap();
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("resync interval is running") && Instant::now() < deadline,
            "agent marker {tag}: {err}\n{}\n{}",
            context(),
            c.log_tails()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
