//! The sample configurations shipped in `deploy/` are accepted by the real daemons, and the
//! daemons started from them replicate and stop cleanly on SIGTERM (as systemd stops them).

mod common;

use std::path::Path;
use std::time::Duration;

use bench::cluster::{Cluster, free_port};
use bench::{verify, workload};

/// Copies a sample config from `deploy/` into `dir`, pointing its host-specific keys (which
/// the cluster also passes as flags, and flags win) at harmless values, and its metrics port
/// at a free one.
fn local_copy(sample: &str, dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(sample),
    )
    .unwrap();
    let port = free_port().unwrap();
    let text = text.replace("127.0.0.1:9464", &format!("127.0.0.1:{port}"));
    let path = dir.join(sample);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn sample_configs_start_the_daemons_and_sigterm_stops_them_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(common::roles_exe(), dir.path()).unwrap();
    let mt = local_copy("master-target.toml", dir.path());
    let ps = local_copy("process-server.toml", dir.path());
    c.master_target_flags = vec!["--config".into(), mt.display().to_string()];
    c.process_server_flags = vec!["--config".into(), ps.display().to_string()];
    if let Err(e) = c.start() {
        panic!("starting from the sample configs: {e:#}\n{}", c.log_tails());
    }
    let source = dir.path().join("source.raw");
    workload::generate_disk(&source, 8 << 20, 5).unwrap();
    common::sync_ok(&c, &source, "disk-deploy-1", "deployed");
    verify::files_equal(&c.flat_path("deployed"), &source).unwrap();
    // The samples ask for JSON logs: the daemons' log lines must be JSON objects.
    let logs = c.log_tails();
    assert!(logs.contains("{\""), "expected JSON log lines:\n{logs}");
    // systemd's TimeoutStopSec in deploy/ is 30 s; a clean stop takes far less.
    let codes = c.stop(Duration::from_secs(20));
    assert_eq!(codes, vec![Some(0), Some(0)], "{}", c.log_tails());
}
