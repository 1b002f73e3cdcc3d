//! Command line (the public contract in DESIGN.md) and the TOML config file of `serve`.
//!
//! Every `serve` flag is also a config key (`--cache-quota` = `cache_quota`); flags override
//! the file. Sizes take binary suffixes (`64M`, `10G`). `serve --print-config` prints the
//! merged result ([`Effective`]) as a config file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use protocol::auth::ClientAuth;
use protocol::cli::{LogFormat, SecurityArgs, Size, WanArgs, WatchArgs, parse_size};
use protocol::transport::WanTuning;
use serde::{Deserialize, Serialize};

use crate::budget::MIN_INGEST;
use crate::cache::CacheConfig;
use crate::fair::MAX_WEIGHT;
use crate::forward::ForwardConfig;
use crate::server::Settings;
use crate::throttle::{Bandwidth, MAX_MBIT, Schedule, ScheduleError};

/// Default quota of the cache volume.
pub const DEFAULT_QUOTA: u64 = 10 << 30;
/// Default high-water mark, percent of the quota.
pub const DEFAULT_HIGH_WATER: u8 = 80;
/// Default number of connections to the master target.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// Default bytes in flight to the master target.
pub const DEFAULT_FORWARD_WINDOW: u64 = 64 << 20;
/// Default memory budget for batches (ingest and the forward window together): the ingest
/// part (192M) covers far more than one group commit at disk speed.
pub const DEFAULT_MEMORY_BUDGET: u64 = 256 << 20;
/// Default HTTP/2 stream window granted to each agent stream. Agents reach the process
/// server over a LAN: 1 MiB per stream is 1 GB/s at 1 ms RTT, and every stream may hold this
/// much unread data beyond the memory budget, so it is kept far below the 32M of the WAN hop
/// (200 agents x 1 MiB = 200 MiB; x 32 MiB would be 6.4 GiB).
pub const DEFAULT_AGENT_STREAM_WINDOW: u64 = 1 << 20;
/// Default size of a cache segment.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
/// Bounds of the segment size: a segment holds at least a few batches, and is preallocated
/// whole, so it must stay a small part of the volume.
pub const SEGMENT_SIZE_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 30);

#[derive(Parser, Debug)]
#[command(
    name = "process-server",
    version,
    about = "Failback process server: caches agents' batches durably and forwards them to the master target"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Accept agents, cache their batches durably, forward them to the master target.
    Serve(Box<ServeArgs>),
    /// Show a running process server's disks and cache.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
// The shared flag's help gives the WAN default; agent streams get a LAN-sized one here.
#[command(mut_arg("h2_stream_window", |a| a.help(
    "HTTP/2 stream window granted to each agent stream; it adds to --memory-budget per \
     connected stream (the connections to the master target keep the WAN default, 32M) \
     [default: 1M]"
)))]
pub struct ServeArgs {
    /// TOML file with the same keys as the flags (`cache_quota = "10G"`); flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (file merged with flags, defaults filled in) as
    /// TOML that --config accepts, then exit.
    #[arg(long)]
    pub print_config: bool,
    /// Address agents connect to.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// Cache volume directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Master target URL (http://HOST:PORT or https://HOST:PORT).
    #[arg(long, value_name = "URL")]
    pub master_target: Option<String>,
    /// Bytes the cache may use [default: 10G].
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub cache_quota: Option<Size>,
    /// Pause agents above this percentage of the quota (1-100) [default: 80].
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub high_water: Option<u8>,
    /// Parallel connections to the master target (1-64) [default: 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: Option<u16>,
    /// Bytes in flight to the master target, all disks together (>= bandwidth x RTT)
    /// [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub forward_window: Option<Size>,
    /// Memory for batches: read from agents and not yet durable in the cache, plus the
    /// forward window; at least forward window + 16M. Agents wait (HTTP/2 backpressure),
    /// nothing is refused; each agent stream may add its --h2-stream-window of unread data
    /// [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub memory_budget: Option<Size>,
    /// Size at which a cache segment is sealed and a new one started, 1M-1G; each is
    /// preallocated whole [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub segment_size: Option<Size>,
    /// Limit of the forwarding hop in Mbit/s (10^6 bit/s), all connections together;
    /// 0 = unlimited [default: 0].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=MAX_MBIT))]
    pub bandwidth_mbit: Option<u64>,
    /// Weekly limits over --bandwidth-mbit, in UTC, first match wins:
    /// "mon-fri 08:00-18:00=100,sat-sun=500,*=1000" (docs/operations.md).
    #[arg(long, value_name = "RULES", value_parser = schedule)]
    pub bandwidth_schedule: Option<Schedule>,
    /// Forwarding weight of a disk (1-100, default 1): backlogged disks share the link in
    /// proportion to their weights. Repeatable; config table `[priorities]`.
    #[arg(long = "priority", value_name = "DISK_ID=WEIGHT", value_parser = priority)]
    pub priorities: Vec<(String, u32)>,
    /// Identity sent to the master target and shown by status [default: process-server@HOST].
    #[arg(long, value_name = "NAME")]
    pub identity: Option<String>,
    /// Log format on stderr [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub wan: WanArgs,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Process server URL (http://HOST:PORT or https://HOST:PORT).
    #[arg(long, value_name = "URL")]
    pub connect: String,
    /// Print JSON (`disks[]`, `facts{}`) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// File holding the shared passphrase (mode 600). Default: $FAILBACK_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// PEM CA that signed the server's certificate (https:// URLs).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    #[command(flatten)]
    pub watch: WatchArgs,
}

/// A size flag (`64M`), the same type as the config key.
fn size(s: &str) -> Result<Size, String> {
    parse_size(s).map(Size)
}

fn priority(s: &str) -> Result<(String, u32), String> {
    let (id, w) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("'{s}' is not DISK_ID=WEIGHT"))?;
    let w = w
        .parse()
        .map_err(|_| format!("'{s}': weight '{w}' is not a number"))?;
    Ok((id.to_string(), w))
}

fn schedule(s: &str) -> Result<Schedule, String> {
    s.parse().map_err(|e: ScheduleError| e.to_string())
}

/// The config file of `serve`: the flags' names with `_` for `-`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub cache: Option<PathBuf>,
    pub master_target: Option<String>,
    pub cache_quota: Option<Size>,
    pub high_water: Option<u8>,
    pub connections: Option<u16>,
    pub forward_window: Option<Size>,
    pub memory_budget: Option<Size>,
    pub segment_size: Option<Size>,
    pub bandwidth_mbit: Option<u64>,
    pub bandwidth_schedule: Option<String>,
    pub identity: Option<String>,
    pub log_format: Option<LogFormat>,
    pub passphrase_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub h2_stream_window: Option<Size>,
    pub h2_connection_window: Option<Size>,
    pub priorities: Option<BTreeMap<String, u32>>,
}

/// The effective configuration of `serve`: flags over the file, every default filled in and
/// every bound checked. `--print-config` prints it as TOML that `--config` reads back.
#[derive(Debug, Clone, Serialize)]
pub struct Effective {
    pub listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    pub cache: PathBuf,
    pub master_target: String,
    pub cache_quota: Size,
    pub high_water: u8,
    pub connections: u16,
    pub forward_window: Size,
    pub memory_budget: Size,
    pub segment_size: Size,
    pub bandwidth_mbit: u64,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "schedule_text"
    )]
    pub bandwidth_schedule: Option<Schedule>,
    pub identity: String,
    pub log_format: LogFormat,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    pub h2_stream_window: Size,
    pub h2_connection_window: Size,
    /// Last: TOML writes tables after plain keys.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub priorities: BTreeMap<String, u32>,
}

fn schedule_text<S: serde::Serializer>(v: &Option<Schedule>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(t) => s.serialize_str(&t.to_string()),
        None => s.serialize_none(),
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        "process-server".into()
    } else {
        format!("process-server@{host}")
    }
}

impl ServeArgs {
    /// The log format, from the flag or the config file (read early, before logging starts).
    pub fn log_format(&self) -> LogFormat {
        self.log_format
            .or_else(|| {
                protocol::cli::load_config::<ServeConfig>(self.config.as_deref())
                    .ok()
                    .and_then(|c| c.log_format)
            })
            .unwrap_or_default()
    }

    /// Merges flags over the config file, fills in defaults and checks every bound.
    pub fn effective(self) -> anyhow::Result<Effective> {
        let file: ServeConfig =
            protocol::cli::load_config(self.config.as_deref()).map_err(anyhow::Error::msg)?;
        let security = self.security.or(SecurityArgs {
            passphrase_file: file.passphrase_file,
            tls_cert: file.tls_cert,
            tls_key: file.tls_key,
            tls_ca: file.tls_ca,
            tls_client_ca: file.tls_client_ca,
        });
        let mut wan = self.wan.or(WanArgs {
            h2_stream_window: file.h2_stream_window.map(|s| s.0),
            h2_connection_window: file.h2_connection_window.map(|s| s.0),
        });
        // Agent streams get a LAN-sized window unless told otherwise (it adds to memory).
        wan.h2_stream_window
            .get_or_insert(DEFAULT_AGENT_STREAM_WINDOW);
        let tuning = wan.tuning();
        let Some(listen) = self.listen.or(file.listen) else {
            bail!("--listen HOST:PORT is required (flag or config key `listen`)");
        };
        let Some(cache) = self.cache.or(file.cache) else {
            bail!("--cache DIR is required (flag or config key `cache`)");
        };
        let Some(master_target) = self.master_target.or(file.master_target) else {
            bail!("--master-target URL is required (flag or config key `master_target`)");
        };
        let bandwidth_schedule = match self.bandwidth_schedule {
            Some(s) => Some(s),
            None => file
                .bandwidth_schedule
                .as_deref()
                .map(str::parse)
                .transpose()
                .context("config key bandwidth_schedule")?,
        };
        let mut priorities = file.priorities.unwrap_or_default();
        priorities.extend(self.priorities);
        let e = Effective {
            listen,
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            cache,
            master_target,
            cache_quota: self
                .cache_quota
                .or(file.cache_quota)
                .unwrap_or(Size(DEFAULT_QUOTA)),
            high_water: self
                .high_water
                .or(file.high_water)
                .unwrap_or(DEFAULT_HIGH_WATER),
            connections: self
                .connections
                .or(file.connections)
                .unwrap_or(DEFAULT_CONNECTIONS as u16),
            forward_window: self
                .forward_window
                .or(file.forward_window)
                .unwrap_or(Size(DEFAULT_FORWARD_WINDOW)),
            memory_budget: self
                .memory_budget
                .or(file.memory_budget)
                .unwrap_or(Size(DEFAULT_MEMORY_BUDGET)),
            segment_size: self
                .segment_size
                .or(file.segment_size)
                .unwrap_or(Size(DEFAULT_SEGMENT_SIZE)),
            bandwidth_mbit: self.bandwidth_mbit.or(file.bandwidth_mbit).unwrap_or(0),
            bandwidth_schedule,
            identity: self
                .identity
                .or(file.identity)
                .unwrap_or_else(default_identity),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            passphrase_file: security.passphrase_file,
            tls_cert: security.tls_cert,
            tls_key: security.tls_key,
            tls_ca: security.tls_ca,
            tls_client_ca: security.tls_client_ca,
            h2_stream_window: Size(u64::from(tuning.stream_window)),
            h2_connection_window: Size(u64::from(tuning.connection_window)),
            priorities,
        };
        e.check()?;
        Ok(e)
    }
}

impl Effective {
    /// The bounds the flags' parsers enforce, for values that came from the file.
    fn check(&self) -> anyhow::Result<()> {
        if !(1..=100).contains(&self.high_water) {
            bail!(
                "high_water must be 1..=100 percent, not {}",
                self.high_water
            );
        }
        if !(1..=64).contains(&self.connections) {
            bail!("connections must be 1..=64, not {}", self.connections);
        }
        if !SEGMENT_SIZE_RANGE.contains(&self.segment_size.0) {
            bail!("segment_size must be 1M..=1G, not {}", self.segment_size.0);
        }
        // Only segments below the active one are ever deleted, and the writer starts a new
        // one only when a record does not fit: a mark that one segment's records can reach
        // would pause the agents with everything forwarded, for good.
        let mark = u128::from(self.cache_quota.0) * u128::from(self.high_water) / 100;
        let least = 2 * u128::from(self.segment_size.0);
        if mark < least {
            bail!(
                "the high-water mark ({}% of cache_quota {} = {mark} bytes) must hold at least \
                 two segments (2 x segment_size = {least} bytes): the records of one active \
                 segment could reach it and the cache would never resume; raise cache_quota \
                 or high_water, or lower segment_size",
                self.high_water,
                self.cache_quota.0
            );
        }
        if self.forward_window.0 == 0 {
            bail!("forward_window must be at least 1 byte");
        }
        let least = self.forward_window.0.saturating_add(MIN_INGEST);
        if self.memory_budget.0 < least {
            bail!(
                "memory_budget must be at least forward_window + 16M = {least} bytes, not {}",
                self.memory_budget.0
            );
        }
        if let Some((id, w)) = self
            .priorities
            .iter()
            .find(|(_, w)| !(1..=MAX_WEIGHT).contains(*w))
        {
            bail!("priority of disk {id} must be 1..={MAX_WEIGHT}, not {w}");
        }
        if self.bandwidth_mbit > MAX_MBIT {
            bail!(
                "bandwidth_mbit must be 0..={MAX_MBIT}, not {}",
                self.bandwidth_mbit
            );
        }
        Ok(())
    }

    fn security(&self) -> SecurityArgs {
        SecurityArgs {
            passphrase_file: self.passphrase_file.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
        }
    }

    /// What `serve` runs with (reads the passphrase).
    pub fn settings(self) -> anyhow::Result<Settings> {
        let security = self.security();
        let passphrase = security.passphrase().context("passphrase")?;
        let tls = security.tls();
        let tuning = WanArgs {
            h2_stream_window: Some(self.h2_stream_window.0),
            h2_connection_window: Some(self.h2_connection_window.0),
        }
        .tuning();
        // The forward connections cross the WAN: what the master target sends on them (acks,
        // and a differential sync's chunk hashes) keeps the WAN default stream window, not the
        // LAN-sized one of agent streams.
        let forward_tuning = WanTuning {
            stream_window: WanTuning::default().stream_window,
            ..tuning.clone()
        };
        Ok(Settings {
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            cache: CacheConfig {
                dir: self.cache,
                segment_size: self.segment_size.0,
                quota: self.cache_quota.0,
                high_water_percent: self.high_water,
            },
            memory_budget: self.memory_budget.0,
            forward: ForwardConfig {
                url: self.master_target,
                tuning: forward_tuning,
                // The CA also trusts the master target; a cert/key pair is our client identity.
                tls: tls.clone(),
                auth: ClientAuth::new(passphrase.clone(), self.identity.clone()),
                connections: usize::from(self.connections),
                window: self.forward_window.0,
                bandwidth: Bandwidth {
                    mbit: self.bandwidth_mbit,
                    schedule: self.bandwidth_schedule,
                },
                priorities: self.priorities,
            },
            tuning,
            tls,
            auth_passphrase: passphrase,
            identity: self.identity,
        })
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let print = args.print_config;
            let effective = args.effective()?;
            if print {
                print!("{}", protocol::cli::render_config(&effective));
                return Ok(());
            }
            crate::server::serve(effective.settings()?, protocol::cli::shutdown_signal()).await?;
            Ok(())
        }
        Command::Status(args) => args.run().await,
    }
}

impl StatusArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let passphrase = protocol::auth::Passphrase::load(self.passphrase_file.as_deref())
            .context("passphrase")?;
        let auth = ClientAuth::new(passphrase, "cli");
        let tls = protocol::transport::TlsFiles {
            ca: self.tls_ca,
            ..Default::default()
        };
        let (url, json, every) = (self.connect, self.json, self.watch.watch);
        protocol::cli::watch(every, !json, || {
            let (url, tls, auth) = (url.clone(), tls.clone(), auth.clone());
            async move {
                let reply = crate::status::fetch(&url, &tls, &auth).await?;
                let page = if !json {
                    crate::status::to_table(&reply)
                } else if every.is_some() {
                    // One document per line, so a watching script can read line by line.
                    format!("{}\n", crate::status::to_json(&reply))
                } else {
                    format!(
                        "{}\n",
                        serde_json::to_string_pretty(&crate::status::to_json(&reply))?
                    )
                };
                Ok::<_, anyhow::Error>(page)
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn effective(args: &[&str]) -> anyhow::Result<Effective> {
        let cli = Cli::try_parse_from([&["process-server", "serve"], args].concat())?;
        match cli.command {
            Command::Serve(a) => a.effective(),
            Command::Status(_) => unreachable!("parsed serve"),
        }
    }

    #[test]
    fn print_config_round_trips_through_config() {
        let first = effective(&[
            "--listen=127.0.0.1:9443",
            "--cache=/var/cache/fb",
            "--master-target=http://mt:9444",
            "--cache-quota=200G",
            "--metrics-listen=127.0.0.1:9100",
            "--h2-stream-window=8M",
            "--bandwidth-mbit=1000",
            "--bandwidth-schedule=mon-fri 08:00-18:00=100,*=0",
            "--priority=disk-a=3",
            "--priority=6000C29a-1b2c=2",
        ])
        .unwrap();
        let printed = protocol::cli::render_config(&first);
        // Defaults are filled in, sizes written with their unit.
        for line in [
            "cache_quota = \"200G\"",
            "segment_size = \"64M\"",
            "memory_budget = \"256M\"",
            "high_water = 80",
            "connections = 4",
            "h2_stream_window = \"8M\"",
            "h2_connection_window = \"64M\"",
            "log_format = \"text\"",
            "bandwidth_mbit = 1000",
            "bandwidth_schedule = \"mon-fri 08:00-18:00=100,*=0\"",
            "[priorities]\n6000C29a-1b2c = 2\ndisk-a = 3\n",
        ] {
            assert!(printed.contains(line), "{line} missing from\n{printed}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ps.toml");
        std::fs::write(&file, &printed).unwrap();
        let config = format!("--config={}", file.display());
        let again = effective(&[&config]).unwrap();
        assert_eq!(protocol::cli::render_config(&again), printed);
        // A flag still wins over the file.
        let flagged = effective(&[&config, "--high-water=60"]).unwrap();
        assert_eq!(flagged.high_water, 60);
        // A --priority flag overrides that disk's entry in the file and keeps the others.
        let flagged = effective(&[&config, "--priority=disk-a=7"]).unwrap();
        let weights: Vec<_> = flagged.priorities.into_iter().collect();
        assert_eq!(weights, [("6000C29a-1b2c".into(), 2), ("disk-a".into(), 7)]);
    }

    #[test]
    fn agent_streams_get_a_lan_window_and_the_memory_budget_defaults() {
        let e = effective(&["--listen=a:1", "--cache=/c", "--master-target=http://m:1"]).unwrap();
        assert_eq!(e.h2_stream_window.0, DEFAULT_AGENT_STREAM_WINDOW);
        assert_eq!(e.memory_budget.0, DEFAULT_MEMORY_BUDGET);
        // The help says so, not the WAN default of the shared flag.
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let help = cmd
            .find_subcommand_mut("serve")
            .unwrap()
            .render_help()
            .to_string();
        assert!(
            help.contains("agent stream; it adds to --memory-budget"),
            "{help}"
        );
        assert!(!help.contains("[default: 32M]"), "{help}");
    }

    #[test]
    fn config_values_out_of_bounds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ps.toml");
        let base = "listen = \"a:1\"\ncache = \"/c\"\nmaster_target = \"http://m:1\"\n";
        for (bad, why) in [
            ("high_water = 0", "high_water"),
            ("connections = 65", "connections"),
            ("segment_size = \"64K\"", "segment_size"),
            ("segment_size = \"2G\"", "segment_size"),
            ("forward_window = 0", "forward_window"),
            ("memory_budget = \"64M\"", "memory_budget"),
            ("bandwidth_mbit = 1000001", "bandwidth_mbit"),
            ("[priorities]\nd = 0", "priority of disk d"),
            ("[priorities]\nd = 101", "priority of disk d"),
            ("bandwidth_schedule = \"mon=fast\"", "bandwidth_schedule"),
            // 80 % of 64M is under two 64M segments (the default size).
            ("cache_quota = \"64M\"", "must hold at least two segments"),
            (
                "cache_quota = \"16M\"\nsegment_size = \"4M\"\nhigh_water = 49",
                "must hold at least two segments",
            ),
        ] {
            std::fs::write(&file, format!("{base}{bad}\n")).unwrap();
            let e = effective(&[&format!("--config={}", file.display())]).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let e = effective(&["--cache=/c"]).unwrap_err();
        assert!(e.to_string().contains("--listen"), "{e}");
    }
}
