//! One container's control group (cgroup v1 or v2, whichever the machine mounts, through
//! `cgroups-rs`): the limits that keep a hostile program from taking the device (cpu quota,
//! memory, pids) and the counters its bill is made of (cpu time, peak memory, OOM kills,
//! refused forks). Removed after every run, whatever happened.

use std::path::Path;
use std::time::Duration;

use cgroups_rs::cgroup_builder::CgroupBuilder;
use cgroups_rs::cpuacct::CpuAcctController;
use cgroups_rs::memory::MemController;
use cgroups_rs::pid::PidController;
use cgroups_rs::{Cgroup, CgroupPid, Controller, MaxValue, hierarchies};

/// The parent group every runtime's groups are made under.
pub const PARENT: &str = "stellar";
/// CFS period for the cpu quota (the kernel's default, 100 ms).
const CPU_PERIOD_US: u64 = 100_000;

/// What one container may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory (anonymous + page cache), bytes; past it the kernel OOM-kills inside the group.
    pub memory_bytes: u64,
    /// Processes and threads, the init's own included.
    pub pids: u64,
    /// CPU, thousandths of one core (1000 = one core).
    pub cpu_millis: u64,
}

/// What one container used, read from the group's own counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// CPU time of every process in the group, ns.
    pub cpu_ns: u64,
    /// The most memory the group held at once, bytes.
    pub peak_memory_bytes: u64,
    /// Processes the kernel's OOM killer ended in the group.
    pub oom_kills: u64,
    /// Forks refused because the pids limit was reached.
    pub pids_limit_hits: u64,
    /// Processes in the group now.
    pub pids_current: u64,
    /// The most processes the group held at once, where the kernel counts it (`pids.peak`,
    /// Linux 6.1+); 0 where it does not (the runtime then samples `pids_current`).
    pub pids_peak: u64,
}

/// A live control group; [`ContainerCgroup::remove`] ends it (and every process in it).
pub struct ContainerCgroup {
    cg: Cgroup,
    name: String,
}

impl std::fmt::Debug for ContainerCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerCgroup")
            .field("name", &self.name)
            .finish()
    }
}

impl ContainerCgroup {
    /// Creates the group `name` (a path under each hierarchy's root, e.g.
    /// `stellar/<runtime>/<run>`) with the limits applied (the pids one checked by reading
    /// it back).
    pub fn create(name: &str, limits: CgroupLimits) -> Result<ContainerCgroup, String> {
        let name = name.to_string();
        let hier = hierarchies::auto();
        let v2 = hier.v2();
        let mut builder = CgroupBuilder::new(&name)
            .memory()
            .memory_hard_limit(clamp_i64(limits.memory_bytes))
            .done()
            .pid()
            .maximum_number_of_processes(MaxValue::Value(clamp_i64(limits.pids)))
            .done()
            .cpu()
            .period(CPU_PERIOD_US)
            .quota(clamp_i64(limits.cpu_millis * CPU_PERIOD_US / 1000))
            .done();
        builder = builder.set_specified_controllers(controllers(v2));
        let cg = builder
            .build(hier)
            .map_err(|e| format!("cannot create cgroup {name}: {e}"))?;
        let group = ContainerCgroup { cg, name };
        // A limit the kernel did not take is a sandbox that does not hold: refuse to run.
        let pids: &PidController = group
            .cg
            .controller_of()
            .ok_or("no pids controller: this node cannot bound processes")?;
        if pids.get_pid_max().ok() != Some(MaxValue::Value(clamp_i64(limits.pids))) {
            let _ = group.remove();
            return Err("the pids limit did not take".into());
        }
        if group.cg.controller_of::<MemController>().is_none() {
            let _ = group.remove();
            return Err("no memory controller: this node cannot bound memory".into());
        }
        Ok(group)
    }

    /// A group a crashed run left behind, to [`ContainerCgroup::remove`] (nothing is
    /// created or changed by opening it).
    pub fn existing(name: &str) -> ContainerCgroup {
        let hier = hierarchies::auto();
        let v2 = hier.v2();
        ContainerCgroup {
            cg: Cgroup::load_with_specified_controllers(hier, name, controllers(v2)),
            name: name.to_string(),
        }
    }

    /// The group's name under each hierarchy.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves a process (and its future children) into the group.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        self.cg
            .add_task_by_tgid(CgroupPid::from(u64::from(pid)))
            .map_err(|e| format!("cannot move {pid} into {}: {e}", self.name))
    }

    /// The counters now (a missing file reads as 0: a counter is never invented). Reads the
    /// six files it needs, not the controllers' whole stat sets (this runs per call).
    pub fn usage(&self) -> CgroupUsage {
        let mut u = CgroupUsage {
            pids_current: self.pids_current(),
            ..CgroupUsage::default()
        };
        if let Some(p) = self.cg.controller_of::<PidController>() {
            u.pids_limit_hits = read_keyed(&p.path().join("pids.events"), "max");
            u.pids_peak = read_u64(&p.path().join("pids.peak"));
        }
        let Some(mem) = self.cg.controller_of::<MemController>().map(|m| m.path()) else {
            return u;
        };
        if self.cg.v2() {
            u.peak_memory_bytes = read_u64(&mem.join("memory.peak"));
            u.oom_kills = read_keyed(&mem.join("memory.events"), "oom_kill");
            u.cpu_ns = read_keyed(&mem.join("cpu.stat"), "usage_usec") * 1000;
        } else {
            u.peak_memory_bytes = read_u64(&mem.join("memory.max_usage_in_bytes"));
            u.oom_kills = read_keyed(&mem.join("memory.oom_control"), "oom_kill");
            if let Some(c) = self.cg.controller_of::<CpuAcctController>() {
                u.cpu_ns = read_u64(&c.path().join("cpuacct.usage"));
            }
        }
        u
    }

    /// Processes in the group now (sampled while it runs, for the peak).
    pub fn pids_current(&self) -> u64 {
        self.cg
            .controller_of::<PidController>()
            .map_or(0, |p| read_u64(&p.path().join("pids.current")))
    }

    /// The processes in the group now.
    pub fn pids(&self) -> Vec<u64> {
        self.cg.procs().into_iter().map(|p| p.pid).collect()
    }

    /// SIGKILLs every process in the group until none is left (a fork bomb's children
    /// included: each round kills what the last one missed).
    pub fn kill_all(&self) {
        for _ in 0..200 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills what is left and deletes the group (retrying while the kernel reaps).
    pub fn remove(self) -> Result<(), String> {
        self.kill_all();
        let mut last = String::new();
        if !self.cg.exists() {
            return Ok(()); // never made, or already gone
        }
        for _ in 0..100 {
            match self.cg.delete() {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!("cannot remove cgroup {}: {last}", self.name))
    }
}

/// The controllers a container's group uses (cpuset is not: on v1 it needs cpus and mems
/// copied down before a task may join).
fn controllers(v2: bool) -> Vec<String> {
    let names: &[&str] = if v2 {
        &["cpu", "memory", "pids"]
    } else {
        &["cpu", "cpuacct", "memory", "pids"]
    };
    names.iter().map(|s| s.to_string()).collect()
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A `key value` line of a flat-keyed cgroup file.
fn read_keyed(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

/// Whether this machine can give a container every limit (checked once at worker start).
pub fn available() -> Result<(), String> {
    // Unique per check: `stellar dev` starts several workers in one process at once.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = ContainerCgroup::create(
        &format!("{PARENT}/probe-{}-{n}", std::process::id()),
        CgroupLimits {
            memory_bytes: 64 << 20,
            pids: 8,
            cpu_millis: 1000,
        },
    )?;
    probe.remove()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_are_read_by_key_and_missing_ones_read_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.events");
        std::fs::write(&f, "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n").unwrap();
        assert_eq!(read_keyed(&f, "oom_kill"), 1);
        assert_eq!(read_keyed(&f, "oom"), 2);
        assert_eq!(read_keyed(&f, "absent"), 0);
        assert_eq!(read_keyed(&dir.path().join("none"), "oom_kill"), 0);
    }
}
