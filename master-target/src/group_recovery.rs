//! Recovery points and recovery of a replication group: the disks whose markers carry
//! the group's id, recovered together to one group marker.
//!
//! A group marker is cut at the same instant on every disk of a group, with the same id
//! and group on each (protocol `Marker.group`). The master target keeps no other record of
//! group membership, so the disks of group G are the disks whose journal still holds a
//! marker of G, and a group point is a marker id that *every* one of them holds (a marker
//! pruned or thinned away on one disk is no longer a group point). Recovering the group to
//! a point recovers each disk to that marker (recovery.rs), one disk after the other.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::recovery::{self, Point, RecoverRequest, Recovered, RecoveryError};
use crate::state::DiskState;
use crate::status::format_time;
use crate::vmdk::descriptor::CreateType;

/// A point every disk of a group has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPoint {
    pub marker_id: String,
    pub kind: String,
    pub tag: String,
    /// Source time of the marker on the first disk (ms since the epoch).
    pub time_unix_ms: i64,
    /// (disk id, seq of the marker on that disk), by disk id.
    pub disks: Vec<(String, u64)>,
}

/// The disks of `group` (by id) and the points all of them have, oldest first.
pub fn points(
    retention: &Path,
    group: &str,
) -> Result<(Vec<String>, Vec<GroupPoint>), RecoveryError> {
    let mut members: Vec<(String, Vec<Point>)> = Vec::new();
    let mut states = DiskState::load_all(retention)?;
    states.sort_by(|a, b| a.disk_id.cmp(&b.disk_id));
    for s in states {
        let marks: Vec<Point> = recovery::points(retention, &s.disk_id)?
            .into_iter()
            .filter(|p| p.group == group && !p.marker_id.is_empty())
            .collect();
        if !marks.is_empty() {
            members.push((s.disk_id, marks));
        }
    }
    let Some((_, first)) = members.first() else {
        return Err(RecoveryError::NoSuchGroup(group.to_string()));
    };
    let common = first
        .iter()
        .filter_map(|p| {
            let disks = members
                .iter()
                .map(|(id, marks)| {
                    let m = marks.iter().find(|m| m.marker_id == p.marker_id)?;
                    Some((id.clone(), m.seq))
                })
                .collect::<Option<Vec<_>>>()?;
            Some(GroupPoint {
                marker_id: p.marker_id.clone(),
                kind: p.kind.clone(),
                tag: p.tag.clone(),
                time_unix_ms: p.time_unix_ms,
                disks,
            })
        })
        .collect();
    Ok((members.into_iter().map(|(id, _)| id).collect(), common))
}

/// Picks the group point `spec` names: `latest` (the newest), `latest-app`, a marker id, a
/// tag (the newest with it), or an RFC 3339 time (the newest at or before it).
pub fn select<'a>(points: &'a [GroupPoint], spec: &str) -> Result<&'a GroupPoint, RecoveryError> {
    let newest = |f: &dyn Fn(&GroupPoint) -> bool| points.iter().rev().find(|p| f(p));
    match spec {
        "latest" => newest(&|_| true),
        "latest-app" => newest(&|p| p.kind == "app"),
        _ => newest(&|p| p.marker_id == spec)
            .or_else(|| newest(&|p| !p.tag.is_empty() && p.tag == spec))
            .or_else(|| {
                let t = recovery::parse_rfc3339(spec)?;
                newest(&|p| p.time_unix_ms <= t)
            }),
    }
    .ok_or_else(|| RecoveryError::NoSuchPoint(spec.to_string()))
}

/// What `recover --group` should do.
#[derive(Debug, Clone)]
pub struct GroupRecoverRequest {
    pub datastore: PathBuf,
    pub retention: PathBuf,
    pub group: String,
    pub point: String,
    /// A directory for the new VMDKs (`DIR/NAME.vmdk` per disk), or `None` for in place.
    pub out_dir: Option<PathBuf>,
    pub format: CreateType,
}

/// Recovers every disk of the group to the point the request names; stops at the first
/// disk that fails (the disks before it stay recovered, and the error says which failed).
pub fn recover(req: &GroupRecoverRequest) -> Result<Vec<(String, Recovered)>, RecoveryError> {
    let (_, points) = points(&req.retention, &req.group)?;
    let point = select(&points, &req.point)?;
    let mut done = Vec::new();
    for (disk_id, _) in &point.disks {
        let out = match &req.out_dir {
            Some(dir) => {
                let name = DiskState::load(&req.retention, disk_id)?
                    .map(|s| s.name)
                    .unwrap_or_else(|| disk_id.clone());
                Some(dir.join(format!("{name}.vmdk")))
            }
            None => None,
        };
        let one = RecoverRequest {
            datastore: req.datastore.clone(),
            retention: req.retention.clone(),
            disk_id: disk_id.clone(),
            point: point.marker_id.clone(),
            out,
            format: req.format,
        };
        let r = recovery::recover(&one).map_err(|e| RecoveryError::GroupDisk {
            disk_id: disk_id.clone(),
            done: done.len(),
            source: Box::new(e),
        })?;
        done.push((disk_id.clone(), r));
    }
    Ok(done)
}

pub fn to_json(group: &str, disks: &[String], points: &[GroupPoint]) -> serde_json::Value {
    let list: Vec<_> = points
        .iter()
        .map(|p| {
            let mut m = recovery::point_json(p.time_unix_ms, &p.kind, &p.tag, &p.marker_id);
            let disks: Vec<_> = p
                .disks
                .iter()
                .map(|(id, seq)| json!({"disk_id": id, "seq": seq}))
                .collect();
            m.insert("disks".into(), json!(disks));
            serde_json::Value::Object(m)
        })
        .collect();
    json!({ "group": group, "disks": disks, "points": list })
}

pub fn to_table(disks: &[String], points: &[GroupPoint]) -> String {
    let mut s = format!("disks: {}\n", disks.join(", "));
    s += &format!(
        "{:<24} {:<7} {:<20} {:<36} SEQ PER DISK\n",
        "TIME", "KIND", "TAG", "MARKER ID"
    );
    for p in points {
        let seqs: Vec<String> = p
            .disks
            .iter()
            .map(|(id, seq)| format!("{id}={seq}"))
            .collect();
        s += &format!(
            "{:<24} {:<7} {:<20} {:<36} {}\n",
            format_time(p.time_unix_ms),
            p.kind,
            p.tag,
            p.marker_id,
            seqs.join(" ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::journal::{Commit, Journal, MarkerEntry, RetentionPolicy};
    use crate::vmdk::{Claim, Disk, DiskSpec};
    use protocol::pb::{DiskFormat, Marker, MarkerKind};

    const CAP: u64 = 64 << 10;

    /// Replicates `n` batches to disk `id` (one byte value per seq over a different
    /// stretch), with group `g` app markers `(seq, id)`; returns the disk after each seq.
    fn replicate(ds: &Path, ret: &Path, id: &str, n: u64, markers: &[(u64, &str)]) -> Vec<Vec<u8>> {
        let spec = DiskSpec {
            disk_id: id,
            name: &format!("vm-{id}"),
            capacity: CAP,
            format: DiskFormat::Vmfs,
        };
        let mut disk = Disk::open_or_create(ds, &spec, Claim::New).unwrap();
        let (mut j, _) =
            Journal::open(ret, id, 0, RetentionPolicy::default(), disk.extent()).unwrap();
        let mut raw = vec![0u8; CAP as usize];
        let mut states = vec![raw.clone()];
        for seq in 1..=n {
            let (o, l) = (seq * 1000, 5000u64);
            j.append_undo(seq, seq as i64 * 1000, [(o, l)].into_iter(), |at, buf| {
                buf.copy_from_slice(&raw[at as usize..at as usize + buf.len()]);
                Ok(())
            })
            .unwrap();
            j.sync().unwrap();
            raw[o as usize..(o + l) as usize].fill(seq as u8);
            disk.extent()
                .write(o, &raw[o as usize..(o + l) as usize])
                .unwrap();
            disk.extent().sync().unwrap();
            let markers = markers
                .iter()
                .filter(|(s, _)| *s == seq)
                .map(|(_, mid)| MarkerEntry {
                    seq,
                    marker: Marker {
                        id: mid.to_string(),
                        kind: MarkerKind::App as i32,
                        time_unix_ms: seq as i64 * 1000,
                        group: "g".into(),
                        tag: String::new(),
                    },
                })
                .collect();
            j.commit(&Commit::of_one(seq, markers)).unwrap();
            states.push(raw.clone());
        }
        DiskState {
            disk_id: id.into(),
            name: spec.name.into(),
            capacity: CAP,
            applied_seq: n,
            ..Default::default()
        }
        .store(ret)
        .unwrap();
        states
    }

    #[test]
    fn a_group_recovers_every_disk_to_the_newest_marker_they_all_have() {
        let t = tempfile::tempdir().unwrap();
        let (ds, ret, out) = (
            t.path().join("ds"),
            t.path().join("ret"),
            t.path().join("out"),
        );
        for d in [&ds, &ret, &out] {
            std::fs::create_dir_all(d).unwrap();
        }
        // g-2 reached disk a only: the newest group point is g-1 (a: seq 2, b: seq 3).
        let a = replicate(&ds, &ret, "a", 5, &[(2, "g-1"), (4, "g-2")]);
        let b = replicate(&ds, &ret, "b", 5, &[(3, "g-1")]);
        replicate(&ds, &ret, "c", 2, &[]);
        let (disks, pts) = points(&ret, "g").unwrap();
        assert_eq!(disks, ["a", "b"], "c holds no marker of g");
        assert_eq!(pts.len(), 1);
        assert_eq!(pts[0].disks, [("a".to_string(), 2), ("b".to_string(), 3)]);
        let done = recover(&GroupRecoverRequest {
            datastore: ds.clone(),
            retention: ret.clone(),
            group: "g".into(),
            point: "latest".into(),
            out_dir: Some(out.clone()),
            format: CreateType::Vmfs,
        })
        .unwrap();
        assert_eq!(done.len(), 2);
        assert!(std::fs::read(out.join("vm-a-flat.vmdk")).unwrap() == a[2]);
        assert!(std::fs::read(out.join("vm-b-flat.vmdk")).unwrap() == b[3]);
        assert!(matches!(
            points(&ret, "other"),
            Err(RecoveryError::NoSuchGroup(_))
        ));
        assert!(matches!(
            select(&pts, "g-2"),
            Err(RecoveryError::NoSuchPoint(_))
        ));
    }
}
