//! `stellar worker` as a real process: it joins a `stellar scheduler` process, and SIGTERM
//! makes it drain (the node is marked draining) and exit cleanly.

#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster;
use stellar_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_worker_and_it_exits_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = cluster(
        dir.path(),
        1,
        &["--tick-ms", "20", "--join-token", "process-token"],
    );
    cluster.wait_leader(1000).await.expect("leader");
    let log = std::fs::File::create(dir.path().join("worker.log")).expect("log");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args(["worker", "--join"])
        .arg(&cluster.addresses[0])
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
    let client = cluster.client();
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
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("drained"), "log:\n{log}");
    let drained = list()
        .await
        .into_iter()
        .find(|n| n.id == node.id)
        .expect("the node stays registered");
    assert_eq!(drained.state, pb::NodeState::Draining as i32);
}
