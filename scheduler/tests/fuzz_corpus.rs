//! Replays every committed input of the control plane's fuzz targets (`fuzz/corpus/…`)
//! through the same code the fuzzers run, so an input that once crashed stays fixed without
//! building the fuzzers. `STELLAR_FUZZ_SEEDS=write` first (re)writes the hand-made seeds.

use prost::Message;
use sha2::{Digest, Sha256};
use stellar_proto::fuzzing::{replay_corpus, write_seeds};
use stellar_proto::v1 as pb;
use stellar_scheduler::fuzzing;

fn cmd(request_id: &[u8], kind: pb::command::Kind) -> pb::Command {
    pb::Command {
        request_id: request_id.to_vec(),
        kind: Some(kind),
    }
}

fn command_seeds() -> Vec<Vec<u8>> {
    let module = b"\0asm\x01\0\0\0".to_vec();
    let sha = Sha256::digest(&module).to_vec();
    let deploy = |tenant: &str, place_on: Vec<u64>| {
        pb::command::Kind::Deploy(pb::DeployCmd {
            tenant: tenant.into(),
            name: "f".into(),
            module: module.clone(),
            module_sha256: sha.clone(),
            limits: Some(pb::FunctionLimits {
                cpu_millis: 500,
                memory_mib: 512,
                timeout_ms: 1000,
                ..Default::default()
            }),
            replicas: place_on.len() as u32,
            place_on,
            ..Default::default()
        })
    };
    let plan = pb::command::Kind::Plan(pb::PlanCmd {
        tenant: "acme".into(),
        function: "f".into(),
        version: 1,
        place_on: vec![3],
        grow: true,
        ..Default::default()
    });
    let states = pb::command::Kind::AllocationStates(pb::AllocationStatesCmd {
        updates: vec![
            pb::AllocationStateUpdate {
                allocation: 1,
                state: pb::AllocationState::Running as i32,
                node: 1,
                message: String::new(),
            },
            pb::AllocationStateUpdate {
                allocation: 2,
                state: pb::AllocationState::Failed as i32,
                node: 2,
                message: "no".into(),
            },
        ],
    });
    let usage = pb::command::Kind::Usage(pb::UsageCmd {
        records: vec![pb::UsageRecord {
            invocation_id: b"0123456789abcdef0123456789abcdef".to_vec(),
            tenant: "acme".into(),
            function: "f".into(),
            node: 1,
            fuel: 1000,
            wall_us: 50,
            seq: 1,
            prev_hash: vec![0; 32],
            receipt_hash: vec![7; 32],
            ..Default::default()
        }],
        unix_ms: 1_800_000_000_000,
        refusals: vec![pb::ReceiptRefusal {
            node: 2,
            verdict: pb::ReceiptVerdict::ForgedTicket as i32,
            ..Default::default()
        }],
        period_ms: 60_000,
        incidents: vec![pb::NodeIncident {
            node: 1,
            kind: pb::Incident::CheckMatch as i32,
        }],
    });
    let down = pb::command::Kind::NodeTransitions(pb::NodeTransitionsCmd {
        transitions: vec![
            pb::NodeTransition {
                node: 2,
                state: pb::NodeState::Down as i32,
                gateway: String::new(),
            },
            // A node whose worker moved to another gateway.
            pb::NodeTransition {
                node: 3,
                state: pb::NodeState::Ready as i32,
                gateway: "127.0.0.1:7101".into(),
            },
        ],
    });
    let delete = pb::command::Kind::DeleteFunction(pb::DeleteFunctionCmd {
        tenant: "acme".into(),
        name: "f".into(),
    });
    let batches = vec![
        vec![cmd(b"r1", deploy("acme", vec![1, 2]))],
        vec![
            cmd(b"r1", deploy("acme", vec![1, 2])),
            cmd(b"r2", plan.clone()),
            cmd(b"", states.clone()),
            cmd(b"", usage.clone()),
        ],
        vec![
            cmd(b"r1", deploy("acme", vec![1])),
            cmd(b"r1", deploy("globex", vec![1])),
            cmd(b"", down),
            cmd(b"", plan),
            cmd(b"r3", delete),
            cmd(b"", usage),
        ],
    ];
    batches
        .into_iter()
        .map(|commands| pb::CommandBatch { commands }.encode_to_vec())
        .collect()
}

#[test]
fn apply_commands_corpus() {
    write_seeds("apply_commands", command_seeds());
    assert!(replay_corpus("apply_commands", fuzzing::apply_commands) > 0);
}
