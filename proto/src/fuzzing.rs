//! The bodies of the fuzz targets in `fuzz/` that need only this crate, kept here so the
//! workspace's tests replay the committed corpus through the very same code (no second
//! build in CI): each takes arbitrary bytes and must neither panic nor break an invariant.

use prost::Message;

use crate::v1 as pb;

/// Decodes `bytes` as a `T` and, when that works, checks the message re-encodes to bytes
/// that decode to the same encoding (prost's canonical form is stable).
fn round_trip<T: Message + Default>(bytes: &[u8]) {
    let Ok(m) = T::decode(bytes) else { return };
    let once = m.encode_to_vec();
    let again = T::decode(once.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again.encode_to_vec(), once, "encoding is not stable");
}

/// Every message a peer can send us (client requests, worker and raft streams) and every
/// message we persist: the first byte picks the type, the rest is decoded as it.
pub fn decode_messages(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    type Check = fn(&[u8]);
    const TYPES: [Check; 24] = [
        round_trip::<pb::DeployRequest>,
        round_trip::<pb::AllocateRequest>,
        round_trip::<pb::InvokeRequest>,
        round_trip::<pb::GetUsageRequest>,
        round_trip::<pb::GetFunctionRequest>,
        round_trip::<pb::ListFunctionsRequest>,
        round_trip::<pb::DeleteFunctionRequest>,
        round_trip::<pb::RegisterNodesRequest>,
        round_trip::<pb::ListNodesRequest>,
        round_trip::<pb::SetNodeStateRequest>,
        round_trip::<pb::CreateTenantRequest>,
        round_trip::<pb::CreateTokenRequest>,
        round_trip::<pb::RevokeTokenRequest>,
        round_trip::<pb::GetLogsRequest>,
        round_trip::<pb::WhoAmIRequest>,
        round_trip::<pb::ClusterStatusRequest>,
        round_trip::<pb::AddReplicaRequest>,
        round_trip::<pb::RemoveReplicaRequest>,
        round_trip::<pb::WorkerMessage>,
        round_trip::<pb::ControlMessage>,
        round_trip::<pb::RaftBatch>,
        round_trip::<pb::SnapshotChunk>,
        round_trip::<pb::CommandBatch>,
        round_trip::<pb::StateSnapshot>,
    ];
    TYPES[usize::from(which) % TYPES.len()](bytes);
}

/// The deploy-time module check on arbitrary bytes, with the first two bytes as the memory
/// limit: it answers (accepts or names a fault) and never panics.
pub fn check_module(data: &[u8]) {
    let (limit, wasm) = match data {
        [a, b, rest @ ..] => (u32::from(u16::from_le_bytes([*a, *b])), rest),
        _ => (64, data),
    };
    if let Err(e) = crate::module_check::check_module(wasm, limit) {
        assert!(!e.to_string().is_empty());
        assert!(e.to_string().len() < 4096, "an unbounded error message");
    }
}

/// The committed corpus of fuzz target `target` (`fuzz/corpus/TARGET`).
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs `body` over every committed input of `target`; how many there were.
pub fn replay_corpus(target: &str, body: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the committed corpus {}: {e}", dir.display()));
    let mut n = 0;
    for entry in entries {
        let path = entry.expect("a corpus entry").path();
        body(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
        n += 1;
    }
    n
}

/// Writes hand-made seed inputs into `target`'s corpus, named by content, when
/// `STELLAR_FUZZ_SEEDS=write` (how the committed seeds were made).
pub fn write_seeds(target: &str, seeds: Vec<Vec<u8>>) {
    use sha2::Digest;
    if std::env::var("STELLAR_FUZZ_SEEDS").as_deref() != Ok("write") {
        return;
    }
    for s in seeds {
        let name: String = sha2::Sha256::digest(&s)[..20]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let path = corpus_dir(target).join(name);
        std::fs::write(&path, s).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
