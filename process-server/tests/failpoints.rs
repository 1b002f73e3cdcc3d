//! A failed fdatasync of the cache's group commit, with the real binary: the failpoint
//! `cache-fsync-eio` fails the sync of the group holding batch [`FAIL_AT`] with EIO. That
//! batch is never acknowledged, every agent is refused with a precise error (code Io, the
//! cache volume, the errno), the sync is never attempted again, status says the cache failed
//! and the disk needs a resync. After a restart the log is re-read from the disk: the failed
//! group's record, left torn there, is cut, and everything acknowledged before the failure
//! still reaches the master target (a fake one, as in `src/server/tests.rs`).
//!
//! Needs the `failpoints` feature: `cargo test -p process-server --features failpoints`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use protocol::auth::{ClientAuth, Passphrase};
use protocol::error::Code;
use protocol::pb::StatusReply;
use protocol::transport::{TlsFiles, WanTuning};

/// The batch whose group commit fails.
const FAIL_AT: u64 = 5;
/// Batches sent in all.
const N: u64 = 8;
/// Every wait of the test is bounded by this.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A running `process-server serve`; its stderr lines, once it has exited, by joining `log`.
struct Ps {
    child: Child,
    url: String,
    log: JoinHandle<Vec<String>>,
}

fn start(dir: &Path, mt_url: &str, env: &[(&str, String)]) -> Ps {
    let pass = dir.join("pass");
    std::fs::write(&pass, PASS).unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_process-server"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--connections", "1"])
        .args(["--master-target", mt_url, "--cache"])
        .arg(dir.join("cache"))
        .arg("--passphrase-file")
        .arg(&pass)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let url = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("exited before listening:\n{}", seen.join("\n")))
            .unwrap();
        if let Some(i) = line.find("listening on ") {
            break format!("http://{}", line[i + "listening on ".len()..].trim());
        }
        seen.push(line);
    };
    let log = std::thread::spawn(move || {
        seen.extend(lines.map_while(Result::ok));
        seen
    });
    Ps { child, url, log }
}

impl Ps {
    /// SIGTERM, then its exit status and log.
    async fn stop(mut self) -> (ExitStatus, Vec<String>) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = tokio::task::spawn_blocking(move || {
            let status = self.child.wait().unwrap();
            (status, self.log.join().unwrap())
        });
        tokio::time::timeout(TIMEOUT, status)
            .await
            .expect("the process server stops on SIGTERM")
            .unwrap()
    }
}

async fn status(url: &str) -> StatusReply {
    let auth = ClientAuth::new(Passphrase::new(PASS).unwrap(), "status-test");
    let mut client =
        protocol::client::process_server(url, &WanTuning::default(), &TlsFiles::default())
            .await
            .unwrap();
    protocol::client::status(&mut client, &auth).await.unwrap()
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} within {TIMEOUT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cache_fdatasync_is_never_retried_and_nothing_acked_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mt = FakeMt::new();
    let mt_url = start_fake_mt(mt.clone()).await;
    let env = [
        ("FAILBACK_FAILPOINT", "cache-fsync-eio".to_string()),
        ("FAILBACK_FAILPOINT_SEQ", FAIL_AT.to_string()),
    ];
    let ps = start(dir.path(), &mt_url, &env);

    // The disk is registered, then the master target gets stuck: what the cache acknowledges
    // stays in it (the one connection may take one batch before it notices).
    let mut a = bounded("welcome", agent(&ps.url)).await;
    mt.gate.send_replace(false);
    a.send(1..=FAIL_AT - 1).await;
    bounded("acks", a.until(|p| p.cached_seq == FAIL_AT - 1)).await;
    a.send(FAIL_AT..=FAIL_AT).await;
    let e = bounded("the refusal", a.until_error()).await;
    assert_eq!(
        a.last.cached_seq,
        FAIL_AT - 1,
        "the failed group is not acked"
    );
    assert_eq!(e.code, Code::Io.value(), "{e:?}");
    let cache_dir = cache.display().to_string();
    for words in [
        cache_dir.as_str(),
        "fdatasync",
        "EIO",
        "never retried",
        "until the process server is restarted",
    ] {
        assert!(e.message.contains(words), "{words:?} in {}", e.message);
    }
    drop(a);

    // Until a restart every agent is refused with that error, before any batch is taken.
    let again = bounded("second hello", agent_for(&ps.url, disk_info()))
        .await
        .err()
        .expect("refused");
    assert_eq!((again.code, &again.message), (e.code, &e.message));
    let s = bounded("status", status(&ps.url)).await;
    let failed = &s.facts["cache_failed"];
    assert!(
        failed.contains(&cache_dir) && failed.contains("EIO"),
        "{failed}"
    );
    assert!(
        s.facts["master_target_link"].contains("cache volume failed"),
        "{:?}",
        s.facts
    );
    let d = &s.disks[0];
    assert_eq!(d.state, "resync-required", "{d:?}");
    assert!(
        d.alerts
            .iter()
            .any(|a| a.contains(&format!("batches {FAIL_AT}..={FAIL_AT} were not cached"))),
        "{:?}",
        d.alerts
    );

    let (exit, log) = ps.stop().await;
    assert!(!exit.success(), "a failed cache exits non-zero: {exit}");
    let injected = log
        .iter()
        .filter(|l| l.contains("failpoint: injected EIO"))
        .count();
    assert_eq!(
        injected,
        1,
        "the failed sync is never retried:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter()
            .any(|l| l.contains("until the process server is restarted")),
        "{}",
        log.join("\n")
    );

    // What a failed write-back can leave on the volume: the failed group's record only
    // partly written (its sync never ran, so the kernel still holds it in full).
    let (seg, offset, len) = find_record(&cache, "disk-1", FAIL_AT);
    let mut data = std::fs::read(&seg).unwrap();
    data[offset + len / 2..offset + len].fill(0);
    std::fs::write(&seg, &data).unwrap();

    // Restart (no failpoint), the master target back: the log is re-read from the disk, the
    // torn record is cut, and everything acknowledged before the failure is delivered, in
    // order; the agent resumes after it.
    mt.gate.send_replace(true);
    let ps = start(dir.path(), &mt_url, &[]);
    let mut a = bounded("welcome after restart", agent(&ps.url)).await;
    assert_eq!(a.welcome.cached_seq, FAIL_AT - 1, "{:?}", a.welcome);
    bounded("delivery", a.until(|p| p.applied_seq == FAIL_AT - 1)).await;
    a.send(FAIL_AT..=N).await;
    bounded("the rest", a.until(|p| p.applied_seq == N)).await;
    assert_eq!(mt.applied_order("disk-1"), (1..=N).collect::<Vec<_>>());
    drop(a);
    let (exit, log) = ps.stop().await;
    assert!(exit.success(), "{exit}\n{}", log.join("\n"));
    assert!(
        log.iter().any(|l| l.contains("truncating the torn tail")),
        "{}",
        log.join("\n")
    );
    assert!(!log.iter().any(|l| l.contains("failpoint")));
}
