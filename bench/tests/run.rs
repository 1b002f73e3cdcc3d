//! `bench run --quick` end to end on a tiny disk: the real roles, the in-process WAN
//! emulator and the bare lz4|socat peer (when installed). Checks the report's shape and
//! that the copies carried the data, never how fast they were.

mod common;

use std::process::Command;
use std::time::Duration;

#[test]
fn quick_run_writes_a_report_with_its_rows() {
    let out = tempfile::tempdir().unwrap();
    let report = common::run_bench(
        &[
            "run",
            "--quick",
            "--size",
            "8M",
            "--rtt",
            "10",
            "--peers",
            "lz4-socat",
            "--timeout-secs",
            "120",
        ],
        out.path(),
        Duration::from_secs(240),
    );
    let files = common::files_in(out.path());
    assert!(
        files.iter().any(|p| common::has_extension(p, "svg")),
        "a plot: {files:?}"
    );
    assert_eq!(report["mode"], "proxy, no TCP dynamics");
    let rows = report["rows"].as_array().unwrap();
    let lz4_installed = ["lz4", "socat"]
        .iter()
        .all(|t| Command::new(t).arg("-h").output().is_ok());
    assert_eq!(rows.len(), if lz4_installed { 2 } else { 1 }, "{report:#}");
    for row in rows {
        assert_eq!(row["rtt_ms"], 10);
        assert_eq!(row["rate_mbit"], 1000);
        assert_eq!(row["disk_bytes"], 8 << 20);
        assert!(row["seconds"].as_f64().unwrap() > 0.0);
        // Compressed, the mixed disk still puts a good part of its bytes on the wire.
        assert!(row["wire_bytes_up"].as_u64().unwrap() > 1 << 20, "{row:#}");
        assert!(row["bound"]["mb_per_sec"].as_f64().unwrap() > 0.0);
        assert!(!row["roles"].as_array().unwrap().is_empty());
    }
    assert_eq!(rows[0]["system"], "failback");
    let roles: Vec<_> = rows[0]["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["role"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(roles, ["agent", "process-server", "master-target"]);
    if lz4_installed {
        assert_eq!(rows[1]["system"], "lz4|socat");
        assert!(rows[1]["failback_over_this"].as_f64().unwrap() > 0.0);
    } else {
        let notes = report["notes"].to_string();
        assert!(notes.contains("not installed"), "{notes}");
    }
}

#[test]
fn differential_scenario_reports_the_resync_bytes_of_failback_and_rsync() {
    let rsync_installed = Command::new("rsync").arg("--version").output().is_ok();
    let out = tempfile::tempdir().unwrap();
    let report = common::run_bench(
        &[
            "run",
            "--quick",
            "--scenario",
            "differential",
            "--size",
            "8M",
            "--rtt",
            "10",
            "--peers",
            "rsync",
            "--timeout-secs",
            "120",
        ],
        out.path(),
        Duration::from_secs(240),
    );
    assert_eq!(report["plan"]["scenario"], "differential");
    // 5 % of the 2048 blocks of 8 MiB.
    assert_eq!(report["plan"]["changed_blocks"], 102);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        if rsync_installed { 2 } else { 1 },
        "{report:#}"
    );
    // The resync's own bytes: more than the changed data (102 x 4 KiB), and not the set-up
    // (the base's copy) on top: at most one pass over the disk plus framing, whatever the
    // agent ends up doing (it falls back to a full pass when it gets no chunk hashes).
    for row in rows {
        let up = row["wire_bytes_up"].as_u64().unwrap();
        assert!(up > 102 * 4096 && up < (8 << 20) * 11 / 10, "{row:#}");
    }
    if rsync_installed {
        assert_eq!(rows[1]["system"], "rsync");
        // rsync's delta: well under half the disk.
        assert!(
            rows[1]["wire_bytes_up"].as_u64().unwrap() < 4 << 20,
            "{report:#}"
        );
        assert!(rows[1]["failback_wire_over_this"].as_f64().unwrap() > 0.0);
    }
}
