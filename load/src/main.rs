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
    /// Simulate the trust policy over a fleet (default a million nodes, 1% cheaters): the
    /// gateways' re-execution checks and the ledger's reputation, the cluster's own code.
    /// Prints invocations to detection per cheat kind, re-execution overhead and false
    /// quarantines (a table, or one JSON object with --json).
    TrustSim(TrustSimArgs),
    /// Measure the trust policy on a real cluster: one replica, one gateway and --honest
    /// workers of the shipped `stellar` binary, --cheaters workers of a test build that can
    /// cheat (--cheat-stellar), `hello` called for --seconds. Invocations to detection per
    /// cheat kind, re-execution overhead, false quarantines and the audit's residue.
    ///
    /// Prints a summary, or with --json exactly one JSON object on stdout.
    TrustBench(TrustBenchArgs),
    /// Measure the Raft control plane on real processes (fsync on, loopback): committed
    /// allocations/s and commit latency against a 3-member etcd in the same run; or
    /// `--failover --kills K`; or `--nodes N` (resident memory of a replica holding N nodes).
    ///
    /// Needs Debian's etcd-server for the etcd side (or --skip-etcd).
    RaftBench(RaftBenchArgs),
    /// Measure the worker's invocation path: instantiate + invoke `hello` in one sandbox
    /// (p50/p99 on one thread, invocations/s with one thread per core), the same module in a
    /// new process per call, and an idle sandbox's resident memory.
    ///
    /// Prints a summary, or with --json exactly one JSON object on stdout.
    WasmBench(WasmBenchArgs),
    /// Measure a container's cold start (image cached; sandbox set up, /bin/true run, torn
    /// down) through the shipped `stellar run`, against crun on the same rootfs, namespaces,
    /// limits and seccomp allow-list in the same run, plus the host exec floor and
    /// `stellar run`s per second. Needs root, crun and busybox-static.
    ///
    /// Prints a summary, or with --json exactly one JSON object on stdout.
    ContainerBench(ContainerBenchArgs),
    /// Measure segment-parallel transcoding: (a) on real processes of the shipped `stellar`
    /// binary, `stellar transcode` with one one-core worker and with two, against plain
    /// ffmpeg on one core in the same run (speedup_2_workers, overhead_vs_plain_ffmpeg);
    /// (b) the job simulator at --sim-nodes (completion against the ideal with and without
    /// 20% churn, the tail with and without backup tasks). Needs root, ffmpeg, taskset.
    ///
    /// Prints a summary, or with --json exactly one JSON object on stdout.
    TranscodeBench(TranscodeBenchArgs),
    /// Measure end-to-end invocations through the gateway: starts a control-plane replica and
    /// workers on loopback (or targets --endpoint), deploys `hello` and drives it with many
    /// concurrent callers; throughput and p50/p99 latency.
    ///
    /// Prints a summary, or with --json exactly one JSON object on stdout.
    InvokeBench(InvokeBenchArgs),
    /// Run a module once in a fresh process (used by wasm-bench).
    #[command(hide = true)]
    WasmOnce(ModuleArg),
    /// Measure the edge tier at fleet scale: 3 replicas and G gateways (the `stellar` binary)
    /// with N simulated workers on real gRPC streams; the leader's and the gateways' CPU and
    /// memory in steady state, how fast killed and silent workers and a killed gateway are
    /// committed, and whether any acknowledged usage is lost.
    ///
    /// Prints a summary, or with --json exactly one JSON object on stdout. Raise the port
    /// range for more than ~25k workers per gateway (sysctl net.ipv4.ip_local_port_range).
    EdgeBench(EdgeBenchArgs),
    /// Simulated workers for edge-bench (commands on stdin, events on stdout).
    #[command(hide = true)]
    SimWorkers(SimWorkersArgs),
}

#[derive(clap::Args)]
struct EdgeBenchArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 10_000)]
    workers: usize,
    /// Gateways (the first is killed in the failover phase when there are two or more).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    gateways: u64,
    /// Seconds of the steady-state window.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Worker connections killed to measure detection.
    #[arg(long, default_value_t = 200)]
    kill_workers: usize,
    /// Workers that go silent without closing their connection.
    #[arg(long, default_value_t = 100)]
    silence_workers: usize,
    /// Keep every gateway up (skip the failover phase).
    #[arg(long)]
    no_gateway_kill: bool,
    /// Receipts per second over the fleet (0 = none). Simulated workers run nothing, so
    /// their receipts are for tickets no gateway issued: each is refused and counts against
    /// its node, which is quarantined (and then no longer judged down when killed).
    #[arg(long, default_value_t = 0.0)]
    usage_per_sec: f64,
    /// Simulated workers per process.
    #[arg(long, default_value_t = 5_000)]
    per_process: usize,
    /// Registrations per second while the fleet attaches.
    #[arg(long, default_value_t = 2_000.0)]
    ramp_per_sec: f64,
    /// Workers sharing one HTTP/2 connection (1: one each, as real devices).
    #[arg(long, default_value_t = 1)]
    streams_per_connection: usize,
    /// The `stellar` binary [default: next to this one].
    #[arg(long)]
    stellar: Option<std::path::PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct SimWorkersArgs {
    #[arg(long, value_delimiter = ',')]
    gateways: Vec<String>,
    #[arg(long)]
    count: usize,
    #[arg(long, default_value_t = 0)]
    first: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, env = "STELLAR_JOIN_TOKEN", hide_env_values = true)]
    join_token: String,
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    function: String,
    #[arg(long, default_value_t = 0.0)]
    usage_per_sec: f64,
    #[arg(long, default_value_t = 1000.0)]
    ramp_per_sec: f64,
    #[arg(long, default_value_t = 1)]
    streams_per_connection: usize,
}

#[derive(clap::Args)]
struct InvokeBenchArgs {
    /// Measured seconds (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent callers.
    #[arg(long, default_value_t = 12)]
    concurrency: usize,
    /// gRPC connections the callers share.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Async runtime threads per process: the bench's and each spawned replica's and
    /// worker's (TOKIO_WORKER_THREADS). 0 = tokio's default, one per core, as the `stellar`
    /// binary ships.
    #[arg(long, default_value_t = 0)]
    runtime_threads: usize,
    /// Workers to start on loopback.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Gateways to start; workers and the callers' connections spread over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    gateways: u64,
    /// The `stellar` binary that runs the cluster [default: next to this one].
    #[arg(long)]
    stellar: Option<std::path::PathBuf>,
    /// Target this cluster instead of starting one (comma-separated replicas).
    #[arg(long, value_delimiter = ',')]
    endpoint: Vec<String>,
    /// An admin token for --endpoint.
    #[arg(long, env = "STELLAR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The module (default: the committed build of examples/wasm/hello).
    #[arg(long)]
    module: Option<std::path::PathBuf>,
    /// One JSON object on stdout: invocations_per_sec, p50_ms, p99_ms, errors.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct TranscodeBenchArgs {
    /// Input length, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// Input size, WxH (a 1080p source scaled to the preset).
    #[arg(long, default_value = "1920x1080")]
    size: String,
    /// Output preset: 480p, 720p or 1080p.
    #[arg(long, default_value = "720p")]
    preset: String,
    /// Segment length, seconds.
    #[arg(long, default_value_t = 2)]
    segment_seconds: u32,
    /// A built transcode image [default: built by examples/images/build.sh into a temp dir].
    #[arg(long)]
    image: Option<std::path::PathBuf>,
    /// Simulated fleet sizes, comma-separated (0: skip the simulator).
    #[arg(long, value_delimiter = ',', default_value = "1000,100000")]
    sim_nodes: Vec<usize>,
    /// The simulator's seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only the simulator (no processes, no ffmpeg).
    #[arg(long)]
    sim_only: bool,
    /// The `stellar` binary that runs the cluster [default: next to this one].
    #[arg(long)]
    stellar: Option<std::path::PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct WasmBenchArgs {
    /// The module (default: the committed build of examples/wasm/hello).
    #[arg(long)]
    module: Option<std::path::PathBuf>,
    /// Timed single-thread invocations for p50/p99.
    #[arg(long, default_value_t = 20_000)]
    invocations: usize,
    /// Seconds of the throughput phase.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Threads of the throughput phase (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// New-process calls for the comparison.
    #[arg(long, default_value_t = 20)]
    process_calls: usize,
    /// The `stellar` binary that runs the idle worker and its cluster [default: next to this
    /// one].
    #[arg(long)]
    stellar: Option<std::path::PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ContainerBenchArgs {
    /// Timed cold starts per side.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Concurrent `stellar run`s in the throughput phase (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// The `stellar` binary [default: next to this one].
    #[arg(long)]
    stellar: Option<std::path::PathBuf>,
    /// The crun binary (Debian's crun package).
    #[arg(long, default_value = "crun")]
    crun: std::path::PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ModuleArg {
    #[arg(long)]
    module: std::path::PathBuf,
}

#[derive(clap::Args)]
struct RaftBenchArgs {
    /// Replicas in the cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    replicas: u64,
    /// Measured seconds per system.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Concurrent proposers (each allocation is answered after commit and apply).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    proposers: u64,
    /// Nodes registered before the throughput run.
    #[arg(long = "cluster-nodes", default_value_t = 20_000)]
    cluster_nodes: usize,
    /// Kill the leader repeatedly and measure failover instead.
    #[arg(long)]
    failover: bool,
    /// Leader kills in --failover mode.
    #[arg(long, default_value_t = 20, requires = "failover")]
    kills: usize,
    /// Register this many nodes in one replica and report its resident memory instead.
    #[arg(long, conflicts_with = "failover")]
    nodes: Option<usize>,
    /// Do not run the etcd side.
    #[arg(long)]
    skip_etcd: bool,
    /// Propose with one unary `Allocate` call each, instead of one `AllocateStream` per
    /// proposer (both answer each allocation after commit and apply).
    #[arg(long)]
    unary: bool,
    /// Directory for data dirs and logs (default: the system temp dir; use a real disk).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// The `stellar` binary whose `scheduler` role is measured [default: next to this one].
    #[arg(long)]
    stellar: Option<std::path::PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
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
    /// (unnamed scorers keep their defaults; `bandwidth` counts only for requests with a
    /// transfer estimate).
    #[arg(long, value_parser = parse_weights)]
    weights: Option<Weights>,
    /// RTT in ms at which the latency score falls to one half (default 20).
    #[arg(long)]
    latency_scale_ms: Option<f32>,
}

#[derive(clap::Args)]
struct TrustSimArgs {
    /// Nodes in the fleet.
    #[arg(long, default_value_t = 1_000_000)]
    nodes: usize,
    /// The share of nodes that cheat (split evenly over the cheat kinds).
    #[arg(long, default_value_t = 0.01)]
    cheater_share: f64,
    /// Mean calls a node serves in the simulated time (uniform in [C/2, 3C/2]).
    #[arg(long, default_value_t = 10_000)]
    calls_per_node: u64,
    /// The share of an honest node's calls that time out.
    #[arg(long, default_value_t = 0.02)]
    timeout_rate: f64,
    /// Matching checks before a node's calls are only sampled (`stellar gateway
    /// --check-probation`).
    #[arg(long, default_value_t = 100)]
    check_probation: u64,
    /// The lowest share of calls checked (`stellar gateway --check-rate`).
    #[arg(long, default_value_t = 0.01)]
    check_rate: f64,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct TrustBenchArgs {
    /// Honest workers (the shipped binary); at least 2.
    #[arg(long, default_value_t = 6)]
    honest: usize,
    /// Cheating workers, given --kinds round-robin.
    #[arg(long, default_value_t = 5)]
    cheaters: usize,
    /// Seconds of calls.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Stop calling once every cheater is quarantined (--seconds is then the longest run).
    #[arg(long)]
    until_caught: bool,
    /// Concurrent callers.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// The cheats played (STELLAR_WORKER_CHEAT kinds).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "inflate-fuel,wrong-output,replay,other-tenant,other-node"
    )]
    kinds: Vec<String>,
    /// The share of calls `inflate-fuel` and `wrong-output` cheat on.
    #[arg(long, default_value_t = 0.05)]
    cheat_rate: f64,
    /// Matching checks before a node's calls are only sampled (the gateway's
    /// --check-probation).
    #[arg(long, default_value_t = 100)]
    check_probation: u64,
    /// The lowest share of calls checked (the gateway's --check-rate).
    #[arg(long, default_value_t = 0.01)]
    check_rate: f64,
    /// The shipped `stellar` binary [default: next to this one].
    #[arg(long)]
    stellar: Option<std::path::PathBuf>,
    /// A `stellar` built with the test-only cheat feature, apart from the shipped one:
    /// `cargo build --release -p stellar-cli --features cheat --target-dir target/cheat`.
    #[arg(long, env = "STELLAR_CHEAT_BIN")]
    cheat_stellar: Option<std::path::PathBuf>,
    /// The module (default: the committed build of examples/wasm/hello).
    #[arg(long)]
    module: Option<std::path::PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn run_trust_bench(a: TrustBenchArgs) -> ExitCode {
    let Some(stellar) = stellar_binary(a.stellar) else {
        eprintln!("trust-bench: cannot find the `stellar` binary; pass --stellar PATH");
        return ExitCode::FAILURE;
    };
    let cfg = stellar_load::trustbench::TrustBenchConfig {
        honest: a.honest,
        cheaters: a.cheaters,
        seconds: a.seconds,
        until_caught: a.until_caught,
        concurrency: a.concurrency,
        kinds: a.kinds,
        cheat_rate: a.cheat_rate,
        check_probation: a.check_probation,
        check_rate: a.check_rate,
        stellar,
        cheat_stellar: a.cheat_stellar,
        module: a
            .module
            .unwrap_or_else(stellar_load::wasmbench::default_module),
    };
    let mut log = |m: &str| eprintln!("[trust-bench] {m}");
    let r = match stellar_load::trustbench::run(&cfg, &mut log) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trust-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if a.json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!(
        "{} honest + {} cheaters, {:.1} s: {} calls ({} errors), billed {} executions, {} checks: \
         re-execution overhead {:.2}% ({} in the second half)",
        r.honest,
        r.cheaters,
        r.elapsed_seconds,
        r.calls,
        r.errors,
        r.billed_executions,
        r.check_executions,
        r.reexecution_overhead * 100.0,
        r.reexecution_overhead_second_half
            .map(|o| format!("{:.2}%", o * 100.0))
            .unwrap_or_else(|| "not measured".into())
    );
    println!(
        "false quarantines {}, honest nodes blamed {}, wrong outputs delivered {}, receipts \
         refused {}, billed from forgeries {} µ, audit {} (residue {} µ)",
        r.false_quarantines,
        r.honest_blamed,
        r.wrong_outputs_delivered,
        r.receipts_refused,
        r.billed_from_forgeries_microunits,
        if r.audit_balanced {
            "balanced"
        } else {
            "UNBALANCED"
        },
        r.unbilled_microunits
    );
    for f in &r.audit_faults {
        println!("  audit: {f}");
    }
    for b in &r.blamed_nodes {
        println!(
            "  honest node {} blamed: {} mismatched checks, refused {:?}{}",
            b.node,
            b.checks_mismatched,
            b.receipts_refused,
            if b.quarantined { ", QUARANTINED" } else { "" }
        );
    }
    print_detections(&r.kinds);
    ExitCode::SUCCESS
}

/// The per-kind detection table of trust-sim and trust-bench.
fn print_detections(kinds: &[stellar_load::trustsim::KindReport]) {
    println!(
        "{:<20} {:>8} {:>8} {:>10} {:>10} {:>12}",
        "CHEAT", "CHEATERS", "CAUGHT", "DETECT P50", "DETECT P99", "WITHIN 100"
    );
    for k in kinds {
        println!(
            "{:<20} {:>8} {:>8} {:>10} {:>10} {:>11.2}%",
            k.kind,
            k.cheaters,
            k.caught,
            k.invocations_to_detection_p50,
            k.invocations_to_detection_p99,
            k.caught_within_100 * 100.0
        );
    }
}

fn run_trust_sim(a: TrustSimArgs) -> ExitCode {
    use stellar_load::trustsim::{TrustSimConfig, run};
    if !(0.0..=1.0).contains(&a.cheater_share)
        || !(0.0..=1.0).contains(&a.timeout_rate)
        || !(0.0..=1.0).contains(&a.check_rate)
        || a.calls_per_node < 2
    {
        eprintln!(
            "trust-sim: --cheater-share, --timeout-rate and --check-rate are shares in [0, 1]; \
             --calls-per-node at least 2"
        );
        return ExitCode::FAILURE;
    }
    let cfg = TrustSimConfig {
        nodes: a.nodes,
        cheater_share: a.cheater_share,
        calls_per_node: a.calls_per_node,
        timeout_rate: a.timeout_rate,
        policy: stellar_gateway::checks::CheckPolicy {
            probation: a.check_probation,
            rate: a.check_rate,
            ..Default::default()
        },
        seed: a.seed,
        ..Default::default()
    };
    let r = run(&cfg);
    if a.json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!(
        "{} nodes, {} billed calls, re-execution overhead {:.2}%, false quarantines {}, {} ms",
        r.nodes,
        r.billed_calls,
        r.reexecution_overhead * 100.0,
        r.false_quarantines,
        r.elapsed_ms
    );
    print_detections(&r.kinds);
    ExitCode::SUCCESS
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
            "bandwidth" => w.bandwidth = value,
            _ => {
                return Err(format!(
                    "unknown scorer `{name}`; known: latency, reputation, fit, zone_spread, \
                     bandwidth"
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
        Command::TrustSim(args) => run_trust_sim(args),
        Command::TrustBench(args) => run_trust_bench(args),
        Command::RaftBench(args) => run_raft_bench(args),
        Command::WasmBench(args) => run_wasm_bench(args),
        Command::ContainerBench(args) => run_container_bench(args),
        Command::InvokeBench(args) => run_invoke_bench(args),
        Command::TranscodeBench(args) => run_transcode_bench(args),
        Command::WasmOnce(m) => match stellar_load::wasmbench::once(&m.module) {
            Ok(out) => {
                let _ = std::io::stdout().write_all(&out);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wasm-once: {e}");
                ExitCode::FAILURE
            }
        },
        Command::EdgeBench(args) => run_edge_bench(args),
        Command::SimWorkers(args) => run_sim_workers(args),
    }
}

/// The shipped `stellar` binary: `--stellar`, else the one built next to this binary.
fn stellar_binary(given: Option<std::path::PathBuf>) -> Option<std::path::PathBuf> {
    given.or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("stellar")))
    })
}

fn run_edge_bench(args: EdgeBenchArgs) -> ExitCode {
    let (Ok(exe), Some(stellar)) = (std::env::current_exe(), stellar_binary(args.stellar)) else {
        eprintln!("edge-bench: cannot find my own binary");
        return ExitCode::FAILURE;
    };
    let cfg = stellar_load::edgebench::EdgeBenchConfig {
        workers: args.workers.max(1),
        gateways: args.gateways as usize,
        seconds: args.seconds.max(1),
        kill_workers: args.kill_workers,
        silence_workers: args.silence_workers,
        kill_gateway: !args.no_gateway_kill,
        usage_per_sec: args.usage_per_sec.max(0.0),
        per_process: args.per_process.max(1),
        ramp_per_sec: args.ramp_per_sec.max(1.0),
        streams_per_connection: args.streams_per_connection.max(1),
        stellar,
        exe,
    };
    let mut log = |m: &str| eprintln!("[edge-bench] {m}");
    match stellar_load::edgebench::run(&cfg, &mut log) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_value(&r).unwrap_or_default());
            } else {
                println!(
                    "edge-bench  {} workers, {} gateways: leader {:.2}% of a core, {} MiB; gateways {:.2}% of a core and {} MiB per 10k workers",
                    r.workers,
                    r.gateways,
                    r.leader_cpu_pct,
                    r.leader_rss_bytes >> 20,
                    r.gateway_cpu_pct_per_10k_workers,
                    r.gateway_rss_bytes_per_10k_workers >> 20
                );
                println!(
                    "detection   killed worker p50 {:.0} ms p99 {:.0} ms; silent worker p50 {:.0} ms p99 {:.0} ms; dead gateway p99 {:.0} ms ({} re-attached, {} down, {} unresolved)",
                    r.detect_worker_p50_ms,
                    r.detect_worker_p99_ms,
                    r.detect_silent_worker_p50_ms,
                    r.detect_silent_worker_p99_ms,
                    r.detect_gateway_p99_ms,
                    r.gateway_nodes_reattached,
                    r.gateway_nodes_down,
                    r.gateway_nodes_unresolved
                );
                println!(
                    "commits     {:.2} node transitions/s steady, {} peak; forged receipts {} sent, {} settled, {} billed",
                    r.committed_node_transitions_per_sec,
                    r.peak_committed_node_transitions_per_sec,
                    r.usage_sent,
                    r.usage_acknowledged,
                    r.billed_unissued
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_sim_workers(args: SimWorkersArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sim-workers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = stellar_load::simworkers::SimWorkersConfig {
        gateways: args.gateways,
        count: args.count,
        first: args.first,
        seed: args.seed,
        join_token: args.join_token,
        tenant: args.tenant,
        function: args.function,
        usage_per_sec: args.usage_per_sec,
        ramp_per_sec: args.ramp_per_sec,
        streams_per_connection: args.streams_per_connection,
    };
    match rt.block_on(stellar_load::simworkers::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sim-workers: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(target_os = "linux")]
fn run_container_bench(args: ContainerBenchArgs) -> ExitCode {
    // crun refuses a hybrid machine whose cgroup2 hierarchy holds a controller (this one's
    // holds hugetlb): both sides then run in a private mount namespace without it.
    if let Some(code) = stellar_load::containerbench::reexec_without_hybrid_cgroup2() {
        return code;
    }
    let cfg = stellar_load::containerbench::ContainerBenchConfig {
        stellar: stellar_binary(args.stellar).unwrap_or_else(|| "stellar".into()),
        crun: args.crun,
        runs: args.runs.max(1),
        threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
    };
    let mut log = |m: &str| eprintln!("[container-bench] {m}");
    match stellar_load::containerbench::run(&cfg, &mut log) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_value(&r).unwrap_or_default());
            } else {
                println!(
                    "stellar run  cold start p50 {:.1} ms  p99 {:.1} ms  ({:.2}x crun's p50)",
                    r.cold_start_p50_ms, r.cold_start_p99_ms, r.stellar_vs_crun_p50
                );
                println!(
                    "crun run     p50 {:.1} ms  p99 {:.1} ms",
                    r.crun_p50_ms, r.crun_p99_ms
                );
                println!(
                    "sandbox      p50 {:.1} ms  p99 {:.1} ms  ({:.2}x crun's p50; inside stellar run, no CLI start)",
                    r.sandbox_p50_ms, r.sandbox_p99_ms, r.sandbox_vs_crun_p50
                );
                println!("host exec    p50 {:.2} ms", r.host_exec_p50_ms);
                println!(
                    "throughput   {:.0} stellar runs/s on {} runners",
                    r.invocations_per_sec, r.threads
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("container-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn run_container_bench(_: ContainerBenchArgs) -> ExitCode {
    eprintln!("container-bench: containers run on Linux only");
    ExitCode::FAILURE
}

fn run_wasm_bench(args: WasmBenchArgs) -> ExitCode {
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let cfg = stellar_load::wasmbench::WasmBenchConfig {
        module: args
            .module
            .unwrap_or_else(stellar_load::wasmbench::default_module),
        invocations: args.invocations.max(1),
        seconds: args.seconds.max(0.1),
        threads,
        process_calls: args.process_calls.max(1),
        stellar: stellar_binary(args.stellar).unwrap_or_else(|| "stellar".into()),
    };
    let mut log = |m: &str| eprintln!("[wasm-bench] {m}");
    match stellar_load::wasmbench::run(&cfg, &mut log) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_value(&r).unwrap_or_default());
            } else {
                println!(
                    "in-worker    instantiate+invoke p50 {:.1} µs  p99 {:.1} µs  ({} fuel per call)",
                    r.invoke_p50_us, r.invoke_p99_us, r.fuel_per_call
                );
                println!(
                    "throughput   {:.0} invocations/s on {} threads",
                    r.invocations_per_sec, r.threads
                );
                println!(
                    "per process  p50 {:.1} ms  ({:.0}x the in-worker p50)",
                    r.process_per_call_p50_us / 1000.0,
                    r.process_per_call_p50_us / r.invoke_p50_us
                );
                println!(
                    "idle RSS     {:.1} MiB",
                    r.worker_idle_rss_bytes as f64 / f64::from(1 << 20)
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wasm-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_transcode_bench(args: TranscodeBenchArgs) -> ExitCode {
    let cfg = stellar_load::transcodebench::TranscodeBenchConfig {
        stellar: stellar_binary(args.stellar).unwrap_or_else(|| "stellar".into()),
        repo: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        seconds: args.seconds.max(1),
        size: args.size,
        preset: args.preset,
        segment_seconds: args.segment_seconds.max(1),
        image: args.image,
        sim_nodes: args.sim_nodes.into_iter().filter(|n| *n > 0).collect(),
        seed: args.seed,
        sim_only: args.sim_only,
    };
    let mut log = |m: &str| eprintln!("[transcode-bench] {m}");
    match stellar_load::transcodebench::run(&cfg, &mut log) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                if !cfg.sim_only {
                    println!(
                        "transcode-bench  {} -> {}, {} segment tasks of {} s: plain ffmpeg (1 core) {:.2} s, stellar 1 worker {:.2} s, 2 workers {:.2} s  speedup_2_workers {:.2}  overhead_vs_plain_ffmpeg {:.2}  frames {:?}",
                        r.input,
                        cfg.preset,
                        r.segment_tasks,
                        cfg.segment_seconds,
                        r.plain_ffmpeg_s,
                        r.job_1_worker_s,
                        r.job_2_workers_s,
                        r.speedup_2_workers,
                        r.overhead_vs_plain_ffmpeg,
                        r.frames
                    );
                }
                for s in &r.sim {
                    println!(
                        "transcode-sim  {} nodes: sim_completion_ratio_no_churn {:.2}  sim_completion_ratio_20pct_churn {:.2}  sim_backup_task_gain {:.2} (no churn {:.2})",
                        s.nodes,
                        s.sim_completion_ratio_no_churn,
                        s.sim_completion_ratio_20pct_churn,
                        s.sim_backup_task_gain,
                        s.sim_backup_task_gain_no_churn
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("transcode-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_invoke_bench(args: InvokeBenchArgs) -> ExitCode {
    let Some(stellar) = stellar_binary(args.stellar) else {
        eprintln!("invoke-bench: cannot find the `stellar` binary; pass --stellar PATH");
        return ExitCode::FAILURE;
    };
    let cfg = stellar_load::invokebench::InvokeBenchConfig {
        seconds: args.seconds.max(1),
        concurrency: args.concurrency.max(1),
        connections: args.connections.max(1),
        runtime_threads: args.runtime_threads,
        workers: args.workers.max(1),
        gateways: args.gateways as usize,
        endpoint: args.endpoint,
        token: args.token,
        module: args
            .module
            .unwrap_or_else(stellar_load::wasmbench::default_module),
        stellar,
    };
    let mut log = |m: &str| eprintln!("[invoke-bench] {m}");
    match stellar_load::invokebench::run(&cfg, &mut log) {
        Ok(r) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "invocations_per_sec": r.invocations_per_sec,
                        "p50_ms": r.p50_ms,
                        "p99_ms": r.p99_ms,
                        "errors": r.errors,
                        "concurrency": r.concurrency,
                        "workers": r.workers,
                        "gateways": r.gateways,
                        "runtime_threads": r.runtime_threads,
                        "seconds": r.seconds,
                        "cpu_seconds": r.cpu_seconds,
                        "invocations_per_cpu_sec": r.invocations_per_cpu_sec,
                    })
                );
            } else {
                println!(
                    "invoke-bench  {:.0} invocations/s  p50 {:.2} ms  p99 {:.2} ms  errors {}  {:.0} invocations/CPU-s  ({} callers, {} worker(s), runtime threads per process: {}, {} s)",
                    r.invocations_per_sec,
                    r.p50_ms,
                    r.p99_ms,
                    r.errors,
                    r.invocations_per_cpu_sec,
                    r.concurrency,
                    r.workers,
                    if r.runtime_threads == 0 {
                        "one per core".to_string()
                    } else {
                        r.runtime_threads.to_string()
                    },
                    r.seconds
                );
            }
            if r.errors > 0 {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("invoke-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("stellar-load: cannot start the async runtime: {e}");
            None
        }
    }
}

fn run_raft_bench(args: RaftBenchArgs) -> ExitCode {
    use stellar_load::raftbench;
    let base = args.dir.unwrap_or_else(std::env::temp_dir);
    let dir = match raftbench::run_dir(&base) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "raft-bench: cannot create a run directory in {}: {e}",
                base.display()
            );
            return ExitCode::from(2);
        }
    };
    let Some(stellar) = stellar_binary(args.stellar) else {
        eprintln!("raft-bench: cannot find my own binary (pass --stellar PATH)");
        return ExitCode::FAILURE;
    };
    if !stellar.is_file() {
        eprintln!(
            "raft-bench: the `stellar` binary is not at {} (build it: cargo build --release -p stellar-cli, or pass --stellar PATH)",
            stellar.display()
        );
        return ExitCode::from(2);
    }
    let cfg = raftbench::RaftBenchConfig {
        replicas: args.replicas as usize,
        seconds: args.seconds,
        proposers: args.proposers as usize,
        nodes: args.cluster_nodes,
        skip_etcd: args.skip_etcd,
        dir: dir.clone(),
        replica_command: (stellar, vec!["scheduler".to_string()]),
        unary: args.unary,
    };
    eprintln!("[raft-bench] data and logs in {}", dir.display());
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let mut log = |line: &str| eprintln!("[raft-bench] {line}");
    let out: Result<(serde_json::Value, String), raftbench::BenchError> = rt.block_on(async {
        if let Some(n) = args.nodes {
            let r = raftbench::registry(&cfg, n, &mut log).await?;
            let text = format!(
                "nodes {}  rss {:.1} MiB  peak {:.1} MiB  ({:.0} nodes/s registered)\n",
                r.nodes,
                r.rss_bytes as f64 / 1048576.0,
                r.peak_rss_bytes as f64 / 1048576.0,
                r.nodes_per_sec
            );
            Ok((serde_json::to_value(&r).unwrap_or_default(), text))
        } else if args.failover {
            let r = raftbench::failover(&cfg, args.kills, &mut log).await?;
            let text = format!(
                "kills {}  failover p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms  acknowledged {}  lost {}\n",
                r.kills, r.failover_p50_ms, r.failover_p99_ms, r.failover_max_ms, r.acknowledged, r.lost_acknowledged
            );
            Ok((serde_json::to_value(&r).unwrap_or_default(), text))
        } else {
            let r = raftbench::throughput(&cfg, &mut log).await?;
            let mut text = format!(
                "stellar  {} replicas  {:>9.0} committed/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} errors)\n",
                r.replicas, r.committed_per_sec, r.commit_p50_ms, r.commit_p99_ms, r.errors
            );
            if let (Some(rate), Some(p50), Some(p99)) =
                (r.etcd_committed_per_sec, r.etcd_commit_p50_ms, r.etcd_commit_p99_ms)
            {
                text += &format!(
                    "etcd     {} members  {:>9.0} committed/s  p50 {:>7.2} ms  p99 {:>7.2} ms\n",
                    r.replicas, rate, p50, p99
                );
                text += &format!("ratio    {:.2}x\n", r.committed_per_sec / rate);
            }
            Ok((serde_json::to_value(&r).unwrap_or_default(), text))
        }
    });
    match out {
        Ok((json, text)) => {
            let _ = std::fs::remove_dir_all(&dir);
            if args.json {
                println!("{json}");
            } else {
                print!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("raft-bench: {e} (logs kept in {})", dir.display());
            ExitCode::FAILURE
        }
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
