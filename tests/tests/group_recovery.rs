//! Group recovery through the real binaries: one `agent replicate` serves two disks of one
//! replication group over NBD, qemu-io writes into both, group markers are cut on both at
//! one instant with `agent marker` (no --disk-id), and `master-target recovery-points
//! --group` / `recover --group --point` bring back both disks exactly as they were at the
//! chosen marker, compared byte for byte with copies of the sources taken at it.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bench::cluster::{Cluster, free_port};
use bench::workload;

const GROUP: &str = "grp-e2e";
/// (disk id, target name) of the group's two disks.
const DISKS: [(&str, &str); 2] = [("disk-grp-a", "grpa"), ("disk-grp-b", "grpb")];
/// Bound on every wait of the test (each is far shorter on a healthy machine).
const WAIT: Duration = Duration::from_secs(120);

/// A row of `recovery-points --group GROUP`'s table.
#[derive(Debug)]
struct GroupPoint {
    tag: String,
    marker_id: String,
    /// `DISK_ID=SEQ` per disk holding the point.
    seqs: Vec<String>,
}

/// `recovery-points --group GROUP` (the table: this crate reads no JSON): the group's
/// disks and its common points. A row is `TIME KIND TAG MARKER_ID ID=SEQ...`; every marker
/// of this test has a tag, so the columns split on whitespace.
fn group_points(c: &Cluster) -> (Vec<String>, Vec<GroupPoint>) {
    let retention = c.retention.to_str().unwrap();
    let out = common::master_target(
        c,
        &[
            "recovery-points",
            "--retention",
            retention,
            "--group",
            GROUP,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let disks = lines
        .next()
        .and_then(|l| l.strip_prefix("disks: "))
        .unwrap_or_else(|| panic!("no disks line:\n{text}"))
        .split(", ")
        .map(str::to_string)
        .collect();
    let points = lines
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert!(cols.len() >= 5, "row {l:?} of\n{text}");
            GroupPoint {
                tag: cols[2].to_string(),
                marker_id: cols[3].to_string(),
                seqs: cols[4..].iter().map(|s| s.to_string()).collect(),
            }
        })
        .collect();
    (disks, points)
}

/// Recovers the group to `point` into a new directory `out` and checks each disk's flat
/// extent against `want` (one source copy per disk of [`DISKS`]), byte for byte.
fn recover_and_compare(c: &Cluster, point: &str, out: &Path, want: &[Vec<u8>]) {
    std::fs::create_dir_all(out).unwrap();
    let (ds, ret) = (c.datastore.to_str().unwrap(), c.retention.to_str().unwrap());
    let printed = common::master_target(
        c,
        &[
            "recover",
            "--datastore",
            ds,
            "--retention",
            ret,
            "--group",
            GROUP,
            "--point",
            point,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let printed = String::from_utf8_lossy(&printed.stdout);
    for ((id, name), want) in DISKS.iter().zip(want) {
        assert!(
            printed.contains(&format!("recovered disk {id} of group {GROUP}")),
            "{printed}"
        );
        let got = std::fs::read(out.join(format!("{name}-flat.vmdk"))).unwrap();
        assert!(
            got == *want,
            "disk {id} recovered to {point} differs from its source at that marker"
        );
    }
}

#[test]
fn two_disks_of_a_group_recover_together_to_a_group_marker() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::cluster(dir.path());
    let sources: Vec<PathBuf> = DISKS
        .iter()
        .enumerate()
        .map(|(i, (id, _))| {
            let p = dir.path().join(format!("{id}.raw"));
            workload::generate_disk(&p, 8 << 20, 40 + i as u64).unwrap();
            p
        })
        .collect();
    let nbd: Vec<u16> = DISKS.iter().map(|_| free_port().unwrap()).collect();
    let control = free_port().unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut cmd = c.role("agent");
    cmd.args(["replicate", "--process-server", &c.ps_url()]);
    for (((id, name), src), port) in DISKS.iter().zip(&sources).zip(&nbd) {
        cmd.arg("--disk").arg(format!(
            "{id}={},name={name},nbd=127.0.0.1:{port}",
            src.display()
        ));
    }
    cmd.args(["--group", GROUP])
        .args(["--nbd-listen", &format!("127.0.0.1:{}", nbd[0])])
        .args(["--control-listen", &format!("127.0.0.1:{control}")])
        .arg("--passphrase-file")
        .arg(&c.passphrase_file)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut agent = common::Reap(cmd.spawn().unwrap());
    for &port in &nbd {
        common::wait_until("the NBD exports listen", &c, WAIT, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    // Writes on both disks, then the first group marker: the group at it is the sources now.
    common::qemu_io(&c, nbd[0], &["write -P 0x11 0 1M", "flush"]);
    common::qemu_io(
        &c,
        nbd[1],
        &["write -P 0x21 1M 512K", "write -z 4M 1M", "flush"],
    );
    common::user_marker(&c, control, None, "step1", WAIT, String::new);
    let at_step1: Vec<Vec<u8>> = sources.iter().map(|s| std::fs::read(s).unwrap()).collect();

    // Overwrite part of what step1 holds, on both disks, and cut a second marker.
    common::qemu_io(&c, nbd[0], &["write -P 0x12 512K 1M", "flush"]);
    common::qemu_io(&c, nbd[1], &["write -P 0x22 1M 2M", "flush"]);
    common::user_marker(&c, control, None, "step2", WAIT, String::new);
    let at_step2: Vec<Vec<u8>> = sources.iter().map(|s| std::fs::read(s).unwrap()).collect();

    // And more after it, so that neither marker is simply the latest state.
    common::qemu_io(&c, nbd[0], &["write -P 0x13 0 3M", "flush"]);
    common::qemu_io(&c, nbd[1], &["write -P 0x23 0 2M", "flush"]);
    for ((_, name), src) in DISKS.iter().zip(&sources) {
        let flat = c.flat_path(name);
        common::wait_until("the targets equal the sources", &c, WAIT, || {
            std::fs::read(&flat).ok() == std::fs::read(src).ok()
        });
    }
    assert!(agent.0.try_wait().unwrap().is_none(), "agent exited early");
    for (a, b) in at_step1.iter().zip(&at_step2) {
        assert!(a != b, "step2 left a disk unchanged");
    }

    // Both markers are common points of the group, on both disks.
    let mut seen = (Vec::new(), Vec::new());
    common::wait_until("a step2 point of the group", &c, WAIT, || {
        seen = group_points(&c);
        seen.1.iter().any(|p| p.tag == "step2")
    });
    let (mut disks, points) = seen;
    disks.sort_unstable();
    assert_eq!(disks, [DISKS[0].0, DISKS[1].0], "{points:?}");
    for tag in ["step1", "step2"] {
        let p = points.iter().find(|p| p.tag == tag).expect("a group point");
        assert_eq!(p.seqs.len(), 2, "{p:?}");
        for (id, _) in DISKS {
            assert!(
                p.seqs.iter().any(|s| s.starts_with(&format!("{id}="))),
                "{p:?}"
            );
        }
    }
    let step1_id = points
        .iter()
        .find(|p| p.tag == "step1")
        .map(|p| p.marker_id.clone())
        .unwrap();

    // Recover the group to step1 by its marker id and to step2 by its tag, while the agent
    // and the servers keep running.
    recover_and_compare(&c, &step1_id, &dir.path().join("at-step1"), &at_step1);
    recover_and_compare(&c, "step2", &dir.path().join("at-step2"), &at_step2);

    // Clean stop on SIGTERM.
    common::stop_on_sigterm(&c, &mut agent.0);
}
