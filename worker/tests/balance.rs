//! Gateways balance real workers: a gateway that starts (or comes back) holding nothing is
//! known to its peers through the leader, and the busy gateway sends it idle workers, which
//! re-register there and stay ready.

mod common;

use std::time::Duration;

use common::{Plane, TOKEN, free_port, replica_of, until, worker_config};
use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_comes_back_is_sent_idle_workers_by_the_busy_one() {
    let dir = tempfile::tempdir().unwrap();
    let plane_dir = dir.path().join("plane");
    let a = format!("127.0.0.1:{}", free_port());
    // Slack 0: the rule that spreads a real fleet, applied to three workers.
    let plane = Plane::start_balanced(&plane_dir, &a, None, 0);
    let client = ClusterClient::new(std::slice::from_ref(&a))
        .unwrap()
        .with_admin_token_from(vec![plane_dir.clone()]);
    // Ready nodes per gateway, as committed.
    let held = |gateway: &str| {
        let (client, gateway) = (client.clone(), gateway.to_string());
        async move {
            let nodes = client.nodes().await.ok()?;
            Some(
                nodes
                    .iter()
                    .filter(|n| n.gateway == gateway && n.state == pb::NodeState::Ready as i32)
                    .count(),
            )
        }
    };
    let mut stops = Vec::new();
    let mut workers = Vec::new();
    for i in 0..3 {
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        workers.push(tokio::spawn(stellar_worker::run(
            worker_config(&dir.path().join(format!("w{i}")), &a, TOKEN),
            async move {
                let _ = stopped.await;
            },
        )));
    }
    until("three workers on gateway a", || async {
        (held(&a).await == Some(3)).then_some(())
    })
    .await;

    // Gateway b starts with no node at all: only the leader's list tells `a` about it.
    let b = format!("127.0.0.1:{}", free_port());
    let control = ClusterClient::new(&[replica_of(&plane_dir)])
        .unwrap()
        .with_admin_token_from(vec![plane_dir.clone()]);
    let (stop_b, b_stopped) = oneshot::channel::<()>();
    let gateway_b = tokio::spawn(stellar_gateway::serve(
        stellar_gateway::GatewayConfig {
            control,
            listen: b.parse().unwrap(),
            advertise: b.clone(),
            http_listen: None,
            join_token: Some(TOKEN.into()),
            heartbeat: Duration::from_secs(1),
            balance_slack: 0,
            checks: Default::default(),
        },
        async move {
            let _ = b_stopped.await;
        },
    ));

    // Within a shedding round or two `a` sends one idle worker over: 2 and 1, and no more
    // (moving another would only make `b` the busier one).
    // The move is committed: the node is ready on `b`, under the id it had on `a`.
    until("a worker shed from a to b", || async {
        (held(&b).await == Some(1) && held(&a).await == Some(2)).then_some(())
    })
    .await;
    let nodes = client.nodes().await.unwrap();
    assert_eq!(nodes.len(), 3, "the moved worker kept its node: {nodes:?}");

    for s in stops {
        let _ = s.send(());
    }
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(20), w).await;
    }
    let _ = stop_b.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), gateway_b).await;
    plane.stop().await;
}
