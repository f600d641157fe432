//! `stellar run IMAGE.tar` on real namespaces, cgroups and seccomp: a container runs with
//! its args, env, stdin and exit status; output streams while it runs; every hostile case
//! (fork bomb, memory bomb, network, host processes and files, mount, new namespaces) stays
//! inside and is reported with its typed code; nothing is left behind (cgroups, mounts,
//! processes, run directories), and the machine's own processes are unharmed.

#![cfg(target_os = "linux")]
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The busybox image, built once per test binary by the example packer (the benchmark's
/// own builder: what is tested is what is measured).
fn busybox() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        stellar_load::containerbench::build_busybox_image(&dir).expect("the busybox image")
    })
}

/// A runtime directory of the test's own (its layer cache and runs).
struct Cache(tempfile::TempDir);

impl Cache {
    fn new() -> Cache {
        Cache(tempfile::tempdir().expect("tempdir"))
    }

    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self.command(args).spawn().expect("stellar runs");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().expect("stellar run finishes")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_stellar"));
        c.arg("run")
            .arg(busybox())
            .arg("--cache-dir")
            .arg(self.0.path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// A `stellar run` whose program has started ("up" read) and then sleeps a minute;
    /// `tag` makes its command line unique to the test.
    fn start_sleeper(&self, tag: &str) -> std::process::Child {
        let script = format!("echo up; sleep 60; echo {tag}");
        let mut child = self
            .command(&["--arg", "sh", "--arg", "-c", "--arg", &script])
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "up");
        child
    }

    /// `sh -c SCRIPT` in the container, with extra flags.
    fn sh(&self, script: &str, flags: &[&str]) -> Output {
        let mut args = vec!["--arg", "sh", "--arg", "-c", "--arg", script];
        args.extend_from_slice(flags);
        self.run(&args, b"")
    }

    /// No cgroup, mount, process or run directory of this runtime is left.
    fn assert_nothing_left(&self) {
        let base = self.0.path().canonicalize().unwrap();
        let parent = stellar_worker::container::run::cgroup_parent_for(&base);
        for hierarchy in ["pids", "memory", "cpu,cpuacct", "unified", ""] {
            let dir = Path::new("/sys/fs/cgroup").join(hierarchy).join(&parent);
            let children: Vec<_> = std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            assert!(children.is_empty(), "cgroups left behind: {children:?}");
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let base_s = base.to_string_lossy();
        assert!(
            !mounts.lines().any(|l| l.contains(base_s.as_ref())),
            "mounts left behind under {base_s}"
        );
        let runs: Vec<_> = std::fs::read_dir(base.join("runs"))
            .unwrap()
            .flatten()
            .collect();
        assert!(runs.is_empty(), "run directories left behind: {runs:?}");
    }
}

/// A process of the machine's own, running before a hostile container and checked after.
struct Bystander(std::process::Child);

impl Bystander {
    fn start() -> Bystander {
        Bystander(Command::new("sleep").arg("60").spawn().unwrap())
    }

    fn assert_unharmed(mut self) {
        assert!(
            self.0.try_wait().unwrap().is_none(),
            "a host process was harmed"
        );
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The usage record `-v` prints (the last stderr line).
fn usage(o: &Output) -> serde_json::Value {
    let e = stderr(o);
    let line = e.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {e}"))
}

#[test]
fn a_container_runs_with_its_args_env_stdin_and_exit_status() {
    let cache = Cache::new();
    let out = cache.run(
        &[
            "--arg", "sh", "--arg", "-c",
            "--arg", "read name; echo \"$GREETING, $name from $(hostname) in $(pwd) as $(id -u)\"; echo oops >&2; exit 7",
            "--env", "GREETING=Hello", "--stdin", "-", "-v",
        ],
        b"Ada\n",
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let text = stdout(&out);
    assert!(text.starts_with("Hello, Ada from stellar-"), "{text}");
    assert!(text.ends_with(" in / as 0\n"), "{text}");
    assert!(stderr(&out).starts_with("oops\n"), "{}", stderr(&out));
    let u = usage(&out);
    assert_eq!(u["error_code"], "EXIT_CODE");
    assert_eq!(u["exit_code"], 7);
    assert!(u["cpu_ns"].as_u64().unwrap() > 0, "{u}");
    assert!(u["peak_memory_bytes"].as_u64().unwrap() > 0, "{u}");
    assert!(u["bytes_out"].as_u64().unwrap() > 20, "{u}");
    // The image's CMD (sh) runs when no argument is given; a second run reuses the layer.
    let out = cache.run(&["--stdin", "echo from-cmd"], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "from-cmd\n");
    cache.assert_nothing_left();
}

#[test]
fn output_streams_while_the_program_runs() {
    let cache = Cache::new();
    let mut child = cache
        .command(&[
            "--arg",
            "sh",
            "--arg",
            "-c",
            "--arg",
            "echo first; sleep 3; echo second",
        ])
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    // The first line arrived while the program was still asleep.
    assert!(
        child.try_wait().unwrap().is_none(),
        "first line only came at exit"
    );
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(child.wait().unwrap().success());
    cache.assert_nothing_left();
}

#[test]
fn a_fork_bomb_is_stopped_by_the_pids_limit_and_reported() {
    let cache = Cache::new();
    // The machine's own process, alive before and after.
    let bystander = Bystander::start();
    let out = cache.sh(
        "bomb() { bomb | bomb & }; bomb; sleep 30",
        &["--pids", "16", "--timeout", "3", "-v"],
    );
    assert_eq!(out.status.code(), Some(134), "{out:?}");
    let u = usage(&out);
    assert_eq!(u["error_code"], "PIDS_LIMIT", "{u}");
    // The program's own processes (the init's two are not counted), never past the limit.
    let peak = u["pids_peak"].as_u64().unwrap();
    assert!((8..=16).contains(&peak), "{u}");
    assert!(stderr(&out).contains("PIDS_LIMIT"), "{}", stderr(&out));
    bystander.assert_unharmed();
    cache.assert_nothing_left();
}

#[test]
fn a_memory_bomb_is_oom_killed_and_reported() {
    let cache = Cache::new();
    let bystander = Bystander::start();
    let out = cache.sh(
        "x=aaaaaaaa; while true; do x=\"$x$x\"; done",
        &["--memory", "32", "-v"],
    );
    assert_eq!(out.status.code(), Some(134), "{out:?}");
    let u = usage(&out);
    assert_eq!(u["error_code"], "MEMORY_LIMIT", "{u}");
    let peak = u["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak <= 33 << 20, "peak {peak} above the 32 MiB limit");
    bystander.assert_unharmed();
    cache.assert_nothing_left();
}

#[test]
fn a_deadline_kills_every_process_in_the_container() {
    let cache = Cache::new();
    let out = cache.sh("sleep 60 & sleep 60 & sleep 60", &["--timeout", "1", "-v"]);
    assert_eq!(out.status.code(), Some(134), "{out:?}");
    assert_eq!(usage(&out)["error_code"], "DEADLINE_EXCEEDED");
    cache.assert_nothing_left();
}

#[test]
fn there_is_no_network_but_loopback() {
    let cache = Cache::new();
    let out = cache.sh(
        "ls /sys/class/net 2>/dev/null; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ';
         nc -w 2 10.255.255.1 80 </dev/null 2>&1 && echo REACHED-$((1+1));
         (nc -l -p 8080 > /tmp/got &); sleep 0.3; echo served | nc -w 2 127.0.0.1 8080;
         sleep 0.3; cat /tmp/got",
        &["--pids", "32"],
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"lo"), "{text}");
    assert!(!text.contains("REACHED-2"), "{text}");
    assert!(text.contains("Network is unreachable"), "{text}");
    assert_eq!(lines.last(), Some(&"served"), "loopback works: {text}");
    cache.assert_nothing_left();
}

#[test]
fn host_processes_and_files_are_not_visible() {
    let cache = Cache::new();
    let marker = tempfile::NamedTempFile::new().unwrap();
    let script = format!(
        "ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '; echo;
         test -e {} && echo HOST-FILE-$((1+1)); ls /; echo x > /etc/written && cat /etc/written",
        marker.path().display()
    );
    let out = cache.sh(&script, &[]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let mut lines = text.lines();
    let pids: u32 = lines.next().unwrap().parse().unwrap();
    assert!(pids <= 4, "sees {pids} processes: {text}");
    assert!(
        lines.next().unwrap().contains("__container-init"),
        "pid 1 is the sandbox's init: {text}"
    );
    assert!(!text.contains("HOST-FILE-2"), "{text}");
    assert!(
        !text.contains("vmlinuz") && !text.contains("work\n"),
        "{text}"
    );
    // Writes go to the run's private layer: the next run sees the image as it was.
    assert!(text.ends_with("x\n"), "{text}");
    let again = cache.sh("test -e /etc/written && echo LEAKED || echo clean", &[]);
    assert_eq!(stdout(&again), "clean\n");
    cache.assert_nothing_left();
}

#[test]
fn it_cannot_mount_load_modules_or_make_namespaces() {
    let cache = Cache::new();
    let out = cache.sh(
        "cat /proc/1/exe >/dev/null 2>&1 && echo INIT-EXE-$((1+1)); ls /proc/1/fd >/dev/null 2>&1 && echo INIT-FD-$((1+1));
         mount -t tmpfs none /mnt 2>&1; echo mount=$?;
         unshare -U true 2>&1; echo unshare=$?;
         insmod /nonexistent.ko 2>&1; echo insmod=$?;
         grep Cap /proc/self/status; grep -E 'NoNewPrivs|Seccomp:' /proc/self/status",
        &[],
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("mount=1") || text.contains("mount=255"),
        "{text}"
    );
    assert!(!text.contains("unshare=0"), "{text}");
    assert!(!text.contains("insmod=0"), "{text}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            text.contains(&format!("{set}:\t0000000000000000")),
            "{set}: {text}"
        );
    }
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    assert!(text.contains("Seccomp:\t2"), "{text}");
    // The init (pid 1) is not the program's to read: not its binary, not its fds.
    assert!(
        !text.contains("INIT-EXE-2") && !text.contains("INIT-FD-2"),
        "{text}"
    );
    cache.assert_nothing_left();
}

#[test]
fn bad_images_and_programs_are_image_invalid() {
    let cache = Cache::new();
    let out = cache.run(&["--command", "/no/such/program", "-v"], b"");
    assert_eq!(out.status.code(), Some(134), "{out:?}");
    assert_eq!(usage(&out)["error_code"], "IMAGE_INVALID");
    cache.assert_nothing_left();

    // A rootfs tarball needs --command; a corrupt blob is refused by its digest.
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("rootfs.tar");
    std::fs::write(&plain, tar_of_one_file("hello.txt", b"hi")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args(["run", plain.to_str().unwrap(), "--cache-dir"])
        .arg(cache.0.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--command"), "{}", stderr(&out));

    let mut bytes = std::fs::read(busybox()).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    let corrupt = dir.path().join("corrupt.tar");
    std::fs::write(&corrupt, bytes).unwrap();
    let fresh = Cache::new();
    let out = Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args(["run", corrupt.to_str().unwrap(), "-v", "--cache-dir"])
        .arg(fresh.0.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr(&out).contains("IMAGE_INVALID") || stderr(&out).contains("corrupt"),
        "{}",
        stderr(&out)
    );
    assert!(
        fresh
            .0
            .path()
            .join("layers")
            .read_dir()
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );
}

fn tar_of_one_file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn output_past_the_cap_and_a_fatal_signal_are_typed_results() {
    let cache = Cache::new();
    let out = cache.sh("yes stellar", &["-v"]);
    assert_eq!(out.status.code(), Some(134), "{:?}", out.status);
    let u = usage(&out);
    assert_eq!(u["error_code"], "OUTPUT_TOO_LARGE", "{u}");
    let cap = u64::from(stellar_proto::limits::MAX_OUTPUT_BYTES);
    assert_eq!(out.stdout.len() as u64, cap, "exactly the cap is passed on");

    let out = cache.sh("kill -SEGV $$", &["-v"]);
    assert_eq!(out.status.code(), Some(128 + 11), "{out:?}");
    assert_eq!(usage(&out)["error_code"], "SIGNALLED");

    // The writable layer is bounded (a tmpfs in the run, charged to its memory).
    let out = cache.sh(
        "dd if=/dev/zero of=/big bs=1M count=400 2>&1; echo dd=$?",
        &["--memory", "512"],
    );
    let text = stdout(&out);
    assert!(text.contains("No space left on device"), "{text}");
    cache.assert_nothing_left();
}

#[test]
fn layers_stack_with_whiteouts_and_opaque_directories() {
    let dir = tempfile::tempdir().unwrap();
    stellar_load::containerbench::build_busybox_image(dir.path()).unwrap();
    let base = dir.path().join("rootfs");
    for (path, body) in [("data/keep", "k"), ("data/gone", "g"), ("opq/old", "o")] {
        std::fs::create_dir_all(base.join(path).parent().unwrap()).unwrap();
        std::fs::write(base.join(path), body).unwrap();
    }
    let top = dir.path().join("top");
    std::fs::create_dir_all(top.join("data")).unwrap();
    std::fs::create_dir_all(top.join("opq")).unwrap();
    for (path, body) in [
        ("data/.wh.gone", ""),
        ("data/added", "a"),
        ("opq/.wh..wh..opq", ""),
        ("opq/new", "n"),
    ] {
        std::fs::write(top.join(path), body).unwrap();
    }
    let image = dir.path().join("layered.tar");
    let packer = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/images/oci_archive.py"
    );
    let out = Command::new("python3")
        .arg(packer)
        .args([&base, &image])
        .arg("--layer")
        .arg(&top)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The same root whether the layers are mounted (overlayfs) or copied into the run (the
    // fallback for kernels without overlayfs); the root is writable either way.
    for (rootfs, fs) in [("overlay", "overlay"), ("copy", "tmpfs")] {
        let cache = Cache::new();
        let out = Command::new(env!("CARGO_BIN_EXE_stellar"))
            .arg("run")
            .arg(&image)
            .arg("--cache-dir")
            .arg(cache.0.path())
            .args([
                "--command",
                "/bin/sh -c 'ls /data /opq && echo w > /data/written && cat /data/written \
                 && head -1 /proc/mounts | cut -d\" \" -f3'",
            ])
            .env("STELLAR_CONTAINER_ROOTFS", rootfs)
            .output()
            .unwrap();
        assert!(out.status.success(), "{rootfs}: {out:?}");
        assert_eq!(
            stdout(&out),
            format!("/data:\nadded\nkeep\n\n/opq:\nnew\nw\n{fs}\n"),
            "{rootfs}"
        );
        assert_eq!(cache.0.path().join("layers").read_dir().unwrap().count(), 2);
        cache.assert_nothing_left();
    }
}

#[test]
fn a_killed_stellar_run_leaves_nothing_once_the_cache_is_opened_again() {
    let cache = Cache::new();
    let mut child = cache.start_sleeper("killed-run");
    child.kill().unwrap(); // SIGKILL: no cleanup runs in it
    child.wait().unwrap();
    // The init and the program die with it (parent-death signals), at once.
    let gone = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        !std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
            std::fs::read_to_string(p.path().join("cmdline"))
                .is_ok_and(|c| c.contains("echo killed-run"))
        })
    });
    assert!(gone, "the container outlived its stellar run");
    // Its run directory and cgroup are removed by the next runtime on this cache.
    let out = cache.sh("true", &[]);
    assert!(out.status.success(), "{out:?}");
    cache.assert_nothing_left();
}

#[test]
fn an_interrupted_stellar_run_stops_and_removes_its_container() {
    let cache = Cache::new();
    let mut child = cache.start_sleeper("interrupted-run");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    // Removed by the command itself, before it exited: no later run needed.
    cache.assert_nothing_left();
}
