//! `raft-bench`: the control plane's commit path measured on real processes.
//!
//! ```text
//!  throughput: 3 replica processes (fsync on) ◀── N proposers: Allocate (plan on the leader,
//!              commit, apply, answer) ── then the same N proposers against 3 etcd members
//!              (etcd-client put per allocation), same machine, same run
//!  failover:   light write load; kill -9 the leader K times; time from kill to the first
//!              committed write; every acknowledged allocation checked at the end
//!  registry:   one replica; register N nodes; resident memory of the replica process
//! ```

// Benchmark timers read the wall clock by design.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;
use tokio::sync::Mutex;

#[cfg(feature = "etcd")]
use crate::procs::EtcdCluster;
use crate::procs::{ReplicaProcesses, rss_bytes};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What was being started.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The cluster did not become ready.
    #[error("{0}")]
    NotReady(String),
    /// A setup call failed.
    #[error("{what}: {status}")]
    Rpc {
        /// The call.
        what: String,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// etcd failed.
    #[error("etcd: {0}")]
    Etcd(String),
}

type Result<T> = std::result::Result<T, BenchError>;

/// How the benchmark runs.
#[derive(Debug, Clone)]
pub struct RaftBenchConfig {
    /// Replicas (3 or 5).
    pub replicas: usize,
    /// Measured seconds per system.
    pub seconds: u64,
    /// Concurrent proposers.
    pub proposers: usize,
    /// Nodes registered before measuring (allocations need room).
    pub nodes: usize,
    /// Skip the etcd side.
    pub skip_etcd: bool,
    /// Where data dirs and logs go (on the disk being measured).
    pub dir: PathBuf,
    /// The binary that runs a replica, and its leading arguments.
    pub replica_command: (PathBuf, Vec<String>),
    /// Use one unary `Allocate` call per allocation instead of `AllocateStream`.
    pub unary: bool,
}

/// Throughput mode's result (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputReport {
    /// Replicas in the cluster.
    pub replicas: usize,
    /// Measured seconds.
    pub seconds: u64,
    /// Concurrent proposers.
    pub proposers: usize,
    /// `stream` (AllocateStream, one in flight per proposer) or `unary` (one call each).
    pub api: &'static str,
    /// Allocations committed and applied per second.
    pub committed_per_sec: f64,
    /// Median commit latency (request to answer).
    pub commit_p50_ms: f64,
    /// 99th percentile commit latency.
    pub commit_p99_ms: f64,
    /// Failed proposals.
    pub errors: u64,
    /// etcd puts committed per second (same proposers, same machine).
    pub etcd_committed_per_sec: Option<f64>,
    /// etcd median put latency.
    pub etcd_commit_p50_ms: Option<f64>,
    /// etcd 99th percentile put latency.
    pub etcd_commit_p99_ms: Option<f64>,
}

/// Failover mode's result.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    /// Leaders killed.
    pub kills: usize,
    /// Median time from `kill -9` to the first committed write.
    pub failover_p50_ms: f64,
    /// 99th percentile of the same.
    pub failover_p99_ms: f64,
    /// Worst of the same.
    pub failover_max_ms: f64,
    /// Acknowledged allocations written during the run.
    pub acknowledged: usize,
    /// Acknowledged allocations missing at the end (must be 0).
    pub lost_acknowledged: usize,
}

/// Registry mode's result.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryReport {
    /// Nodes registered.
    pub nodes: usize,
    /// Resident memory of the replica process after registration.
    pub rss_bytes: u64,
    /// Peak resident memory during the run.
    pub peak_rss_bytes: u64,
    /// Registration rate.
    pub nodes_per_sec: f64,
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted_us[i]) / 1000.0
}

/// A deploy of a tiny function (the smallest valid module, 10 millicores, 8 MiB).
pub fn deploy_request(tenant: &str, name: &str, request_id: Vec<u8>) -> pb::DeployRequest {
    pb::DeployRequest {
        request_id,
        name: name.into(),
        module: stellar_proto::module_check::MINIMAL_COMMAND.to_vec(),
        limits: Some(pb::FunctionLimits {
            cpu_millis: 10,
            memory_mib: 8,
            timeout_ms: 1000,
            fuel: 0,
            max_output_bytes: 0,
            scratch_dir: false,
            pids: 0,
        }),
        replicas: 1,
        region: String::new(),
        constraints: vec![],
        tenant: tenant.into(),
        ..Default::default()
    }
}

/// A home node for benchmarks: big enough that capacity never limits the run.
pub fn bench_node(id: u64, managed: bool) -> pb::NodeRegistration {
    const REGIONS: [(&str, &[&str]); 4] = [
        ("cn-east", &["shanghai", "hangzhou", "nanjing"]),
        ("cn-north", &["beijing", "tianjin"]),
        ("cn-south", &["guangzhou", "shenzhen"]),
        ("cn-west", &["chengdu", "chongqing"]),
    ];
    let (region, zones) = REGIONS[(id % 4) as usize];
    pb::NodeRegistration {
        id,
        public_key: vec![],
        attributes: Some(pb::NodeAttributes {
            region: region.into(),
            zone: zones[((id / 4) % zones.len() as u64) as usize].into(),
            arch: if id.is_multiple_of(3) {
                "x86_64"
            } else {
                "aarch64"
            }
            .into(),
            runtimes: vec!["wasm".into()],
            capacity: Some(pb::Resources {
                cpu_millis: 64_000,
                memory_mib: 131_072,
                disk_mib: 65_536,
            }),
            uplink_kbps: 50_000,
            downlink_kbps: 300_000,
            labels: vec![pb::Label {
                key: "isp".into(),
                value: ["telecom", "unicom", "mobile"][(id % 3) as usize].into(),
            }],
        }),
        reputation: 0.95,
        managed,
    }
}

async fn start_cluster(
    cfg: &RaftBenchConfig,
    n: usize,
    sub: &str,
    extra: &[String],
) -> Result<ReplicaProcesses> {
    let prefix: Vec<&str> = cfg.replica_command.1.iter().map(String::as_str).collect();
    let procs = ReplicaProcesses::start(
        &cfg.dir.join(sub),
        &cfg.replica_command.0,
        &prefix,
        n,
        extra,
    )
    .map_err(|source| BenchError::Spawn {
        what: "replica processes",
        source,
    })?;
    if procs.wait_leader(1000).await.is_none() {
        return Err(BenchError::NotReady(format!(
            "no leader elected within 20 s; see logs in {}",
            cfg.dir.join(sub).display()
        )));
    }
    Ok(procs)
}

async fn setup(
    client: &ClusterClient,
    nodes: usize,
    functions: usize,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    let rpc = |what: &str| {
        let what = what.to_string();
        move |status| BenchError::Rpc { what, status }
    };
    client
        .call(|mut c| async move {
            c.create_tenant(pb::CreateTenantRequest {
                request_id: b"bench-tenant".to_vec(),
                name: "bench".into(),
                token_sha256: vec![],
            })
            .await
        })
        .await
        .map_err(rpc("create tenant"))?;
    register(client, nodes, false, log).await?;
    // Deploys go 128 at a time: the control plane batches them like any other writes.
    for chunk in (0..functions).collect::<Vec<_>>().chunks(128) {
        let mut set = tokio::task::JoinSet::new();
        for &f in chunk {
            let client = client.clone();
            set.spawn(async move {
                let req = deploy_request(
                    "bench",
                    &format!("fn-{f}"),
                    format!("bench-deploy-{f}").into_bytes(),
                );
                client
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.deploy(req).await }
                    })
                    .await
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    return Err(BenchError::Rpc {
                        what: "deploy".into(),
                        status,
                    });
                }
                Err(e) => return Err(BenchError::NotReady(format!("deploy task: {e}"))),
            }
        }
    }
    log(&format!(
        "setup: tenant, {nodes} nodes, {functions} functions"
    ));
    Ok(())
}

async fn register(
    client: &ClusterClient,
    nodes: usize,
    managed: bool,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    const BATCH: usize = 10_000;
    let batches = nodes.div_ceil(BATCH);
    for b in 0..batches {
        let first = (b * BATCH + 1) as u64;
        let last = ((b + 1) * BATCH).min(nodes) as u64;
        let req = pb::RegisterNodesRequest {
            request_id: format!("bench-nodes-{b}").into_bytes(),
            nodes: (first..=last).map(|id| bench_node(id, managed)).collect(),
        };
        client
            .call(|mut c| {
                let req = req.clone();
                async move { c.register_nodes(req).await }
            })
            .await
            .map_err(|status| BenchError::Rpc {
                what: format!("register nodes {first}..={last}"),
                status,
            })?;
        if batches >= 10 && (b + 1) % (batches / 10) == 0 {
            log(&format!("registered {last} nodes"));
        }
    }
    Ok(())
}

/// Calls `op(seq)` until `stop`, timing each call: (latencies in µs, errors).
async fn timed_loop<F, Fut>(stop: &AtomicBool, mut op: F) -> (Vec<u32>, u64)
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut lat = Vec::with_capacity(4096);
    let mut errors = 0u64;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let ok = op(seq).await;
        seq += 1;
        if ok {
            lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        } else {
            errors += 1;
        }
    }
    (lat, errors)
}

/// Runs `proposers` tasks `task(t, stop)` for `seconds`; returns sorted latencies (µs),
/// errors and the elapsed time.
async fn drive<F, Fut>(proposers: usize, seconds: u64, task: F) -> (Vec<u32>, u64, Duration)
where
    F: Fn(usize, Arc<AtomicBool>) -> Fut,
    Fut: Future<Output = (Vec<u32>, u64)> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..proposers)
        .map(|t| tokio::spawn(task(t, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    all.sort_unstable();
    (all, errors, elapsed)
}

/// One proposer on an `AllocateStream`: one allocation in flight, answered after apply.
async fn stream_proposer(
    client: ClusterClient,
    leader: String,
    t: usize,
    per: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<u32>, u64) {
    let Ok(mut cl) = client.client_for(&leader) else {
        return (Vec::new(), 1);
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AllocateRequest>(1);
    let Ok(resp) = cl
        .allocate_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    else {
        return (Vec::new(), 1);
    };
    let resp = Mutex::new(resp.into_inner());
    let (tx, resp) = (&tx, &resp);
    timed_loop(&stop, |seq| async move {
        let req = pb::AllocateRequest {
            request_id: format!("a{t}-{seq}").into_bytes(),
            tenant: "bench".into(),
            function: format!("fn-{}", t * per + seq as usize % per),
            ..Default::default()
        };
        if tx.send(req).await.is_err() {
            return false;
        }
        matches!(resp.lock().await.message().await, Ok(Some(r)) if r.error_code.is_empty())
    })
    .await
}

/// Throughput: allocations through the control plane, then the same load on etcd.
pub async fn throughput(
    cfg: &RaftBenchConfig,
    log: &mut dyn FnMut(&str),
) -> Result<ThroughputReport> {
    // Each proposer grows its own 16 functions by one replica per allocation, so a function
    // reaches tens of replicas in a run (not thousands: real functions are not that wide).
    let per_proposer = 16;
    let functions = cfg.proposers.max(1) * per_proposer;
    let procs = start_cluster(
        cfg,
        cfg.replicas,
        "stellar",
        &["--tick-ms".into(), "50".into()],
    )
    .await?;
    let client = procs.client();
    setup(&client, cfg.nodes, functions, log).await?;
    log(&format!(
        "driving {} proposers for {} s against {} replicas",
        cfg.proposers, cfg.seconds, cfg.replicas
    ));
    let leader = procs
        .wait_leader(500)
        .await
        .ok_or_else(|| BenchError::NotReady("no leader".into()))?;
    let leader_addr = procs.addresses[(leader - 1) as usize].clone();
    let unary = cfg.unary;
    let (lat, errors, elapsed) = drive(cfg.proposers, cfg.seconds, |t, stop| {
        let c = client.clone();
        let leader_addr = leader_addr.clone();
        async move {
            if !unary {
                return stream_proposer(c, leader_addr, t, per_proposer, stop).await;
            }
            timed_loop(&stop, |seq| {
                let c = c.clone();
                async move {
                    let req = pb::AllocateRequest {
                        request_id: format!("a{t}-{seq}").into_bytes(),
                        tenant: "bench".into(),
                        function: format!("fn-{}", t * per_proposer + seq as usize % per_proposer),
                        ..Default::default()
                    };
                    c.call(|mut cl| {
                        let req = req.clone();
                        async move { cl.allocate(req).await }
                    })
                    .await
                    .is_ok()
                }
            })
            .await
        }
    })
    .await;
    let committed_per_sec = lat.len() as f64 / elapsed.as_secs_f64();
    log(&format!(
        "stellar: {} allocations in {:.1} s = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
        lat.len(),
        elapsed.as_secs_f64(),
        committed_per_sec,
        percentile_ms(&lat, 0.5),
        percentile_ms(&lat, 0.99),
        errors
    ));
    drop(procs);
    let mut report = ThroughputReport {
        replicas: cfg.replicas,
        seconds: cfg.seconds,
        proposers: cfg.proposers,
        api: if cfg.unary { "unary" } else { "stream" },
        committed_per_sec,
        commit_p50_ms: percentile_ms(&lat, 0.5),
        commit_p99_ms: percentile_ms(&lat, 0.99),
        errors,
        etcd_committed_per_sec: None,
        etcd_commit_p50_ms: None,
        etcd_commit_p99_ms: None,
    };
    if !cfg.skip_etcd {
        let (rate, p50, p99) = etcd(cfg, log).await?;
        report.etcd_committed_per_sec = Some(rate);
        report.etcd_commit_p50_ms = Some(p50);
        report.etcd_commit_p99_ms = Some(p99);
    }
    Ok(report)
}

#[cfg(not(feature = "etcd"))]
async fn etcd(_cfg: &RaftBenchConfig, _log: &mut dyn FnMut(&str)) -> Result<(f64, f64, f64)> {
    Err(BenchError::Etcd(
        "built without the `etcd` feature: rerun with `--features etcd`, or pass --skip-etcd"
            .into(),
    ))
}

#[cfg(feature = "etcd")]
async fn etcd(cfg: &RaftBenchConfig, log: &mut dyn FnMut(&str)) -> Result<(f64, f64, f64)> {
    let dir = cfg.dir.join("etcd");
    let cluster = EtcdCluster::start(&dir, cfg.replicas).map_err(|source| BenchError::Spawn {
        what: "etcd",
        source,
    })?;
    let mut client = None;
    for _ in 0..200 {
        if let Ok(mut c) = etcd_client::Client::connect(cluster.endpoints.clone(), None).await
            && c.put("bench/ready", "1", None).await.is_ok()
        {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = client.ok_or_else(|| {
        BenchError::Etcd(format!(
            "cluster not ready in 20 s; logs in {}",
            dir.display()
        ))
    })?;
    log(&format!(
        "driving {} proposers for {} s against {} etcd members",
        cfg.proposers, cfg.seconds, cfg.replicas
    ));
    // The value is what the control plane stores per allocation.
    let value = pb::Allocation {
        id: 1,
        tenant: "bench".into(),
        function: "fn-0".into(),
        version: 1,
        node: 42,
        state: 1,
        resources: Some(pb::Resources {
            cpu_millis: 10,
            memory_mib: 8,
            disk_mib: 0,
        }),
    };
    let value = prost::Message::encode_to_vec(&value);
    let client = Arc::new(Mutex::new(client));
    let kv = client.lock().await.kv_client();
    let (lat, errors, elapsed) = drive(cfg.proposers, cfg.seconds, |t, stop| {
        let kv = kv.clone();
        let value = value.clone();
        async move {
            timed_loop(&stop, |seq| {
                let mut kv = kv.clone();
                let value = value.clone();
                async move {
                    kv.put(format!("alloc/fn-{t}/{seq}"), value, None)
                        .await
                        .is_ok()
                }
            })
            .await
        }
    })
    .await;
    let rate = lat.len() as f64 / elapsed.as_secs_f64();
    log(&format!(
        "etcd: {} puts in {:.1} s = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
        lat.len(),
        elapsed.as_secs_f64(),
        rate,
        percentile_ms(&lat, 0.5),
        percentile_ms(&lat, 0.99),
        errors
    ));
    drop(cluster);
    Ok((rate, percentile_ms(&lat, 0.5), percentile_ms(&lat, 0.99)))
}

/// Failover: kill the leader `kills` times under a light write load.
pub async fn failover(
    cfg: &RaftBenchConfig,
    kills: usize,
    log: &mut dyn FnMut(&str),
) -> Result<FailoverReport> {
    let functions = 64;
    let mut procs = start_cluster(
        cfg,
        cfg.replicas,
        "failover",
        &[
            "--tick-ms".into(),
            "50".into(),
            "--snapshot-every".into(),
            "2000".into(),
        ],
    )
    .await?;
    let mut client = procs.client();
    client.patience = Duration::from_secs(30);
    setup(&client, 5_000, functions, log).await?;
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..16usize {
        let client = client.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let req = pb::AllocateRequest {
                    request_id: format!("w{t}-{seq}").into_bytes(),
                    tenant: "bench".into(),
                    function: format!("fn-{}", (t * 4 + seq as usize % 4) % 64),
                    ..Default::default()
                };
                seq += 1;
                let r = client
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.allocate(req).await }
                    })
                    .await;
                if let Ok(r) = r
                    && let Some(a) = r.allocation
                {
                    acked.lock().await.insert(a.id);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let mut times_ms = Vec::with_capacity(kills);
    for k in 0..kills {
        let leader = procs
            .wait_leader(500)
            .await
            .ok_or_else(|| BenchError::NotReady("no leader before a kill".into()))?;
        procs.kill(leader);
        let killed = Instant::now();
        // A probe write proposed after the kill: the first commit by a new leader.
        let mut probe = client.clone();
        probe.patience = Duration::from_secs(60);
        let mut n = 0u64;
        loop {
            let req = pb::AllocateRequest {
                request_id: format!("probe-{k}-{n}").into_bytes(),
                tenant: "bench".into(),
                function: format!("fn-{}", k % functions),
                ..Default::default()
            };
            n += 1;
            let r = probe
                .call(|mut c| {
                    let req = req.clone();
                    async move {
                        tokio::time::timeout(Duration::from_millis(150), c.allocate(req))
                            .await
                            .unwrap_or_else(|_| Err(tonic::Status::unavailable("probe timeout")))
                    }
                })
                .await;
            if let Ok(r) = r {
                if let Some(a) = r.allocation {
                    acked.lock().await.insert(a.id);
                }
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                return Err(BenchError::NotReady(format!(
                    "no write committed within 60 s of killing replica {leader}"
                )));
            }
        }
        let ms = killed.elapsed().as_secs_f64() * 1000.0;
        times_ms.push(ms);
        log(&format!(
            "kill {}: replica {leader} killed, new leader committed after {ms:.0} ms",
            k + 1
        ));
        procs.spawn(leader).map_err(|source| BenchError::Spawn {
            what: "restarted replica",
            source,
        })?;
        // Let it catch up before the next kill, so a quorum is always possible.
        for _ in 0..300 {
            let lead = procs.wait_leader(100).await;
            let target = match lead {
                Some(l) => procs.status(l).await.map(|s| s.commit_index),
                None => None,
            };
            let mine = procs.status(leader).await.map(|s| s.applied_index);
            if let (Some(t), Some(m)) = (target, mine)
                && m + 50 >= t
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    // Every acknowledged allocation must be there: read every function linearizably.
    let mut present = BTreeSet::new();
    for f in 0..functions {
        let req = pb::GetFunctionRequest {
            tenant: "bench".into(),
            name: format!("fn-{f}"),
            read: None,
        };
        let r = client
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_function(req).await }
            })
            .await
            .map_err(|status| BenchError::Rpc {
                what: format!("get fn-{f}"),
                status,
            })?;
        present.extend(r.allocations.iter().map(|a| a.id));
    }
    let acked = acked.lock().await.clone();
    let lost = acked.difference(&present).count();
    let mut sorted = times_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted[((sorted.len() as f64 - 1.0) * p).round() as usize];
    Ok(FailoverReport {
        kills,
        failover_p50_ms: pct(0.5),
        failover_p99_ms: pct(0.99),
        failover_max_ms: pct(1.0),
        acknowledged: acked.len(),
        lost_acknowledged: lost,
    })
}

/// Registry: one replica, `nodes` registered, its resident memory.
pub async fn registry(
    cfg: &RaftBenchConfig,
    nodes: usize,
    log: &mut dyn FnMut(&str),
) -> Result<RegistryReport> {
    let procs = start_cluster(cfg, 1, "registry", &["--tick-ms".into(), "50".into()]).await?;
    let client = procs.client();
    let start = Instant::now();
    register(&client, nodes, false, log).await?;
    let elapsed = start.elapsed();
    // Let the leader's soft state (placement table) absorb the last batches.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = procs.status(1).await;
    let pid = procs
        .pid(1)
        .ok_or_else(|| BenchError::NotReady("replica exited".into()))?;
    let (rss, peak) =
        rss_bytes(pid).ok_or_else(|| BenchError::NotReady("cannot read /proc".into()))?;
    if let Some(s) = status {
        log(&format!("replica reports {} nodes registered", s.nodes));
    }
    Ok(RegistryReport {
        nodes,
        rss_bytes: rss,
        peak_rss_bytes: peak,
        nodes_per_sec: nodes as f64 / elapsed.as_secs_f64(),
    })
}

/// A fresh directory for one run under `base` (kept on failure for its logs).
pub fn run_dir(base: &Path) -> std::io::Result<PathBuf> {
    let d = tempfile::Builder::new()
        .prefix("raft-bench-")
        .tempdir_in(base)?;
    Ok(d.keep())
}
