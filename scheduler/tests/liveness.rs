//! Node liveness on the leader, driven in-process with a logical clock: gateways report which
//! nodes they hold; a node whose stream ends goes down and its replicas are re-placed; a dead
//! gateway's nodes go down after the re-attach window unless another gateway reports them;
//! nothing is committed while nothing changes.

use stellar_placement::NodeState;
use stellar_proto::v1 as pb;
use stellar_scheduler::Request;
use stellar_scheduler::replica::deploy_command;

mod single;

use single::{Driver, managed_node, register};

fn report(gateway: &str, seq: u64) -> pb::GatewayReport {
    pb::GatewayReport {
        seq,
        gateway: gateway.into(),
        ..Default::default()
    }
}

#[test]
fn nodes_follow_their_gateways_and_replicas_move_off_down_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::open(dir.path(), |cfg| {
        cfg.node_grace_ticks = 20;
        cfg.gateway_reattach_ticks = 10;
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
                ..Default::default()
            }),
            replicas: 2,
            ..Default::default()
        },
    )));
    assert_eq!(deployed.allocations.len(), 2);
    let victim = deployed.allocations[0].node;
    // Two gateways: a holds nodes 1 and 2, b holds 3 and 4.
    d.r.gateway_open("gw-a:1", 1).unwrap();
    d.r.gateway_open("gw-b:1", 2).unwrap();
    let mut a = report("gw-a:1", 1);
    a.attached = vec![1, 2];
    a.resync = true;
    assert!(d.r.gateway_report(1, &a).unwrap().register.is_empty());
    let mut b = report("gw-b:1", 1);
    b.attached = vec![3, 4];
    b.resync = true;
    // Every report tells its gateway which gateways have a session (peers learn each other).
    let mut live = d.r.gateway_report(2, &b).unwrap().gateways;
    live.sort();
    assert_eq!(live, ["gw-a:1", "gw-b:1"]);
    for _ in 0..30 {
        d.step();
    }
    let gateway_of = |d: &Driver, n: u64| {
        let st = d.r.state();
        st.node_gateway(&st.nodes()[&n]).to_string()
    };
    assert_eq!(gateway_of(&d, 1), "gw-a:1");
    assert_eq!(gateway_of(&d, 4), "gw-b:1");
    // Nothing changes: nothing is committed, however long it runs.
    let applied = d.r.state().applied_index();
    for _ in 0..50 {
        d.step();
    }
    assert_eq!(
        d.r.state().applied_index(),
        applied,
        "steady state commits nothing"
    );
    // The victim's stream ends at its gateway.
    let holder = if victim <= 2 {
        ("gw-a:1", 1)
    } else {
        ("gw-b:1", 2)
    };
    let mut down = report(holder.0, 2);
    down.down = vec![victim];
    d.r.gateway_report(holder.1, &down).unwrap();
    for _ in 0..10 {
        d.step();
    }
    let st = d.r.state();
    assert_eq!(st.nodes()[&victim].state, NodeState::Down);
    let (_, f) = st.function("acme", "thumb").unwrap();
    assert_eq!(f.on_nodes.len(), 2, "the lost replica was re-placed");
    assert!(!f.on_nodes.contains_key(&victim));
    // Gateway a dies. Node 1 re-attaches to b in time; node 2 does not.
    d.r.gateway_closed("gw-a:1", 1);
    let mut back = report("gw-b:1", 2);
    back.attached = vec![1];
    if victim != 1 {
        d.r.gateway_report(2, &back).unwrap();
    }
    for _ in 0..4 {
        d.step();
    }
    if victim != 2 {
        assert_eq!(
            d.r.state().nodes()[&2].state,
            NodeState::Ready,
            "still within the re-attach window"
        );
    }
    for _ in 0..20 {
        d.step();
    }
    let st = d.r.state();
    if victim != 1 {
        assert_eq!(st.nodes()[&1].state, NodeState::Ready);
        assert_eq!(gateway_of(&d, 1), "gw-b:1", "moved to b");
    }
    assert_eq!(st.nodes()[&2].state, NodeState::Down, "never re-attached");
    // The victim comes back through b.
    let mut again = report("gw-b:1", 3);
    again.attached = vec![victim];
    assert_eq!(
        d.r.gateway_report(2, &again).unwrap().gateways,
        ["gw-b:1"],
        "a gateway whose session ended is no longer offered to peers"
    );
    for _ in 0..6 {
        d.step();
    }
    assert_eq!(d.r.state().nodes()[&victim].state, NodeState::Ready);
}

#[test]
fn reports_of_unopened_sessions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::open(dir.path(), |_| {});
    let err = d.r.gateway_report(9, &report("gw:1", 1)).unwrap_err();
    assert!(err.to_string().contains("gateway"), "{err}");
    assert!(d.r.gateway_open("", 1).is_err(), "a gateway names itself");
}
