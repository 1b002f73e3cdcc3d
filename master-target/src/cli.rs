//! The command line (the public contract of DESIGN.md): `serve`, `status`,
//! `recovery-points`, `recover`, `verify`. The only place that uses `anyhow`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use protocol::auth::{ClientAuth, ServerAuth};
use protocol::cli::{
    LogFormat, SecurityArgs, Size, WanArgs, WatchArgs, init_logging, load_config, parse_size,
    render_config, watch,
};
use protocol::error::Refusal;
use serde::{Deserialize, Serialize};

use crate::server::{ServeOptions, serve};
use crate::vmdk::DataIo;

#[derive(Parser, Debug)]
#[command(
    name = "master-target",
    version,
    about = "Applies replicated batches to VMDK disks on a datastore, durably and in order"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve MasterTarget.Apply for process servers.
    Serve(Box<ServeArgs>),
    /// Show the disks of a running master target.
    Status(StatusArgs),
    /// List the recovery points recorded for a disk, or common to a replication group.
    RecoveryPoints(RecoveryPointsArgs),
    /// Write a disk as of a recovery point to a new VMDK, or roll the target back in place.
    Recover(RecoverArgs),
    /// Check a disk's VMDK structure (descriptor, extents, sparse tables): what
    /// `qemu-img check` does not.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on, HOST:PORT (port 0 picks a free one; the log says which).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Datastore directory holding the target VMDKs (DATASTORE/NAME.vmdk).
    #[arg(long, value_name = "DIR")]
    datastore: Option<PathBuf>,
    /// Retention volume directory (disk state files and undo journals)
    /// [default: /mnt/retention].
    #[arg(long, value_name = "DIR")]
    retention: Option<PathBuf>,
    /// TOML file with the same keys as the flags (`_` for `-`); flags win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective configuration (the config file merged with the flags, defaults
    /// filled) as TOML that --config reads, then exit.
    #[arg(long)]
    print_config: bool,
    /// Log format on stderr [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Name reported by `status` [default: the host name].
    #[arg(long, value_name = "NAME")]
    identity: Option<String>,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
    /// How far back recovery points reach: undo data older than this (source time) is
    /// pruned, e.g. 90s, 30m, 24h, 7d [default: 24h].
    #[arg(long, value_name = "DURATION")]
    retention_window: Option<String>,
    /// Most undo-journal bytes per disk, e.g. 100G; when it cannot hold the window the
    /// oldest points go first, with a warning [default: no quota].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    retention_quota: Option<u64>,
    /// Recovery points whose batch is at most this much (source time) older than the
    /// newest are all kept; older ones are thinned to one per --thin-every, and the undo
    /// data between the remaining points compacted, e.g. 30m, 2h, 1d [default: 2h].
    #[arg(long, value_name = "DURATION")]
    thin_after: Option<String>,
    /// Older than --thin-after, one recovery point is kept per this much source time
    /// (periods aligned on the Unix epoch); at most --retention-window [default: 1h].
    #[arg(long, value_name = "DURATION")]
    thin_every: Option<String>,
    /// How the data of flat disks (vmfs, monolithicFlat, twoGbMaxExtentFlat) is written:
    /// mmap (stores through a shared map, or pwrite where no page of a write is cached;
    /// msync) or pwrite (pwrite, fdatasync; no map). Reads use pread either way. Durability
    /// and commit order are the same; monolithicSparse disks always use pwrite
    /// [default: mmap].
    #[arg(long, value_enum, value_name = "MODE")]
    data_io: Option<DataIo>,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    wan: WanArgs,
}

/// `serve --config FILE`: the keys of [`ServeArgs`]; also the effective configuration
/// `--print-config` writes (keys without a value, such as an unset quota, are left out).
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    datastore: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_quota: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thin_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thin_every: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_io: Option<DataIo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    passphrase_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_client_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    h2_stream_window: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    h2_connection_window: Option<Size>,
}

/// The effective `serve` configuration: every setting resolved and checked.
struct ServeConfig {
    file: ServeFile,
    listen: String,
    datastore: PathBuf,
    retention: PathBuf,
    log_format: LogFormat,
    identity: String,
    security: SecurityArgs,
    wan: WanArgs,
    retention_policy: crate::retention::journal::RetentionPolicy,
    data_io: DataIo,
}

impl ServeArgs {
    /// Merges the config file (if any) under the flags and fills the defaults.
    fn resolve(self) -> anyhow::Result<ServeConfig> {
        let file: ServeFile = load_config(self.config.as_deref()).map_err(|e| anyhow!(e))?;
        let security = self.security.or(SecurityArgs {
            passphrase_file: file.passphrase_file,
            tls_cert: file.tls_cert,
            tls_key: file.tls_key,
            tls_ca: file.tls_ca,
            tls_client_ca: file.tls_client_ca,
        });
        let wan = self.wan.or(WanArgs {
            h2_stream_window: file.h2_stream_window.map(|s| s.0),
            h2_connection_window: file.h2_connection_window.map(|s| s.0),
        });
        let listen = self
            .listen
            .or(file.listen)
            .context("--listen HOST:PORT is required (flag or config key)")?;
        let datastore = self
            .datastore
            .or(file.datastore)
            .context("--datastore DIR is required (flag or config key)")?;
        let retention = self
            .retention
            .or(file.retention)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RETENTION));
        let log_format = self.log_format.or(file.log_format).unwrap_or_default();
        let identity = self.identity.or(file.identity).unwrap_or_else(host_name);
        let metrics_listen = self.metrics_listen.or(file.metrics_listen);
        let window = self
            .retention_window
            .or(file.retention_window)
            .unwrap_or_else(|| DEFAULT_RETENTION_WINDOW.into());
        let quota = self.retention_quota.or(file.retention_quota.map(|s| s.0));
        let thin_after = self
            .thin_after
            .or(file.thin_after)
            .unwrap_or_else(|| DEFAULT_THIN_AFTER.into());
        let thin_every = self
            .thin_every
            .or(file.thin_every)
            .unwrap_or_else(|| DEFAULT_THIN_EVERY.into());
        let data_io = self.data_io.or(file.data_io).unwrap_or_default();
        let retention_policy = retention_policy(&window, quota, &thin_after, &thin_every)?;
        let tuning = wan.tuning();
        let file = ServeFile {
            listen: Some(listen.clone()),
            datastore: Some(datastore.clone()),
            retention: Some(retention.clone()),
            log_format: Some(log_format),
            identity: Some(identity.clone()),
            metrics_listen,
            retention_window: Some(window),
            retention_quota: quota.filter(|&q| q > 0).map(Size),
            thin_after: Some(thin_after),
            thin_every: Some(thin_every),
            data_io: Some(data_io),
            passphrase_file: security.passphrase_file.clone(),
            tls_cert: security.tls_cert.clone(),
            tls_key: security.tls_key.clone(),
            tls_ca: security.tls_ca.clone(),
            tls_client_ca: security.tls_client_ca.clone(),
            h2_stream_window: Some(Size(u64::from(tuning.stream_window))),
            h2_connection_window: Some(Size(u64::from(tuning.connection_window))),
        };
        Ok(ServeConfig {
            file,
            listen,
            datastore,
            retention,
            log_format,
            identity,
            security,
            wan,
            retention_policy,
            data_io,
        })
    }
}

/// The retention policy of `serve`'s settings, each checked: durations above zero, and a
/// thinning period no longer than the window (it would keep less than one point per
/// window, so the older part of the window would offer nothing to thin to).
fn retention_policy(
    window: &str,
    quota: Option<u64>,
    thin_after: &str,
    thin_every: &str,
) -> anyhow::Result<crate::retention::journal::RetentionPolicy> {
    let window_ms =
        parse_duration_ms(window).with_context(|| format!("--retention-window {window}"))?;
    let thin_after_ms =
        parse_duration_ms(thin_after).with_context(|| format!("--thin-after {thin_after}"))?;
    let thin_every_ms =
        parse_duration_ms(thin_every).with_context(|| format!("--thin-every {thin_every}"))?;
    if thin_every_ms > window_ms {
        bail!(
            "--thin-every {thin_every} is longer than --retention-window {window}: at most \
             one point per period would be kept, fewer than one per window; choose a period \
             up to the window"
        );
    }
    Ok(crate::retention::journal::RetentionPolicy {
        window_ms,
        quota_bytes: quota.unwrap_or(0),
        thin_after_ms,
        thin_every_ms,
    })
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// URL of the master target (http://HOST:PORT or https://HOST:PORT).
    #[arg(long, value_name = "URL")]
    connect: String,
    /// Print the reply as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    watch: WatchArgs,
    #[command(flatten)]
    security: SecurityArgs,
}

#[derive(Args, Debug)]
struct RecoveryPointsArgs {
    /// Retention volume directory of the master target.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RETENTION)]
    retention: PathBuf,
    /// Disk id whose points to list.
    #[arg(
        long,
        value_name = "DISK_ID",
        required_unless_present = "group",
        conflicts_with = "group"
    )]
    disk: Option<String>,
    /// Replication group whose common points to list: the group markers every disk
    /// holding a marker of the group has.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RecoverArgs {
    /// Datastore directory holding the disk's target VMDK.
    #[arg(long, value_name = "DIR")]
    datastore: PathBuf,
    /// Retention volume directory of the master target.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RETENTION)]
    retention: PathBuf,
    /// Disk id to recover.
    #[arg(
        long,
        value_name = "DISK_ID",
        required_unless_present = "group",
        conflicts_with = "group"
    )]
    disk: Option<String>,
    /// Recover every disk of this replication group to one group marker (--point: latest,
    /// latest-app, MARKER_ID, TAG or RFC3339 among the group's common points); --out then
    /// names a directory that receives NAME.vmdk per disk.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// latest | latest-crash | latest-app | MARKER_ID | TAG | RFC3339 time (the latest
    /// point at or before it).
    #[arg(long, value_name = "POINT")]
    point: String,
    /// New VMDK to write (NEW.vmdk plus NEW-flat.vmdk beside it, NEW.vmdk alone with
    /// --format monolithic-sparse, NEW-f001.vmdk... with two-gb-max-extent-flat), or with
    /// --group an existing directory; the disks keep replicating meanwhile.
    #[arg(
        long,
        value_name = "NEW.vmdk|DIR",
        required_unless_present = "in_place",
        conflicts_with = "in_place"
    )]
    out: Option<PathBuf>,
    /// Layout of the new VMDK [default: vmfs].
    #[arg(long, value_enum, value_name = "FORMAT", requires = "out")]
    format: Option<OutFormat>,
    /// Roll the target disk itself back (failback); refused while a master target serves
    /// the retention volume.
    #[arg(long)]
    in_place: bool,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Datastore directory holding the disk's VMDK.
    #[arg(long, value_name = "DIR")]
    datastore: PathBuf,
    /// Disk id: the image whose ddb.uuid is the disk's, else DISK_ID.vmdk.
    #[arg(long, value_name = "DISK_ID")]
    disk: String,
    /// Print the report as JSON (the exit status still says whether it is ok).
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum OutFormat {
    Vmfs,
    MonolithicFlat,
    MonolithicSparse,
    TwoGbMaxExtentFlat,
}

/// The retention volume when neither `--retention` nor the config file names one.
const DEFAULT_RETENTION: &str = "/mnt/retention";
/// `--retention-window` when neither the flag nor the config file sets it.
const DEFAULT_RETENTION_WINDOW: &str = "24h";
/// `--thin-after` / `--thin-every` defaults: the service's policy (all points for the
/// newest 2 h, then one per hour); equal to `RetentionPolicy::default()`.
const DEFAULT_THIN_AFTER: &str = "2h";
const DEFAULT_THIN_EVERY: &str = "1h";

/// A duration such as `90s`, `30m`, `24h`, `7d` (a bare number is seconds), in ms.
fn parse_duration_ms(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .with_context(|| format!("bad duration '{s}' (e.g. 90s, 30m, 24h, 7d)"))?;
    let scale = match unit {
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("bad duration unit in '{s}' (s, m, h or d)"),
    };
    n.checked_mul(scale)
        .filter(|&ms| ms > 0)
        .with_context(|| format!("duration '{s}' out of range"))
}

/// Parses the process arguments, runs the command, and maps errors to a message on stderr
/// and exit status 1.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => run_serve(*a).await,
            Command::Status(a) => run_status(a).await,
            Command::RecoveryPoints(a) => run_recovery_points(a),
            Command::Recover(a) => tokio::task::spawn_blocking(move || run_recover(a)).await?,
            Command::Verify(a) => tokio::task::spawn_blocking(move || run_verify(a)).await?,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", user_message(&e));
            ExitCode::FAILURE
        }
    }
}

/// `error <code>: <what>` for refusals (whose message may already carry that prefix when
/// it came back from a server), `error: <what>` for everything else.
fn user_message(e: &anyhow::Error) -> String {
    match e.downcast_ref::<Refusal>() {
        Some(r) if r.message.starts_with("error ") => r.message.clone(),
        Some(r) => r.to_string(),
        None => format!("error: {e:#}"),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "master-target".into())
}

async fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    let print = a.print_config;
    let cfg = a.resolve()?;
    if print {
        print!("{}", render_config(&cfg.file));
        return Ok(());
    }
    init_logging(cfg.log_format);
    let passphrase = cfg.security.passphrase()?;
    // Poll the shared signal future once now, which installs the SIGTERM/SIGINT handlers
    // before "listening on" is logged: a signal sent right after it must stop us cleanly.
    let mut signal = Box::pin(protocol::cli::shutdown_signal());
    tokio::select! {
        biased;
        () = &mut signal => return Ok(()),
        () = std::future::ready(()) => {}
    }
    let listen = &cfg.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let metrics = match &cfg.file.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for metrics"))?,
        ),
        None => None,
    };
    let opts = ServeOptions {
        datastore: cfg.datastore,
        retention: cfg.retention,
        auth: ServerAuth::new(passphrase),
        tls: cfg.security.tls(),
        tuning: cfg.wan.tuning(),
        identity: cfg.identity,
        metrics,
        retention_policy: cfg.retention_policy,
        data_io: cfg.data_io,
    };
    serve(opts, listener, signal)
        .await
        .map_err(|e| anyhow!(Refusal::new(e.code(), e.to_string())))
}

async fn run_status(a: StatusArgs) -> anyhow::Result<()> {
    init_logging(LogFormat::Text);
    let auth = ClientAuth::new(a.security.passphrase()?, "cli");
    let tls = a.security.tls();
    let (url, json, watching) = (&a.connect, a.json, a.watch.watch.is_some());
    // Each refresh connects afresh, so a watch outlives a restart of the server.
    let render = || async {
        let tuning = protocol::transport::WanTuning::default();
        let mut client = protocol::client::master_target(url, &tuning, &tls).await?;
        let reply = protocol::client::status(&mut client, &auth).await?;
        anyhow::Ok(match (json, watching) {
            // Watching: one JSON document per line.
            (true, true) => format!("{}\n", crate::status::to_json(&reply)),
            (true, false) => format!(
                "{}\n",
                serde_json::to_string_pretty(&crate::status::to_json(&reply))?
            ),
            (false, _) => crate::status::to_table(&reply),
        })
    };
    watch(a.watch.watch, !json, render).await
}

/// `--disk` (checked to be a safe name) or `--group`, which clap makes exclusive.
enum Target {
    Disk(String),
    Group(String),
}

fn target(disk: Option<String>, group: Option<String>) -> anyhow::Result<Target> {
    match (disk, group) {
        (Some(d), _) if !protocol::disk::is_safe_name(&d) => {
            bail!("disk id '{}' is not valid", d.escape_debug())
        }
        (Some(d), _) => Ok(Target::Disk(d)),
        (None, Some(g)) => Ok(Target::Group(g)),
        (None, None) => bail!("--disk or --group is required"),
    }
}

fn run_recovery_points(a: RecoveryPointsArgs) -> anyhow::Result<()> {
    let (json, table) = match target(a.disk, a.group)? {
        Target::Disk(disk) => {
            let points = crate::recovery::points(&a.retention, &disk)?;
            (
                crate::recovery::to_json(&disk, &points),
                crate::recovery::to_table(&points),
            )
        }
        Target::Group(group) => {
            let (disks, points) = crate::group_recovery::points(&a.retention, &group)?;
            (
                crate::group_recovery::to_json(&group, &disks, &points),
                crate::group_recovery::to_table(&disks, &points),
            )
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{table}");
    }
    Ok(())
}

fn run_recover(a: RecoverArgs) -> anyhow::Result<()> {
    init_logging(LogFormat::Text);
    let format = match a.format.unwrap_or(OutFormat::Vmfs) {
        OutFormat::Vmfs => crate::vmdk::descriptor::CreateType::Vmfs,
        OutFormat::MonolithicFlat => crate::vmdk::descriptor::CreateType::MonolithicFlat,
        OutFormat::MonolithicSparse => crate::vmdk::descriptor::CreateType::MonolithicSparse,
        OutFormat::TwoGbMaxExtentFlat => crate::vmdk::descriptor::CreateType::TwoGbMaxExtentFlat,
    };
    let disk_id = match target(a.disk, a.group)? {
        Target::Disk(d) => d,
        Target::Group(group) => {
            let req = crate::group_recovery::GroupRecoverRequest {
                datastore: a.datastore,
                retention: a.retention,
                group,
                point: a.point,
                out_dir: a.out,
                format,
            };
            for (disk, done) in crate::group_recovery::recover(&req)? {
                println!(
                    "recovered disk {disk} of group {} to the {} (seq {}): {}",
                    req.group,
                    done.point,
                    done.seq,
                    done.path.display()
                );
            }
            return Ok(());
        }
    };
    let req = crate::recovery::RecoverRequest {
        datastore: a.datastore,
        retention: a.retention,
        disk_id,
        point: a.point,
        out: a.out,
        format,
    };
    let done = crate::recovery::recover(&req)?;
    println!(
        "recovered disk {} to the {} (seq {}): {}",
        req.disk_id,
        done.point,
        done.seq,
        done.path.display()
    );
    Ok(())
}

fn run_verify(a: VerifyArgs) -> anyhow::Result<()> {
    use crate::vmdk::verify;
    let desc = verify::find_image(&a.datastore, &a.disk)?;
    let report = verify::verify(&a.datastore, &desc)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        println!("{}", report.summary());
        for w in &report.warnings {
            println!("warning: {w}");
        }
        for p in &report.problems {
            println!("problem: {p}");
        }
        if report.unlisted > 0 {
            println!("problem: {} more not listed", report.unlisted);
        }
    }
    if !report.ok() {
        bail!(
            "{} has {} structural problem(s)",
            desc.display(),
            report.problems.len() + report.unlisted
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_retention_volume_defaults_to_mnt_retention() {
        let cli =
            Cli::try_parse_from(["master-target", "recovery-points", "--disk", "d1"]).unwrap();
        let Command::RecoveryPoints(a) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(a.retention, PathBuf::from("/mnt/retention"));
        let cli = Cli::try_parse_from([
            "master-target",
            "recover",
            "--datastore",
            "/ds",
            "--disk",
            "d1",
            "--point",
            "latest",
            "--in-place",
        ])
        .unwrap();
        let Command::Recover(a) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(a.retention, PathBuf::from(DEFAULT_RETENTION));
        assert_eq!(
            serve(&[]).retention,
            None,
            "serve resolves the default after its config file"
        );
    }

    #[test]
    fn points_and_recover_take_a_disk_or_a_group_not_both() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["master-target"], args].concat());
        assert!(parse(&["recovery-points"]).is_err());
        assert!(parse(&["recovery-points", "--disk", "d", "--group", "g"]).is_err());
        let cli = parse(&["recovery-points", "--group", "g"]).unwrap();
        let Command::RecoveryPoints(a) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!((a.disk, a.group.as_deref()), (None, Some("g")));
        let r = [
            "recover",
            "--datastore",
            "/ds",
            "--point",
            "latest",
            "--in-place",
        ];
        assert!(parse(&r).is_err());
        assert!(parse(&[&r[..], &["--group", "g"]].concat()).is_ok());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("24h").unwrap(), 86_400_000);
        assert_eq!(parse_duration_ms("90").unwrap(), 90_000);
        assert_eq!(parse_duration_ms("7d").unwrap(), 7 * 86_400_000);
        for bad in ["", "h", "5y", "0s", "-1h"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_file_keys_parse() {
        let f: ServeFile = toml::from_str(
            "listen = \"127.0.0.1:9444\"\ndatastore = \"/ds\"\nretention = \"/r\"\n\
             h2_stream_window = \"64M\"\nh2_connection_window = 1048576\nlog_format = \"json\"\n\
             retention_window = \"12h\"\nretention_quota = \"10G\"\n",
        )
        .unwrap();
        assert_eq!(f.h2_stream_window, Some(Size(64 << 20)));
        assert_eq!(f.h2_connection_window, Some(Size(1 << 20)));
        assert_eq!(f.retention_quota, Some(Size(10 << 30)));
        assert_eq!(
            parse_duration_ms(&f.retention_window.unwrap()).unwrap(),
            12 * 3_600_000
        );
        assert!(toml::from_str::<ServeFile>("bogus = 1").is_err());
    }

    /// `master-target serve ARGS`, parsed.
    fn serve(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from([&["master-target", "serve"], args].concat()).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("{cli:?}")
        };
        *a
    }

    /// The flags `serve` requires, and nothing else.
    const REQUIRED: [&str; 4] = ["--listen", "127.0.0.1:1", "--datastore", "/ds"];

    /// `serve ARGS --print-config`'s output.
    fn printed(args: &[&str]) -> String {
        let a = serve(args);
        assert!(a.print_config);
        render_config(&a.resolve().unwrap().file)
    }

    #[test]
    fn the_printed_config_reads_back_to_the_same_text_and_flags_win() {
        let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/master-target.toml");
        let first = printed(&[
            "--config",
            deploy,
            "--print-config",
            "--retention-quota",
            "5G",
        ]);
        // Defaults filled, the file's values kept, the flag over the file.
        for line in [
            "listen = \"0.0.0.0:9444\"",
            "retention_window = \"24h\"",
            "retention_quota = \"5G\"",
            "h2_stream_window = \"32M\"",
            "h2_connection_window = \"64M\"",
            "log_format = \"json\"",
        ] {
            assert!(first.lines().any(|l| l == line), "{line} in\n{first}");
        }
        let dir = tempfile::tempdir().unwrap();
        let again = dir.path().join("printed.toml");
        std::fs::write(&again, &first).unwrap();
        let second = printed(&["--config", again.to_str().unwrap(), "--print-config"]);
        assert_eq!(first, second);
        // Nothing but flags: the required ones and the defaults.
        let bare = printed(&[&REQUIRED[..], &["--print-config"]].concat());
        assert!(bare.contains("retention = \"/mnt/retention\""), "{bare}");
        assert!(
            !bare.contains("retention_quota"),
            "no quota by default:\n{bare}"
        );
    }

    #[test]
    fn thinning_and_data_io_default_to_the_service_policy_and_mmap() {
        let bare = printed(&[&REQUIRED[..], &["--print-config"]].concat());
        for line in [
            "thin_after = \"2h\"",
            "thin_every = \"1h\"",
            "data_io = \"mmap\"",
        ] {
            assert!(bare.lines().any(|l| l == line), "{line} in\n{bare}");
        }
        let resolve = |args: &[&str]| serve(&[&REQUIRED[..], args].concat()).resolve();
        let cfg = resolve(&[]).unwrap();
        assert_eq!(
            cfg.retention_policy,
            crate::retention::journal::RetentionPolicy::default()
        );
        assert_eq!(cfg.data_io, DataIo::Mmap);
        let cfg = resolve(&[
            "--thin-after",
            "30m",
            "--thin-every",
            "10m",
            "--data-io",
            "pwrite",
        ])
        .unwrap();
        assert_eq!(cfg.retention_policy.thin_after_ms, 30 * 60_000);
        assert_eq!(cfg.retention_policy.thin_every_ms, 10 * 60_000);
        assert_eq!(cfg.data_io, DataIo::Pwrite);
        for (bad, says) in [
            (&["--thin-after", "0s"][..], "--thin-after 0s"),
            (&["--thin-every=-1h"], "--thin-every -1h"),
            (&["--thin-every", "1y"], "--thin-every 1y"),
            (
                &["--thin-every", "2d", "--retention-window", "1d"],
                "longer than --retention-window",
            ),
        ] {
            let e = format!("{:#}", resolve(bad).err().expect("refused"));
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let f: ServeFile =
            toml::from_str("thin_after = \"3h\"\nthin_every = \"15m\"\ndata_io = \"pwrite\"\n")
                .unwrap();
        assert_eq!(f.data_io, Some(DataIo::Pwrite));
        assert_eq!(f.thin_every.as_deref(), Some("15m"));
        assert!(toml::from_str::<ServeFile>("data_io = \"direct\"").is_err());
    }

    #[test]
    fn status_takes_watch_with_an_optional_interval() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(
                [&["master-target", "status", "--connect", "h:1"], args].concat(),
            )
            .unwrap();
            let Command::Status(a) = cli.command else {
                panic!("{cli:?}")
            };
            a.watch.watch
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&["--watch"]), Some(std::time::Duration::from_secs(2)));
        assert_eq!(
            parse(&["--watch", "5"]),
            Some(std::time::Duration::from_secs(5))
        );
    }
}
