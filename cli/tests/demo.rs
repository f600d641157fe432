//! `stellar demo` as a user runs it: it must finish on its own, exit 0 and show every step
//! (placement reasons, gRPC and HTTP invocations, scale from zero, isolation, the bill).

#![allow(clippy::disallowed_methods)]

use std::process::{Command, Stdio};

#[test]
fn the_demo_runs_every_step_and_exits_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_stellar"))
        .arg("demo")
        .env("STELLAR_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run stellar demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for want in [
        "[7/7]",
        "LATENCY",
        "Hello, StellarCloud!",
        "placed by this call",
        "HTTP 200",
        "NOT_FOUND",
        "TOTAL",
        "every step worked",
    ] {
        assert!(stdout.contains(want), "missing `{want}` in:\n{stdout}");
    }
}
