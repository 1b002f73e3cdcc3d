//! `bench apply` end to end on a small disk: the real master target and process server,
//! the recover command and the baselines (qemu-img, a sequential write, the journaled
//! floor). Checks the report's shape and that every copy was verified (the run fails
//! otherwise), never how fast anything was.

mod common;

use std::time::Duration;

#[test]
fn apply_run_writes_a_report_with_every_figure() {
    if !bench::verify::have_qemu_img() {
        eprintln!("qemu-img not installed; skipped");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let report = common::run_bench(
        &[
            "apply",
            "--size",
            "16M",
            "--repeat",
            "1",
            "--timeout-secs",
            "120",
        ],
        out.path(),
        Duration::from_secs(240),
    );
    assert_eq!(report["batches"], 16);
    let run = &report["runs"][0];
    // 16 batches per pass: the point 10 % of the churn back is one batch before the end.
    assert_eq!(run["recover_seq"], 31);
    for key in [
        "fresh_mb_per_sec",
        "apply_mb_per_sec",
        "qemu_mb_per_sec",
        "recover_mb_per_sec",
        "seq_write_mb_per_sec",
        "floor_mb_per_sec",
    ] {
        assert!(run[key].as_f64().unwrap() > 0.0, "{key}: {report:#}");
    }
    for key in ["floor_ratio", "apply_vs_floor"] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}: {report:#}");
    }
    assert_eq!(report["targets"].as_array().unwrap().len(), 2);
}
