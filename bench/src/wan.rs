//! `bench wan`: a WAN emulator in proxy mode (portable, no root), standing in for a
//! site-to-site VPN between the process server and the master target.
//!
//! Every accepted TCP connection is relayed to the upstream. Each direction of the link has:
//! * a one-way delay of RTT/2: each chunk read is released to the other side no earlier
//!   than its arrival time plus the delay (by timestamp, so delays never add up);
//! * a rate limit shared by all connections in that direction: a chunk departs when the
//!   link has serialised every chunk before it (`next_free += len / rate`);
//! * a bounded queue of rate x (RTT/2 + buffer) bytes, so back-pressure reaches the sender
//!   as it would through a router's queue;
//! * optionally a per-connection window of bytes in flight (default 4 MiB, Linux's default
//!   `tcp_wmem` max), released one delay after delivery, like a TCP ACK coming back.
//!
//! Real TCP runs on loopback underneath, so slow start, loss and congestion control are not
//! modelled: results from this mode are labelled "proxy, no TCP dynamics".
//!
//! `--packet` switches to packet mode (root only, see `crate::packet`): the same delay,
//! rate and queue applied to IP packets between this namespace and a second one, so that
//! real TCP runs across the emulated link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::time::Instant;

/// Options of `bench wan`.
#[derive(clap::Args, Debug, Clone)]
pub struct WanArgs {
    /// Address to accept connections on (HOST:PORT); proxy mode.
    #[arg(long, required_unless_present = "packet")]
    pub listen: Option<SocketAddr>,
    /// Address every connection is relayed to (HOST:PORT); proxy mode.
    #[arg(long, required_unless_present = "packet")]
    pub upstream: Option<SocketAddr>,
    /// Packet mode: join this network namespace to a new one, NETNS, by a user-space
    /// forwarder over two TUN devices (MTU 1400) that delays, rate-limits and tail-drops IP
    /// packets; real TCP runs across it. Needs root. Runs until SIGTERM/SIGINT.
    #[arg(long, conflicts_with_all = ["listen", "upstream", "window"])]
    pub packet: bool,
    /// Packet mode: name of the namespace to create for the far side.
    #[arg(long, default_value = "fbwan", requires = "packet")]
    pub netns: String,
    /// Round-trip time to add, in milliseconds (half each way).
    #[arg(long, default_value_t = 100)]
    pub rtt_ms: u64,
    /// Link rate in Mbit/s, each direction (0 = unlimited).
    #[arg(long, default_value_t = 1000)]
    pub rate_mbit: u64,
    /// Router queue beyond the delay line, in milliseconds of the link rate.
    #[arg(long, default_value_t = 50)]
    pub buffer_ms: u64,
    /// Bytes in flight per connection and direction (stands in for TCP's window); 0 = off.
    #[arg(long, default_value = "4M", value_parser = protocol::cli::parse_size)]
    pub window: u64,
    /// Packet mode: random loss, in percent of packets, each direction.
    #[arg(long, default_value_t = 0.0, requires = "packet")]
    pub loss_percent: f64,
}

/// Bytes the proxy has relayed, per direction, over its lifetime: the "wire bytes" of a run
/// (what crossed the emulated VPN, including gRPC/TLS framing and acknowledgements).
#[derive(Debug, Default)]
pub struct Relayed {
    /// Client -> upstream (process server -> master target).
    pub up: AtomicU64,
    /// Upstream -> client (acknowledgements).
    pub down: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

impl Relayed {
    /// Bytes relayed in both directions so far.
    pub fn total(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }
}

/// One direction of the emulated link, shared by every connection (and, in packet mode,
/// by every packet).
#[derive(Debug)]
pub(crate) struct Direction {
    pub(crate) one_way: Duration,
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    /// When the link finishes serialising everything queued so far.
    next_free: Mutex<Instant>,
    /// Queue capacity in bytes: the delay line plus the router's queue.
    pub(crate) queue: Arc<Semaphore>,
}

impl Direction {
    fn new(args: &WanArgs) -> Arc<Direction> {
        Direction::with(args.rtt_ms, args.rate_mbit, args.buffer_ms)
    }

    pub(crate) fn with(rtt_ms: u64, rate_mbit: u64, buffer_ms: u64) -> Arc<Direction> {
        let one_way = Duration::from_millis(rtt_ms) / 2;
        let rate = rate_mbit * 1_000_000 / 8;
        let queue_bytes = if rate == 0 {
            256 << 20
        } else {
            (rate as u128 * (one_way.as_millis() + u128::from(buffer_ms)) / 1000).max(1 << 20)
                as usize
        };
        Arc::new(Direction {
            one_way,
            rate,
            next_free: Mutex::new(Instant::now()),
            queue: Arc::new(Semaphore::new(queue_bytes.min(Semaphore::MAX_PERMITS))),
        })
    }

    /// When a chunk of `len` bytes that arrived now reaches the far side.
    pub(crate) async fn schedule(&self, len: usize) -> Instant {
        let now = Instant::now();
        // A rate of 0 (unlimited) has no serialisation time.
        let depart = match (len as u64 * 1_000_000_000).checked_div(self.rate) {
            None => now,
            Some(nanos) => {
                let mut next = self.next_free.lock().await;
                let start = (*next).max(now);
                *next = start + Duration::from_nanos(nanos);
                *next
            }
        };
        depart + self.one_way
    }
}

const CHUNK: usize = 64 * 1024;

/// Relays `from` to `to` through `dir`, honouring the window of this connection.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dir: Arc<Direction>,
    window: u64,
    relayed: Arc<Relayed>,
    pick: fn(&Relayed) -> &AtomicU64,
) {
    let window = (window > 0).then(|| {
        Arc::new(Semaphore::new(
            window.min(Semaphore::MAX_PERMITS as u64) as usize
        ))
    });
    // Chunks in the delay line; the queue semaphore bounds their bytes, this bounds their count.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(16384);
    let d = dir.clone();
    let w = window.clone();
    let writer = tokio::spawn(async move {
        while let Some((release, chunk)) = rx.recv().await {
            tokio::time::sleep_until(release).await;
            // Counted before the write so that a reader who has the bytes sees them counted.
            pick(&relayed).fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            d.queue.add_permits(chunk.len());
            if let Some(w) = &w {
                // The "ACK" returns one delay later and opens the window again.
                let (w, n, delay) = (w.clone(), chunk.len(), d.one_way);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    w.add_permits(n);
                });
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(w) = &window {
            match w.acquire_many(n as u32).await {
                Ok(p) => p.forget(),
                Err(_) => break,
            }
        }
        match dir.queue.acquire_many(n as u32).await {
            Ok(p) => p.forget(),
            Err(_) => break,
        }
        let release = dir.schedule(n).await;
        if tx.send((release, buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Runs the emulator (proxy or packet mode) until `shutdown` resolves.
pub async fn serve(args: WanArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    if !args.packet && args.loss_percent != 0.0 {
        anyhow::bail!("--loss-percent needs --packet (the proxy has no packets to lose)");
    }
    if args.packet {
        let link = crate::packet::Link::create(
            &args.netns,
            args.rtt_ms,
            args.rate_mbit,
            args.buffer_ms,
            args.loss_percent / 100.0,
        )?;
        eprintln!(
            "bench wan: packet mode, RTT {} ms, {} Mbit/s, loss {}%, MTU {}: this namespace is {}, namespace {} is {}; \
             run the far side with `ip netns exec {} ...`",
            args.rtt_ms,
            args.rate_mbit,
            args.loss_percent,
            crate::packet::MTU,
            link.near,
            args.netns,
            link.far,
            args.netns
        );
        shutdown.await;
        link.close().await;
        return Ok(());
    }
    eprintln!(
        "bench wan: {:?} -> {:?} with RTT {} ms, {} Mbit/s, window {} (proxy mode, no TCP dynamics)",
        args.listen, args.upstream, args.rtt_ms, args.rate_mbit, args.window
    );
    serve_counted(args, Arc::default(), shutdown).await
}

/// Runs the proxy until `shutdown` resolves, adding every byte it delivers to `relayed`.
pub async fn serve_counted(
    args: WanArgs,
    relayed: Arc<Relayed>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (Some(listen), Some(upstream)) = (args.listen, args.upstream) else {
        anyhow::bail!("proxy mode needs --listen and --upstream");
    };
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let up = Direction::new(&args);
    let down = Direction::new(&args);
    tokio::pin!(shutdown);
    loop {
        let (client, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = &mut shutdown => return Ok(()),
        };
        let (up, down, window) = (up.clone(), down.clone(), args.window);
        let relayed = relayed.clone();
        relayed.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(
                pump(cr, sw, up, window, relayed.clone(), |r| &r.up),
                pump(sr, cw, down, window, relayed, |r| &r.down)
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// A proxy in front of an echo server, and a connection through it.
    async fn proxied(rtt_ms: u64, rate_mbit: u64, window: u64) -> (TcpStream, Arc<Relayed>) {
        let upstream = echo_server().await;
        let listen = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let args = WanArgs {
            listen: Some(listen),
            upstream: Some(upstream),
            packet: false,
            netns: String::new(),
            rtt_ms,
            rate_mbit,
            buffer_ms: 50,
            window,
            loss_percent: 0.0,
        };
        let relayed = Arc::new(Relayed::default());
        tokio::spawn(serve_counted(args, relayed.clone(), std::future::pending()));
        tokio::task::yield_now().await;
        loop {
            if let Ok(s) = TcpStream::connect(listen).await {
                return (s, relayed);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Sends `data` through the echo path while reading it back; returns what came back.
    async fn echo_through(s: TcpStream, data: &[u8]) -> Vec<u8> {
        let (mut r, mut w) = s.into_split();
        let sent = data.to_vec();
        let writer = tokio::spawn(async move { w.write_all(&sent).await.unwrap() });
        let mut back = vec![0u8; data.len()];
        r.read_exact(&mut back).await.unwrap();
        writer.await.unwrap();
        back
    }

    #[tokio::test(start_paused = true)]
    async fn round_trip_takes_the_configured_rtt() {
        let (mut s, _) = proxied(80, 0, 0).await;
        let t0 = Instant::now();
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        let rtt = t0.elapsed();
        assert!(
            rtt >= Duration::from_millis(80),
            "RTT {rtt:?} shorter than configured"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_each_direction() {
        // 8 Mbit/s = 1 MB/s each way, no window: 2 MB up and echoed back take about 2 s
        // (the two directions overlap), never less.
        let (s, _) = proxied(20, 8, 0).await;
        let data = vec![7u8; 2_000_000];
        let t0 = Instant::now();
        let back = echo_through(s, &data).await;
        let took = t0.elapsed();
        assert!(back == data);
        assert!(
            took >= Duration::from_millis(2000) && took < Duration::from_millis(2600),
            "2 MB at 1 MB/s took {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn relays_bytes_intact_and_counts_them() {
        let (s, relayed) = proxied(20, 100, 256 << 10).await;
        let data: Vec<u8> = (0..(3 << 20) + 17).map(|_| rand::random()).collect();
        let back = echo_through(s, &data).await;
        assert!(back == data, "the proxy altered the bytes");
        assert_eq!(relayed.up.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(relayed.down.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(relayed.total(), 2 * data.len() as u64);
        assert_eq!(relayed.connections.load(Ordering::Relaxed), 1);
    }
}
