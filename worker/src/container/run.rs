//! Runs one container call from the worker's side: the image's layers in the cache, a
//! private writable layer, a cgroup with the call's limits, the init started with its spec,
//! output streamed while it runs, the deadline and output cap enforced, then the cgroup's
//! counters read into a [`Metering`] and everything removed, whatever happened.
//!
//! ```text
//! ImageArchive ─▶ LayerCache::ensure (each layer once per node)
//!   runs/<id> (a tmpfs inside the run: upper, work, rootfs) ─▶ cgroup (memory, pids, cpu)
//!   spawn `stellar __container-init` (fd 3 status, fd 4 spec) ─▶ join cgroup ─▶ send spec
//!   stdin ─▶ │ stdout/stderr ─▶ sink (as they come) │ deadline / output cap ─▶ kill the group
//!   status report + exit ─▶ cgroup counters ─▶ Metering + typed result
//!   guard: kill what is left, rmdir the cgroup, remove runs/<id>
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use command_fds::CommandFdExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cgroup::{CgroupLimits, CgroupUsage, ContainerCgroup};
use super::image::{ImageArchive, ImageConfig, ImageError};
use super::init::{InitReport, child_fds};
use super::layers::LayerCache;
use super::spec::{Bind, INIT_ARG, InitSpec};
use crate::sandbox::{InvokeError, Metering, Preopen};

/// The host uid and gid a container's root runs as by default: unprivileged on the host,
/// owning nothing there (as `userns-remap` and rootless runtimes do).
pub const DEFAULT_HOST_ID: u32 = 100_000;

/// What one container call may use.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerLimits {
    /// Memory of every process together, bytes (past it: OOM kill, `MEMORY_LIMIT`).
    pub memory_bytes: u64,
    /// Wall-clock deadline (past it: every process killed, `DEADLINE_EXCEEDED`).
    pub timeout: Duration,
    /// Processes and threads (a refused fork is `PIDS_LIMIT` unless it still succeeds).
    pub pids: u64,
    /// CPU, thousandths of a core.
    pub cpu_millis: u64,
    /// Per stream, bytes (past it: killed, `OUTPUT_TOO_LARGE`).
    pub max_output_bytes: u64,
    /// The private `/tmp`, MiB (counted in `memory_bytes`: it is tmpfs).
    pub tmp_mib: u32,
    /// The private writable layer over the image, MiB (tmpfs too, counted the same way).
    pub scratch_mib: u32,
}

impl Default for ContainerLimits {
    fn default() -> Self {
        ContainerLimits {
            memory_bytes: 128 << 20,
            timeout: Duration::from_secs(10),
            pids: 64,
            cpu_millis: 1000,
            max_output_bytes: 1 << 20,
            tmp_mib: 64,
            scratch_mib: stellar_proto::limits::CONTAINER_SCRATCH_MIB,
        }
    }
}

/// One call of a container function.
#[derive(Debug, Clone, Default)]
pub struct ContainerCall {
    /// Arguments replacing the image's CMD (none: the image's CMD).
    pub args: Vec<String>,
    /// Environment added to (and overriding) the image's.
    pub env: Vec<(String, String)>,
    /// The program's stdin.
    pub stdin: Vec<u8>,
    /// Host directories bound read-write into the container.
    pub dirs: Vec<Preopen>,
    /// Limits.
    pub limits: ContainerLimits,
}

/// Which of the program's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

/// How one call ended and what it used.
#[derive(Debug, Clone)]
pub struct ContainerOutcome {
    /// Success, or why not (the same codes as for wasm, plus the container ones).
    pub result: Result<(), InvokeError>,
    /// What it used.
    pub metering: Metering,
}

/// The node's container runtime: a layer cache and the runs made from it.
#[derive(Debug, Clone)]
pub struct ContainerRuntime {
    base: PathBuf,
    cgroup_parent: String,
    layers: LayerCache,
    host_uid: u32,
    host_gid: u32,
    copy_layers: bool,
}

impl ContainerRuntime {
    /// The runtime rooted at `dir` (layers/ and runs/ under it); runs a crash left behind
    /// are removed (their writable layers were tmpfs in their own namespaces: already gone).
    pub fn open(dir: &Path) -> Result<ContainerRuntime, String> {
        Self::open_as(dir, DEFAULT_HOST_ID, DEFAULT_HOST_ID)
    }

    /// As [`ContainerRuntime::open`], with the container's root mapped to `uid`/`gid`.
    pub fn open_as(dir: &Path, uid: u32, gid: u32) -> Result<ContainerRuntime, String> {
        let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", dir.display());
        std::fs::create_dir_all(dir.join("runs")).map_err(|e| io("cannot create", e))?;
        let base = dir.canonicalize().map_err(|e| io("cannot resolve", e))?;
        // The sandbox uid walks base/runs/<id> (and nothing above it: paths are relative).
        for d in [base.clone(), base.join("runs")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| io("cannot set permissions on", e))?;
        }
        let cgroup_parent = cgroup_parent_for(&base);
        if let Ok(runs) = std::fs::read_dir(base.join("runs")) {
            for r in runs.flatten() {
                // A run another process (another `stellar run`) holds is not left behind.
                if !abandoned(&r.path()) {
                    continue;
                }
                let id = r.file_name().to_string_lossy().into_owned();
                let name = format!("{cgroup_parent}/{id}");
                let _ = ContainerCgroup::existing(&name).remove();
                let _ = std::fs::remove_dir_all(r.path());
            }
        }
        let layers = LayerCache::open(base.join("layers"), uid, gid)
            .map_err(|e| io("cannot open the layer cache in", e))?;
        let copy_layers = super::copies_layers();
        if copy_layers {
            tracing::info!(
                "container roots are copies of their layers (no overlayfs, or STELLAR_CONTAINER_ROOTFS=copy)"
            );
        }
        Ok(ContainerRuntime {
            base,
            cgroup_parent,
            layers,
            host_uid: uid,
            host_gid: gid,
            copy_layers,
        })
    }

    /// The host uid and gid the container's root runs as (what a bound dir must be owned by
    /// for it to write there).
    pub fn host_ids(&self) -> (u32, u32) {
        (self.host_uid, self.host_gid)
    }

    /// The node's layer cache.
    pub fn layers(&self) -> &LayerCache {
        &self.layers
    }

    /// Unpacks the image's layers that this node does not have yet.
    pub fn prepare(&self, image: &ImageArchive) -> Result<(), ImageError> {
        for l in &image.layers {
            self.layers.ensure(&image.path, l)?;
        }
        Ok(())
    }

    /// Runs one call of an image archive (its layers unpacked first where missing); output
    /// goes to `sink` as the program writes it.
    pub async fn run(
        &self,
        image: &ImageArchive,
        call: ContainerCall,
        sink: &mut (dyn FnMut(OutputStream, &[u8]) + Send),
    ) -> ContainerOutcome {
        let prepared = {
            let (rt, img) = (self.clone(), image.clone());
            tokio::task::spawn_blocking(move || rt.prepare(&img)).await
        };
        let metering = || Metering::for_input(&call.stdin, &call.args, &call.env);
        match prepared {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return failed(metering(), InvokeError::ImageInvalid(e.to_string())),
            Err(e) => return failed(metering(), InvokeError::Sandbox(e.to_string())),
        }
        self.run_cached(&image.config, &image.layer_shas(), call, sink)
            .await
    }

    /// Runs one call of an image whose layers (content addresses, bottom first) are all in
    /// the layer cache, as a worker's are once its instance is ready.
    pub async fn run_cached(
        &self,
        config: &ImageConfig,
        layers: &[String],
        call: ContainerCall,
        sink: &mut (dyn FnMut(OutputStream, &[u8]) + Send),
    ) -> ContainerOutcome {
        let mut metering = Metering::for_input(&call.stdin, &call.args, &call.env);
        let t0 = crate::clock::now();
        if let Some(missing) = layers.iter().find(|l| !self.layers.has(l)) {
            return failed(
                metering,
                InvokeError::ImageInvalid(format!("layer {missing} is not in the layer cache")),
            );
        }
        let mut id = [0u8; 8];
        if let Err(e) = getrandom::fill(&mut id) {
            return failed(
                metering,
                InvokeError::Sandbox(format!("no randomness: {e}")),
            );
        }
        let id = hex::encode(id);
        let mut guard = RunGuard {
            dir: self.base.join("runs").join(&id),
            cgroup: None,
            lock: None,
        };
        tracing::debug!(
            us = t0.elapsed().as_micros() as u64,
            "container: layers ready"
        );
        let spec = match self.prepare_run(&id, config, layers, &call, &mut guard) {
            Ok(spec) => spec,
            Err(e) => return failed(metering, InvokeError::Sandbox(e)),
        };
        tracing::debug!(us = t0.elapsed().as_micros() as u64, run = %id, "container: run dir and cgroup ready");
        let started = crate::clock::now();
        let result = self
            .supervise(spec, &call, &mut guard, sink, &mut metering)
            .await;
        metering.wall_us = started.elapsed().as_micros() as u64;
        let usage = guard
            .cgroup
            .as_ref()
            .map(ContainerCgroup::usage)
            .unwrap_or_default();
        metering.cpu_ns = usage.cpu_ns;
        metering.peak_memory_bytes = usage.peak_memory_bytes;
        // The program's own processes: the init's two are not billed.
        metering.pids_peak = metering
            .pids_peak
            .max(usage.pids_peak)
            .saturating_sub(INIT_PROCESSES);
        let result = classify(result, &usage, &call.limits, &mut metering);
        tracing::debug!(
            us = t0.elapsed().as_micros() as u64,
            "container: ended, counters read"
        );
        drop(guard);
        tracing::debug!(
            us = t0.elapsed().as_micros() as u64,
            "container: cleaned up"
        );
        ContainerOutcome { result, metering }
    }

    /// The run's directories and cgroup, and the init's spec.
    fn prepare_run(
        &self,
        id: &str,
        config: &ImageConfig,
        layers: &[String],
        call: &ContainerCall,
        guard: &mut RunGuard,
    ) -> Result<InitSpec, String> {
        let rel = PathBuf::from("runs").join(id);
        let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
        std::fs::create_dir_all(&guard.dir).map_err(|e| io(&guard.dir, e))?;
        let lock = File::create(guard.dir.join(LOCK)).map_err(|e| io(&guard.dir, e))?;
        guard.lock = Some(
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| format!("cannot lock the run: {e}"))?,
        );
        let limits = &call.limits;
        guard.cgroup = Some(ContainerCgroup::create(
            &format!("{}/{id}", self.cgroup_parent),
            CgroupLimits {
                memory_bytes: limits.memory_bytes,
                // The init's two processes (the reporter and pid 1) are the group's too.
                pids: limits.pids + INIT_PROCESSES,
                cpu_millis: limits.cpu_millis,
            },
        )?);
        let mut env: Vec<String> = config.env.clone();
        for (k, v) in &call.env {
            env.retain(|kv| kv.split_once('=').is_none_or(|(ek, _)| ek != k));
            env.push(format!("{k}={v}"));
        }
        if !env.iter().any(|kv| kv.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        let binds = call
            .dirs
            .iter()
            .map(|d| {
                let host = d.host.canonicalize().map_err(|e| io(&d.host, e))?;
                if !d.guest.starts_with('/') || d.guest.split('/').any(|c| c == "..") {
                    return Err(format!(
                        "{}: give an absolute path inside the container",
                        d.guest
                    ));
                }
                Ok(Bind {
                    host,
                    guest: d.guest.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(InitSpec {
            base: self.base.clone(),
            lower: layers
                .iter()
                .rev()
                .map(|l| PathBuf::from("layers").join(l))
                .collect(),
            run_dir: rel,
            scratch_mib: limits.scratch_mib,
            host_uid: self.host_uid,
            host_gid: self.host_gid,
            hostname: format!("stellar-{}", &id[..8]),
            argv: config.argv(&call.args),
            env,
            cwd: config.working_dir.clone(),
            binds,
            tmp_mib: limits.tmp_mib,
            copy_layers: self.copy_layers,
        })
    }

    /// Starts the init and sees the call through; the init's report, or why there is none.
    async fn supervise(
        &self,
        spec: InitSpec,
        call: &ContainerCall,
        guard: &mut RunGuard,
        sink: &mut (dyn FnMut(OutputStream, &[u8]) + Send),
        metering: &mut Metering,
    ) -> Supervised {
        let started_at = crate::clock::now();
        let Some(cgroup) = guard.cgroup.as_ref() else {
            return Supervised::Fault("no cgroup".into());
        };
        let pipes = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .and_then(|s| nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map(|p| (s, p)));
        let ((status_r, status_w), (spec_r, spec_w)) = match pipes {
            Ok(p) => p,
            Err(e) => return Supervised::Fault(format!("pipe: {e}")),
        };
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        cmd.arg(INIT_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Err(e) = cmd.fd_mappings(child_fds(status_w, spec_r)) {
            return Supervised::Fault(e.to_string());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Supervised::Fault(format!("cannot start the container init: {e}")),
        };
        drop(cmd); // closes our copies of the child's ends
        let pid = child.id().unwrap_or(0);
        tracing::debug!(
            us = crate::clock::now().duration_since(started_at).as_micros() as u64,
            pid,
            "container: init spawned"
        );
        if let Err(e) = cgroup.add(pid) {
            return Supervised::Fault(e);
        }
        tracing::debug!(
            us = crate::clock::now().duration_since(started_at).as_micros() as u64,
            "container: init in its cgroup"
        );
        // The init reads its spec only now that it is inside the cgroup.
        let spec_json = serde_json::to_vec(&spec).unwrap_or_default();
        let spec_write = tokio::task::spawn_blocking(move || {
            let mut f = File::from(spec_w);
            f.write_all(&spec_json)
        });
        let status_read = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            let _ = File::from(status_r).read_to_string(&mut s);
            s
        });
        let mut stdin = child.stdin.take();
        let input = call.stdin.clone();
        let feed = tokio::spawn(async move {
            if let Some(w) = stdin.as_mut() {
                let _ = w.write_all(&input).await;
            }
            drop(stdin);
        });
        let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
        let (mut obuf, mut ebuf) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
        let cap = call.limits.max_output_bytes;
        let mut stdout_cap = OutputCap::new(OutputStream::Stdout, cap);
        let mut stderr_cap = OutputCap::new(OutputStream::Stderr, cap);
        let deadline = tokio::time::sleep(call.limits.timeout);
        tokio::pin!(deadline);
        let mut sample = tokio::time::interval(Duration::from_millis(20));
        let mut ended = None;
        let mut stopped: Option<Supervised> = None;
        while out.is_some() || err.is_some() || ended.is_none() {
            tokio::select! {
                r = read_some(&mut out, &mut obuf) => {
                    if let Some(n) = r && stdout_cap.pass(&obuf[..n], sink) && stopped.is_none() {
                        stopped = Some(Supervised::Output("stdout"));
                        cgroup.kill_all();
                    }
                }
                r = read_some(&mut err, &mut ebuf) => {
                    if let Some(n) = r && stderr_cap.pass(&ebuf[..n], sink) && stopped.is_none() {
                        stopped = Some(Supervised::Output("stderr"));
                        cgroup.kill_all();
                    }
                }
                s = child.wait(), if ended.is_none() => ended = Some(s),
                _ = &mut deadline, if stopped.is_none() => {
                    stopped = Some(Supervised::Deadline);
                    cgroup.kill_all();
                }
                _ = sample.tick() => {
                    metering.pids_peak = metering.pids_peak.max(cgroup.pids_current());
                }
            }
        }
        metering.bytes_out = stdout_cap.seen + stderr_cap.seen;
        feed.abort();
        let _ = spec_write.await;
        let report = status_read.await.unwrap_or_default();
        tracing::debug!(
            us = crate::clock::now().duration_since(started_at).as_micros() as u64,
            "container: init reported"
        );
        if let Some(s) = stopped {
            return s;
        }
        match report
            .lines()
            .find_map(|l| serde_json::from_str::<InitReport>(l).ok())
        {
            Some(r) => Supervised::Report(r),
            None => Supervised::Fault(format!(
                "the container init ended without a report ({:?})",
                ended.and_then(Result::ok)
            )),
        }
    }
}

/// Whether a run directory's owner is gone: its lock can be taken, or it has none and is
/// older than a minute (a run creates its lock right after its directory).
fn abandoned(dir: &Path) -> bool {
    match File::open(dir.join(LOCK)) {
        Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok(),
        Err(_) => std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(60)),
    }
}

/// Processes of the init in each run's cgroup: stage 1 (the reporter) and stage 2 (pid 1).
const INIT_PROCESSES: u64 = 2;

/// The lock file a live run holds (flock) in its directory.
const LOCK: &str = "lock";

/// The cgroup every run of the runtime in `base` is made under: `stellar/<12 hex of
/// sha256(base)>`, so two runtimes on one machine never remove each other's groups.
pub fn cgroup_parent_for(base: &Path) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(base.as_os_str().as_encoded_bytes());
    format!("{}/{}", super::cgroup::PARENT, &hex::encode(h)[..12])
}

/// One output stream's cap: what fits goes to the sink, everything is counted.
struct OutputCap {
    stream: OutputStream,
    cap: u64,
    seen: u64,
}

impl OutputCap {
    fn new(stream: OutputStream, cap: u64) -> OutputCap {
        OutputCap {
            stream,
            cap,
            seen: 0,
        }
    }

    /// Passes on what fits under the cap; true once the stream has gone past it.
    fn pass(&mut self, bytes: &[u8], sink: &mut (dyn FnMut(OutputStream, &[u8]) + Send)) -> bool {
        let keep = self.cap.saturating_sub(self.seen).min(bytes.len() as u64) as usize;
        if keep > 0 {
            sink(self.stream, &bytes[..keep]);
        }
        self.seen += bytes.len() as u64;
        self.seen > self.cap
    }
}

/// How supervision ended, before the cgroup's counters are read.
enum Supervised {
    /// The init reported.
    Report(InitReport),
    /// The deadline passed and the group was killed.
    Deadline,
    /// A stream went past the cap and the group was killed.
    Output(&'static str),
    /// The worker could not run the init.
    Fault(String),
}

async fn read_some(
    r: &mut Option<impl tokio::io::AsyncRead + Unpin>,
    buf: &mut [u8],
) -> Option<usize> {
    let Some(reader) = r.as_mut() else {
        return std::future::pending().await;
    };
    match reader.read(buf).await {
        Ok(0) | Err(_) => {
            *r = None;
            None
        }
        Ok(n) => Some(n),
    }
}

fn failed(metering: Metering, e: InvokeError) -> ContainerOutcome {
    ContainerOutcome {
        result: Err(e),
        metering,
    }
}

/// The typed result: resource limits first (they explain a kill), then how it ended.
fn classify(
    s: Supervised,
    usage: &CgroupUsage,
    limits: &ContainerLimits,
    metering: &mut Metering,
) -> Result<(), InvokeError> {
    let memory = InvokeError::MemoryLimit {
        wanted: usage.peak_memory_bytes,
        limit: limits.memory_bytes,
    };
    let pids = InvokeError::PidsLimit { limit: limits.pids };
    match s {
        // The OOM killer may pick the init itself (it cannot always shield itself: that
        // needs CAP_SYS_RESOURCE), which then ends without a report: still the memory limit.
        Supervised::Fault(_) if usage.oom_kills > 0 => Err(memory),
        Supervised::Fault(m) => Err(InvokeError::Sandbox(m)),
        Supervised::Report(InitReport::Failed(f)) if f.image => {
            Err(InvokeError::ImageInvalid(f.message))
        }
        Supervised::Report(InitReport::Failed(f)) => Err(InvokeError::Sandbox(f.message)),
        Supervised::Report(InitReport::Exited(0)) => {
            metering.exit_code = 0;
            Ok(())
        }
        _ if usage.oom_kills > 0 => Err(memory),
        Supervised::Deadline if usage.pids_limit_hits > 0 => Err(pids),
        Supervised::Deadline => Err(InvokeError::DeadlineExceeded {
            timeout_ms: limits.timeout.as_millis() as u64,
        }),
        Supervised::Output(stream) => Err(InvokeError::OutputTooLarge {
            stream,
            limit: limits.max_output_bytes,
        }),
        Supervised::Report(InitReport::Exited(c)) => {
            metering.exit_code = c;
            Err(if usage.pids_limit_hits > 0 {
                pids
            } else {
                InvokeError::Exit(c)
            })
        }
        Supervised::Report(InitReport::Signalled(s)) => {
            metering.exit_code = 128 + s;
            Err(if usage.pids_limit_hits > 0 {
                pids
            } else {
                InvokeError::Signalled(s)
            })
        }
    }
}

/// Removes a run's cgroup (killing what is left in it) and directories when dropped.
struct RunGuard {
    dir: PathBuf,
    cgroup: Option<ContainerCgroup>,
    /// Held for the run's life, so a runtime opened meanwhile leaves this run alone.
    lock: Option<nix::fcntl::Flock<File>>,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Some(g) = self.cgroup.take()
            && let Err(e) = g.remove()
        {
            tracing::warn!(error = %e, "container cgroup left behind");
        }
        if self.dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "container run dir left behind");
        }
    }
}
