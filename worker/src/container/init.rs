//! The container init: `stellar __container-init`, started by the worker with the spec on
//! fd 4 and a status pipe on fd 3. It builds the sandbox from the outside in and then becomes
//! the function's program:
//!
//! ```text
//! stage 1 (host root, in the run's cgroup)
//!   unshare(mount) · / private · overlay(layers + private upper) · /dev (bound nodes) · /tmp · binds
//!   setgroups([]) · gid/uid → the sandbox's unprivileged host ids
//!   unshare(user) · map root → that uid (a one-line map needs no helper)
//!   unshare(mount, pid, ipc, uts, net, cgroup) · root bound onto itself (an unlocked mount)
//!   fork ───────────────▶ stage 2 = pid 1 of the new pid namespace
//!   wait · report {exited|signalled} on fd 3       /proc · pivot_root · umount the host
//!                                                  hostname · lo up · rlimits
//!                                                  no_new_privs · capabilities: none
//!                                                  seccomp allow-list
//!                                                  fork ──▶ pid 2: exec the program
//!                                                  reap until the program ends
//! ```
//!
//! Mounts live only in the run's mount namespaces, so they vanish with its last process; the
//! pid namespace takes every process with its pid 1; the worker removes the cgroup. A failure
//! before the exec is reported on fd 3 as an [`InitFailure`] (never mixed into the function's
//! output).
//!
//! This is the one place the worker uses `unsafe`: to adopt the two fds the worker placed,
//! and to fork (twice), which is sound here because this process is single-threaded (it
//! was just exec'd and starts no thread).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Uid, chdir, fork, pivot_root, sethostname};
use serde::Serialize;

use super::spec::{INIT_ARG, InitFailure, InitSpec, ROOTFS, SPEC_FD, STATUS_FD, UPPER, WORK};
use super::{loopback, seccomp};

/// What stage 1 reports on fd 3 when the program has run (one JSON line).
#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitReport {
    /// The sandbox could not be built; the program never ran.
    Failed(InitFailure),
    /// The program exited with this status.
    Exited(i32),
    /// The program was killed by this signal.
    Signalled(i32),
}

/// True when this process was started as the container init (checked first thing in
/// `main`, before any runtime or thread starts).
pub fn is_init_invocation() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == INIT_ARG)
}

/// Runs the container init; never returns.
pub fn main() -> ! {
    // SAFETY: the worker placed fds 3 and 4 (command-fds, dup2) for this process alone;
    // nothing else in it refers to them.
    let mut status = unsafe { File::from_raw_fd(STATUS_FD) };
    let spec_file = unsafe { File::from_raw_fd(SPEC_FD) };
    // The status pipe must not reach the function's program.
    let _ = fcntl(&status, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    let report = match read_spec(spec_file).and_then(|spec| stage1(&spec, &status)) {
        Ok(report) => report,
        Err(failure) => InitReport::Failed(failure),
    };
    let _ = writeln!(
        status,
        "{}",
        serde_json::to_string(&report).unwrap_or_default()
    );
    std::process::exit(0)
}

fn read_spec(mut f: File) -> Result<InitSpec, InitFailure> {
    let mut raw = Vec::new();
    f.read_to_end(&mut raw)
        .map_err(|e| node_fault(format!("reading the spec: {e}")))?;
    serde_json::from_slice(&raw).map_err(|e| node_fault(format!("the spec is not valid: {e}")))
}

fn node_fault(message: String) -> InitFailure {
    InitFailure {
        image: false,
        message,
    }
}

fn image_fault(message: String) -> InitFailure {
    InitFailure {
        image: true,
        message,
    }
}

/// A syscall's error as a node fault naming the step.
fn step<T>(what: &str, r: nix::Result<T>) -> Result<T, InitFailure> {
    r.map_err(|e| node_fault(format!("{what}: {e}")))
}

fn stage1(spec: &InitSpec, status: &File) -> Result<InitReport, InitFailure> {
    let parent = nix::unistd::getppid();
    // The OOM killer picks the program, never this reporter (stage 2 undoes it).
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    step("unshare(mount)", unshare(CloneFlags::CLONE_NEWNS))?;
    step(
        "make / private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    step("chdir(base)", chdir(&spec.base))?;
    let rootfs = spec.run_dir.join(ROOTFS);
    mount_rootfs(spec, &rootfs)?;

    // From here on, an unprivileged host uid: root only inside its own user namespace.
    let (uid, gid) = (Uid::from_raw(spec.host_uid), Gid::from_raw(spec.host_gid));
    step("setgroups", nix::unistd::setgroups(&[]))?;
    step("setresgid", nix::unistd::setresgid(gid, gid, gid))?;
    step("setresuid", nix::unistd::setresuid(uid, uid, uid))?;
    // A uid change clears "dumpable", which would make /proc/self/*_map root's to write.
    step("set_dumpable", nix::sys::prctl::set_dumpable(true))?;
    step("unshare(user)", unshare(CloneFlags::CLONE_NEWUSER))?;
    write_proc("/proc/self/setgroups", "deny")?;
    write_proc("/proc/self/uid_map", &format!("0 {} 1", spec.host_uid))?;
    write_proc("/proc/self/gid_map", &format!("0 {} 1", spec.host_gid))?;
    // If the worker dies, so does the sandbox (and with stage 2, every process in it). Set
    // only now: every credential change above (setresuid, the new user namespace's
    // capabilities) clears a parent-death signal. A worker already gone is checked for.
    step("pdeathsig", nix::sys::prctl::set_pdeathsig(Signal::SIGKILL))?;
    if nix::unistd::getppid() != parent {
        return Err(node_fault(
            "the worker exited while the sandbox was being built".into(),
        ));
    }
    step(
        "unshare(mount, pid, ipc, uts, net, cgroup)",
        unshare(
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWNET
                | CloneFlags::CLONE_NEWCGROUP,
        ),
    )?;
    // Mounts copied into a less privileged namespace are locked and cannot be pivoted to: a
    // bind of the root onto itself is a mount of this namespace's own.
    step(
        "bind the root",
        mount(
            Some(&rootfs),
            &rootfs,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    // Compiled before the fork: stage 2 only installs it.
    let filters = seccomp::policy().map_err(node_fault)?;
    // SAFETY: this process is single-threaded (see the module comment).
    match step("fork", unsafe { fork() })? {
        ForkResult::Child => {
            let report = stage2(spec, &rootfs, &filters);
            let code = match &report {
                InitReport::Exited(c) => *c,
                InitReport::Signalled(s) => 128 + s,
                InitReport::Failed(_) => 127,
            };
            // An exit status passes through stage 1; a signal or a failure is said here,
            // first (the worker takes the first report).
            if !matches!(report, InitReport::Exited(_)) {
                let mut status = status;
                let _ = writeln!(
                    status,
                    "{}",
                    serde_json::to_string(&report).unwrap_or_default()
                );
            }
            std::process::exit(code)
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(InitReport::Exited(code)),
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    return Ok(InitReport::Signalled(sig as i32));
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(node_fault(format!("waitpid: {e}"))),
            }
        },
    }
}

fn write_proc(path: &str, value: &str) -> Result<(), InitFailure> {
    std::fs::write(path, value).map_err(|e| node_fault(format!("writing {path}: {e}")))
}

/// The run's tmpfs, the root (overlay of the layers and the run's upper), `/dev`, `/tmp` and
/// the binds, made as host root inside stage 1's private mount namespace.
fn mount_rootfs(spec: &InitSpec, rootfs: &Path) -> Result<(), InitFailure> {
    let scratch = format!("mode=711,size={}m", spec.scratch_mib.max(1));
    step(
        "mount the run's tmpfs",
        mount(
            Some("tmpfs"),
            &spec.run_dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(scratch.as_str()),
        ),
    )?;
    let (upper, work) = (spec.run_dir.join(UPPER), spec.run_dir.join(WORK));
    for d in [&upper, &work, &rootfs.to_path_buf()] {
        ensure_dir(d)?;
    }
    // The writable layer's root is the container's "/": its root owns it.
    std::os::unix::fs::lchown(&upper, Some(spec.host_uid), Some(spec.host_gid))
        .map_err(|e| node_fault(format!("chown the upper layer: {e}")))?;
    let lower = spec
        .lower
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":");
    let options = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    if spec.copy_layers {
        let bottom_first: Vec<PathBuf> = spec.lower.iter().rev().cloned().collect();
        super::layer_copy::copy_layers(&bottom_first, rootfs).map_err(|e| {
            node_fault(format!(
                "copy the image's layers into the run ({} MiB): {e}",
                spec.scratch_mib
            ))
        })?;
        // Its root is the container root's, as the overlay's upper would be.
        std::os::unix::fs::lchown(rootfs, Some(spec.host_uid), Some(spec.host_gid))
            .map_err(|e| node_fault(format!("chown the root: {e}")))?;
    } else {
        step(
            "mount the image (overlay)",
            mount(
                Some("overlay"),
                rootfs,
                Some("overlay"),
                MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                Some(options.as_str()),
            ),
        )?;
    }
    let root = rootfs;
    for dir in ["proc", "dev", "tmp"] {
        ensure_dir(&root.join(dir))?;
    }
    step(
        "mount /dev",
        mount(
            Some("tmpfs"),
            &root.join("dev"),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=755,size=64k"),
        ),
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = root.join("dev").join(node);
        File::create(&target).map_err(|e| node_fault(format!("/dev/{node}: {e}")))?;
        step(
            "bind a device",
            mount(
                Some(&Path::new("/dev").join(node)),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
        )?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, root.join("dev").join(link))
            .map_err(|e| node_fault(format!("/dev/{link}: {e}")))?;
    }
    ensure_dir(&root.join("dev/shm"))?;
    let tmp = format!("mode=1777,size={}m", spec.tmp_mib.max(1));
    for dir in ["tmp", "dev/shm"] {
        step(
            "mount a tmpfs",
            mount(
                Some("tmpfs"),
                &root.join(dir),
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(tmp.as_str()),
            ),
        )?;
    }
    for b in &spec.binds {
        let target = root.join(b.guest.trim_start_matches('/'));
        ensure_dir(&target)?;
        step(
            "bind a directory",
            mount(
                Some(&b.host),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            ),
        )?;
        step(
            "bind a directory (nosuid, nodev)",
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None::<&str>,
            ),
        )?;
    }
    Ok(())
}

fn ensure_dir(p: &Path) -> Result<(), InitFailure> {
    std::fs::create_dir_all(p).map_err(|e| node_fault(format!("mkdir {}: {e}", p.display())))
}

/// Pid 1 of the new namespaces: finish the root, shed every privilege, then start the
/// program as pid 2 and reap (as `docker run --init` does: the program gets ordinary signal
/// semantics, orphans are reaped, and its death by a signal is seen and reported).
fn stage2(spec: &InitSpec, rootfs: &Path, filters: &[seccompiler::BpfProgram; 2]) -> InitReport {
    if let Err(f) = stage2_setup(spec, rootfs) {
        return InitReport::Failed(f);
    }
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(&spec.cwd);
    if let Err(f) = drop_privileges(filters) {
        return InitReport::Failed(f);
    }
    // Not dumpable: the program (same uid) cannot open /proc/1/mem, /proc/1/exe (this host
    // binary) or /proc/1/fd (the status pipe). The program's own exec makes it dumpable again.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        return InitReport::Failed(node_fault(format!("set_dumpable: {e}")));
    }
    // SAFETY: single-threaded, as stage 1 is (this is its fork).
    let program = match unsafe { fork() } {
        Err(e) => return InitReport::Failed(node_fault(format!("fork: {e}"))),
        Ok(ForkResult::Child) => {
            let e = cmd.exec();
            return InitReport::Failed(image_fault(format!("cannot run {}: {e}", spec.argv[0])));
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    loop {
        match waitpid(nix::unistd::Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == program => {
                return InitReport::Exited(code);
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == program => {
                return InitReport::Signalled(sig as i32);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue, // an orphan reaped
            Err(e) => return InitReport::Failed(node_fault(format!("waitpid: {e}"))),
        }
    }
}

fn stage2_setup(spec: &InitSpec, rootfs: &Path) -> Result<(), InitFailure> {
    step("pdeathsig", nix::sys::prctl::set_pdeathsig(Signal::SIGKILL))?;
    let _ = std::fs::write("/proc/self/oom_score_adj", "0");
    step(
        "mount /proc",
        mount(
            Some("proc"),
            &rootfs.join("proc"),
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )?;
    step("chdir(rootfs)", chdir(rootfs))?;
    step("pivot_root", pivot_root(".", "."))?;
    step("detach the host's root", umount2(".", MntFlags::MNT_DETACH))?;
    step("chdir(/)", chdir("/"))?;
    step("sethostname", sethostname(&spec.hostname))?;
    loopback::bring_up().map_err(node_fault)?;
    step("rlimit core", setrlimit(Resource::RLIMIT_CORE, 0, 0))?;
    if spec.argv.is_empty() || CString::new(spec.argv[0].as_bytes()).is_err() {
        return Err(image_fault("no program to run".into()));
    }
    let cwd = Path::new(&spec.cwd);
    if !cwd.is_dir() {
        return Err(image_fault(format!(
            "the working directory {} does not exist in the image",
            spec.cwd
        )));
    }
    Ok(())
}

/// no_new_privs, every capability set emptied (the bounding set too, so an exec as uid 0
/// gains none back), then the seccomp filters.
fn drop_privileges(filters: &[seccompiler::BpfProgram; 2]) -> Result<(), InitFailure> {
    step("no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    for set in [
        caps::CapSet::Bounding,
        caps::CapSet::Ambient,
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| node_fault(format!("dropping {set:?}: {e}")))?;
    }
    seccomp::install(filters).map_err(node_fault)
}

/// The fds the worker passes (kept here so the two sides cannot drift).
pub fn child_fds(status: OwnedFd, spec: OwnedFd) -> Vec<command_fds::FdMapping> {
    vec![
        command_fds::FdMapping {
            parent_fd: status,
            child_fd: STATUS_FD,
        },
        command_fds::FdMapping {
            parent_fd: spec,
            child_fd: SPEC_FD,
        },
    ]
}
