//! `master-target verify` against the real binary: a qemu-made image passes with exit 0,
//! the same image with a damaged grain directory fails with exit 1 and names the entry.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

fn verify(dir: &std::path::Path, json: bool) -> std::process::Output {
    let ds = dir.join("ds");
    let mut args = vec![
        "verify",
        "--datastore",
        ds.to_str().unwrap(),
        "--disk",
        DISK,
    ];
    if json {
        args.push("--json");
    }
    run(&args)
}

#[test]
fn verify_passes_a_good_image_and_pinpoints_a_damaged_one() {
    let t = dirs();
    let dir = t.path();
    let img = dir.join(format!("ds/{DISK}.vmdk"));
    let out = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
        ])
        .arg(&img)
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let out = verify(dir, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
    assert!(
        stdout.contains("monolithicSparse, 67108864 bytes"),
        "{stdout}"
    );

    // GD entry 1 (the GD is at sector 30 in qemu's 64 MiB layout) -> far past overHead.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&100_000u32.to_le_bytes(), 30 * 512 + 4)
        .unwrap();
    drop(f);
    let out = verify(dir, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout.contains(&format!(
            "problem: {DISK}.vmdk @ byte {}: GD entry 1 points at sector 100000, outside the \
             metadata area",
            30 * 512 + 4
        )),
        "{stdout}"
    );
    let out = verify(dir, true);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"][0]["offset"], 30 * 512 + 4);
}
