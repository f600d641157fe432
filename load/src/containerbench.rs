//! `container-bench`: a container's cold start through the shipped `stellar` binary, against
//! `crun` on the same rootfs, namespaces, uid map, limits and seccomp allow-list, in the same
//! run (alternating, so both see the same machine).
//!
//! ```text
//!  image:  busybox (static) packed by examples/images/oci_archive.py; unpacked once by a
//!          warm-up `stellar run` (the image is cached: what is timed is the sandbox)
//!  stellar: `stellar run IMAGE --command /bin/true`   one process: index the image, cgroup,
//!           namespaces, overlay + private upper, seccomp, run, read counters, tear down
//!  crun:    `crun run` (create + start + wait + delete) of a bundle whose root is the very
//!           layer directory stellar unpacked (read-only, so crun skips the overlay stellar
//!           makes), same user namespace map, namespaces, cgroup limits and allow-list
//!  sandbox: inside each stellar run, its -v record's sandbox_us: the runtime's own time
//!           (what a long-lived worker pays per cold start; no CLI process start)
//!  host:    the same /bin/true exec'd directly (the floor)
//!  throughput: `stellar run` on `threads` runners at once, runs per second
//! ```

// Benchmark timers read the wall clock by design.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::wasmbench::percentile_us;

/// What `container-bench` is asked to do.
#[derive(Debug, Clone)]
pub struct ContainerBenchConfig {
    /// The shipped `stellar` binary.
    pub stellar: PathBuf,
    /// The peer runtime.
    pub crun: PathBuf,
    /// Timed cold starts per side.
    pub runs: usize,
    /// Concurrent runners in the throughput phase.
    pub threads: usize,
}

/// The benchmark's figures (the `--json` object).
#[derive(Debug, Clone, Serialize)]
pub struct ContainerBenchReport {
    /// `stellar run IMAGE --command /bin/true`, median, ms.
    pub cold_start_p50_ms: f64,
    /// Same, 99th percentile, ms.
    pub cold_start_p99_ms: f64,
    /// `stellar run` completions per second with `threads` runners.
    pub invocations_per_sec: f64,
    /// Runners in the throughput phase.
    pub threads: usize,
    /// The same `/bin/true` exec'd on the host, median, ms.
    pub host_exec_p50_ms: f64,
    /// `crun run` (create + start + wait + delete), median, ms.
    pub crun_p50_ms: f64,
    /// Same, 99th percentile, ms.
    pub crun_p99_ms: f64,
    /// `cold_start_p50_ms / crun_p50_ms`.
    pub stellar_vs_crun_p50: f64,
    /// The sandbox's own time inside each `stellar run` (its `-v` record's `sandbox_us`):
    /// what a long-lived worker pays per cold start, without a CLI process start. Median, ms.
    pub sandbox_p50_ms: f64,
    /// Same, 99th percentile, ms.
    pub sandbox_p99_ms: f64,
    /// `sandbox_p50_ms / crun_p50_ms` (crun's figure includes its own process start).
    pub sandbox_vs_crun_p50: f64,
    /// Timed runs per side.
    pub runs: usize,
    /// What one stellar sample is.
    pub stellar_unit: &'static str,
    /// What one crun sample is.
    pub crun_unit: &'static str,
}

/// Failures of the benchmark itself.
#[derive(Debug, thiserror::Error)]
pub enum ContainerBenchError {
    /// A helper program failed or is missing.
    #[error("{0}")]
    Process(String),
}

fn fail(what: &str, e: impl std::fmt::Display) -> ContainerBenchError {
    ContainerBenchError::Process(format!("{what}: {e}"))
}

/// Packs the machine's static busybox (Debian's busybox-static) into an OCI image archive
/// in `dir`, with the example packer; its path. The container tests use it too.
pub fn build_busybox_image(dir: &Path) -> Result<PathBuf, ContainerBenchError> {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "dev", "root", "mnt"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| fail("rootfs", e))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).map_err(|e| {
        fail(
            "/bin/busybox (install Debian's busybox-static; scripts/test.sh does)",
            e,
        )
    })?;
    let applets = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .map_err(|e| fail("busybox --list", e))?;
    for a in String::from_utf8_lossy(&applets.stdout).lines() {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(a));
    }
    let image = dir.join("busybox.tar");
    let packer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/images/oci_archive.py");
    let out = Command::new("python3")
        .arg(packer)
        .arg(&root)
        .arg(&image)
        .args(["--cmd", r#"["sh"]"#, "--gzip"])
        .output()
        .map_err(|e| fail("python3", e))?;
    if !out.status.success() {
        return Err(fail("oci_archive.py", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(image)
}

/// One timed run of a command that must succeed; its wall time, µs.
fn timed(cmd: &mut Command, what: &str) -> Result<u32, ContainerBenchError> {
    timed_output(cmd, what).map(|(us, _)| us)
}

/// As [`timed`], with the command's stderr.
fn timed_output(cmd: &mut Command, what: &str) -> Result<(u32, String), ContainerBenchError> {
    let t = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(what, e))?;
    let us = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(fail(what, format!("{}: {stderr}", out.status)));
    }
    Ok((us, stderr))
}

/// The `sandbox_us` of a `stellar run -v` record (its last stderr line).
fn sandbox_us(stderr: &str) -> Result<u32, ContainerBenchError> {
    stderr
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["sandbox_us"].as_u64())
        .map(|us| us.min(u64::from(u32::MAX)) as u32)
        .ok_or_else(|| fail("stellar run -v", format!("no sandbox_us in: {stderr}")))
}

/// The OCI runtime config for crun: the same sandbox `stellar run` builds.
fn crun_config(rootfs: &Path, cgroup: &str) -> serde_json::Value {
    let arch = match std::env::consts::ARCH {
        "aarch64" => "SCMP_ARCH_AARCH64",
        _ => "SCMP_ARCH_X86_64",
    };
    let id = stellar_worker::container::DEFAULT_HOST_ID;
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/true"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "noNewPrivileges": true,
            "rlimits": [{"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]
        },
        "root": {"path": rootfs, "readonly": true},
        "hostname": "crun-bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "noexec", "mode=755", "size=64k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=64m"]}
        ],
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": id, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": id, "size": 1}],
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "user"}, {"type": "cgroup"}
            ],
            "resources": {
                "memory": {"limit": 128u64 << 20},
                "pids": {"limit": 65},
                "cpu": {"quota": 100000, "period": 100000}
            },
            "cgroupsPath": cgroup,
            "seccomp": {
                "defaultAction": "SCMP_ACT_ERRNO",
                "defaultErrnoRet": 1,
                "architectures": [arch],
                "syscalls": [
                    {"names": stellar_worker::container::seccomp::allowed_names(), "action": "SCMP_ACT_ALLOW"},
                    {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [{
                        "index": 0, "op": "SCMP_CMP_MASKED_EQ",
                        "value": stellar_worker::container::seccomp::CLONE_NAMESPACE_MASK, "valueTwo": 0
                    }]},
                    {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
                ]
            },
            "maskedPaths": [],
            "readonlyPaths": []
        }
    })
}

/// The environment variable that marks the re-executed benchmark.
const IN_PRIVATE_NS: &str = "STELLAR_BENCH_PRIVATE_MOUNTS";
/// Where a hybrid machine mounts its cgroup2 hierarchy.
const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// On a hybrid cgroup machine whose cgroup2 hierarchy holds a controller (crun refuses to
/// run there), re-runs this command in a private mount namespace with that hierarchy
/// unmounted, for both sides alike; the child's exit code. `None`: go on here.
pub fn reexec_without_hybrid_cgroup2() -> Option<std::process::ExitCode> {
    if std::env::var_os(IN_PRIVATE_NS).is_some() {
        let out = Command::new("umount").args(["-l", UNIFIED]).output();
        if !out.is_ok_and(|o| o.status.success()) {
            eprintln!("[container-bench] could not unmount {UNIFIED} in the private namespace");
        }
        return None;
    }
    let controllers = std::fs::read_to_string(Path::new(UNIFIED).join("cgroup.controllers"));
    if !controllers.is_ok_and(|c| !c.trim().is_empty()) {
        return None;
    }
    eprintln!(
        "[container-bench] hybrid cgroups with controllers on {UNIFIED}: re-running in a private mount namespace without it"
    );
    let status = std::env::current_exe().and_then(|exe| {
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .env(IN_PRIVATE_NS, "1")
            .status()
    });
    Some(match status {
        Ok(s) if s.success() => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("container-bench: unshare: {e}");
            std::process::ExitCode::FAILURE
        }
    })
}

/// Runs the benchmark; `log` gets progress lines.
pub fn run(
    cfg: &ContainerBenchConfig,
    log: &mut dyn FnMut(&str),
) -> Result<ContainerBenchReport, ContainerBenchError> {
    let work = tempfile::tempdir().map_err(|e| fail("tempdir", e))?;
    let image = build_busybox_image(work.path())?;
    let cache = work.path().join("cache");
    let stellar_true = || {
        let mut c = Command::new(&cfg.stellar);
        c.arg("run")
            .arg(&image)
            .arg("--cache-dir")
            .arg(&cache)
            .args(["--command", "/bin/true"]);
        c
    };
    log("warm-up: unpacking the image once");
    timed(&mut stellar_true(), "stellar run")?;
    let layers: Vec<PathBuf> = std::fs::read_dir(cache.join("layers"))
        .map_err(|e| fail("layer cache", e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.len() == 64))
        .collect();
    let [rootfs] = layers.as_slice() else {
        return Err(fail("layer cache", "expected exactly one unpacked layer"));
    };
    let bundle = work.path().join("bundle");
    let state = work.path().join("crun-state");
    std::fs::create_dir_all(&bundle).map_err(|e| fail("bundle", e))?;
    let crun = |i: usize| -> Result<u32, ContainerBenchError> {
        let config = crun_config(rootfs, &format!("/stellar-bench/crun-{i}"));
        std::fs::write(bundle.join("config.json"), config.to_string())
            .map_err(|e| fail("config.json", e))?;
        timed(
            Command::new(&cfg.crun)
                .arg("--root")
                .arg(&state)
                .args(["--cgroup-manager", "cgroupfs", "run", "--bundle"])
                .arg(&bundle)
                .arg(format!("bench-{i}")),
            "crun run",
        )
    };
    crun(0)?; // warm-up (and a check that crun takes this bundle)
    log(&format!(
        "cold starts: {} stellar and {} crun, alternating",
        cfg.runs, cfg.runs
    ));
    let (mut ours, mut theirs, mut host) = (Vec::new(), Vec::new(), Vec::new());
    let mut sandbox = Vec::new();
    for i in 0..cfg.runs {
        let (us, stderr) = timed_output(stellar_true().arg("-v"), "stellar run")?;
        ours.push(us);
        sandbox.push(sandbox_us(&stderr)?);
        theirs.push(crun(i + 1)?);
        host.push(timed(
            &mut Command::new(rootfs.join("bin/true")),
            "host /bin/true",
        )?);
    }
    for v in [&mut ours, &mut theirs, &mut host, &mut sandbox] {
        v.sort_unstable();
    }
    log(&format!("throughput: {} runners", cfg.threads));
    let total = cfg.runs.max(cfg.threads);
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let runners: Vec<_> = (0..cfg.threads.max(1))
        .map(|_| {
            let next = next.clone();
            let mut cmd = stellar_true();
            std::thread::spawn(move || -> Result<(), ContainerBenchError> {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    timed(&mut cmd, "stellar run")?;
                }
                Ok(())
            })
        })
        .collect();
    for r in runners {
        r.join().map_err(|_| fail("runner", "panicked"))??;
    }
    let invocations_per_sec = total as f64 / t.elapsed().as_secs_f64();
    let ms = |v: &[u32], p| percentile_us(v, p) / 1000.0;
    let (p50, crun50) = (ms(&ours, 0.5), ms(&theirs, 0.5));
    Ok(ContainerBenchReport {
        cold_start_p50_ms: p50,
        cold_start_p99_ms: ms(&ours, 0.99),
        invocations_per_sec,
        threads: cfg.threads,
        host_exec_p50_ms: ms(&host, 0.5),
        crun_p50_ms: crun50,
        crun_p99_ms: ms(&theirs, 0.99),
        stellar_vs_crun_p50: p50 / crun50,
        sandbox_p50_ms: ms(&sandbox, 0.5),
        sandbox_p99_ms: ms(&sandbox, 0.99),
        sandbox_vs_crun_p50: ms(&sandbox, 0.5) / crun50,
        runs: cfg.runs,
        stellar_unit: "one `stellar run IMAGE --command /bin/true` process: image index, cgroup, \
                       namespaces, overlay with a private upper, seccomp, run, counters, teardown",
        crun_unit: "one `crun run` process (create + start + wait + delete): read-only root (no \
                    overlay), same namespaces, uid map, cgroup limits and seccomp allow-list",
    })
}
