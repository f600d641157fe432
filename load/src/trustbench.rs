//! `trust-bench`: the trust policy on a real cluster. It starts one control-plane replica and
//! one gateway of the shipped `stellar` binary, `--honest` workers of that binary and
//! `--cheaters` workers of a test build that can cheat (`--features cheat`, switched on per
//! process by `STELLAR_WORKER_CHEAT`), deploys `hello` with one instance per worker and
//! calls it for `--seconds`. Every answer names the node that ran it; a poll of the ledger
//! every 50 ms sees each quarantine.
//!
//! ```text
//!  callers ×C ─▶ gateway (tickets, receipts, checks) ─▶ honest ×N │ cheaters ×M (one kind each)
//!      │ answers per node                  └ UsageCmd (receipts, refusals, check outcomes)
//!      └──────────────── ListNodes every 50 ms ◀─ ledger: reputation, quarantine
//!  a cheater's invocations to detection: the calls it answered before the poll that saw it
//!  quarantined (an overcount by at most one poll's calls)
//!  at the end: GetUsage{cells} ─▶ the ledger's audit (scheduler::usage_audit)
//! ```
//!
//! Figures: invocations to detection (p50, p99) per cheat kind, re-execution overhead
//! (the platform's `checks` executions ÷ the tenant's billed executions, over the whole run
//! and over its second half, after the probations), false quarantines, the audit's residue,
//! what was billed from forgeries and how many wrong answers reached the caller before their
//! node was caught.

#![allow(clippy::disallowed_methods)] // a benchmark's timers read the clock

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;

use crate::procs::{LocalCluster, LocalClusterConfig};
use crate::trustsim::{KindReport, percentile};

/// The cheats a test build plays (`STELLAR_WORKER_CHEAT`), in the order cheaters get them.
pub const CHEAT_KINDS: [&str; 5] = [
    "inflate-fuel",
    "wrong-output",
    "replay",
    "other-tenant",
    "other-node",
];

/// What `stellar --version` says of a build whose workers can cheat.
const CHEAT_BUILD_MARK: &str = "workers can cheat";

/// The tenant that `other-tenant` cheaters bill (it does not exist).
const VICTIM_TENANT: &str = "victim";

/// What to run.
#[derive(Debug, Clone)]
pub struct TrustBenchConfig {
    /// Honest workers (the shipped binary).
    pub honest: usize,
    /// Cheating workers (the cheat build), given `kinds` round-robin.
    pub cheaters: usize,
    /// Seconds of calls (at most, with `until_caught`).
    pub seconds: u64,
    /// Stop calling once every cheater is quarantined.
    pub until_caught: bool,
    /// Concurrent callers.
    pub concurrency: usize,
    /// The cheat kinds played (names from [`CHEAT_KINDS`]).
    pub kinds: Vec<String>,
    /// The share of calls `inflate-fuel` and `wrong-output` cheat on.
    pub cheat_rate: f64,
    /// The gateway's `--check-probation`.
    pub check_probation: u64,
    /// The gateway's `--check-rate`.
    pub check_rate: f64,
    /// The shipped `stellar` binary (replica, gateway, honest workers).
    pub stellar: PathBuf,
    /// A `stellar` built with `--features cheat` (the cheaters).
    pub cheat_stellar: Option<PathBuf>,
    /// The `hello` module.
    pub module: PathBuf,
}

/// One cheater's fate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheaterReport {
    /// `STELLAR_WORKER_CHEAT` it ran with.
    pub cheat: String,
    /// Its node id (hex).
    pub node: String,
    /// Whether it was quarantined during the run.
    pub quarantined: bool,
    /// Calls it answered before quarantine (all it answered if never caught).
    pub invocations: u64,
    /// Re-execution checks that disagreed with it.
    pub checks_mismatched: u64,
    /// Its receipts the gateway or the ledger refused.
    pub receipts_refused: u64,
}

/// An honest node with evidence against it, and what.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlamedNode {
    /// Its node id (hex).
    pub node: String,
    /// Whether it was quarantined during the run.
    pub quarantined: bool,
    /// Re-execution checks that disagreed with it.
    pub checks_mismatched: u64,
    /// Its refused receipts per verdict.
    pub receipts_refused: BTreeMap<String, u64>,
}

/// What was measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrustBenchReport {
    /// Honest workers.
    pub honest: usize,
    /// Cheating workers.
    pub cheaters: usize,
    /// Seconds the callers ran.
    pub elapsed_seconds: f64,
    /// Calls answered without error.
    pub calls: u64,
    /// Calls that failed (transport or function error).
    pub errors: u64,
    /// The tenant's billed executions (the ledger's count).
    pub billed_executions: u64,
    /// Re-executions billed to the platform's `checks` line (checks and tie-breaks).
    pub check_executions: u64,
    /// Check executions ÷ billed executions, fleet-wide, the whole run.
    pub reexecution_overhead: f64,
    /// The same over the second half of `seconds` (after most probations); none when the
    /// run stopped before it (`until_caught`).
    pub reexecution_overhead_second_half: Option<f64>,
    /// Caught cheaters' invocations to detection, median over every kind.
    pub invocations_to_detection_p50: u64,
    /// Their 99th percentile over every kind.
    pub invocations_to_detection_p99: u64,
    /// Per cheat kind (`caught_within_100`: the share of its cheaters caught within 100).
    pub kinds: Vec<KindReport>,
    /// Each cheater.
    pub cheater_nodes: Vec<CheaterReport>,
    /// Honest nodes quarantined at any poll.
    pub false_quarantines: usize,
    /// Honest nodes with a mismatched check or a refused receipt against them.
    pub honest_blamed: usize,
    /// Those nodes, and the evidence.
    pub blamed_nodes: Vec<BlamedNode>,
    /// Answers whose output was not the function's (a cheater's, before it was caught).
    pub wrong_outputs_delivered: u64,
    /// Receipts refused, fleet-wide.
    pub receipts_refused: u64,
    /// Micro-units billed to the tenant the `other-tenant` cheaters forge for (must be 0).
    pub billed_from_forgeries_microunits: u64,
    /// The audit's residue: usage in receipts and not in cells or the other way round.
    pub unbilled_microunits: u64,
    /// Whether the ledger's audit balanced (bills = credits + fee, cells = receipts).
    pub audit_balanced: bool,
    /// What did not add up, if anything.
    pub audit_faults: Vec<String>,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrustBenchError {
    /// Arguments that cannot make a run.
    #[error("{0}")]
    Config(String),
    /// A process or file could not be set up.
    #[error("setup: {0}")]
    Setup(String),
    /// The cluster did not get ready or stopped answering.
    #[error("cluster: {0}")]
    Cluster(String),
}

/// `bin --version`, and whether it is a build whose workers can cheat.
fn version_of(bin: &Path) -> Result<(String, bool), TrustBenchError> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| TrustBenchError::Setup(format!("{}: {e}", bin.display())))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let can_cheat = version.contains(CHEAT_BUILD_MARK);
    Ok((version, can_cheat))
}

/// Checks that `bin` is a build whose workers can cheat (not the shipped one).
fn check_cheat_build(bin: &Path) -> Result<(), TrustBenchError> {
    let (version, can_cheat) = version_of(bin)?;
    if can_cheat {
        Ok(())
    } else {
        Err(TrustBenchError::Config(format!(
            "{} ({version}) is a build whose workers cannot cheat; build one apart from the \
             shipped binary: cargo build --release -p stellar-cli --features cheat \
             --target-dir target/cheat, then pass --cheat-stellar target/cheat/release/stellar",
            bin.display(),
        )))
    }
}

/// `STELLAR_WORKER_CHEAT` for cheater `i`.
fn cheat_spec(cfg: &TrustBenchConfig, i: usize) -> String {
    let kind = &cfg.kinds[i % cfg.kinds.len()];
    match kind.as_str() {
        "inflate-fuel" | "wrong-output" => format!("{kind}:{}", cfg.cheat_rate),
        _ => kind.clone(),
    }
}

/// Validates the configuration before anything starts.
fn validate(cfg: &TrustBenchConfig) -> Result<(), TrustBenchError> {
    let bad = |m: String| Err(TrustBenchError::Config(m));
    if cfg.honest < 2 {
        return bad(
            "--honest must be at least 2: a check needs another node in good standing".into(),
        );
    }
    if cfg.concurrency == 0 || cfg.seconds == 0 {
        return bad("--concurrency and --seconds must be at least 1".into());
    }
    if !(cfg.cheat_rate > 0.0 && cfg.cheat_rate <= 1.0) {
        return bad(format!(
            "--cheat-rate {} is not a share in (0, 1]",
            cfg.cheat_rate
        ));
    }
    if cfg.kinds.is_empty() && cfg.cheaters > 0 {
        return bad(format!(
            "--kinds is empty; known: {}",
            CHEAT_KINDS.join(", ")
        ));
    }
    if let Some(k) = cfg
        .kinds
        .iter()
        .find(|k| !CHEAT_KINDS.contains(&k.as_str()))
    {
        return bad(format!(
            "unknown cheat kind `{k}`; known: {}",
            CHEAT_KINDS.join(", ")
        ));
    }
    if cfg.cheaters > 0 {
        let bin = cfg.cheat_stellar.as_deref().ok_or_else(|| {
            TrustBenchError::Config(
                "--cheaters needs --cheat-stellar PATH (or STELLAR_CHEAT_BIN): a `stellar` built \
                 with the test-only cheat feature, apart from the shipped one: cargo build \
                 --release -p stellar-cli --features cheat --target-dir target/cheat"
                    .into(),
            )
        })?;
        check_cheat_build(bin)?;
    }
    Ok(())
}

/// Counts answers per node and their outputs, shared by the callers.
#[derive(Default)]
struct Tally {
    per_node: BTreeMap<u64, u64>,
    calls: u64,
    errors: u64,
    wrong: u64,
}

/// Runs the benchmark; `log` gets progress lines.
pub fn run(
    cfg: &TrustBenchConfig,
    log: &mut dyn FnMut(&str),
) -> Result<TrustBenchReport, TrustBenchError> {
    validate(cfg)?;
    if version_of(&cfg.stellar)?.1 {
        log(&format!(
            "note: {} is a test build (its workers can cheat); the honest ones run without \
             STELLAR_WORKER_CHEAT and play fair, but measure the shipped build when you can",
            cfg.stellar.display()
        ));
    }
    let setup = |e: &dyn std::fmt::Display| TrustBenchError::Setup(e.to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| setup(&e))?;
    let _runtime = rt.enter();
    let dir = tempfile::tempdir().map_err(|e| setup(&e))?;
    log(&format!(
        "starting 1 replica, 1 gateway, {} honest worker(s) ({}) and {} cheater(s) ({})",
        cfg.honest,
        cfg.stellar.display(),
        cfg.cheaters,
        cfg.cheat_stellar
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    ));
    let mut cluster = LocalCluster::start(
        &cfg.stellar,
        dir.path(),
        &LocalClusterConfig {
            gateways: 1,
            gateway_args: vec![
                "--check-probation".into(),
                cfg.check_probation.to_string(),
                "--check-rate".into(),
                cfg.check_rate.to_string(),
            ],
            ..Default::default()
        },
    )
    .map_err(TrustBenchError::Setup)?;
    let worker_args = |zone: &str| -> Vec<String> {
        [
            "--region",
            "cn-east",
            "--zone",
            zone,
            "--cpu-millis",
            "2000",
            "--memory-mib",
            "512",
            "--containers",
            "false",
        ]
        .map(String::from)
        .to_vec()
    };
    let mut honest_dirs = Vec::new();
    for i in 0..cfg.honest {
        let args = worker_args(&format!("honest-{i}"));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        honest_dirs.push(
            cluster
                .add_worker(&cfg.stellar, &a, &[])
                .map_err(TrustBenchError::Setup)?,
        );
    }
    let mut cheater_dirs = Vec::new();
    for i in 0..cfg.cheaters {
        let spec = cheat_spec(cfg, i);
        let args = worker_args(&format!("cheat-{i}"));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let bin = cfg.cheat_stellar.as_deref().unwrap_or(&cfg.stellar);
        let d = cluster
            .add_worker(bin, &a, &[("STELLAR_WORKER_CHEAT", &spec)])
            .map_err(TrustBenchError::Setup)?;
        cheater_dirs.push((d, spec));
    }
    let admin = ClusterClient::new(std::slice::from_ref(&cluster.gateways[0]))
        .map_err(|e| setup(&e.message()))?
        .with_admin_token_from(vec![cluster.plane.clone()]);
    let total = cfg.honest + cfg.cheaters;
    rt.block_on(wait_ready(&admin, total))?;
    let node_of = |d: &Path| -> Result<u64, TrustBenchError> {
        stellar_worker::Identity::load(d)
            .map(|i| i.node())
            .map_err(|e| setup(&format!("{}: {e}", d.display())))
    };
    let honest: Vec<u64> = honest_dirs
        .iter()
        .map(|d| node_of(d))
        .collect::<Result<_, _>>()?;
    let cheaters: Vec<(u64, String)> = cheater_dirs
        .iter()
        .map(|(d, s)| node_of(d).map(|n| (n, s.clone())))
        .collect::<Result<_, _>>()?;
    rt.block_on(deploy(cfg, &admin, total))?;
    log(&format!(
        "`hello` ready on {total} node(s); {} caller(s) for {} s",
        cfg.concurrency, cfg.seconds
    ));

    let tally = Arc::new(Mutex::new(Tally::default()));
    let quarantined: Arc<Mutex<BTreeMap<u64, u64>>> = Arc::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cheater_ids: Vec<u64> = cheaters.iter().map(|(id, _)| *id).collect();
    let (half_usage, end_usage, elapsed) = rt.block_on(async {
        let start = Instant::now();
        let half = start + Duration::from_secs(cfg.seconds) / 2;
        let end = start + Duration::from_secs(cfg.seconds);
        let running = {
            let stopped = stopped.clone();
            move || Instant::now() < end && !stopped.load(std::sync::atomic::Ordering::Relaxed)
        };
        let mut callers = Vec::new();
        for c in 0..cfg.concurrency {
            let (admin, tally, running) = (admin.clone(), tally.clone(), running.clone());
            callers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while running() {
                    n += 1;
                    let name = format!("c{c}-{n}");
                    let r = admin
                        .invoke(pb::InvokeRequest {
                            tenant: TENANT.into(),
                            function: "hello".into(),
                            stdin: name.clone().into_bytes(),
                            ..Default::default()
                        })
                        .await;
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    match r {
                        Ok(r) if r.error_code.is_empty() => {
                            t.calls += 1;
                            *t.per_node.entry(r.node).or_default() += 1;
                            if r.stdout != format!("Hello, {name}!\n").as_bytes() {
                                t.wrong += 1;
                            }
                        }
                        _ => t.errors += 1,
                    }
                }
            }));
        }
        let poller = {
            let (admin, tally, quarantined) = (admin.clone(), tally.clone(), quarantined.clone());
            let (stop, stopped, running) = (stop.clone(), stopped.clone(), running.clone());
            let until_caught = cfg.until_caught;
            tokio::spawn(async move {
                while running() {
                    if let Ok(nodes) = admin.nodes().await {
                        let served = tally
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .per_node
                            .clone();
                        let mut q = quarantined.lock().unwrap_or_else(|p| p.into_inner());
                        for n in nodes
                            .iter()
                            .filter(|n| n.state == pb::NodeState::Quarantined as i32)
                        {
                            q.entry(n.id)
                                .or_insert_with(|| served.get(&n.id).copied().unwrap_or(0));
                        }
                        if until_caught && cheater_ids.iter().all(|id| q.contains_key(id)) {
                            stopped.store(true, std::sync::atomic::Ordering::Relaxed);
                            stop.notify_one();
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let half_usage = tokio::select! {
            _ = tokio::time::sleep_until(half.into()) => usage(&admin).await.ok(),
            _ = stop.notified() => None,
        };
        for c in callers {
            let _ = c.await;
        }
        let elapsed = start.elapsed();
        let _ = poller.await;
        // Let the last receipts and check outcomes reach the ledger (usage is flushed in
        // batches) before reading it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        (half_usage, usage(&admin).await, elapsed)
    });
    let end_usage = end_usage?;
    let nodes = rt
        .block_on(admin.nodes())
        .map_err(|e| TrustBenchError::Cluster(e.message().to_string()))?;
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    let quarantined = std::mem::take(&mut *quarantined.lock().unwrap_or_else(|p| p.into_inner()));
    drop(cluster);
    Ok(report(
        cfg,
        &honest,
        &cheaters,
        &nodes,
        &tally,
        &quarantined,
        half_usage.as_ref(),
        &end_usage,
        elapsed,
    ))
}

/// The tenant the bench deploys to.
const TENANT: &str = "trust-bench";

async fn wait_ready(admin: &ClusterClient, want: usize) -> Result<(), TrustBenchError> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = admin
            .nodes()
            .await
            .map(|n| {
                n.iter()
                    .filter(|n| n.state == pb::NodeState::Ready as i32)
                    .count()
            })
            .unwrap_or(0);
        if ready >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TrustBenchError::Cluster(format!(
                "{ready} of {want} workers ready after 90 s; their logs are in the run's temp dir"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deploys `hello` with one instance per node and waits until every instance is ready.
async fn deploy(
    cfg: &TrustBenchConfig,
    admin: &ClusterClient,
    replicas: usize,
) -> Result<(), TrustBenchError> {
    let fail = |e: &dyn std::fmt::Display| TrustBenchError::Cluster(e.to_string());
    let module = std::fs::read(&cfg.module)
        .map_err(|e| TrustBenchError::Setup(format!("{}: {e}", cfg.module.display())))?;
    admin
        .create_tenant(TENANT)
        .await
        .map_err(|e| fail(&e.message()))?;
    admin
        .deploy(pb::DeployRequest {
            tenant: TENANT.into(),
            name: "hello".into(),
            module,
            replicas: replicas as u32,
            limits: Some(pb::FunctionLimits {
                cpu_millis: 100,
                memory_mib: 32,
                timeout_ms: 5000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| fail(&e.message()))?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = admin
            .call(|mut c| async move {
                c.get_function(pb::GetFunctionRequest {
                    tenant: TENANT.into(),
                    name: "hello".into(),
                    ..Default::default()
                })
                .await
            })
            .await
            .map(|f| f.ready.len())
            .unwrap_or(0);
        if ready >= replicas {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(fail(&format!(
                "{ready} of {replicas} instances of `hello` ready after 90 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn usage(admin: &ClusterClient) -> Result<pb::GetUsageResponse, TrustBenchError> {
    admin
        .call(|mut c| async move {
            c.get_usage(pb::GetUsageRequest {
                cells: true,
                ..Default::default()
            })
            .await
        })
        .await
        .map_err(|e| TrustBenchError::Cluster(format!("GetUsage: {}", e.message())))
}

/// (tenant executions, check executions) in a usage answer.
fn executions(u: &pb::GetUsageResponse) -> (u64, u64) {
    let of = |tenant: &str, function: &str| {
        u.bill
            .iter()
            .filter(|l| l.tenant == tenant && l.function == function)
            .map(|l| l.invocations)
            .sum::<u64>()
    };
    (
        of(TENANT, "hello"),
        of("", stellar_scheduler::state::CHECKS_FUNCTION),
    )
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[allow(clippy::too_many_arguments)]
fn report(
    cfg: &TrustBenchConfig,
    honest: &[u64],
    cheaters: &[(u64, String)],
    nodes: &[pb::NodeInfo],
    tally: &Tally,
    quarantined: &BTreeMap<u64, u64>,
    half: Option<&pb::GetUsageResponse>,
    end: &pb::GetUsageResponse,
    elapsed: Duration,
) -> TrustBenchReport {
    let info = |id: u64| nodes.iter().find(|n| n.id == id);
    let refused = |n: &pb::NodeInfo| n.receipts_refused.iter().sum::<u64>();
    let blamed_nodes: Vec<BlamedNode> = honest
        .iter()
        .filter_map(|h| info(*h))
        .filter(|n| n.checks_mismatched > 0 || refused(n) > 0)
        .map(|n| BlamedNode {
            node: format!("{:016x}", n.id),
            quarantined: quarantined.contains_key(&n.id),
            checks_mismatched: n.checks_mismatched,
            receipts_refused: n
                .receipts_refused
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(v, c)| {
                    let name = i32::try_from(v)
                        .ok()
                        .and_then(|v| pb::ReceiptVerdict::try_from(v).ok())
                        .map_or_else(|| v.to_string(), |v| v.as_str_name().to_string());
                    (name, *c)
                })
                .collect(),
        })
        .collect();
    let cheater_nodes: Vec<CheaterReport> = cheaters
        .iter()
        .map(|(id, cheat)| {
            let n = info(*id);
            CheaterReport {
                cheat: cheat.clone(),
                node: format!("{id:016x}"),
                quarantined: quarantined.contains_key(id),
                invocations: quarantined
                    .get(id)
                    .copied()
                    .unwrap_or_else(|| tally.per_node.get(id).copied().unwrap_or(0)),
                checks_mismatched: n.map_or(0, |n| n.checks_mismatched),
                receipts_refused: n.map_or(0, refused),
            }
        })
        .collect();
    let mut kinds = Vec::new();
    let mut all = Vec::new();
    for kind in &cfg.kinds {
        let of_kind: Vec<&CheaterReport> = cheater_nodes
            .iter()
            .filter(|c| c.cheat.split(':').next() == Some(kind.as_str()))
            .collect();
        if of_kind.is_empty() {
            continue;
        }
        let mut caught: Vec<u64> = of_kind
            .iter()
            .filter(|c| c.quarantined)
            .map(|c| c.invocations)
            .collect();
        caught.sort_unstable();
        all.extend_from_slice(&caught);
        kinds.push(KindReport {
            kind: of_kind[0].cheat.clone(),
            cheaters: of_kind.len(),
            caught: caught.len(),
            invocations_to_detection_p50: percentile(&caught, 0.5),
            invocations_to_detection_p99: percentile(&caught, 0.99),
            caught_within_100: ratio(
                caught.iter().filter(|&&c| c <= 100).count() as u64,
                of_kind.len() as u64,
            ),
        });
    }
    all.sort_unstable();
    let (billed, checks) = executions(end);
    let second_half = half.map(executions).map(|(billed_half, checks_half)| {
        ratio(
            checks.saturating_sub(checks_half),
            billed.saturating_sub(billed_half),
        )
    });
    let audit = stellar_scheduler::usage_audit::audit(end);
    TrustBenchReport {
        honest: cfg.honest,
        cheaters: cfg.cheaters,
        elapsed_seconds: elapsed.as_secs_f64(),
        calls: tally.calls,
        errors: tally.errors,
        billed_executions: billed,
        check_executions: checks,
        reexecution_overhead: ratio(checks, billed),
        reexecution_overhead_second_half: second_half,
        invocations_to_detection_p50: percentile(&all, 0.5),
        invocations_to_detection_p99: percentile(&all, 0.99),
        kinds,
        cheater_nodes,
        false_quarantines: honest
            .iter()
            .filter(|h| quarantined.contains_key(h))
            .count(),
        honest_blamed: blamed_nodes.len(),
        blamed_nodes,
        wrong_outputs_delivered: tally.wrong,
        receipts_refused: nodes.iter().map(refused).sum(),
        billed_from_forgeries_microunits: end
            .bill
            .iter()
            .filter(|l| l.tenant == VICTIM_TENANT)
            .map(|l| l.cost_micros)
            .sum(),
        unbilled_microunits: audit.unbilled_micros,
        audit_balanced: audit.balanced(),
        audit_faults: audit.faults,
    }
}
