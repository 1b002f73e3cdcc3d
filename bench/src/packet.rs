//! Packet mode of the WAN emulator: this network namespace and a new one joined by a
//! user-space forwarder, mahimahi style, so that real TCP (slow start, congestion control,
//! kernel buffers, tail-drop losses) runs across the emulated link.
//!
//! ```text
//!  this namespace                       forwarder (tokio)                 namespace NETNS
//!  10.201.0.1 dev fbwa-* (TUN) <== read/hold RTT/2/rate/queue/write ==> (TUN) fbwb-* 10.201.0.2
//! ```
//!
//! Both TUN devices are opened here (`IFF_TUN | IFF_NO_PI`, so every read is one IP packet;
//! no GSO/TSO reaches a TUN without `IFF_VNET_HDR`), the far one is moved into the new
//! namespace, and both get MTU 1400 like a VPN. Each direction reuses the proxy's
//! [`Direction`]: a packet is released at arrival + RTT/2, after the link has serialised
//! every packet before it, and is dropped when the queue (delay line + `buffer_ms` of the
//! rate) is full. The devices vanish with their file descriptors, which [`Link::close`]
//! waits for; the namespace is deleted when the [`Link`] is dropped. Needs root
//! (CAP_NET_ADMIN).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::wan::{Direction, Relayed};

/// MTU of both ends, as on a VPN.
pub const MTU: u32 = 1400;

/// A running packet-level link to a namespace.
#[derive(Debug)]
pub struct Link {
    /// Address of this namespace on the link.
    pub near: Ipv4Addr,
    /// Address of the far namespace on the link.
    pub far: Ipv4Addr,
    pub netns: String,
    /// IP bytes delivered near -> far (`up`) and far -> near (`down`), and TCP connections
    /// opened near -> far (SYNs seen, retransmitted ones included).
    pub relayed: Arc<Relayed>,
    /// Packets dropped because the queue was full.
    pub dropped: Arc<AtomicU64>,
    netns_file: Arc<File>,
    tasks: Vec<JoinHandle<()>>,
}

/// An open network namespace that commands can be started in.
#[derive(Debug, Clone)]
pub struct Netns(Arc<File>);

/// Makes `cmd` run in namespace `ns` (setns(2) between fork and exec).
pub fn enter(cmd: &mut Command, ns: &Netns) {
    let ns = ns.0.clone();
    // SAFETY: only async-signal-safe setns(2) runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (package iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Opens a new TUN device named `name`, non-blocking.
fn open_tun(name: &str) -> Result<OwnedFd> {
    // SAFETY: open(2) of a path literal; the fd is owned right below.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        bail!("opening /dev/net/tun: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads the ifreq we pass, on the tun descriptor we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &ifr) } < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Hands a TUN descriptor to the tokio reactor (readiness for reading; writes to a TUN
/// do not block).
fn register(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open, on the same descriptor, for as long as it is owned,
    // and the AsyncFd owns it.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering a TUN descriptor: {e}"))
}

impl Link {
    /// Creates namespace `netns` and the link to it, and starts forwarding (on the current
    /// tokio runtime).
    ///
    /// `loss` is the probability (0..1) that a packet is lost at random on the link, in
    /// each direction, on top of the queue's tail drops (counted with them in `dropped`).
    pub fn create(
        netns: &str,
        rtt_ms: u64,
        rate_mbit: u64,
        buffer_ms: u64,
        loss: f64,
    ) -> Result<Link> {
        if !(0.0..1.0).contains(&loss) {
            bail!("the loss probability must be in [0, 1), not {loss}");
        }
        // Unique per link, so that a device of the previous link still being torn down
        // never clashes with this one's.
        static LINKS: AtomicU64 = AtomicU64::new(0);
        let id = format!(
            "{}x{}",
            std::process::id() % 100_000,
            LINKS.fetch_add(1, Ordering::Relaxed)
        );
        let (dev_a, dev_b) = (format!("fbwa{id}"), format!("fbwb{id}"));
        let (near, far) = (Ipv4Addr::new(10, 201, 0, 1), Ipv4Addr::new(10, 201, 0, 2));
        ip(&["netns", "add", netns]).context("creating the far namespace (root needed)")?;
        // From here on, dropping `link` deletes the namespace again.
        let mut link = Link {
            near,
            far,
            netns: netns.to_string(),
            relayed: Arc::default(),
            dropped: Arc::default(),
            netns_file: Arc::new(
                File::open(format!("/run/netns/{netns}"))
                    .with_context(|| format!("opening /run/netns/{netns}"))?,
            ),
            tasks: Vec::new(),
        };
        let a = Arc::new(register(open_tun(&dev_a)?)?);
        let b = Arc::new(register(open_tun(&dev_b)?)?);
        let mtu = MTU.to_string();
        ip(&["link", "set", &dev_b, "netns", netns])?;
        ip(&["addr", "add", &format!("{near}/24"), "dev", &dev_a])?;
        ip(&["link", "set", &dev_a, "mtu", &mtu, "up"])?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{far}/24"),
            "dev",
            &dev_b,
        ])?;
        ip(&["-n", netns, "link", "set", &dev_b, "mtu", &mtu, "up"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        let up = Direction::with(rtt_ms, rate_mbit, buffer_ms);
        let down = Direction::with(rtt_ms, rate_mbit, buffer_ms);
        for (from, to, dir, up_way) in [(a.clone(), b.clone(), up, true), (b, a, down, false)] {
            let (tx, rx) = mpsc::unbounded_channel();
            link.tasks.push(tokio::spawn(read_side(
                from,
                dir.clone(),
                tx,
                link.dropped.clone(),
                up_way.then(|| link.relayed.clone()),
                loss,
            )));
            link.tasks.push(tokio::spawn(write_side(
                to,
                dir,
                rx,
                link.relayed.clone(),
                up_way,
                link.dropped.clone(),
            )));
        }
        Ok(link)
    }

    /// Makes `cmd` run in the far namespace.
    pub fn enter(&self, cmd: &mut Command) {
        enter(cmd, &self.netns());
    }

    /// The far namespace, for [`enter`] (keeps it open while held).
    pub fn netns(&self) -> Netns {
        Netns(self.netns_file.clone())
    }
}

impl Link {
    /// Stops forwarding and waits until both devices are gone (their descriptors closed),
    /// then deletes the namespace.
    pub async fn close(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        // `ip netns del` waits for a child process: on a blocking thread, not this one.
        // Taking the name leaves `Drop` nothing to delete.
        let netns = std::mem::take(&mut self.netns);
        let _ = tokio::task::spawn_blocking(move || ip(&["netns", "del", &netns])).await;
    }
}

impl Drop for Link {
    /// For a link never closed (an error on the way): stops forwarding and deletes the
    /// namespace, synchronously.
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if !self.netns.is_empty() {
            let _ = ip(&["netns", "del", &self.netns]);
        }
    }
}

/// Whether an IPv4 packet is a TCP SYN without ACK: a connection being opened.
fn is_syn(pkt: &[u8]) -> bool {
    let ihl = usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4;
    pkt.len() > ihl + 13 && pkt[0] >> 4 == 4 && pkt[9] == 6 && pkt[ihl + 13] & 0x12 == 0x02
}

/// Reads packets from `from` and queues each with its release time, or drops it when the
/// direction's queue is full (tail drop, as a router does) or, with probability `loss`, at
/// random. With `syns`, counts the connections opened in this direction.
async fn read_side(
    from: Arc<AsyncFd<OwnedFd>>,
    dir: Arc<Direction>,
    tx: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    dropped: Arc<AtomicU64>,
    syns: Option<Arc<Relayed>>,
    loss: f64,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok(mut guard) = from.readable().await else {
            return;
        };
        let n = match guard.try_io(|fd| {
            // SAFETY: read(2) into our buffer of buf.len() bytes.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        };
        if let Some(r) = &syns
            && is_syn(&buf[..n])
        {
            r.connections.fetch_add(1, Ordering::Relaxed);
        }
        if loss > 0.0 && rand::random::<f64>() < loss {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match dir.queue.try_acquire_many(n as u32) {
            Ok(p) => p.forget(),
            Err(_) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        let release = dir.schedule(n).await;
        if tx.send((release, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

/// Writes each queued packet to `to` at its release time.
async fn write_side(
    to: Arc<AsyncFd<OwnedFd>>,
    dir: Arc<Direction>,
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    relayed: Arc<Relayed>,
    up_way: bool,
    dropped: Arc<AtomicU64>,
) {
    let counter = if up_way { &relayed.up } else { &relayed.down };
    while let Some((release, pkt)) = rx.recv().await {
        tokio::time::sleep_until(release).await;
        dir.queue.add_permits(pkt.len());
        // SAFETY: write(2) of our packet buffer to the tun descriptor.
        let n = unsafe { libc::write(to.get_ref().as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        if n == pkt.len() as isize {
            counter.fetch_add(pkt.len() as u64, Ordering::Relaxed);
        } else {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Bytes sent from here to an echo server in the far namespace come back intact and
    /// are counted by the forwarder. Skipped (with a note) without root or TUN support.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn carries_tcp_intact_across_namespaces() {
        if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("packet mode needs root and /dev/net/tun: not tested here");
            return;
        }
        let name = format!("fbt{}", std::process::id());
        let link = Link::create(&name, 10, 100, 50, 0.0).unwrap();
        let port = crate::cluster::free_port().unwrap();
        let mut echo = Command::new("socat");
        echo.args([
            &format!("TCP-LISTEN:{port},bind={},reuseaddr", link.far),
            "EXEC:cat",
        ]);
        link.enter(&mut echo);
        let Ok(mut echo) = echo.spawn() else {
            eprintln!("socat not installed: packet mode not tested here");
            return;
        };
        let addr = std::net::SocketAddr::from((link.far, port));
        let data: Vec<u8> = (0..(1 << 20)).map(|_| rand::random()).collect();
        let sent = data.clone();
        let got = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let s = loop {
                match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
                {
                    Ok(s) => break s,
                    Err(e) if std::time::Instant::now() > deadline => panic!("connect: {e}"),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                }
            };
            s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
                .unwrap();
            let mut w = s.try_clone().unwrap();
            let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
            let mut back = vec![0u8; 1 << 20];
            (&s).read_exact(&mut back).unwrap();
            writer.join().unwrap();
            back
        })
        .await
        .unwrap();
        let _ = echo.kill();
        let _ = echo.wait();
        assert!(got == data, "the link altered the bytes");
        // Every payload byte crossed each way, plus IP/TCP headers.
        assert!(link.relayed.up.load(Ordering::Relaxed) > 1 << 20);
        assert!(link.relayed.down.load(Ordering::Relaxed) > 1 << 20);
        assert!(link.relayed.connections.load(Ordering::Relaxed) >= 1);
        link.close().await;
    }

    #[test]
    fn recognises_a_syn() {
        let mut pkt = [0u8; 40];
        pkt[0] = 0x45;
        pkt[9] = 6;
        pkt[20 + 13] = 0x02;
        assert!(is_syn(&pkt));
        pkt[20 + 13] = 0x12; // SYN+ACK: the answer, not a new connection
        assert!(!is_syn(&pkt));
        assert!(!is_syn(&pkt[..20]));
    }
}
