//! Command line (the public contract in DESIGN.md) and the TOML config file of `serve`.
//!
//! Every `serve` flag is also a config key (`--cache-quota` = `cache_quota`); flags override
//! the file. Sizes take binary suffixes (`64M`, `10G`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use protocol::auth::ClientAuth;
use protocol::cli::{LogFormat, SecurityArgs, WanArgs, parse_size};
use serde::Deserialize;

use crate::cache::CacheConfig;
use crate::forward::ForwardConfig;
use crate::server::Settings;

/// Default quota of the cache volume.
pub const DEFAULT_QUOTA: u64 = 10 << 30;
/// Default high-water mark, percent of the quota.
pub const DEFAULT_HIGH_WATER: u8 = 80;
/// Default number of connections to the master target.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// Default bytes in flight to the master target.
pub const DEFAULT_FORWARD_WINDOW: u64 = 64 << 20;
/// Default size of a cache segment.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

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
pub struct ServeArgs {
    /// TOML file with the same keys as the flags (`cache_quota = "10G"`); flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address agents connect to.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Cache volume directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Master target URL (http://HOST:PORT or https://HOST:PORT).
    #[arg(long, value_name = "URL")]
    pub master_target: Option<String>,
    /// Bytes the cache may use [default: 10G].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_quota: Option<u64>,
    /// Pause agents above this percentage of the quota (1-100) [default: 80].
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub high_water: Option<u8>,
    /// Parallel connections to the master target (1-64) [default: 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: Option<u16>,
    /// Bytes in flight to the master target, all disks together (>= bandwidth x RTT)
    /// [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub forward_window: Option<u64>,
    /// Size at which a cache segment is sealed and a new one started [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub segment_size: Option<u64>,
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
}

/// A size in the config file: a number of bytes or a string with a suffix.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self, key: &str) -> anyhow::Result<u64> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(t) => parse_size(t).map_err(|e| anyhow::anyhow!("config key {key}: {e}")),
        }
    }
}

/// The config file of `serve`: the flags' names with `_` for `-`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub listen: Option<String>,
    pub cache: Option<PathBuf>,
    pub master_target: Option<String>,
    pub cache_quota: Option<Size>,
    pub high_water: Option<u8>,
    pub connections: Option<u16>,
    pub forward_window: Option<Size>,
    pub segment_size: Option<Size>,
    pub identity: Option<String>,
    pub log_format: Option<LogFormat>,
    pub passphrase_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub h2_stream_window: Option<Size>,
    pub h2_connection_window: Option<Size>,
}

fn size(flag: Option<u64>, file: &Option<Size>, key: &str, default: u64) -> anyhow::Result<u64> {
    match (flag, file) {
        (Some(v), _) => Ok(v),
        (None, Some(s)) => s.bytes(key),
        (None, None) => Ok(default),
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

    /// Merges flags over the config file and checks everything `serve` needs.
    pub fn settings(self) -> anyhow::Result<Settings> {
        let file: ServeConfig =
            protocol::cli::load_config(self.config.as_deref()).map_err(anyhow::Error::msg)?;
        let security = self.security.or(SecurityArgs {
            passphrase_file: file.passphrase_file.clone(),
            tls_cert: file.tls_cert.clone(),
            tls_key: file.tls_key.clone(),
            tls_ca: file.tls_ca.clone(),
            tls_client_ca: file.tls_client_ca.clone(),
        });
        let wan = self.wan.or(WanArgs {
            h2_stream_window: file
                .h2_stream_window
                .as_ref()
                .map(|s| s.bytes("h2_stream_window"))
                .transpose()?,
            h2_connection_window: file
                .h2_connection_window
                .as_ref()
                .map(|s| s.bytes("h2_connection_window"))
                .transpose()?,
        });
        let Some(listen) = self.listen.or(file.listen) else {
            bail!("--listen HOST:PORT is required (flag or config key `listen`)");
        };
        let Some(dir) = self.cache.or(file.cache) else {
            bail!("--cache DIR is required (flag or config key `cache`)");
        };
        let Some(url) = self.master_target.or(file.master_target) else {
            bail!("--master-target URL is required (flag or config key `master_target`)");
        };
        let quota = size(
            self.cache_quota,
            &file.cache_quota,
            "cache_quota",
            DEFAULT_QUOTA,
        )?;
        let high_water = self
            .high_water
            .or(file.high_water)
            .unwrap_or(DEFAULT_HIGH_WATER);
        if !(1..=100).contains(&high_water) {
            bail!("high_water must be 1..=100 percent, not {high_water}");
        }
        let connections = self
            .connections
            .or(file.connections)
            .unwrap_or(DEFAULT_CONNECTIONS as u16);
        if !(1..=64).contains(&connections) {
            bail!("connections must be 1..=64, not {connections}");
        }
        let window = size(
            self.forward_window,
            &file.forward_window,
            "forward_window",
            DEFAULT_FORWARD_WINDOW,
        )?;
        let segment_size = size(
            self.segment_size,
            &file.segment_size,
            "segment_size",
            DEFAULT_SEGMENT_SIZE,
        )?;
        if segment_size < 1 << 20 {
            bail!("segment_size must be at least 1M");
        }
        let passphrase = security.passphrase().context("passphrase")?;
        let identity = self
            .identity
            .or(file.identity)
            .unwrap_or_else(default_identity);
        let tls = security.tls();
        let tuning = wan.tuning();
        Ok(Settings {
            listen,
            cache: CacheConfig {
                dir,
                segment_size,
                quota,
                high_water_percent: high_water,
            },
            forward: ForwardConfig {
                url,
                tuning: tuning.clone(),
                // The CA also trusts the master target; a cert/key pair is our client identity.
                tls: tls.clone(),
                auth: ClientAuth::new(passphrase.clone(), identity.clone()),
                connections: usize::from(connections),
                window: window.max(1),
            },
            tuning,
            tls,
            auth_passphrase: passphrase,
            identity,
        })
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
        let reply = crate::status::fetch(&self.connect, &tls, &auth).await?;
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::status::to_json(&reply))?
            );
        } else {
            print!("{}", crate::status::to_table(&reply));
        }
        Ok(())
    }
}
