//! Verification by re-execution (BOINC's adaptive replication, for single calls): after a
//! WebAssembly call succeeded, the gateway may run it again, with the same input and random
//! seed, on another node in good standing, and compare the two receipts' output hash, fuel
//! and exit code, which are deterministic. The outcome is evidence for the first node's
//! reputation; the re-run is billed to the platform (its ticket says `check`), never to the
//! tenant.
//!
//! ```text
//!  call on A answered ─▶ p(A) ─no─▶ done
//!                        │yes
//!                        ▼ (after the caller has its answer)
//!  another ready instance on B (reputation ≥ floor, past probation if any) ─▶ same call
//!  A's receipt = B's receipt (output, fuel, exit)? ─▶ CHECK_MATCH(A)    A's record + 1
//!                                                 └▶ CHECK_MISMATCH(A) A's record = 0
//!  p(A) = 1 while A's record < probation, then max(rate, (probation / record)³)
//! ```
//!
//! A node's record is this gateway's soft state: one it has not seen starts in probation
//! unless its committed reputation is already high (a node with a long record elsewhere).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use stellar_proto::v1 as pb;

use crate::hub::{Answered, Near, WorkerHub};
use crate::usage::UsageWriter;

/// How often calls are re-executed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckPolicy {
    /// Matching checks a node needs before its calls are sampled (every call before).
    pub probation: u64,
    /// The lowest share of a node's calls checked once its record is long.
    pub rate: f64,
    /// The reputation a checking node needs.
    pub checker_floor: f32,
    /// A node whose committed reputation is at least this starts past probation.
    pub trusted_from: f32,
}

impl Default for CheckPolicy {
    fn default() -> Self {
        CheckPolicy {
            probation: 100,
            rate: 0.01,
            checker_floor: 0.8,
            trusted_from: 0.95,
        }
    }
}

impl CheckPolicy {
    /// The share of calls checked for a node with `record` matching checks.
    pub fn probability(&self, record: u64) -> f64 {
        if record < self.probation {
            return 1.0;
        }
        (self.probation as f64 / record.max(1) as f64)
            .powi(3)
            .clamp(self.rate.min(1.0), 1.0)
    }
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct CheckStats {
    /// Checks run to the end.
    pub run: AtomicU64,
    /// Of them, matching.
    pub matched: AtomicU64,
    /// Of them, not matching.
    pub mismatched: AtomicU64,
    /// Checks wanted but not run (no other instance, or the re-run failed).
    pub skipped: AtomicU64,
}

/// The gateway's re-execution checks.
#[derive(Debug)]
pub struct Checks {
    policy: CheckPolicy,
    records: Mutex<HashMap<u64, u64>>,
    rng: Mutex<rand_pcg::Pcg64Mcg>,
    /// What the checks did.
    pub stats: CheckStats,
}

/// A call that may be checked: what it ran and what it answered.
#[derive(Debug, Clone)]
pub struct Checkable {
    /// (allocation, node) of the function's current version.
    pub allocations: Vec<(u64, u64)>,
    /// The call as sent (stdin, args, env) and its ticket's template.
    pub invocation: pb::Invocation,
    /// Its answer on the first node.
    pub answered: Answered,
    /// The call's timeout.
    pub timeout: Duration,
}

impl Checks {
    /// Checks by `policy`.
    pub fn new(policy: CheckPolicy) -> Checks {
        let mut seed = [0u8; 16];
        let _ = getrandom::fill(&mut seed);
        Checks {
            policy,
            records: Mutex::default(),
            rng: Mutex::new(rand_pcg::Pcg64Mcg::from_seed(seed)),
            stats: CheckStats::default(),
        }
    }

    /// Whether to check this call of `node` (committed reputation `reputation`).
    pub fn wanted(&self, node: u64, reputation: f32) -> bool {
        let record = {
            let Ok(mut r) = self.records.lock() else {
                return false;
            };
            *r.entry(node)
                .or_insert(if reputation >= self.policy.trusted_from {
                    self.policy.probation
                } else {
                    0
                })
        };
        let p = self.policy.probability(record);
        p >= 1.0 || self.rng.lock().is_ok_and(|mut g| g.random::<f64>() < p)
    }

    fn record(&self, node: u64, matched: bool) {
        if let Ok(mut r) = self.records.lock() {
            let e = r.entry(node).or_default();
            *e = if matched { *e + 1 } else { 0 };
        }
    }

    /// Runs the check of `c` on another node and reports the outcome (call it after the
    /// caller has its answer).
    pub async fn run(
        &self,
        hub: &WorkerHub,
        usage: &UsageWriter,
        reputation: impl Fn(u64) -> f32,
        c: Checkable,
    ) {
        let first = c.answered.node;
        let Some(original) = c.answered.result.receipt.clone() else {
            return;
        };
        // Checkers: other nodes in good standing, preferring those past probation.
        let records = self.records.lock().map(|r| r.clone()).unwrap_or_default();
        let eligible = |n: u64| n != first && reputation(n) >= self.policy.checker_floor;
        let seasoned = |n: u64| records.get(&n).copied().unwrap_or(0) >= self.policy.probation;
        let mut exclude: Vec<u64> = c
            .allocations
            .iter()
            .map(|&(_, n)| n)
            .filter(|&n| !eligible(n) || !seasoned(n))
            .collect();
        if hub
            .candidates(&c.allocations, &Near::default(), &exclude)
            .is_empty()
        {
            exclude = c
                .allocations
                .iter()
                .map(|&(_, n)| n)
                .filter(|&n| !eligible(n))
                .collect();
        }
        exclude.push(first);
        let mut inv = c.invocation;
        inv.random_seed = c.answered.seed.clone();
        if let Some(t) = inv.ticket.as_mut() {
            t.check = true;
        }
        let Some((checker, theirs)) = rerun(hub, &c.allocations, &exclude, &inv, c.timeout).await
        else {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.stats.run.fetch_add(1, Ordering::Relaxed);
        if same(&original, &theirs) {
            self.stats.matched.fetch_add(1, Ordering::Relaxed);
            self.record(first, true);
            usage.incident(first, pb::Incident::CheckMatch);
            return;
        }
        self.stats.mismatched.fetch_add(1, Ordering::Relaxed);
        // Two answers disagree: a third node says which one lied.
        exclude.extend([checker, first]);
        exclude.sort_unstable();
        exclude.dedup();
        let third = rerun(hub, &c.allocations, &exclude, &inv, c.timeout).await;
        let liar = match third {
            Some((_, r)) if same(&r, &original) => Some(checker),
            Some((_, r)) if same(&r, &theirs) => Some(first),
            // No third node (or a third answer): believe a seasoned checker over a node
            // still on probation, else blame no one.
            _ => (seasoned(checker) && !seasoned(first)).then_some(first),
        };
        tracing::warn!(
            node = format!("{first:016x}"),
            checker = format!("{checker:016x}"),
            fuel = original.fuel,
            checker_fuel = theirs.fuel,
            liar = liar.map(|n| format!("{n:016x}")),
            "a re-execution check disagreed"
        );
        if let Some(liar) = liar {
            self.record(liar, false);
            usage.incident(liar, pb::Incident::CheckMismatch);
            let honest = if liar == first { checker } else { first };
            usage.incident(honest, pb::Incident::CheckMatch);
        }
    }
}

/// Whether two receipts of the same call agree (output, fuel and exit code are
/// deterministic for a WebAssembly call with the same input and seed).
fn same(a: &pb::Receipt, b: &pb::Receipt) -> bool {
    a.output_sha256 == b.output_sha256 && a.fuel == b.fuel && a.exit_code == b.exit_code
}

/// Runs `inv` again on a node not in `exclude`; the node and its receipt.
async fn rerun(
    hub: &WorkerHub,
    allocations: &[(u64, u64)],
    exclude: &[u64],
    inv: &pb::Invocation,
    timeout: Duration,
) -> Option<(u64, pb::Receipt)> {
    let a = hub
        .invoke(allocations, &Near::default(), exclude, inv.clone(), timeout)
        .await
        .ok()?;
    Some((a.node, a.result.receipt?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probation_checks_every_call_then_checks_thin_out_and_a_mismatch_resets() {
        let p = CheckPolicy::default();
        assert_eq!(p.probability(0), 1.0);
        assert_eq!(p.probability(99), 1.0);
        assert_eq!(p.probability(200), 0.125);
        assert_eq!(p.probability(1_000_000), 0.01);
        let checks = Checks::new(p);
        assert!(
            (0..50).all(|_| checks.wanted(7, 0.8)),
            "a new node: every call"
        );
        for _ in 0..100_000 {
            checks.record(7, true);
        }
        let sampled = (0..10_000).filter(|_| checks.wanted(7, 0.8)).count();
        assert!((50..200).contains(&sampled), "{sampled} of 10,000");
        checks.record(7, false);
        assert!(
            checks.wanted(7, 0.8),
            "a mismatch puts it back on probation"
        );
        // A node with a high committed reputation starts past probation.
        let trusted = (0..1000).filter(|_| checks.wanted(8, 0.99)).count();
        assert_eq!(
            trusted, 1000,
            "at the end of probation: p = 1 until its record grows"
        );
    }
}
