//! Node liveness on the leader, driven in-process with a logical clock: heartbeats are soft
//! state, a silent managed node is marked down after the grace period and its replicas are
//! re-placed elsewhere; a node heard from again comes back.

use stellar_placement::NodeState;
use stellar_proto::v1 as pb;
use stellar_scheduler::Request;
use stellar_scheduler::replica::deploy_command;

mod single;

use single::{Driver, managed_node, register};

#[test]
fn a_silent_node_goes_down_its_replicas_move_and_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::open(dir.path(), |cfg| {
        cfg.node_grace_ticks = 20;
        cfg.node_down_after_ticks = 10;
        cfg.liveness_every_ticks = 2;
    });
    d.write(Request::Command(pb::Command {
        request_id: vec![],
        kind: Some(pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
            name: "acme".into(),
            token_sha256: vec![],
        })),
    }));
    d.write(register((1..=4).map(managed_node).collect()));
    let deployed = d.write(Request::Deploy(deploy_command(
        b"d1".to_vec(),
        pb::DeployCmd {
            tenant: "acme".into(),
            name: "thumb".into(),
            module: b"\0asm\x01\0\0\0".to_vec(),
            limits: Some(pb::FunctionLimits {
                cpu_millis: 1000,
                memory_mib: 1024,
                timeout_ms: 1000,
                fuel: 0,
                max_output_bytes: 0,
                scratch_dir: false,
            }),
            replicas: 2,
            ..Default::default()
        },
    )));
    assert_eq!(deployed.allocations.len(), 2);
    let victim = deployed.allocations[0].node;
    // Every node but the victim keeps heartbeating.
    for _ in 0..80 {
        for n in 1..=4u64 {
            if n != victim {
                d.r.heartbeat(n, None).unwrap();
            }
        }
        d.step();
    }
    let st = d.r.state();
    assert_eq!(
        st.nodes()[&victim].state,
        NodeState::Down,
        "silent node marked down"
    );
    for n in (1..=4u64).filter(|n| *n != victim) {
        assert_eq!(
            st.nodes()[&n].state,
            NodeState::Ready,
            "node {n} heartbeats"
        );
    }
    let (_, f) = st.function("acme", "thumb").unwrap();
    assert_eq!(f.on_nodes.len(), 2, "the lost replica was re-placed");
    assert!(
        !f.on_nodes.contains_key(&victim),
        "nothing left on the down node"
    );
    assert_eq!(st.nodes()[&victim].allocations, 0);
    // The victim is heard from again: it comes back.
    for _ in 0..10 {
        for n in 1..=4u64 {
            d.r.heartbeat(n, None).unwrap();
        }
        d.step();
    }
    assert_eq!(d.r.state().nodes()[&victim].state, NodeState::Ready);
}

#[test]
fn heartbeats_for_unknown_nodes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::open(dir.path(), |_| {});
    let err = d.r.heartbeat(99, None).unwrap_err();
    assert!(err.to_string().contains("not registered"), "{err}");
}
