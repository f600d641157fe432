//! Where a client command finds the cluster and who it says it is: `--endpoint` /
//! `STELLAR_ENDPOINT`, `--token` / `STELLAR_TOKEN`, else `~/.config/stellar/config.toml`:
//!
//! ```toml
//! endpoint = "10.0.0.1:7001,10.0.0.2:7001"
//! token = "stl_…"
//! ```

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use stellar_proto::client::ClusterClient;
use tonic::{Code, Status};

/// The address used when nothing names one (what `stellar dev` listens on).
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7001";

/// Connection flags shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoint {
    /// Control-plane addresses (any replica), comma-separated [default: from the config
    /// file, else 127.0.0.1:7001].
    #[arg(long, env = "STELLAR_ENDPOINT", value_delimiter = ',')]
    pub endpoint: Vec<String>,
    /// The bearer token (a tenant's, or the admin token) [default: from the config file].
    #[arg(long, env = "STELLAR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(short = 'o', long = "output", default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// What the config file may set.
#[derive(Debug, Default, serde::Deserialize)]
struct ConfigFile {
    endpoint: Option<String>,
    token: Option<String>,
}

/// The config file's path: `$XDG_CONFIG_HOME/stellar/config.toml` or
/// `~/.config/stellar/config.toml`.
pub fn config_path() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("stellar/config.toml"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/stellar/config.toml"))
}

fn read_config() -> Result<ConfigFile, String> {
    let Some(path) = config_path() else {
        return Ok(ConfigFile::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => toml::from_str(&s).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

impl Endpoint {
    /// The addresses to dial: flags or env, else the config file, else the default.
    pub fn addresses(&self) -> Result<Vec<String>, String> {
        if !self.endpoint.is_empty() {
            return Ok(self.endpoint.clone());
        }
        let cfg = read_config()?;
        Ok(cfg
            .endpoint
            .map(|e| {
                e.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_else(|| vec![DEFAULT_ENDPOINT.to_string()]))
    }

    /// Whether output is JSON.
    pub fn json(&self) -> bool {
        self.output == "json"
    }

    /// A leader-following client presenting the token (flags, env or config file).
    pub fn connect(&self) -> Result<ClusterClient, String> {
        let addrs = self.addresses()?;
        let client = ClusterClient::new(&addrs).map_err(|s| s.message().to_string())?;
        let token = match &self.token {
            Some(t) => Some(t.clone()),
            None => read_config()?.token,
        };
        Ok(match token {
            Some(t) => client.with_token(&t),
            None => client,
        })
    }

    /// A client error said as what to do next.
    pub fn explain(&self, what: &str, s: &Status) -> String {
        let at = self.addresses().unwrap_or_default().join(",");
        match s.code() {
            Code::Unavailable
                if s.message().contains("transport") || s.message().contains("connect") =>
            {
                format!(
                    "{what}: cannot reach the control plane at {at} ({}). Is it running? `stellar dev` starts one; --endpoint or STELLAR_ENDPOINT points elsewhere",
                    s.message()
                )
            }
            Code::Unauthenticated => format!("{what}: {} (endpoint {at})", s.message()),
            _ => format!("{what}: {}", s.message()),
        }
    }
}

/// A spinner on stderr for waits longer than a second (only on a terminal).
pub struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Shows `message` with a spinner and the elapsed time if the wait passes one second.
    pub fn start(message: String) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { task: None };
        }
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.set_message(message);
            bar.enable_steady_tick(Duration::from_millis(100));
            let _clear = ClearOnDrop(bar);
            std::future::pending::<()>().await;
        });
        Progress { task: Some(task) }
    }
}

struct ClearOnDrop(indicatif::ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Sizes for people: 1.5 MiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A node id as the CLI prints it.
pub fn node_id(n: u64) -> String {
    format!("{n:016x}")
}

/// A Unix time in milliseconds as UTC, `2026-12-01T18:39:51.123Z`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Now, as Unix milliseconds (the CLI's only clock: `--since 2h` counts back from it).
#[allow(clippy::disallowed_methods)]
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `--since`: a duration back from now (`90m`, `2h`, `7d`) or Unix milliseconds.
pub fn parse_since(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}`: use a duration like 30m, 2h, 7d or Unix milliseconds"))?;
    let per = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{s}`: the unit must be s, m, h or d")),
    };
    Ok(now_unix_ms().saturating_sub(n.saturating_mul(per)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_796_150_391_000), "2026-12-01T18:39:51.000Z");
    }

    #[test]
    fn since_accepts_durations_and_instants() {
        assert_eq!(parse_since("1234").unwrap(), 1234);
        let now = now_unix_ms();
        let two_h = parse_since("2h").unwrap();
        assert!(now - two_h >= 7_200_000 && now - two_h < 7_300_000);
        assert!(parse_since("2w").is_err());
        assert!(parse_since("h").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
