//! `stellar run`: one function, run here in the very sandbox a worker uses (same engine,
//! limits, fuel metering and WASI for wasm; the same namespaces, cgroup, seccomp and
//! cgroup metering for a container image), with no control plane: what a developer tries
//! before deploying, and what a node owner can use to check a bill.
//!
//! ```text
//!  FILE.wasm ─▶ Sandbox (1 slot, --memory) ─▶ load (sha256, compile) ─▶ invoke(args, env,
//!      stdin, limits) ─▶ stdout / stderr written out ─▶ exit with the function's status
//!  IMAGE.tar ─▶ ContainerRuntime (--cache-dir) ─▶ layers unpacked once ─▶ run(args, env,
//!      stdin, --dir, limits) ─▶ stdout / stderr streamed as written ─▶ the same exit status
//!                                                    └─ -v: the usage record on stderr
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sha2::{Digest, Sha256};
use stellar_worker::sandbox::{InvocationInput, InvocationLimits, Preopen, Sandbox, SandboxConfig};

#[derive(Debug, Args)]
#[command(after_help = "EXAMPLES:
  stellar run examples/wasm/prebuilt/hello.wasm --stdin Ada
  stellar run probe.wasm --arg echo --arg one --env GREETING=hi -v
  cat input.txt | stellar run examples/wasm/prebuilt/wordcount.wasm --stdin -
  stellar run probe.wasm --arg scratch --dir /tmp/work::/scratch

  stellar run examples/images/busybox.tar --arg sh --arg -c --arg 'echo hi; uname -n'
  stellar run rootfs.tar --command '/bin/ls -l /' --memory 64 --pids 16

The exit status is the function's own (134 when it trapped or hit a limit, 128+N when a
container's program was killed by signal N), as `wasmtime run` and `docker run` do.
Containers need root (namespaces, overlayfs, cgroups); the program runs as root inside
its own user namespace, an unprivileged uid (100000) on this machine, so a --dir must be
writable by that uid for the program to write there.")]
pub struct RunArgs {
    /// The function: a WebAssembly module (WASI preview 1, exporting `_start`), an OCI
    /// image archive (`oci-layout` tar), or a rootfs tarball with --command.
    file: PathBuf,
    /// Arguments passed to the function (repeat for more; `--arg --top --arg 5`).
    #[arg(long = "arg", allow_hyphen_values = true)]
    args: Vec<String>,
    /// An environment variable KEY=VALUE (repeat for more).
    #[arg(long = "env", value_parser = crate::functions::parse_env)]
    env: Vec<(String, String)>,
    /// A directory the function may use, HOST::GUEST (or HOST, seen at the same path),
    /// read-write; nothing outside it is reachable (repeat for more; default: no
    /// filesystem at all, as on a worker).
    #[arg(long = "dir", value_parser = parse_dir)]
    dirs: Vec<Preopen>,
    /// The function's stdin: TEXT, @FILE, or - for this command's stdin (default: empty).
    #[arg(long)]
    stdin: Option<String>,
    /// Linear memory cap, MiB (as a function's `--memory`).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    memory: u32,
    /// Wall-clock deadline, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Fuel budget, wasm only (the deterministic compute unit a bill counts) [default:
    /// 10000000000].
    #[arg(long)]
    fuel: Option<u64>,
    /// Container only: the program and its arguments, replacing the image's ENTRYPOINT and
    /// CMD (needed for a rootfs tarball; quoted as in a shell).
    #[arg(long)]
    command: Option<String>,
    /// Container only: processes and threads it may have at once.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=32_768))]
    pids: Option<u64>,
    /// Container only: CPU cores it may use (a CFS quota; 0.5 = half a core).
    #[arg(long)]
    cpus: Option<f64>,
    /// Container only: where unpacked image layers are kept between runs.
    #[arg(
        long,
        env = "STELLAR_CACHE_DIR",
        default_value = "/var/lib/stellar/run-cache"
    )]
    cache_dir: PathBuf,
    /// Print the usage record (fuel or cpu time, wall time, memory, bytes, exit code) on
    /// stderr.
    #[arg(short, long)]
    verbose: bool,
}

fn parse_dir(s: &str) -> Result<Preopen, String> {
    let (host, guest) = s.split_once("::").unwrap_or((s, s));
    if host.is_empty() || guest.is_empty() {
        return Err(format!("`{s}` is not HOST::GUEST"));
    }
    if !std::path::Path::new(host).is_dir() {
        return Err(format!("{host} is not a directory on this machine"));
    }
    Ok(Preopen {
        host: host.into(),
        guest: guest.to_string(),
    })
}

/// Runs the function once; the exit status to end with.
pub async fn run(a: RunArgs) -> Result<u8, String> {
    if !(a.timeout > 0.0 && a.timeout <= 3600.0) {
        return Err(format!(
            "--timeout {} is out of range: give 0 < seconds ≤ 3600",
            a.timeout
        ));
    }
    if !is_wasm(&a.file)? {
        return run_container(a).await;
    }
    for (given, flag) in [
        (a.command.is_some(), "--command"),
        (a.pids.is_some(), "--pids"),
        (a.cpus.is_some(), "--cpus"),
    ] {
        if given {
            return Err(format!(
                "{flag} is for container images; {} is a WebAssembly module",
                a.file.display()
            ));
        }
    }
    let shown = a.file.display().to_string();
    // The checks `stellar deploy` makes: what runs here would also deploy.
    let wasm = crate::functions::read_module(&a.file, a.memory)?;
    let stdin = crate::functions::read_data(a.stdin.as_deref())?;
    let name = a
        .file
        .file_stem()
        .map_or_else(|| "function".into(), |s| s.to_string_lossy().into_owned());
    let limits = InvocationLimits {
        memory_bytes: u64::from(a.memory) << 20,
        timeout: Duration::from_secs_f64(a.timeout),
        fuel: a.fuel.unwrap_or(InvocationLimits::DEFAULT_FUEL),
        max_output_bytes: u64::from(stellar_proto::limits::MAX_OUTPUT_BYTES),
        dirs: a.dirs,
    };
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| format!("no OS randomness: {e}"))?;
    let input = InvocationInput {
        invocation_id: hex::encode(id).into_bytes(),
        random_seed: stellar_worker::sandbox::seed_or_fresh(&[])?,
        args: a.args,
        env: a.env,
        stdin,
    };
    let verbose = a.verbose;
    // Compiling and running block: off the async runtime, as on a worker.
    let out = tokio::task::spawn_blocking(move || {
        let sandbox = Sandbox::new(SandboxConfig {
            slots: 1,
            max_memory_bytes: limits.memory_bytes,
            ..SandboxConfig::default()
        })
        .map_err(|e| format!("cannot set up the sandbox: {e}"))?;
        let sha = hex::encode(Sha256::digest(&wasm));
        let f = sandbox
            .load(&sha, &wasm)
            .map_err(|e| format!("{shown} cannot run: {e}"))?;
        Ok::<_, String>(sandbox.invoke(&f, &name, &input, &limits))
    })
    .await
    .map_err(|e| format!("the sandbox thread failed: {e}"))??;
    let _ = std::io::stdout().write_all(&out.stdout);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(&out.stderr);
    Ok(finish(&out.result, &out.metering, verbose, None))
}

/// Reports how the run ended (and, with -v, the usage record); the exit status.
fn finish(
    result: &Result<(), stellar_worker::InvokeError>,
    m: &stellar_worker::Metering,
    verbose: bool,
    sandbox_us: Option<u64>,
) -> u8 {
    let (code, message) = match result {
        Ok(()) => ("", String::new()),
        Err(e) => (e.code(), e.to_string()),
    };
    if !code.is_empty() && code != "EXIT_CODE" {
        eprintln!("stellar run: {code}: {message}");
    }
    if verbose {
        let mut record = serde_json::json!({
            "fuel": m.fuel, "cpu_ns": m.cpu_ns, "wall_us": m.wall_us,
            "peak_memory_bytes": m.peak_memory_bytes, "pids_peak": m.pids_peak,
            "bytes_in": m.bytes_in, "bytes_out": m.bytes_out, "exit_code": m.exit_code,
            "error_code": code,
        });
        // A container's whole sandbox time: layers checked, cgroup, init, run, counters,
        // teardown (what a worker pays per cold start, this command's own start aside).
        if let Some(us) = sandbox_us {
            record["sandbox_us"] = us.into();
        }
        eprintln!("{record}");
    }
    crate::functions::exit_status_of(code, m.exit_code)
}

/// A WebAssembly module (by its name or magic), rather than an image archive.
/// A `--command` line split shell-style into the program and its arguments.
pub fn parse_command(c: &str) -> Result<Vec<String>, String> {
    shlex::split(c)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("--command `{c}` is not a command line (check its quotes)"))
}

fn is_wasm(path: &std::path::Path) -> Result<bool, String> {
    use std::io::Read;
    if path.extension().is_some_and(|e| e == "wasm" || e == "wat") {
        return Ok(true);
    }
    let mut magic = [0u8; 4];
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let n = f
        .read(&mut magic)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(n < 4 || magic == *b"\0asm")
}

#[cfg(target_os = "linux")]
async fn run_container(a: RunArgs) -> Result<u8, String> {
    use stellar_worker::container::{
        ContainerCall, ContainerLimits, ContainerRuntime, ImageArchive, OutputStream,
    };
    if a.fuel.is_some() {
        return Err("--fuel is for WebAssembly modules; a container is metered in cpu time (--cpus bounds it)".into());
    }
    let cpus = a.cpus.unwrap_or(1.0);
    if !(0.01..=1024.0).contains(&cpus) {
        return Err(format!("--cpus {cpus} is out of range: give 0.01 to 1024"));
    }
    let command = a.command.as_deref().map(parse_command).transpose()?;
    tracing::debug!("run: container");
    stellar_worker::container::preconditions()
        .map_err(|e| format!("this machine cannot run containers: {e}"))?;
    tracing::debug!("run: preconditions met");
    let image = ImageArchive::open(&a.file, command).map_err(|e| e.to_string())?;
    tracing::debug!("run: image indexed");
    let runtime = ContainerRuntime::open(&a.cache_dir)?;
    tracing::debug!("run: runtime open");
    let call = ContainerCall {
        args: a.args,
        env: a.env,
        stdin: crate::functions::read_data(a.stdin.as_deref())?,
        dirs: a.dirs,
        limits: ContainerLimits {
            memory_bytes: u64::from(a.memory) << 20,
            timeout: Duration::from_secs_f64(a.timeout),
            pids: a.pids.unwrap_or(ContainerLimits::default().pids),
            cpu_millis: (cpus * 1000.0).round() as u64,
            max_output_bytes: u64::from(stellar_proto::limits::MAX_OUTPUT_BYTES),
            ..ContainerLimits::default()
        },
    };
    // Output goes out as the program writes it, not after it ends.
    let mut sink = |stream: OutputStream, bytes: &[u8]| {
        let _ = match stream {
            OutputStream::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(bytes).and_then(|()| o.flush())
            }
            OutputStream::Stderr => std::io::stderr().lock().write_all(bytes),
        };
    };
    // Ctrl-C or SIGTERM ends the run the way a deadline does: the run is dropped, which
    // kills its cgroup and removes its mounts and directory before this command exits.
    let started = stellar_proto::clock::now();
    let out = tokio::select! {
        out = runtime.run(&image, call, &mut sink) => out,
        () = crate::shutdown_signal() => {
            eprintln!("stellar run: interrupted; the container was stopped and removed");
            return Ok(130);
        }
    };
    let sandbox_us = started.elapsed().as_micros() as u64;
    Ok(finish(
        &out.result,
        &out.metering,
        a.verbose,
        Some(sandbox_us),
    ))
}

#[cfg(not(target_os = "linux"))]
async fn run_container(a: RunArgs) -> Result<u8, String> {
    Err(format!(
        "{} is not a WebAssembly module; containers run on Linux only",
        a.file.display()
    ))
}
