//! `bench scale` with 20 agents of 1 MiB: every agent completes and every target disk equals
//! its source (the bench compares them byte for byte and fails otherwise). No timing
//! assertions.

mod common;

use std::time::Duration;

#[test]
fn twenty_agents_complete_and_their_disks_match() {
    let out = tempfile::tempdir().unwrap();
    let report = common::run_bench(
        &[
            "scale",
            "--agents",
            "20",
            "--per-agent",
            "1M",
            "--batch-size",
            "256K",
            "--timeout-secs",
            "240",
        ],
        out.path(),
        Duration::from_secs(300),
    );
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
