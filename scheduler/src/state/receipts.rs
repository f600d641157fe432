//! The receipt ledger in the replicated state: usage is recorded only as the next link of
//! its node's receipt chain, each invocation once. The gateway has already checked each
//! receipt's ticket (MAC, node) and signature; apply checks what needs the committed state,
//! deterministically: the sequence number and the previous receipt's hash.
//!
//! ```text
//!  UsageCmd{records (from checked receipts), refusals (gateway's)}
//!    refusals ─▶ counted against their nodes
//!    records, by (node, seq) ─▶ invocation seen?  same hash: DUPLICATE   else: REPLAY
//!                             ─▶ seq ≤ head: REPLAY   seq > head+1: GAP
//!                             ─▶ prev ≠ head hash: FORK
//!                             ─▶ RECORDED: usage counted, head moves
//! ```
//!
//! A GAP is sent again by its worker once the receipts before it are in; every other
//! refusal is final. Records without a receipt hash come only from logs written before
//! receipts existed and are applied as they were then.

use std::collections::{BTreeMap, HashSet, VecDeque};

use stellar_proto::receipts::{GENESIS, HASH_LEN};
use stellar_proto::v1 as pb;

use super::{Result, SEEN_INVOCATIONS_CAPACITY, StateMachine, invalid, not_found, ok_result};

/// Kinds of verdict a chain counts (the `ReceiptVerdict` numbers).
const VERDICTS: usize = 10;

/// One node's receipt chain: its head and what it had refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptChain {
    /// The last recorded receipt's sequence number (0 = none yet).
    pub seq: u64,
    /// Its hash ([`GENESIS`] before the first).
    pub head: [u8; 32],
    /// Receipts recorded.
    pub recorded: u64,
    /// Receipts refused, by verdict number.
    pub refused: [u64; VERDICTS],
}

impl Default for ReceiptChain {
    fn default() -> Self {
        ReceiptChain {
            seq: 0,
            head: GENESIS,
            recorded: 0,
            refused: [0; VERDICTS],
        }
    }
}

impl ReceiptChain {
    /// Receipts refused for the node's own fault (every verdict but DUPLICATE).
    pub fn faults(&self) -> u64 {
        self.refused
            .iter()
            .enumerate()
            .filter(|(v, _)| *v != pb::ReceiptVerdict::Duplicate as usize)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Receipt chains, the invocations already recorded, and the cluster's ticket key.
#[derive(Debug, Clone, Default)]
pub struct ReceiptLedger {
    ticket_key: Vec<u8>,
    chains: BTreeMap<u64, ReceiptChain>,
    /// Invocation id to the hash of the receipt it was recorded from (empty: before receipts).
    seen: rustc_hash::FxHashMap<Vec<u8>, Vec<u8>>,
    seen_order: VecDeque<Vec<u8>>,
}

impl ReceiptLedger {
    /// The cluster's ticket key (empty until the first gateway session set it).
    pub fn ticket_key(&self) -> &[u8] {
        &self.ticket_key
    }

    /// A node's chain, if it ever sent a receipt.
    pub fn chain(&self, node: u64) -> Option<&ReceiptChain> {
        self.chains.get(&node)
    }

    fn remember(&mut self, id: Vec<u8>, hash: Vec<u8>) {
        if self.seen_order.len() >= SEEN_INVOCATIONS_CAPACITY
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.seen_order.push_back(id.clone());
        self.seen.insert(id, hash);
    }

    fn refuse(&mut self, node: u64, v: pb::ReceiptVerdict) {
        if let Some(c) = self.chains.get_mut(&node)
            && let Some(n) = c.refused.get_mut(v as usize)
        {
            *n += 1;
        }
    }

    /// The ledger's part of the snapshot.
    pub fn snapshot(&self) -> (Vec<u8>, Vec<pb::ReceiptChainRecord>, Vec<pb::SeenReceipt>) {
        let chains = self
            .chains
            .iter()
            .map(|(&node, c)| pb::ReceiptChainRecord {
                node,
                seq: c.seq,
                head: c.head.to_vec(),
                recorded: c.recorded,
                refused: c.refused.to_vec(),
            })
            .collect();
        let seen = self
            .seen_order
            .iter()
            .map(|id| pb::SeenReceipt {
                invocation_id: id.clone(),
                receipt_hash: self.seen.get(id).cloned().unwrap_or_default(),
            })
            .collect();
        (self.ticket_key.clone(), chains, seen)
    }

    /// Restores the ledger's part of a snapshot (`legacy`: ids from before receipts).
    pub fn restore(
        s_key: Vec<u8>,
        chains: Vec<pb::ReceiptChainRecord>,
        seen: Vec<pb::SeenReceipt>,
        legacy: Vec<Vec<u8>>,
    ) -> Result<ReceiptLedger> {
        let mut l = ReceiptLedger {
            ticket_key: s_key,
            ..Default::default()
        };
        for c in chains {
            let head = <[u8; 32]>::try_from(c.head.as_slice())
                .map_err(|_| invalid("snapshot receipt chain head is not 32 bytes"))?;
            let mut refused = [0; VERDICTS];
            for (n, r) in refused.iter_mut().zip(c.refused) {
                *n = r;
            }
            l.chains.insert(
                c.node,
                ReceiptChain {
                    seq: c.seq,
                    head,
                    recorded: c.recorded,
                    refused,
                },
            );
        }
        for id in legacy {
            l.remember(id, Vec::new());
        }
        for s in seen {
            l.remember(s.invocation_id, s.receipt_hash);
        }
        Ok(l)
    }
}

impl StateMachine {
    /// Sets the ticket key once; answers with the key in force.
    pub(super) fn set_ticket_key(&mut self, c: pb::TicketKeyCmd) -> Result<pb::CommandResult> {
        if self.receipts.ticket_key.is_empty() {
            if c.key.len() != HASH_LEN {
                return Err(invalid("a ticket key is 32 bytes"));
            }
            self.receipts.ticket_key = c.key;
        }
        let mut r = ok_result();
        r.ticket_key = self.receipts.ticket_key.clone();
        Ok(r)
    }

    pub(super) fn record_usage(&mut self, c: pb::UsageCmd) -> Result<pb::CommandResult> {
        if c.refusals.is_empty() && c.records.iter().all(|r| r.receipt_hash.is_empty()) {
            return self.record_legacy_usage(c);
        }
        let hour = c.unix_ms / 3_600_000;
        for f in &c.refusals {
            let v = pb::ReceiptVerdict::try_from(f.verdict).unwrap_or(pb::ReceiptVerdict::Unknown);
            if self.nodes.contains_key(&f.node) {
                self.receipts.chains.entry(f.node).or_default();
                self.receipts.refuse(f.node, v);
            }
        }
        // Each node's receipts in sequence order: a batch may carry them out of order.
        let mut order: Vec<usize> = (0..c.records.len()).collect();
        order.sort_by_key(|&i| (c.records[i].node, c.records[i].seq));
        let mut verdicts = vec![pb::ReceiptVerdict::Recorded; c.records.len()];
        let mut counted = 0;
        for i in order {
            let r = &c.records[i];
            let v = self.judge(r);
            if v == pb::ReceiptVerdict::Recorded {
                let fid = self
                    .function_id(&r.tenant, &r.function)
                    .expect("judged known");
                self.usage.entry((fid, r.node, hour)).or_default().count(r);
                let chain = self.receipts.chains.entry(r.node).or_default();
                chain.seq = r.seq;
                chain.head.copy_from_slice(&r.receipt_hash);
                chain.recorded += 1;
                self.receipts
                    .remember(r.invocation_id.clone(), r.receipt_hash.clone());
                counted += 1;
            } else if v != pb::ReceiptVerdict::Duplicate && v != pb::ReceiptVerdict::Unknown {
                self.receipts.refuse(r.node, v);
            }
            verdicts[i] = v;
        }
        let mut result = ok_result();
        result.count = counted;
        result.verdicts = verdicts.into_iter().map(|v| v as i32).collect();
        Ok(result)
    }

    /// What the ledger makes of one record from a checked receipt.
    fn judge(&mut self, r: &pb::UsageRecord) -> pb::ReceiptVerdict {
        use pb::ReceiptVerdict as V;
        if self.function_id(&r.tenant, &r.function).is_none() || !self.nodes.contains_key(&r.node) {
            return V::Unknown;
        }
        if r.invocation_id.is_empty()
            || r.invocation_id.len() > 32
            || r.receipt_hash.len() != HASH_LEN
            || r.prev_hash.len() != HASH_LEN
        {
            return V::ForgedTicket;
        }
        if let Some(h) = self.receipts.seen.get(&r.invocation_id) {
            return if *h == r.receipt_hash {
                V::Duplicate
            } else {
                V::Replay
            };
        }
        let chain = self.receipts.chains.entry(r.node).or_default();
        if r.seq <= chain.seq {
            V::Replay
        } else if r.seq > chain.seq + 1 {
            V::Gap
        } else if r.prev_hash != chain.head {
            V::Fork
        } else {
            V::Recorded
        }
    }

    /// Usage as logs from before receipts recorded it: by invocation id, any record of a
    /// known function and node.
    fn record_legacy_usage(&mut self, c: pb::UsageCmd) -> Result<pb::CommandResult> {
        let mut resolved = Vec::with_capacity(c.records.len());
        let mut batch_ids = HashSet::new();
        for r in &c.records {
            if r.invocation_id.is_empty() || r.invocation_id.len() > 32 {
                return Err(invalid("invocation id must be 1..=32 bytes"));
            }
            let fid = self
                .function_id(&r.tenant, &r.function)
                .ok_or_else(|| not_found("function", format!("{}/{}", r.tenant, r.function)))?;
            if !self.nodes.contains_key(&r.node) {
                return Err(not_found("node", format!("{:016x}", r.node)));
            }
            let fresh = !self.receipts.seen.contains_key(&r.invocation_id)
                && batch_ids.insert(r.invocation_id.clone());
            resolved.push((fid, fresh));
        }
        let mut counted = 0;
        let hour = c.unix_ms / 3_600_000;
        for (r, (fid, fresh)) in c.records.into_iter().zip(resolved) {
            if !fresh {
                continue;
            }
            counted += 1;
            self.usage.entry((fid, r.node, hour)).or_default().count(&r);
            self.receipts.remember(r.invocation_id, Vec::new());
        }
        let mut result = ok_result();
        result.count = counted;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Effects;
    use sha2::{Digest, Sha256};
    use stellar_proto::v1::ReceiptVerdict as V;

    fn apply(m: &mut StateMachine, kind: pb::command::Kind) -> pb::CommandResult {
        let index = m.applied_index() + 1;
        m.apply(
            index,
            pb::Command {
                request_id: Vec::new(),
                kind: Some(kind),
            },
            &mut Effects::default(),
        )
    }

    /// A cluster with tenant `acme`, its function `f` and nodes 1 and 2.
    fn ledger() -> StateMachine {
        let mut m = StateMachine::new();
        let module = b"\0asm\x01\0\0\0";
        for kind in [
            pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
                name: "acme".into(),
                token_sha256: vec![],
            }),
            crate::state::tests::deploy("acme", "f", module),
            pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
                nodes: (1..=2).map(crate::fuzzing::node).collect(),
            }),
        ] {
            let r = apply(&mut m, kind);
            assert!(r.error_code.is_empty(), "{r:?}");
        }
        m
    }

    /// A node's chain of records as a gateway would send them after checking each receipt.
    struct Chain {
        node: u64,
        seq: u64,
        head: Vec<u8>,
    }

    impl Chain {
        fn new(node: u64) -> Chain {
            Chain {
                node,
                seq: 0,
                head: GENESIS.to_vec(),
            }
        }
        fn next(&mut self, id: &str, fuel: u64) -> pb::UsageRecord {
            self.seq += 1;
            let hash = Sha256::digest(format!("{}/{}/{id}/{fuel}", self.node, self.seq)).to_vec();
            pb::UsageRecord {
                invocation_id: id.as_bytes().to_vec(),
                tenant: "acme".into(),
                function: "f".into(),
                node: self.node,
                fuel,
                seq: self.seq,
                prev_hash: std::mem::replace(&mut self.head, hash.clone()),
                receipt_hash: hash,
                ..Default::default()
            }
        }
    }

    fn usage(
        records: Vec<pb::UsageRecord>,
        refusals: Vec<pb::ReceiptRefusal>,
    ) -> pb::command::Kind {
        pb::command::Kind::Usage(pb::UsageCmd {
            records,
            unix_ms: 1_800_000_000_000,
            refusals,
        })
    }

    fn verdicts(r: &pb::CommandResult) -> Vec<V> {
        assert!(r.error_code.is_empty(), "{r:?}");
        r.verdicts
            .iter()
            .map(|&v| V::try_from(v).unwrap())
            .collect()
    }

    fn fuel(m: &StateMachine) -> u64 {
        m.usage().values().map(|t| t.fuel).sum()
    }

    #[test]
    fn a_chain_is_recorded_in_order_even_when_its_batch_is_not() {
        let mut m = ledger();
        let mut c = Chain::new(1);
        let (a, b, d) = (c.next("a", 100), c.next("b", 200), c.next("d", 300));
        // Out of order within one batch: sorted by sequence before judging.
        let r = apply(&mut m, usage(vec![b.clone(), a.clone()], vec![]));
        assert_eq!(verdicts(&r), vec![V::Recorded, V::Recorded]);
        assert_eq!(fuel(&m), 300);
        // The same records again (a worker resending after a lost ack): idempotent.
        let r = apply(&mut m, usage(vec![a, b], vec![]));
        assert_eq!(verdicts(&r), vec![V::Duplicate, V::Duplicate]);
        assert_eq!((fuel(&m), r.count), (300, 0));
        assert_eq!(m.receipts().chain(1).unwrap().faults(), 0);
        // A receipt whose predecessor has not arrived waits (GAP), then goes in.
        let mut skip = Chain::new(2);
        let first = skip.next("x", 5);
        let second = skip.next("y", 7);
        assert_eq!(
            verdicts(&apply(&mut m, usage(vec![second.clone()], vec![]))),
            vec![V::Gap]
        );
        let r = apply(&mut m, usage(vec![first, second], vec![]));
        assert_eq!(verdicts(&r), vec![V::Recorded, V::Recorded]);
        assert_eq!(fuel(&m), 312);
        let r = apply(&mut m, usage(vec![d], vec![]));
        assert_eq!(verdicts(&r), vec![V::Recorded]);
        assert_eq!(m.receipts().chain(1).unwrap().recorded, 3);
    }

    #[test]
    fn forks_replays_and_unknown_names_are_refused_and_bill_nothing() {
        let mut m = ledger();
        let mut c = Chain::new(1);
        let a = c.next("a", 100);
        assert_eq!(
            verdicts(&apply(&mut m, usage(vec![a.clone()], vec![]))),
            vec![V::Recorded]
        );
        // The same invocation billed again under a new receipt (re-signed with a later seq).
        let mut again = c.next("a", 100);
        assert_eq!(
            verdicts(&apply(&mut m, usage(vec![again.clone()], vec![]))),
            vec![V::Replay]
        );
        // An old sequence number for a new invocation.
        let mut old = a.clone();
        old.invocation_id = b"z".to_vec();
        old.receipt_hash = vec![9; 32];
        assert_eq!(
            verdicts(&apply(&mut m, usage(vec![old], vec![]))),
            vec![V::Replay]
        );
        // The next sequence number, chained to something else (a second history).
        again.invocation_id = b"b".to_vec();
        again.prev_hash = vec![1; 32];
        assert_eq!(
            verdicts(&apply(&mut m, usage(vec![again], vec![]))),
            vec![V::Fork]
        );
        // A function or node the ledger does not know.
        let mut c2 = Chain::new(1);
        c2.seq = 1;
        c2.head = a.receipt_hash.clone();
        let mut other = c2.next("c", 1);
        other.function = "nope".into();
        let mut stranger = Chain::new(99).next("s", 1);
        stranger.tenant = "acme".into();
        let r = apply(&mut m, usage(vec![other, stranger], vec![]));
        assert_eq!(verdicts(&r), vec![V::Unknown, V::Unknown]);
        assert_eq!(fuel(&m), 100, "only the first receipt is billed");
        let chain = m.receipts().chain(1).unwrap();
        assert_eq!(chain.refused[V::Replay as usize], 2);
        assert_eq!(chain.refused[V::Fork as usize], 1);
        assert_eq!(chain.faults(), 3);
        // The gateways' refusals are counted too, for known nodes only.
        let f = |node, v: V| pb::ReceiptRefusal {
            node,
            verdict: v as i32,
        };
        let r = apply(
            &mut m,
            usage(
                vec![],
                vec![
                    f(2, V::ForgedTicket),
                    f(2, V::BadSignature),
                    f(99, V::ForgedTicket),
                ],
            ),
        );
        assert!(r.error_code.is_empty(), "{r:?}");
        assert_eq!(m.receipts().chain(2).unwrap().faults(), 2);
        assert!(m.receipts().chain(99).is_none());
        // And all of it survives a snapshot.
        let back = StateMachine::from_snapshot(m.to_snapshot()).unwrap();
        assert_eq!(back.digest(), m.digest());
        assert_eq!(back.receipts().chain(1), m.receipts().chain(1));
    }

    #[test]
    fn the_ticket_key_is_set_once() {
        let mut m = ledger();
        let set = |m: &mut StateMachine, key: Vec<u8>| {
            apply(m, pb::command::Kind::TicketKey(pb::TicketKeyCmd { key }))
        };
        assert!(
            !set(&mut m, vec![1; 5]).error_code.is_empty(),
            "a short key is refused"
        );
        assert_eq!(set(&mut m, vec![1; 32]).ticket_key, vec![1; 32]);
        assert_eq!(
            set(&mut m, vec![2; 32]).ticket_key,
            vec![1; 32],
            "the first key stays"
        );
        let back = StateMachine::from_snapshot(m.to_snapshot()).unwrap();
        assert_eq!(back.receipts().ticket_key(), &[1; 32]);
    }
}
