//! `recovery-points` and `recover` against the real binary: markers cut between scripted
//! batches, a copy of the expected disk kept at each, recovery to each (while the server
//! keeps replicating) compared byte for byte and with qemu-img; then an in-place roll back,
//! refused while the server runs, an interrupted one finished at its recorded seq, and
//! replication resuming from the recovered seq.

mod common;

use common::*;

const CAP: u64 = 4 << 20;
const N: u64 = 12;
const MARKERS: [u64; 3] = [3, 7, 10];

fn recover(dir: &std::path::Path, point: &str, out: Option<&str>) -> std::process::Output {
    let ds = dir.join("ds");
    let ret = dir.join("ret");
    let mut args = vec![
        "recover",
        "--datastore",
        ds.to_str().unwrap(),
        "--retention",
        ret.to_str().unwrap(),
        "--disk",
        DISK,
        "--point",
        point,
    ];
    match out {
        Some(o) => args.extend(["--out", o]),
        None => args.push("--in-place"),
    }
    run(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_to_every_marker_equals_the_disk_at_that_marker() {
    let t = dirs();
    let dir = t.path();
    let s = script(CAP, N, &MARKERS);
    let (child, url) = start(dir, &[]);
    let mut c = hello(&url, CAP).await;
    for b in &s.batches[..10] {
        c.send(b).await;
        c.acked(b.seq).await;
    }

    let out = recovery_points(dir);
    assert!(out.status.success());
    let points = points(&out);
    let batch_seqs = batch_seqs(&points);
    assert_eq!(batch_seqs, (1..=10).collect::<Vec<_>>());
    let ids: Vec<_> = points
        .iter()
        .filter(|p| p["kind"] == "app")
        .map(|p| p["marker_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m3", "m7", "m10"]);
    let undo: Vec<u64> = points
        .iter()
        .map(|p| p["undo_bytes"].as_u64().unwrap())
        .collect();
    assert!(undo.windows(2).all(|w| w[0] >= w[1]), "{undo:?}");
    assert_eq!(*undo.last().unwrap(), 0);

    // To a new VMDK while the server is up: by marker id, tag, time, and latest.
    for (point, seq) in [
        ("m3".to_string(), 3),
        ("t7".to_string(), 7),
        ("latest-app".to_string(), 10),
        ("latest".to_string(), 10),
        // Every committed batch is a crash-consistent point: the newest is batch 10.
        ("latest-crash".to_string(), 10),
        // Between batch 5 and 6: the latest point at or before it is batch 5.
        (format_rfc3339(T0 + 5 * 1000 + 500), 5),
    ] {
        let out_path = dir.join(format!("r-{seq}-{}.vmdk", point.len()));
        let o = recover(dir, &point, Some(out_path.to_str().unwrap()));
        assert!(
            o.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let flat = out_path.with_file_name(format!(
            "{}-flat.vmdk",
            out_path.file_stem().unwrap().to_str().unwrap()
        ));
        assert_bytes(&flat, &s.states[seq], &point);
        assert_qemu_identical(&out_path, &s.states[seq], dir);
    }
    let o = recover(
        dir,
        "no-such-marker",
        Some(dir.join("x.vmdk").to_str().unwrap()),
    );
    assert!(!o.status.success());
    assert!(!dir.join("x-flat.vmdk").exists(), "no partial output");

    // In place is refused while the server holds the retention volume.
    let o = recover(dir, "m7", None);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("running master target"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    drop(c);
    stop(child);

    // An in-place recovery given `--point latest` (resolved to seq 7 then) was interrupted:
    // its intent file says so. Another point is refused, and so is a copy (the disk may be
    // between points); the same point finishes it at the recorded seq 7, where `latest`
    // would now resolve to 10.
    let intent = dir.join(format!("ret/disks/{DISK}.rollback"));
    std::fs::write(&intent, "7\nlatest").unwrap();
    for out in [None, Some(dir.join("y.vmdk"))] {
        let o = recover(dir, "m3", out.as_ref().map(|p| p.to_str().unwrap()));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains("to point 'latest' (seq 7) was interrupted"),
            "{err}"
        );
    }
    assert!(!dir.join("y-flat.vmdk").exists());
    let o = recover(dir, "latest", None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !intent.exists(),
        "the intent goes once the recovery is done"
    );
    assert_bytes(
        &flat(dir),
        &s.states[7],
        "in place to the interrupted point",
    );
    // Going to m7 again changes nothing.
    let o = recover(dir, "m7", None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_bytes(&flat(dir), &s.states[7], "in place to m7");
    assert_qemu_identical(&dir.join(format!("ds/{NAME}.vmdk")), &s.states[7], dir);

    // Replication resumes from the recovered seq, and the older points still work.
    let (child, url) = start(dir, &[]);
    let mut c = hello(&url, CAP).await;
    assert_eq!(c.applied, 7);
    for b in &s.batches[7..] {
        c.send(b).await;
    }
    c.acked(N).await;
    assert_bytes(&flat(dir), &s.states[N as usize], "after resuming");
    let o = recover(dir, "m3", Some(dir.join("again.vmdk").to_str().unwrap()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_bytes(
        &dir.join("again-flat.vmdk"),
        &s.states[3],
        "m3 after in place",
    );
    drop(c);
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monolithic_sparse_target_recovers_like_a_flat_one() {
    recovers_like_a_flat_one(
        protocol::pb::DiskFormat::MonolithicSparse,
        "monolithic-sparse",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_gb_max_extent_flat_target_recovers_like_a_flat_one() {
    recovers_like_a_flat_one(
        protocol::pb::DiskFormat::TwoGbMaxExtentFlat,
        "two-gb-max-extent-flat",
    )
    .await;
}

/// A target of `format` recovers to a new vmfs copy and to a copy in `out_format`
/// (packed from a scratch file that does not survive), then in place.
async fn recovers_like_a_flat_one(format: protocol::pb::DiskFormat, out_format: &str) {
    let t = dirs();
    let dir = t.path();
    let s = script(CAP, 6, &[2, 4]);
    let (child, url) = start(dir, &[]);
    let mut c = hello_as(&url, CAP, format).await;
    for b in &s.batches {
        c.send(b).await;
        c.acked(b.seq).await;
    }
    let target = dir.join(format!("ds/{NAME}.vmdk"));
    let out = dir.join("r2.vmdk");
    let o = recover(dir, "m2", Some(out.to_str().unwrap()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_bytes(
        &dir.join("r2-flat.vmdk"),
        &s.states[2],
        "copy of the target at m2",
    );
    // The same point in `out_format`, from the same target.
    let packed = dir.join("r2s.vmdk");
    let o = run(&[
        "recover",
        "--datastore",
        dir.join("ds").to_str().unwrap(),
        "--retention",
        dir.join("ret").to_str().unwrap(),
        "--disk",
        DISK,
        "--point",
        "m2",
        "--out",
        packed.to_str().unwrap(),
        "--format",
        out_format,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_qemu_identical(&packed, &s.states[2], dir);
    assert!(!dir.join("r2s-flat.vmdk").exists() && !dir.join(".r2s.recover.raw").exists());
    drop(c);
    stop(child);
    assert_qemu_identical(&target, &s.states[6], dir);
    let o = recover(dir, "m4", None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_qemu_identical(&target, &s.states[4], dir);
}

/// RFC 3339 UTC with milliseconds (the format `recovery-points` prints).
fn format_rfc3339(ms: i64) -> String {
    master_target::status::format_time(ms)
}
