//! Issue 15's adversaries as real processes: three honest `stellar worker`s and five that
//! cheat (the test build's `STELLAR_WORKER_CHEAT`, never in a shipped binary) serve a
//! deployed WebAssembly function behind a real gateway and control plane. Each cheater is
//! refused or quarantined by the cluster's own checks (signed receipts, re-execution,
//! reputation), no honest node is, and nothing the cheaters made up is billed.

#![cfg(feature = "cheat")]
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stellar_proto::v1 as pb;

const BIN: &str = env!("CARGO_BIN_EXE_stellar");
const JOIN: &str = "join-secret";

/// The ways the cheaters cheat (STELLAR_WORKER_CHEAT), one worker each.
const CHEATS: [&str; 5] = [
    "inflate-fuel:0.1",
    "wrong-output:0.05",
    "replay",
    "other-tenant",
    "other-node",
];

struct Worker {
    child: Child,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn worker(dir: &std::path::Path, gateway: &str, name: &str, cheat: Option<&str>) -> Worker {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("worker log");
    let mut cmd = Command::new(BIN);
    cmd.args(["worker", "--join", gateway, "--token", JOIN])
        .args(["--region", "cn-east", "--zone", name])
        .args([
            "--cpu-millis",
            "2000",
            "--memory-mib",
            "512",
            "--containers",
            "false",
        ])
        .arg("--data-dir")
        .arg(dir.join(name))
        .env_remove("STELLAR_WORKER_CHEAT")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(c) = cheat {
        cmd.env("STELLAR_WORKER_CHEAT", c);
    }
    Worker {
        child: cmd.spawn().expect("spawn stellar worker"),
    }
}

fn node_of(dir: &std::path::Path) -> u64 {
    stellar_worker::Identity::load(dir)
        .expect("identity")
        .node()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cheater_is_refused_or_quarantined_and_no_honest_node_is() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = common::cluster(&dir.path().join("plane"), 1, &["--tick-ms", "20"]);
    cluster.wait_leader(1000).await.expect("leader");
    let admin = common::admin_token(&cluster).await;
    let gateway = common::Gateway::start(dir.path(), &cluster.addresses.join(","), &admin, JOIN);
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(worker(
            dir.path(),
            &gateway.grpc,
            &format!("honest-{i}"),
            None,
        ));
    }
    for (i, c) in CHEATS.iter().enumerate() {
        workers.push(worker(
            dir.path(),
            &gateway.grpc,
            &format!("cheat-{i}"),
            Some(c),
        ));
    }
    let client = stellar_proto::client::ClusterClient::new(std::slice::from_ref(&gateway.grpc))
        .expect("gateway address")
        .with_token(&admin);
    common::wait_for_nodes(&client, 8).await;
    let honest: Vec<u64> = (0..3)
        .map(|i| node_of(&dir.path().join(format!("honest-{i}"))))
        .collect();
    let cheaters: Vec<(u64, &str)> = CHEATS
        .iter()
        .enumerate()
        .map(|(i, c)| (node_of(&dir.path().join(format!("cheat-{i}"))), *c))
        .collect();
    client.create_tenant("acme").await.expect("tenant");
    let probe = std::fs::read(format!(
        "{}/../examples/wasm/prebuilt/probe.wasm",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("probe.wasm");
    client
        .deploy(pb::DeployRequest {
            tenant: "acme".into(),
            name: "probe".into(),
            module: probe,
            replicas: 8,
            limits: Some(pb::FunctionLimits {
                cpu_millis: 100,
                memory_mib: 32,
                timeout_ms: 5000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("deploy");

    let start = Instant::now();
    let mut calls = 0u64;
    let states = loop {
        for _ in 0..20 {
            let call = pb::InvokeRequest {
                tenant: "acme".into(),
                function: "probe".into(),
                args: vec!["echo".into()],
                ..Default::default()
            };
            if client.invoke(call).await.is_ok() {
                calls += 1;
            }
        }
        let nodes = client.nodes().await.unwrap_or_default();
        let quarantined = |id: u64| {
            nodes
                .iter()
                .any(|n| n.id == id && n.state == pb::NodeState::Quarantined as i32)
        };
        if cheaters.iter().all(|(id, _)| quarantined(*id)) {
            break nodes;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "after {calls} calls, cheaters still in service: {:?}",
            cheaters
                .iter()
                .filter(|(id, _)| !quarantined(*id))
                .map(|(id, c)| (c, nodes.iter().find(|n| n.id == *id)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("every cheater quarantined after {calls} calls");
    for (id, cheat) in &cheaters {
        let n = states.iter().find(|n| n.id == *id).unwrap();
        let refused: u64 = n.receipts_refused.iter().sum();
        assert!(
            n.checks_mismatched > 0 || refused > 0,
            "{cheat}: quarantined without evidence: {n:?}"
        );
    }
    for id in &honest {
        let n = states.iter().find(|n| n.id == *id).unwrap();
        assert_eq!(n.state, pb::NodeState::Ready as i32, "honest node: {n:?}");
        assert_eq!(n.checks_mismatched, 0, "honest node blamed: {n:?}");
    }
    // Nothing billed to a tenant that does not exist, and the ledger balances.
    let usage = client
        .call(|mut c| async move {
            c.get_usage(pb::GetUsageRequest {
                cells: true,
                ..Default::default()
            })
            .await
        })
        .await
        .expect("usage");
    assert!(
        usage.bill.iter().all(|l| l.tenant != "victim"),
        "{:?}",
        usage.bill
    );
    assert_eq!(
        usage.total_micros,
        usage.credits.iter().map(|c| c.credit_micros).sum::<u64>() + usage.platform_fee_micros
    );
    drop(workers);
}
