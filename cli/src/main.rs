//! `stellar`: one binary for every role of StellarCloud (like `nomad agent`, `consul agent`).
//!
//! ```text
//! stellar scheduler --id 1 --peers 1=127.0.0.1:7001,2=...,3=... --data-dir /var/lib/stellar
//! stellar cluster status --endpoint 127.0.0.1:7001
//! stellar cluster add --id 4 --address 127.0.0.1:7004 --endpoint 127.0.0.1:7001
//! stellar worker --join 127.0.0.1:7001 --token "$JOIN_TOKEN" --data-dir /var/lib/stellar-worker
//! ```

mod cluster;
mod scheduler;
mod usage;
mod worker;

use clap::{Parser, Subcommand};

/// jemalloc (as in TiKV): the control plane allocates many small, short-lived request and
/// entry buffers across threads, where glibc malloc's free-list work showed up in profiles.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// StellarCloud: edge function computing on home nodes.
#[derive(Debug, Parser)]
#[command(name = "stellar", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one control-plane replica (Raft-replicated; 3 or 5 make a cluster).
    Scheduler(scheduler::SchedulerArgs),
    /// Run one home-node agent: dials out to the control plane and runs functions.
    Worker(worker::WorkerArgs),
    /// Show the priced usage ledger: a bill per function, a credit per node.
    Usage(usage::UsageArgs),
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STELLAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
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
            Command::Scheduler(args) => scheduler::run(args).await,
            Command::Worker(args) => worker::run(args).await,
            Command::Usage(args) => usage::run(args).await,
            Command::Cluster(cmd) => cluster::run(cmd).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
