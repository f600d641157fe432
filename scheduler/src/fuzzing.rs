//! The body of the control plane's `apply_commands` fuzz target in `fuzz/`, kept here so the
//! workspace's tests replay the committed corpus through the same code: arbitrary commands
//! applied to the state machine. (The HTTP target is the gateway's.)

use prost::Message;
use stellar_proto::v1 as pb;

use crate::state::{Effects, StateMachine};

/// A job stage of one core and 256 MiB in an x86-64 image of one layer (the state
/// machine's job tests submit such stages).
pub fn job_stage(fanout: pb::Fanout) -> pb::JobStage {
    pb::JobStage {
        name: String::new(),
        image: Some(pb::ContainerImage {
            layers: vec![pb::ImageLayer {
                sha256: "cd".repeat(32),
                size: 1 << 20,
                gzip: true,
            }],
            cmd: vec!["sh".into()],
            arch: "x86_64".into(),
            ..Default::default()
        }),
        command: vec!["run".into()],
        limits: Some(pb::FunctionLimits {
            cpu_millis: 1000,
            memory_mib: 256,
            ..Default::default()
        }),
        fanout: fanout as i32,
        env: vec![],
    }
}

/// A ready, managed node in cn-east with 2 cores and 2 GiB (the fuzzer's commands and the
/// state machine's unit tests place on such nodes).
pub fn node(id: u64) -> pb::NodeRecord {
    pb::NodeRecord {
        id,
        attributes: Some(pb::NodeAttributes {
            region: "cn-east".into(),
            zone: format!("z{}", id % 2),
            arch: "x86_64".into(),
            runtimes: vec!["wasm".into()],
            capacity: Some(pb::Resources {
                cpu_millis: 2000,
                memory_mib: 2048,
                disk_mib: 0,
            }),
            ..Default::default()
        }),
        state: pb::NodeState::Ready as i32,
        reputation: 1.0,
        managed: true,
        ..Default::default()
    }
}

/// Two tenants and four ready nodes: the state the fuzzer's commands meet.
pub fn seeded_state() -> StateMachine {
    let mut m = StateMachine::new();
    let mut fx = Effects::default();
    let setup = [
        pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
            name: "acme".into(),
            token_sha256: vec![],
        }),
        pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
            name: "globex".into(),
            token_sha256: vec![],
        }),
        pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
            nodes: (1..=4).map(node).collect(),
        }),
    ];
    for (i, kind) in setup.into_iter().enumerate() {
        let r = m.apply(
            i as u64 + 1,
            pb::Command {
                request_id: vec![],
                kind: Some(kind),
            },
            &mut fx,
        );
        assert!(r.error_code.is_empty(), "{r:?}");
    }
    m
}

/// Decodes `data` as a batch of commands and applies each: whatever they say, apply must
/// answer without panicking, keep every invariant the cluster tests check, and leave a
/// state whose snapshot restores to the same digest.
pub fn apply_commands(data: &[u8]) {
    let Ok(batch) = pb::CommandBatch::decode(data) else {
        return;
    };
    let mut m = seeded_state();
    for (i, cmd) in batch.commands.into_iter().enumerate() {
        let mut fx = Effects::default();
        let again = cmd.clone();
        let first = m.apply(100 + i as u64, cmd, &mut fx);
        // A command with a request id is answered the same way when retried.
        if !again.request_id.is_empty() && first.error_code != crate::error::STALE_PLAN {
            let retried = m.apply(100 + i as u64, again, &mut Effects::default());
            assert_eq!(retried, first, "a retried request id got another answer");
        }
    }
    for check in [
        StateMachine::check_load_accounting,
        StateMachine::check_capacity,
        StateMachine::check_distinct_replicas,
    ] {
        if let Err(e) = check(&m) {
            panic!("invariant broken: {e}");
        }
    }
    let restored = StateMachine::from_snapshot(m.to_snapshot()).expect("own snapshot restores");
    assert_eq!(
        restored.digest(),
        m.digest(),
        "snapshot round trip changed the state"
    );
}
