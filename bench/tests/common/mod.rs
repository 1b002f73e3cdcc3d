//! What the integration tests share: running the bench binary and reading its JSON report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bench::cluster::run_with_timeout;

/// Runs `bench ARGS --out OUT` (killed after `limit`), asserts it succeeded, and returns
/// the JSON report it wrote to `out`.
pub fn run_bench(args: &[&str], out: &Path, limit: Duration) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bench"));
    cmd.args(args).arg("--out").arg(out);
    let o = run_with_timeout(&mut cmd, limit).unwrap();
    assert!(
        o.status.success(),
        "bench {} failed:\n{}\n{}",
        args[0],
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let json = files_in(out)
        .into_iter()
        .find(|p| has_extension(p, "json"))
        .expect("a JSON report");
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

/// The files in `dir`.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect()
}

pub fn has_extension(p: &Path, ext: &str) -> bool {
    p.extension().is_some_and(|e| e == ext)
}
