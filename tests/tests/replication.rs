//! End-to-end replication through the real binaries: agent -> process server -> master
//! target on 127.0.0.1, with SIGKILLs in the middle and a wrong passphrase.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bench::cluster::run_with_timeout;
use bench::{verify, workload};
use common::{Server, cluster, sync_ok, wait_for_disk};

const SYNC_TIMEOUT: Duration = Duration::from_secs(240);

fn assert_replica_equals(c: &bench::cluster::Cluster, name: &str, source: &std::path::Path) {
    if let Err(e) = verify::files_equal(&c.flat_path(name), source) {
        panic!("{e:#}\n{}", c.log_tails());
    }
    if verify::have_qemu_img() {
        verify::qemu_check(&c.vmdk_path(name)).unwrap();
        verify::qemu_compare(&c.vmdk_path(name), source).unwrap();
    }
}

fn wait_child(
    mut child: Child,
    timeout: Duration,
    c: &bench::cluster::Cluster,
) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("agent did not finish within {timeout:?}\n{}", c.log_tails());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn full_sync_of_mixed_disk_equals_source_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let source = dir.path().join("source.raw");
    workload::generate_disk(&source, 48 << 20, 11).unwrap();
    sync_ok(&c, &source, "disk-mixed-1", "mixed");
    assert_replica_equals(&c, "mixed", &source);
}

/// Every layout the agent can ask for is created by the master target, holds the source
/// byte for byte by qemu's reading, and passes `master-target verify`.
#[test]
fn each_target_layout_holds_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let source = dir.path().join("source.raw");
    workload::generate_disk(&source, 8 << 20, 21).unwrap();
    for format in [
        "monolithic-flat",
        "monolithic-sparse",
        "two-gb-max-extent-flat",
    ] {
        let name = format.replace('-', "_");
        let out = bench::cluster::run_with_timeout(
            &mut c.agent_sync(
                &source,
                &format!("disk-{format}"),
                &name,
                &["--wait", "--format", format],
            ),
            std::time::Duration::from_secs(240),
        )
        .unwrap();
        assert!(
            out.status.success(),
            "{format}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.log_tails()
        );
        let vmdk = c.vmdk_path(&name);
        let compare = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "vmdk", "-F", "raw"])
            .arg(&vmdk)
            .arg(&source)
            .output()
            .unwrap();
        assert!(
            compare.status.success(),
            "{format}: qemu-img compare: {}{}",
            String::from_utf8_lossy(&compare.stdout),
            String::from_utf8_lossy(&compare.stderr)
        );
        let verify = c
            .role("master-target")
            .args(["verify", "--datastore"])
            .arg(&c.datastore)
            .args(["--disk", &format!("disk-{format}")])
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{format}: verify: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
    }
}

#[test]
fn second_full_sync_after_changes_converges() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let source = dir.path().join("source.raw");
    workload::generate_disk(&source, 16 << 20, 5).unwrap();
    sync_ok(&c, &source, "disk-twice", "twice");
    workload::churn(&source, 200, 9).unwrap();
    sync_ok(&c, &source, "disk-twice", "twice");
    assert_replica_equals(&c, "twice", &source);
}

/// Starts a sync in the background, SIGKILLs `victim` once the chain has made progress,
/// restarts it on the same directories, and checks that the sync completes exactly.
fn sync_survives_sigkill(victim: Server) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path());
    let source = dir.path().join("source.raw");
    workload::generate_disk(&source, 160 << 20, 3).unwrap();
    let disk_id = "disk-crash-1";
    let agent = c
        .agent_sync(
            &source,
            disk_id,
            "crash",
            &["--wait", "--retry-for", "120s"],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Progress on the victim's side: some batches cached (process server) or applied
    // (master target), so the kill lands in the middle of the pass.
    wait_for_disk(
        &c,
        victim,
        disk_id,
        Duration::from_secs(60),
        |cached, applied| match victim {
            Server::ProcessServer => cached >= 3,
            Server::MasterTarget => applied >= 3,
        },
    );
    match victim {
        Server::ProcessServer => c.kill_process_server(),
        Server::MasterTarget => c.kill_master_target(),
    }
    let mut agent = agent;
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the sync ended before the kill; the test proves nothing"
    );
    match victim {
        Server::ProcessServer => c.start_process_server().unwrap(),
        Server::MasterTarget => c.start_master_target().unwrap(),
    }
    let out = wait_child(agent, SYNC_TIMEOUT, &c);
    assert!(
        out.status.success(),
        "agent failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log_tails()
    );
    assert_replica_equals(&c, "crash", &source);
}

#[test]
fn sync_completes_after_process_server_sigkill() {
    sync_survives_sigkill(Server::ProcessServer);
}

#[test]
fn sync_completes_after_master_target_sigkill() {
    sync_survives_sigkill(Server::MasterTarget);
}

#[test]
fn wrong_passphrase_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let source = dir.path().join("source.raw");
    workload::generate_disk(&source, 4 << 20, 1).unwrap();
    let wrong = dir.path().join("wrong-passphrase");
    std::fs::write(&wrong, "not the right passphrase\n").unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut cmd = c.agent_sync_with(&wrong, &source, "disk-auth", "auth", &["--wait"]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong passphrase was accepted");
    assert!(
        stderr.contains("error 3") && stderr.contains("passphrase"),
        "unclear refusal: {stderr}"
    );
    let stored: Vec<_> = std::fs::read_dir(&c.datastore).unwrap().collect();
    assert!(stored.is_empty(), "the datastore changed: {stored:?}");
    assert!(
        common::status(&c, Server::ProcessServer).is_some_and(|s| s.disks.is_empty()),
        "the process server registered the disk"
    );
}

#[test]
fn full_sync_over_tls_on_both_hops() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = bench::cluster::Cluster::new(common::roles_exe(), dir.path()).unwrap();
    c.enable_tls().unwrap();
    if let Err(e) = c.start() {
        panic!("starting with TLS: {e:#}\n{}", c.log_tails());
    }
    let source = dir.path().join("source.raw");
    workload::generate_disk(&source, 8 << 20, 21).unwrap();
    sync_ok(&c, &source, "disk-tls", "tls");
    assert_replica_equals(&c, "tls", &source);
    // A client that does not trust the CA is refused by the TLS handshake.
    let mut untrusted = c.role("agent");
    untrusted
        .args(["sync", "--process-server", &c.ps_url(), "--disk"])
        .arg(&source)
        .args([
            "--disk-id",
            "disk-tls",
            "--name",
            "tls",
            "--retry-for",
            "1s",
            "--passphrase-file",
        ])
        .arg(&c.passphrase_file);
    let out = run_with_timeout(&mut untrusted, Duration::from_secs(60)).unwrap();
    assert!(
        !out.status.success(),
        "an https:// URL without --tls-ca was accepted"
    );
}
