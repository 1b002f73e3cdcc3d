//! `bench run --scenario continuous` (= `bench rpo` over the grid) on a small disk at two
//! RTTs: each grid point churns through the agent's NBD export, drains, and is compared
//! with its source byte for byte (the bench fails otherwise). No timing assertions: the
//! RPO figures are only checked to exist and to be consistent with each other.

mod common;

use std::time::Duration;

#[test]
fn continuous_scenario_reports_rpo_at_every_grid_point() {
    let out = tempfile::tempdir().unwrap();
    let report = common::run_bench(
        &[
            "run",
            "--scenario",
            "continuous",
            "--rtt",
            "0,20",
            "--rate",
            "1000",
            "--size",
            "16M",
            "--churn-mb",
            "4",
            "--churn-seconds",
            "3",
            "--timeout-secs",
            "120",
        ],
        out.path(),
        Duration::from_secs(300),
    );
    assert_eq!(report["mode"], "proxy, no TCP dynamics");
    let rows = report["rows"].as_array().unwrap();
    let points: Vec<(u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["rtt_ms"].as_u64().unwrap(),
                r["rate_mbit"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(points, [(0, 1000), (20, 1000)]);
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r:#}"));
        assert!(f("churn_mb_per_sec") > 0.0, "{r:#}");
        assert!(f("rpo_median") >= 0.0, "{r:#}");
        assert!(
            f("rpo_median") <= f("rpo_p95") && f("rpo_p95") <= f("rpo_max"),
            "{r:#}"
        );
        // The emulator carried at least the churned bytes (random data: incompressible).
        let churned = r["samples"].as_array().unwrap().last().unwrap()["churned_bytes"]
            .as_u64()
            .unwrap();
        assert!(churned > 0);
        assert!(r["wire_bytes_up"].as_u64().unwrap() >= churned, "{r:#}");
        assert!(std::path::Path::new(r["plot"].as_str().unwrap()).exists());
    }
    // No row at 1 Gbit/s and 100 ms: the target is reported as not measured, not as met.
    assert!(report["target"]["met"].is_null(), "{report:#}");
}

#[test]
fn continuous_scenario_refuses_what_it_cannot_do() {
    for (extra, why) in [
        (&["--workload", "random"][..], "--workload mixed"),
        (&["--tls"][..], "proxy mode without TLS"),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
            .args(["run", "--scenario", "continuous", "--quick"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{err}");
    }
}
