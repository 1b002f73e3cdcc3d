//! Progress of a pass for the person watching: a bar with rate and ETA when stderr is a
//! terminal, a plain log line every [`LOG_EVERY`] otherwise (logs, CI, systemd).
//!
//! The display only reads counters ([`ScanStats`], [`Meter`]) that the reader and the
//! sender update with relaxed atomics, so it never slows the data path; it runs on its own
//! task and stops when the returned [`Display`] is finished or dropped. Log lines go through
//! [`init_logging`]'s writer, which hides the bar while a line is printed, so that a
//! reconnect warning is neither erased by the bar nor drawn through it.

use std::io::IsTerminal;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::oneshot;

use crate::scan::ScanStats;

/// Interval of the plain log lines.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Refresh interval of the terminal bar.
const BAR_TICK: Duration = Duration::from_millis(250);

/// The bar on screen, if any; log lines suspend it while they are written.
static ACTIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Logs to stderr like `protocol::cli::init_logging` (same default filter, `RUST_LOG`
/// overrides it), through a writer that keeps the progress bar intact.
pub fn init_logging(format: protocol::cli::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| BarAwareStderr);
    let _ = match format {
        protocol::cli::LogFormat::Text => builder.try_init(),
        protocol::cli::LogFormat::Json => builder.json().try_init(),
    };
}

/// Writes to stderr with the progress bar (if one is shown) hidden meanwhile.
struct BarAwareStderr;

impl Write for BarAwareStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = ACTIVE_BAR.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn set_active_bar(bar: Option<ProgressBar>) {
    if let Ok(mut b) = ACTIVE_BAR.lock() {
        *b = bar;
    }
}

/// Sender-side counters of a pass.
#[derive(Debug, Default)]
pub struct Meter {
    /// Encoded bytes of batches sent for the first time.
    pub wire_bytes: AtomicU64,
    /// Encoded bytes sent again after a reconnect.
    pub resent_bytes: AtomicU64,
    /// Highest seq durable in the process server's cache.
    pub acked_seq: AtomicU64,
    /// Highest seq applied at the master target.
    pub applied_seq: AtomicU64,
    /// Highest seq sent on any connection.
    pub sent_seq: AtomicU64,
    /// Encoded bytes of the batches not yet durable at the process server (the backlog).
    pub window_bytes: AtomicU64,
    /// Whether the process server has paused intake.
    pub paused: AtomicBool,
}

/// A running progress display.
#[derive(Debug)]
pub struct Display {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Display {
    /// Starts showing the progress of a pass over `capacity` bytes.
    pub fn start(capacity: u64, scan: Arc<ScanStats>, meter: Arc<Meter>) -> Display {
        let (stop, stopped) = oneshot::channel();
        let task = if std::io::stderr().is_terminal() {
            tokio::spawn(bar(capacity, scan, meter, stopped))
        } else {
            tokio::spawn(log_lines(capacity, scan, meter, stopped))
        };
        Display {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the display and waits until the bar is cleared.
    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Display {
    /// On an early exit (error, interrupt) the bar is cleared so the error reads cleanly.
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
            if let Some(bar) = ACTIVE_BAR.lock().ok().and_then(|mut b| b.take()) {
                bar.finish_and_clear();
            }
        }
    }
}

fn status(meter: &Meter) -> String {
    format!(
        "acked seq {}, applied seq {}",
        meter.acked_seq.load(Ordering::Relaxed),
        meter.applied_seq.load(Ordering::Relaxed)
    )
}

async fn bar(
    capacity: u64,
    scan: Arc<ScanStats>,
    meter: Arc<Meter>,
    mut stopped: oneshot::Receiver<()>,
) {
    let bar = ProgressBar::new(capacity);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    set_active_bar(Some(bar.clone()));
    let mut tick = tokio::time::interval(BAR_TICK);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = tick.tick() => {
                bar.set_position(scan.scanned.load(Ordering::Relaxed));
                bar.set_message(status(&meter));
            }
        }
    }
    set_active_bar(None);
    bar.finish_and_clear();
}

async fn log_lines(
    capacity: u64,
    scan: Arc<ScanStats>,
    meter: Arc<Meter>,
    mut stopped: oneshot::Receiver<()>,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + LOG_EVERY, LOG_EVERY);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = tick.tick() => {
                let scanned = scan.scanned.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                tracing::info!(
                    "scanned {} of {} ({:.1}%), {:.1} MB/s, {}",
                    scanned,
                    capacity,
                    scanned as f64 * 100.0 / capacity as f64,
                    scanned as f64 / secs / 1e6,
                    status(&meter)
                );
            }
        }
    }
}
