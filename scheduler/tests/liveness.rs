//! Node liveness on the leader, driven in-process with a logical clock: heartbeats are soft
//! state, a silent managed node is marked down after the grace period and its replicas are
//! re-placed elsewhere; a node heard from again comes back.

use stellar_placement::NodeState;
use stellar_proto::v1 as pb;
use stellar_scheduler::replica::deploy_command;
use stellar_scheduler::{Output, Replica, ReplicaConfig, Reply, Request};

struct Driver {
    r: Replica,
    token: u64,
}

impl Driver {
    fn step(&mut self) -> Vec<(u64, Result<Reply, stellar_scheduler::Error>)> {
        self.r.tick();
        self.r.process();
        self.r
            .take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Reply { token, result } => Some((token, result)),
                Output::Send(_) => None,
            })
            .collect()
    }

    fn write(&mut self, req: Request) -> pb::CommandResult {
        self.token += 1;
        let token = self.token;
        self.r.submit(token, req);
        for _ in 0..50 {
            for (t, res) in self.step() {
                if t == token {
                    match res {
                        Ok(Reply::Applied(r)) => return r,
                        other => panic!("write failed: {other:?}"),
                    }
                }
            }
        }
        panic!("write not answered in 50 ticks");
    }
}

fn managed_node(id: u64) -> pb::NodeRecord {
    pb::NodeRecord {
        id,
        public_key: vec![],
        attributes: Some(pb::NodeAttributes {
            region: "cn-east".into(),
            zone: format!("z{id}"),
            arch: "aarch64".into(),
            runtimes: vec!["wasm".into()],
            capacity: Some(pb::Resources {
                cpu_millis: 4000,
                memory_mib: 4096,
                disk_mib: 0,
            }),
            uplink_kbps: 10_000,
            downlink_kbps: 100_000,
            labels: vec![],
        }),
        state: pb::NodeState::Ready as i32,
        reputation: 0.9,
        managed: true,
    }
}

#[test]
fn a_silent_node_goes_down_its_replicas_move_and_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ReplicaConfig::new(1, dir.path().to_path_buf(), vec![(1, "local:1".into())]);
    cfg.randomized_election = false;
    cfg.node_grace_ticks = 20;
    cfg.node_down_after_ticks = 10;
    cfg.liveness_every_ticks = 2;
    let mut d = Driver {
        r: Replica::open(cfg).unwrap(),
        token: 0,
    };
    for _ in 0..40 {
        d.step();
        if d.r.is_leader() {
            break;
        }
    }
    assert!(d.r.is_leader(), "a single replica elects itself");
    d.write(Request::Command(pb::Command {
        request_id: vec![],
        kind: Some(pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
            name: "acme".into(),
            token_sha256: vec![],
        })),
    }));
    d.write(Request::Command(pb::Command {
        request_id: vec![],
        kind: Some(pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
            nodes: (1..=4).map(managed_node).collect(),
        })),
    }));
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
    let mut cfg = ReplicaConfig::new(1, dir.path().to_path_buf(), vec![(1, "local:1".into())]);
    cfg.randomized_election = false;
    let mut r = Replica::open(cfg).unwrap();
    for _ in 0..40 {
        r.tick();
        r.process();
    }
    assert!(r.is_leader());
    let err = r.heartbeat(99, None).unwrap_err();
    assert!(err.to_string().contains("not registered"), "{err}");
}
