//! Continuous replication through the real binaries: `agent replicate` serves the source disk
//! over NBD, qemu-io writes into it, a user marker is cut with `agent marker`, and
//! `master-target recover` brings back exactly the disk as it was at that marker.

mod common;

use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use bench::cluster::free_port;
use bench::workload;

const DISK_ID: &str = "disk-cont-1";

#[test]
fn writes_over_nbd_replicate_in_order_and_a_marker_recovers_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::cluster(dir.path());
    let source = dir.path().join("source.raw");
    workload::generate_disk(&source, 16 << 20, 21).unwrap();
    let (nbd, control) = (free_port().unwrap(), free_port().unwrap());
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let agent = c
        .role("agent")
        .args(["replicate", "--process-server", &c.ps_url(), "--disk"])
        .arg(&source)
        .args(["--disk-id", DISK_ID, "--name", "cont"])
        .args(["--nbd-listen", &format!("127.0.0.1:{nbd}")])
        .args(["--control-listen", &format!("127.0.0.1:{control}")])
        .arg("--passphrase-file")
        .arg(&c.passphrase_file)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut agent = common::Reap(agent);
    common::wait_until(
        "the NBD export listens",
        &c,
        Duration::from_secs(60),
        || TcpStream::connect(("127.0.0.1", nbd)).is_ok(),
    );

    // Overlapping writes, then a marker: the disk at the marker is the source right now.
    common::qemu_io(
        &c,
        nbd,
        &["write -P 0x11 0 1M", "write -P 0x22 512K 1M", "flush"],
    );
    // Until the first full pass ends there is no consistent point; the agent says so.
    common::user_marker(
        &c,
        control,
        Some(DISK_ID),
        "step1",
        Duration::from_secs(120),
        String::new,
    );
    let at_marker = std::fs::read(&source).unwrap();

    // More writes over the marker's data; the target follows the source exactly.
    common::qemu_io(&c, nbd, &["write -P 0x33 0 3M", "write -z 4M 1M", "flush"]);
    let flat = c.flat_path("cont");
    common::wait_until(
        "the target equals the source",
        &c,
        Duration::from_secs(120),
        || std::fs::read(&flat).ok() == std::fs::read(&source).ok(),
    );
    assert!(agent.0.try_wait().unwrap().is_none(), "agent exited early");

    // Recover to the marker while everything keeps running.
    let out_vmdk = dir.path().join("datastore").join("step1.vmdk");
    common::recover(&c, DISK_ID, "step1", &out_vmdk);
    let recovered = std::fs::read(dir.path().join("datastore").join("step1-flat.vmdk")).unwrap();
    assert!(
        recovered == at_marker,
        "the recovered disk differs from the disk at the marker"
    );
    assert!(recovered != std::fs::read(&source).unwrap());
    // Clean stop on SIGTERM.
    common::stop_on_sigterm(&c, &mut agent.0);
}
