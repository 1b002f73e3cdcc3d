//! CPU time and peak memory of the processes a run starts.
//!
//! CPU time comes from two sources, because a process can be asked only while it exists:
//! * a long-lived server is sampled through `/proc/PID/stat` (utime + stime) before it is
//!   stopped, so that a run can subtract what the server spent before the measured transfer;
//! * a process whose exit ends the measurement (an agent, a peer's sender) is reaped with
//!   `wait4(2)`, whose `rusage` holds its total CPU time, its reaped children included (a
//!   shell pipeline reports all its stages).
//!
//! Peak memory is always `VmHWM` of `/proc/PID/status`, sampled while the process runs
//! ([`RssWatch`] for a process tree). `ru_maxrss` is not used: Linux folds the RSS of the
//! image a child replaced at exec into it, so every child of this (large) process would
//! report at least this process's own RSS.

use std::collections::HashMap;
use std::fs;
use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// CPU seconds (user + system) and peak resident set of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub cpu_secs: f64,
    pub peak_rss_bytes: u64,
}

impl Usage {
    /// CPU spent since `earlier` (a sample of the same process); the peak is this one's.
    pub fn since(self, earlier: Usage) -> Usage {
        Usage {
            cpu_secs: (self.cpu_secs - earlier.cpu_secs).max(0.0),
            peak_rss_bytes: self.peak_rss_bytes,
        }
    }
}

/// Samples a live process from `/proc`. Children it has reaped count in its CPU time
/// (cutime/cstime), as with `wait4`.
pub fn sample(pid: u32) -> Result<Usage> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(Usage {
        cpu_secs: parse_stat_cpu_ticks(&stat, true)? as f64 / clock_ticks_per_sec(),
        peak_rss_bytes: parse_vm_hwm(&status)?,
    })
}

/// CPU seconds of thread `tid` of this process (e.g. a tokio worker, from `gettid()`).
pub fn thread_cpu_secs(tid: i32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .with_context(|| format!("reading /proc/self/task/{tid}/stat"))?;
    // Without cutime/cstime: in a thread's stat they are the whole process's reaped
    // children (here: every role and peer this process started).
    Ok(parse_stat_cpu_ticks(&stat, false)? as f64 / clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime (fields 14-15), plus cutime + cstime (16-17) with `children`, of a
/// `/proc/PID/stat` line. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted after its last ')'.
fn parse_stat_cpu_ticks(stat: &str, children: bool) -> Result<u64> {
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc/PID/stat")?;
    // After ')' come field 3 (state) onwards: fields 14..=17 are at indices 11..=14.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.len() < 15 {
        bail!("short /proc/PID/stat: {stat}");
    }
    fields[11..if children { 15 } else { 13 }]
        .iter()
        .map(|f| f.parse::<u64>().context("bad CPU time in /proc/PID/stat"))
        .sum()
}

/// `VmHWM:   1234 kB` of `/proc/PID/status`, in bytes.
fn parse_vm_hwm(status: &str) -> Result<u64> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc/PID/status (process gone?)")?;
    let kb: u64 = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .context("bad VmHWM")?;
    Ok(kb * 1024)
}

/// Follows the peak resident set of a process and its descendants, sampling `VmHWM` every
/// 10 ms on a thread; the peak is the sum, over the processes seen, of each one's highest
/// `VmHWM` (a pipeline's stages run at the same time).
#[derive(Debug)]
pub struct RssWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssWatch {
    pub fn start(pid: u32) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peaks: HashMap<u32, u64> = HashMap::new();
            loop {
                sample_tree(pid, &mut peaks);
                if flag.load(Ordering::Relaxed) {
                    return peaks.values().sum();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; returns the peak in bytes.
    pub fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Records the `VmHWM` of `pid` and its descendants (through
/// `/proc/PID/task/PID/children`) into `peaks`.
fn sample_tree(pid: u32, peaks: &mut HashMap<u32, u64>) {
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if let Some(hwm) = fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| parse_vm_hwm(&s).ok())
        {
            let e = peaks.entry(p).or_default();
            *e = (*e).max(hwm);
        }
        if let Ok(children) = fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
}

/// Waits for `child` to exit (killing it past `timeout`) and returns its status, and its
/// CPU time with the peak `watch` saw. The child is reaped here: do not wait on or kill it
/// afterwards.
pub fn wait_with_usage(
    child: &mut Child,
    timeout: Duration,
    watch: RssWatch,
) -> Result<(ExitStatus, Usage)> {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain old data, written by wait4 for our own child's pid.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on a child we spawned and have not reaped.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            return Ok((
                ExitStatus::from_raw(status),
                Usage {
                    cpu_secs: secs(ru.ru_utime) + secs(ru.ru_stime),
                    peak_rss_bytes: watch.peak(),
                },
            ));
        }
        if r < 0 {
            bail!("wait4({pid}): {}", std::io::Error::last_os_error());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {pid} still running after {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends SIGTERM to a server and reaps it, returning its total usage (reaped children
/// included). A server still running after `timeout` is killed.
pub fn terminate_with_usage(
    child: &mut Child,
    timeout: Duration,
    watch: RssWatch,
) -> Result<(ExitStatus, Usage)> {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_with_usage(child, timeout, watch)
}

/// Whether something listens on TCP `port` (any IPv4 address) in the network namespace of
/// process `pid` (None: this process), according to `/proc/PID/net/tcp`. Used instead of a
/// test connection, which a one-shot receiver such as `socat TCP-LISTEN` would take as its
/// only client.
pub fn listening(pid: Option<u32>, port: u16) -> bool {
    let path = pid.map_or("/proc/net/tcp".to_string(), |p| {
        format!("/proc/{p}/net/tcp")
    });
    fs::read_to_string(path).is_ok_and(|t| tcp_table_listens(&t, port))
}

fn tcp_table_listens(table: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // f[1] = local address (hex IP:port), f[3] = state; 0A = LISTEN.
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// Waits until `port` is listening in `child`'s namespace, or fails if `child` exits first
/// or `timeout` passes.
pub fn wait_listening(child: &mut Child, port: u16, what: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !listening(Some(child.id()), port) {
        if let Some(s) = child.try_wait()? {
            bail!("{what} exited with {s} before listening on port {port}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 5 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat, true).unwrap(), 250 + 50 + 7 + 3);
        assert_eq!(parse_stat_cpu_ticks(stat, false).unwrap(), 250 + 50);
    }

    #[test]
    fn samples_this_process_and_thread() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        // Work until this thread has been charged at least one clock tick (bounded).
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut x = 0u64;
        let mut thread = thread_cpu_secs(tid).unwrap();
        while thread == 0.0 && Instant::now() < deadline {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            thread = thread_cpu_secs(tid).unwrap();
        }
        assert!(thread > 0.0, "no CPU charged to a busy thread");
        let u = sample(std::process::id()).unwrap();
        assert!(u.peak_rss_bytes > 0);
        // The process has been charged at least what this one thread was.
        assert!(u.cpu_secs >= thread, "{} < {thread}", u.cpu_secs);
    }

    #[test]
    fn wait4_reports_the_child_and_the_watch_its_tree() {
        use std::io::Write;
        use std::process::Stdio;
        // `sh` waits on `cat`, which waits for its stdin: both are alive until we close it.
        let mut c = Command::new("sh")
            .args(["-c", "cat >/dev/null; exit 3"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut peaks = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while peaks.len() < 2 && Instant::now() < deadline {
            sample_tree(c.id(), &mut peaks);
        }
        assert_eq!(peaks.len(), 2, "sh and its cat: {peaks:?}");
        assert!(peaks.values().all(|&p| p > 0));
        let watch = RssWatch::start(c.id());
        c.stdin.take().unwrap().write_all(b"x").unwrap();
        let (status, usage) = wait_with_usage(&mut c, Duration::from_secs(20), watch).unwrap();
        assert_eq!(status.code(), Some(3));
        assert!(usage.cpu_secs.is_finite() && usage.cpu_secs >= 0.0);
    }

    #[test]
    fn sees_a_listener_without_connecting() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening(None, port));
        assert!(listening(Some(std::process::id()), port));
        drop(l);
    }
}
