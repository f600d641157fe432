//! The wire's identity rules, shared by the worker that signs and the control plane that
//! checks: a node id is derived from its ed25519 public key, and a registration is signed
//! over the key and the join token's hash (so the token itself is never signed in clear).

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

/// The node id of a public key: the first 8 bytes of its sha256, big-endian.
pub fn node_id(public_key: &[u8]) -> u64 {
    let h = Sha256::digest(public_key);
    u64::from_be_bytes(h[..8].try_into().expect("sha256 is 32 bytes"))
}

/// The bytes a registration signature covers: the key, the join token's hash and the
/// gateway's nonce (so the signature is good for that one registration only).
pub fn registration_message(public_key: &[u8], join_token: &str, nonce: &[u8]) -> Vec<u8> {
    let mut m = b"stellar-register-v2".to_vec();
    m.extend_from_slice(public_key);
    m.extend_from_slice(&Sha256::digest(join_token.as_bytes()));
    m.extend_from_slice(&Sha256::digest(nonce));
    m
}

/// Whether `signature` proves that the holder of `public_key` (which must derive `node`)
/// registered with `join_token` in answer to `nonce`.
pub fn verify_registration(
    node: u64,
    public_key: &[u8],
    join_token: &str,
    nonce: &[u8],
    signature: &[u8],
) -> bool {
    let Ok(pk) = <[u8; 32]>::try_from(public_key) else {
        return false;
    };
    let Ok(sig) = <[u8; 64]>::try_from(signature) else {
        return false;
    };
    let Ok(key) = VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    node_id(&pk) == node
        && key
            .verify(
                &registration_message(&pk, join_token, nonce),
                &Signature::from_bytes(&sig),
            )
            .is_ok()
}
