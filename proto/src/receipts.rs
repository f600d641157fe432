//! Tickets and receipts, the bytes behind "usage only from issued work": what a ticket's MAC
//! and a receipt's signature cover, the receipt hash that chains a node's receipts, and the
//! usage record the ledger takes from a checked receipt. Shared by the gateway that issues
//! and checks, the worker that signs, the replica that chains and the CLI that verifies.
//!
//! ```text
//!  gateway: Ticket{id, tenant, function, version, code, input hash, node} + HMAC(ticket key)
//!     ─▶ worker runs it, signs Receipt{ticket, output hash, usage, seq, prev hash} (ed25519)
//!     ─▶ gateway checks MAC, node, signature, output ─▶ ledger checks seq and prev hash
//! ```
//!
//! Every field goes into the signed bytes length-prefixed and in a fixed order, so no two
//! different tickets or receipts share their bytes, whatever protobuf encoder made them.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::v1 as pb;

/// The previous-receipt hash of a node's first receipt.
pub const GENESIS: [u8; 32] = [0; 32];
/// Bytes in a ticket key, a MAC and a receipt hash.
pub const HASH_LEN: usize = 32;

/// Length-prefixed fields, so a field's bytes cannot run into the next one's.
struct Canonical(Vec<u8>);

impl Canonical {
    fn new(tag: &[u8]) -> Canonical {
        let mut c = Canonical(Vec::with_capacity(256));
        c.bytes(tag);
        c
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(b.len() as u64).to_be_bytes());
        self.0.extend_from_slice(b);
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
}

/// What a ticket's `input_sha256` covers: the call's stdin, args, env and random seed, so a
/// re-run elsewhere can be given the very same input and a worker can tell a mismatch.
pub fn input_hash(stdin: &[u8], args: &[String], env: &[pb::Label], seed: &[u8]) -> [u8; 32] {
    let mut c = Canonical::new(b"stellar-input-v1");
    c.bytes(stdin).u64(args.len() as u64);
    for a in args {
        c.bytes(a.as_bytes());
    }
    c.u64(env.len() as u64);
    for l in env {
        c.bytes(l.key.as_bytes()).bytes(l.value.as_bytes());
    }
    c.bytes(seed);
    Sha256::digest(&c.0).into()
}

/// What a container function's ticket names as its code: the sha256 (hex) of its image's
/// description (layers by sha256, entrypoint, cmd, env, working dir, arch).
pub fn image_code(image: &pb::ContainerImage) -> String {
    use prost::Message as _;
    hex::encode(Sha256::digest(image.encode_to_vec()))
}

/// The bytes a ticket's MAC covers (every field but the MAC).
fn ticket_message(c: &mut Canonical, t: &pb::Ticket) {
    c.bytes(&t.invocation_id)
        .bytes(t.tenant.as_bytes())
        .bytes(t.function.as_bytes())
        .u64(u64::from(t.version))
        .bytes(t.code_sha256.as_bytes())
        .bytes(&t.input_sha256)
        .u64(t.node)
        .u64(t.issued_unix_ms)
        .u64(u64::from(t.check));
}

fn ticket_hmac(key: &[u8], t: &pb::Ticket) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    let mut c = Canonical::new(b"stellar-ticket-v1");
    ticket_message(&mut c, t);
    mac.update(&c.0);
    mac
}

/// Seals a ticket with the cluster's ticket key (sets `mac`).
pub fn seal_ticket(key: &[u8], t: &mut pb::Ticket) {
    t.mac = ticket_hmac(key, t).finalize().into_bytes().to_vec();
}

/// Whether `t` was sealed with `key` (compared in constant time).
pub fn ticket_is_genuine(key: &[u8], t: &pb::Ticket) -> bool {
    key.len() == HASH_LEN && ticket_hmac(key, t).verify_slice(&t.mac).is_ok()
}

/// The bytes a receipt's signature covers: its ticket (with the MAC) and every field but
/// the signature.
pub fn receipt_message(r: &pb::Receipt) -> Vec<u8> {
    let mut c = Canonical::new(b"stellar-receipt-v1");
    let none = pb::Ticket::default();
    let t = r.ticket.as_ref().unwrap_or(&none);
    ticket_message(&mut c, t);
    c.bytes(&t.mac)
        .bytes(&r.output_sha256)
        .u64(r.fuel)
        .u64(r.wall_us)
        .u64(r.peak_memory_bytes)
        .u64(r.bytes_in)
        .u64(r.bytes_out)
        .u64(r.exit_code as u32 as u64)
        .u64(r.cpu_ns)
        .u64(u64::from(r.pids_peak))
        .u64(r.seq)
        .bytes(&r.prev_hash);
    c.0
}

/// A receipt's hash: what the next receipt of its node names as `prev_hash`, and what the
/// ledger remembers it by.
pub fn receipt_hash(r: &pb::Receipt) -> [u8; 32] {
    Sha256::digest(receipt_message(r)).into()
}

/// Whether the holder of `public_key` signed `r`.
pub fn signature_checks(public_key: &[u8], r: &pb::Receipt) -> bool {
    signed_by(public_key, &receipt_message(r), &r.signature)
}

/// The usage record the ledger takes from a checked receipt: who is billed comes from the
/// ticket, never from anything else the worker says.
pub fn usage_record(r: &pb::Receipt) -> pb::UsageRecord {
    let t = r.ticket.clone().unwrap_or_default();
    let check = t.check;
    pb::UsageRecord {
        invocation_id: t.invocation_id,
        tenant: t.tenant,
        function: t.function,
        node: t.node,
        fuel: r.fuel,
        wall_us: r.wall_us,
        peak_memory_bytes: r.peak_memory_bytes,
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        exit_code: r.exit_code,
        cpu_ns: r.cpu_ns,
        pids_peak: r.pids_peak,
        seq: r.seq,
        prev_hash: r.prev_hash.clone(),
        receipt_hash: receipt_hash(r).to_vec(),
        check,
    }
}

/// The default receipt period: each period's leaves get one Merkle root in the ledger.
pub const DEFAULT_PERIOD_MS: u64 = 300_000;

/// A period leaf's bytes (what its Merkle leaf hash covers).
pub fn leaf_message(l: &pb::PeriodLeaf) -> Vec<u8> {
    let mut c = Canonical::new(b"stellar-period-leaf-v1");
    c.u64(l.node)
        .u64(l.period)
        .u64(l.first_seq)
        .u64(l.last_seq)
        .bytes(&l.head)
        .u64(l.receipts)
        .u64(l.fuel)
        .u64(l.wall_us)
        .u64(l.bytes_in)
        .u64(l.bytes_out)
        .u64(l.cpu_ns);
    c.0
}

/// A period leaf's Merkle leaf hash.
pub fn leaf_hash(l: &pb::PeriodLeaf) -> [u8; 32] {
    crate::merkle::leaf_hash(&leaf_message(l))
}

/// Adds one recorded receipt's usage to its node's leaf.
pub fn add_to_leaf(l: &mut pb::PeriodLeaf, r: &pb::UsageRecord) {
    if l.receipts == 0 {
        l.first_seq = r.seq;
    }
    l.last_seq = r.seq;
    l.head = r.receipt_hash.clone();
    l.receipts += 1;
    l.fuel = l.fuel.saturating_add(r.fuel);
    l.wall_us = l.wall_us.saturating_add(r.wall_us);
    l.bytes_in = l.bytes_in.saturating_add(r.bytes_in);
    l.bytes_out = l.bytes_out.saturating_add(r.bytes_out);
    l.cpu_ns = l.cpu_ns.saturating_add(r.cpu_ns);
}

/// What a node signs to ask for its own receipt proof.
pub fn proof_request_message(node: u64, period: u64, unix_ms: u64) -> Vec<u8> {
    let mut c = Canonical::new(b"stellar-receipt-proof-v1");
    c.u64(node).u64(period).u64(unix_ms);
    c.0
}

/// Whether the holder of `public_key` signed `message`.
pub fn signed_by(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let (Ok(pk), Ok(sig)) = (
        <[u8; 32]>::try_from(public_key),
        <[u8; 64]>::try_from(signature),
    ) else {
        return false;
    };
    VerifyingKey::from_bytes(&pk)
        .is_ok_and(|k| k.verify(message, &Signature::from_bytes(&sig)).is_ok())
}

/// Why a receipt cannot be taken, checked where it arrives (the gateway); the chain is the
/// ledger's to check.
pub fn check(
    r: &pb::Receipt,
    node: u64,
    public_key: &[u8],
    ticket_key: &[u8],
) -> Result<pb::UsageRecord, pb::ReceiptVerdict> {
    let Some(t) = &r.ticket else {
        return Err(pb::ReceiptVerdict::ForgedTicket);
    };
    if !ticket_is_genuine(ticket_key, t) {
        return Err(pb::ReceiptVerdict::ForgedTicket);
    }
    if t.node != node {
        return Err(pb::ReceiptVerdict::OtherNode);
    }
    if r.seq == 0 || r.prev_hash.len() != HASH_LEN || !signature_checks(public_key, r) {
        return Err(pb::ReceiptVerdict::BadSignature);
    }
    Ok(usage_record(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(key: &SigningKey, ticket_key: &[u8], node: u64) -> pb::Receipt {
        let mut t = pb::Ticket {
            invocation_id: b"0123456789abcdef0123456789abcdef".to_vec(),
            tenant: "acme".into(),
            function: "hello".into(),
            version: 3,
            code_sha256: "ab".repeat(32),
            input_sha256: input_hash(b"in", &["a".into()], &[], &[7; 32]).to_vec(),
            node,
            issued_unix_ms: 1_700_000_000_000,
            mac: Vec::new(),
            check: false,
        };
        seal_ticket(ticket_key, &mut t);
        let mut r = pb::Receipt {
            ticket: Some(t),
            output_sha256: Sha256::digest(b"out").to_vec(),
            fuel: 12_345,
            wall_us: 800,
            seq: 1,
            prev_hash: GENESIS.to_vec(),
            ..Default::default()
        };
        r.signature = key.sign(&receipt_message(&r)).to_bytes().to_vec();
        r
    }

    #[test]
    fn a_genuine_receipt_checks_and_bills_its_ticket() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let node = crate::identity::node_id(key.verifying_key().as_bytes());
        let r = signed(&key, &[9; 32], node);
        let u = check(&r, node, key.verifying_key().as_bytes(), &[9; 32]).unwrap();
        assert_eq!(
            (u.tenant.as_str(), u.function.as_str(), u.node),
            ("acme", "hello", node)
        );
        assert_eq!((u.fuel, u.seq), (12_345, 1));
        assert_eq!(u.receipt_hash, receipt_hash(&r).to_vec());
    }

    #[test]
    fn every_change_to_a_ticket_or_receipt_is_caught() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let pk = key.verifying_key().to_bytes();
        let node = crate::identity::node_id(&pk);
        let tk = [9u8; 32];
        let good = signed(&key, &tk, node);
        // The worker edits the ticket (another tenant): the MAC no longer checks.
        let mut r = good.clone();
        r.ticket.as_mut().unwrap().tenant = "victim".into();
        assert_eq!(
            check(&r, node, &pk, &tk),
            Err(pb::ReceiptVerdict::ForgedTicket)
        );
        // It makes one up with a key it guessed.
        let forged = signed(&key, &[8; 32], node);
        assert_eq!(
            check(&forged, node, &pk, &tk),
            Err(pb::ReceiptVerdict::ForgedTicket)
        );
        // No ticket at all.
        r = good.clone();
        r.ticket = None;
        assert_eq!(
            check(&r, node, &pk, &tk),
            Err(pb::ReceiptVerdict::ForgedTicket)
        );
        // It inflates the fuel after signing.
        r = good.clone();
        r.fuel += 1;
        assert_eq!(
            check(&r, node, &pk, &tk),
            Err(pb::ReceiptVerdict::BadSignature)
        );
        // Another node presents this node's receipt (its own key signs nothing of this).
        let other = SigningKey::from_bytes(&[2; 32]);
        let other_pk = other.verifying_key().to_bytes();
        let other_node = crate::identity::node_id(&other_pk);
        assert_eq!(
            check(&good, other_node, &other_pk, &tk),
            Err(pb::ReceiptVerdict::OtherNode)
        );
        // A ticket for this node signed by another key.
        let mut stolen = good.clone();
        stolen.signature = other.sign(&receipt_message(&stolen)).to_bytes().to_vec();
        assert_eq!(
            check(&stolen, node, &pk, &tk),
            Err(pb::ReceiptVerdict::BadSignature)
        );
        // Each field moves the hash.
        let h = receipt_hash(&good);
        for edit in [
            |r: &mut pb::Receipt| r.seq += 1,
            |r: &mut pb::Receipt| r.prev_hash[0] ^= 1,
            |r: &mut pb::Receipt| r.output_sha256[0] ^= 1,
            |r: &mut pb::Receipt| r.exit_code = -1,
            |r: &mut pb::Receipt| r.pids_peak = 1,
        ] {
            let mut r = good.clone();
            edit(&mut r);
            assert_ne!(receipt_hash(&r), h);
        }
    }

    #[test]
    fn inputs_hash_apart_when_their_fields_would_run_together() {
        let seed = [0u8; 32];
        assert_ne!(
            input_hash(b"", &["ab".into(), "c".into()], &[], &seed),
            input_hash(b"", &["a".into(), "bc".into()], &[], &seed)
        );
        assert_ne!(
            input_hash(b"a", &[], &[], &seed),
            input_hash(b"", &["a".into()], &[], &seed)
        );
        assert_ne!(
            input_hash(b"", &[], &[], &seed),
            input_hash(b"", &[], &[], &[1; 32])
        );
    }
}
