//! `stellar gateway`: one edge gateway in the foreground. Stateless: it follows the control
//! plane's committed changes, holds workers' streams and serves clients; run as many as the
//! fleet needs, and restart any of them at will (their workers re-attach).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use stellar_gateway::{GatewayConfig, serve};
use stellar_proto::client::ClusterClient;

/// Arguments of `stellar gateway`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
EXAMPLES:
  # two gateways in front of a 3-replica control plane
  stellar gateway --control 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 \\
      --listen 127.0.0.1:7101 --token-file d1/admin.token --join-token \"$JOIN_TOKEN\"
  stellar gateway --control 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 \\
      --listen 127.0.0.1:7102 --token-file d1/admin.token --join-token \"$JOIN_TOKEN\"

  # workers dial any gateway (they try the next one when one is gone)
  stellar worker --join 127.0.0.1:7101,127.0.0.1:7102 --token \"$JOIN_TOKEN\" --data-dir w1

  # clients use a gateway as their endpoint
  STELLAR_ENDPOINT=127.0.0.1:7101 stellar invoke hello --data Ada
  curl -H \"authorization: Bearer $TOKEN\" --data Ada http://127.0.0.1:8101/v1/functions/hello/invoke

A gateway keeps nothing on disk. It authenticates to the control plane with an admin token
(--token-file or STELLAR_GATEWAY_TOKEN); workers present the join token to it. The control
plane marks a worker down when its gateway reports the stream gone (closed, or silent for three
heartbeats), and a dead gateway's workers down unless they re-attach to another gateway within
the replicas' --gateway-reattach-ms.")]
pub struct GatewayArgs {
    /// The control plane's replicas, comma-separated HOST:PORT (any will do).
    #[arg(long, value_delimiter = ',', required = true)]
    control: Vec<String>,
    /// Where workers and clients connect (gRPC).
    #[arg(long, default_value = "127.0.0.1:7101")]
    listen: SocketAddr,
    /// The address other gateways and the control plane use for this one [default: --listen].
    #[arg(long)]
    advertise: Option<String>,
    /// Where HTTP clients connect [default: the listen address's host, port + 1000]; `off`
    /// serves no HTTP.
    #[arg(long)]
    http_listen: Option<String>,
    /// A file holding an admin token (e.g. a replica's data-dir/admin.token).
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// An admin token (prefer --token-file: command lines are visible to other users).
    #[arg(long, env = "STELLAR_GATEWAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The secret workers present to join. Without it this gateway accepts no workers.
    #[arg(long, env = "STELLAR_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// How often workers send a keepalive, milliseconds; a worker silent for three of them
    /// is disconnected and reported down.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(50..=600_000))]
    heartbeat_ms: u64,
    /// Ready nodes above the gateways' mean this gateway holds before it sends registering
    /// workers, and a few idle ones every 10 s, to a less loaded gateway (0: balance even a
    /// handful of workers)
    #[arg(long, default_value_t = stellar_gateway::balance::DEFAULT_SLACK)]
    balance_slack: usize,
    /// Matching re-execution checks a node needs before its WebAssembly calls are only
    /// sampled: until then every successful call is run again on another node in good
    /// standing and compared (output, fuel, exit code), at the platform's cost.
    #[arg(long, default_value_t = 100)]
    check_probation: u64,
    /// The lowest share of a node's calls re-executed once its record is long (the share
    /// falls from 1 as (probation / matching checks)³).
    #[arg(long, default_value_t = 0.01)]
    check_rate: f64,
}

/// Runs the gateway until SIGINT or SIGTERM.
pub async fn run(args: GatewayArgs) -> Result<(), String> {
    if !(0.0..=1.0).contains(&args.check_rate) {
        return Err(format!(
            "--check-rate is a share of calls in [0, 1], got {}",
            args.check_rate
        ));
    }
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.trim().to_string(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read --token-file {}: {e}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => {
            return Err("a gateway needs an admin token: pass --token-file (a replica's data-dir/admin.token) or set STELLAR_GATEWAY_TOKEN".into());
        }
    };
    if token.is_empty() {
        return Err("the gateway's admin token is empty".into());
    }
    let control = ClusterClient::new(&args.control)
        .map_err(|s| s.message().to_string())?
        .with_token(&token);
    let http_listen = match args.http_listen.as_deref() {
        Some("off") => None,
        Some(a) => Some(
            a.parse()
                .map_err(|e| format!("--http-listen `{a}`: {e} (HOST:PORT or off)"))?,
        ),
        None => stellar_gateway::server::default_http_listen(args.listen),
    };
    let cfg = GatewayConfig {
        control,
        listen: args.listen,
        advertise: args.advertise.unwrap_or_else(|| args.listen.to_string()),
        http_listen,
        join_token: args.join_token,
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        balance_slack: args.balance_slack,
        checks: stellar_gateway::checks::CheckPolicy {
            probation: args.check_probation,
            rate: args.check_rate,
            ..Default::default()
        },
    };
    serve(cfg, crate::shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}
