//! `edge-bench`: what the edge tier costs at fleet scale. It starts 3 control-plane replicas
//! and G gateways from the shipped `stellar` binary, attaches N simulated workers to the
//! gateways (this binary's hidden `sim-workers` role, a few thousand real gRPC streams per
//! process, keepalives at the production interval, usage reports kept until acknowledged),
//! and follows the committed node states through a follower's `Edge.Watch`.
//!
//! ```text
//!  ramp: N registrations ─▶ gateways ─batched joins─▶ leader ─▶ watch: N ready
//!  steady (S s): CPU and RSS of the leader and the gateways, committed transitions/s
//!  kill K worker connections ─▶ gateway ─hold─▶ report ─▶ committed DOWN   (detect p50/p99)
//!  silence K workers (no FIN) ─▶ gateway keepalive timeout ─▶ DOWN          (detect p50/p99)
//!  kill -9 one gateway ─▶ its workers re-attach elsewhere ─▶ committed moved (or DOWN) (p99)
//!  stop usage ─▶ every receipt settled, none billed? (simulated workers run nothing, so
//!                their tickets are forgeries: the refusal path at scale)  (billed_unissued)
//! ```

#![allow(clippy::disallowed_methods)] // a benchmark's timers and timestamps read the clock

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;

use crate::procs::{ReplicaProcesses, cpu_seconds, free_ports, rss_bytes};
use crate::wasmbench::KillOnDrop;

/// What to run.
#[derive(Debug, Clone)]
pub struct EdgeBenchConfig {
    /// Simulated workers.
    pub workers: usize,
    /// Gateways.
    pub gateways: usize,
    /// Seconds of the steady-state window.
    pub seconds: u64,
    /// Workers whose connections are killed for the detection measurement.
    pub kill_workers: usize,
    /// Workers that go silent (no FIN) for the keepalive-timeout measurement.
    pub silence_workers: usize,
    /// Kill a gateway (needs at least two).
    pub kill_gateway: bool,
    /// Usage records per second over the whole fleet.
    pub usage_per_sec: f64,
    /// Simulated workers per process.
    pub per_process: usize,
    /// Registrations per second over all processes while ramping up.
    pub ramp_per_sec: f64,
    /// Workers sharing one HTTP/2 connection (1: one each, as real devices).
    pub streams_per_connection: usize,
    /// The shipped `stellar` binary (replicas and gateways).
    pub stellar: PathBuf,
    /// This binary (its `sim-workers` role).
    pub exe: PathBuf,
}

/// What was measured (`--json` prints it).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EdgeBenchReport {
    /// Simulated workers attached.
    pub workers: usize,
    /// Gateways.
    pub gateways: usize,
    /// Seconds of the steady-state window.
    pub seconds: u64,
    /// The leader's CPU in the steady window, percent of one core.
    pub leader_cpu_pct: f64,
    /// The leader's CPU while the fleet registered, percent of one core.
    pub leader_cpu_pct_ramp: f64,
    /// The leader's resident memory after the steady window.
    pub leader_rss_bytes: u64,
    /// The followers' mean CPU in the steady window, percent of one core.
    pub follower_cpu_pct: f64,
    /// All gateways' CPU in the steady window per 10,000 attached workers, percent of a core.
    pub gateway_cpu_pct_per_10k_workers: f64,
    /// All gateways' resident memory per 10,000 attached workers.
    pub gateway_rss_bytes_per_10k_workers: u64,
    /// The simulated workers' CPU in the steady window per 10,000, percent of a core.
    pub sim_cpu_pct_per_10k_workers: f64,
    /// Seconds from the first registration until every worker was committed ready.
    pub ramp_seconds: f64,
    /// Killed worker connections measured.
    pub detect_worker_count: usize,
    /// From a worker's connection killed to its node committed down (seen by a follower), ms.
    pub detect_worker_p50_ms: f64,
    /// Its 99th percentile.
    pub detect_worker_p99_ms: f64,
    /// Silent workers (no FIN) measured.
    pub detect_silent_count: usize,
    /// From a worker gone silent to its node committed down, ms (keepalive timeout + hold).
    pub detect_silent_worker_p50_ms: f64,
    /// Its 99th percentile.
    pub detect_silent_worker_p99_ms: f64,
    /// Nodes the killed gateway held.
    pub gateway_nodes: usize,
    /// Of them, committed on another gateway.
    pub gateway_nodes_reattached: usize,
    /// Of them, committed down.
    pub gateway_nodes_down: usize,
    /// Of them, neither within the wait.
    pub gateway_nodes_unresolved: usize,
    /// From `kill -9` of a gateway to each of its nodes committed elsewhere or down, median ms.
    pub detect_gateway_p50_ms: f64,
    /// Its 99th percentile.
    pub detect_gateway_p99_ms: f64,
    /// Node transitions committed per second in the steady window.
    pub committed_node_transitions_per_sec: f64,
    /// The most node transitions committed in one second of the run.
    pub peak_committed_node_transitions_per_sec: u64,
    /// Receipts the simulated workers sent (unique; their tickets were never issued).
    pub usage_sent: u64,
    /// Of them, settled (refused for good) and acknowledged to the workers.
    pub usage_acknowledged: u64,
    /// Invocations the ledger holds for the bench's function.
    pub usage_recorded: u64,
    /// Of them, billed from receipts without an issued ticket (must be 0).
    pub billed_unissued: u64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum EdgeBenchError {
    /// A process or file could not be set up.
    #[error("setup: {0}")]
    Setup(String),
    /// The cluster did not get where it had to.
    #[error("cluster: {0}")]
    Cluster(String),
}

fn setup(e: impl std::fmt::Display) -> EdgeBenchError {
    EdgeBenchError::Setup(e.to_string())
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// One committed node change as the watch delivered it.
#[derive(Debug, Clone)]
struct NodeEvent {
    node: u64,
    state: i32,
    gateway: Arc<str>,
    at_ms: u128,
}

/// The committed node states, as a follower's watch shows them.
#[derive(Default)]
struct Watched {
    nodes: HashMap<u64, (i32, Arc<str>)>,
    events: Vec<NodeEvent>,
    /// Node changes per second of arrival (after the first reset completed).
    per_second: HashMap<u64, u64>,
    loaded: bool,
}

impl Watched {
    fn ready_on_gateways(&self) -> usize {
        let ready = pb::NodeState::Ready as i32;
        self.nodes
            .values()
            .filter(|(s, g)| *s == ready && !g.is_empty())
            .count()
    }
}

async fn watch(client: ClusterClient, replicas: Vec<String>, w: Arc<Mutex<Watched>>) {
    let mut from = 0u64;
    let mut i = 0usize;
    let mut gateways: HashMap<String, Arc<str>> = HashMap::new();
    loop {
        let target = &replicas[i % replicas.len()];
        i += 1;
        let stream = match client.edge_for(target) {
            Ok(mut e) => e.watch(pb::WatchRequest { from_index: from }).await,
            Err(s) => Err(s),
        };
        if let Ok(stream) = stream {
            let mut stream = stream.into_inner();
            while let Ok(Some(ev)) = stream.message().await {
                let at_ms = unix_ms();
                let Ok(mut w) = w.lock() else { return };
                if ev.reset {
                    w.nodes.clear();
                }
                for n in ev.nodes {
                    let g = gateways
                        .entry(n.gateway.clone())
                        .or_insert_with(|| Arc::from(n.gateway.as_str()))
                        .clone();
                    w.nodes.insert(n.id, (n.state, g.clone()));
                    if w.loaded {
                        *w.per_second.entry((at_ms / 1000) as u64).or_default() += 1;
                    }
                    w.events.push(NodeEvent {
                        node: n.id,
                        state: n.state,
                        gateway: g,
                        at_ms,
                    });
                }
                if !ev.more {
                    w.loaded = true;
                }
                from = ev.applied_index;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The simulated-worker processes and what they said.
struct Sims {
    procs: Vec<KillOnDrop>,
    stdins: Vec<ChildStdin>,
    killed: Arc<Mutex<HashMap<u64, u128>>>,
    silenced: Arc<Mutex<HashMap<u64, u128>>>,
    stats: Arc<Mutex<HashMap<usize, serde_json::Value>>>,
}

impl Sims {
    fn send(&mut self, i: usize, line: &str) {
        if let Some(s) = self.stdins.get_mut(i) {
            let _ = writeln!(s, "{line}");
            let _ = s.flush();
        }
    }

    fn broadcast(&mut self, line: &str) {
        for i in 0..self.stdins.len() {
            self.send(i, line);
        }
    }

    /// Sum of one stats field over every process's last report.
    fn stat(&self, field: &str) -> u64 {
        self.stats.lock().map_or(0, |s| {
            s.values()
                .map(|v| v.get(field).and_then(|x| x.as_u64()).unwrap_or(0))
                .sum()
        })
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.0.id()).collect()
    }
}

fn spawn_sims(
    cfg: &EdgeBenchConfig,
    gateways: &[String],
    join_token: &str,
    tenant: &str,
    dir: &std::path::Path,
) -> Result<Sims, EdgeBenchError> {
    let n_procs = cfg.workers.div_ceil(cfg.per_process.max(1));
    let mut sims = Sims {
        procs: Vec::new(),
        stdins: Vec::new(),
        killed: Arc::default(),
        silenced: Arc::default(),
        stats: Arc::default(),
    };
    for p in 0..n_procs {
        let first = p * cfg.per_process;
        let count = cfg.per_process.min(cfg.workers - first);
        let log = std::fs::File::create(dir.join(format!("sim-{p}.log"))).map_err(setup)?;
        let mut child = Command::new(&cfg.exe)
            .args([
                "sim-workers",
                "--gateways",
                &gateways.join(","),
                "--count",
                &count.to_string(),
                "--first",
                &first.to_string(),
                "--seed",
                "1",
                "--tenant",
                tenant,
                "--function",
                "meter",
                "--usage-per-sec",
                &(cfg.usage_per_sec / n_procs as f64).to_string(),
                "--ramp-per-sec",
                &(cfg.ramp_per_sec / n_procs as f64).to_string(),
                "--streams-per-connection",
                &cfg.streams_per_connection.to_string(),
            ])
            .env("STELLAR_JOIN_TOKEN", join_token)
            .env("TOKIO_WORKER_THREADS", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| setup(format!("{}: {e}", cfg.exe.display())))?;
        let stdout = child.stdout.take().ok_or_else(|| setup("no stdout"))?;
        let stdin = child.stdin.take().ok_or_else(|| setup("no stdin"))?;
        let (killed, silenced, stats) = (
            sims.killed.clone(),
            sims.silenced.clone(),
            sims.stats.clone(),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.splitn(3, ' ');
                let (kind, a, b) = (parts.next(), parts.next(), parts.next());
                let pair = || -> Option<(u64, u128)> { Some((a?.parse().ok()?, b?.parse().ok()?)) };
                match kind {
                    Some("killed") => {
                        if let (Some((n, t)), Ok(mut k)) = (pair(), killed.lock()) {
                            k.insert(n, t);
                        }
                    }
                    Some("silenced") => {
                        if let (Some((n, t)), Ok(mut k)) = (pair(), silenced.lock()) {
                            k.insert(n, t);
                        }
                    }
                    Some("stats") => {
                        let json = line.trim_start_matches("stats ");
                        if let (Ok(v), Ok(mut s)) = (serde_json::from_str(json), stats.lock()) {
                            s.insert(p, v);
                        }
                    }
                    _ => {}
                }
            }
        });
        sims.procs.push(KillOnDrop(child));
        sims.stdins.push(stdin);
    }
    Ok(sims)
}

/// Percentile of unsorted samples (ms).
fn pct(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[i.min(samples.len() - 1)]
}

/// Raises this process's open-file limit (children inherit it): a gateway holds a socket per
/// worker.
fn raise_nofile() -> Result<u64, EdgeBenchError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(setup)?;
    let want: u64 = 1 << 20;
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(setup)?;
    Ok(hard)
}

/// Waits until `done` holds for the watched state, or `limit` passes; logs progress.
async fn wait_for(
    w: &Arc<Mutex<Watched>>,
    limit: Duration,
    what: &str,
    log: &mut dyn FnMut(&str),
    mut done: impl FnMut(&Watched) -> (bool, String),
) -> bool {
    let start = Instant::now();
    let mut said = Instant::now();
    loop {
        let (ok, progress) = w.lock().map_or((false, String::new()), |w| done(&w));
        if ok {
            return true;
        }
        if start.elapsed() > limit {
            log(&format!(
                "{what}: gave up after {} s ({progress})",
                limit.as_secs()
            ));
            return false;
        }
        if said.elapsed() > Duration::from_secs(10) {
            said = Instant::now();
            log(&format!("{what}: {progress}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Detection times (ms) of `targets` (node → the moment it was cut off): the first committed
/// event after it that `resolved` accepts.
fn detections(
    w: &Watched,
    targets: &HashMap<u64, u128>,
    resolved: impl Fn(&NodeEvent) -> bool,
) -> HashMap<u64, (f64, i32)> {
    let mut out = HashMap::new();
    for e in &w.events {
        if let Some(&t) = targets.get(&e.node)
            && e.at_ms >= t
            && !out.contains_key(&e.node)
            && resolved(e)
        {
            out.insert(e.node, ((e.at_ms - t) as f64, e.state));
        }
    }
    out
}

/// Cuts `k` workers off (`how`: `kill` drops their connections, `silence` stops their
/// keepalives) spread over the simulator processes, and waits until each is committed down:
/// how many were, and the p50 and p99 of the time it took, ms.
async fn cut_off(
    sims: &mut Sims,
    watched: &Arc<Mutex<Watched>>,
    how: &str,
    k: usize,
    log: &mut dyn FnMut(&str),
) -> (usize, f64, f64) {
    let down = pb::NodeState::Down as i32;
    let n = sims.stdins.len();
    for i in 0..n {
        sims.send(i, &format!("{how} {}", k / n + usize::from(i < k % n)));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = if how == "kill" {
        &sims.killed
    } else {
        &sims.silenced
    };
    let targets = events.lock().map(|k| k.clone()).unwrap_or_default();
    log(&format!("{how}: {} workers cut off", targets.len()));
    wait_for(watched, Duration::from_secs(120), how, log, |w| {
        let d = detections(w, &targets, |e| e.state == down).len();
        (d >= targets.len(), format!("{d} of {} down", targets.len()))
    })
    .await;
    let mut ms: Vec<f64> = watched.lock().map_or(Vec::new(), |w| {
        detections(&w, &targets, |e| e.state == down)
            .values()
            .map(|v| v.0)
            .collect()
    });
    let (p50, p99) = (pct(&mut ms, 0.5), pct(&mut ms, 0.99));
    log(&format!(
        "{how}: {} of {} committed down, p50 {p50:.0} ms, p99 {p99:.0} ms",
        ms.len(),
        targets.len()
    ));
    (ms.len(), p50, p99)
}

/// Runs the benchmark; `log` gets progress lines.
pub fn run(
    cfg: &EdgeBenchConfig,
    log: &mut dyn FnMut(&str),
) -> Result<EdgeBenchReport, EdgeBenchError> {
    if !cfg.stellar.is_file() {
        return Err(setup(format!(
            "the `stellar` binary is not at {} (build it: cargo build --release -p stellar-cli, \
             or pass --stellar PATH)",
            cfg.stellar.display()
        )));
    }
    let nofile = raise_nofile()?;
    let per_gateway = cfg.workers / cfg.gateways.max(1) / cfg.streams_per_connection.max(1);
    if (nofile as usize) < per_gateway + 1000 {
        return Err(setup(format!(
            "the open-file limit is {nofile}: too low for {per_gateway} worker connections per \
             gateway (use more --gateways or --streams-per-connection)"
        )));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(setup)?;
    let dir = tempfile::tempdir().map_err(setup)?;
    log(&format!("data and logs in {}", dir.path().display()));
    let mut replicas = ReplicaProcesses::start(
        &dir.path().join("plane"),
        &cfg.stellar,
        &["scheduler"],
        3,
        &[],
    )
    .map_err(setup)?;
    let _runtime = rt.enter();
    let result = rt.block_on(measure(cfg, &mut replicas, dir.path(), log));
    if result.is_err() {
        // Keep the logs of a failed run for a look.
        let kept = dir.keep();
        log(&format!("logs kept in {}", kept.display()));
    }
    result
}

async fn measure(
    cfg: &EdgeBenchConfig,
    replicas: &mut ReplicaProcesses,
    dir: &std::path::Path,
    log: &mut dyn FnMut(&str),
) -> Result<EdgeBenchReport, EdgeBenchError> {
    let cluster = |e: &dyn std::fmt::Display| EdgeBenchError::Cluster(e.to_string());
    let leader = replicas
        .wait_leader(1500)
        .await
        .ok_or_else(|| cluster(&"no leader within 30 s"))?;
    let admin = {
        let mut token = None;
        for _ in 0..750 {
            token = (1..=3)
                .find_map(|id| stellar_proto::tokens::read_admin_token(&replicas.data_dir(id)));
            if token.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        token.ok_or_else(|| cluster(&"no admin token written within 15 s"))?
    };
    let join_token = stellar_proto::tokens::new_token().map_err(setup)?;
    let ports = free_ports(cfg.gateways).map_err(setup)?;
    let gw_addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let control = replicas.addresses.join(",");
    let mut gateways = Vec::new();
    for (i, addr) in gw_addrs.iter().enumerate() {
        let log = std::fs::File::create(dir.join(format!("gateway-{i}.log"))).map_err(setup)?;
        let child = Command::new(&cfg.stellar)
            .args([
                "gateway",
                "--control",
                &control,
                "--listen",
                addr,
                "--http-listen",
                "off",
            ])
            .env("STELLAR_GATEWAY_TOKEN", &admin)
            .env("STELLAR_JOIN_TOKEN", &join_token)
            .env(
                "STELLAR_LOG",
                std::env::var("STELLAR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(setup)?;
        gateways.push(Some(KillOnDrop(child)));
    }
    let client = ClusterClient::new(&replicas.addresses)
        .map_err(|s| setup(s.message()))?
        .with_token(&admin);
    let tenant = "edge-bench";
    client
        .create_tenant(tenant)
        .await
        .map_err(|s| cluster(&s.message()))?;
    let wasm = std::fs::read(crate::wasmbench::default_module()).map_err(setup)?;
    client
        .deploy(pb::DeployRequest {
            request_id: b"edge-bench-meter".to_vec(),
            name: "meter".into(),
            module: wasm,
            tenant: tenant.into(),
            replicas: 0,
            limits: Some(pb::FunctionLimits {
                cpu_millis: 10,
                memory_mib: 16,
                timeout_ms: 1000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map_err(|s| cluster(&format!("deploy: {}", s.message())))?;
    // The bench watches a follower, so observing costs the leader nothing.
    let followers: Vec<String> = (1..=3u64)
        .filter(|&id| id != leader)
        .map(|id| replicas.addresses[(id - 1) as usize].clone())
        .collect();
    let watched = Arc::new(Mutex::new(Watched::default()));
    tokio::spawn(watch(client.clone(), followers, watched.clone()));

    let leader_pid = replicas
        .pid(leader)
        .ok_or_else(|| cluster(&"leader gone"))?;
    let follower_pids: Vec<u32> = (1..=3u64)
        .filter(|&id| id != leader)
        .filter_map(|id| replicas.pid(id))
        .collect();
    let cpu = |p: u32| cpu_seconds(Some(p)).unwrap_or(0.0);
    let ramp_cpu0 = cpu(leader_pid);
    let ramp_start = Instant::now();
    log(&format!(
        "3 replicas (leader {leader}), {} gateways; attaching {} simulated workers ({} per process, {:.0}/s)",
        cfg.gateways, cfg.workers, cfg.per_process, cfg.ramp_per_sec
    ));
    let mut sims = spawn_sims(cfg, &gw_addrs, &join_token, tenant, dir)?;
    let want = cfg.workers;
    let ramp_limit = Duration::from_secs_f64(want as f64 / cfg.ramp_per_sec.max(1.0) + 180.0);
    let ramp_deadline = Instant::now() + ramp_limit;
    loop {
        sims.broadcast("stats");
        let attached = wait_for(
            &watched,
            Duration::from_secs(10),
            "ramp",
            &mut |_| {},
            |w| {
                let n = w.ready_on_gateways();
                (n >= want, String::new())
            },
        )
        .await;
        if attached {
            break;
        }
        let (n, known, ready_any) = watched.lock().map_or((0, 0, 0), |w| {
            let ready = pb::NodeState::Ready as i32;
            (
                w.ready_on_gateways(),
                w.nodes.len(),
                w.nodes.values().filter(|(s, _)| *s == ready).count(),
            )
        });
        let listed = client
            .call(|mut c| async move {
                c.list_nodes(pb::ListNodesRequest {
                    state: pb::NodeState::Ready as i32,
                    ..Default::default()
                })
                .await
            })
            .await
            .map_or(0, |r| r.total);
        log(&format!(
            "ramp: {n} of {want} committed ready ({known} nodes watched, {ready_any} ready, the leader lists {listed} ready); the workers say {} attached, {} registrations, {} reconnects, {} redirects, {} refused",
            sims.stat("attached"),
            sims.stat("registrations"),
            sims.stat("reconnects"),
            sims.stat("redirects"),
            sims.stat("refused")
        ));
        if Instant::now() > ramp_deadline {
            return Err(cluster(&"the fleet did not attach"));
        }
    }
    let ramp_seconds = ramp_start.elapsed().as_secs_f64();
    let leader_cpu_pct_ramp = (cpu(leader_pid) - ramp_cpu0) / ramp_seconds * 100.0;
    log(&format!(
        "{want} workers committed ready in {ramp_seconds:.1} s (leader {leader_cpu_pct_ramp:.1}% of a core meanwhile); settling"
    ));
    tokio::time::sleep(Duration::from_secs(cfg.seconds.min(10))).await;

    // Steady state.
    let gw_pids: Vec<u32> = gateways.iter().flatten().map(|g| g.0.id()).collect();
    let sim_pids = sims.pids();
    let sum = |pids: &[u32]| pids.iter().map(|&p| cpu(p)).sum::<f64>();
    let (l0, f0, g0, s0) = (
        cpu(leader_pid),
        sum(&follower_pids),
        sum(&gw_pids),
        sum(&sim_pids),
    );
    let t0 = Instant::now();
    let second0 = unix_ms() / 1000;
    log(&format!("steady state for {} s", cfg.seconds));
    tokio::time::sleep(Duration::from_secs(cfg.seconds)).await;
    let window = t0.elapsed().as_secs_f64();
    let second1 = unix_ms() / 1000;
    let cpu_pct = |a: f64, b: f64| (b - a) / window * 100.0;
    let per10k = want as f64 / 10_000.0;
    let mut r = EdgeBenchReport {
        workers: want,
        gateways: cfg.gateways,
        seconds: cfg.seconds,
        leader_cpu_pct: cpu_pct(l0, cpu(leader_pid)),
        leader_cpu_pct_ramp,
        leader_rss_bytes: rss_bytes(leader_pid).map_or(0, |r| r.0),
        follower_cpu_pct: cpu_pct(f0, sum(&follower_pids)) / follower_pids.len().max(1) as f64,
        gateway_cpu_pct_per_10k_workers: cpu_pct(g0, sum(&gw_pids)) / per10k,
        gateway_rss_bytes_per_10k_workers: (gw_pids
            .iter()
            .filter_map(|&p| rss_bytes(p))
            .map(|r| r.0)
            .sum::<u64>() as f64
            / per10k) as u64,
        sim_cpu_pct_per_10k_workers: cpu_pct(s0, sum(&sim_pids)) / per10k,
        ramp_seconds,
        ..Default::default()
    };
    if let Ok(w) = watched.lock() {
        let in_window: u64 = (second0..second1)
            .map(|s| w.per_second.get(&(s as u64)).copied().unwrap_or(0))
            .sum();
        r.committed_node_transitions_per_sec = in_window as f64 / window;
    }
    log(&format!(
        "steady: leader {:.2}% of a core, {} MiB; gateways {:.2}% and {} MiB per 10k workers",
        r.leader_cpu_pct,
        r.leader_rss_bytes >> 20,
        r.gateway_cpu_pct_per_10k_workers,
        r.gateway_rss_bytes_per_10k_workers >> 20
    ));

    // Killed worker connections, then silent workers.
    let down = pb::NodeState::Down as i32;
    if cfg.kill_workers > 0 {
        let (n, p50, p99) = cut_off(&mut sims, &watched, "kill", cfg.kill_workers, log).await;
        (
            r.detect_worker_count,
            r.detect_worker_p50_ms,
            r.detect_worker_p99_ms,
        ) = (n, p50, p99);
    }
    if cfg.silence_workers > 0 {
        let (n, p50, p99) = cut_off(&mut sims, &watched, "silence", cfg.silence_workers, log).await;
        (
            r.detect_silent_count,
            r.detect_silent_worker_p50_ms,
            r.detect_silent_worker_p99_ms,
        ) = (n, p50, p99);
    }
    if cfg.kill_gateway && cfg.gateways >= 2 {
        let victim = gw_addrs[0].clone();
        let ready = pb::NodeState::Ready as i32;
        let held: HashSet<u64> = watched.lock().map_or(HashSet::new(), |w| {
            w.nodes
                .iter()
                .filter(|(_, (s, g))| *s == ready && &**g == victim.as_str())
                .map(|(n, _)| *n)
                .collect()
        });
        let at = unix_ms();
        gateways[0] = None; // kill -9 and reap
        let targets: HashMap<u64, u128> = held.iter().map(|&n| (n, at)).collect();
        log(&format!(
            "killed gateway {victim} (-9) holding {} nodes",
            targets.len()
        ));
        let elsewhere =
            |e: &NodeEvent| e.state == down || (e.state == ready && &*e.gateway != victim.as_str());
        wait_for(
            &watched,
            Duration::from_secs(180),
            "gateway kill",
            log,
            |w| {
                let d = detections(w, &targets, elsewhere).len();
                (
                    d >= targets.len(),
                    format!("{d} of {} re-attached or down", targets.len()),
                )
            },
        )
        .await;
        let found = watched
            .lock()
            .map_or(HashMap::new(), |w| detections(&w, &targets, elsewhere));
        let mut ms: Vec<f64> = found.values().map(|v| v.0).collect();
        r.gateway_nodes = targets.len();
        r.gateway_nodes_down = found.values().filter(|v| v.1 == down).count();
        r.gateway_nodes_reattached = found.len() - r.gateway_nodes_down;
        r.gateway_nodes_unresolved = targets.len() - found.len();
        r.detect_gateway_p50_ms = pct(&mut ms, 0.5);
        r.detect_gateway_p99_ms = pct(&mut ms, 0.99);
        log(&format!(
            "gateway kill: {} re-attached, {} down, {} unresolved; p50 {:.0} ms, p99 {:.0} ms",
            r.gateway_nodes_reattached,
            r.gateway_nodes_down,
            r.gateway_nodes_unresolved,
            r.detect_gateway_p50_ms,
            r.detect_gateway_p99_ms
        ));
    }
    if let Ok(w) = watched.lock() {
        r.peak_committed_node_transitions_per_sec =
            w.per_second.values().copied().max().unwrap_or(0);
    }

    // Usage: stop new receipts, let the outstanding ones be settled, then count.
    sims.broadcast("stop-usage");
    let mut last = (u64::MAX, Instant::now());
    let settle = Instant::now();
    loop {
        sims.broadcast("stats");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let unacked = sims.stat("usage_unacked");
        if unacked != last.0 {
            last = (unacked, Instant::now());
        }
        if unacked == 0
            || last.1.elapsed() > Duration::from_secs(8)
            || settle.elapsed() > Duration::from_secs(90)
        {
            break;
        }
    }
    r.usage_sent = sims.stat("usage_sent");
    r.usage_acknowledged = sims.stat("usage_acked");
    let usage = client
        .call(|mut c| async move {
            c.get_usage(pb::GetUsageRequest {
                tenant: tenant.into(),
                ..Default::default()
            })
            .await
        })
        .await
        .map_err(|s| cluster(&format!("usage: {}", s.message())))?;
    r.usage_recorded = usage
        .bill
        .iter()
        .filter(|l| l.function == "meter")
        .map(|l| l.invocations)
        .sum();
    r.billed_unissued = r.usage_recorded;
    log(&format!(
        "usage: {} forged receipts sent, {} settled as refused, {} billed",
        r.usage_sent, r.usage_acknowledged, r.billed_unissued
    ));
    drop(sims);
    drop(gateways);
    Ok(r)
}
