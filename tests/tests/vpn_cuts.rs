//! The VPN hop (process server -> master target) cut every second by a proxy that drops
//! every connection on it: replication resumes each time from the master target's durable
//! seq, and the replica ends equal to the source byte for byte, with nothing acknowledged
//! lost.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bench::cluster::{Cluster, free_port};
use bench::{verify, workload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Time between cuts.
const CUT_EVERY: Duration = Duration::from_secs(1);
/// Rate of each relayed connection and direction, so a sync spans several cuts (the process
/// server forwards over 4 connections: about 8 MiB/s in all).
const RATE_BYTES_PER_SEC: u64 = 2 << 20;

/// Cuts counted only when they dropped at least one live connection.
#[derive(Default)]
struct Cuts {
    effective: AtomicU64,
    open: AtomicU64,
}

/// Relays `port` to `target`, dropping every connection each [`CUT_EVERY`].
async fn cutting_proxy(listener: TcpListener, target: u16, cuts: Arc<Cuts>) {
    let (cut_tx, cut_rx) = watch::channel(0u64);
    let ticker = {
        let cuts = cuts.clone();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                tokio::time::sleep(CUT_EVERY).await;
                n += 1;
                if cuts.open.load(Ordering::SeqCst) > 0 {
                    cuts.effective.fetch_add(1, Ordering::SeqCst);
                }
                let _ = cut_tx.send(n);
            }
        })
    };
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            break;
        };
        let mut cut = cut_rx.clone();
        cut.borrow_and_update();
        let cuts = cuts.clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                return;
            };
            cuts.open.fetch_add(1, Ordering::SeqCst);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::select! {
                _ = relay(ri, wo) => {}
                _ = relay(ro, wi) => {}
                _ = cut.changed() => {}
            }
            cuts.open.fetch_sub(1, Ordering::SeqCst);
            // Dropping both halves closes both sockets: the peers see the link die.
        });
    }
    ticker.abort();
}

/// Copies one direction at [`RATE_BYTES_PER_SEC`].
async fn relay(mut from: impl AsyncReadExt + Unpin, mut to: impl AsyncWriteExt + Unpin) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs_f64(
            n as f64 / RATE_BYTES_PER_SEC as f64,
        ))
        .await;
    }
}

#[test]
fn sync_completes_exactly_while_the_vpn_hop_is_cut_every_second() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let proxy_port = free_port().unwrap();
    let mut c = Cluster::new(common::roles_exe(), dir.path()).unwrap();
    c.master_target_via = Some(proxy_port);
    let cuts = Arc::new(Cuts::default());
    let listener = rt
        .block_on(TcpListener::bind(("127.0.0.1", proxy_port)))
        .unwrap();
    let proxy = rt.spawn(cutting_proxy(listener, c.mt_port, cuts.clone()));
    if let Err(e) = c.start() {
        panic!("starting the cluster: {e:#}\n{}", c.log_tails());
    }

    // Incompressible data, so the wire carries the disk's size: about 4 s at the rate.
    let source = dir.path().join("vm.raw");
    let size = 32u64 << 20;
    workload::Workload::Random.build(&source, size, 41).unwrap();
    common::sync_ok(&c, &source, "disk-vpn", "vpn");
    verify::files_equal(&c.flat_path("vpn"), &source).unwrap();
    let during_full = cuts.effective.load(Ordering::SeqCst);
    eprintln!("link cut {during_full} times during the full sync");
    assert!(
        during_full >= 2,
        "the link was cut only {during_full} times while in use; the test proves nothing"
    );

    // Changes after the full sync cross the same flaky link too.
    workload::churn(&source, 600, 43).unwrap();
    common::sync_ok(&c, &source, "disk-vpn", "vpn");
    verify::files_equal(&c.flat_path("vpn"), &source).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check"])
        .arg(c.vmdk_path("vpn"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    c.stop(Duration::from_secs(20));
    proxy.abort();
}
