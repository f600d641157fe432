//! `stellar worker` as a real process: it joins through a `stellar gateway` process in front
//! of a `stellar scheduler` process, serves an invocation whose usage `stellar usage` then
//! bills, and SIGTERM makes it drain (the node is marked draining) and exit cleanly.

#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster;
use stellar_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_serves_is_billed_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = cluster(dir.path(), 1, &["--tick-ms", "20"]);
    cluster.wait_leader(1000).await.expect("leader");
    let gateway = common::Gateway::start(
        dir.path(),
        &cluster.addresses[0],
        &common::admin_token(&cluster).await,
        "process-token",
    );
    let log = std::fs::File::create(dir.path().join("worker.log")).expect("log");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args(["worker", "--join"])
        .arg(&gateway.grpc)
        .args([
            "--token",
            "process-token",
            "--region",
            "cn-east",
            "--data-dir",
        ])
        .arg(dir.path().join("worker"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn stellar worker");
    let client = stellar_proto::client::ClusterClient::new(std::slice::from_ref(&gateway.grpc))
        .expect("gateway address")
        .with_token(&common::admin_token(&cluster).await);
    let list = || async { client.nodes().await.unwrap_or_default() };
    let start = Instant::now();
    let node = loop {
        if let Some(n) = list().await.into_iter().next() {
            break n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "worker never registered; log:\n{}",
            std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(node.attributes.expect("attributes").region, "cn-east");
    // Deploy `hello`, invoke it, and read the bill with `stellar usage`.
    client.create_tenant("acme").await.expect("tenant");
    let module = std::fs::read(format!(
        "{}/../examples/wasm/prebuilt/hello.wasm",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("hello.wasm");
    let deploy = pb::DeployRequest {
        request_id: b"deploy-hello-process".to_vec(),
        name: "hello".into(),
        module,
        limits: Some(pb::FunctionLimits {
            cpu_millis: 100,
            memory_mib: 16,
            timeout_ms: 1000,
            ..Default::default()
        }),
        replicas: 1,
        tenant: "acme".into(),
        ..Default::default()
    };
    client.deploy(deploy.clone()).await.expect("deploy");
    let invoke = pb::InvokeRequest {
        tenant: "acme".into(),
        function: "hello".into(),
        stdin: b"Ada".to_vec(),
        ..Default::default()
    };
    let start = Instant::now();
    let answer = loop {
        let r = client.invoke(invoke.clone()).await;
        // Until the instance is loaded, the worker may refuse the call (not run).
        if let Ok(r) = &r
            && r.error_code.is_empty()
        {
            break r.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no invocation: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(String::from_utf8_lossy(&answer.stdout), "Hello, Ada!\n");
    let fuel = answer.usage.expect("usage").fuel;
    let start = Instant::now();
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_stellar"))
            .args(["usage", "--tenant", "acme", "-o", "json", "--endpoint"])
            .arg(&gateway.grpc)
            .arg("--token")
            .arg(common::admin_token(&cluster).await)
            .output()
            .expect("stellar usage");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let line = v["bill"]
            .as_array()
            .and_then(|b| b.iter().find(|l| l["function"] == "hello").cloned());
        if let Some(line) = line {
            assert_eq!(line["invocations"], 1);
            assert_eq!(line["fuel"], fuel);
            assert_eq!(v["credits"].as_array().map(Vec::len), Some(1));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "usage never billed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // `stellar invoke` ends with the function's own exit status, as `wasmtime run` does.
    let admin = common::admin_token(&cluster).await;
    let stellar = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_stellar"))
            .args(args)
            .args(["--endpoint", &gateway.grpc, "--token", &admin])
            .env("HOME", "/nonexistent")
            .stdin(Stdio::null())
            .output()
            .expect("run stellar")
    };
    let probe = format!(
        "{}/../examples/wasm/prebuilt/probe.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = stellar(&[
        "deploy", &probe, "--name", "probe", "--memory", "32", "--tenant", "acme",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    for (args, want) in [
        (&["--arg", "exit", "--arg", "3"][..], 3),
        (&["--arg", "panic"][..], 134),
        (&["--arg", "echo"][..], 0),
    ] {
        let code = loop {
            let mut a = vec!["invoke", "probe", "--tenant", "acme"];
            a.extend_from_slice(args);
            let out = stellar(&a);
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            // Until the instance is ready the platform's own failure (1) says so.
            if !err.contains("NO_READY_INSTANCE") && !err.contains("no ready instance") {
                break out.status.code();
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{err}");
        };
        assert_eq!(code, Some(want), "stellar invoke probe {args:?}");
    }
    // A module over the size limit is refused before upload, saying so (not an h2 error).
    let big = dir.path().join("big.wasm");
    let mut bytes = std::fs::read(&probe).unwrap();
    bytes.resize(17 << 20, 0);
    std::fs::write(&big, bytes).unwrap();
    let out = stellar(&[
        "deploy",
        big.to_str().unwrap(),
        "--name",
        "big",
        "--tenant",
        "acme",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("at most"), "{err}");
    // SIGTERM: drain, then a clean exit.
    let pid = worker.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = worker.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the worker did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    assert!(
        status.success(),
        "exit status {status}; log:\n{log}\ngateway log:\n{}",
        gateway.log()
    );
    assert!(log.contains("drained"), "log:\n{log}");
    // The gateway reports the drain in its next liveness batch: committed a moment after
    // the worker exits.
    let start = Instant::now();
    loop {
        let drained = list()
            .await
            .into_iter()
            .find(|n| n.id == node.id)
            .expect("the node stays registered");
        if drained.state == pb::NodeState::Draining as i32 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the node is {:?}, not draining",
            pb::NodeState::try_from(drained.state)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
