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
