//! `bench scale` with 20 agents of 1 MiB: every agent completes and every target disk equals
//! its source (the bench compares them byte for byte and fails otherwise). No timing
//! assertions.

use std::process::Command;
use std::time::Duration;

use bench::cluster::run_with_timeout;

#[test]
fn twenty_agents_complete_and_their_disks_match() {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bench"));
    cmd.args([
        "scale",
        "--agents",
        "20",
        "--per-agent",
        "1M",
        "--batch-size",
        "256K",
        "--timeout-secs",
        "240",
        "--out",
    ])
    .arg(out.path());
    let o = run_with_timeout(&mut cmd, Duration::from_secs(300)).unwrap();
    assert!(
        o.status.success(),
        "bench scale failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let json = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("a JSON report");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(report["agents"], 20);
    assert_eq!(report["verified_disks"], 20);
    assert_eq!(report["per_agent_bytes"], 1 << 20);
    let times = report["per_agent_seconds"].as_array().unwrap();
    assert_eq!(times.len(), 20);
    assert!(
        times.iter().all(|t| t.as_f64().unwrap() > 0.0),
        "{report:#}"
    );
    assert!(report["process_server_peak_rss_bytes"].as_u64().unwrap() > 0);
}
