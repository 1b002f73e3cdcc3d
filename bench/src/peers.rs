//! The peers `bench run` compares failback with: other ways to copy the same disk through
//! the same emulated WAN. Each one is the real tool, run as it would be by hand; a peer
//! whose tool is not installed is skipped by the caller with a note, never simulated.
//!
//! Every peer has a receiver listening on `Transfer::listen` (behind the WAN emulator, in
//! its far namespace in packet mode) and a sender connecting to `Transfer::connect`. The time runs from the
//! sender's start until the receiver's file is fsynced, as `agent sync --wait` waits for
//! the master target's durable apply. The copy is then checked against the source.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::packet::{self, Netns};
use crate::usage::{self, RssWatch, Usage};
use crate::verify;
use crate::wan::Relayed;

/// A peer system.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// `lz4 -1 | socat` into `socat | lz4 -d`: a bare compressed pipe.
    Lz4Socat,
    /// `nbdcopy` into a `qemu-nbd` export of a raw image.
    Nbdcopy,
    /// `qemu-img convert` into a `qemu-nbd` export of a monolithicFlat VMDK.
    QemuImg,
    /// `rsync` (whole file, lz4 compression) into an rsync daemon.
    Rsync,
}

/// One copy of a source disk through the WAN emulator.
#[derive(Debug)]
pub struct Transfer<'a> {
    pub source: &'a Path,
    /// Differential scenario: the disk the target already holds before the copy (the
    /// source before its change); the copy then sends only the difference.
    pub base: Option<&'a Path>,
    /// What the emulator has relayed so far, to tell the measured copy from its set-up.
    pub relayed: Arc<Relayed>,
    pub size: u64,
    /// Scratch directory of this copy (target files, configs, logs).
    pub dir: &'a Path,
    /// Where receivers listen: the emulator's upstream (proxy mode) or far side (packet).
    pub listen: SocketAddr,
    /// Where senders connect: the emulator (proxy mode) or `listen` across it (packet).
    pub connect: SocketAddr,
    /// Packet mode: the namespace receivers run in.
    pub netns: Option<Netns>,
    pub timeout: Duration,
}

/// What a copy measured: its duration and the usage of each process role.
#[derive(Debug, Clone)]
pub struct Measured {
    pub seconds: f64,
    pub roles: Vec<(String, Usage)>,
    /// Bytes the emulator had relayed (up, down) when the measured copy started: the
    /// set-up's share (putting the base on the target), to subtract.
    pub wire_before: (u64, u64),
    /// Something the report should say about this copy (e.g. a fallback the tool took).
    pub note: Option<String>,
}

impl Transfer<'_> {
    /// Bytes relayed so far, (up, down).
    pub fn wire_now(&self) -> (u64, u64) {
        (
            self.relayed.up.load(Ordering::Relaxed),
            self.relayed.down.load(Ordering::Relaxed),
        )
    }
}

const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

impl Peer {
    pub const ALL: [Peer; 4] = [Peer::Lz4Socat, Peer::Nbdcopy, Peer::QemuImg, Peer::Rsync];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Lz4Socat => "lz4|socat",
            Peer::Nbdcopy => "nbdcopy",
            Peer::QemuImg => "qemu-img",
            Peer::Rsync => "rsync",
        }
    }

    fn tools(self) -> &'static [&'static str] {
        match self {
            Peer::Lz4Socat => &["lz4", "socat"],
            Peer::Nbdcopy => &["nbdcopy", "qemu-nbd"],
            Peer::QemuImg => &["qemu-img", "qemu-nbd"],
            Peer::Rsync => &["rsync"],
        }
    }

    /// The first tool this peer needs that is not on PATH.
    pub fn missing_tool(self) -> Option<&'static str> {
        self.tools().iter().copied().find(|t| !on_path(t))
    }

    /// Whether this peer can send only the difference to a target that holds `base`.
    pub fn has_delta(self) -> bool {
        self == Peer::Rsync
    }

    /// Copies `t.source` through the emulator and checks the copy.
    pub fn transfer(self, t: &Transfer) -> Result<Measured> {
        fs::create_dir_all(t.dir)?;
        if t.base.is_some() && !self.has_delta() {
            bail!("{} has no differential transfer", self.name());
        }
        match self {
            Peer::Lz4Socat => lz4_socat(t),
            Peer::Nbdcopy => nbd(t, Peer::Nbdcopy),
            Peer::QemuImg => nbd(t, Peer::QemuImg),
            Peer::Rsync => rsync(t),
        }
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            fs::metadata(d.join(tool)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

/// A started tool with its log. Killed and reaped on drop unless [`Proc::finish`] or
/// [`Proc::terminate`] reaped it, so an early error leaves no listener behind.
struct Proc {
    child: Child,
    /// Follows its memory from the start (taken when it is reaped).
    watch: Option<RssWatch>,
    log: PathBuf,
    what: &'static str,
}

impl Proc {
    /// Starts a receiver: in the far namespace in packet mode.
    fn spawn_receiver(mut cmd: Command, t: &Transfer, what: &'static str) -> Result<Proc> {
        if let Some(ns) = &t.netns {
            packet::enter(&mut cmd, ns);
        }
        Proc::spawn(cmd, t, what)
    }

    /// Starts `cmd` with its output in `DIR/NAME.log`.
    fn spawn(mut cmd: Command, t: &Transfer, what: &'static str) -> Result<Proc> {
        let log = t.dir.join(format!("{}.log", what.replace(['|', ' '], "-")));
        let f = File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {what}: {cmd:?}"))?;
        Ok(Proc {
            watch: Some(RssWatch::start(child.id())),
            child,
            log,
            what,
        })
    }

    fn wait_listening(&mut self, port: u16) -> Result<()> {
        usage::wait_listening(&mut self.child, port, self.what, LISTEN_TIMEOUT)
            .with_context(|| format!("log:\n{}", crate::cluster::tail(&self.log)))
    }

    /// Waits for a process that must succeed; the error carries its log.
    fn finish(&mut self, timeout: Duration) -> Result<Usage> {
        let watch = self.watch.take().context("already reaped")?;
        let (status, usage) = usage::wait_with_usage(&mut self.child, timeout, watch)
            .with_context(|| format!("{}; log:\n{}", self.what, crate::cluster::tail(&self.log)))?;
        if !status.success() {
            bail!(
                "{} failed ({status}); log:\n{}",
                self.what,
                crate::cluster::tail(&self.log)
            );
        }
        Ok(usage)
    }

    /// Stops a server with SIGTERM and returns its usage.
    fn terminate(&mut self, timeout: Duration) -> Result<Usage> {
        let watch = self.watch.take().context("already reaped")?;
        let (_, usage) = usage::terminate_with_usage(&mut self.child, timeout, watch)
            .with_context(|| {
                format!(
                    "stopping {}; log:\n{}",
                    self.what,
                    crate::cluster::tail(&self.log)
                )
            })?;
        Ok(usage)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Still watched = not reaped yet.
        if self.watch.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `bash -c SCRIPT` with `args` as $1, $2, ... (paths never pass through the shell's parser).
fn shell(script: &str, args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.args(["-c", script, "bash"]).args(args);
    c
}

/// fdatasync of the receiver's copy: the end of the timed span.
fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_data())
        .with_context(|| format!("syncing {}", path.display()))
}

fn lz4_socat(t: &Transfer) -> Result<Measured> {
    let out = t.dir.join("copy.raw");
    let (host, port) = (t.listen.ip().to_string(), t.listen.port().to_string());
    let out_s = out.display().to_string();
    // `lz4 -d` to a file writes zero runs as holes, as the master target does not write
    // zero extents either.
    let mut receiver = Proc::spawn_receiver(
        shell(
            r#"socat -u TCP-LISTEN:"$1",bind="$2",reuseaddr STDOUT | lz4 -d -q -f - "$3""#,
            &[&port, &host, &out_s],
        ),
        t,
        "socat | lz4 -d",
    )?;
    receiver.wait_listening(t.listen.port())?;
    let started = Instant::now();
    let mut sender = Proc::spawn(
        shell(
            r#"lz4 -1 -q -c "$1" | socat -u STDIN TCP:"$2""#,
            &[&t.source.display().to_string(), &t.connect.to_string()],
        ),
        t,
        "lz4 | socat",
    )?;
    let s = sender.finish(t.timeout)?;
    let r = receiver.finish(t.timeout)?;
    sync_file(&out)?;
    let seconds = started.elapsed().as_secs_f64();
    verify::files_equal(&out, t.source)?;
    Ok(Measured {
        seconds,
        roles: vec![("sender".into(), s), ("receiver".into(), r)],
        wire_before: (0, 0),
        note: None,
    })
}

/// nbdcopy into a raw export, or qemu-img convert into a VMDK export, of `qemu-nbd`.
fn nbd(t: &Transfer, peer: Peer) -> Result<Measured> {
    let (target, format) = if peer == Peer::QemuImg {
        let vmdk = t.dir.join("copy.vmdk");
        verify::qemu_create_flat_vmdk(&vmdk, t.size)?;
        (vmdk, "vmdk")
    } else {
        let raw = t.dir.join("copy.raw");
        File::create(&raw)?.set_len(t.size)?;
        (raw, "raw")
    };
    let mut server = Command::new("qemu-nbd");
    server
        .args(["--persistent", "--shared=8", "--format", format])
        .arg(format!("--bind={}", t.listen.ip()))
        .arg(format!("--port={}", t.listen.port()))
        .arg(&target);
    let mut server = Proc::spawn_receiver(server, t, "qemu-nbd")?;
    server.wait_listening(t.listen.port())?;
    let url = format!("nbd://{}", t.connect);
    let started = Instant::now();
    let client = if peer == Peer::QemuImg {
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(t.source)
            .arg(&url);
        c
    } else {
        let mut c = Command::new("nbdcopy");
        c.arg("--flush").arg(t.source).arg(&url);
        c
    };
    let c = Proc::spawn(client, t, peer.name())?.finish(t.timeout)?;
    let s = server.terminate(t.timeout)?;
    let data = if peer == Peer::QemuImg {
        t.dir.join("copy-flat.vmdk")
    } else {
        target.clone()
    };
    sync_file(&data)?;
    let seconds = started.elapsed().as_secs_f64();
    if peer == Peer::QemuImg && verify::have_qemu_img() {
        verify::qemu_compare(&target, t.source)?;
    }
    verify::files_equal(&data, t.source)?;
    Ok(Measured {
        seconds,
        roles: vec![("sender".into(), c), ("receiver".into(), s)],
        wire_before: (0, 0),
        note: None,
    })
}

fn rsync(t: &Transfer) -> Result<Measured> {
    let module = t.dir.join("module");
    fs::create_dir_all(&module)?;
    let conf = t.dir.join("rsyncd.conf");
    fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = 0\ngid = 0\npid file = {}\n[bench]\n  path = {}\n  read only = no\n",
            t.dir.join("rsyncd.pid").display(),
            module.display()
        ),
    )?;
    let mut daemon = Command::new("rsync");
    daemon
        .args(["--daemon", "--no-detach"])
        .arg(format!("--address={}", t.listen.ip()))
        .arg(format!("--config={}", conf.display()))
        .arg(format!("--port={}", t.listen.port()));
    let out = module.join("copy.raw");
    if let Some(base) = t.base {
        fs::copy(base, &out).context("putting the base disk on the receiver")?;
    }
    let mut daemon = Proc::spawn_receiver(daemon, t, "rsync --daemon")?;
    daemon.wait_listening(t.listen.port())?;
    let wire_before = t.wire_now();
    let started = Instant::now();
    let mut client = Command::new("rsync");
    match t.base {
        // The delta algorithm against the receiver's copy (-I: never skip the file on
        // matching size and time).
        Some(_) => client.args(["--inplace", "--no-whole-file", "--ignore-times"]),
        None => client.args(["--whole-file", "--compress", "--compress-choice=lz4"]),
    };
    client
        .arg(t.source)
        .arg(format!("rsync://{}/bench/copy.raw", t.connect));
    let c = Proc::spawn(client, t, "rsync")?.finish(t.timeout)?;
    let d = daemon.terminate(t.timeout)?;
    sync_file(&out)?;
    let seconds = started.elapsed().as_secs_f64();
    verify::files_equal(&out, t.source)?;
    Ok(Measured {
        seconds,
        roles: vec![("sender".into(), c), ("receiver".into(), d)],
        wire_before,
        note: None,
    })
}
