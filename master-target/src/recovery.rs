//! Recovery points of a disk, read from the retention volume without changing it.
//!
//! For now: every recorded marker, plus the latest committed batch boundary as a
//! crash-consistent point (when the disk is not inside a resync interval). Rolling back to
//! a point needs the undo journal, which a later version adds.

use std::path::Path;

use serde_json::json;

use crate::markers::{self, MarkerError};
use crate::state::{DiskState, StateError};
use crate::status::format_time;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("no disk {disk_id} on the retention volume {retention}")]
    UnknownDisk { disk_id: String, retention: String },
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Markers(#[from] MarkerError),
}

/// One recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// Source time of the point (ms since the epoch).
    pub time_unix_ms: i64,
    /// `crash`, `app`, `user` for markers; `latest` for the latest applied batch.
    pub kind: String,
    pub tag: String,
    pub marker_id: String,
    pub group: String,
    /// The batch after which the point holds.
    pub seq: u64,
}

/// The points of `disk_id`, oldest first.
pub fn points(retention: &Path, disk_id: &str) -> Result<Vec<Point>, RecoveryError> {
    let state = DiskState::load(retention, disk_id)?.ok_or_else(|| RecoveryError::UnknownDisk {
        disk_id: disk_id.to_string(),
        retention: retention.display().to_string(),
    })?;
    let mut out: Vec<Point> = markers::read(&markers::log_path(retention, disk_id))?
        .into_iter()
        // Markers above the durable seq belong to a batch not yet committed.
        .filter(|r| r.seq <= state.applied_seq)
        .map(|r| Point {
            kind: r.kind_name().to_string(),
            time_unix_ms: r.marker.time_unix_ms,
            tag: r.marker.tag,
            marker_id: r.marker.id,
            group: r.marker.group,
            seq: r.seq,
        })
        .collect();
    if state.consistent_seq > 0 {
        out.push(Point {
            time_unix_ms: state.consistent_unix_ms,
            kind: "latest".into(),
            tag: String::new(),
            marker_id: String::new(),
            group: String::new(),
            seq: state.consistent_seq,
        });
    }
    Ok(out)
}

pub fn to_json(disk_id: &str, points: &[Point]) -> serde_json::Value {
    let list: Vec<_> = points
        .iter()
        .map(|p| {
            json!({
                "time": format_time(p.time_unix_ms),
                "time_unix_ms": p.time_unix_ms,
                "kind": p.kind,
                "tag": p.tag,
                "marker_id": p.marker_id,
                "group": p.group,
                "seq": p.seq,
            })
        })
        .collect();
    json!({ "disk_id": disk_id, "points": list })
}

pub fn to_table(points: &[Point]) -> String {
    let mut s = format!(
        "{:<24} {:<7} {:<20} {:<36} {:<16} {:>10}\n",
        "TIME", "KIND", "TAG", "MARKER ID", "GROUP", "SEQ"
    );
    for p in points {
        s.push_str(&format!(
            "{:<24} {:<7} {:<20} {:<36} {:<16} {:>10}\n",
            format_time(p.time_unix_ms),
            p.kind,
            p.tag,
            p.marker_id,
            p.group,
            p.seq
        ));
    }
    s
}
