//! `stellar run`: one function, run here in the very sandbox a worker uses (same engine,
//! limits, fuel metering and WASI), with no control plane: what a developer tries before
//! deploying, and what a node owner can use to check a bill (the same input gives the same
//! fuel).
//!
//! ```text
//!  FILE.wasm ─▶ Sandbox (1 slot, --memory) ─▶ load (sha256, compile) ─▶ invoke(args, env,
//!      stdin, limits) ─▶ stdout / stderr written out ─▶ exit with the function's status
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

The exit status is the function's own (134 when it trapped or hit a limit), as `wasmtime
run` does. Container images (IMAGE.tar) are not supported yet: only WebAssembly modules.")]
pub struct RunArgs {
    /// The function: a WebAssembly module (WASI preview 1, exporting `_start`).
    file: PathBuf,
    /// Arguments passed to the function (repeat for more; `--arg --top --arg 5`).
    #[arg(long = "arg", allow_hyphen_values = true)]
    args: Vec<String>,
    /// An environment variable KEY=VALUE (repeat for more).
    #[arg(long = "env", value_parser = parse_env)]
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
    /// Fuel budget (the deterministic compute unit a bill counts).
    #[arg(long, default_value_t = InvocationLimits::DEFAULT_FUEL)]
    fuel: u64,
    /// Print the usage record (fuel, wall time, memory, bytes, exit code) on stderr.
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

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// Runs the function once; the exit status to end with.
pub async fn run(a: RunArgs) -> Result<u8, String> {
    if !(a.timeout > 0.0 && a.timeout <= 3600.0) {
        return Err(format!(
            "--timeout {} is out of range: give 0 < seconds ≤ 3600",
            a.timeout
        ));
    }
    let shown = a.file.display().to_string();
    // The checks `stellar deploy` makes: what runs here would also deploy.
    let wasm = crate::functions::read_module(&a.file, a.memory).map_err(|e| {
        if shown.ends_with(".tar") {
            format!("{e} (a container image? `stellar run` runs WebAssembly modules only for now)")
        } else {
            e
        }
    })?;
    let stdin = crate::functions::read_data(a.stdin.as_deref())?;
    let name = a
        .file
        .file_stem()
        .map_or_else(|| "function".into(), |s| s.to_string_lossy().into_owned());
    let limits = InvocationLimits {
        memory_bytes: u64::from(a.memory) << 20,
        timeout: Duration::from_secs_f64(a.timeout),
        fuel: a.fuel,
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
    let (code, message) = match &out.result {
        Ok(()) => ("", String::new()),
        Err(e) => (e.code(), e.to_string()),
    };
    if !code.is_empty() && code != "EXIT_CODE" {
        eprintln!("stellar run: {code}: {message}");
    }
    if verbose {
        let m = out.metering;
        eprintln!(
            "{}",
            serde_json::json!({
                "fuel": m.fuel, "wall_us": m.wall_us, "peak_memory_bytes": m.peak_memory_bytes,
                "bytes_in": m.bytes_in, "bytes_out": m.bytes_out, "exit_code": m.exit_code,
                "error_code": code,
            })
        );
    }
    Ok(crate::functions::exit_status_of(
        code,
        out.metering.exit_code,
    ))
}
