//! Backpressure of a full cache, with the real binaries: the master target is down while
//! `agent sync --wait` sends more incompressible data than the process server's cache takes,
//! either below its high-water mark or, with the cache on a small tmpfs, before the volume
//! runs out of space (ENOSPC). The process server pauses the agent (it says why; nothing is
//! refused or dropped) and the agent waits without error; once the master target is back the
//! cache drains (which frees space), the agent resumes and finishes, and the target equals
//! the source.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bench::cluster::Cluster;
use bench::verify;
use bench::workload::Workload;
use common::{Server, status, sync_ok};
use protocol::pb::StatusReply;

const DISK_ID: &str = "disk-cache-full-1";
const NAME: &str = "cachefull";
/// Twice the cache quota: far above its high-water mark (8 MiB).
const SIZE: u64 = 32 << 20;
/// Bound of every wait.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Polls the process server's status until the disk is in `state`, or panics (also if the
/// agent exits meanwhile).
fn wait_for_state(c: &Cluster, agent: &mut Child, state: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(s) = status(c, Server::ProcessServer)
            && let Some(d) = s.disks.iter().find(|d| d.disk_id == DISK_ID)
            && d.state == state
        {
            return;
        }
        assert!(
            agent.try_wait().unwrap().is_none(),
            "the agent exited early\n{}",
            c.log_tails()
        );
        assert!(
            Instant::now() < deadline,
            "disk state {state} within {TIMEOUT:?}\n{}",
            c.log_tails()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_full_cache_pauses_the_agent_until_the_master_target_drains_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(common::roles_exe(), dir.path()).unwrap();
    c.process_server_flags = [
        "--cache-quota",
        "16M",
        "--high-water",
        "50",
        "--segment-size",
        "1M",
    ]
    .map(String::from)
    .to_vec();
    paused_then_drained(&mut c, dir.path(), |s| {
        let paused = &s.facts["agents_paused"];
        assert!(paused.contains("high-water"), "{paused}");
        let used: u64 = s.facts["cache_used_bytes"].parse().unwrap();
        assert!(used < 16 << 20, "the cache stays within its quota: {used}");
    });
}

#[test]
fn a_full_cache_volume_pauses_the_agent_until_draining_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(common::roles_exe(), dir.path()).unwrap();
    // A 10 MiB volume under a 1 GiB quota: only ENOSPC can stop the cache writer.
    let cache = c.cache.clone();
    let Ok(_volume) = protocol::testing::Tmpfs::mount(&cache, "10m") else {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    };
    c.process_server_flags = ["--cache-quota", "1G", "--segment-size", "1M"]
        .map(String::from)
        .to_vec();
    paused_then_drained(&mut c, dir.path(), |s| {
        let paused = &s.facts["agents_paused"];
        assert!(paused.contains("ENOSPC"), "{paused}");
    });
    // The volume was full, not broken: the cache never went into its failed state.
    let log = read(&dir.path().join("logs").join("process-server-2.log"));
    assert!(
        log.contains("pausing agents: cache volume is full (ENOSPC)"),
        "{log}"
    );
    assert!(
        !log.contains("until the process server is restarted"),
        "{log}"
    );
    drop(c);
}

/// Starts `c`, registers an empty disk, stops the master target, and syncs 32 MiB of random
/// data: the agent must be paused without error (`check_paused` looks at the process
/// server's status then), and finish once the master target is back; the target must then
/// equal the source.
fn paused_then_drained(c: &mut Cluster, dir: &Path, check_paused: impl Fn(&StatusReply)) {
    if let Err(e) = c.start() {
        panic!("starting the cluster: {e:#}\n{}", c.log_tails());
    }
    // The disk is registered (and its target created) while the master target is up: an
    // empty disk sends only zero extents.
    let source = dir.join("source.raw");
    File::create(&source).unwrap().set_len(SIZE).unwrap();
    sync_ok(c, &source, DISK_ID, NAME);

    c.kill_master_target();
    Workload::Random.build(&source, SIZE, 7).unwrap();
    let stderr = dir.join("agent.stderr");
    let mut agent = common::Reap(
        c.agent_sync(&source, DISK_ID, NAME, &["--mode", "full", "--wait"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );

    // The cache fills up: the agent is paused, still running, no error.
    wait_for_state(c, &mut agent.0, "paused");
    check_paused(&status(c, Server::ProcessServer).expect("status"));
    let deadline = Instant::now() + TIMEOUT;
    while !read(&stderr).contains("paused intake") {
        assert!(Instant::now() < deadline, "agent log:\n{}", read(&stderr));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.0.try_wait().unwrap().is_none(), "{}", read(&stderr));
    let log = read(&stderr);
    assert!(
        !log.contains("ERROR") && !log.contains("error "),
        "agent log:\n{log}"
    );

    // The master target is back: the cache drains, the agent resumes and finishes.
    c.start_master_target().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let exit = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "agent still running\n{}\n{}",
            read(&stderr),
            c.log_tails()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        exit.success(),
        "{exit}\n{}\n{}",
        read(&stderr),
        c.log_tails()
    );
    assert!(
        read(&stderr).contains("resumed intake"),
        "{}",
        read(&stderr)
    );
    if let Err(e) = verify::files_equal(&c.flat_path(NAME), &source) {
        panic!("{e:#}\n{}", c.log_tails());
    }
}
