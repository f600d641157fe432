//! Tickets out, receipts in: the gateway seals a ticket for every invocation it dispatches
//! (with the cluster's ticket key, from its session with the leader) and checks every
//! receipt a worker sends back before its usage goes to the ledger. A receipt that fails
//! is refused with its verdict, counted against its node, and reported to the ledger so the
//! count is kept in Raft.
//!
//! ```text
//!  GatewayAck.ticket_key ─▶ key
//!  dispatch ─▶ Ticket{id, tenant, function, version, code, input hash, node, time} + MAC
//!  Result / UsageReport receipt ─▶ MAC? ticket's node = stream's node? signed by its key?
//!       (a result: its output hashes to the receipt's?) ─▶ usage record ─▶ ledger
//!                                 └─ no ─▶ refusal(node, verdict) ─▶ ledger's counters
//! ```

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use sha2::{Digest, Sha256};
use stellar_proto::receipts;
use stellar_proto::v1 as pb;

/// The ticket key and the receipts refused here, per node (since start).
#[derive(Debug, Default)]
pub struct TicketDesk {
    key: RwLock<Vec<u8>>,
    refused: Mutex<HashMap<u64, u64>>,
}

impl TicketDesk {
    /// Takes the cluster's ticket key (from a session acknowledgement).
    pub fn set_key(&self, key: &[u8]) {
        if key.len() == receipts::HASH_LEN
            && let Ok(mut k) = self.key.write()
            && k.as_slice() != key
        {
            *k = key.to_vec();
        }
    }

    /// Whether tickets can be issued (a leader gave the key).
    pub fn ready(&self) -> bool {
        self.key.read().is_ok_and(|k| !k.is_empty())
    }

    /// Completes and seals `t` for `inv` on `node`; false when there is no key yet.
    pub fn issue(&self, t: &mut pb::Ticket, inv: &pb::Invocation, node: u64) -> bool {
        let Ok(key) = self.key.read() else {
            return false;
        };
        if key.is_empty() {
            return false;
        }
        t.invocation_id = inv.invocation_id.clone();
        t.node = node;
        t.input_sha256 =
            receipts::input_hash(&inv.stdin, &inv.args, &inv.env, &inv.random_seed).to_vec();
        t.issued_unix_ms = stellar_proto::clock::unix_ms();
        receipts::seal_ticket(&key, t);
        true
    }

    /// The usage record of a receipt `node` (holding `public_key`) sent, or why it is
    /// refused; `output` is the call's stdout when the receipt came with its result.
    pub fn check(
        &self,
        r: &pb::Receipt,
        node: u64,
        public_key: &[u8],
        output: Option<&[u8]>,
    ) -> Result<pb::UsageRecord, pb::ReceiptVerdict> {
        let key = self.key.read().map(|k| k.clone()).unwrap_or_default();
        let checked = receipts::check(r, node, public_key, &key).and_then(|u| match output {
            Some(o) if Sha256::digest(o).as_slice() != r.output_sha256.as_slice() => {
                Err(pb::ReceiptVerdict::WrongOutput)
            }
            _ => Ok(u),
        });
        if let Err(v) = checked
            && let Ok(mut refused) = self.refused.lock()
        {
            *refused.entry(node).or_default() += 1;
            tracing::warn!(
                node = format!("{node:016x}"),
                verdict = v.as_str_name(),
                "refused a receipt"
            );
        }
        checked
    }

    /// Receipts refused here from `node` since start.
    pub fn refused(&self, node: u64) -> u64 {
        self.refused
            .lock()
            .ok()
            .and_then(|r| r.get(&node).copied())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn issued_tickets_check_and_a_result_must_match_its_receipt() {
        let desk = TicketDesk::default();
        let inv = pb::Invocation {
            invocation_id: b"id".to_vec(),
            stdin: b"in".to_vec(),
            ..Default::default()
        };
        let mut t = pb::Ticket::default();
        assert!(!desk.issue(&mut t, &inv, 7), "no key, no ticket");
        desk.set_key(&[3; 32]);
        let key = SigningKey::from_bytes(&[4; 32]);
        let pk = key.verifying_key().to_bytes();
        let node = stellar_proto::identity::node_id(&pk);
        assert!(desk.issue(&mut t, &inv, node));
        let mut r = pb::Receipt {
            ticket: Some(t),
            output_sha256: Sha256::digest(b"out").to_vec(),
            seq: 1,
            prev_hash: receipts::GENESIS.to_vec(),
            ..Default::default()
        };
        r.signature = key.sign(&receipts::receipt_message(&r)).to_bytes().to_vec();
        assert!(desk.check(&r, node, &pk, Some(b"out")).is_ok());
        assert!(desk.check(&r, node, &pk, None).is_ok());
        assert_eq!(desk.refused(node), 0);
        assert_eq!(
            desk.check(&r, node, &pk, Some(b"tampered")),
            Err(pb::ReceiptVerdict::WrongOutput)
        );
        assert_eq!(desk.refused(node), 1);
    }
}
