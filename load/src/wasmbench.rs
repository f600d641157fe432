//! `wasm-bench`: the worker's invocation path, measured.
//!
//! ```text
//!  in-worker:   one Sandbox, `hello` loaded once; each call = fresh Store + instantiate
//!               (pooled slot, copy-on-write heap) + _start; p50/p99 on one thread, then
//!               invocations/s with one thread per core
//!  per process: the same module run by a new process per call (`stellar-load wasm-once`:
//!               engine, compile, instantiate, run, exit), as a CLI without a cache would
//!  idle RSS:    a real worker process (default sandbox) joined to a one-replica control
//!               plane, `hello` deployed and invoked once, then at rest
//! ```

// Benchmark timers read the wall clock by design.
#![allow(clippy::disallowed_methods)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use stellar_worker::{InvocationInput, InvocationLimits, Sandbox, SandboxConfig};

/// What `wasm-bench` is asked to do.
#[derive(Debug, Clone)]
pub struct WasmBenchConfig {
    /// The module to run (defaults to the committed `hello` build).
    pub module: PathBuf,
    /// Timed single-thread invocations for the latency percentiles.
    pub invocations: usize,
    /// Seconds of the throughput phase.
    pub seconds: f64,
    /// Threads in the throughput phase (default: one per core).
    pub threads: usize,
    /// New-process calls for the per-process comparison.
    pub process_calls: usize,
    /// The shipped `stellar` binary that runs the idle worker, its gateway and replica.
    pub stellar: PathBuf,
}

/// The benchmark's figures (the `--json` object).
#[derive(Debug, Clone, Serialize)]
pub struct WasmBenchReport {
    /// Instantiate + invoke, median, µs.
    pub invoke_p50_us: f64,
    /// Instantiate + invoke, 99th percentile, µs.
    pub invoke_p99_us: f64,
    /// Invocations per second with `threads` threads.
    pub invocations_per_sec: f64,
    /// Threads used for the throughput figure.
    pub threads: usize,
    /// A new process per call, median, µs.
    pub process_per_call_p50_us: f64,
    /// Resident memory of an idle worker process (joined, `hello` loaded).
    pub worker_idle_rss_bytes: u64,
    /// Fuel one call costs (identical on every call).
    pub fuel_per_call: u64,
}

/// Failures of the benchmark itself.
#[derive(Debug, thiserror::Error)]
pub enum WasmBenchError {
    /// The module could not be read.
    #[error("{path}: {source}; build the examples with scripts/build-examples.sh")]
    Module {
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The sandbox refused the module or its configuration.
    #[error(transparent)]
    Worker(#[from] stellar_worker::Error),
    /// An invocation failed where it must succeed.
    #[error("invocation failed: {0}")]
    Invocation(String),
    /// A helper process could not be run.
    #[error("helper process: {0}")]
    Process(String),
}

/// The committed build of `hello`, next to this crate in the repository.
pub fn default_module() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wasm/prebuilt/hello.wasm")
}

fn read_module(path: &Path) -> Result<(String, Vec<u8>), WasmBenchError> {
    let bytes = std::fs::read(path).map_err(|source| WasmBenchError::Module {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((hex::encode(Sha256::digest(&bytes)), bytes))
}

fn hello_input(i: u64) -> InvocationInput {
    InvocationInput {
        invocation_id: i.to_le_bytes().to_vec(),
        stdin: b"bench".to_vec(),
        ..Default::default()
    }
}

fn hello_limits() -> InvocationLimits {
    InvocationLimits {
        memory_bytes: 16 << 20,
        timeout: Duration::from_secs(5),
        fuel: 100_000_000,
        max_output_bytes: 4096,
        dirs: Vec::new(),
    }
}

pub(crate) fn percentile_us(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    f64::from(sorted[((sorted.len() as f64 - 1.0) * p).round() as usize])
}

/// Runs all three measurements; `log` gets progress lines.
pub fn run(
    cfg: &WasmBenchConfig,
    log: &mut dyn FnMut(&str),
) -> Result<WasmBenchReport, WasmBenchError> {
    let (sha, bytes) = read_module(&cfg.module)?;
    let sandbox = Arc::new(Sandbox::new(SandboxConfig {
        slots: (cfg.threads as u32).max(1) * 2,
        max_memory_bytes: 64 << 20,
        ..Default::default()
    })?);
    let f = sandbox.load(&sha, &bytes)?;
    let limits = hello_limits();
    // Warm up: fault in the pool slots and the module's heap image.
    let mut fuel = 0;
    for i in 0..1000 {
        let out = sandbox.invoke(&f, "hello", &hello_input(i), &limits);
        out.result
            .map_err(|e| WasmBenchError::Invocation(e.to_string()))?;
        fuel = out.metering.fuel;
    }
    log(&format!(
        "latency: {} single-thread invocations",
        cfg.invocations
    ));
    let mut lat = Vec::with_capacity(cfg.invocations);
    for i in 0..cfg.invocations as u64 {
        let t = Instant::now();
        let out = sandbox.invoke(&f, "hello", &hello_input(i), &limits);
        lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        if out.result.is_err() || out.metering.fuel != fuel {
            return Err(WasmBenchError::Invocation(format!(
                "{:?} (fuel {} vs {fuel})",
                out.result, out.metering.fuel
            )));
        }
    }
    lat.sort_unstable();
    log(&format!(
        "throughput: {} threads for {:.1} s",
        cfg.threads, cfg.seconds
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..cfg.threads.max(1))
        .map(|t| {
            let (sandbox, f, stop, count) =
                (sandbox.clone(), f.clone(), stop.clone(), count.clone());
            let limits = limits.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let out =
                        sandbox.invoke(&f, "hello", &hello_input(n ^ (t as u64) << 48), &limits);
                    if out.result.is_ok() {
                        n += 1;
                    }
                }
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(cfg.seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let invocations_per_sec = count.load(Ordering::Relaxed) as f64 / elapsed;
    log(&format!("per process: {} calls", cfg.process_calls));
    let exe = std::env::current_exe().map_err(|e| WasmBenchError::Process(e.to_string()))?;
    let mut per_process = Vec::with_capacity(cfg.process_calls);
    for _ in 0..cfg.process_calls {
        let t = Instant::now();
        let out = Command::new(&exe)
            .arg("wasm-once")
            .arg("--module")
            .arg(&cfg.module)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| WasmBenchError::Process(e.to_string()))?;
        per_process.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        if !out.status.success() || !out.stdout.starts_with(b"Hello") {
            return Err(WasmBenchError::Process(format!(
                "wasm-once failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
    }
    per_process.sort_unstable();
    log("idle: a worker process with `hello` deployed and invoked once");
    let worker_idle_rss_bytes = idle_rss(&cfg.stellar, &cfg.module)?;
    Ok(WasmBenchReport {
        invoke_p50_us: percentile_us(&lat, 0.5),
        invoke_p99_us: percentile_us(&lat, 0.99),
        invocations_per_sec,
        threads: cfg.threads,
        process_per_call_p50_us: percentile_us(&per_process, 0.5),
        worker_idle_rss_bytes,
        fuel_per_call: fuel,
    })
}

/// A real idle worker: a one-replica control plane, a gateway and a worker agent (default sandbox:
/// 64 slots of up to 256 MiB), each a process of the shipped `stellar` binary; `hello` is
/// deployed and invoked once, then the worker's resident memory is read after it settles.
fn idle_rss(stellar: &Path, module: &Path) -> Result<u64, WasmBenchError> {
    if !stellar.is_file() {
        return Err(WasmBenchError::Process(format!(
            "the `stellar` binary is not at {} (build it: cargo build --release -p stellar-cli, or pass --stellar PATH)",
            stellar.display()
        )));
    }
    let fail = |e: &dyn std::fmt::Display| WasmBenchError::Process(e.to_string());
    let dir = tempfile::tempdir().map_err(|e| fail(&e))?;
    let ports = crate::procs::free_ports(2).map_err(|e| fail(&e))?;
    let replica = format!("127.0.0.1:{}", ports[0]);
    let addr = format!("127.0.0.1:{}", ports[1]);
    let token = "wasm-bench-token";
    let spawn = |args: &[&str]| {
        Command::new(stellar)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(KillOnDrop)
            .map_err(|e| fail(&e))
    };
    let plane_dir = dir.path().join("plane");
    let worker_dir = dir.path().join("worker");
    let _plane = spawn(&[
        "scheduler",
        "--id",
        "1",
        "--peers",
        &format!("1={replica}"),
        "--data-dir",
        &plane_dir.to_string_lossy(),
    ])?;
    let token_file = crate::procs::wait_for_admin_token(&plane_dir, Duration::from_secs(30))
        .map_err(|e| fail(&e))?;
    let _gateway = spawn(&[
        "gateway",
        "--control",
        &replica,
        "--listen",
        &addr,
        "--http-listen",
        "off",
        "--token-file",
        &token_file.to_string_lossy(),
        "--join-token",
        token,
    ])?;
    let worker = spawn(&[
        "worker",
        "--join",
        &addr,
        "--token",
        token,
        "--data-dir",
        &worker_dir.to_string_lossy(),
    ])?;
    let wasm = std::fs::read(module).map_err(|e| fail(&e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(&e))?;
    rt.block_on(async {
        let client = stellar_proto::client::ClusterClient::new(std::slice::from_ref(&addr))
            .map_err(|e| fail(&e))?
            .with_admin_token_from(vec![plane_dir.clone()]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut deployed = false;
        let mut last = String::new();
        loop {
            if Instant::now() > deadline {
                return Err(fail(&format!(
                    "the worker did not serve `hello` within 60 s (last answer: {last})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !deployed {
                let _ = client.create_tenant("bench").await;
                let req = stellar_proto::v1::DeployRequest {
                    request_id: b"wasm-bench-hello".to_vec(),
                    name: "hello".into(),
                    module: wasm.clone(),
                    limits: Some(stellar_proto::v1::FunctionLimits {
                        cpu_millis: 100,
                        memory_mib: 16,
                        timeout_ms: 1000,
                        ..Default::default()
                    }),
                    replicas: 1,
                    tenant: "bench".into(),
                    ..Default::default()
                };
                match client
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.deploy(req).await }
                    })
                    .await
                {
                    Ok(_) => deployed = true,
                    Err(e) => last = format!("deploy: {e}"),
                }
                continue;
            }
            let req = stellar_proto::v1::InvokeRequest {
                tenant: "bench".into(),
                function: "hello".into(),
                stdin: b"idle".to_vec(),
                ..Default::default()
            };
            let answered = client.invoke(req).await;
            match answered {
                Ok(r) if r.error_code.is_empty() => return Ok(()),
                Ok(r) => last = format!("invoke: {} {}", r.error_code, r.error_message),
                Err(e) => last = format!("invoke: {e}"),
            }
        }
    })?;
    std::thread::sleep(Duration::from_secs(1));
    crate::procs::rss_bytes(worker.0.id())
        .map(|(rss, _)| rss)
        .ok_or_else(|| fail(&"the worker exited"))
}

/// A child process killed when dropped (benchmark helpers never outlive the run).
#[derive(Debug)]
pub(crate) struct KillOnDrop(pub(crate) std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `wasm-once`: one call in a fresh process (engine, compile, run), stdin to the module.
pub fn once(module: &Path) -> Result<Vec<u8>, WasmBenchError> {
    let (sha, bytes) = read_module(module)?;
    let sandbox = Sandbox::new(SandboxConfig {
        slots: 1,
        max_memory_bytes: 64 << 20,
        ..Default::default()
    })?;
    let f = sandbox.load(&sha, &bytes)?;
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = sandbox.invoke(
        &f,
        "hello",
        &InvocationInput {
            invocation_id: b"once".to_vec(),
            stdin,
            ..Default::default()
        },
        &hello_limits(),
    );
    out.result
        .map_err(|e| WasmBenchError::Invocation(e.to_string()))?;
    Ok(out.stdout)
}
