//! Replays every committed input of the protocol's fuzz targets (`fuzz/corpus/…`) through
//! the same code the fuzzers run, so an input that once crashed stays fixed without building
//! the fuzzers. `STELLAR_FUZZ_SEEDS=write` first (re)writes the hand-made seeds.

use prost::Message;
use stellar_proto::fuzzing::{self, replay_corpus, write_seeds};
use stellar_proto::v1 as pb;

fn tagged(tag: u8, m: impl Message) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(m.encode_to_vec());
    v
}

#[test]
fn decode_messages_corpus() {
    write_seeds(
        "decode_messages",
        vec![
            tagged(
                0,
                pb::DeployRequest {
                    request_id: vec![1; 16],
                    name: "hello".into(),
                    module: b"\0asm\x01\0\0\0".to_vec(),
                    replicas: 2,
                    ..Default::default()
                },
            ),
            tagged(
                2,
                pb::InvokeRequest {
                    function: "hello".into(),
                    stdin: b"Ada".to_vec(),
                    args: vec!["--top".into()],
                    ..Default::default()
                },
            ),
            tagged(
                18,
                pb::WorkerMessage {
                    kind: Some(pb::worker_message::Kind::Result(pb::InvocationResult {
                        invocation_id: vec![b'a'; 32],
                        stdout: b"out".to_vec(),
                        ..Default::default()
                    })),
                },
            ),
            tagged(
                22,
                pb::CommandBatch {
                    commands: vec![pb::Command::default()],
                },
            ),
        ],
    );
    assert!(replay_corpus("decode_messages", fuzzing::decode_messages) > 0);
}

#[test]
fn check_module_corpus() {
    let examples = format!("{}/../examples/wasm/prebuilt", env!("CARGO_MANIFEST_DIR"));
    let seeds = ["hello", "probe"]
        .iter()
        .map(|n| {
            let mut v = vec![64, 0];
            v.extend(std::fs::read(format!("{examples}/{n}.wasm")).unwrap());
            v
        })
        .collect();
    write_seeds("check_module", seeds);
    assert!(replay_corpus("check_module", fuzzing::check_module) > 0);
}
