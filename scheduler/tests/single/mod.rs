//! One replica driven in-process with a logical clock: enough for tests of what the leader
//! does alone (liveness, a full disk) without a network.
#![allow(dead_code)] // each test crate uses its own part

use std::path::Path;

use stellar_proto::v1 as pb;
use stellar_scheduler::{Output, Replica, ReplicaConfig, Reply, Request};

/// A single-replica cluster and the next request token.
pub struct Driver {
    pub r: Replica,
    token: u64,
}

impl Driver {
    /// Opens (or reopens) replica 1 in `dir`, adjusted by `tune`, and waits until it leads.
    pub fn open(dir: &Path, tune: impl FnOnce(&mut ReplicaConfig)) -> Driver {
        let mut cfg = ReplicaConfig::new(1, dir.to_path_buf(), vec![(1, "local:1".into())]);
        cfg.randomized_election = false;
        tune(&mut cfg);
        let mut d = Driver {
            r: Replica::open(cfg).expect("open the replica"),
            token: 0,
        };
        for _ in 0..40 {
            d.step();
            if d.r.is_leader() {
                return d;
            }
        }
        panic!("a single replica did not elect itself in 40 ticks");
    }

    /// One tick and one Ready round; the replies that came out.
    pub fn step(&mut self) -> Vec<(u64, Result<Reply, stellar_scheduler::Error>)> {
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

    /// Submits `req` and steps until it is answered.
    pub fn try_write(&mut self, req: Request) -> Result<Reply, stellar_scheduler::Error> {
        self.token += 1;
        let token = self.token;
        self.r.submit(token, req);
        for _ in 0..50 {
            for (t, res) in self.step() {
                if t == token {
                    return res;
                }
            }
        }
        panic!("write not answered in 50 ticks");
    }

    /// Submits `req` and expects it applied.
    pub fn write(&mut self, req: Request) -> pb::CommandResult {
        match self.try_write(req) {
            Ok(Reply::Applied(r)) => r,
            other => panic!("write failed: {other:?}"),
        }
    }
}

/// A ready, managed node in cn-east with 4 cores and 4 GiB, alone in its zone.
pub fn managed_node(id: u64) -> pb::NodeRecord {
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
        gateway: String::new(),
    }
}

/// A command that registers `nodes`.
pub fn register(nodes: Vec<pb::NodeRecord>) -> Request {
    Request::Command(pb::Command {
        request_id: vec![],
        kind: Some(pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
            nodes,
        })),
    })
}
