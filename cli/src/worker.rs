//! `stellar worker`: one home-node agent in the foreground.

use std::path::PathBuf;
use std::time::Duration;

use stellar_proto::v1 as pb;
use stellar_worker::{AgentConfig, SandboxConfig};

/// Arguments of `stellar worker`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
EXAMPLES:
  # join through the gateways (any will do; the worker tries the next one when one is gone)
  stellar worker --join 10.0.0.1:7101,10.0.0.2:7101 --token \"$JOIN_TOKEN\" \\
      --data-dir /var/lib/stellar-worker --region cn-east --zone shanghai --labels isp=telecom

The worker only dials out: it works behind NAT and never listens. Its identity (an ed25519
key, mode 0600) and its compiled-module cache live in --data-dir; keep the directory to stay
the same node across restarts. SIGTERM drains: no new invocations, in-flight ones finish (up
to --drain-timeout-secs), usage is reported, then it exits. Logs go to stderr; set
STELLAR_LOG=debug for more. TOKIO_WORKER_THREADS sets the async runtime's threads (default: one
per core).")]
pub struct WorkerArgs {
    /// Gateways to dial, comma-separated HOST:PORT.
    #[arg(long, value_delimiter = ',', required = true)]
    join: Vec<String>,
    /// The cluster's join token (as given to the gateways' --join-token).
    #[arg(long, env = "STELLAR_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Identity, compiled-module cache and scratch space (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// The region this node is in (placement prefers nodes near the caller).
    #[arg(long, default_value = "local")]
    region: String,
    /// The zone within the region.
    #[arg(long, default_value = "local")]
    zone: String,
    /// Labels for placement constraints, comma-separated KEY=VALUE.
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Millicores offered (default: every core).
    #[arg(long)]
    cpu_millis: Option<u32>,
    /// Memory offered in MiB (default: three quarters of the machine's).
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Sandbox slots: instances that may run at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    slots: u32,
    /// The largest linear memory one invocation may use, MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_memory_mib: u64,
    /// How long a drain waits for in-flight invocations, seconds.
    #[arg(long, default_value_t = 30)]
    drain_timeout_secs: u64,
    /// Offer to run container functions. The worker checks at start that the device can
    /// (root, overlayfs, user namespaces, cgroups with cpu, memory and pids) and logs why
    /// not; `false` keeps the node to wasm functions. Layers are cached in
    /// DATA_DIR/containers.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    containers: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label `{s}` must be KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("label `{s}` has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Runs the worker until SIGINT or SIGTERM, then drains.
pub async fn run(args: WorkerArgs) -> Result<(), String> {
    let capacity = match (args.cpu_millis, args.memory_mib) {
        (None, None) => None,
        (cpu, mem) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
            Some(pb::Resources {
                cpu_millis: cpu.unwrap_or(cores * 1000),
                memory_mib: mem.unwrap_or(1024),
                disk_mib: 0,
            })
        }
    };
    let cfg = AgentConfig {
        join: args.join,
        token: args.token,
        data_dir: args.data_dir,
        region: args.region,
        zone: args.zone,
        labels: args.labels,
        capacity,
        sandbox: SandboxConfig {
            slots: args.slots,
            max_memory_bytes: args.max_memory_mib << 20,
            ..Default::default()
        },
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        containers: args.containers,
    };
    stellar_worker::run(cfg, crate::shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}
