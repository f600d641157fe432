//! The node's identity: an ed25519 key pair made on first start and kept in the data
//! directory (mode 0600). The node id derives from the public key, so a restart (or a
//! reconnect to another replica) is the same node, and nobody can claim a node id without
//! its private key.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey};

use crate::error::Result;

const KEY_FILE: &str = "identity.key";

/// This worker's key pair and the node id derived from it.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    node: u64,
    path: PathBuf,
}

impl Identity {
    /// Loads the identity from `data_dir`, making one on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Identity> {
        let path = data_dir.join(KEY_FILE);
        let secret = crate::secret_file(&path)?;
        let key = SigningKey::from_bytes(&secret);
        let node = stellar_proto::identity::node_id(key.verifying_key().as_bytes());
        Ok(Identity { key, node, path })
    }

    /// The node id (derived from the public key).
    pub fn node(&self) -> u64 {
        self.node
    }

    /// The public key the control plane checks signatures with.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Where the key is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Proves possession of the key when registering with `join_token`, answering the
    /// gateway's `nonce`.
    pub fn sign_registration(&self, join_token: &str, nonce: &[u8]) -> [u8; 64] {
        let msg =
            stellar_proto::identity::registration_message(&self.public_key(), join_token, nonce);
        self.key.sign(&msg).to_bytes()
    }

    /// Loads an existing identity only (never makes one): for tools that act as this node.
    pub fn load(data_dir: &Path) -> Result<Identity> {
        let path = data_dir.join(KEY_FILE);
        if !path.exists() {
            return Err(crate::Error::Identity {
                path,
                reason:
                    "no such file: is this a worker's data dir (--data-dir of `stellar worker`)?"
                        .into(),
            });
        }
        Identity::load_or_create(data_dir)
    }

    /// Signs a request for this node's receipt proof of `period` at `unix_ms`.
    pub fn sign_proof_request(&self, period: u64, unix_ms: u64) -> [u8; 64] {
        let msg = stellar_proto::receipts::proof_request_message(self.node, period, unix_ms);
        self.key.sign(&msg).to_bytes()
    }

    /// Signs a receipt (every field but the signature), vouching for its usage.
    pub fn sign_receipt(&self, r: &stellar_proto::v1::Receipt) -> [u8; 64] {
        self.key
            .sign(&stellar_proto::receipts::receipt_message(r))
            .to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_identity_survives_a_restart_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.node(), b.node());
        assert_eq!(a.public_key(), b.public_key());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        let c = Identity::load_or_create(other.path()).unwrap();
        assert_ne!(a.node(), c.node(), "fresh data dirs make fresh identities");
        let sig = a.sign_registration("join-token", b"nonce-1");
        let verify = |node, token, nonce: &[u8]| {
            stellar_proto::identity::verify_registration(node, &a.public_key(), token, nonce, &sig)
        };
        assert!(verify(a.node(), "join-token", b"nonce-1"));
        // Another node's id, another token, another nonce (a replay): refused.
        assert!(!verify(c.node(), "join-token", b"nonce-1"));
        assert!(!verify(a.node(), "other-token", b"nonce-1"));
        assert!(!verify(a.node(), "join-token", b"nonce-2"));
    }

    #[test]
    fn a_damaged_key_file_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        let err = Identity::load_or_create(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("move it away"), "{err}");
    }
}
