//! Replays every committed input of the protocol's fuzz targets (`fuzz/corpus/…`) through
//! the same code the fuzzers run, so an input that once crashed stays fixed without building
//! the fuzzers. `STELLAR_FUZZ_SEEDS=write` first (re)writes the hand-made seeds.

use std::path::PathBuf;

use prost::Message;
use sha2::{Digest, Sha256};
use stellar_proto::fuzzing;
use stellar_proto::v1 as pb;

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(format!(
        "{}/../fuzz/corpus/{target}",
        env!("CARGO_MANIFEST_DIR")
    ))
}

fn replay(target: &str, body: fn(&[u8])) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(corpus(target)).expect("the committed corpus") {
        body(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    n
}

fn write_seeds(target: &str, seeds: Vec<Vec<u8>>) {
    if std::env::var("STELLAR_FUZZ_SEEDS").as_deref() != Ok("write") {
        return;
    }
    for s in seeds {
        let name: String = Sha256::digest(&s)[..20]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(corpus(target).join(name), s).unwrap();
    }
}

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
    assert!(replay("decode_messages", fuzzing::decode_messages) > 0);
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
    assert!(replay("check_module", fuzzing::check_module) > 0);
}
