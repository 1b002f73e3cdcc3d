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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::time::Instant;

/// Options of `bench wan`.
#[derive(clap::Args, Debug, Clone)]
pub struct WanArgs {
    /// Address to accept connections on (HOST:PORT).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address every connection is relayed to (HOST:PORT).
    #[arg(long)]
    pub upstream: SocketAddr,
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
}

/// One direction of the emulated link, shared by every connection.
#[derive(Debug)]
struct Direction {
    one_way: Duration,
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    /// When the link finishes serialising everything queued so far.
    next_free: Mutex<Instant>,
    /// Queue capacity in bytes.
    queue: Arc<Semaphore>,
}

impl Direction {
    fn new(args: &WanArgs) -> Arc<Direction> {
        let one_way = Duration::from_millis(args.rtt_ms) / 2;
        let rate = args.rate_mbit * 1_000_000 / 8;
        let queue_bytes = if rate == 0 {
            256 << 20
        } else {
            (rate as u128 * (one_way.as_millis() + u128::from(args.buffer_ms)) / 1000).max(1 << 20)
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
    async fn schedule(&self, len: usize) -> Instant {
        let now = Instant::now();
        let depart = if self.rate == 0 {
            now
        } else {
            let mut next = self.next_free.lock().await;
            let start = (*next).max(now);
            *next = start + Duration::from_nanos(len as u64 * 1_000_000_000 / self.rate);
            *next
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

/// Runs the proxy until `shutdown` resolves.
pub async fn serve(args: WanArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "bench wan: {} -> {} with RTT {} ms, {} Mbit/s, window {} (proxy mode, no TCP dynamics)",
        listener.local_addr()?,
        args.upstream,
        args.rtt_ms,
        args.rate_mbit,
        args.window
    );
    let up = Direction::new(&args);
    let down = Direction::new(&args);
    tokio::pin!(shutdown);
    loop {
        let (client, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = &mut shutdown => return Ok(()),
        };
        let (up, down, upstream, window) = (up.clone(), down.clone(), args.upstream, args.window);
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pump(cr, sw, up, window), pump(sr, cw, down, window));
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

    #[tokio::test(start_paused = true)]
    async fn round_trip_takes_the_configured_rtt() {
        let upstream = echo_server().await;
        let listen = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let args = WanArgs {
            listen,
            upstream,
            rtt_ms: 80,
            rate_mbit: 0,
            buffer_ms: 50,
            window: 0,
        };
        tokio::spawn(serve(args, std::future::pending()));
        tokio::task::yield_now().await;
        let mut s = loop {
            if let Ok(s) = TcpStream::connect(listen).await {
                break s;
            }
            tokio::task::yield_now().await;
        };
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
}
