//! An outage of the process server under continuous replication, with the real binaries:
//! `agent replicate` serves the source disk over NBD and keeps serving writes while its
//! process server is SIGKILLed (first holding the unacknowledged batches in memory, then,
//! once its window and queues are full, tracking the writes in a dirty bitmap). When the
//! process server restarts on the same cache volume, the agent resumes, resynchronises the
//! dirty regions and the target converges to the source byte for byte; the user marker cut
//! before the outage still recovers exactly the disk as it was then.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use bench::cluster::{Cluster, free_port, run_with_timeout};
use bench::workload;

const DISK_ID: &str = "disk-outage-1";
const NAME: &str = "outage";
const SIZE: u64 = 16 << 20;
const TAG: &str = "before-outage";

/// `len` bytes of incompressible data (xorshift), so that lz4 cannot shrink what the agent
/// has to hold.
fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data).unwrap();
}

struct Agent {
    child: Child,
    control: u16,
    log: std::path::PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn log(&self) -> String {
        bench::cluster::tail(&self.log)
    }

    /// `agent status --json`, whitespace removed (the pretty JSON of one disk), or the error.
    fn status(&self, c: &Cluster) -> Result<String, String> {
        let out = run_with_timeout(
            c.role("agent")
                .args([
                    "status",
                    "--connect",
                    &format!("127.0.0.1:{}", self.control),
                ])
                .arg("--json")
                .arg("--passphrase-file")
                .arg(&c.passphrase_file),
            Duration::from_secs(20),
        )
        .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .chars()
            .filter(|ch| !ch.is_whitespace())
            .collect())
    }

    /// A user marker `tag`, retried while a resync interval runs, for at most `timeout`.
    fn marker(&self, c: &Cluster, tag: &str, timeout: Duration) {
        common::user_marker(c, self.control, Some(DISK_ID), tag, timeout, || self.log());
    }
}

fn json_u64(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn the_agent_rides_out_a_process_server_outage_and_the_marker_before_it_recovers_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::cluster(dir.path());
    let source = dir.path().join("source.raw");
    workload::generate_disk(&source, SIZE, 31).unwrap();
    let (nbd, control) = (free_port().unwrap(), free_port().unwrap());
    let log = dir.path().join("agent.log");
    let f = std::fs::File::create(&log).unwrap();
    // A small window (2 MiB per disk) so that the outage's writes overflow it: the agent then
    // has to fall back from memory to its dirty bitmap.
    let child = c
        .role("agent")
        .args(["replicate", "--process-server", &c.ps_url(), "--disk"])
        .arg(&source)
        .args(["--disk-id", DISK_ID, "--name", NAME])
        .args(["--nbd-listen", &format!("127.0.0.1:{nbd}")])
        .args(["--control-listen", &format!("127.0.0.1:{control}")])
        .args(["--window", "2M"])
        .arg("--passphrase-file")
        .arg(&c.passphrase_file)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let mut agent = Agent {
        child,
        control,
        log,
    };
    common::wait_until(
        "the NBD export listens",
        &c,
        Duration::from_secs(60),
        || TcpStream::connect(("127.0.0.1", nbd)).is_ok(),
    );
    let rand_a = dir.path().join("a.bin");
    let rand_b = dir.path().join("b.bin");
    random_file(&rand_a, 1 << 20, 0x9e37_79b9_7f4a_7c15);
    random_file(&rand_b, 12 << 20, 0xd1b5_4a32_d192_ed03);
    let (a, b) = (rand_a.display(), rand_b.display());

    // Before the outage: writes, then the marker; the disk at the marker is the source now.
    common::qemu_io(
        &c,
        nbd,
        &[
            "write -P 0x11 0 1M",
            &format!("write -s {a} 768K 1M"),
            "flush",
        ],
    );
    agent.marker(&c, TAG, Duration::from_secs(90));
    let at_marker = std::fs::read(&source).unwrap();
    // The marker has left the batcher (it closes its batch at once): it sits in the
    // transfer's window, or is already in the process server's cache.
    common::wait_until(
        "the agent hands the marker's batch on",
        &c,
        Duration::from_secs(10),
        || {
            agent
                .status(&c)
                .is_ok_and(|s| s.contains(&format!("\"tag\":\"{TAG}\"")))
        },
    );

    // The outage.
    c.kill_process_server();

    // The agent keeps serving writes, holding the batches in memory...
    common::qemu_io(&c, nbd, &["write -P 0x22 256K 512K", "flush"]);
    common::wait_until(
        "the agent holds the outage's first write in memory",
        &c,
        Duration::from_secs(10),
        || {
            let last = agent
                .status(&c)
                .unwrap_or_else(|e| panic!("agent status: {e}"));
            assert!(
                last.contains("\"mode\":\"continuous\""),
                "after a small write during the outage the agent should still replicate from \
                 memory: {last}\n{}",
                agent.log()
            );
            // Batches cut after the last acknowledgement: held in memory, unacknowledged.
            json_u64(&last, "last_seq_produced").unwrap() > json_u64(&last, "cached_seq").unwrap()
        },
    );

    // ...and, once its window and queues are full, in a dirty bitmap.
    common::qemu_io(
        &c,
        nbd,
        &[&format!("write -s {b} 2M 12M"), "write -z 5M 256K", "flush"],
    );
    let mut in_bitmap = String::new();
    common::wait_until(
        "the agent falls back to its dirty bitmap",
        &c,
        Duration::from_secs(20),
        || match agent.status(&c) {
            Ok(s) if s.contains("\"mode\":\"bitmap\"") => {
                in_bitmap = s;
                true
            }
            _ => false,
        },
    );
    // The last batch cut in write order before the fallback: the resync interval follows it.
    let before_resync = json_u64(&in_bitmap, "last_seq_produced").unwrap();
    // The outage lasts a while (the agent's reconnect backoff grows meanwhile); writes are
    // still served.
    std::thread::sleep(Duration::from_secs(3));
    common::qemu_io(
        &c,
        nbd,
        &["write -P 0x33 3M 64K", "write -P 0x44 15M 1M", "flush"],
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited during the outage\n{}",
        agent.log()
    );
    assert!(std::fs::read(&source).unwrap() != at_marker);

    // The process server comes back on the same cache volume; the target converges.
    if let Err(e) = c.start_process_server() {
        panic!("restarting the process server: {e:#}\n{}", c.log_tails());
    }
    let flat = c.flat_path(NAME);
    common::wait_until(
        "the target equals the source after the outage",
        &c,
        Duration::from_secs(90),
        || std::fs::read(&flat).ok() == std::fs::read(&source).ok(),
    );
    let mut resumed = String::new();
    common::wait_until(
        "the agent replicates continuously again",
        &c,
        Duration::from_secs(30),
        || match agent.status(&c) {
            Ok(s) if s.contains("\"mode\":\"continuous\"") => {
                resumed = s;
                true
            }
            _ => false,
        },
    );
    // The resync interval's last batch (RESYNC_END); nothing was written since.
    let resync_end = json_u64(&resumed, "last_seq_produced").unwrap();
    assert!(resync_end > before_resync, "{in_bitmap}\n{resumed}");
    common::wait_for_disk(
        &c,
        common::Server::MasterTarget,
        DISK_ID,
        Duration::from_secs(30),
        |_, applied| applied >= resync_end,
    );
    assert!(
        std::fs::read(&flat).unwrap() == std::fs::read(&source).unwrap(),
        "the target differs from the source"
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "agent exited\n{}",
        agent.log()
    );

    // The marker is a recovery point; the resync interval, replayed out of write order,
    // offers none (its last batch, where the target equals the source again, may).
    let rp = run_with_timeout(
        c.role("master-target")
            .args(["recovery-points", "--retention"])
            .arg(&c.retention)
            .args(["--disk", DISK_ID, "--json"]),
        Duration::from_secs(30),
    )
    .unwrap();
    let points: String = String::from_utf8_lossy(&rp.stdout)
        .chars()
        .filter(|ch| !ch.is_whitespace())
        .collect();
    assert!(
        rp.status.success(),
        "master-target recovery-points: {}",
        String::from_utf8_lossy(&rp.stderr)
    );
    let marker_seq = points
        .split("},{")
        .find(|p| p.contains(&format!("\"tag\":\"{TAG}\"")))
        .and_then(|p| json_u64(p, "seq"))
        .unwrap_or_else(|| panic!("no recovery point {TAG}: {points}"));
    assert!(marker_seq <= before_resync, "{points}");
    let inside: Vec<u64> = points
        .split("\"seq\":")
        .skip(1)
        .filter_map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .filter(|&seq| seq > before_resync && seq < resync_end)
        .collect();
    assert!(
        inside.is_empty(),
        "recovery points inside the resync interval {before_resync}..{resync_end}: seqs \
         {inside:?}\n{points}"
    );

    // The marker cut before the outage recovers exactly the disk as it was then.
    let out_vmdk = dir.path().join("recovered.vmdk");
    common::recover(&c, DISK_ID, TAG, &out_vmdk);
    let recovered = std::fs::read(dir.path().join("recovered-flat.vmdk")).unwrap();
    assert_eq!(recovered.len(), at_marker.len());
    if let Some(at) = recovered.iter().zip(&at_marker).position(|(x, y)| x != y) {
        panic!("the disk recovered to {TAG} differs from the source at the marker from byte {at}");
    }

    // qemu-img opens the recovered VMDK and reads the same disk.
    let at_marker_raw = dir.path().join("at-marker.raw");
    std::fs::write(&at_marker_raw, &at_marker).unwrap();
    if let Err(e) = bench::verify::qemu_compare(&out_vmdk, &at_marker_raw) {
        panic!("{e:#}");
    }

    // Consistent points are offered again once the resync ended.
    agent.marker(&c, "after-outage", Duration::from_secs(30));

    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    common::wait_until(
        "the agent stops on SIGTERM",
        &c,
        Duration::from_secs(20),
        || agent.child.try_wait().unwrap().is_some(),
    );
}
