//! Real processes on loopback: 3 replicas, a client deploying continuously, `kill -9` of the
//! leader; a new leader commits within a bound, every acknowledged deploy survives, and the
//! killed replica restarts and catches up by snapshot (its log was compacted meanwhile).

// Waits on real processes are bounded by the wall clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{cluster, deploy};
use stellar_load::raftbench::bench_node as node;
use stellar_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_loses_no_acknowledged_deploy_and_the_replica_catches_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = cluster(
        dir.path(),
        3,
        &[
            "--snapshot-every",
            "50",
            "--keep-entries",
            "5",
            "--tick-ms",
            "50",
        ],
    );
    let leader = cluster
        .wait_leader(1000)
        .await
        .expect("a leader within 20 s");
    let client = cluster.client();
    client.create_tenant("acme").await.expect("create tenant");
    client
        .call(|mut c| async move {
            c.register_nodes(pb::RegisterNodesRequest {
                request_id: b"nodes-1".to_vec(),
                nodes: (1..=40).map(|i| node(i, false)).collect(),
            })
            .await
        })
        .await
        .expect("register nodes");

    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut i = 0u32;
    let deploy_one = |i: u32| {
        let client = client.clone();
        async move {
            let name = format!("fn-{i}");
            let rid = format!("deploy-{i}").into_bytes();
            let r = client
                .call(|mut c| {
                    let req = deploy("acme", &name, rid.clone());
                    async move { c.deploy(req).await }
                })
                .await;
            (name, r)
        }
    };
    // Phase 1: deploy while the cluster is healthy.
    while acked.len() < 30 {
        let (name, r) = deploy_one(i).await;
        i += 1;
        let r = r.expect("deploy on a healthy cluster");
        assert_eq!(r.allocations.len(), 1, "one replica placed");
        acked.insert(name);
    }
    // Kill the leader; keep deploying; time until a write commits again.
    cluster.kill(leader);
    let killed_at = Instant::now();
    let mut failover = None;
    while acked.len() < 400 {
        let (name, r) = deploy_one(i).await;
        i += 1;
        match r {
            Ok(_) => {
                if failover.is_none() {
                    failover = Some(killed_at.elapsed());
                }
                acked.insert(name);
            }
            Err(s) => {
                // Not acknowledged: allowed to be lost, but retried ids are safe anyway.
                assert!(
                    killed_at.elapsed() < Duration::from_secs(30),
                    "writes still failing 30 s after the kill: {s}"
                );
            }
        }
    }
    let failover = failover.expect("a write committed after the kill");
    eprintln!(
        "new leader committed {} ms after kill -9",
        failover.as_millis()
    );
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );

    // The killed replica restarts and catches up by snapshot: the leader compacted the log.
    let new_leader = cluster.wait_leader(500).await.expect("leader");
    assert_ne!(new_leader, leader);
    let target = cluster
        .status(new_leader)
        .await
        .expect("status")
        .commit_index;
    cluster.spawn(leader).expect("restart the killed replica");
    let start = Instant::now();
    let caught_up = loop {
        if let Some(s) = cluster.status(leader).await
            && s.applied_index >= target
        {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "restarted replica did not catch up in 30 s; log:\n{}",
            std::fs::read_to_string(cluster.log_path(leader)).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        caught_up.snapshots_installed >= 1,
        "expected catch-up by snapshot, status {caught_up:?}"
    );

    // Every acknowledged deploy is there, read linearizably through the restarted replica.
    let mut c = cluster
        .client()
        .client_for(&cluster.addresses[(leader - 1) as usize])
        .expect("client");
    let listed = c
        .list_functions(pb::ListFunctionsRequest {
            tenant: "acme".into(),
            read: None,
        })
        .await
        .expect("linearizable list on a follower")
        .into_inner();
    let present: BTreeSet<String> = listed.functions.into_iter().map(|f| f.name).collect();
    let missing: Vec<&String> = acked.difference(&present).collect();
    assert!(missing.is_empty(), "acknowledged deploys lost: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = cluster(dir.path(), 1, &["--tick-ms", "20"]);
    cluster.wait_leader(1000).await.expect("leader");
    let client = cluster.client();
    // The bootstrap admin token is committed first.
    common::admin_token(&cluster).await;
    let before = cluster.status(1).await.expect("status").applied_index;
    // Unknown tenant, empty module, oversized replica count, bad node attributes.
    let err = client
        .call(|mut c| async move { c.deploy(deploy("nobody", "f", vec![])).await })
        .await
        .expect_err("unknown tenant");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let err = client
        .call(|mut c| async move {
            let mut d = deploy("nobody", "f", vec![]);
            d.module.clear();
            c.deploy(d).await
        })
        .await
        .expect_err("empty module");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let err = client
        .call(|mut c| async move {
            let mut n = node(7, false);
            n.attributes.as_mut().expect("attrs").arch = "sparc".into();
            c.register_nodes(pb::RegisterNodesRequest {
                request_id: vec![],
                nodes: vec![node(6, false), n],
            })
            .await
        })
        .await
        .expect_err("bad arch");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("sparc"), "{err}");
    let after = cluster.status(1).await.expect("status");
    // The refused registration was one entry: applied, but it changed no state.
    assert!(after.applied_index <= before + 1);
    assert_eq!(
        after.nodes, 0,
        "the valid node of the refused batch was not registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contradicting_peer_list_is_refused_at_startup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = cluster(dir.path(), 1, &["--tick-ms", "20"]);
    cluster.wait_leader(1000).await.expect("leader");
    cluster.kill(1);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args(["scheduler", "--id", "1", "--peers"])
        .arg(format!("1={},2=127.0.0.1:1", cluster.addresses[0]))
        .arg("--data-dir")
        .arg(cluster.data_dir(1))
        .output()
        .expect("run stellar");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("contradicts the membership"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_joins_at_runtime_and_another_is_removed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = cluster(dir.path(), 3, &["--tick-ms", "50"]);
    cluster.wait_leader(1000).await.expect("leader");
    let client = cluster.client();
    client
        .call(|mut c| async move {
            c.create_tenant(pb::CreateTenantRequest {
                request_id: b"t1".to_vec(),
                name: "before-join".into(),
                token_sha256: vec![],
            })
            .await
        })
        .await
        .expect("write before the join");
    // A fourth replica starts empty and waits to be added.
    let port = stellar_load::procs::free_ports(1).expect("port")[0];
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("r4.log")).expect("log");
    let mut joiner = std::process::Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args([
            "scheduler",
            "--id",
            "4",
            "--join",
            "--tick-ms",
            "50",
            "--listen",
        ])
        .arg(&addr)
        .arg("--data-dir")
        .arg(dir.path().join("r4"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn the joiner");
    let endpoints = cluster.addresses.join(",");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args([
            "cluster",
            "add",
            "--id",
            "4",
            "--address",
            &addr,
            "--endpoint",
            &endpoints,
            "--token",
            &common::admin_token(&cluster).await,
        ])
        .output()
        .expect("stellar cluster add");
    assert!(
        out.status.success(),
        "cluster add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&addr));
    // It catches up: four voters, and everything committed before the add is applied there.
    let target = cluster
        .status(cluster.wait_leader(500).await.expect("leader"))
        .await
        .expect("leader status")
        .commit_index;
    let mut c4 = client.client_for(&addr).expect("client");
    let start = Instant::now();
    loop {
        let s = c4.cluster_status(pb::ClusterStatusRequest {}).await;
        if let Ok(s) = &s
            && s.get_ref().replicas.len() == 4
            && s.get_ref().applied_index >= target
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = joiner.kill();
            panic!(
                "replica 4 did not catch up to {target}: {s:?}; log:\n{}",
                std::fs::read_to_string(dir.path().join("r4.log")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Remove replica 2: the membership shrinks and its process stops by itself.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args([
            "cluster",
            "remove",
            "--id",
            "2",
            "--endpoint",
            &endpoints,
            "-o",
            "json",
            "--token",
            &common::admin_token(&cluster).await,
        ])
        .output()
        .expect("stellar cluster remove");
    assert!(
        out.status.success(),
        "cluster remove failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let members: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json membership");
    let ids: Vec<u64> = members
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids, vec![1, 3, 4]);
    let mut cluster = cluster;
    let start = Instant::now();
    while cluster.status(2).await.is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "removed replica 2 still serving"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The remaining three still commit.
    client
        .call(|mut c| async move {
            c.create_tenant(pb::CreateTenantRequest {
                request_id: b"t2".to_vec(),
                name: "after-remove".into(),
                token_sha256: vec![],
            })
            .await
        })
        .await
        .expect("write after the removal");
    cluster.kill(2);
    let _ = joiner.kill();
    let _ = joiner.wait();
}
