//! The `agent` command line (the public contract of `DESIGN.md`), its TOML config file, and
//! their merge into a validated [`SyncConfig`]. Flags win over the config file; the file's
//! keys are the long flag names with `_` for `-`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use protocol::auth::ClientAuth;
use protocol::cli::{LogFormat, SecurityArgs, WanArgs, parse_size};
use protocol::limits::{DEFAULT_BATCH_DATA, MAX_BATCH_DATA, MAX_NAME_LEN};
use protocol::pb::DiskFormat;
use serde::Deserialize;

use crate::changes::{LINGER, OVERFLOW_GRACE};
use crate::diff::{DEFAULT_CHUNK, valid_chunk_size};
use crate::replicate::{RETRY_FOREVER, ReplicateConfig};
use crate::scan::ZERO_BLOCK;
use crate::session::{HEARTBEAT, Target};
use crate::sync::{SyncConfig, disk_info};

/// Default bound of unacknowledged bytes in flight.
pub const DEFAULT_WINDOW: u64 = 64 << 20;
/// Default time an unreachable process server is retried.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(600);

#[derive(Parser, Debug)]
#[command(
    name = "agent",
    version,
    about = "Failback agent: reads a source disk and replicates it to a process server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Copy a disk to the process server once (full pass), then exit.
    ///
    /// Exits 0 once every batch is durable in the process server's cache, or with --wait once
    /// the master target has applied it all, and prints a summary on stdout. A lost or
    /// unreachable process server is retried with backoff (error 95226) for --retry-for, and
    /// the pass resumes where the process server stands; other refusals end the sync at once
    /// with `error <code>: <message>`. Exit status: 0 success, 1 failure, 2 bad arguments.
    Sync(Box<SyncArgs>),
    /// Serve a disk over NBD and replicate every write continuously.
    ///
    /// Brings the target up to date first (full pass; writes made meanwhile are tracked
    /// and sent after it), then sends every write in the order it was acknowledged, with a
    /// crash-consistent marker at each NBD flush and every --crash-interval. Runs until
    /// interrupted or until the process server refuses the stream.
    Replicate(Box<ReplicateArgs>),
    /// Ask a running `agent replicate` (its --control-listen address) to cut a marker.
    Marker(MarkerArgs),
    /// Show what a running `agent replicate` is doing, per disk.
    Status(StatusArgs),
}

#[derive(Args, Debug, Clone)]
// --tls-client-ca comes with the shared flags but only servers use it.
#[command(mut_arg("tls_client_ca", |a| a.hide(true)))]
pub struct ReplicateArgs {
    /// Process server URL: http://HOST:PORT or https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub process_server: String,
    /// Source disk: raw image file or block device, served read-write over NBD.
    #[arg(long, value_name = "FILE")]
    pub disk: PathBuf,
    /// The source disk's UUID (1..=128 of [A-Za-z0-9._:-]).
    #[arg(long, value_name = "ID")]
    pub disk_id: String,
    /// Target VMDK name on the datastore.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// NBD listen address, e.g. 127.0.0.1:10809.
    #[arg(long, value_name = "HOST:PORT")]
    pub nbd_listen: String,
    /// Control API address for `agent marker` and `agent status` [default: off].
    #[arg(long, value_name = "HOST:PORT")]
    pub control_listen: Option<String>,
    /// Target layout when the master target creates the disk [default: vmfs].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Interval of crash-consistent markers (at least 1s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "5m")]
    pub crash_interval: Duration,
    /// Interval of app-consistent markers, cut only with --app-quiesce-cmd (at least 1s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "60m")]
    pub app_interval: Duration,
    /// Command run as `CMD freeze` and `CMD thaw` around each app-consistent marker; a
    /// failing freeze means no marker (reported in the log and in `agent status`).
    #[arg(long, value_name = "CMD")]
    pub app_quiesce_cmd: Option<String>,
    /// Unacknowledged bytes kept in flight [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub window: Option<u64>,
    #[command(flatten)]
    pub flow: FlowArgs,
    /// Log format on stderr [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub wan: WanArgs,
}

#[derive(Args, Debug, Clone)]
pub struct MarkerArgs {
    /// Control address of the running agent: HOST:PORT (tcp:// optional).
    #[arg(long, value_name = "URL")]
    pub connect: String,
    #[arg(long, value_name = "ID")]
    pub disk_id: String,
    #[arg(long, value_enum)]
    pub kind: crate::control::Kind,
    /// Free-form tag carried by the marker.
    #[arg(long, value_name = "TAG", default_value = "")]
    pub tag: String,
    /// File holding the shared passphrase (mode 600). Default: $FAILBACK_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Control address of the running agent: HOST:PORT (tcp:// optional).
    #[arg(long, value_name = "URL")]
    pub connect: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// File holding the shared passphrase (mode 600). Default: $FAILBACK_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// Batching and naming options shared by `replicate` and `sync`.
#[derive(Debug, Clone, Default, Args)]
pub struct FlowArgs {
    /// Uncompressed data per batch, a multiple of 4K up to 4M [default: 1M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub batch_size: Option<u64>,
    /// Name this agent gives the process server [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub identity: Option<String>,
}

/// Shortest marker interval accepted.
pub const MIN_MARKER_INTERVAL: Duration = Duration::from_secs(1);

impl ReplicateArgs {
    /// Validates the options into a [`ReplicateConfig`] (reads the passphrase).
    pub fn into_config(self) -> anyhow::Result<ReplicateConfig> {
        let (batch_data, window_bytes) = sizes(self.flow.batch_size, self.window)?;
        for (flag, d) in [
            ("--crash-interval", self.crash_interval),
            ("--app-interval", self.app_interval),
        ] {
            if d < MIN_MARKER_INTERVAL {
                bail!("{flag} must be at least 1s");
            }
        }
        no_client_ca(&self.security)?;
        let identity = identity(self.flow.identity)?;
        let passphrase = self.security.passphrase()?;
        let format = self
            .format
            .map(DiskFormat::from)
            .unwrap_or(DiskFormat::Vmfs);
        Ok(ReplicateConfig {
            target: Target {
                url: self.process_server,
                tuning: self.wan.tuning(),
                tls: self.security.tls(),
                auth: ClientAuth::new(passphrase.clone(), identity),
                disk: disk_info(&self.disk_id, &self.name, format),
                heartbeat: HEARTBEAT,
            },
            disk: self.disk,
            nbd_listen: self.nbd_listen,
            control: self.control_listen.map(|a| (a, passphrase)),
            window_bytes,
            batch_data,
            linger: LINGER,
            crash_interval: self.crash_interval,
            app_interval: self.app_interval,
            app_quiesce_cmd: self.app_quiesce_cmd,
            retry_for: RETRY_FOREVER,
            overflow_grace: OVERFLOW_GRACE,
        })
    }
}

/// The identity given, or the host name; checked against the protocol's bounds.
pub fn identity(given: Option<String>) -> anyhow::Result<String> {
    let identity = match given {
        Some(i) => i,
        None => hostname().context("cannot find the host name; pass --identity")?,
    };
    if identity.is_empty() || identity.len() > MAX_NAME_LEN {
        bail!("--identity must be 1..={MAX_NAME_LEN} bytes");
    }
    Ok(identity)
}

/// How the disk is compared with the target.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Read and send the whole disk (all-zero blocks and holes as zero extents).
    Full,
    /// Send only chunks whose hash differs from the target's (a full pass if the target
    /// disk does not exist yet).
    Differential,
}

/// Layout of the target VMDK if the master target has to create it.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// ESXi layout: descriptor (createType="vmfs") plus NAME-flat.vmdk.
    Vmfs,
    /// One descriptor plus one flat extent.
    MonolithicFlat,
    /// Thin, grain-allocated single file.
    MonolithicSparse,
}

impl From<Format> for DiskFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Vmfs => DiskFormat::Vmfs,
            Format::MonolithicFlat => DiskFormat::MonolithicFlat,
            Format::MonolithicSparse => DiskFormat::MonolithicSparse,
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
// --tls-client-ca comes with the shared flags but only servers use it.
#[command(mut_arg("tls_client_ca", |a| a.hide(true)))]
pub struct SyncArgs {
    /// TOML file with any of these options (keys as the flags, `_` for `-`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Process server URL: http://HOST:PORT or https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub process_server: Option<String>,
    /// Source disk: raw image file or block device (read only).
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
    /// The source disk's UUID (1..=128 of [A-Za-z0-9._:-]).
    #[arg(long, value_name = "ID")]
    pub disk_id: Option<String>,
    /// Target VMDK name on the datastore: DATASTORE/NAME.vmdk.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Sync mode [default: full].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Target layout when the master target creates the disk [default: vmfs].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Cut a user marker with this tag at the end of the pass.
    #[arg(long, value_name = "TAG")]
    pub marker: Option<String>,
    /// Chunk compared by --mode differential: a power of two from 4K to 4M [default: 64K].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub chunk_size: Option<u64>,
    /// Exit only once the master target has applied and made durable the whole pass.
    #[arg(long)]
    pub wait: bool,
    /// Unacknowledged bytes kept in flight (at least bandwidth x RTT) [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub window: Option<u64>,
    #[command(flatten)]
    pub flow: FlowArgs,
    /// How long to keep retrying an unreachable process server, e.g. 30s, 10m, 2h
    /// [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub retry_for: Option<Duration>,
    /// Log format on stderr [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub wan: WanArgs,
}

/// A size in a config file: a number of bytes or a string such as "64M".
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self, key: &str) -> anyhow::Result<u64> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(s) => parse_size(s).map_err(|e| anyhow::anyhow!("{key}: {e}")),
        }
    }
}

/// The `--config` file of `agent sync`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct SyncFile {
    process_server: Option<String>,
    disk: Option<PathBuf>,
    disk_id: Option<String>,
    name: Option<String>,
    mode: Option<Mode>,
    format: Option<Format>,
    marker: Option<String>,
    chunk_size: Option<Size>,
    wait: Option<bool>,
    window: Option<Size>,
    batch_size: Option<Size>,
    identity: Option<String>,
    retry_for: Option<String>,
    log_format: Option<LogFormat>,
    passphrase_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    h2_stream_window: Option<Size>,
    h2_connection_window: Option<Size>,
}

fn size(file: &Option<Size>, key: &str) -> anyhow::Result<Option<u64>> {
    file.as_ref().map(|s| s.bytes(key)).transpose()
}

impl SyncArgs {
    /// Fills every option not given as a flag from the `--config` file.
    pub fn merged(self) -> anyhow::Result<SyncArgs> {
        let f: SyncFile =
            protocol::cli::load_config(self.config.as_deref()).map_err(anyhow::Error::msg)?;
        let retry_for = f
            .retry_for
            .as_deref()
            .map(humantime::parse_duration)
            .transpose()
            .context("retry_for")?;
        Ok(SyncArgs {
            config: self.config,
            process_server: self.process_server.or(f.process_server),
            disk: self.disk.or(f.disk),
            disk_id: self.disk_id.or(f.disk_id),
            name: self.name.or(f.name),
            mode: self.mode.or(f.mode),
            format: self.format.or(f.format),
            marker: self.marker.or(f.marker),
            chunk_size: self.chunk_size.or(size(&f.chunk_size, "chunk_size")?),
            wait: self.wait || f.wait.unwrap_or(false),
            window: self.window.or(size(&f.window, "window")?),
            flow: FlowArgs {
                batch_size: self.flow.batch_size.or(size(&f.batch_size, "batch_size")?),
                identity: self.flow.identity.or(f.identity),
            },
            retry_for: self.retry_for.or(retry_for),
            log_format: self.log_format.or(f.log_format),
            security: self.security.or(SecurityArgs {
                passphrase_file: f.passphrase_file,
                tls_cert: f.tls_cert,
                tls_key: f.tls_key,
                tls_ca: f.tls_ca,
                ..SecurityArgs::default()
            }),
            wan: self.wan.or(WanArgs {
                h2_stream_window: size(&f.h2_stream_window, "h2_stream_window")?,
                h2_connection_window: size(&f.h2_connection_window, "h2_connection_window")?,
            }),
        })
    }

    /// Validates the merged options into a [`SyncConfig`] (reads the passphrase).
    pub fn into_config(self) -> anyhow::Result<SyncConfig> {
        let need = |v: Option<String>, flag: &str| {
            v.with_context(|| {
                format!(
                    "missing --{flag} (or {} in --config)",
                    flag.replace('-', "_")
                )
            })
        };
        let url = need(self.process_server, "process-server")?;
        let disk = self.disk.context("missing --disk (or disk in --config)")?;
        let disk_id = need(self.disk_id, "disk-id")?;
        let name = need(self.name, "name")?;
        let chunk_size = self.chunk_size.unwrap_or(u64::from(DEFAULT_CHUNK));
        if !valid_chunk_size(chunk_size) {
            bail!("--chunk-size {chunk_size} must be a power of two from 4K to 4M");
        }
        let differential = (self.mode == Some(Mode::Differential)).then_some(chunk_size as u32);
        let (batch_data, window_bytes) = sizes(self.flow.batch_size, self.window)?;
        if let Some(tag) = &self.marker
            && tag.len() > MAX_NAME_LEN
        {
            bail!("--marker tag must be at most {MAX_NAME_LEN} bytes");
        }
        let identity = identity(self.flow.identity)?;
        no_client_ca(&self.security)?;
        let passphrase = self.security.passphrase()?;
        let format = self
            .format
            .map(DiskFormat::from)
            .unwrap_or(DiskFormat::Vmfs);
        Ok(SyncConfig {
            target: Target {
                url,
                tuning: self.wan.tuning(),
                tls: self.security.tls(),
                auth: ClientAuth::new(passphrase, identity),
                disk: disk_info(&disk_id, &name, format),
                heartbeat: HEARTBEAT,
            },
            disk,
            marker_tag: self.marker,
            wait: self.wait,
            window_bytes,
            batch_data,
            retry_for: self.retry_for.unwrap_or(DEFAULT_RETRY_FOR),
            differential,
        })
    }
}

/// Refuses `--tls-client-ca`: it comes with the shared flags but only servers use it.
fn no_client_ca(security: &SecurityArgs) -> anyhow::Result<()> {
    if security.tls_client_ca.is_some() {
        bail!(
            "--tls-client-ca is a server option; the agent trusts its process server with \
             --tls-ca and proves itself with --tls-cert/--tls-key"
        );
    }
    Ok(())
}

/// Checks `--batch-size` and `--window` and applies their defaults.
fn sizes(batch_size: Option<u64>, window: Option<u64>) -> anyhow::Result<(usize, usize)> {
    let batch_data = batch_size.unwrap_or(DEFAULT_BATCH_DATA as u64);
    if batch_data < ZERO_BLOCK as u64
        || batch_data > MAX_BATCH_DATA as u64
        || !batch_data.is_multiple_of(ZERO_BLOCK as u64)
    {
        bail!(
            "--batch-size {batch_data} must be a multiple of {ZERO_BLOCK} between {ZERO_BLOCK} \
             and {MAX_BATCH_DATA}"
        );
    }
    let window = window.unwrap_or(DEFAULT_WINDOW);
    if window == 0 {
        bail!("--window must be above 0");
    }
    Ok((
        batch_data as usize,
        usize::try_from(window).context("--window")?,
    ))
}

/// This host's name, the default identity.
fn hostname() -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call; gethostname
    // writes at most that many bytes.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> SyncArgs {
        let mut full = vec!["agent", "sync"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Sync(a) => *a,
            other => panic!("not a sync: {other:?}"),
        }
    }

    #[test]
    fn the_contract_flags_parse() {
        let a = parse(&[
            "--process-server",
            "http://127.0.0.1:9443",
            "--disk",
            "/dev/sdb",
            "--disk-id",
            "6000C29a",
            "--name",
            "vm1_disk0",
            "--mode",
            "full",
            "--format",
            "monolithic-sparse",
            "--marker",
            "before-upgrade",
            "--wait",
            "--window",
            "128M",
            "--batch-size",
            "2M",
            "--retry-for",
            "30s",
            "--h2-stream-window",
            "16M",
            "--log-format",
            "json",
        ]);
        assert_eq!(a.format, Some(Format::MonolithicSparse));
        assert_eq!(a.window, Some(128 << 20));
        assert_eq!(a.flow.batch_size, Some(2 << 20));
        assert_eq!(a.retry_for, Some(Duration::from_secs(30)));
        assert_eq!(a.wan.h2_stream_window, Some(16 << 20));
        assert!(a.wait);
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agent.toml");
        std::fs::write(
            &cfg,
            "process_server = \"http://file:1\"\ndisk_id = \"from-file\"\nwindow = \"8M\"\n\
             batch_size = 65536\nwait = true\nretry_for = \"1m\"\n",
        )
        .unwrap();
        let a = parse(&["--config", cfg.to_str().unwrap(), "--disk-id", "flag"])
            .merged()
            .unwrap();
        assert_eq!(a.process_server.as_deref(), Some("http://file:1"));
        assert_eq!(a.disk_id.as_deref(), Some("flag"));
        assert_eq!(a.window, Some(8 << 20));
        assert_eq!(a.flow.batch_size, Some(65536));
        assert_eq!(a.retry_for, Some(Duration::from_secs(60)));
        assert!(a.wait);
    }

    #[test]
    fn unknown_config_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agent.toml");
        std::fs::write(&cfg, "proces_server = \"x\"\n").unwrap();
        let e = parse(&["--config", cfg.to_str().unwrap()])
            .merged()
            .unwrap_err();
        assert!(e.to_string().contains("proces_server"), "{e}");
    }

    #[test]
    fn differential_mode_takes_a_power_of_two_chunk_size() {
        let base = [
            "--process-server",
            "http://x:1",
            "--disk",
            "d",
            "--disk-id",
            "i",
            "--name",
            "n",
            "--identity",
            "me",
            "--mode",
            "differential",
            "--chunk-size",
        ];
        let with = |c: &str| {
            let mut a = base.to_vec();
            a.push(c);
            parse(&a)
        };
        let e = with("48K").into_config().unwrap_err();
        assert!(e.to_string().contains("--chunk-size"), "{e}");
        let ok = with("128K");
        assert_eq!(ok.chunk_size, Some(128 << 10));
        assert_eq!(ok.mode, Some(Mode::Differential));
    }

    #[test]
    fn replicate_flags_parse_with_their_defaults() {
        let cli = Cli::try_parse_from([
            "agent",
            "replicate",
            "--process-server",
            "http://ps:9443",
            "--disk",
            "/dev/sdb",
            "--disk-id",
            "6000C29a",
            "--name",
            "vm1_disk0",
            "--nbd-listen",
            "127.0.0.1:10809",
        ])
        .unwrap();
        let Command::Replicate(a) = cli.command else {
            panic!("not replicate");
        };
        assert_eq!(a.crash_interval, Duration::from_secs(300));
        assert_eq!(a.app_interval, Duration::from_secs(3600));
        assert!(a.control_listen.is_none() && a.app_quiesce_cmd.is_none());
        let short = Cli::try_parse_from([
            "agent",
            "replicate",
            "--process-server",
            "http://ps:9443",
            "--disk",
            "d",
            "--disk-id",
            "i",
            "--name",
            "n",
            "--nbd-listen",
            "127.0.0.1:0",
            "--identity",
            "me",
            "--crash-interval",
            "500ms",
        ])
        .unwrap();
        let Command::Replicate(a) = short.command else {
            panic!("not replicate");
        };
        let e = a.into_config().unwrap_err();
        assert!(e.to_string().contains("--crash-interval"), "{e}");
    }

    #[test]
    fn marker_and_status_parse() {
        let cli = Cli::try_parse_from([
            "agent",
            "marker",
            "--connect",
            "127.0.0.1:9",
            "--disk-id",
            "d",
            "--kind",
            "app",
            "--tag",
            "t",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Marker(m) if m.kind == crate::control::Kind::App));
        let cli = Cli::try_parse_from(["agent", "status", "--connect", "h:9", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Status(s) if s.json));
    }

    #[test]
    fn odd_batch_sizes_are_refused() {
        let e = parse(&[
            "--process-server",
            "http://x:1",
            "--disk",
            "d",
            "--disk-id",
            "i",
            "--name",
            "n",
            "--batch-size",
            "5000",
        ])
        .into_config()
        .unwrap_err();
        assert!(e.to_string().contains("--batch-size"), "{e}");
    }
}
