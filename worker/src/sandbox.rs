//! The WebAssembly sandbox: one wasmtime engine per worker with a pooling allocator sized
//! from the node's configuration, each module compiled once (and cached on disk) into an
//! `InstancePre`, and one fresh `Store` per invocation carrying that invocation's limits and
//! meters.
//!
//! ```text
//!  module bytes ─sha256 check─▶ artefact cache? ─no─▶ compile ─▶ cache (HMAC-tagged)
//!                                      │yes                 │
//!                                      ▼                    ▼
//!                               deserialize ──────▶ Module ─▶ check `_start` ─▶ InstancePre
//!  invocation ─▶ Store{WASI ctx (args, env, stdin, capped stdout/stderr, seeded random),
//!                      memory limiter (peak), fuel budget, epoch deadline}
//!             ─▶ instantiate (copy-on-write heap image, pooled slot) ─▶ _start ─▶ Outcome
//! ```
//!
//! Fuel is the deterministic compute unit: WASI's random source is a ChaCha20 stream keyed
//! by a per-invocation secret seed the dispatcher draws and sends only to the node that runs
//! the call, so re-running an invocation with its seed costs the same fuel and prints the
//! same output (which is what lets another node check a usage claim), while no caller can
//! predict the function's "secure" random bytes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Enabled, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, ResourceLimiter, Store, Trap,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::cache::ArtefactCache;

/// Bytes of each memory slot reset in place rather than returned to the kernel.
const KEEP_RESIDENT: usize = 1 << 20;
use crate::error::{Error, Result};

/// How the node's sandbox is sized; a home box gives it a slice of its memory, not 4 GiB
/// reservations per instance.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Instances that may exist at once (pool slots; one per concurrent invocation).
    pub slots: u32,
    /// The largest linear memory any invocation may grow to.
    pub max_memory_bytes: u64,
    /// Deadline granularity: a deadline is enforced within one tick of it.
    pub epoch_tick: Duration,
    /// Where compiled artefacts are kept across restarts (`None`: compile on every start).
    pub cache_dir: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            slots: 64,
            max_memory_bytes: 256 << 20,
            epoch_tick: Duration::from_millis(1),
            cache_dir: None,
        }
    }
}

/// What one invocation gets: the limits of its function version, resolved to units.
#[derive(Debug, Clone)]
pub struct InvocationLimits {
    /// Linear memory cap.
    pub memory_bytes: u64,
    /// Wall-clock deadline from the start of instantiation.
    pub timeout: Duration,
    /// Fuel budget (the deterministic compute unit).
    pub fuel: u64,
    /// Cap on stdout and on stderr, each.
    pub max_output_bytes: u64,
    /// Host directories the function sees, read-write (none: no filesystem at all): a
    /// worker's private `/scratch`, or what `stellar run --dir` names.
    pub dirs: Vec<Preopen>,
}

/// A host directory the function sees at `guest`. WASI resolves every path inside it (a
/// `..` or a symlink that leads out is refused), so the function cannot reach past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    /// The directory on this machine.
    pub host: PathBuf,
    /// Where the function sees it (e.g. `/scratch`).
    pub guest: String,
}

impl InvocationLimits {
    /// Defaults for fields a function spec leaves at 0.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Fuel for a spec without a budget: about a few seconds of compute.
    pub const DEFAULT_FUEL: u64 = 10_000_000_000;
    /// Output cap for a spec without one.
    pub const DEFAULT_MAX_OUTPUT: u64 = 1 << 20;

    /// Limits from a function version's spec (0 means "the default").
    pub fn from_spec(l: &stellar_proto::v1::FunctionLimits) -> InvocationLimits {
        let or = |v: u64, d: u64| if v == 0 { d } else { v };
        InvocationLimits {
            memory_bytes: or(u64::from(l.memory_mib), 128) << 20,
            timeout: if l.timeout_ms == 0 {
                Self::DEFAULT_TIMEOUT
            } else {
                Duration::from_millis(u64::from(l.timeout_ms))
            },
            fuel: or(l.fuel, Self::DEFAULT_FUEL),
            // Clamped to what the stream back to the gateway carries: a larger output fails
            // this call with OUTPUT_TOO_LARGE instead of knocking the worker's stream off.
            max_output_bytes: or(u64::from(l.max_output_bytes), Self::DEFAULT_MAX_OUTPUT)
                .min(u64::from(stellar_proto::limits::MAX_OUTPUT_BYTES)),
            dirs: Vec::new(),
        }
    }
}

/// The request side of one invocation.
#[derive(Debug, Clone, Default)]
pub struct InvocationInput {
    /// Identifies the invocation.
    pub invocation_id: Vec<u8>,
    /// Keys the function's random source (secret: never derive it from anything a caller
    /// sees). The same seed gives the same random bytes, so a re-run is identical.
    pub random_seed: [u8; 32],
    /// Arguments after `argv[0]` (which is the function's name).
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Bytes on stdin.
    pub stdin: Vec<u8>,
}

/// Why an invocation did not succeed: each is a result for the caller, never a worker fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    /// The fuel budget ran out.
    #[error("ran out of fuel after {budget} units; raise the function's fuel limit")]
    OutOfFuel {
        /// The budget it had.
        budget: u64,
    },
    /// The wall-clock deadline passed.
    #[error("did not finish within its {timeout_ms} ms deadline")]
    DeadlineExceeded {
        /// The deadline.
        timeout_ms: u64,
    },
    /// Linear memory would have grown past the function's limit.
    #[error("tried to grow its memory to {wanted} bytes; the limit is {limit} bytes")]
    MemoryLimit {
        /// The size asked for.
        wanted: u64,
        /// The limit.
        limit: u64,
    },
    /// stdout or stderr went past the output cap (what fit is kept, the rest dropped).
    #[error("wrote more than {limit} bytes to {stream}")]
    OutputTooLarge {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The cap.
        limit: u64,
    },
    /// The function trapped (a panic in Rust, an out-of-bounds access, `unreachable`...).
    #[error("trapped: {0}")]
    Trap(String),
    /// The function exited with a non-zero status.
    #[error("exited with status {0}")]
    Exit(i32),
    /// It could not be instantiated with these limits (e.g. its initial memory is larger).
    #[error("could not start: {0}")]
    Instantiate(String),
    /// A container reached its process limit (a fork was refused) and did not succeed.
    #[error("reached its limit of {limit} processes")]
    PidsLimit {
        /// The limit.
        limit: u64,
    },
    /// A container's program was killed by a signal it did not handle.
    #[error("was killed by signal {0}")]
    Signalled(i32),
    /// The container image cannot run here (no such program, wrong architecture, corrupt).
    #[error("the image cannot run: {0}")]
    ImageInvalid(String),
    /// This node could not build the sandbox: the node's fault, never the caller's.
    #[error("the node could not build the sandbox: {0}")]
    Sandbox(String),
}

impl InvokeError {
    /// A stable code for the wire (`InvocationResult.error_code`).
    pub fn code(&self) -> &'static str {
        match self {
            InvokeError::OutOfFuel { .. } => "OUT_OF_FUEL",
            InvokeError::DeadlineExceeded { .. } => "DEADLINE_EXCEEDED",
            InvokeError::MemoryLimit { .. } => "MEMORY_LIMIT",
            InvokeError::OutputTooLarge { .. } => "OUTPUT_TOO_LARGE",
            InvokeError::Trap(_) => "TRAP",
            InvokeError::Exit(_) => "EXIT_CODE",
            InvokeError::Instantiate(_) => "INSTANTIATE",
            InvokeError::PidsLimit { .. } => "PIDS_LIMIT",
            InvokeError::Signalled(_) => "SIGNALLED",
            InvokeError::ImageInvalid(_) => "IMAGE_INVALID",
            InvokeError::Sandbox(_) => "SANDBOX_FAILED",
        }
    }
}

/// What one invocation used: the figures a usage record carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metering {
    /// Fuel consumed (deterministic).
    pub fuel: u64,
    /// Wall time from instantiation to exit, µs.
    pub wall_us: u64,
    /// The largest linear memory it had, bytes.
    pub peak_memory_bytes: u64,
    /// stdin, arguments and environment, bytes.
    pub bytes_in: u64,
    /// stdout and stderr, bytes.
    pub bytes_out: u64,
    /// Its exit status (0 on success; -1 when it did not exit on its own; 128 + the signal
    /// when a container's program was killed by one).
    pub exit_code: i32,
    /// CPU time, ns (containers: the cgroup's counter; 0 for wasm, whose unit is fuel).
    pub cpu_ns: u64,
    /// The most processes a container had at once (0 for wasm).
    pub pids_peak: u64,
}

impl Metering {
    /// The record a call starts with: its input counted (stdin, arguments, environment),
    /// no exit yet.
    pub fn for_input(stdin: &[u8], args: &[String], env: &[(String, String)]) -> Metering {
        let bytes_in = stdin.len()
            + args.iter().map(String::len).sum::<usize>()
            + env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        Metering {
            bytes_in: bytes_in as u64,
            exit_code: -1,
            ..Default::default()
        }
    }
}

/// The result of one invocation.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What it wrote to stdout (at most the cap).
    pub stdout: Vec<u8>,
    /// What it wrote to stderr (at most the cap).
    pub stderr: Vec<u8>,
    /// Success, or why not.
    pub result: std::result::Result<(), InvokeError>,
    /// What it used.
    pub metering: Metering,
}

/// A compiled function ready to instantiate.
pub struct Function {
    sha256: String,
    pre: InstancePre<Guest>,
    from_cache: bool,
}

impl Function {
    /// The module's sha256 (hex).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether it came from the on-disk artefact cache rather than a fresh compile.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }
}

/// Per-invocation store data.
struct Guest {
    wasi: WasiP1Ctx,
    memory: MemoryMeter,
    /// When the invocation must end (a guest asleep in WASI past it is woken then).
    deadline: std::time::Instant,
}

impl crate::sleep_deadline::Deadline for Guest {
    fn deadline(&self) -> std::time::Instant {
        self.deadline
    }

    fn wasi(&mut self) -> &mut WasiP1Ctx {
        &mut self.wasi
    }
}

/// Enforces the memory limit and records the peak.
struct MemoryMeter {
    limit: usize,
    peak: usize,
    refused: Option<usize>,
}

/// Marks a growth refused by [`MemoryMeter`] so the trap can be told apart from others.
#[derive(Debug)]
struct MemoryLimitHit;

impl std::fmt::Display for MemoryLimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("memory limit reached")
    }
}

impl std::error::Error for MemoryLimitHit {}

impl ResourceLimiter for MemoryMeter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = Some(desired);
            return Err(wasmtime::Error::new(MemoryLimitHit));
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The node's sandbox: an engine, its WASI linker, compiled functions and the epoch ticker.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<Guest>,
    cache: Option<ArtefactCache>,
    functions: Mutex<HashMap<String, Arc<Function>>>,
    cfg: SandboxConfig,
    stop_ticker: Arc<AtomicBool>,
}

impl Sandbox {
    /// Builds the engine (pooling allocator sized from `cfg`) and starts the epoch ticker.
    pub fn new(cfg: SandboxConfig) -> Result<Sandbox> {
        if cfg.slots == 0 || cfg.max_memory_bytes < 64 << 10 {
            return Err(Error::Config(
                "need at least one slot and 64 KiB of memory per instance".into(),
            ));
        }
        if cfg.epoch_tick.is_zero() {
            return Err(Error::Config("the epoch tick must be positive".into()));
        }
        let max_memory = usize::try_from(cfg.max_memory_bytes)
            .map_err(|_| Error::Config("max memory does not fit this machine".into()))?;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(cfg.slots)
            .total_memories(cfg.slots)
            .total_tables(cfg.slots)
            .total_stacks(cfg.slots)
            .max_memories_per_module(1)
            .max_tables_per_module(1)
            .max_memory_size(max_memory)
            // Reset a reused slot's low pages with memset (only the touched ones, found with
            // PAGEMAP_SCAN where the kernel has it) instead of madvise: madvise makes the
            // kernel flush the TLBs of every core running the worker, which at tens of
            // thousands of instances a second costs more than the functions themselves.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 << 10)
            .pagemap_scan(Enabled::Auto)
            // What must still be decommitted is done in batches, one flush per batch.
            .decommit_batch_size((cfg.slots as usize / 4).max(1));
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .epoch_interruption(true)
            // Reservation = the cap, so the pool's address space is slots x cap, not 4 GiB
            // per slot; a small guard region keeps most bounds checks elided.
            .memory_reservation(cfg.max_memory_bytes)
            .memory_guard_size(64 << 10)
            .memory_reservation_for_growth(0)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| Error::Config(format!("{e:#}")))?;
        let mut linker: Linker<Guest> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |g: &mut Guest| &mut g.wasi)
            .map_err(|e| Error::Config(format!("linking WASI: {e:#}")))?;
        crate::sleep_deadline::add(&mut linker)
            .map_err(|e| Error::Config(format!("linking WASI: {e:#}")))?;
        let cache = match &cfg.cache_dir {
            Some(dir) => Some(ArtefactCache::open(dir, &engine)?),
            None => None,
        };
        let stop_ticker = Arc::new(AtomicBool::new(false));
        {
            let (engine, stop, tick) = (engine.clone(), stop_ticker.clone(), cfg.epoch_tick);
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| Error::Config(format!("epoch thread: {e}")))?;
        }
        Ok(Sandbox {
            engine,
            linker,
            cache,
            functions: Mutex::new(HashMap::new()),
            cfg,
            stop_ticker,
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &SandboxConfig {
        &self.cfg
    }

    /// A function already loaded, by module sha256.
    pub fn loaded(&self, sha256: &str) -> Option<Arc<Function>> {
        self.functions.lock().ok()?.get(sha256).cloned()
    }

    /// Verifies `wasm` against `sha256`, then compiles it once (or loads this worker's own
    /// cached artefact) and prepares it for instantiation.
    pub fn load(&self, sha256: &str, wasm: &[u8]) -> Result<Arc<Function>> {
        let actual = hex::encode(Sha256::digest(wasm));
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(Error::HashMismatch {
                expected: sha256.to_string(),
                actual,
            });
        }
        if let Some(f) = self.loaded(&actual) {
            return Ok(f);
        }
        let (module, from_cache) = self.module(&actual, wasm)?;
        match module.get_export("_start") {
            Some(ExternType::Func(ft)) if ft.params().len() == 0 && ft.results().len() == 0 => {}
            _ => return Err(Error::MissingStart),
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| Error::InvalidModule(format!("{e:#}")))?;
        let f = Arc::new(Function {
            sha256: actual.clone(),
            pre,
            from_cache,
        });
        if let Ok(mut map) = self.functions.lock() {
            map.insert(actual, f.clone());
        }
        Ok(f)
    }

    /// Drops a function no longer assigned here (its artefact stays cached on disk).
    pub fn unload(&self, sha256: &str) {
        if let Ok(mut map) = self.functions.lock() {
            map.remove(sha256);
        }
    }

    fn module(&self, sha256: &str, wasm: &[u8]) -> Result<(Module, bool)> {
        if let Some(cache) = &self.cache
            && let Some(artefact) = cache.load(sha256)
        {
            #[allow(unsafe_code)]
            // SAFETY: `load` returns only bytes tagged with this worker's secret key, i.e.
            // bytes this worker's engine produced by `serialize` below; wasmtime itself then
            // checks the engine compatibility header.
            match unsafe { Module::deserialize(&self.engine, &artefact) } {
                Ok(m) => return Ok((m, true)),
                Err(e) => {
                    tracing::warn!(sha256, error = %e, "cached artefact refused; recompiling")
                }
            }
        }
        let module =
            Module::new(&self.engine, wasm).map_err(|e| Error::InvalidModule(format!("{e:#}")))?;
        if let Some(cache) = &self.cache {
            match module.serialize() {
                Ok(bytes) => {
                    if let Err(e) = cache.store(sha256, &bytes) {
                        tracing::warn!(sha256, error = %e, "could not cache the compiled module");
                    }
                }
                Err(e) => tracing::warn!(sha256, error = %e, "could not serialise the module"),
            }
        }
        Ok((module, false))
    }

    /// Runs one invocation of `f` to completion (blocking: call it from a blocking thread).
    pub fn invoke(
        &self,
        f: &Function,
        name: &str,
        input: &InvocationInput,
        limits: &InvocationLimits,
    ) -> Outcome {
        let cap = usize::try_from(limits.max_output_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        let stdout = MemoryOutputPipe::new(cap);
        let stderr = MemoryOutputPipe::new(cap);
        let mut metering = Metering::for_input(&input.stdin, &input.args, &input.env);
        let finish = |metering: Metering, result| {
            let (out, err) = (stdout.contents(), stderr.contents());
            let mut m = metering;
            m.bytes_out = (out.len() + err.len()) as u64;
            let limit = limits.max_output_bytes;
            let result = if out.len() as u64 > limit {
                Err(InvokeError::OutputTooLarge {
                    stream: "stdout",
                    limit,
                })
            } else if err.len() as u64 > limit {
                Err(InvokeError::OutputTooLarge {
                    stream: "stderr",
                    limit,
                })
            } else {
                result
            };
            let keep = |b: &[u8]| b[..b.len().min(limit as usize)].to_vec();
            Outcome {
                stdout: keep(&out),
                stderr: keep(&err),
                result,
                metering: m,
            }
        };
        let mut argv = Vec::with_capacity(input.args.len() + 1);
        argv.push(name);
        argv.extend(input.args.iter().map(String::as_str));
        let mut b = WasiCtxBuilder::new();
        b.args(&argv)
            .stdin(MemoryInputPipe::new(input.stdin.clone()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .secure_random(random_source(&input.random_seed, b"secure"))
            .insecure_random(random_source(&input.random_seed, b"insecure"))
            .insecure_random_seed(u128::from_le_bytes(
                derive_key(&input.random_seed, b"insecure-seed")[..16]
                    .try_into()
                    .expect("16 bytes"),
            ))
            .allow_blocking_current_thread(true);
        for (k, v) in &input.env {
            b.env(k, v);
        }
        for d in &limits.dirs {
            if let Err(e) = b.preopened_dir(&d.host, &d.guest, FsPerms::ReadWrite) {
                return finish(
                    metering,
                    Err(InvokeError::Instantiate(format!(
                        "directory {} as {}: {e:#}",
                        d.host.display(),
                        d.guest
                    ))),
                );
            }
        }
        // A limit above the pool's slot cannot be honoured: the slot is the real bound, and
        // hitting it is this call's MEMORY_LIMIT (not a guest trap from a failed grow).
        let limit_bytes = limits.memory_bytes.min(self.cfg.max_memory_bytes);
        let limit = usize::try_from(limit_bytes).unwrap_or(usize::MAX);
        let mut store = Store::new(
            &self.engine,
            Guest {
                wasi: b.build_p1(),
                memory: MemoryMeter {
                    limit,
                    peak: 0,
                    refused: None,
                },
                deadline: crate::clock::now() + limits.timeout,
            },
        );
        store.limiter(|g| &mut g.memory);
        if let Err(e) = store.set_fuel(limits.fuel) {
            return finish(metering, Err(InvokeError::Instantiate(format!("{e:#}"))));
        }
        let tick = self.cfg.epoch_tick.as_nanos().max(1);
        let ticks = limits.timeout.as_nanos().div_ceil(tick).max(1);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store.epoch_deadline_trap();
        let started = crate::clock::now();
        let ran = match f.pre.instantiate(&mut store) {
            Ok(instance) => match instance.get_typed_func::<(), ()>(&mut store, "_start") {
                Ok(start) => start.call(&mut store, ()).map_err(Some),
                Err(e) => Err(Some(e)),
            },
            Err(e) => {
                // Instantiation itself (not the guest) failed: a limit the module's
                // declared minimums exceed, or no free slot.
                let refused = store.data().memory.refused;
                metering.wall_us = started.elapsed().as_micros() as u64;
                let err = match refused {
                    Some(wanted) => InvokeError::MemoryLimit {
                        wanted: wanted as u64,
                        limit: limit_bytes,
                    },
                    None => InvokeError::Instantiate(format!("{e:#}")),
                };
                return finish(metering, Err(err));
            }
        };
        metering.wall_us = started.elapsed().as_micros() as u64;
        metering.fuel = limits.fuel - store.get_fuel().unwrap_or(0);
        metering.peak_memory_bytes = store.data().memory.peak as u64;
        let refused = store.data().memory.refused;
        drop(store);
        let result = match ran {
            Ok(()) => {
                metering.exit_code = 0;
                Ok(())
            }
            Err(None) => Ok(()),
            Err(Some(e)) => {
                if let Some(exit) = e.downcast_ref::<I32Exit>() {
                    metering.exit_code = exit.0;
                    if exit.0 == 0 {
                        Ok(())
                    } else {
                        Err(InvokeError::Exit(exit.0))
                    }
                } else if let Some(wanted) = refused {
                    Err(InvokeError::MemoryLimit {
                        wanted: wanted as u64,
                        limit: limit_bytes,
                    })
                } else {
                    match e.downcast_ref::<Trap>() {
                        Some(Trap::OutOfFuel) => Err(InvokeError::OutOfFuel {
                            budget: limits.fuel,
                        }),
                        Some(Trap::Interrupt) => Err(InvokeError::DeadlineExceeded {
                            timeout_ms: limits.timeout.as_millis() as u64,
                        }),
                        _ => Err(InvokeError::Trap(trap_message(&e))),
                    }
                }
            }
        };
        finish(metering, result)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// A key for one of the invocation's random streams: the seed hashed with the stream's
/// purpose, so the secure and insecure sources never share bytes.
fn derive_key(seed: &[u8; 32], purpose: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"stellar-wasi-random/v2/");
    h.update(purpose);
    h.update(seed);
    h.finalize().into()
}

/// A ChaCha20 stream keyed from the invocation's secret seed (a CSPRNG: one output reveals
/// nothing about the next).
fn random_source(seed: &[u8; 32], purpose: &[u8]) -> chacha20::ChaCha20Rng {
    use chacha20::rand_core::SeedableRng;
    chacha20::ChaCha20Rng::from_seed(derive_key(seed, purpose))
}

/// The call's seed as its dispatcher sent it, or, when it sent none, a fresh one from the
/// OS (unpredictable, but the call is then not replayable).
pub fn seed_or_fresh(seed: &[u8]) -> std::result::Result<[u8; 32], String> {
    if let Ok(s) = <[u8; 32]>::try_from(seed) {
        return Ok(s);
    }
    if !seed.is_empty() {
        return Err(format!("random seed is {} bytes; expected 32", seed.len()));
    }
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).map_err(|e| format!("no OS randomness: {e}"))?;
    Ok(s)
}

/// The trap's own message first (e.g. "wasm `unreachable` instruction executed"), then the
/// top of its wasm backtrace.
fn trap_message(e: &wasmtime::Error) -> String {
    let full = format!("{e:#}");
    let frames: Vec<&str> = full.lines().filter(|l| l.contains("0x")).take(6).collect();
    let head = match e.downcast_ref::<Trap>() {
        Some(t) => t.to_string(),
        None => full.lines().last().unwrap_or_default().trim().to_string(),
    };
    if frames.is_empty() {
        head
    } else {
        format!("{head}\n{}", frames.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::InvokeError;

    #[test]
    fn every_call_error_is_in_the_one_list_of_stable_codes() {
        let all = [
            InvokeError::OutOfFuel { budget: 1 },
            InvokeError::DeadlineExceeded { timeout_ms: 1 },
            InvokeError::MemoryLimit {
                wanted: 2,
                limit: 1,
            },
            InvokeError::OutputTooLarge {
                stream: "stdout",
                limit: 1,
            },
            InvokeError::Trap(String::new()),
            InvokeError::Exit(1),
            InvokeError::Instantiate(String::new()),
            InvokeError::PidsLimit { limit: 1 },
            InvokeError::Signalled(9),
            InvokeError::ImageInvalid(String::new()),
            InvokeError::Sandbox(String::new()),
        ];
        for e in all {
            assert!(
                stellar_proto::wire::CALL_ERROR_CODES
                    .iter()
                    .any(|c| c.code == e.code()),
                "{} is not in CALL_ERROR_CODES",
                e.code()
            );
        }
    }
}
