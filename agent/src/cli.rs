//! The `agent` command line (the public contract of `DESIGN.md`) and the conversion of its
//! flags into the keys of the `--config` file ([`crate::config`] merges and validates them).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use protocol::cli::{LogFormat, SecurityArgs, Size, WanArgs, WatchArgs, parse_size};
use protocol::pb::DiskFormat;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Disks, GroupDisk, ReplicateFile, Span, SyncFile, merge};

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
    /// Serve disks over NBD and replicate every write continuously.
    ///
    /// Brings the target up to date first (full pass; writes made meanwhile are tracked
    /// and sent after it), then sends every write in the order it was acknowledged, with a
    /// crash-consistent marker at each NBD flush and every --crash-interval. Several disks
    /// (--disk ID=SOURCE,... repeated) form one group: each has its own NBD export and
    /// stream, and every periodic or requested marker is cut on all of them at one instant.
    /// Runs until interrupted or until the process server refuses a stream.
    Replicate(Box<ReplicateArgs>),
    /// Ask a running `agent replicate` (its --control-listen address) to cut a marker.
    Marker(MarkerArgs),
    /// Show what a running `agent replicate` is doing, per disk.
    Status(StatusArgs),
}

#[derive(Args, Debug, Clone, Default)]
// --tls-client-ca comes with the shared flags but only servers use it.
#[command(mut_arg("tls_client_ca", |a| a.hide(true)))]
pub struct ReplicateArgs {
    /// TOML file with any of these options (keys as the flags, `_` for `-`; several disks as
    /// `[[disk]]` tables); flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (--config merged with the flags, defaults filled in)
    /// as TOML that --config reads, then exit.
    #[arg(long)]
    pub print_config: bool,
    /// Process server URL: http://HOST:PORT or https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub process_server: Option<String>,
    /// Source disk: raw image file or block device, served read-write over NBD. Repeated as
    /// ID=SOURCE[,name=NAME][,nbd=HOST:PORT] for a group of disks (name defaults to ID, nbd
    /// to --nbd-listen's port plus the disk's index; a FILE with `=` in its first path
    /// component needs a `./` in front).
    #[arg(long, value_name = "FILE|ID=SOURCE,...", value_parser = parse_disk)]
    pub disk: Vec<DiskArg>,
    /// The source disk's UUID (1..=128 of [A-Za-z0-9._:-]), with --disk FILE.
    #[arg(long, value_name = "ID")]
    pub disk_id: Option<String>,
    /// Target VMDK name on the datastore, with --disk FILE.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// NBD listen address, e.g. 127.0.0.1:10809 (with a group: the first disk's).
    #[arg(long, value_name = "HOST:PORT")]
    pub nbd_listen: Option<String>,
    /// Replication group carried by every marker cut on all the disks (1..=128 of
    /// [A-Za-z0-9._:-]) [default: none].
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Control API address for `agent marker` and `agent status` [default: off].
    #[arg(long, value_name = "HOST:PORT")]
    pub control_listen: Option<String>,
    /// Target layout when the master target creates a disk [default: vmfs].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Interval of crash-consistent markers, at least 1s [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub crash_interval: Option<Duration>,
    /// Interval of app-consistent markers, cut only with --app-quiesce-cmd, at least 1s
    /// [default: 60m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub app_interval: Option<Duration>,
    /// Command run as `CMD freeze` and `CMD thaw` around each app-consistent marker (once
    /// for all the disks); a failing freeze means no marker (reported in the log and in
    /// `agent status`).
    #[arg(long, value_name = "CMD")]
    pub app_quiesce_cmd: Option<String>,
    /// Unacknowledged bytes kept in flight, per disk [default: 64M].
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

/// One `--disk` of `agent replicate`.
#[derive(Debug, Clone, PartialEq)]
pub enum DiskArg {
    File(PathBuf),
    Group(GroupDisk),
}

/// `ID=SOURCE[,name=NAME][,nbd=HOST:PORT]` when what precedes the first `=` is a valid disk
/// id (which has no `/`), else a FILE.
fn parse_disk(s: &str) -> Result<DiskArg, String> {
    let Some((id, rest)) = s
        .split_once('=')
        .filter(|(id, _)| protocol::disk::is_safe_name(id))
    else {
        return Ok(DiskArg::File(s.into()));
    };
    let mut parts = rest.split(',');
    let source = parts.next().filter(|p| !p.is_empty());
    let mut disk = GroupDisk {
        disk_id: id.to_string(),
        source: source
            .ok_or_else(|| format!("'{s}': no SOURCE after {id}="))?
            .into(),
        name: None,
        nbd_listen: None,
    };
    for part in parts {
        match part.split_once('=') {
            Some(("name", v)) => disk.name = Some(v.to_string()),
            Some(("nbd", v)) => disk.nbd_listen = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "'{part}' in '{s}': expected name=NAME or nbd=HOST:PORT"
                ));
            }
        }
    }
    Ok(DiskArg::Group(disk))
}

#[derive(Args, Debug, Clone)]
pub struct MarkerArgs {
    /// Control address of the running agent: HOST:PORT (tcp:// optional).
    #[arg(long, value_name = "URL")]
    pub connect: String,
    /// Mark this disk alone [default: every disk of the agent at one instant, with its
    /// --group].
    #[arg(long, value_name = "ID")]
    pub disk_id: Option<String>,
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
    #[command(flatten)]
    pub watch: WatchArgs,
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

/// How the disk is compared with the target.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Read and send the whole disk (all-zero blocks and holes as zero extents).
    Full,
    /// Send only chunks whose hash differs from the target's (a full pass if the target
    /// disk does not exist yet).
    Differential,
}

/// Layout of the target VMDK if the master target has to create it.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// ESXi layout: descriptor (createType="vmfs") plus NAME-flat.vmdk.
    Vmfs,
    /// One descriptor plus one flat extent.
    MonolithicFlat,
    /// Thin, grain-allocated single file.
    MonolithicSparse,
    /// A descriptor plus flat extents of at most 2 GiB each (NAME-f001.vmdk, ...).
    TwoGbMaxExtentFlat,
}

impl From<Format> for DiskFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Vmfs => DiskFormat::Vmfs,
            Format::MonolithicFlat => DiskFormat::MonolithicFlat,
            Format::MonolithicSparse => DiskFormat::MonolithicSparse,
            Format::TwoGbMaxExtentFlat => DiskFormat::TwoGbMaxExtentFlat,
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
// --tls-client-ca comes with the shared flags but only servers use it.
#[command(mut_arg("tls_client_ca", |a| a.hide(true)))]
pub struct SyncArgs {
    /// TOML file with any of these options (keys as the flags, `_` for `-`); flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (--config merged with the flags, defaults filled in)
    /// as TOML that --config reads, then exit.
    #[arg(long)]
    pub print_config: bool,
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

/// Refuses `--tls-client-ca`: it comes with the shared flags but only servers use it.
fn no_client_ca(security: &SecurityArgs) -> Result<(), ConfigError> {
    match security.tls_client_ca {
        Some(_) => Err(ConfigError::Invalid {
            flag: "tls-client-ca",
            why: "is a server option; the agent trusts its process server with --tls-ca and \
                  proves itself with --tls-cert/--tls-key"
                .into(),
        }),
        None => Ok(()),
    }
}

impl SyncArgs {
    /// The effective options: the `--config` file with the flags over it, defaults filled in.
    pub fn options(&self) -> Result<SyncFile, ConfigError> {
        no_client_ca(&self.security)?;
        let flags = SyncFile {
            process_server: self.process_server.clone(),
            disk: self.disk.clone(),
            disk_id: self.disk_id.clone(),
            name: self.name.clone(),
            mode: self.mode,
            format: self.format,
            marker: self.marker.clone(),
            chunk_size: self.chunk_size.map(Size),
            wait: self.wait.then_some(true),
            window: self.window.map(Size),
            batch_size: self.flow.batch_size.map(Size),
            identity: self.flow.identity.clone(),
            retry_for: self.retry_for.map(Span),
            log_format: self.log_format,
            passphrase_file: self.security.passphrase_file.clone(),
            tls_cert: self.security.tls_cert.clone(),
            tls_key: self.security.tls_key.clone(),
            tls_ca: self.security.tls_ca.clone(),
            h2_stream_window: self.wan.h2_stream_window.map(Size),
            h2_connection_window: self.wan.h2_connection_window.map(Size),
        };
        Ok(merge(&flags, self.config.as_deref())?.with_defaults())
    }
}

impl ReplicateArgs {
    /// The effective options: the `--config` file with the flags over it, defaults filled in.
    pub fn options(&self) -> Result<ReplicateFile, ConfigError> {
        no_client_ca(&self.security)?;
        let flags = ReplicateFile {
            process_server: self.process_server.clone(),
            disk_id: self.disk_id.clone(),
            name: self.name.clone(),
            nbd_listen: self.nbd_listen.clone(),
            group: self.group.clone(),
            control_listen: self.control_listen.clone(),
            format: self.format,
            crash_interval: self.crash_interval.map(Span),
            app_interval: self.app_interval.map(Span),
            app_quiesce_cmd: self.app_quiesce_cmd.clone(),
            window: self.window.map(Size),
            batch_size: self.flow.batch_size.map(Size),
            identity: self.flow.identity.clone(),
            log_format: self.log_format,
            passphrase_file: self.security.passphrase_file.clone(),
            tls_cert: self.security.tls_cert.clone(),
            tls_key: self.security.tls_key.clone(),
            tls_ca: self.security.tls_ca.clone(),
            h2_stream_window: self.wan.h2_stream_window.map(Size),
            h2_connection_window: self.wan.h2_connection_window.map(Size),
            disk: disks(&self.disk)?,
        };
        Ok(merge(&flags, self.config.as_deref())?.with_defaults())
    }
}

/// The `--disk` flags as the config file's `disk` key: one FILE, or disks of a group.
fn disks(args: &[DiskArg]) -> Result<Option<Disks>, ConfigError> {
    match args {
        [] => Ok(None),
        [DiskArg::File(path)] => Ok(Some(Disks::One(path.clone()))),
        _ => args
            .iter()
            .map(|a| match a {
                DiskArg::Group(d) => Ok(d.clone()),
                DiskArg::File(path) => Err(ConfigError::Invalid {
                    flag: "disk",
                    why: format!(
                        "{}: with several disks, each is ID=SOURCE[,name=NAME][,nbd=HOST:PORT]",
                        path.display()
                    ),
                }),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|d| Some(Disks::Many(d))),
    }
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
        let o = a.options().unwrap();
        assert_eq!(o.format, Some(Format::MonolithicSparse));
        assert_eq!(o.window, Some(Size(128 << 20)));
        assert_eq!(o.batch_size, Some(Size(2 << 20)));
        assert_eq!(o.retry_for, Some(Span(Duration::from_secs(30))));
        assert_eq!(o.h2_stream_window, Some(Size(16 << 20)));
        assert_eq!(o.wait, Some(true));
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
            .options()
            .unwrap();
        assert_eq!(a.process_server.as_deref(), Some("http://file:1"));
        assert_eq!(a.disk_id.as_deref(), Some("flag"));
        assert_eq!(a.window, Some(Size(8 << 20)));
        assert_eq!(a.batch_size, Some(Size(65536)));
        assert_eq!(a.retry_for, Some(Span(Duration::from_secs(60))));
        assert_eq!(a.wait, Some(true));
    }

    #[test]
    fn unknown_config_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agent.toml");
        std::fs::write(&cfg, "proces_server = \"x\"\n").unwrap();
        let e = parse(&["--config", cfg.to_str().unwrap()])
            .options()
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
        let e = with("48K").options().unwrap().into_config().unwrap_err();
        assert!(e.to_string().contains("--chunk-size"), "{e}");
        let ok = with("128K").options().unwrap();
        assert_eq!(ok.chunk_size, Some(Size(128 << 10)));
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
        let o = a.options().unwrap();
        assert_eq!(o.crash_interval, Some(Span(Duration::from_secs(300))));
        assert_eq!(o.app_interval, Some(Span(Duration::from_secs(3600))));
        assert_eq!(o.disk, Some(Disks::One("/dev/sdb".into())));
        assert!(o.control_listen.is_none() && o.app_quiesce_cmd.is_none());
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
        let e = a.options().unwrap().into_config().unwrap_err();
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
        assert!(matches!(cli.command, Command::Status(s) if s.json && s.watch.watch.is_none()));
        let cli = Cli::try_parse_from(["agent", "status", "--connect", "h:9", "--watch"]).unwrap();
        assert!(
            matches!(cli.command, Command::Status(s) if s.watch.watch == Some(Duration::from_secs(2)))
        );
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
        .options()
        .unwrap()
        .into_config()
        .unwrap_err();
        assert!(e.to_string().contains("--batch-size"), "{e}");
    }

    fn replicate(args: &[&str]) -> ReplicateArgs {
        let mut full = vec!["agent", "replicate"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Replicate(a) => *a,
            other => panic!("not replicate: {other:?}"),
        }
    }

    #[test]
    fn repeated_disks_form_a_group() {
        let a = replicate(&[
            "--disk",
            "a=/dev/sda,nbd=127.0.0.1:1",
            "--disk",
            "b=/var/lib/x=y.img,name=vm_b",
            "--nbd-listen",
            "127.0.0.1:10809",
            "--group",
            "vm1",
        ]);
        let Some(Disks::Many(d)) = a.options().unwrap().disk else {
            panic!("not a group");
        };
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].disk_id.as_str(), d[0].source.to_str()),
            ("a", Some("/dev/sda"))
        );
        assert_eq!(d[0].nbd_listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(d[1].source.to_str(), Some("/var/lib/x=y.img"));
        assert_eq!(d[1].name.as_deref(), Some("vm_b"));
        assert_eq!(d[1].nbd_listen.as_deref(), Some("127.0.0.1:10810"));
    }

    #[test]
    fn a_path_is_a_single_disk_and_cannot_be_repeated() {
        let a = replicate(&["--disk", "/srv/a=b.img"]);
        assert_eq!(a.disk, vec![DiskArg::File("/srv/a=b.img".into())]);
        let e = replicate(&["--disk", "/dev/sda", "--disk", "b=/dev/sdb"])
            .options()
            .unwrap_err();
        assert!(e.to_string().contains("ID=SOURCE"), "{e}");
        let bad = Cli::try_parse_from(["agent", "replicate", "--disk", "a=/dev/sda,size=1"]);
        assert!(bad.unwrap_err().to_string().contains("size=1"));
    }
}
