//! `stellar`: one binary for every role of StellarCloud (like `nomad agent`, `consul agent`).
//!
//! ```text
//! stellar scheduler --id 1 --peers 1=127.0.0.1:7001,2=...,3=... --data-dir /var/lib/stellar
//! stellar cluster status --endpoint 127.0.0.1:7001
//! stellar cluster add --id 4 --address 127.0.0.1:7004 --endpoint 127.0.0.1:7001
//! stellar gateway --control 127.0.0.1:7001,... --listen 127.0.0.1:7101 --token-file admin.token
//! stellar worker --join 127.0.0.1:7101 --token "$JOIN_TOKEN" --data-dir /var/lib/stellar-worker
//! stellar dev                                   # 1 replica + 1 gateway + 3 workers
//! stellar deploy hello.wasm --name hello --replicas 2 && stellar invoke hello --data Ada
//! stellar transcode movie.mp4 --preset 720p -o movie-720p.mp4
//! ```

mod admin;
mod cluster;
mod connect;
mod demo;
mod dev;
mod functions;
mod gateway;
mod image_upload;
mod job_files;
mod jobs;
mod receipts;
mod run;
mod scheduler;
mod transcode;
mod usage;
mod worker;

use clap::{Parser, Subcommand};

/// jemalloc (as in TiKV): the control plane allocates many small, short-lived request and
/// entry buffers across threads, where glibc malloc's free-list work showed up in profiles.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The version `--version` prints; a build whose workers can cheat says so, so benchmarks can
/// tell a test build from a shipped one (`stellar-load trust-bench`).
const VERSION: &str = if stellar_worker::CAN_CHEAT {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (test build: workers can cheat)"
    )
} else {
    env!("CARGO_PKG_VERSION")
};

/// StellarCloud: edge function computing on home nodes.
#[derive(Debug, Parser)]
#[command(
    name = "stellar",
    version = VERSION,
    about,
    long_about = None,
    after_help = "\
GETTING STARTED:
  stellar demo                  # the whole system in one command (a few seconds)
  stellar dev                   # a local cluster to deploy to; prints its endpoint and tokens
  stellar run FILE.wasm         # one function here, in a worker's sandbox (no cluster)

Client commands find the cluster with --endpoint/STELLAR_ENDPOINT and authenticate with
--token/STELLAR_TOKEN, or read both from ~/.config/stellar/config.toml:
  endpoint = \"127.0.0.1:7001\"
  token = \"stl_...\""
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the demo: a local cluster, the example functions deployed, invoked and billed.
    Demo(demo::DemoArgs),
    /// Run a local cluster in one process: 1 control-plane replica, 1 gateway, N workers.
    Dev(dev::DevArgs),
    /// Upload a WebAssembly function or a container image and place its replicas.
    Deploy(functions::DeployArgs),
    /// Run a function once; its stdout is printed.
    Invoke(functions::InvokeArgs),
    /// Run a WebAssembly function here, in the sandbox a worker uses (no cluster needed).
    Run(run::RunArgs),
    /// List functions.
    Ls(functions::LsArgs),
    /// Show a function's replicas, their nodes and states, and why they are there.
    Status(functions::NameArgs),
    /// Delete a function and stop its replicas.
    Rm(functions::NameArgs),
    /// Show a function's recent invocations with their stderr.
    Logs(functions::LogsArgs),
    /// List the cluster's nodes (admin).
    Nodes(admin::NodesArgs),
    /// Show the priced usage ledger: a bill per function, a credit per node.
    Usage(usage::UsageArgs),
    /// A node owner's proof of what the ledger credited (`receipts verify --data-dir`).
    #[command(subcommand)]
    Receipts(receipts::ReceiptsCommand),
    /// Run and follow batch jobs: stages of container tasks over files (see `job run --help`).
    #[command(subcommand)]
    Job(jobs::JobCommand),
    /// Transcode a video across the cluster's nodes: split at keyframes, segments in parallel,
    /// joined and checked.
    Transcode(transcode::TranscodeArgs),
    /// Manage tenants (admin).
    #[command(subcommand)]
    Tenant(admin::TenantCommand),
    /// Create and revoke API tokens (admin).
    #[command(subcommand)]
    Token(admin::TokenCommand),
    /// Run one control-plane replica (Raft-replicated; 3 or 5 make a cluster).
    Scheduler(scheduler::SchedulerArgs),
    /// Run one edge gateway: holds workers' streams and serves invocations (stateless).
    Gateway(gateway::GatewayArgs),
    /// Run one home-node agent: dials out to a gateway and runs functions.
    Worker(worker::WorkerArgs),
    /// Inspect and change control-plane membership.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
}

/// Resolves on SIGINT or SIGTERM (what systemd and `kill` send).
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

/// Logs to stderr at `STELLAR_LOG`, else `default` (servers: info; client commands and the
/// demo: warn, so their own output stays readable).
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STELLAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> std::process::ExitCode {
    // The container init is this binary re-executed by a worker: it must run before any
    // thread starts (it forks), so it is dispatched ahead of argument parsing and the runtime.
    #[cfg(target_os = "linux")]
    if stellar_worker::container::init::is_init_invocation() {
        stellar_worker::container::init::main();
    }
    let cli = Cli::parse();
    let servers = matches!(
        cli.command,
        Command::Scheduler(_) | Command::Gateway(_) | Command::Worker(_) | Command::Dev(_)
    );
    init_logging(if servers { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await.map(|()| 0),
            Command::Dev(args) => dev::run(args).await.map(|()| 0),
            Command::Deploy(args) => functions::deploy(args).await.map(|()| 0),
            // A function's own exit status passes through, as `wasmtime run` does.
            Command::Invoke(args) => functions::invoke(args).await,
            Command::Run(args) => run::run(args).await,
            Command::Ls(args) => functions::ls(args).await.map(|()| 0),
            Command::Status(args) => functions::status(args).await.map(|()| 0),
            Command::Rm(args) => functions::rm(args).await.map(|()| 0),
            Command::Logs(args) => functions::logs(args).await.map(|()| 0),
            Command::Nodes(args) => admin::nodes(args).await.map(|()| 0),
            Command::Usage(args) => usage::run(args).await,
            Command::Receipts(cmd) => receipts::run(cmd).await,
            Command::Job(cmd) => jobs::run(cmd).await,
            Command::Transcode(args) => transcode::run(args).await,
            Command::Tenant(cmd) => admin::tenant(cmd).await.map(|()| 0),
            Command::Token(cmd) => admin::token(cmd).await.map(|()| 0),
            Command::Scheduler(args) => scheduler::run(args).await.map(|()| 0),
            Command::Gateway(args) => gateway::run(args).await.map(|()| 0),
            Command::Worker(args) => worker::run(args).await.map(|()| 0),
            Command::Cluster(cmd) => cluster::run(cmd).await.map(|()| 0),
        }
    });
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
