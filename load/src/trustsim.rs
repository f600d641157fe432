//! The trust policy at fleet scale: the gateways' re-execution checks
//! (`stellar_gateway::checks::CheckPolicy`) and the ledger's reputation
//! (`stellar_scheduler::state::Standing`), the very code the cluster runs, over a simulated
//! fleet of honest nodes and cheaters.
//!
//! ```text
//!  each node serves C calls (C uniform in [C/2, 3C/2]); honest ones time out on a share
//!  next checked call: a geometric skip with the policy's p(record) (a million nodes cost
//!  only their checks) ─▶ cheated? ─no─▶ CHECK_MATCH, record + 1
//!                                  └yes▶ CHECK_MISMATCH (+ a tie-break run), record = 0
//!  receipt-level cheats (replay, other tenant, other node) are refused at the first one
//!  quarantined when the standing's score < 0.3 ─▶ the calls it served so far: its
//!  invocations to detection
//! ```
//!
//! Figures: invocations to detection (p50, p99) per kind, re-execution overhead (check and
//! tie-break runs ÷ billed calls, fleet-wide), false quarantines (honest nodes), cheaters
//! never caught within their calls.

use rand::{Rng, SeedableRng};
use stellar_gateway::checks::CheckPolicy;
use stellar_scheduler::state::{QUARANTINE_BELOW, Standing};

/// How a cheater cheats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cheat {
    /// Returns a made-up output on this share of calls.
    WrongOutput(f64),
    /// Signs 10% more fuel than it used on this share of calls.
    InflateFuel(f64),
    /// Sends a forged, replayed or another node's receipt on this share of calls (refused
    /// at the first: it is signed proof).
    ForgedReport(f64),
}

impl Cheat {
    /// Its name in the report.
    pub fn name(&self) -> String {
        match self {
            Cheat::WrongOutput(r) => format!("wrong-output:{r}"),
            Cheat::InflateFuel(r) => format!("inflate-fuel:{r}"),
            Cheat::ForgedReport(r) => format!("forged-report:{r}"),
        }
    }

    fn rate(&self) -> f64 {
        match *self {
            Cheat::WrongOutput(r) | Cheat::InflateFuel(r) | Cheat::ForgedReport(r) => r,
        }
    }
}

/// The simulated fleet.
#[derive(Debug, Clone)]
pub struct TrustSimConfig {
    /// Nodes in the fleet.
    pub nodes: usize,
    /// The share of them that cheat (split evenly over `cheats`).
    pub cheater_share: f64,
    /// The cheats played.
    pub cheats: Vec<Cheat>,
    /// Mean calls a node serves in the simulated time.
    pub calls_per_node: u64,
    /// The share of an honest node's calls that time out (a flaky home line).
    pub timeout_rate: f64,
    /// The gateways' check policy.
    pub policy: CheckPolicy,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for TrustSimConfig {
    fn default() -> Self {
        TrustSimConfig {
            nodes: 1_000_000,
            cheater_share: 0.01,
            cheats: vec![
                Cheat::WrongOutput(0.05),
                Cheat::InflateFuel(0.05),
                Cheat::InflateFuel(1.0),
                Cheat::ForgedReport(0.05),
            ],
            calls_per_node: 10_000,
            timeout_rate: 0.02,
            policy: CheckPolicy::default(),
            seed: 1,
        }
    }
}

/// One cheat kind's detection figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KindReport {
    /// The cheat.
    pub kind: String,
    /// Cheaters playing it.
    pub cheaters: usize,
    /// Of them, quarantined within their calls.
    pub caught: usize,
    /// Calls a caught cheater served until quarantined, median.
    pub invocations_to_detection_p50: u64,
    /// Its 99th percentile (over the caught).
    pub invocations_to_detection_p99: u64,
    /// The share caught within 100 of their calls.
    pub caught_within_100: f64,
}

/// What the simulation measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrustSimReport {
    /// Nodes simulated.
    pub nodes: usize,
    /// Billed calls, fleet-wide.
    pub billed_calls: u64,
    /// Re-execution runs (checks and tie-breaks) ÷ billed calls.
    pub reexecution_overhead: f64,
    /// Honest nodes quarantined.
    pub false_quarantines: usize,
    /// Per cheat kind.
    pub kinds: Vec<KindReport>,
    /// Wall time of the simulation, ms.
    pub elapsed_ms: u64,
}

/// What happened to one node.
struct Outcome {
    served: u64,
    runs: u64,
    quarantined: bool,
}

/// Calls until the next checked one (inclusive) when each is checked with probability `p`.
fn next_check(rng: &mut rand_pcg::Pcg64Mcg, p: f64) -> u64 {
    if p >= 1.0 {
        return 1;
    }
    if p <= 0.0 {
        return u64::MAX;
    }
    let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    1 + (u.ln() / (1.0 - p).ln()).floor() as u64
}

fn simulate_node(
    cfg: &TrustSimConfig,
    cheat: Option<Cheat>,
    rng: &mut rand_pcg::Pcg64Mcg,
) -> Outcome {
    let calls = rng.random_range(cfg.calls_per_node / 2..=cfg.calls_per_node * 3 / 2);
    let (mut served, mut runs, mut record) = (0u64, 0u64, 0u64);
    let mut standing = Standing::default();
    // A receipt-level cheat is refused at its first forged report.
    let forged_at = match cheat {
        Some(Cheat::ForgedReport(r)) => next_check(rng, r),
        _ => u64::MAX,
    };
    loop {
        let k = next_check(rng, cfg.policy.probability(record));
        let next = served.saturating_add(k);
        if forged_at <= next.min(calls) {
            standing.add(stellar_scheduler::state::Evidence::Refused, 0);
            return Outcome {
                served: forged_at,
                runs,
                quarantined: true,
            };
        }
        if next > calls {
            served = calls;
            break;
        }
        served = next;
        runs += 1;
        let cheated = match cheat {
            Some(c @ (Cheat::WrongOutput(_) | Cheat::InflateFuel(_))) => {
                rng.random::<f64>() < c.rate()
            }
            _ => false,
        };
        if cheated {
            runs += 1; // the tie-break
            record = 0;
            standing.add(stellar_scheduler::state::Evidence::CheckMismatch, 0);
            if standing.score() < QUARANTINE_BELOW {
                return Outcome {
                    served,
                    runs,
                    quarantined: true,
                };
            }
        } else {
            record += 1;
            standing.add(stellar_scheduler::state::Evidence::CheckMatch, 0);
        }
    }
    // The rest of the evidence, in bulk: receipts recorded and (honest) timeouts.
    let timeouts = if cheat.is_none() {
        (served as f64 * cfg.timeout_rate).round()
    } else {
        0.0
    };
    standing.good += 0.05 * served as f64;
    standing.bad += 0.25 * timeouts;
    Outcome {
        served,
        runs,
        quarantined: standing.score() < QUARANTINE_BELOW,
    }
}

/// The `q` quantile of sorted counts (0 when empty).
pub(crate) fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Runs the simulation.
pub fn run(cfg: &TrustSimConfig) -> TrustSimReport {
    let start = stellar_proto::clock::now();
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(cfg.seed);
    let cheaters = ((cfg.nodes as f64) * cfg.cheater_share).round() as usize;
    let mut detections: Vec<Vec<u64>> = vec![Vec::new(); cfg.cheats.len()];
    let mut counts = vec![0usize; cfg.cheats.len()];
    let (mut billed, mut runs, mut false_quarantines) = (0u64, 0u64, 0usize);
    for i in 0..cfg.nodes {
        let kind = (i < cheaters && !cfg.cheats.is_empty()).then(|| i % cfg.cheats.len());
        let o = simulate_node(cfg, kind.map(|k| cfg.cheats[k]), &mut rng);
        billed += o.served;
        runs += o.runs;
        match kind {
            Some(k) => {
                counts[k] += 1;
                if o.quarantined {
                    detections[k].push(o.served);
                }
            }
            None => false_quarantines += usize::from(o.quarantined),
        }
    }
    let kinds = cfg
        .cheats
        .iter()
        .zip(detections)
        .zip(counts)
        .map(|((c, mut d), n)| {
            d.sort_unstable();
            KindReport {
                kind: c.name(),
                cheaters: n,
                caught: d.len(),
                invocations_to_detection_p50: percentile(&d, 0.5),
                invocations_to_detection_p99: percentile(&d, 0.99),
                caught_within_100: if n == 0 {
                    0.0
                } else {
                    d.iter().filter(|&&x| x <= 100).count() as f64 / n as f64
                },
            }
        })
        .collect();
    TrustSimReport {
        nodes: cfg.nodes,
        billed_calls: billed,
        reexecution_overhead: if billed == 0 {
            0.0
        } else {
            runs as f64 / billed as f64
        },
        false_quarantines,
        kinds,
        elapsed_ms: start.elapsed().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cheaters_are_caught_honest_nodes_are_not_and_the_same_seed_gives_the_same_figures() {
        let cfg = TrustSimConfig {
            nodes: 20_000,
            cheater_share: 0.05,
            calls_per_node: 2_000,
            ..Default::default()
        };
        let r = run(&cfg);
        assert_eq!(r.false_quarantines, 0, "{r:?}");
        for k in &r.kinds {
            assert!(k.caught as f64 >= 0.99 * k.cheaters as f64, "{k:?}");
        }
        // Probation checks every call of a new node: the overhead is at least 100 runs
        // in 2,000 calls, and the thinning keeps it well under one run per call.
        assert!(
            r.reexecution_overhead > 0.05 && r.reexecution_overhead < 0.5,
            "{r:?}"
        );
        let again = run(&cfg);
        assert_eq!(
            (again.billed_calls, again.kinds.clone()),
            (r.billed_calls, r.kinds.clone())
        );
    }
}
