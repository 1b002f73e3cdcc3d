//! Helpers shared by the end-to-end tests: a cluster of real role processes in a temp dir,
//! and status polling through the real gRPC API.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use bench::cluster::Cluster;
use protocol::auth::{ClientAuth, Passphrase};
use protocol::pb::StatusReply;
use protocol::transport::{TlsFiles, WanTuning};

/// The multi-call executable that runs as each role (built by this package).
pub fn roles_exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_failback-roles"))
}

/// Runs `agent sync --wait` of `source` to completion and panics, with the servers' logs,
/// unless it succeeds.
pub fn sync_ok(c: &Cluster, source: &Path, disk_id: &str, name: &str) {
    let out = bench::cluster::run_with_timeout(
        &mut c.agent_sync(source, disk_id, name, &["--wait"]),
        Duration::from_secs(240),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "agent sync of {name} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log_tails()
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
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", &format!("nbd://127.0.0.1:{nbd}")]);
    for x in cmds {
        cmd.args(["-c", x]);
    }
    let out =
        bench::cluster::run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("qemu-io runs");
    assert!(
        out.status.success(),
        "qemu-io {cmds:?}: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.log_tails()
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

/// `agent marker --kind user --tag TAG` against the agent's control address, retried while
/// the agent says a resync interval is running (no consistent point then), for at most
/// `timeout`; panics with `context` and the servers' logs on any other failure.
pub fn user_marker(
    c: &Cluster,
    control: u16,
    disk_id: &str,
    tag: &str,
    timeout: Duration,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = bench::cluster::run_with_timeout(
            c.role("agent")
                .args(["marker", "--connect", &format!("127.0.0.1:{control}")])
                .args(["--disk-id", disk_id, "--kind", "user", "--tag", tag])
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
