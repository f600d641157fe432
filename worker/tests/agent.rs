//! A worker against a real control plane (one replica, in-process, real gRPC on loopback):
//! it registers with its signed identity, receives an assignment, fetches and compiles the
//! module, serves an invocation routed by the control plane, survives the control plane
//! restarting (reconnects and re-registers as the same node), and drains on shutdown.

#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::{Plane, TOKEN, free_port, until, worker_config};
use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;
use stellar_worker::Identity;
use tokio::sync::oneshot;

async fn nodes(client: &ClusterClient) -> Vec<pb::NodeInfo> {
    client.nodes().await.unwrap_or_default()
}

/// Deploys the committed build of example `name` (one replica in tenant `acme`).
async fn deploy(client: &ClusterClient, name: &str, scratch_dir: bool) -> pb::DeployResponse {
    let module = common::prebuilt(name);
    let req = pb::DeployRequest {
        request_id: format!("deploy-{name}-01").into_bytes(),
        name: name.into(),
        module,
        limits: Some(pb::FunctionLimits {
            cpu_millis: 100,
            memory_mib: 64,
            timeout_ms: 2000,
            scratch_dir,
            ..Default::default()
        }),
        replicas: 1,
        tenant: "acme".into(),
        ..Default::default()
    };
    client.deploy(req).await.expect("deploy")
}

/// Tenant `acme`'s bill line for `function`, once it shows `invocations` invocations.
async fn billed(client: &ClusterClient, function: &str, invocations: u64) -> pb::UsageLine {
    until("the usage ledger", || async {
        let u = client
            .call(|mut c| async move {
                c.get_usage(pb::GetUsageRequest {
                    tenant: "acme".into(),
                    ..Default::default()
                })
                .await
            })
            .await
            .ok()?;
        u.bill
            .into_iter()
            .find(|l| l.function == function && l.invocations == invocations)
    })
    .await
}

async fn invoke(client: &ClusterClient, name: &str) -> Result<pb::InvokeResponse, tonic::Status> {
    let req = pb::InvokeRequest {
        tenant: "acme".into(),
        function: "hello".into(),
        stdin: name.as_bytes().to_vec(),
        ..Default::default()
    };
    client.invoke(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_an_invocation_and_survives_a_control_plane_restart() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STELLAR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let plane = Plane::start(&dir.path().join("plane"), &addr);
    let client = ClusterClient::new(std::slice::from_ref(&addr))
        .unwrap()
        .with_admin_token_from(vec![dir.path().join("plane")]);
    let node = Identity::load_or_create(&dir.path().join("worker"))
        .unwrap()
        .node();

    // A worker with the wrong token is refused for good, with a reason.
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        stellar_worker::run(
            worker_config(&dir.path().join("intruder"), &addr, "wrong"),
            std::future::pending(),
        ),
    )
    .await
    .expect("a refused worker stops by itself");
    let err = refused.expect_err("wrong token refused").to_string();
    assert!(err.contains("join token"), "{err}");

    let (stop_worker, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(stellar_worker::run(
        worker_config(&dir.path().join("worker"), &addr, TOKEN),
        async move {
            let _ = stopped.await;
        },
    ));
    let registered = until("the worker to register", || async {
        nodes(&client).await.into_iter().find(|n| n.id == node)
    })
    .await;
    let attrs = registered.attributes.expect("attributes");
    assert_eq!(attrs.region, "cn-east");
    assert_eq!(attrs.labels.len(), 1);
    assert!(
        attrs.capacity.expect("capacity").disk_mib > 0,
        "free disk of the data dir is reported"
    );
    assert_eq!(
        nodes(&client).await.len(),
        1,
        "the intruder never registered"
    );

    client.create_tenant("acme").await.expect("tenant");
    let deployed = deploy(&client, "hello", false).await;
    assert_eq!(deployed.allocations.len(), 1);
    assert_eq!(deployed.allocations[0].node, node);

    let first = until("the first invocation", || async {
        invoke(&client, "Ada").await.ok()
    })
    .await;
    assert_eq!(first.error_code, "", "{}", first.error_message);
    assert_eq!(String::from_utf8_lossy(&first.stdout), "Hello, Ada!\n");
    assert_eq!(first.node, node);
    let usage = first.usage.expect("usage record");
    assert!(usage.fuel > 0);
    assert_eq!(usage.node, node);
    assert_eq!(usage.tenant, "acme");

    // The invocation's usage record reaches the ledger (the worker reports once a second).
    let line = billed(&client, "hello", 1).await;
    assert_eq!(line.fuel, usage.fuel);
    assert_eq!(line.bytes_out, usage.bytes_out);

    // A function whose spec asks for scratch space gets a private /scratch per invocation,
    // removed afterwards; without it there is no filesystem (the sandbox tests show that).
    deploy(&client, "probe", true).await;
    let scratch = until("the probe's scratch invocation", || async {
        let req = pb::InvokeRequest {
            tenant: "acme".into(),
            function: "probe".into(),
            args: vec!["scratch".into()],
            ..Default::default()
        };
        client.invoke(req).await.ok()
    })
    .await;
    assert_eq!(
        scratch.error_code,
        "",
        "{}",
        String::from_utf8_lossy(&scratch.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&scratch.stdout),
        "kept in scratch\n"
    );
    let leftovers = std::fs::read_dir(dir.path().join("worker/scratch"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        leftovers, 0,
        "scratch dirs are removed after the invocation"
    );

    // The control plane restarts on the same data dir and address: the worker reconnects
    // and re-registers as the same node, and invocations work again.
    plane.stop().await;
    let plane = Plane::start(&dir.path().join("plane"), &addr);
    let again = until("an invocation after the restart", || async {
        invoke(&client, "Ada").await.ok()
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&again.stdout), "Hello, Ada!\n");
    assert_eq!(again.node, node, "the same identity after reconnecting");
    assert_ne!(
        again.invocation_id, first.invocation_id,
        "invocation ids stay unique across control-plane restarts (the ledger dedupes by them)"
    );
    assert_eq!(
        again.usage.expect("usage").fuel,
        usage.fuel,
        "the same input costs the same fuel"
    );
    assert_eq!(
        nodes(&client).await.len(),
        1,
        "re-registration, not a new node"
    );

    // Shutdown drains: the node is marked draining and the worker exits cleanly.
    let _ = stop_worker.send(());
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("the worker stops after draining")
        .expect("no panic")
        .expect("clean exit");
    // Across the restart nothing was counted twice and nothing is missing.
    let line = billed(&client, "hello", 2).await;
    assert_eq!(line.fuel, 2 * usage.fuel, "two identical invocations");
    let state = until("the node to be draining", || async {
        nodes(&client)
            .await
            .into_iter()
            .find(|n| n.id == node && n.state == pb::NodeState::Draining as i32)
    })
    .await;
    assert_eq!(state.id, node);
    plane.stop().await;
}
