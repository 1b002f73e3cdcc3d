//! A churn generator: random writes at a set rate through an NBD export (the agent's
//! `replicate --nbd-listen`), as a guest writing to its disk would.
//!
//! The client speaks fixed-newstyle NBD (`NBD_OPT_EXPORT_NAME`, then simple replies) with one
//! request in flight, using the agent's own wire constants (`agent::nbd::proto`). Writes of
//! `write_size` random bytes go to random `write_size`-aligned offsets, paced so that write
//! `i` starts no earlier than `i x write_size / rate` after the start (a writer that falls
//! behind does not burst to catch up beyond what the export accepts); an NBD flush (a
//! crash-consistent point) follows every `flush_every`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent::nbd::proto::{self, Command, Request};
use anyhow::{Context, Result, bail, ensure};
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

/// One NBD connection in transmission phase.
pub struct NbdClient {
    stream: TcpStream,
    pub size: u64,
    cookie: u64,
}

impl NbdClient {
    /// Connects and negotiates the default export.
    pub fn connect(addr: &str) -> Result<NbdClient> {
        let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        ensure!(
            u64::from_be_bytes(hello[0..8].try_into()?) == proto::NBDMAGIC
                && u64::from_be_bytes(hello[8..16].try_into()?) == proto::IHAVEOPT,
            "{addr} is not a newstyle NBD server"
        );
        let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
        let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
        let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= proto::FLAG_C_NO_ZEROES;
        }
        let mut opt = Vec::with_capacity(20);
        opt.extend(client_flags.to_be_bytes());
        opt.extend(proto::IHAVEOPT.to_be_bytes());
        opt.extend(proto::OPT_EXPORT_NAME.to_be_bytes());
        opt.extend(0u32.to_be_bytes());
        s.write_all(&opt)?;
        let mut reply = vec![0u8; if no_zeroes { 10 } else { 134 }];
        s.read_exact(&mut reply)?;
        Ok(NbdClient {
            stream: s,
            size: u64::from_be_bytes(reply[0..8].try_into()?),
            cookie: 0,
        })
    }

    fn request(&mut self, command: Command, offset: u64, data: &[u8]) -> Result<()> {
        self.cookie += 1;
        let header = Request {
            flags: 0,
            command,
            cookie: self.cookie,
            offset,
            length: data.len() as u32,
        }
        .encode();
        self.stream.write_all(&header)?;
        self.stream.write_all(data)?;
        let mut r = [0u8; 16];
        self.stream.read_exact(&mut r)?;
        let magic = u32::from_be_bytes(r[0..4].try_into()?);
        let error = u32::from_be_bytes(r[4..8].try_into()?);
        let cookie = u64::from_be_bytes(r[8..16].try_into()?);
        ensure!(
            magic == proto::SIMPLE_REPLY_MAGIC && cookie == self.cookie,
            "bad NBD reply (magic {magic:#x}, cookie {cookie})"
        );
        if error != 0 {
            bail!("NBD {command:?} at {offset} failed with error {error}");
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.request(Command::Write, offset, data)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.request(Command::Flush, 0, &[])
    }
}

/// How to churn.
#[derive(Debug, Clone)]
pub struct Pace {
    /// Bytes per second to write.
    pub bytes_per_sec: f64,
    pub write_size: usize,
    pub flush_every: Duration,
    pub seed: u64,
}

/// Bytes written and acknowledged so far by a running [`run`].
#[derive(Debug, Default)]
pub struct Written {
    pub bytes: AtomicU64,
    pub flushes: AtomicU64,
}

/// Writes through `client` at `pace` until `stop` is set; returns the seconds it ran.
pub fn run(
    client: &mut NbdClient,
    pace: &Pace,
    stop: &AtomicBool,
    written: &Arc<Written>,
) -> Result<f64> {
    let slots = client.size / pace.write_size as u64;
    ensure!(slots > 0, "the export is smaller than one write");
    let mut rng = StdRng::seed_from_u64(pace.seed);
    let mut buf = vec![0u8; pace.write_size];
    let start = Instant::now();
    let mut last_flush = start;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due =
            start + Duration::from_secs_f64(i as f64 * pace.write_size as f64 / pace.bytes_per_sec);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        rng.fill_bytes(&mut buf);
        client.write(rng.random_range(0..slots) * pace.write_size as u64, &buf)?;
        written
            .bytes
            .fetch_add(pace.write_size as u64, Ordering::Relaxed);
        if last_flush.elapsed() >= pace.flush_every {
            client.flush()?;
            written.flushes.fetch_add(1, Ordering::Relaxed);
            last_flush = Instant::now();
        }
        i += 1;
    }
    client.flush()?;
    Ok(start.elapsed().as_secs_f64())
}
