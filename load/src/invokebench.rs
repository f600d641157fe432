//! `invoke-bench`: end-to-end invocations through gateways. It starts a cluster on loopback
//! as real processes of the shipped `stellar` binary (one control-plane replica, G gateways
//! and N workers spread over them) or targets `--endpoint`, deploys `hello`, and drives it
//! with many concurrent callers over several gRPC connections (spread over the gateways) for
//! a fixed time. The replica is not on the invocation path.
//!
//! ```text
//!  callers ×C ─(K channels)─▶ Control.Invoke on gateway k % G ─▶ worker stream ─▶ wasmtime
//!      ◀───────────────────────── stdout + usage ◀──────────────────────────────────┘
//! ```

#![allow(clippy::disallowed_methods)] // a benchmark's timers read the clock

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;

use crate::wasmbench::percentile_us;

/// What to run.
#[derive(Debug, Clone)]
pub struct InvokeBenchConfig {
    /// Measured seconds (after a one-second warm-up).
    pub seconds: u64,
    /// Concurrent callers.
    pub concurrency: usize,
    /// gRPC connections the callers share.
    pub connections: usize,
    /// Async runtime threads per process (the bench's and each spawned replica's and
    /// worker's, through `TOKIO_WORKER_THREADS`); 0 = tokio's default, one per core.
    pub runtime_threads: usize,
    /// Workers to start (ignored with `endpoint`).
    pub workers: usize,
    /// Gateways to start (ignored with `endpoint`); workers and connections spread over them.
    pub gateways: usize,
    /// An existing cluster to target instead of starting one.
    pub endpoint: Vec<String>,
    /// The token for `endpoint` (an admin token: the bench creates its tenant).
    pub token: Option<String>,
    /// The `hello` module.
    pub module: PathBuf,
    /// The shipped `stellar` binary (replica, gateways and workers).
    pub stellar: PathBuf,
}

/// What was measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InvokeBenchReport {
    /// Successful invocations per second over the measured window.
    pub invocations_per_sec: f64,
    /// Median end-to-end latency, ms.
    pub p50_ms: f64,
    /// 99th percentile end-to-end latency, ms.
    pub p99_ms: f64,
    /// Calls that failed (transport error or a function error).
    pub errors: u64,
    /// Concurrent callers.
    pub concurrency: usize,
    /// Workers serving `hello`.
    pub workers: usize,
    /// Gateways the callers used.
    pub gateways: usize,
    /// Async runtime threads per process (0 = one per core).
    pub runtime_threads: usize,
    /// Measured seconds.
    pub seconds: u64,
    /// CPU time (user + system) of every process of the run during the measured window,
    /// the load generator included, seconds (cluster processes only when this run started
    /// them; with --endpoint, the load generator alone).
    pub cpu_seconds: f64,
    /// Successful invocations per CPU second: what a call costs, whatever the core count.
    pub invocations_per_cpu_sec: f64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum InvokeBenchError {
    /// A process or file could not be set up.
    #[error("setup: {0}")]
    Setup(String),
    /// The cluster did not get ready.
    #[error("cluster: {0}")]
    Cluster(String),
}

struct Cluster {
    endpoints: Vec<String>,
    admin: ClusterClient,
    local: Option<crate::procs::LocalCluster>,
    _dir: Option<tempfile::TempDir>,
}

fn start_cluster(cfg: &InvokeBenchConfig) -> Result<Cluster, InvokeBenchError> {
    if !cfg.endpoint.is_empty() {
        let c = ClusterClient::new(&cfg.endpoint)
            .map_err(|e| InvokeBenchError::Setup(e.message().to_string()))?;
        let token = cfg.token.as_deref().ok_or_else(|| {
            InvokeBenchError::Setup("--endpoint needs --token (an admin token)".into())
        })?;
        return Ok(Cluster {
            endpoints: cfg.endpoint.clone(),
            admin: c.with_token(token),
            local: None,
            _dir: None,
        });
    }
    let setup = |e: &dyn std::fmt::Display| InvokeBenchError::Setup(e.to_string());
    let dir = tempfile::tempdir().map_err(|e| setup(&e))?;
    let local = crate::procs::LocalCluster::start(
        &cfg.stellar,
        dir.path(),
        &crate::procs::LocalClusterConfig {
            gateways: cfg.gateways,
            workers: cfg.workers,
            runtime_threads: cfg.runtime_threads,
            ..Default::default()
        },
    )
    .map_err(InvokeBenchError::Setup)?;
    let (gateways, plane) = (local.gateways.clone(), local.plane.clone());
    let admin = ClusterClient::new(std::slice::from_ref(&gateways[0]))
        .map_err(|e| setup(&e.message()))?
        .with_admin_token_from(vec![plane]);
    Ok(Cluster {
        endpoints: gateways,
        admin,
        local: Some(local),
        _dir: Some(dir),
    })
}

async fn prepare(
    cfg: &InvokeBenchConfig,
    c: &Cluster,
) -> Result<(String, usize), InvokeBenchError> {
    let fail = |e: &dyn std::fmt::Display| InvokeBenchError::Cluster(e.to_string());
    let wasm = std::fs::read(&cfg.module)
        .map_err(|e| InvokeBenchError::Setup(format!("{}: {e}", cfg.module.display())))?;
    // Wait for the workers to register.
    let want = if cfg.endpoint.is_empty() {
        cfg.workers
    } else {
        1
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let nodes = loop {
        let ready = c
            .admin
            .call(|mut cl| async move {
                cl.list_nodes(pb::ListNodesRequest {
                    state: pb::NodeState::Ready as i32,
                    ..Default::default()
                })
                .await
            })
            .await
            .map(|r| r.total as usize)
            .unwrap_or(0);
        if ready >= want {
            break ready;
        }
        if Instant::now() > deadline {
            return Err(fail(&format!("{ready} of {want} workers ready after 60 s")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let tenant_token = stellar_proto::tokens::new_token().map_err(|e| fail(&e))?;
    let sha = stellar_proto::tokens::token_hash(&tenant_token).to_vec();
    let tenant = format!("bench-{}", &hex::encode(&sha)[..8]);
    c.admin
        .call(|mut cl| {
            let req = pb::CreateTenantRequest {
                request_id: sha.clone(),
                name: tenant.clone(),
                token_sha256: sha.clone(),
            };
            async move { cl.create_tenant(req).await }
        })
        .await
        .map_err(|e| fail(&e.message()))?;
    let client = c.admin.with_token(&tenant_token);
    let replicas = nodes.min(cfg.workers.max(1)) as u32;
    client
        .deploy(pb::DeployRequest {
            request_id: b"invoke-bench-hello".to_vec(),
            name: "hello".into(),
            module: wasm,
            limits: Some(pb::FunctionLimits {
                cpu_millis: 10,
                memory_mib: 16,
                timeout_ms: 2000,
                ..Default::default()
            }),
            replicas,
            idempotent: true,
            ..Default::default()
        })
        .await
        .map_err(|e| fail(&e.message()))?;
    // Until an instance answers (the module is fetched and compiled first).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.invoke(hello()).await {
            Ok(r) if r.error_code.is_empty() => break,
            other => {
                if Instant::now() > deadline {
                    return Err(fail(&format!("`hello` not served after 60 s: {other:?}")));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((tenant_token, replicas as usize))
}

fn hello() -> pb::InvokeRequest {
    pb::InvokeRequest {
        function: "hello".into(),
        stdin: b"bench".to_vec(),
        ..Default::default()
    }
}

/// Runs the benchmark; `log` gets progress lines.
pub fn run(
    cfg: &InvokeBenchConfig,
    log: &mut dyn FnMut(&str),
) -> Result<InvokeBenchReport, InvokeBenchError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cfg.runtime_threads > 0 {
        builder.worker_threads(cfg.runtime_threads);
    }
    let rt = builder
        .enable_all()
        .build()
        .map_err(|e| InvokeBenchError::Setup(e.to_string()))?;
    log(&if cfg.endpoint.is_empty() {
        format!(
            "starting 1 control-plane replica, {} gateway(s) and {} worker(s) on loopback ({})",
            cfg.gateways.max(1),
            cfg.workers,
            cfg.stellar.display()
        )
    } else {
        format!("targeting {}", cfg.endpoint.join(","))
    });
    let _runtime = rt.enter(); // clients connect lazily on this runtime
    let cluster = start_cluster(cfg)?;
    let (token, workers) = rt.block_on(prepare(cfg, &cluster))?;
    log(&format!(
        "`hello` served by {workers} instance(s); {} callers over {} connection(s) for 1 + {} s",
        cfg.concurrency, cfg.connections, cfg.seconds
    ));
    let clients: Vec<ClusterClient> = (0..cfg.connections.max(1))
        .map(|i| {
            let endpoint = &cluster.endpoints[i % cluster.endpoints.len()];
            ClusterClient::new(std::slice::from_ref(endpoint)).map(|c| c.with_token(&token))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| InvokeBenchError::Setup(e.message().to_string()))?;
    let errors = Arc::new(AtomicU64::new(0));
    let pids: Vec<u32> = cluster.local.as_ref().map(|l| l.pids()).unwrap_or_default();
    let cpu_now = move || -> f64 {
        crate::procs::cpu_seconds(None).unwrap_or(0.0)
            + pids
                .iter()
                .filter_map(|&p| crate::procs::cpu_seconds(Some(p)))
                .sum::<f64>()
    };
    let (lat, window, cpu) = rt.block_on(async {
        let start = Instant::now();
        let warm_until = start + Duration::from_secs(1);
        let end = warm_until + Duration::from_secs(cfg.seconds);
        let cpu_at_start = {
            let cpu_now = cpu_now.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(warm_until.into()).await;
                cpu_now()
            })
        };
        let mut tasks = Vec::new();
        for i in 0..cfg.concurrency {
            let client = clients[i % clients.len()].clone();
            let errors = errors.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat: Vec<u32> = Vec::new();
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    let r = client.invoke(hello()).await;
                    let us = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    let ok = matches!(&r, Ok(r) if r.error_code.is_empty());
                    if t >= warm_until {
                        if ok {
                            lat.push(us);
                        } else {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        let cpu = cpu_now() - cpu_at_start.await.unwrap_or(0.0);
        (all, end.saturating_duration_since(warm_until), cpu)
    });
    let mut lat = lat;
    lat.sort_unstable();
    Ok(InvokeBenchReport {
        invocations_per_sec: lat.len() as f64 / window.as_secs_f64().max(1e-9),
        p50_ms: percentile_us(&lat, 0.5) / 1000.0,
        p99_ms: percentile_us(&lat, 0.99) / 1000.0,
        errors: errors.load(Ordering::Relaxed),
        concurrency: cfg.concurrency,
        workers,
        gateways: if cfg.endpoint.is_empty() {
            cfg.gateways.max(1)
        } else {
            cfg.endpoint.len()
        },
        runtime_threads: cfg.runtime_threads,
        seconds: cfg.seconds,
        cpu_seconds: cpu,
        invocations_per_cpu_sec: lat.len() as f64 / cpu.max(1e-9),
    })
}
