//! `probe`: the worker's test fixture, not an example to copy. Each first argument exercises
//! one WASI behaviour or one limit of the sandbox.
//!
//!   probe echo [ARGS..]   prints its arguments, the sorted environment and stdin; writes a
//!                         line to stderr; exits with $EXIT_CODE (default 0)
//!   probe spin            loops forever (the deadline must stop it)
//!   probe alloc MIB       touches MIB mebibytes of heap (the memory limit must stop it)
//!   probe out BYTES       writes BYTES bytes to stdout (the output cap must stop it)
//!   probe sleep MS        sleeps MS milliseconds in WASI poll_oneoff (the deadline must
//!                         wake and stop it)
//!   probe panic           panics (a trap)
//!   probe hash            iterates a std HashMap (randomly seeded through WASI random_get)
//!   probe scratch         writes and reads back /scratch/probe.txt
//!   probe random N        prints N bytes of WASI `random_get` in hex
//!   probe exit N          exits with status N at once (no output)
//!   probe read PATH       prints the file at PATH, or exits 1 naming why it cannot
//!
//! Run on its own:
//!   wasmtime --env EXIT_CODE=3 target/wasm32-wasip1/release/probe.wasm echo a b < /etc/hostname

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = std::io::stdout().lock();
    match args.first().map(String::as_str) {
        Some("echo") => {
            let _ = writeln!(out, "args: {}", args[1..].join(" "));
            let mut env: Vec<(String, String)> = std::env::vars().collect();
            env.sort();
            for (k, v) in &env {
                let _ = writeln!(out, "env: {k}={v}");
            }
            let mut stdin = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut stdin);
            let _ = out.write_all(b"stdin: ");
            let _ = out.write_all(&stdin);
            let _ = writeln!(out);
            eprintln!("probe wrote to stderr");
            let code = std::env::var("EXIT_CODE")
                .ok()
                .and_then(|c| c.parse::<u8>().ok())
                .unwrap_or(0);
            ExitCode::from(code)
        }
        Some("spin") => {
            let mut x: u64 = 1;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        Some("alloc") => {
            let mib: usize = args.get(1).and_then(|m| m.parse().ok()).unwrap_or(1);
            let mut blocks = Vec::new();
            for i in 0..mib {
                blocks.push(vec![i as u8; 1 << 20]);
            }
            let _ = writeln!(out, "allocated {} MiB", blocks.len());
            ExitCode::SUCCESS
        }
        Some("out") => {
            let n: usize = args.get(1).and_then(|m| m.parse().ok()).unwrap_or(0);
            let chunk = [b'x'; 4096];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                if out.write_all(&chunk[..k]).is_err() {
                    return ExitCode::from(1);
                }
                left -= k;
            }
            ExitCode::SUCCESS
        }
        Some("sleep") => {
            let ms: u64 = args.get(1).and_then(|m| m.parse().ok()).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(ms));
            let _ = writeln!(out, "slept {ms} ms");
            ExitCode::SUCCESS
        }
        Some("panic") => panic!("the probe was asked to panic"),
        Some("hash") => {
            let m: HashMap<u32, u32> = (0..64).map(|i| (i, i * i)).collect();
            let order: Vec<String> = m.keys().map(|k| k.to_string()).collect();
            let _ = writeln!(out, "{}", order.join(","));
            ExitCode::SUCCESS
        }
        Some("scratch") => {
            let path = "/scratch/probe.txt";
            if let Err(e) = std::fs::write(path, b"kept in scratch") {
                eprintln!("cannot write {path}: {e}");
                return ExitCode::from(1);
            }
            match std::fs::read_to_string(path) {
                Ok(s) => {
                    let _ = writeln!(out, "{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cannot read {path}: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some("random") => {
            let n: usize = args.get(1).and_then(|m| m.parse().ok()).unwrap_or(32);
            let mut buf = vec![0u8; n];
            if let Err(errno) = random_get(&mut buf) {
                eprintln!("random_get failed: errno {errno}");
                return ExitCode::from(1);
            }
            let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
            let _ = writeln!(out, "{hex}");
            ExitCode::SUCCESS
        }
        Some("read") => {
            let path = args.get(1).map_or("", String::as_str);
            match std::fs::read(path) {
                Ok(b) => {
                    let _ = out.write_all(&b);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cannot read {path}: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some("exit") => {
            let code: u8 = args.get(1).and_then(|m| m.parse().ok()).unwrap_or(0);
            ExitCode::from(code)
        }
        other => {
            eprintln!("probe: unknown mode {other:?}");
            ExitCode::from(2)
        }
    }
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    #[link_name = "random_get"]
    fn wasi_random_get(buf: *mut u8, len: usize) -> u16;
}

/// WASI preview 1 `random_get`, called directly (std has no public way to read it).
fn random_get(buf: &mut [u8]) -> Result<(), u16> {
    // SAFETY: the host writes exactly `buf.len()` bytes into `buf`, which we own mutably.
    match unsafe { wasi_random_get(buf.as_mut_ptr(), buf.len()) } {
        0 => Ok(()),
        errno => Err(errno),
    }
}
