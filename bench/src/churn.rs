//! A churn generator: random writes at a set rate through an NBD export (the agent's
//! `replicate --nbd-listen`), as a guest writing to its disk would.
//!
//! The client speaks fixed-newstyle NBD (`NBD_OPT_EXPORT_NAME`, then simple replies) with one
//! request in flight, using the agent's own wire constants (`agent::nbd::proto`). Writes of
//! `write_size` random bytes go to `write_size`-aligned offsets chosen by a [`Pattern`]
//! (uniform, a Zipf-like hot spot, or a sequential log), paced so that write
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

/// Where the writes go.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Every aligned slot equally likely.
    Uniform,
    /// Zipf-like (exponent about 1): slot k is written with probability about 1/k, so a few
    /// slots take most writes, as a database's hot pages do.
    Hotspot,
    /// Sequential, wrapping at the end: a log or journal being appended to.
    Log,
}

impl Pattern {
    /// The slot (of `slots`) of write number `i`.
    pub fn slot(self, rng: &mut impl Rng, slots: u64, i: u64) -> u64 {
        match self {
            Pattern::Uniform => rng.random_range(0..slots),
            // slots^u for u uniform in [0, 1) is log-uniform on [1, slots): P(k) ~ 1/k.
            Pattern::Hotspot => {
                let u: f64 = rng.random();
                ((slots as f64).powf(u) as u64)
                    .saturating_sub(1)
                    .min(slots - 1)
            }
            Pattern::Log => i % slots,
        }
    }
}

/// How to churn.
#[derive(Debug, Clone)]
pub struct Pace {
    /// Bytes per second to write.
    pub bytes_per_sec: f64,
    pub pattern: Pattern,
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
        let slot = pace.pattern.slot(&mut rng, slots, i);
        client.write(slot * pace.write_size as u64, &buf)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(p: Pattern, slots: u64, n: u64) -> Vec<u64> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut c = vec![0u64; slots as usize];
        for i in 0..n {
            c[p.slot(&mut rng, slots, i) as usize] += 1;
        }
        c
    }

    #[test]
    fn patterns_spread_concentrate_or_append_as_named() {
        let (slots, n) = (1000, 100_000);
        let top_tenth = |c: &[u64]| {
            let mut v = c.to_vec();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v[..c.len() / 10].iter().sum::<u64>() as f64 / n as f64
        };
        let uniform = counts(Pattern::Uniform, slots, n);
        assert!(uniform.iter().all(|&k| k > 0));
        assert!(top_tenth(&uniform) < 0.15, "{}", top_tenth(&uniform));
        let hot = counts(Pattern::Hotspot, slots, n);
        assert!(top_tenth(&hot) > 0.6, "{}", top_tenth(&hot));
        let mut rng = StdRng::seed_from_u64(1);
        let log: Vec<u64> = (0..2500)
            .map(|i| Pattern::Log.slot(&mut rng, slots, i))
            .collect();
        assert!(log.windows(2).all(|w| w[1] == (w[0] + 1) % slots));
    }
}
