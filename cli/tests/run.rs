//! `stellar run` as a developer uses it: a module run here in a worker's sandbox, its
//! output, its exit status passed through, and the same fuel a worker meters.

#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

use stellar_worker::sandbox::{InvocationInput, InvocationLimits, Sandbox, SandboxConfig};

fn prebuilt(name: &str) -> String {
    format!(
        "{}/../examples/wasm/prebuilt/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn stellar_run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stellar"))
        .arg("run")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stellar runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("stellar run finishes")
}

/// The usage record `-v` prints (the last stderr line).
fn usage(out: &Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().last().expect("a usage line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

#[test]
fn a_module_runs_here_with_its_args_env_stdin_and_exit_status() {
    let hello = prebuilt("hello");
    let out = stellar_run(&[&hello, "--stdin", "Ada"], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello, Ada!\n");
    // stdin from this command's own stdin.
    let out = stellar_run(&[&hello, "--stdin", "-"], b"Grace");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello, Grace!\n");

    // Arguments, environment and stderr reach the function; its exit status comes back.
    let probe = prebuilt("probe");
    let out = stellar_run(
        &[
            &probe,
            "--arg",
            "echo",
            "--arg",
            "--x",
            "--env",
            "EXIT_CODE=7",
            "--env",
            "K=v=w",
            "--stdin",
            "in",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("args: --x"), "{stdout}");
    assert!(stdout.contains("env: K=v=w"), "{stdout}");
    assert!(stdout.contains("stdin: in"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("probe wrote to stderr"));

    // A limit hit is a typed code and 134, as `stellar invoke` ends.
    let out = stellar_run(&[&probe, "--arg", "spin", "--fuel", "100000"], b"");
    assert_eq!(out.status.code(), Some(134), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("OUT_OF_FUEL"));
}

#[test]
fn the_fuel_is_the_fuel_a_worker_meters() {
    let hello = prebuilt("hello");
    let a = usage(&stellar_run(&[&hello, "--stdin", "Ada", "-v"], b""));
    let b = usage(&stellar_run(&[&hello, "--stdin", "Ada", "-v"], b""));
    assert_eq!(a["fuel"], b["fuel"], "deterministic");
    assert_eq!(a["exit_code"], 0);
    // The worker's own sandbox, with a function's default limits, on the same input.
    let wasm = std::fs::read(&hello).unwrap();
    let sandbox = Sandbox::new(SandboxConfig::default()).unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&wasm));
    let f = sandbox.load(&sha, &wasm).unwrap();
    let input = InvocationInput {
        stdin: b"Ada".to_vec(),
        ..Default::default()
    };
    let limits = InvocationLimits::from_spec(&Default::default());
    let on_worker = sandbox.invoke(&f, "hello", &input, &limits);
    assert_eq!(a["fuel"].as_u64(), Some(on_worker.metering.fuel));
}

#[test]
fn a_directory_is_reachable_only_when_given() {
    let probe = prebuilt("probe");
    // No --dir: no filesystem at all, as on a worker.
    let out = stellar_run(&[&probe, "--arg", "scratch"], b"");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write"));
    let dir = tempfile::tempdir().unwrap();
    let given = format!("{}::/scratch", dir.path().display());
    let out = stellar_run(&[&probe, "--arg", "scratch", "--dir", &given], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept in scratch\n");
    assert_eq!(
        std::fs::read(dir.path().join("probe.txt")).unwrap(),
        b"kept in scratch"
    );
    // Nothing outside it is reachable: not through `..`, not through a symlink that leads
    // out (the host file is right next to the given directory).
    let root = tempfile::tempdir().unwrap();
    let given = root.path().join("given");
    std::fs::create_dir(&given).unwrap();
    std::fs::write(given.join("inside.txt"), b"inside").unwrap();
    std::fs::write(root.path().join("secret.txt"), b"secret").unwrap();
    std::os::unix::fs::symlink(root.path().join("secret.txt"), given.join("link")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", given.join("rel")).unwrap();
    let spec = format!("{}::/data", given.display());
    let read = |path: &str| {
        stellar_run(
            &[&probe, "--arg", "read", "--arg", path, "--dir", &spec],
            b"",
        )
    };
    let out = read("/data/inside.txt");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"inside");
    for escape in [
        "/data/../secret.txt",
        "/data/link",
        "/data/rel",
        "/secret.txt",
    ] {
        let out = read(escape);
        assert_eq!(out.status.code(), Some(1), "{escape}: {out:?}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("secret"),
            "{escape} escaped"
        );
    }
    // A host path that is not a directory is refused before anything runs.
    let out = stellar_run(&[&probe, "--dir", "/nonexistent::/scratch"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("image.tar");
    std::fs::write(&not_wasm, b"not a module").unwrap();
    let out = stellar_run(&[&not_wasm.to_string_lossy()], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("neither an OCI image archive nor a rootfs tarball"),
        "{out:?}"
    );
    let out = stellar_run(&[&prebuilt("hello"), "--env", "NOEQUALS"], b"");
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
    let out = stellar_run(&["/nonexistent.wasm"], b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}
