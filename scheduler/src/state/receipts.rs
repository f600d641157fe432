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

use stellar_proto::receipts::{DEFAULT_PERIOD_MS, GENESIS, HASH_LEN};
use stellar_proto::v1 as pb;

use super::reputation::{Evidence, PUBLISH_STEP, QUARANTINE_BELOW, Standing};
use super::{
    Effects, Result, SEEN_INVOCATIONS_CAPACITY, StateMachine, UsageTotals, invalid, not_found,
    ok_result,
};

/// Kinds of verdict a chain counts (the `ReceiptVerdict` numbers).
const VERDICTS: usize = 10;
/// The usage line re-execution checks are billed on (tenant "": the platform).
pub const CHECKS_FUNCTION: &str = "checks";
/// Closed receipt periods kept with their leaves, for proofs (a day of 5-minute periods).
pub const KEPT_PERIODS: usize = 288;

/// Why a receipt proof cannot be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The period is still being filled: its root is committed when it closes.
    #[error(
        "period {period} is still open; its root is committed with the first usage recorded after it ends (unix ms {ends_ms})"
    )]
    Open {
        /// The open period.
        period: u64,
        /// When it ends.
        ends_ms: u64,
    },
    /// The request was neither an admin's nor signed by the node's own key.
    #[error(
        "the request is not signed by node {node:016x}'s key (or that node is unknown); sign it with the worker's data dir (stellar receipts verify --data-dir) or use an admin token"
    )]
    NotSigned {
        /// The node asked about.
        node: u64,
    },
    /// No kept period has a leaf for the node.
    #[error("no kept receipt period has receipts of node {node:016x}{}", .period.map(|p| format!(" in period {p}")).unwrap_or_default())]
    NotFound {
        /// The node asked about.
        node: u64,
        /// The period asked for (None: the latest).
        period: Option<u64>,
    },
}

/// One node's receipt chain: its head and what it had refused.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptChain {
    /// The last recorded receipt's sequence number (0 = none yet).
    pub seq: u64,
    /// Its hash ([`GENESIS`] before the first).
    pub head: [u8; 32],
    /// Receipts recorded.
    pub recorded: u64,
    /// Receipts refused, by verdict number.
    pub refused: [u64; VERDICTS],
    /// What the recorded receipts add up to (the audit's check on the ledger's cells).
    pub usage: UsageTotals,
    /// The node's reputation evidence.
    pub standing: Standing,
}

impl Default for ReceiptChain {
    fn default() -> Self {
        ReceiptChain {
            seq: 0,
            head: GENESIS,
            recorded: 0,
            refused: [0; VERDICTS],
            usage: UsageTotals::default(),
            standing: Standing::default(),
        }
    }
}

impl ReceiptChain {
    /// Moves past a signed receipt that bills nothing, when it is this chain's next link.
    fn void_link(&mut self, seq: u64, prev: &[u8], hash: &[u8]) {
        if seq == self.seq + 1 && prev == self.head && hash.len() == HASH_LEN {
            self.seq = seq;
            self.head.copy_from_slice(hash);
        }
    }

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
    /// The period being filled: one leaf per node with receipts recorded in it.
    open: Option<pb::ReceiptPeriod>,
    open_leaves: BTreeMap<u64, pb::PeriodLeaf>,
    /// Closed periods by their start (unix ms), with their roots and leaves.
    closed: BTreeMap<u64, pb::ReceiptPeriod>,
    /// Re-execution checks' usage by (node, unix hour): billed to the platform.
    checks: BTreeMap<(u64, u64), UsageTotals>,
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

    /// Moves to the period of `unix_ms`, closing the open one when that is later: its leaves
    /// (by node) get their Merkle root. A clock that went back stays in the open period.
    fn roll(&mut self, unix_ms: u64, period_ms: u64) {
        let period = unix_ms / period_ms;
        if let Some(o) = &self.open
            && o.period_ms == period_ms
            && period <= o.period
        {
            return;
        }
        if let Some(mut o) = self.open.take() {
            let leaves: Vec<pb::PeriodLeaf> = std::mem::take(&mut self.open_leaves)
                .into_values()
                .collect();
            if !leaves.is_empty() {
                let hashes: Vec<[u8; 32]> = leaves
                    .iter()
                    .map(stellar_proto::receipts::leaf_hash)
                    .collect();
                o.root = stellar_proto::merkle::root(&hashes).to_vec();
                o.leaves = leaves;
                self.closed.insert(o.period * o.period_ms, o);
                while self.closed.len() > KEPT_PERIODS {
                    self.closed.pop_first();
                }
            }
        }
        self.open = Some(pb::ReceiptPeriod {
            period,
            period_ms,
            ..Default::default()
        });
    }

    fn add_to_period(&mut self, r: &pb::UsageRecord) {
        let period = self.open.as_ref().map_or(0, |o| o.period);
        let leaf = self
            .open_leaves
            .entry(r.node)
            .or_insert_with(|| pb::PeriodLeaf {
                node: r.node,
                period,
                ..Default::default()
            });
        stellar_proto::receipts::add_to_leaf(leaf, r);
    }

    /// `node`'s leaf in closed `period` (None: its latest) with the audit path to the root.
    pub fn proof(
        &self,
        node: u64,
        period: Option<u64>,
    ) -> std::result::Result<pb::GetReceiptProofResponse, ProofError> {
        if let (Some(p), Some(o)) = (period, &self.open)
            && p == o.period
            && self.open_leaves.contains_key(&node)
        {
            return Err(ProofError::Open {
                period: p,
                ends_ms: (p + 1) * o.period_ms,
            });
        }
        let found = self
            .closed
            .values()
            .rev()
            .filter(|c| period.is_none_or(|p| c.period == p))
            .find_map(|c| {
                let i = c.leaves.binary_search_by_key(&node, |l| l.node).ok()?;
                Some((c, i))
            });
        let Some((c, i)) = found else {
            return Err(ProofError::NotFound { node, period });
        };
        let hashes: Vec<[u8; 32]> = c
            .leaves
            .iter()
            .map(stellar_proto::receipts::leaf_hash)
            .collect();
        Ok(pb::GetReceiptProofResponse {
            period: c.period,
            period_ms: c.period_ms,
            root: c.root.clone(),
            tree_size: c.leaves.len() as u64,
            index: i as u64,
            leaf: Some(c.leaves[i].clone()),
            audit_path: stellar_proto::merkle::audit_path(i, &hashes)
                .into_iter()
                .map(|h| h.to_vec())
                .collect(),
        })
    }

    /// Re-execution checks' usage by (node, unix hour): the platform's cost.
    pub fn check_usage(&self) -> &BTreeMap<(u64, u64), UsageTotals> {
        &self.checks
    }

    /// The checks' part of the snapshot.
    pub fn check_snapshot(&self) -> Vec<pb::UsageTotal> {
        self.checks
            .iter()
            .map(|(&(node, hour), t)| t.record(("", CHECKS_FUNCTION), node, hour))
            .collect()
    }

    /// Restores the checks' usage from a snapshot.
    pub fn restore_checks(&mut self, totals: Vec<pb::UsageTotal>) {
        for t in totals {
            self.checks.insert((t.node, t.hour), UsageTotals::of(&t));
        }
    }

    fn refuse(&mut self, node: u64, v: pb::ReceiptVerdict) {
        let period = self.period();
        if let Some(c) = self.chains.get_mut(&node)
            && let Some(n) = c.refused.get_mut(v as usize)
        {
            *n += 1;
            if !matches!(
                v,
                pb::ReceiptVerdict::Gap
                    | pb::ReceiptVerdict::Duplicate
                    | pb::ReceiptVerdict::Unknown
            ) {
                c.standing.add(Evidence::Refused, period);
            }
        }
    }

    /// Forgets a node's reputation evidence (an admin returned it from quarantine); the
    /// score it starts again from.
    pub fn reset_standing(&mut self, node: u64) -> f32 {
        let fresh = Standing::default();
        if let Some(c) = self.chains.get_mut(&node) {
            c.standing = Standing {
                as_of_period: c.standing.as_of_period,
                ..fresh.clone()
            };
        }
        fresh.score()
    }

    /// The open receipt period (evidence is decayed to it).
    fn period(&self) -> u64 {
        self.open.as_ref().map_or(0, |o| o.period)
    }

    /// The receipt periods' part of the snapshot: the open one (its leaves so far) and the
    /// closed ones.
    pub fn period_snapshot(&self) -> (Option<pb::ReceiptPeriod>, Vec<pb::ReceiptPeriod>) {
        let open = self.open.clone().map(|mut o| {
            o.leaves = self.open_leaves.values().cloned().collect();
            o
        });
        (open, self.closed.values().cloned().collect())
    }

    /// Restores the periods from a snapshot.
    pub fn restore_periods(
        &mut self,
        open: Option<pb::ReceiptPeriod>,
        closed: Vec<pb::ReceiptPeriod>,
    ) -> Result<()> {
        if let Some(mut o) = open {
            if o.period_ms == 0 {
                return Err(invalid("snapshot receipt period has no length"));
            }
            self.open_leaves = std::mem::take(&mut o.leaves)
                .into_iter()
                .map(|l| (l.node, l))
                .collect();
            self.open = Some(o);
        }
        for c in closed {
            self.closed.insert(c.period * c.period_ms, c);
        }
        Ok(())
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
                usage: Some(c.usage.record(("", ""), node, 0)),
                good: c.standing.good,
                bad: c.standing.bad,
                as_of_period: c.standing.as_of_period,
                checks_matched: c.standing.checks_matched,
                checks_mismatched: c.standing.checks_mismatched,
                timeouts: c.standing.timeouts,
                lost_streams: c.standing.lost_streams,
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
                    usage: c.usage.as_ref().map(UsageTotals::of).unwrap_or_default(),
                    standing: Standing {
                        good: c.good,
                        bad: c.bad,
                        as_of_period: c.as_of_period,
                        checks_matched: c.checks_matched,
                        checks_mismatched: c.checks_mismatched,
                        timeouts: c.timeouts,
                        lost_streams: c.lost_streams,
                    },
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

    pub(super) fn record_usage(
        &mut self,
        c: pb::UsageCmd,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        if c.refusals.is_empty()
            && c.incidents.is_empty()
            && c.records.iter().all(|r| r.receipt_hash.is_empty())
        {
            return self.record_legacy_usage(c);
        }
        let hour = c.unix_ms / 3_600_000;
        let period_ms = if c.period_ms == 0 {
            DEFAULT_PERIOD_MS
        } else {
            c.period_ms
        };
        self.receipts.roll(c.unix_ms, period_ms);
        let period = self.receipts.period();
        // Each node's records and signed refusals in sequence order: a batch may carry them
        // out of order, and a void link must come before the link after it.
        let mut order: Vec<(u64, u64, std::result::Result<usize, usize>)> = c
            .records
            .iter()
            .enumerate()
            .map(|(i, r)| (r.node, r.seq, Ok(i)))
            .chain(
                c.refusals
                    .iter()
                    .enumerate()
                    .map(|(i, f)| (f.node, f.seq, Err(i))),
            )
            .collect();
        order.sort_by_key(|&(node, seq, _)| (node, seq));
        let mut verdicts = vec![pb::ReceiptVerdict::Recorded; c.records.len()];
        let mut counted = 0;
        for (_, _, item) in order {
            let i = match item {
                Ok(i) => i,
                Err(i) => {
                    let f = &c.refusals[i];
                    let v = pb::ReceiptVerdict::try_from(f.verdict)
                        .unwrap_or(pb::ReceiptVerdict::Unknown);
                    if self.nodes.contains_key(&f.node) {
                        let chain = self.receipts.chains.entry(f.node).or_default();
                        chain.void_link(f.seq, &f.prev_hash, &f.receipt_hash);
                        self.receipts.refuse(f.node, v);
                    }
                    continue;
                }
            };
            let r = &c.records[i];
            let v = self.judge(r);
            if v == pb::ReceiptVerdict::Recorded {
                if r.check {
                    // A re-execution check: the platform pays, the checking node is credited.
                    self.receipts
                        .checks
                        .entry((r.node, hour))
                        .or_default()
                        .count(r);
                } else {
                    let fid = self
                        .function_id(&r.tenant, &r.function)
                        .expect("judged known");
                    self.usage.entry((fid, r.node, hour)).or_default().count(r);
                }
                let chain = self.receipts.chains.entry(r.node).or_default();
                chain.seq = r.seq;
                chain.head.copy_from_slice(&r.receipt_hash);
                chain.recorded += 1;
                chain.usage.count(r);
                chain.standing.add(Evidence::Receipt, period);
                self.receipts
                    .remember(r.invocation_id.clone(), r.receipt_hash.clone());
                self.receipts.add_to_period(r);
                counted += 1;
            } else if v == pb::ReceiptVerdict::Unknown {
                // The function went away after the call (or the node): bill nothing, but
                // the node's chain moves on past it.
                if self.nodes.contains_key(&r.node) {
                    let chain = self.receipts.chains.entry(r.node).or_default();
                    chain.void_link(r.seq, &r.prev_hash, &r.receipt_hash);
                }
            } else if v != pb::ReceiptVerdict::Duplicate {
                self.receipts.refuse(r.node, v);
            }
            verdicts[i] = v;
        }
        for i in &c.incidents {
            let e = match pb::Incident::try_from(i.kind) {
                Ok(pb::Incident::CheckMatch) => Evidence::CheckMatch,
                Ok(pb::Incident::CheckMismatch) => Evidence::CheckMismatch,
                Ok(pb::Incident::Timeout) => Evidence::Timeout,
                Ok(pb::Incident::LostStream) => Evidence::LostStream,
                _ => continue,
            };
            if self.nodes.contains_key(&i.node) {
                let chain = self.receipts.chains.entry(i.node).or_default();
                chain.standing.add(e, period);
            }
        }
        let mut touched: Vec<u64> = c
            .records
            .iter()
            .map(|r| r.node)
            .chain(c.refusals.iter().map(|f| f.node))
            .chain(c.incidents.iter().map(|i| i.node))
            .collect();
        touched.sort_unstable();
        touched.dedup();
        for node in touched {
            self.publish_reputation(node, fx);
        }
        let mut result = ok_result();
        result.count = counted;
        result.verdicts = verdicts.into_iter().map(|v| v as i32).collect();
        Ok(result)
    }

    /// Moves a node's published reputation to its standing's score when it moved enough,
    /// and quarantines a node that fell below the line (its allocations are re-placed).
    fn publish_reputation(&mut self, node: u64, fx: &mut Effects) {
        let Some(score) = self.receipts.chains.get(&node).map(|c| c.standing.score()) else {
            return;
        };
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let crossed = (score < QUARANTINE_BELOW) != (n.reputation < QUARANTINE_BELOW);
        if (score - n.reputation).abs() >= PUBLISH_STEP || crossed {
            n.reputation = score;
            fx.nodes_changed.push(node);
        }
        if score < QUARANTINE_BELOW
            && matches!(
                n.state,
                stellar_placement::NodeState::Ready | stellar_placement::NodeState::Draining
            )
        {
            n.state = stellar_placement::NodeState::Quarantined;
            fx.nodes_changed.push(node);
            if n.allocations > 0 {
                fx.nodes_down.push(node);
            }
        }
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

    const T0: u64 = 1_800_000_000_000;

    fn usage(
        records: Vec<pb::UsageRecord>,
        refusals: Vec<pb::ReceiptRefusal>,
    ) -> pb::command::Kind {
        usage_at(records, refusals, T0)
    }

    fn usage_at(
        records: Vec<pb::UsageRecord>,
        refusals: Vec<pb::ReceiptRefusal>,
        unix_ms: u64,
    ) -> pb::command::Kind {
        pb::command::Kind::Usage(pb::UsageCmd {
            records,
            unix_ms,
            refusals,
            period_ms: 0,
            incidents: Vec::new(),
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
            ..Default::default()
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
    fn a_refused_but_signed_receipt_is_a_void_link_and_the_chain_goes_on() {
        let mut m = ledger();
        let mut c = Chain::new(1);
        let (a, b, d) = (c.next("a", 100), c.next("b", 200), c.next("d", 300));
        // b was refused at the gateway (say its output did not match), signed by the node.
        let void = pb::ReceiptRefusal {
            node: 1,
            verdict: V::WrongOutput as i32,
            seq: b.seq,
            prev_hash: b.prev_hash.clone(),
            receipt_hash: b.receipt_hash.clone(),
        };
        // In one batch, out of order: a, the void b, then d all go in; only a and d bill.
        let r = apply(&mut m, usage(vec![d, a], vec![void]));
        assert_eq!(verdicts(&r), vec![V::Recorded, V::Recorded]);
        assert_eq!(fuel(&m), 400);
        let chain = m.receipts().chain(1).unwrap();
        assert_eq!((chain.seq, chain.recorded, chain.faults()), (3, 2, 1));
        // A receipt of a function deleted since is billed to no one, and links too.
        let mut gone = c.next("e", 5);
        gone.function = "deleted".into();
        let next = c.next("f", 7);
        let r = apply(&mut m, usage(vec![gone, next], vec![]));
        assert_eq!(verdicts(&r), vec![V::Unknown, V::Recorded]);
        assert_eq!(fuel(&m), 407);
    }

    #[test]
    fn a_closed_period_proves_each_node_s_leaf_under_one_root() {
        let mut m = ledger();
        let (mut a, mut b) = (Chain::new(1), Chain::new(2));
        let p0 = T0 / DEFAULT_PERIOD_MS;
        let first = vec![a.next("a1", 10), a.next("a2", 20), b.next("b1", 5)];
        apply(&mut m, usage(first, vec![]));
        assert!(matches!(
            m.receipts().proof(1, Some(p0)),
            Err(ProofError::Open { .. })
        ));
        assert!(matches!(
            m.receipts().proof(1, None),
            Err(ProofError::NotFound { .. })
        ));
        // The next period's first record closes it: its root is committed.
        let later = vec![a.next("a3", 7)];
        apply(&mut m, usage_at(later, vec![], T0 + DEFAULT_PERIOD_MS));
        let p = m.receipts().proof(1, Some(p0)).unwrap();
        let leaf = p.leaf.clone().unwrap();
        assert_eq!(
            (leaf.receipts, leaf.fuel, leaf.first_seq, leaf.last_seq),
            (2, 30, 1, 2)
        );
        assert_eq!((p.tree_size, p.index), (2, 0));
        let root: [u8; 32] = p.root.as_slice().try_into().unwrap();
        let path: Vec<[u8; 32]> = p
            .audit_path
            .iter()
            .map(|h| h.as_slice().try_into().unwrap())
            .collect();
        let hash = stellar_proto::receipts::leaf_hash(&leaf);
        assert!(stellar_proto::merkle::verify(
            p.index,
            p.tree_size,
            &hash,
            &path,
            &root
        ));
        // Another node's leaf is under the same root; a leaf with more fuel is not.
        let q = m.receipts().proof(2, None).unwrap();
        assert_eq!((q.period, q.root.clone(), q.index), (p0, p.root.clone(), 1));
        let mut richer = leaf.clone();
        richer.fuel += 1;
        let hash = stellar_proto::receipts::leaf_hash(&richer);
        assert!(!stellar_proto::merkle::verify(
            p.index,
            p.tree_size,
            &hash,
            &path,
            &root
        ));
        // Node 2 had nothing in the open period: its latest closed one is p0.
        assert!(matches!(
            m.receipts().proof(2, Some(p0 + 1)),
            Err(ProofError::NotFound { .. })
        ));
        let back = StateMachine::from_snapshot(m.to_snapshot()).unwrap();
        assert_eq!(back.digest(), m.digest());
        assert_eq!(back.receipts().proof(1, Some(p0)), Ok(p));
    }

    #[test]
    fn evidence_moves_reputation_in_steps_and_a_mismatch_quarantines() {
        let mut m = ledger();
        let incident = |node, kind: pb::Incident| pb::NodeIncident {
            node,
            kind: kind as i32,
        };
        let cmd = |m: &mut StateMachine, incidents| {
            let mut fx = Effects::default();
            let index = m.applied_index() + 1;
            let kind = pb::command::Kind::Usage(pb::UsageCmd {
                unix_ms: T0,
                incidents,
                ..Default::default()
            });
            let r = m.apply(
                index,
                pb::Command {
                    request_id: Vec::new(),
                    kind: Some(kind),
                },
                &mut fx,
            );
            assert!(r.error_code.is_empty(), "{r:?}");
            fx
        };
        // Node 2's checks agree: its score rises, published as it moves.
        let fx = cmd(
            &mut m,
            (0..20)
                .map(|_| incident(2, pb::Incident::CheckMatch))
                .collect(),
        );
        assert!(fx.nodes_changed.contains(&2));
        let n2 = m.nodes()[&2].reputation;
        assert!(n2 > 0.9, "{n2}");
        // One timeout moves the score less than a publishing step: nothing is published.
        let fx = cmd(&mut m, vec![incident(2, pb::Incident::Timeout)]);
        assert!(fx.nodes_changed.is_empty(), "{fx:?}");
        assert_eq!(m.nodes()[&2].reputation, n2);
        // Node 1's check disagrees: quarantined at once.
        let fx = cmd(&mut m, vec![incident(1, pb::Incident::CheckMismatch)]);
        assert!(fx.nodes_changed.contains(&1));
        assert_eq!(
            m.nodes()[&1].state,
            stellar_placement::NodeState::Quarantined
        );
        assert!(m.nodes()[&1].reputation < QUARANTINE_BELOW);
        assert_eq!(m.nodes()[&2].state, stellar_placement::NodeState::Ready);
        let s = &m.receipts().chain(1).unwrap().standing;
        assert_eq!((s.checks_mismatched, s.checks_matched), (1, 0));
        let back = StateMachine::from_snapshot(m.to_snapshot()).unwrap();
        assert_eq!(back.digest(), m.digest());
    }

    #[test]
    fn a_retried_usage_batch_is_applied_once() {
        let mut m = ledger();
        let batch = |m: &mut StateMachine, index: u64| {
            let kind = pb::command::Kind::Usage(pb::UsageCmd {
                unix_ms: T0,
                incidents: vec![pb::NodeIncident {
                    node: 2,
                    kind: pb::Incident::Timeout as i32,
                }],
                ..Default::default()
            });
            let r = m.apply(
                index,
                pb::Command {
                    request_id: b"batch-1".to_vec(),
                    kind: Some(kind),
                },
                &mut Effects::default(),
            );
            assert!(r.error_code.is_empty(), "{r:?}");
        };
        let index = m.applied_index() + 1;
        batch(&mut m, index);
        // The gateway's answer was lost and it sends the batch again: the same answer, no
        // second piece of evidence.
        batch(&mut m, index + 1);
        assert_eq!(m.receipts().chain(2).unwrap().standing.timeouts, 1);
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
