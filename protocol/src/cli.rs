//! Command-line pieces every role shares: security and WAN flags, sizes, logging, shutdown.
//!
//! These keep the three binaries' flags identical (`--passphrase-file`, `--tls-*`,
//! `--h2-*`, `--log-format`), as the command-line contract requires.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::{Passphrase, PassphraseError};
use crate::transport::{TlsFiles, WanTuning};

/// Passphrase and TLS flags (also TOML keys of the same names, with `_` for `-`).
#[derive(clap::Args, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityArgs {
    /// File holding the shared passphrase (mode 600). Default: $FAILBACK_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// PEM certificate: turns TLS on (servers), or the client certificate for mutual TLS.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert (mode 600).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA that signed the server's certificate: clients (and a process server towards
    /// its master target) trust servers it signed; `https://` URLs need it.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Servers: require client certificates signed by this PEM CA (mutual TLS).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
}

impl SecurityArgs {
    /// Fills every flag not given on the command line from `file`.
    pub fn or(self, file: SecurityArgs) -> SecurityArgs {
        SecurityArgs {
            passphrase_file: self.passphrase_file.or(file.passphrase_file),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_ca: self.tls_ca.or(file.tls_ca),
            tls_client_ca: self.tls_client_ca.or(file.tls_client_ca),
        }
    }

    pub fn passphrase(&self) -> Result<Passphrase, PassphraseError> {
        Passphrase::load(self.passphrase_file.as_deref())
    }

    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
            client_ca: self.tls_client_ca.clone(),
        }
    }
}

/// HTTP/2 tuning flags. Defaults suit 1 Gbit/s at 100 ms; raise the windows to
/// bandwidth x RTT for faster or longer links.
#[derive(clap::Args, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanArgs {
    /// HTTP/2 stream window (bytes, or with K/M/G suffix) [default: 32M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub h2_stream_window: Option<u64>,
    /// HTTP/2 connection window [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub h2_connection_window: Option<u64>,
}

impl WanArgs {
    pub fn or(self, file: WanArgs) -> WanArgs {
        WanArgs {
            h2_stream_window: self.h2_stream_window.or(file.h2_stream_window),
            h2_connection_window: self.h2_connection_window.or(file.h2_connection_window),
        }
    }

    pub fn tuning(&self) -> WanTuning {
        let clamp = |v: u64| v.clamp(65_535, (1u64 << 31) - 1) as u32;
        let mut t = WanTuning::default();
        if let Some(w) = self.h2_stream_window {
            t.stream_window = clamp(w);
        }
        if let Some(w) = self.h2_connection_window {
            t.connection_window = clamp(w);
        }
        t
    }
}

/// Parses `1048576`, `64K`, `32M`, `10G`, `1T` (binary units, case-insensitive, optional
/// trailing `B`/`iB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("B"))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 4096, 64M, 10G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Writes `n` bytes the way [`parse_size`] reads it back: with the largest binary unit that
/// divides it exactly (`64M`, `10G`, `4097`).
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [('T', 40), ('G', 30), ('M', 20), ('K', 10)] {
        if n != 0 && n.trailing_zeros() >= shift {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// A size in a config file: a number of bytes (`1048576`) or a string (`"32M"`); printed back
/// as a string by `--print-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(t) => parse_size(&t).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(self.0))
    }
}

/// The effective configuration as the TOML a `--config` file would hold (`--print-config`).
pub fn render_config<T: Serialize>(config: &T) -> String {
    toml::to_string_pretty(config).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}

/// `--watch [SECS]` of the `status` commands.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct WatchArgs {
    /// Refresh every SECS seconds (default 2) until interrupted; with --json, one document
    /// per line.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2",
          value_parser = parse_watch_secs)]
    pub watch: Option<Duration>,
}

fn parse_watch_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!("--watch {s}: between 0.1 and 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Prints what `render` returns once, or with `every` again and again until SIGINT/SIGTERM.
/// When watching a terminal (and `clear` is set), each refresh replaces the screen under a
/// header with the time; a failed refresh (a server restarting, say) is shown in place and
/// the watch goes on, as `watch(1)` does. Without `every`, a failure is returned.
pub async fn watch<F, Fut, E>(every: Option<Duration>, clear: bool, mut render: F) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, E>>,
    E: std::fmt::Display,
{
    use std::io::{IsTerminal, Write};
    let Some(every) = every else {
        print!("{}", render().await?);
        return Ok(());
    };
    let clear = clear && std::io::stdout().is_terminal();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let page = match render().await {
            Ok(page) => page,
            Err(e) => format!("error: {e}\n"),
        };
        let mut out = std::io::stdout().lock();
        if clear {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            let _ = write!(out, "\x1b[H\x1b[2JEvery {every:?}: {now}\n\n");
        }
        let _ = out.write_all(page.as_bytes());
        let _ = out.flush();
        drop(out);
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Log output format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logs to stderr; `RUST_LOG` overrides the default level `info`.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Resolves when the process receives SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Reads a TOML config file into `T` (unknown keys are refused, with the file's name).
pub fn load_config<T: serde::de::DeserializeOwned + Default>(
    path: Option<&std::path::Path>,
) -> Result<T, String> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("32m"), Ok(32 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn sizes_print_back_as_they_parse() {
        for n in [
            0,
            1,
            4097,
            64 << 10,
            32 << 20,
            10 << 30,
            3 << 40,
            (1 << 20) + 4096,
        ] {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{n}");
        }
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(format_size((1 << 20) + 4096), "1028K");
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct File {
        window: Size,
    }

    #[test]
    fn config_sizes_take_numbers_or_strings_and_render_as_strings() {
        let a: File = toml::from_str("window = 1048576").unwrap();
        let b: File = toml::from_str("window = \"1M\"").unwrap();
        assert_eq!(a, b);
        assert_eq!(render_config(&a), "window = \"1M\"\n");
        let bad = toml::from_str::<File>("window = \"lots\"").unwrap_err();
        assert!(bad.to_string().contains("not a size"), "{bad}");
    }
}
