//! `stellar run` and a deployed function behave the same: the probe module run locally and
//! through a `stellar dev` cluster (replica, gateway, worker as real processes), for each
//! WASI preview 1 behaviour a function can see — args, environ, stdin, clocks and
//! `poll_oneoff`, random, fd and path calls on a preopened dir (and refusal outside it),
//! `proc_exit` — with the same output, exit status and fuel.

#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

fn probe() -> String {
    format!(
        "{}/../examples/wasm/prebuilt/probe.wasm",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A `stellar dev` cluster, stopped when dropped.
struct Dev {
    child: Child,
    endpoint: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl Dev {
    fn start() -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_stellar"))
            .arg("dev")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--workers", "1", "--listen", &free_addr()])
            .args([
                "--http-listen",
                &free_addr(),
                "--replica-listen",
                &free_addr(),
            ])
            .env("STELLAR_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (mut endpoint, mut token) = (String::new(), String::new());
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            let last = line
                .split_whitespace()
                .last()
                .unwrap_or_default()
                .to_string();
            if line.contains("gRPC endpoint") {
                endpoint = line
                    .split_whitespace()
                    .nth(2)
                    .unwrap_or_default()
                    .to_string();
            } else if line.trim_start().starts_with("tenant `") {
                token = last;
                break;
            }
        }
        assert!(
            !endpoint.is_empty() && token.starts_with("stl_"),
            "dev did not start"
        );
        Dev {
            child,
            endpoint,
            token,
            _dir: dir,
        }
    }

    fn stellar(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_stellar"))
            .args(args)
            .env("STELLAR_ENDPOINT", &self.endpoint)
            .env("STELLAR_TOKEN", &self.token)
            .output()
            .unwrap()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a run shows: stdout, exit status, fuel.
#[derive(Debug, PartialEq)]
struct Seen {
    stdout: String,
    status: Option<i32>,
    fuel: u64,
}

fn local(args: &[&str], scratch: &std::path::Path) -> Seen {
    let dir = format!("{}::/scratch", scratch.display());
    let out = Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args(["run", &probe(), "--dir", &dir, "-v"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let usage: serde_json::Value =
        serde_json::from_str(stderr.lines().last().unwrap_or_default()).unwrap();
    Seen {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        status: out.status.code(),
        fuel: usage["fuel"].as_u64().unwrap(),
    }
}

fn deployed(dev: &Dev, args: &[&str]) -> Seen {
    let mut all = vec!["invoke", "probe", "-o", "json"];
    all.extend_from_slice(args);
    let out = dev.stellar(&all);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    Seen {
        stdout: v["stdout"].as_str().unwrap().to_string(),
        status: out.status.code(),
        fuel: v["usage"]["fuel"].as_u64().unwrap(),
    }
}

#[test]
fn a_module_behaves_the_same_run_here_and_deployed() {
    let dev = Dev::start();
    let out = dev.stellar(&["deploy", &probe(), "--name", "probe", "--scratch"]);
    assert!(out.status.success(), "{out:?}");
    let scratch = tempfile::tempdir().unwrap();
    let cases: &[&[&str]] = &[
        // args, environ, stdin, stderr and the exit status it asks for
        &[
            "--arg",
            "echo",
            "--arg",
            "a b",
            "--arg",
            "c",
            "--env",
            "EXIT_CODE=3",
            "--env",
            "GREETING=hi",
        ],
        // fd and path calls on the preopened /scratch: write, read back
        &["--arg", "scratch"],
        // nothing outside the preopen: refused the same way
        &["--arg", "read", "--arg", "/etc/hostname"],
        &["--arg", "read", "--arg", "/scratch/../../etc/hostname"],
        // clocks and poll_oneoff
        &["--arg", "sleep", "--arg", "30"],
        // proc_exit
        &["--arg", "exit", "--arg", "7"],
    ];
    for args in cases {
        let here = local(args, scratch.path());
        let there = deployed(&dev, args);
        assert_eq!(here, there, "{args:?}");
        assert!(here.fuel > 0, "{args:?}: {here:?}");
    }
    let echo = local(cases[0], scratch.path());
    assert!(echo.stdout.contains("args: a b c"), "{echo:?}");
    assert!(echo.stdout.contains("env: GREETING=hi"), "{echo:?}");
    assert_eq!(echo.status, Some(3));

    // random: the bytes differ per call by design (a fresh secret seed), their shape does
    // not. (Nor does the fuel for the same seed; formatting different bytes as hex costs
    // slightly different fuel, so it is not compared across seeds here.)
    let (here, there) = (
        local(&["--arg", "random", "--arg", "16"], scratch.path()),
        deployed(&dev, &["--arg", "random", "--arg", "16"]),
    );
    assert_eq!(here.stdout.trim().len(), 32);
    assert_eq!(there.stdout.trim().len(), 32);
    assert_ne!(here.stdout, there.stdout);
    assert_eq!(here.status, Some(0));
    assert_eq!(there.status, Some(0));
}
