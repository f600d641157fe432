//! `stellar scheduler`: one control-plane replica in the foreground. Workers and clients'
//! invocations go to gateways (`stellar gateway`), which talk to the replicas.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use stellar_scheduler::ReplicaConfig;
use stellar_scheduler::replica::parse_peer;
use stellar_scheduler::server::{ServerConfig, serve};

/// Arguments of `stellar scheduler`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
EXAMPLES:
  # a 3-replica cluster on one machine
  stellar scheduler --id 1 --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data-dir d1
  stellar scheduler --id 2 --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data-dir d2
  stellar scheduler --id 3 --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data-dir d3

  # a fourth replica joins an existing cluster, then is added from any replica
  stellar scheduler --id 4 --join --listen 127.0.0.1:7004 --data-dir d4
  stellar cluster add --id 4 --address 127.0.0.1:7004 --endpoint 127.0.0.1:7001

On restart the data dir's stored membership is authoritative: --peers may be omitted, and a
list that contradicts it is refused. Logs go to stderr; set STELLAR_LOG=debug for more.
TOKIO_WORKER_THREADS sets the async runtime's threads (default: one per core).

The first leader of a new cluster writes an admin token to its data dir (admin.token, mode
0600); client commands use it with --token or STELLAR_TOKEN, e.g. to create tenants, and
gateways use it to follow the cluster (`stellar gateway --token-file d1/admin.token`).")]
pub struct SchedulerArgs {
    /// This replica's id (non-zero, unique in the cluster).
    #[arg(long)]
    id: u64,
    /// The cluster's replicas as ID=HOST:PORT, comma-separated, this one included.
    #[arg(long, value_delimiter = ',', value_parser = parse_peer)]
    peers: Vec<(u64, String)>,
    /// Where the Raft log, HardState and snapshots live (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// Address to listen on; defaults to this replica's entry in --peers.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Start empty and wait to be added with `stellar cluster add` (no --peers).
    #[arg(long, conflicts_with = "peers")]
    join: bool,
    /// The logical clock period in milliseconds (elections after 10-20 ticks).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(5..=1000))]
    tick_ms: u64,
    /// Length of a receipt period in milliseconds: the usage recorded in each gets one Merkle
    /// root in the ledger, which `stellar receipts verify` checks a node's receipts against.
    /// Every replica should use the same (it is carried in each usage command).
    #[arg(long, default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1000..))]
    receipt_period_ms: u64,
    /// Applied entries between state-machine snapshots (the log is compacted behind them).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(10..))]
    snapshot_every: u64,
    /// Log entries kept behind a snapshot for followers that lag a little.
    #[arg(long, default_value_t = 5_000)]
    keep_entries: u64,
    /// How long the nodes of a gateway that died have to re-attach to another gateway
    /// before they are marked down and their replicas placed elsewhere, milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    gateway_reattach_ms: u64,
    /// Where job data and image layers are kept: `local` (this replica's data dir; every
    /// blob on two replicas before a command may name it) or `s3://BUCKET[/PREFIX]`, an
    /// S3-compatible store all replicas share (it keeps the copies). The store is configured
    /// by the standard AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
    /// AWS_ENDPOINT_URL (AWS_ALLOW_HTTP=true for a plain-http endpoint), then --blob-store-opt.
    #[arg(long, default_value = "local", verbatim_doc_comment)]
    blob_store: String,
    /// An object-store setting as KEY=VALUE (object_store's keys: aws_endpoint,
    /// aws_allow_http, aws_region, aws_virtual_hosted_style_request, …); repeatable. Keep
    /// secrets in the environment, where `ps` does not show them.
    #[arg(long, value_parser = parse_option)]
    blob_store_opt: Vec<(String, String)>,
}

fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// Runs the replica until SIGINT or SIGTERM.
pub async fn run(args: SchedulerArgs) -> Result<(), String> {
    if args.peers.is_empty() && !args.join && !args.data_dir.join("raft-log").exists() {
        return Err(
            "a new replica needs --peers (to found a cluster) or --join (to be added to one)"
                .into(),
        );
    }
    let listen = match args.listen {
        Some(l) => l,
        None => {
            let own = args.peers.iter().find(|p| p.0 == args.id).ok_or_else(|| {
                format!(
                    "--listen is required: --peers has no entry for id {}",
                    args.id
                )
            })?;
            own.1
                .parse()
                .map_err(|e| format!("cannot listen on `{}`: {e}; pass --listen", own.1))?
        }
    };
    let advertise = args
        .peers
        .iter()
        .find(|p| p.0 == args.id)
        .map(|p| p.1.clone())
        .unwrap_or_else(|| listen.to_string());
    let mut replica = ReplicaConfig::new(args.id, args.data_dir, args.peers);
    replica.snapshot_every = args.snapshot_every;
    replica.keep_entries = args.keep_entries;
    replica.gateway_reattach_ticks = (args.gateway_reattach_ms / args.tick_ms).max(1);
    let cfg = ServerConfig {
        replica,
        listen,
        advertise,
        tick: Duration::from_millis(args.tick_ms),
        receipt_period_ms: args.receipt_period_ms,
        blobs: stellar_scheduler::blob_backend::BlobStoreSpec {
            url: Some(args.blob_store),
            options: args.blob_store_opt,
        },
    };
    serve(cfg, crate::shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}
