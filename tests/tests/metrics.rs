//! Both servers' Prometheus endpoints, scraped after a real sync: the figures reflect the
//! replicated disk, every series `docs/metrics.md` documents is served (and nothing
//! undocumented is), and every series the Grafana dashboard in `deploy/` queries exists.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use bench::cluster::{Cluster, free_port};
use bench::workload;

/// The metric names (without labels) in a Prometheus text page.
fn names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect()
}

/// The value of `name{labels}` where every `labels` pair matches.
fn value(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)).unwrap()
}

/// Names in backticks in docs/metrics.md that look like metric names.
fn documented() -> BTreeSet<String> {
    repo_file("docs/metrics.md")
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            (s.starts_with("process_server_") || s.starts_with("master_target_"))
                && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// Metric names used in the dashboard's queries.
fn dashboard_names() -> BTreeSet<String> {
    let text = repo_file("deploy/grafana-dashboard.json");
    let mut out = BTreeSet::new();
    for prefix in ["process_server_", "master_target_"] {
        for (i, _) in text.match_indices(prefix) {
            // Not the tail of a longer name (process_server_master_target_link_up).
            if text[..i].ends_with(|c: char| c.is_ascii_lowercase() || c == '_') {
                continue;
            }
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

#[test]
fn endpoints_serve_the_documented_metrics_with_real_figures() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(common::roles_exe(), dir.path()).unwrap();
    let (ps_port, mt_port) = (free_port().unwrap(), free_port().unwrap());
    c.process_server_flags = vec!["--metrics-listen".into(), format!("127.0.0.1:{ps_port}")];
    c.master_target_flags = vec!["--metrics-listen".into(), format!("127.0.0.1:{mt_port}")];
    if let Err(e) = c.start() {
        panic!("starting the cluster: {e:#}\n{}", c.log_tails());
    }
    let source = dir.path().join("m.raw");
    workload::generate_disk(&source, 8 << 20, 13).unwrap();
    common::sync_ok(&c, &source, "disk-metrics", "metrics");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let scrape = |port: u16| {
        rt.block_on(protocol::metrics::scrape(&format!("127.0.0.1:{port}")))
            .unwrap_or_else(|e| panic!("scrape :{port}: {e}\n{}", c.log_tails()))
    };
    let ps = scrape(ps_port);
    let mt = scrape(mt_port);
    let disk = [("disk_id", "disk-metrics")];

    // The figures follow the sync: both servers saw the disk's data, nothing is left to
    // drain, and the link to the master target is up.
    let applied = value(&mt, "master_target_disk_applied_bytes_total", &disk).unwrap();
    assert!(applied > 0.0, "{mt}");
    let received = value(&ps, "process_server_disk_received_bytes_total", &disk).unwrap();
    assert!(received > 0.0, "{ps}");
    assert_eq!(
        value(&ps, "process_server_disk_backlog_bytes", &disk),
        Some(0.0),
        "{ps}"
    );
    assert_eq!(
        value(&ps, "process_server_disk_applied_seq", &disk),
        value(&mt, "master_target_disk_applied_seq", &disk),
        "both servers agree on the applied seq"
    );
    assert_eq!(
        value(&ps, "process_server_master_target_link_up", &[]),
        Some(1.0)
    );

    // Documentation, dashboard and endpoints agree.
    let served: BTreeSet<String> = names(&ps).union(&names(&mt)).cloned().collect();
    let docs = documented();
    let undocumented: Vec<_> = served.difference(&docs).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in docs/metrics.md: {undocumented:?}"
    );
    let stale: Vec<_> = docs.difference(&served).collect();
    assert!(
        stale.is_empty(),
        "in docs/metrics.md but not served: {stale:?}"
    );
    let missing: Vec<_> = dashboard_names().difference(&served).cloned().collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries series nobody serves: {missing:?}"
    );
}
