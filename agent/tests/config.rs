//! `--config` and `--print-config` of the `agent` binary: what it prints is a config file it
//! reads back to the same configuration, and flags win over the file.

use std::process::Command;

fn agent(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(args)
        .output()
        .expect("the agent runs");
    assert!(
        out.status.success(),
        "agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 TOML")
}

/// Prints the config of `cmd` with `flags`, reads it back with `--config` and prints it again:
/// returns the text, after checking both prints are the same.
fn round_trip(dir: &std::path::Path, cmd: &str, flags: &[&str]) -> String {
    let mut args = vec![cmd, "--print-config"];
    args.extend_from_slice(flags);
    let printed = agent(&args);
    let file = dir.join(format!("{cmd}.toml"));
    std::fs::write(&file, &printed).unwrap();
    let again = agent(&[cmd, "--config", file.to_str().unwrap(), "--print-config"]);
    assert_eq!(again, printed, "--print-config of its own output differs");
    printed
}

#[test]
fn sync_print_config_round_trips_with_the_defaults_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--process-server",
        "http://ps:9443",
        "--disk",
        "/dev/sdb",
        "--disk-id",
        "6000C29a",
        "--name",
        "vm1",
        "--window",
        "128M",
        "--identity",
        "me",
        "--wait",
    ];
    let text = round_trip(dir.path(), "sync", &flags);
    for line in [
        "window = \"128M\"",
        "batch_size = \"1M\"",
        "chunk_size = \"64K\"",
        "retry_for = \"10m\"",
        "mode = \"full\"",
        "wait = true",
        "h2_stream_window = \"32M\"",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    // A flag wins over the file.
    let file = dir.path().join("sync.toml");
    let over = agent(&[
        "sync",
        "--config",
        file.to_str().unwrap(),
        "--window",
        "8M",
        "--print-config",
    ]);
    assert!(over.lines().any(|l| l == "window = \"8M\""), "{over}");
    assert_eq!(over.replace("\"8M\"", "\"128M\""), text);
}

#[test]
fn replicate_print_config_round_trips_one_disk_and_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let one = round_trip(
        dir.path(),
        "replicate",
        &[
            "--process-server",
            "http://ps:9443",
            "--disk",
            "/dev/sdb",
            "--disk-id",
            "6000C29a",
            "--name",
            "vm1",
            "--nbd-listen",
            "127.0.0.1:10809",
            "--crash-interval",
            "90s",
            "--identity",
            "me",
        ],
    );
    for line in [
        "disk = \"/dev/sdb\"",
        "crash_interval = \"1m 30s\"",
        "app_interval = \"1h\"",
    ] {
        assert!(one.lines().any(|l| l == line), "no `{line}` in:\n{one}");
    }
    let group = round_trip(
        dir.path(),
        "replicate",
        &[
            "--process-server",
            "http://ps:9443",
            "--disk",
            "a=/dev/sda",
            "--disk",
            "b=/dev/sdb,name=vm1_b,nbd=127.0.0.1:9000",
            "--nbd-listen",
            "127.0.0.1:10809",
            "--group",
            "vm1",
            "--identity",
            "me",
        ],
    );
    let file: toml::Table = toml::from_str(&group).unwrap();
    assert_eq!(file["group"].as_str(), Some("vm1"));
    let disks = file["disk"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["name"].as_str(), Some("a"));
    assert_eq!(disks[0]["nbd_listen"].as_str(), Some("127.0.0.1:10809"));
    assert_eq!(disks[1]["name"].as_str(), Some("vm1_b"));
    assert_eq!(disks[1]["nbd_listen"].as_str(), Some("127.0.0.1:9000"));
}

#[test]
fn a_bad_config_file_exits_2_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "windw = \"8M\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args([
            "replicate",
            "--config",
            file.to_str().unwrap(),
            "--print-config",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("windw"));
}

#[test]
fn the_sample_config_and_its_group_example_are_accepted() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml");
    let text = agent(&["replicate", "--config", sample, "--print-config"]);
    assert!(text.contains("disk_id = \"6000C29d-e40d-4c5a-9e6b-2f3c4d5e6f70\""));
    // The group example, uncommented in place of the single disk's keys.
    let single = ["disk = ", "disk_id = ", "name = "];
    let group: String = std::fs::read_to_string(sample)
        .unwrap()
        .lines()
        .filter(|l| !single.iter().any(|k| l.starts_with(k)))
        .skip_while(|l| !l.starts_with("# group = "))
        .map(|l| l.strip_prefix("# ").unwrap_or(l).to_string() + "\n")
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("group.toml");
    std::fs::write(&file, group).unwrap();
    let text = agent(&[
        "replicate",
        "--config",
        file.to_str().unwrap(),
        "--print-config",
    ]);
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(parsed["group"].as_str(), Some("myvm"));
    assert_eq!(parsed["disk"].as_array().unwrap().len(), 2);
}
