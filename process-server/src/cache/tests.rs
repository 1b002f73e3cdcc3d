//! Tests of the cache as a whole: group commit, recovery, corruption handling, deletion.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use super::segment::{HEADER_LEN, encode_header, encode_record, file_name};
use super::*;

fn config(dir: &Path, segment_size: u64) -> CacheConfig {
    CacheConfig {
        dir: dir.to_path_buf(),
        segment_size,
        quota: 1 << 30,
        high_water_percent: 80,
    }
}

/// Records the durable hook saw, in order.
type Seen = Arc<Mutex<Vec<(String, u64)>>>;

fn open_started(dir: &Path, segment_size: u64) -> (Cache, Vec<Damage>, Seen) {
    let (cache, damage) = Cache::open(&config(dir, segment_size)).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    cache
        .start(Arc::new(move |d: &str, q: u64, _bytes: u64| {
            s.lock().push((d.to_string(), q))
        }))
        .unwrap();
    (cache, damage, seen)
}

fn enc(b: Bytes) -> Payload {
    Payload::Encoded(b)
}

fn batch(seq: u64, len: usize) -> Bytes {
    Bytes::from(vec![seq as u8; len])
}

async fn append_all(cache: &Cache, disk: &str, seqs: std::ops::RangeInclusive<u64>, len: usize) {
    let mut rxs = Vec::new();
    for s in seqs {
        rxs.push(
            cache
                .append(
                    disk,
                    s,
                    1000 + s as i64,
                    enc(batch(s, len)),
                    Share::untracked(),
                )
                .await
                .unwrap(),
        );
    }
    for rx in rxs {
        rx.await.unwrap().unwrap();
    }
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(file_name(seq))
}

/// Whether segment `seq` holds only zeros from `offset` on (a preallocated, unused tail).
fn zeros_from(dir: &Path, seq: u64, offset: u64) -> bool {
    let data = std::fs::read(seg_path(dir, seq)).unwrap();
    data.len() as u64 >= offset && data[offset as usize..].iter().all(|&b| b == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_fsyncs_and_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _, seen) = open_started(dir.path(), 64 << 20);
    let cache = Arc::new(cache);
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for agent in 0..16 {
        let cache = cache.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let disk = format!("disk-{agent}");
            let mut rxs = Vec::new();
            for s in 1..=25 {
                rxs.push(
                    cache
                        .append(&disk, s, 0, enc(batch(s, 4096)), Share::untracked())
                        .await
                        .unwrap(),
                );
            }
            for rx in rxs {
                rx.await.unwrap().unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 400);
    assert!(
        cache.syncs() < 400,
        "{} syncs for 400 appends",
        cache.syncs()
    );
    // The durable hook saw every record, each disk in seq order.
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 400);
    for agent in 0..16 {
        let disk = format!("disk-{agent}");
        let seqs: Vec<u64> = seen
            .iter()
            .filter(|(d, _)| *d == disk)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(seqs, (1..=25).collect::<Vec<_>>());
    }
    cache.close().await;
}

#[tokio::test]
async fn recovery_truncates_a_torn_tail_and_appends_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _, _) = open_started(dir.path(), 64 << 20);
    append_all(&cache, "a", 1..=5, 1000).await;
    cache.close().await;
    drop(cache);
    let path = seg_path(dir.path(), 1);
    let end = (HEADER_LEN + 5 * super::segment::record_len("a", 1000)) as u64;
    assert!(zeros_from(dir.path(), 1, end));
    // A record whose write was cut short by a crash, in the preallocated tail.
    let mut rec = Vec::new();
    encode_record(&mut rec, 1, "a", 6, 0, &[7u8; 1000]);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&rec[..rec.len() / 2], end).unwrap();
    drop(f);

    let (cache, damage, _) = open_started(dir.path(), 64 << 20);
    assert!(damage.is_empty());
    // Cut: the tail reads as zeros again, still preallocated.
    assert!(zeros_from(dir.path(), 1, end));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 20);
    assert_eq!(cache.with_index(|ix| ix.seqs("a")), vec![1, 2, 3, 4, 5]);
    append_all(&cache, "a", 6..=6, 1000).await;
    cache.close().await;
    drop(cache);
    let (cache, _, _) = open_started(dir.path(), 64 << 20);
    assert_eq!(cache.with_index(|ix| ix.seqs("a")), vec![1, 2, 3, 4, 5, 6]);
    let loc = cache.with_index(|ix| ix.get("a", 6)).unwrap();
    let got = cache.read(vec![("a".into(), 6, loc)]).await;
    assert_eq!(got[0].as_ref().unwrap(), &batch(6, 1000));
    cache.close().await;
}

#[tokio::test]
async fn corruption_in_the_middle_is_reported_for_its_disk_only() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _, _) = open_started(dir.path(), 64 << 20);
    append_all(&cache, "a", 1..=1, 500).await;
    append_all(&cache, "b", 1..=1, 500).await;
    append_all(&cache, "a", 2..=2, 500).await;
    let b1 = cache.with_index(|ix| ix.get("b", 1)).unwrap();
    cache.close().await;
    drop(cache);
    let path = seg_path(dir.path(), 1);
    let mut data = std::fs::read(&path).unwrap();
    data[(b1.offset + u64::from(b1.len) - 10) as usize] ^= 0x40;
    std::fs::write(&path, &data).unwrap();

    let (cache, damage, _) = open_started(dir.path(), 64 << 20);
    assert_eq!(damage.len(), 1);
    assert_eq!(damage[0].disk_hint.as_deref(), Some("b"));
    assert_eq!(cache.with_index(|ix| ix.seqs("a")), vec![1, 2]);
    assert!(cache.with_index(|ix| ix.seqs("b")).is_empty());
    // Nothing was truncated: the valid record after the bad one is still there.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), data.len() as u64);
    cache.close().await;
}

#[tokio::test]
async fn a_corrupt_last_record_of_a_sealed_segment_is_reported_for_its_disk_only() {
    let dir = tempfile::tempdir().unwrap();
    // Two 3000-byte records per 8 KiB segment: a1 b1 | a2.
    let (cache, _, _) = open_started(dir.path(), 8 << 10);
    append_all(&cache, "a", 1..=1, 3000).await;
    append_all(&cache, "b", 1..=1, 3000).await;
    append_all(&cache, "a", 2..=2, 3000).await;
    let b1 = cache.with_index(|ix| ix.get("b", 1)).unwrap();
    assert_eq!(cache.with_index(|ix| ix.get("a", 2)).unwrap().segment, 2);
    cache.close().await;
    drop(cache);
    let path = seg_path(dir.path(), 1);
    let mut data = std::fs::read(&path).unwrap();
    // Sealed: cut to its last record.
    assert_eq!(data.len() as u64, b1.offset + u64::from(b1.len));
    data[(b1.offset + 100) as usize] ^= 0x01;
    std::fs::write(&path, &data).unwrap();

    let (cache, damage, _) = open_started(dir.path(), 8 << 10);
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].disk_hint.as_deref(), Some("b"));
    assert_eq!(cache.with_index(|ix| ix.seqs("a")), vec![1, 2]);
    cache.close().await;
}

#[tokio::test]
async fn stale_records_copied_into_a_new_segment_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _, _) = open_started(dir.path(), 64 << 20);
    append_all(&cache, "a", 1..=3, 200).await;
    cache.close().await;
    drop(cache);
    // Segment 2 made of segment 1's records behind a valid header of its own.
    let old = std::fs::read(seg_path(dir.path(), 1)).unwrap();
    let mut forged = encode_header(2).to_vec();
    forged.extend_from_slice(&old[HEADER_LEN..]);
    std::fs::write(seg_path(dir.path(), 2), &forged).unwrap();

    let (cache, damage, _) = open_started(dir.path(), 64 << 20);
    assert!(damage.is_empty());
    // Only segment 1's genuine records count; segment 2 was cut back to its header.
    assert_eq!(cache.with_index(|ix| ix.seqs("a")), vec![1, 2, 3]);
    assert!(cache.with_index(|ix| ix.get("a", 1)).unwrap().segment == 1);
    assert!(zeros_from(dir.path(), 2, HEADER_LEN as u64));
    cache.close().await;
}

#[tokio::test]
async fn applied_segments_are_deleted_and_the_rest_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _, _) = open_started(dir.path(), 8 << 10);
    append_all(&cache, "a", 1..=20, 1500).await;
    let before = cache.flow().usage();
    let segments_before = log::list_segments(dir.path()).unwrap();
    assert!(segments_before.len() > 3, "{segments_before:?}");

    let deleted = cache
        .retire_applied(|d| (d == "a").then_some(10))
        .await
        .unwrap();
    assert!(deleted > 0);
    let after = log::list_segments(dir.path()).unwrap();
    assert_eq!(after.len(), segments_before.len() - deleted);
    assert!(cache.flow().usage() < before);
    // Every record above the floor is still in a remaining segment and readable.
    for s in 11..=20 {
        let loc = cache.with_index(|ix| ix.get("a", s)).unwrap();
        assert!(after.contains(&loc.segment));
        let got = cache.read(vec![("a".into(), s, loc)]).await;
        assert_eq!(got[0].as_ref().unwrap(), &batch(s, 1500));
    }
    // An unknown disk's records are never deleted.
    assert_eq!(cache.retire_applied(|_| None).await.unwrap(), 0);
    cache.close().await;
}

#[test]
fn a_second_server_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_first, _) = Cache::open(&config(dir.path(), 1 << 20)).unwrap();
    assert!(matches!(
        Cache::open(&config(dir.path(), 1 << 20)),
        Err(CacheError::Locked { .. })
    ));
}

/// A size-limited tmpfs mounted on a temporary directory (needs root), unmounted on drop
/// (the mount first: fields drop in order).
struct SmallVolume {
    _mount: protocol::testing::Tmpfs,
    dir: tempfile::TempDir,
}

impl SmallVolume {
    fn mount(size: &str) -> Option<SmallVolume> {
        let dir = tempfile::tempdir().ok()?;
        let mount = protocol::testing::Tmpfs::mount(dir.path(), size).ok()?;
        Some(SmallVolume { _mount: mount, dir })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_pauses_with_enospc_and_resumes_when_segments_are_freed() {
    let Some(vol) = SmallVolume::mount("64k") else {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    };
    let dir = vol.dir.path();
    // The quota is far above the volume, so only ENOSPC can stop the writer.
    let (cache, _, seen) = open_started(dir, 16 << 10);
    let mut pause = cache.flow().pause();
    let mut rxs = std::collections::VecDeque::new();
    for s in 1..=40 {
        rxs.push_back(
            cache
                .append("a", s, 0, enc(batch(s, 4000)), Share::untracked())
                .await
                .unwrap(),
        );
    }
    // 40 x 4 KiB do not fit in 64 KiB: the writer reports the full volume and waits.
    tokio::time::timeout(
        Duration::from_secs(10),
        pause.wait_for(|r| r.as_deref().is_some_and(|r| r.contains("ENOSPC"))),
    )
    .await
    .expect("no ENOSPC pause")
    .unwrap();
    assert!(seen.lock().len() < 40);
    assert!(cache.flow().fatal().borrow().is_none());
    // Freeing applied segments lets it go on; every append completes, in order, none lost.
    while let Some(mut rx) = rxs.pop_front() {
        loop {
            tokio::select! {
                r = &mut rx => { r.unwrap().unwrap(); break; }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    cache.retire_applied(|_| Some(u64::MAX)).await.unwrap();
                }
            }
        }
    }
    let seqs: Vec<u64> = seen.lock().iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    assert!(pause.borrow().is_none(), "{:?}", *pause.borrow());
    assert!(cache.flow().fatal().borrow().is_none());
    // What is still cached reads back intact.
    let last = cache.with_index(|ix| ix.get("a", 40)).unwrap();
    let got = cache.read(vec![("a".into(), 40, last)]).await;
    assert_eq!(got[0].as_ref().unwrap(), &batch(40, 4000));
    cache.close().await;
    drop(cache);
}

#[tokio::test]
async fn a_newest_segment_torn_at_creation_is_rewritten_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _, _) = open_started(dir.path(), 64 << 20);
    append_all(&cache, "a", 1..=3, 300).await;
    cache.close().await;
    drop(cache);
    // A crash while segment 2's header was being written.
    std::fs::write(seg_path(dir.path(), 2), [0x46, 0x42, 0x43, 0x41, 0x7f]).unwrap();

    let (cache, damage, _) = open_started(dir.path(), 64 << 20);
    assert!(damage.is_empty(), "{damage:?}");
    assert_eq!(cache.with_index(|ix| ix.seqs("a")), vec![1, 2, 3]);
    append_all(&cache, "a", 4..=4, 300).await;
    assert_eq!(cache.with_index(|ix| ix.get("a", 4)).unwrap().segment, 2);
    cache.close().await;
    drop(cache);
    let (cache, damage, _) = open_started(dir.path(), 64 << 20);
    assert!(damage.is_empty(), "{damage:?}");
    assert_eq!(cache.with_index(|ix| ix.seqs("a")), vec![1, 2, 3, 4]);
    let header = std::fs::read(seg_path(dir.path(), 2)).unwrap();
    assert_eq!(super::segment::decode_header(&header, 2), Ok(2));
    cache.close().await;
}

/// Files of `dir` ending in `suffix`.
fn count(dir: &Path, suffix: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_str().unwrap().ends_with(suffix)
        })
        .count()
}

#[tokio::test]
async fn applied_segments_are_reused_and_their_old_records_never_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _, _) = open_started(dir.path(), 8 << 10);
    // 1500-byte batches: five per 8 KiB segment, so 1..=30 fill six segments and start a 7th.
    append_all(&cache, "a", 1..=30, 1500).await;
    let sealed = log::list_segments(dir.path()).unwrap().len() - 1;
    assert!(sealed >= 5, "{sealed}");
    let retired = cache.retire_applied(|_| Some(30)).await.unwrap();
    assert_eq!(retired, sealed);
    // At most MAX_FREE are kept for reuse, the rest deleted.
    assert_eq!(count(dir.path(), ".free"), log::MAX_FREE);
    assert_eq!(count(dir.path(), ".seg"), 1);
    // New segments come from the free files: no new file is created while one is left. The
    // last gets three records, so records of its previous use lie intact after them.
    append_all(&cache, "a", 31..=43, 1500).await;
    let segments = log::list_segments(dir.path()).unwrap();
    assert_eq!(segments.len(), 4, "{segments:?}");
    assert_eq!(count(dir.path(), ".free"), 1);
    cache.close().await;
    drop(cache);
    let last = *segments.last().unwrap();
    let end = (HEADER_LEN + 3 * super::segment::record_len("a", 1500)) as u64;
    assert!(!zeros_from(dir.path(), last, end));
    // After a restart only the records of the segments' current use are found: those of
    // 1..=30 in the reused files fail their CRC (seeded by the new segment seq), and the
    // newest segment's stale tail is cut.
    let (cache, damage, _) = open_started(dir.path(), 8 << 10);
    assert!(damage.is_empty(), "{damage:?}");
    assert_eq!(
        cache.with_index(|ix| ix.seqs("a")),
        (26..=43).collect::<Vec<_>>()
    );
    assert!(zeros_from(dir.path(), last, end));
    for s in 26..=43 {
        let loc = cache.with_index(|ix| ix.get("a", s)).unwrap();
        let got = cache.read(vec![("a".into(), s, loc)]).await;
        assert_eq!(got[0].as_ref().unwrap(), &batch(s, 1500));
    }
    cache.close().await;
}

#[tokio::test]
async fn a_preallocated_segment_torn_before_its_header_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _, _) = open_started(dir.path(), 64 << 10);
    append_all(&cache, "a", 1..=3, 300).await;
    cache.close().await;
    drop(cache);
    // A crash after segment 2's preallocation reached the disk but before its header did.
    std::fs::write(seg_path(dir.path(), 2), vec![0u8; 64 << 10]).unwrap();

    let (cache, damage, _) = open_started(dir.path(), 64 << 10);
    assert!(damage.is_empty(), "{damage:?}");
    append_all(&cache, "a", 4..=4, 300).await;
    assert_eq!(cache.with_index(|ix| ix.get("a", 4)).unwrap().segment, 2);
    let header = std::fs::read(seg_path(dir.path(), 2)).unwrap();
    assert_eq!(super::segment::decode_header(&header, 2), Ok(2));
    cache.close().await;
}

/// A checked `Batch` handed over as a message is encoded by the writer straight into its
/// record (no copy of its own in ingest), reads back as the same message, and holds its
/// share of the memory budget until it is durable.
#[tokio::test]
async fn a_batch_message_is_encoded_into_its_record_and_releases_its_budget() {
    use prost::Message;
    use protocol::pb::{Batch, Extent};

    let dir = tempfile::tempdir().unwrap();
    let (cache, _, seen) = open_started(dir.path(), 1 << 20);
    let b = Batch {
        disk_id: "a".into(),
        seq: 1,
        writes: vec![Extent {
            offset: 4096,
            length: 5000,
        }],
        payload: Bytes::from(vec![7u8; 5000]),
        data_len: 5000,
        time_unix_ms: 42,
        ..Default::default()
    };
    let budget = crate::budget::Budget::new(1 << 20);
    let payload = Payload::batch(b.clone());
    assert_eq!(payload.len(), b.encoded_len());
    let need = segment::record_len("a", payload.len()) as u64;
    let hold = budget.acquire(&mut Default::default(), need).await;
    assert_eq!(budget.used(), need);
    let rx = cache.append("a", 1, 42, payload, hold).await.unwrap();
    let loc = rx.await.unwrap().unwrap();
    assert_eq!(budget.used(), 0, "given back once durable");
    assert_eq!(*seen.lock(), vec![("a".to_string(), 1)]);
    let got = cache.read(vec![("a".into(), 1, loc)]).await;
    let bytes = got.into_iter().next().unwrap().unwrap();
    assert_eq!(bytes, Bytes::from(b.encode_to_vec()));
    assert_eq!(Batch::decode(bytes).unwrap(), b);
    cache.close().await;
}
