//! The `--config` files of `agent sync` and `agent replicate`, and `--print-config`: one TOML
//! key per flag (`_` for `-`), the flags laid over the file, the defaults filled in, then
//! validated into a [`SyncConfig`] or a [`ReplicateConfig`].
//!
//! ```text
//!  flags -> SyncFile/ReplicateFile --+
//!                                     +-- merge (TOML tables: a flag's key replaces the file's)
//!  --config FILE -> SyncFile/... -----+      -> with_defaults -> --print-config (TOML)
//!                                                             -> into_config (validated)
//! ```
//!
//! Invariant: what `--print-config` prints is the filled-in file, so reading it back with
//! `--config` (and no flags) gives the same file and prints the same text again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::auth::{ClientAuth, Passphrase, PassphraseError};
use protocol::cli::{LogFormat, SecurityArgs, Size, WanArgs};
use protocol::limits::{DEFAULT_BATCH_DATA, MAX_BATCH_DATA, MAX_NAME_LEN};
use protocol::pb::DiskFormat;
use protocol::transport::WanTuning;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::changes::{LINGER, OVERFLOW_GRACE};
use crate::cli::{Format, Mode};
use crate::diff::{DEFAULT_CHUNK, valid_chunk_size};
use crate::replicate::{
    DEFAULT_APP_INTERVAL, DEFAULT_CRASH_INTERVAL, DiskConfig, RETRY_FOREVER, ReplicateConfig,
};
use crate::scan::ZERO_BLOCK;
use crate::session::{HEARTBEAT, Target};
use crate::sync::{SyncConfig, disk_info};

/// Default bound of unacknowledged bytes in flight.
pub const DEFAULT_WINDOW: u64 = 64 << 20;
/// Default time an unreachable process server is retried by `agent sync`.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(600);
/// Shortest marker interval accepted.
pub const MIN_MARKER_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot find the host name ({0}); pass --identity")]
    FindingHostName(std::io::Error),
    #[error("--{flag} {why}")]
    Invalid { flag: &'static str, why: String },
    #[error("cannot merge the flags into the config file: {0}")]
    Merging(#[from] toml::de::Error),
    #[error("missing --{flag} (or {} in --config)", flag.replace('-', "_"))]
    Missing { flag: &'static str },
    #[error("{0}")]
    ReadingFile(String),
    #[error(transparent)]
    ReadingPassphrase(#[from] PassphraseError),
    #[error("cannot write the options as TOML: {0}")]
    Tabulating(#[from] toml::ser::Error),
}

fn invalid(flag: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        why: why.into(),
    }
}

/// A duration in a config file, written as `--crash-interval` takes it: "90s", "5m", "1h".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Span)
            .map_err(|e| serde::de::Error::custom(format!("'{text}': {e}")))
    }
}

// The two files repeat the keys both commands share: `#[serde(flatten)]` would merge them,
// but cannot refuse unknown keys, and a misspelt key must not be silently ignored.

/// `agent sync`'s options as its `--config` file holds them (every key optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_for: Option<Span>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h2_stream_window: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h2_connection_window: Option<Size>,
}

/// `agent replicate`'s options as its `--config` file holds them (every key optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicateFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash_interval: Option<Span>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_interval: Option<Span>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_quiesce_cmd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h2_stream_window: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h2_connection_window: Option<Size>,
    /// Last: a list of disks is a TOML array of tables, which must follow the plain keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<Disks>,
}

/// `disk = "FILE"` (one disk, with `disk_id`, `name`, `nbd_listen`) or `[[disk]]` tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Disks {
    One(PathBuf),
    Many(Vec<GroupDisk>),
}

/// One disk of a group: `--disk ID=SOURCE[,name=NAME][,nbd=HOST:PORT]` or a `[[disk]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDisk {
    pub disk_id: String,
    pub source: PathBuf,
    /// Target VMDK name [default: the disk id].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// NBD listen address [default: `nbd_listen` with its port plus the disk's index].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd_listen: Option<String>,
}

/// The options of `flags` laid over those of the `--config` file at `path` (if any): a key
/// the flags hold replaces the file's, whatever its type (a list of disks included).
pub fn merge<T: Serialize + DeserializeOwned + Default>(
    flags: &T,
    path: Option<&Path>,
) -> Result<T, ConfigError> {
    let file: T = protocol::cli::load_config(path).map_err(ConfigError::ReadingFile)?;
    let mut merged = toml::Table::try_from(&file)?;
    merged.extend(toml::Table::try_from(flags)?);
    Ok(merged.try_into()?)
}

/// The identity given, or the host name; checked against the protocol's bounds.
pub fn identity(given: Option<String>) -> Result<String, ConfigError> {
    let identity = match given {
        Some(i) => i,
        None => hostname().map_err(ConfigError::FindingHostName)?,
    };
    if identity.is_empty() || identity.len() > MAX_NAME_LEN {
        return Err(invalid(
            "identity",
            format!("must be 1..={MAX_NAME_LEN} bytes"),
        ));
    }
    Ok(identity)
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

/// The defaults both commands share, filled into whichever file holds them.
struct Shared<'a> {
    window: &'a mut Option<Size>,
    batch_size: &'a mut Option<Size>,
    identity: &'a mut Option<String>,
    log_format: &'a mut Option<LogFormat>,
    format: &'a mut Option<Format>,
    h2_stream_window: &'a mut Option<Size>,
    h2_connection_window: &'a mut Option<Size>,
}

impl Shared<'_> {
    fn fill(self) {
        let wan = WanTuning::default();
        self.window.get_or_insert(Size(DEFAULT_WINDOW));
        self.batch_size
            .get_or_insert(Size(DEFAULT_BATCH_DATA as u64));
        if self.identity.is_none() {
            // Without a host name the key stays out; `into_config` then says why.
            *self.identity = hostname().ok();
        }
        self.log_format.get_or_insert(LogFormat::Text);
        self.format.get_or_insert(Format::Vmfs);
        self.h2_stream_window
            .get_or_insert(Size(u64::from(wan.stream_window)));
        self.h2_connection_window
            .get_or_insert(Size(u64::from(wan.connection_window)));
    }
}

/// What both commands' `into_config` need from the shared keys.
struct Connection {
    tuning: WanTuning,
    security: SecurityArgs,
    auth: ClientAuth,
    /// Also what the control API's clients must know.
    passphrase: Passphrase,
    batch_data: usize,
    window_bytes: usize,
}

/// The keys both files hold that [`connection`] reads (moved out of either file).
struct ConnectionKeys {
    window: Option<Size>,
    batch_size: Option<Size>,
    identity: Option<String>,
    passphrase_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    h2_stream_window: Option<Size>,
    h2_connection_window: Option<Size>,
}

fn connection(k: ConnectionKeys) -> Result<Connection, ConfigError> {
    let (batch_data, window_bytes) = sizes(k.batch_size, k.window)?;
    let identity = identity(k.identity)?;
    let security = SecurityArgs {
        passphrase_file: k.passphrase_file,
        tls_cert: k.tls_cert,
        tls_key: k.tls_key,
        tls_ca: k.tls_ca,
        tls_client_ca: None,
    };
    let passphrase = security.passphrase()?;
    let wan = WanArgs {
        h2_stream_window: k.h2_stream_window.map(|s| s.0),
        h2_connection_window: k.h2_connection_window.map(|s| s.0),
    };
    Ok(Connection {
        tuning: wan.tuning(),
        auth: ClientAuth::new(passphrase.clone(), identity),
        passphrase,
        security,
        batch_data,
        window_bytes,
    })
}

impl Connection {
    fn target(&self, url: &str, disk: protocol::pb::DiskInfo) -> Target {
        Target {
            url: url.to_string(),
            tuning: self.tuning.clone(),
            tls: self.security.tls(),
            auth: self.auth.clone(),
            disk,
            heartbeat: HEARTBEAT,
        }
    }
}

/// Checks `--batch-size` and `--window` and applies their defaults.
fn sizes(batch_size: Option<Size>, window: Option<Size>) -> Result<(usize, usize), ConfigError> {
    let batch_data = batch_size.map_or(DEFAULT_BATCH_DATA as u64, |s| s.0);
    if batch_data < ZERO_BLOCK as u64
        || batch_data > MAX_BATCH_DATA as u64
        || !batch_data.is_multiple_of(ZERO_BLOCK as u64)
    {
        return Err(invalid(
            "batch-size",
            format!(
                "{batch_data} must be a multiple of {ZERO_BLOCK} between {ZERO_BLOCK} and \
                 {MAX_BATCH_DATA}"
            ),
        ));
    }
    let window = window.map_or(DEFAULT_WINDOW, |s| s.0);
    let window = usize::try_from(window)
        .ok()
        .filter(|&w| w > 0)
        .ok_or_else(|| invalid("window", "must be above 0 and fit in memory"))?;
    Ok((batch_data as usize, window))
}

fn need<T>(v: Option<T>, flag: &'static str) -> Result<T, ConfigError> {
    v.ok_or(ConfigError::Missing { flag })
}

impl SyncFile {
    /// Fills every key that has a default.
    pub fn with_defaults(mut self) -> SyncFile {
        Shared {
            window: &mut self.window,
            batch_size: &mut self.batch_size,
            identity: &mut self.identity,
            log_format: &mut self.log_format,
            format: &mut self.format,
            h2_stream_window: &mut self.h2_stream_window,
            h2_connection_window: &mut self.h2_connection_window,
        }
        .fill();
        self.mode.get_or_insert(Mode::Full);
        self.chunk_size
            .get_or_insert(Size(u64::from(DEFAULT_CHUNK)));
        self.wait.get_or_insert(false);
        self.retry_for.get_or_insert(Span(DEFAULT_RETRY_FOR));
        self
    }

    /// Validates the options into a [`SyncConfig`] (reads the passphrase).
    pub fn into_config(self) -> Result<SyncConfig, ConfigError> {
        let url = need(self.process_server, "process-server")?;
        let disk = need(self.disk, "disk")?;
        let disk_id = need(self.disk_id, "disk-id")?;
        let name = need(self.name, "name")?;
        let chunk_size = self.chunk_size.map_or(u64::from(DEFAULT_CHUNK), |s| s.0);
        if !valid_chunk_size(chunk_size) {
            return Err(invalid(
                "chunk-size",
                format!("{chunk_size} must be a power of two from 4K to 4M"),
            ));
        }
        let differential = (self.mode == Some(Mode::Differential)).then_some(chunk_size as u32);
        if let Some(tag) = &self.marker
            && tag.len() > MAX_NAME_LEN
        {
            return Err(invalid(
                "marker",
                format!("tag must be at most {MAX_NAME_LEN} bytes"),
            ));
        }
        let c = connection(ConnectionKeys {
            window: self.window,
            batch_size: self.batch_size,
            identity: self.identity,
            passphrase_file: self.passphrase_file,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            tls_ca: self.tls_ca,
            h2_stream_window: self.h2_stream_window,
            h2_connection_window: self.h2_connection_window,
        })?;
        let format = self.format.map_or(DiskFormat::Vmfs, DiskFormat::from);
        Ok(SyncConfig {
            target: c.target(&url, disk_info(&disk_id, &name, format)),
            disk,
            marker_tag: self.marker,
            wait: self.wait.unwrap_or(false),
            window_bytes: c.window_bytes,
            batch_data: c.batch_data,
            retry_for: self.retry_for.map_or(DEFAULT_RETRY_FOR, |s| s.0),
            differential,
        })
    }
}

impl ReplicateFile {
    /// Fills every key that has a default, and each group disk's name and NBD address.
    pub fn with_defaults(mut self) -> ReplicateFile {
        Shared {
            window: &mut self.window,
            batch_size: &mut self.batch_size,
            identity: &mut self.identity,
            log_format: &mut self.log_format,
            format: &mut self.format,
            h2_stream_window: &mut self.h2_stream_window,
            h2_connection_window: &mut self.h2_connection_window,
        }
        .fill();
        self.crash_interval
            .get_or_insert(Span(DEFAULT_CRASH_INTERVAL));
        self.app_interval.get_or_insert(Span(DEFAULT_APP_INTERVAL));
        if let Some(Disks::Many(disks)) = &mut self.disk {
            for (i, d) in disks.iter_mut().enumerate() {
                d.name.get_or_insert_with(|| d.disk_id.clone());
                if d.nbd_listen.is_none() {
                    d.nbd_listen = self.nbd_listen.as_deref().and_then(|a| nth_port(a, i));
                }
            }
        }
        self
    }

    /// Validates the options into a [`ReplicateConfig`] (reads the passphrase).
    pub fn into_config(self) -> Result<ReplicateConfig, ConfigError> {
        let url = need(self.process_server, "process-server")?;
        for (flag, d) in [
            ("crash-interval", self.crash_interval),
            ("app-interval", self.app_interval),
        ] {
            if d.is_some_and(|d| d.0 < MIN_MARKER_INTERVAL) {
                return Err(invalid(flag, "must be at least 1s"));
            }
        }
        let group = self.group.unwrap_or_default();
        if !group.is_empty() && !protocol::disk::is_safe_name(&group) {
            return Err(invalid(
                "group",
                format!("'{group}' must be 1..={MAX_NAME_LEN} of [A-Za-z0-9._:-]"),
            ));
        }
        let disks = disk_list(
            need(self.disk, "disk")?,
            self.disk_id,
            self.name,
            self.nbd_listen,
        )?;
        if disks.len() > 1 && group.is_empty() {
            // A marker cut on several disks must say which group it belongs to.
            return Err(ConfigError::Missing { flag: "group" });
        }
        let c = connection(ConnectionKeys {
            window: self.window,
            batch_size: self.batch_size,
            identity: self.identity,
            passphrase_file: self.passphrase_file,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            tls_ca: self.tls_ca,
            h2_stream_window: self.h2_stream_window,
            h2_connection_window: self.h2_connection_window,
        })?;
        let format = self.format.map_or(DiskFormat::Vmfs, DiskFormat::from);
        Ok(ReplicateConfig {
            disks: disks
                .into_iter()
                .map(|(id, name, path, nbd_listen)| {
                    let mut info = disk_info(&id, &name, format);
                    info.group = group.clone();
                    DiskConfig {
                        target: c.target(&url, info),
                        path,
                        nbd_listen,
                    }
                })
                .collect(),
            group,
            control: self.control_listen.map(|a| (a, c.passphrase.clone())),
            window_bytes: c.window_bytes,
            batch_data: c.batch_data,
            linger: LINGER,
            crash_interval: self.crash_interval.map_or(DEFAULT_CRASH_INTERVAL, |s| s.0),
            app_interval: self.app_interval.map_or(DEFAULT_APP_INTERVAL, |s| s.0),
            app_quiesce_cmd: self.app_quiesce_cmd,
            retry_for: RETRY_FOREVER,
            overflow_grace: OVERFLOW_GRACE,
        })
    }
}

/// `HOST:PORT` with the port raised by `n`, or `None` if `addr` has no numeric port (or
/// port 0, which picks a free port for every disk anyway).
fn nth_port(addr: &str, n: usize) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    if port == 0 {
        return Some(addr.to_string());
    }
    let port = port.checked_add(u16::try_from(n).ok()?)?;
    Some(format!("{host}:{port}"))
}

/// (disk id, name, source, NBD address) of every disk, checked for clashes.
fn disk_list(
    disks: Disks,
    disk_id: Option<String>,
    name: Option<String>,
    nbd_listen: Option<String>,
) -> Result<Vec<(String, String, PathBuf, String)>, ConfigError> {
    let list = match disks {
        Disks::One(path) => vec![(
            need(disk_id, "disk-id")?,
            need(name, "name")?,
            path,
            need(nbd_listen, "nbd-listen")?,
        )],
        Disks::Many(many) => {
            if disk_id.is_some() || name.is_some() {
                return Err(invalid(
                    "disk",
                    "ID=SOURCE takes its name as ID=SOURCE,name=NAME: --disk-id and --name go \
                     with a single --disk FILE",
                ));
            }
            let mut list = Vec::new();
            for (i, d) in many.into_iter().enumerate() {
                let nbd = d
                    .nbd_listen
                    .or_else(|| nbd_listen.as_deref().and_then(|a| nth_port(a, i)))
                    .ok_or_else(|| {
                        invalid(
                            "disk",
                            format!(
                                "{}: no NBD address: add nbd=HOST:PORT, or give --nbd-listen \
                                 for the first disk",
                                d.disk_id
                            ),
                        )
                    })?;
                let name = d.name.unwrap_or_else(|| d.disk_id.clone());
                list.push((d.disk_id, name, d.source, nbd));
            }
            list
        }
    };
    for (i, a) in list.iter().enumerate() {
        for b in &list[..i] {
            let clash = if a.0 == b.0 {
                Some(("disk id", &a.0))
            } else if a.1 == b.1 {
                Some(("name", &a.1))
            } else if a.3 == b.3 && !a.3.ends_with(":0") {
                Some(("NBD address", &a.3))
            } else {
                None
            };
            if let Some((what, v)) = clash {
                return Err(invalid("disk", format!("two disks with the {what} {v}")));
            }
        }
    }
    if list.is_empty() {
        return Err(ConfigError::Missing { flag: "disk" });
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_back_as_they_print() {
        let f = SyncFile {
            retry_for: Some(Span(Duration::from_secs(90))),
            window: Some(Size(8 << 20)),
            ..SyncFile::default()
        };
        let text = protocol::cli::render_config(&f);
        assert_eq!(text, "window = \"8M\"\nretry_for = \"1m 30s\"\n");
        assert_eq!(toml::from_str::<SyncFile>(&text).unwrap(), f);
    }

    #[test]
    fn group_disks_get_a_name_and_consecutive_nbd_ports() {
        let f: ReplicateFile = toml::from_str(
            "nbd_listen = \"127.0.0.1:10809\"\n\
             [[disk]]\ndisk_id = \"a\"\nsource = \"/dev/sda\"\n\
             [[disk]]\ndisk_id = \"b\"\nsource = \"/dev/sdb\"\nname = \"vm_b\"\n",
        )
        .unwrap();
        let Some(Disks::Many(d)) = f.with_defaults().disk else {
            panic!("not a group");
        };
        assert_eq!(d[0].name.as_deref(), Some("a"));
        assert_eq!(d[0].nbd_listen.as_deref(), Some("127.0.0.1:10809"));
        assert_eq!(d[1].name.as_deref(), Some("vm_b"));
        assert_eq!(d[1].nbd_listen.as_deref(), Some("127.0.0.1:10810"));
    }

    #[test]
    fn clashing_group_disks_are_refused() {
        let disk = |id: &str, nbd: &str| GroupDisk {
            disk_id: id.into(),
            source: "/dev/x".into(),
            name: None,
            nbd_listen: Some(nbd.into()),
        };
        let e = disk_list(
            Disks::Many(vec![disk("a", "h:1"), disk("a", "h:2")]),
            None,
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("disk id a"), "{e}");
        let e = disk_list(
            Disks::Many(vec![disk("a", "h:1"), disk("b", "h:1")]),
            None,
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("NBD address h:1"), "{e}");
    }

    #[test]
    fn several_disks_need_a_group_and_their_own_names() {
        let two = "process_server = \"http://ps:1\"\n\
                   [[disk]]\ndisk_id = \"a\"\nsource = \"/a\"\nnbd_listen = \"h:1\"\n\
                   [[disk]]\ndisk_id = \"b\"\nsource = \"/b\"\nnbd_listen = \"h:2\"\n";
        let f: ReplicateFile = toml::from_str(two).unwrap();
        let e = f.clone().into_config().unwrap_err();
        assert!(e.to_string().contains("missing --group"), "{e}");
        let named = ReplicateFile {
            group: Some("g".into()),
            disk_id: Some("a".into()),
            ..f
        };
        let e = named.into_config().unwrap_err();
        assert!(e.to_string().contains("ID=SOURCE,name=NAME"), "{e}");
    }
}
