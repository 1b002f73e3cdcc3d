//! A replication chain on 127.0.0.1: a master target and a process server as real child
//! processes, and agent runs, each with its own log file. Used by `bench demo` and by the
//! end-to-end tests, which kill and restart the roles with SIGKILL.
//!
//! Layout under the cluster's directory:
//! ```text
//! passphrase          shared passphrase (mode 600)
//! datastore/          master target's VMDKs
//! retention/          master target's retention volume
//! cache/              process server's cache volume
//! logs/ROLE-N.log     stdout+stderr of the N-th start of ROLE
//! ```

use std::fs;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use protocol::auth::{ClientAuth, Passphrase};
use protocol::pb::StatusReply;
use protocol::transport::TlsFiles;

use crate::packet::{self, Netns};
use crate::tls::{self, TlsPaths};

/// How long a role may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The process server's memory settings a bench run may override (`bench ingest`, `bench
/// scale`).
#[derive(clap::Args, Debug, Clone)]
pub struct PsMemoryArgs {
    /// HTTP/2 stream window the process server grants each agent stream (its
    /// `--h2-stream-window`): unread data each stream may add to its memory budget.
    /// Default: the process server's own (1M).
    #[arg(long, value_parser = protocol::cli::parse_size)]
    pub ps_stream_window: Option<u64>,
    /// The process server's `--memory-budget` (batches held for ingest plus the forward
    /// window). Default: the process server's own (256M).
    #[arg(long, value_parser = protocol::cli::parse_size)]
    pub ps_memory_budget: Option<u64>,
}

impl PsMemoryArgs {
    /// (stream window, memory budget) in force, the process server's defaults filled in.
    pub fn effective(&self) -> (u64, u64) {
        (
            self.ps_stream_window
                .unwrap_or(process_server::cli::DEFAULT_AGENT_STREAM_WINDOW),
            self.ps_memory_budget
                .unwrap_or(process_server::cli::DEFAULT_MEMORY_BUDGET),
        )
    }

    /// The process server's flags for [`Self::effective`].
    pub fn flags(&self) -> Vec<String> {
        let (window, budget) = self.effective();
        vec![
            "--h2-stream-window".into(),
            window.to_string(),
            "--memory-budget".into(),
            budget.to_string(),
        ]
    }
}

/// The master target and process server of one chain, and how to run agents against it.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    exe: PathBuf,
    pub passphrase_file: PathBuf,
    pub datastore: PathBuf,
    pub retention: PathBuf,
    pub cache: PathBuf,
    pub mt_port: u16,
    pub ps_port: u16,
    master_target: Option<Child>,
    process_server: Option<Child>,
    starts: u32,
    /// Extra flags for every `process-server serve`.
    pub process_server_flags: Vec<String>,
    /// Extra flags for every `master-target serve`.
    pub master_target_flags: Vec<String>,
    /// When set, both hops run over TLS with these files (see [`Cluster::enable_tls`]).
    pub tls: Option<TlsPaths>,
    /// When set, the process server reaches the master target through this port on
    /// 127.0.0.1 (a WAN emulator relaying to `mt_port`) instead of directly.
    pub master_target_via: Option<u16>,
    /// Address the master target listens on and is reached at (default 127.0.0.1).
    pub master_target_host: IpAddr,
    /// When set, the master target runs in this network namespace (packet-mode WAN).
    pub master_target_netns: Option<Netns>,
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Cluster {
    /// Prepares the directories and a random passphrase under `dir`; `exe` is the
    /// multi-call executable that runs as a role when argv[0] names it (see `roles`).
    pub fn new(exe: &Path, dir: &Path) -> Result<Cluster> {
        let c = Cluster {
            dir: dir.to_path_buf(),
            exe: exe.to_path_buf(),
            passphrase_file: dir.join("passphrase"),
            datastore: dir.join("datastore"),
            retention: dir.join("retention"),
            cache: dir.join("cache"),
            mt_port: free_port()?,
            ps_port: free_port()?,
            master_target: None,
            process_server: None,
            starts: 0,
            process_server_flags: Vec::new(),
            master_target_flags: Vec::new(),
            tls: None,
            master_target_via: None,
            master_target_host: Ipv4Addr::LOCALHOST.into(),
            master_target_netns: None,
        };
        for d in [&c.datastore, &c.retention, &c.cache, &dir.join("logs")] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let secret: [u8; 24] = rand::random();
        let passphrase: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        fs::write(&c.passphrase_file, passphrase + "\n")?;
        fs::set_permissions(&c.passphrase_file, fs::Permissions::from_mode(0o600))?;
        Ok(c)
    }

    /// Generates throwaway certificates and runs both hops over TLS from the next start on
    /// (servers get `--tls-cert/--tls-key`, clients `https://` URLs and `--tls-ca`).
    pub fn enable_tls(&mut self) -> Result<()> {
        self.tls = Some(tls::generate(&self.dir.join("tls"))?);
        Ok(())
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    pub fn mt_url(&self) -> String {
        format!(
            "{}://{}:{}",
            self.scheme(),
            self.master_target_host,
            self.mt_port
        )
    }

    /// The URL the process server forwards to: the master target, or the WAN emulator
    /// in front of it.
    pub fn forward_url(&self) -> String {
        match self.master_target_via {
            Some(port) => format!("{}://127.0.0.1:{port}", self.scheme()),
            None => self.mt_url(),
        }
    }

    pub fn ps_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.ps_port)
    }

    /// `--tls-cert/--tls-key` for a server, plus `--tls-ca` (trust for its own clients).
    fn tls_server_flags(&self) -> Vec<String> {
        match &self.tls {
            Some(t) => vec![
                "--tls-cert".into(),
                t.cert.display().to_string(),
                "--tls-key".into(),
                t.key.display().to_string(),
            ],
            None => Vec::new(),
        }
    }

    /// `--tls-ca` for a client.
    pub fn tls_client_flags(&self) -> Vec<String> {
        match &self.tls {
            Some(t) => vec!["--tls-ca".into(), t.ca.display().to_string()],
            None => Vec::new(),
        }
    }

    /// A command that runs `role` (argv[0]) with the cluster's passphrase in its environment
    /// unless a flag overrides it.
    pub fn role(&self, role: &str) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg0(role);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        cmd
    }

    fn log_file(&mut self, role: &str) -> Result<(PathBuf, fs::File)> {
        self.starts += 1;
        let path = self
            .dir
            .join("logs")
            .join(format!("{role}-{}.log", self.starts));
        let f = fs::File::create(&path)?;
        Ok((path, f))
    }

    fn spawn_server(
        &mut self,
        role: &str,
        args: Vec<String>,
        host: IpAddr,
        port: u16,
        netns: Option<&Netns>,
    ) -> Result<Child> {
        let (log, f) = self.log_file(role)?;
        let mut cmd = self.role(role);
        if let Some(ns) = netns {
            packet::enter(&mut cmd, ns);
        }
        let mut child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {role}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect((host, port)).is_ok() {
                return Ok(child);
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{role} exited with {status} before listening; log {}:\n{}",
                    log.display(),
                    tail(&log)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "{role} did not listen on port {port} within {START_TIMEOUT:?}; log {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts (or restarts) the master target on its port.
    pub fn start_master_target(&mut self) -> Result<()> {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("{}:{}", self.master_target_host, self.mt_port),
            "--datastore".into(),
            self.datastore.display().to_string(),
            "--retention".into(),
            self.retention.display().to_string(),
            "--passphrase-file".into(),
            self.passphrase_file.display().to_string(),
        ];
        args.extend(self.tls_server_flags());
        args.extend(self.master_target_flags.iter().cloned());
        let netns = self.master_target_netns.clone();
        let child = self.spawn_server(
            "master-target",
            args,
            self.master_target_host,
            self.mt_port,
            netns.as_ref(),
        )?;
        self.master_target = Some(child);
        Ok(())
    }

    /// Starts (or restarts) the process server on its port, forwarding to the master target.
    pub fn start_process_server(&mut self) -> Result<()> {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.ps_port),
            "--cache".into(),
            self.cache.display().to_string(),
            "--master-target".into(),
            self.forward_url(),
            "--passphrase-file".into(),
            self.passphrase_file.display().to_string(),
        ];
        args.extend(self.tls_server_flags());
        args.extend(self.tls_client_flags());
        args.extend(self.process_server_flags.iter().cloned());
        let child = self.spawn_server(
            "process-server",
            args,
            Ipv4Addr::LOCALHOST.into(),
            self.ps_port,
            None,
        )?;
        self.process_server = Some(child);
        Ok(())
    }

    pub fn start(&mut self) -> Result<()> {
        self.start_master_target()?;
        self.start_process_server()
    }

    /// Process id of the running master target, to sample its CPU time and memory.
    pub fn master_target_pid(&self) -> Option<u32> {
        self.master_target.as_ref().map(Child::id)
    }

    /// One authenticated Status call to the process server (over TLS when the cluster has
    /// it).
    pub fn ps_status(&self, rt: &tokio::runtime::Runtime) -> Result<StatusReply> {
        let auth = ClientAuth::new(Passphrase::load(Some(&self.passphrase_file))?, "bench");
        let tls = TlsFiles {
            ca: self.tls.as_ref().map(|t| t.ca.clone()),
            ..TlsFiles::default()
        };
        rt.block_on(process_server::status::fetch(&self.ps_url(), &tls, &auth))
            .map_err(|r| anyhow::anyhow!("process server status: {r}"))
    }

    /// Waits until the process server reports its link to the master target up (polled
    /// every 2 ms: its forwarder starts sending at once); returns that status.
    pub fn wait_link_up(
        &self,
        rt: &tokio::runtime::Runtime,
        timeout: Duration,
    ) -> Result<StatusReply> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.ps_status(rt).ok();
            let link = status
                .as_ref()
                .and_then(|s| s.facts.get("master_target_link").cloned())
                .unwrap_or_default();
            if link.starts_with("up") {
                return Ok(status.expect("the link came from it"));
            }
            if Instant::now() > deadline {
                bail!(
                    "the process server's link to the master target is not up after {timeout:?} ({link})"
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Process id of the running process server.
    pub fn process_server_pid(&self) -> Option<u32> {
        self.process_server.as_ref().map(Child::id)
    }

    /// SIGKILLs the master target (no chance to flush anything) and reaps it.
    pub fn kill_master_target(&mut self) {
        kill9(self.master_target.take());
    }

    /// SIGKILLs the process server and reaps it.
    pub fn kill_process_server(&mut self) {
        kill9(self.process_server.take());
    }

    /// Sends SIGTERM to both servers and waits up to `timeout` for each to exit; returns
    /// their exit codes (None = had to be killed).
    pub fn stop(&mut self, timeout: Duration) -> Vec<Option<i32>> {
        [self.process_server.take(), self.master_target.take()]
            .into_iter()
            .flatten()
            .map(|mut c| {
                // SAFETY: kill(2) on the pid of a child we own and have not reaped.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + timeout;
                loop {
                    if let Ok(Some(s)) = c.try_wait() {
                        return s.code();
                    }
                    if Instant::now() > deadline {
                        let _ = c.kill();
                        let _ = c.wait();
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .collect()
    }

    /// [`Self::stop`], and an error with the servers' logs unless each exited with status 0
    /// (a clean shutdown on SIGTERM).
    pub fn stop_clean(&mut self, timeout: Duration) -> Result<()> {
        let codes = self.stop(timeout);
        if codes.iter().any(|c| *c != Some(0)) {
            bail!(
                "a server did not shut down cleanly on SIGTERM: exit codes {codes:?}\n{}",
                self.log_tails()
            );
        }
        Ok(())
    }

    /// `agent sync` of `disk` as `name`, with the cluster's passphrase; extra flags after.
    pub fn agent_sync(&self, disk: &Path, disk_id: &str, name: &str, extra: &[&str]) -> Command {
        self.agent_sync_with(&self.passphrase_file, disk, disk_id, name, extra)
    }

    /// `agent sync` proving `passphrase_file` instead of the cluster's passphrase.
    pub fn agent_sync_with(
        &self,
        passphrase_file: &Path,
        disk: &Path,
        disk_id: &str,
        name: &str,
        extra: &[&str],
    ) -> Command {
        let mut cmd = self.role("agent");
        cmd.args(["sync", "--process-server", &self.ps_url(), "--disk"])
            .arg(disk)
            .args(["--disk-id", disk_id, "--name", name, "--passphrase-file"])
            .arg(passphrase_file)
            .args(self.tls_client_flags())
            .args(extra);
        cmd
    }

    /// The flat extent of `name` on the datastore (vmfs / monolithicFlat layouts).
    pub fn flat_path(&self, name: &str) -> PathBuf {
        self.datastore.join(format!("{name}-flat.vmdk"))
    }

    pub fn vmdk_path(&self, name: &str) -> PathBuf {
        self.datastore.join(format!("{name}.vmdk"))
    }

    /// Every log file's tail, for a failure message.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = fs::read_dir(self.dir.join("logs")) {
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                out.push_str(&format!("==> {} <==\n{}\n", p.display(), tail(&p)));
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill9(self.process_server.take());
        kill9(self.master_target.take());
    }
}

fn kill9(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The last 4 KiB of a log file.
pub fn tail(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let start = s.len().saturating_sub(4096);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// Runs `cmd` to completion with a deadline, killing it past the deadline.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (mut out, mut err) = (
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "command timed out after {timeout:?}: {cmd:?}\nstderr:\n{}",
                String::from_utf8_lossy(&err_reader.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}
