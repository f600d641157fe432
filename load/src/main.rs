//! `stellar-load`: benchmarks and simulators for StellarCloud.
//!
//! Run `cargo run --release -p stellar-load -- sim --nodes 1000000 --requests 200000 --seed 1`.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stellar_load::alloc::CountingAlloc;
use stellar_load::sim::{self, ALGORITHMS, SimConfig};
use stellar_placement::{PlacerConfig, SampleSize, Weights};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Benchmarks and simulators for StellarCloud.
#[derive(Parser)]
#[command(name = "stellar-load", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate N heterogeneous home nodes and replay M placement requests through StellarCloud's
    /// placer and the baselines (exhaustive, kube-adaptive, nomad-log2, random) on the same
    /// nodes and requests.
    ///
    /// Prints a table, or with --json exactly one JSON object on stdout. Progress goes to stderr.
    Sim(SimArgs),
}

#[derive(clap::Args)]
struct SimArgs {
    /// Number of home nodes to generate.
    #[arg(long, default_value_t = 100_000)]
    nodes: usize,
    /// Number of placement requests to replay.
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// Seed of every random choice: the same seed gives the same nodes, requests and placements.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Single-replica requests on which score ratio and RTT are measured against a full scan.
    #[arg(long, default_value_t = 1000)]
    score_sample: usize,
    /// Number of simulated callers (request origins).
    #[arg(long, default_value_t = 20_000)]
    clients: usize,
    /// Vivaldi warm-up: RTT samples each node takes when it joins the coordinate system
    /// (512 is under 1.5 hours of one probe every 10 s).
    #[arg(long, default_value_t = 512)]
    warmup_rounds: usize,
    /// Comma-separated algorithms to run.
    #[arg(long, value_delimiter = ',', default_values_t = ALGORITHMS.map(String::from))]
    algorithms: Vec<String>,
    /// Feasible candidates StellarCloud scores per decision (default: max(2, ceil(log2 N))).
    #[arg(long)]
    candidates: Option<usize>,
    /// Scorer weights, e.g. `latency=0.8,reputation=0.15,fit=0.05,zone_spread=0.05`
    /// (unnamed scorers keep their defaults).
    #[arg(long, value_parser = parse_weights)]
    weights: Option<Weights>,
    /// RTT in ms at which the latency score falls to one half (default 20).
    #[arg(long)]
    latency_scale_ms: Option<f32>,
}

fn parse_weights(s: &str) -> Result<Weights, String> {
    let mut w = Weights::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not NAME=VALUE"))?;
        let value: f32 = value
            .parse()
            .ok()
            .filter(|v: &f32| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("weight `{value}` must be a non-negative number"))?;
        match name {
            "latency" => w.latency = value,
            "reputation" => w.reputation = value,
            "fit" => w.fit = value,
            "zone_spread" => w.zone_spread = value,
            _ => {
                return Err(format!(
                    "unknown scorer `{name}`; known: latency, reputation, fit, zone_spread"
                ));
            }
        }
    }
    Ok(w)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(args) => run_sim(args),
    }
}

fn run_sim(args: SimArgs) -> ExitCode {
    let mut placer = PlacerConfig::default();
    if let Some(k) = args.candidates {
        placer.sample = SampleSize::Fixed(k);
    }
    if let Some(w) = args.weights {
        placer.weights = w;
    }
    if let Some(scale) = args.latency_scale_ms {
        if !(scale.is_finite() && scale > 0.0) {
            eprintln!("stellar-load sim: --latency-scale-ms must be a positive number");
            return ExitCode::from(2);
        }
        placer.latency_scale_ms = scale;
    }
    let cfg = SimConfig {
        nodes: args.nodes,
        requests: args.requests,
        seed: args.seed,
        score_sample: args.score_sample,
        clients: args.clients,
        warmup_rounds: args.warmup_rounds,
        algorithms: args.algorithms,
        placer,
    };
    let mut log = |line: &str| eprintln!("[sim] {line}");
    let report = match sim::run(&cfg, &mut log) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stellar-load sim: {e}");
            return ExitCode::from(2);
        }
    };
    let out = if args.json {
        match serde_json::to_string(&report) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("stellar-load sim: cannot encode the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        sim::render_table(&report)
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
