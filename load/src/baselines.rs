//! The placement rules StellarCloud is measured against, implemented in the same harness on
//! the same table, filters and scores, so only the choice of candidates differs.
//!
//! - `exhaustive`: score every feasible node (the quality optimum of the shared score).
//! - `kube-adaptive`: kube-scheduler's `percentageOfNodesToScore` rule: filter nodes in a
//!   rotating order until `max(100, N * max(5, 50 - N/125) / 100)` are feasible, score those.
//! - `nomad-log2`: Nomad's stack: nodes in random order, score the first `max(2, ceil(log2 N))`
//!   feasible. (Nomad shuffles the whole node list per evaluation; here a random start and a
//!   random stride coprime to N give the order in O(1), which only flatters Nomad.)
//! - `random`: a uniformly random feasible node.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use stellar_placement::{
    ConfigError, Diagnosis, NodeTable, Placement, PlacementError, PlacementRequest, Placer,
    PlacerConfig, ResolvedRequest, Score, Slot,
};

/// A placement algorithm under test.
pub trait Algorithm {
    /// Name in reports.
    fn name(&self) -> &'static str;
    /// Places every replica or task of `req`, reserving capacity, or nothing.
    fn place(
        &mut self,
        table: &mut NodeTable,
        req: &PlacementRequest,
    ) -> Result<Vec<Placement>, PlacementError>;
    /// A line about the work done, for the simulator's log.
    fn summary(&self) -> Option<String> {
        None
    }
}

/// StellarCloud's own placer.
pub struct Stellar(pub Placer);

impl Algorithm for Stellar {
    fn name(&self) -> &'static str {
        "stellar"
    }
    fn place(
        &mut self,
        table: &mut NodeTable,
        req: &PlacementRequest,
    ) -> Result<Vec<Placement>, PlacementError> {
        self.0.place(table, req)
    }
    fn summary(&self) -> Option<String> {
        let s = self.0.stats();
        let per = |x: u64| x as f64 / s.searches.max(1) as f64;
        let refused: Vec<String> = stellar_placement::FilterKind::ALL
            .iter()
            .filter(|k| s.refused_by[**k as usize] > 0)
            .map(|k| format!("{} {:.1}", k.name(), per(s.refused_by[*k as usize])))
            .collect();
        Some(format!(
            "{} searches; per search: {:.1} nodes visited, {:.1} scored, {:.2} units, \
             {:.2} zones; refused per search: {}",
            s.searches,
            per(s.nodes_visited),
            per(s.candidates_scored),
            per(s.units_probed),
            per(s.zones_expanded),
            refused.join(", ")
        ))
    }
}

/// Which baseline rule to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Score every feasible node.
    Exhaustive,
    /// kube-scheduler's adaptive percentage.
    KubeAdaptive,
    /// Nomad's log2 limit over a random order.
    NomadLog2,
    /// One random feasible node.
    Random,
}

/// A baseline: one rule, a resolver sharing the placer's scores, and the rule's own state.
pub struct Baseline {
    rule: Rule,
    resolver: Placer,
    rng: Pcg64Mcg,
    /// kube-scheduler's `nextStartNodeIndex`.
    next_start: u32,
}

impl Baseline {
    /// A baseline scoring with `config`'s weights, seeded for reproducibility.
    pub fn new(rule: Rule, config: PlacerConfig, seed: u64) -> Result<Self, ConfigError> {
        Ok(Baseline {
            rule,
            resolver: Placer::new(config, seed)?,
            rng: Pcg64Mcg::seed_from_u64(seed),
            next_start: 0,
        })
    }

    /// kube-scheduler's number of feasible nodes to find before scoring.
    pub fn kube_nodes_to_find(n: usize) -> usize {
        let pct = (50i64 - n as i64 / 125).max(5) as usize;
        (n * pct / 100).max(100)
    }

    /// Picks one node for `rr`, or `None` if no node is feasible.
    fn pick(&mut self, table: &NodeTable, rr: &ResolvedRequest) -> Option<(Slot, Score)> {
        let bound = table.slot_bound();
        if bound == 0 {
            return None;
        }
        let mut best: Option<(Slot, Score)> = None;
        let consider = |slot: Slot, best: &mut Option<(Slot, Score)>| {
            if let Some(s) = rr.score(table, slot)
                && best.is_none_or(|(_, b)| s.total > b.total)
            {
                *best = Some((slot, s));
            }
        };
        let feasible = |slot: Slot| rr.refusal(table, slot).is_none();
        match self.rule {
            Rule::Exhaustive => {
                // Order does not matter to a full scan: walk the records as they are stored.
                rr.for_each_feasible(table, |slot, s| {
                    if best.is_none_or(|(_, b)| s.total > b.total) {
                        best = Some((slot, s));
                    }
                });
            }
            Rule::KubeAdaptive => {
                // kube's node list interleaves zones; join order (slot order) does too here.
                let want = Self::kube_nodes_to_find(table.len());
                let start = self.next_start % bound;
                let mut found = 0;
                let mut processed = 0;
                while processed < bound && found < want {
                    let slot = Slot((start + processed) % bound);
                    processed += 1;
                    if feasible(slot) {
                        found += 1;
                        consider(slot, &mut best);
                    }
                }
                self.next_start = (start + processed) % bound;
            }
            Rule::NomadLog2 => {
                let want = self.resolver.sample_size(table.len());
                let start = self.rng.random_range(0..bound);
                let stride = coprime_stride(bound, &mut self.rng);
                let mut found = 0;
                for i in 0..bound {
                    let slot = Slot(
                        ((u64::from(start) + u64::from(i) * u64::from(stride)) % u64::from(bound))
                            as u32,
                    );
                    if feasible(slot) {
                        found += 1;
                        consider(slot, &mut best);
                        if found >= want {
                            break;
                        }
                    }
                }
            }
            Rule::Random => {
                for _ in 0..1000 {
                    let slot = Slot(self.rng.random_range(0..bound));
                    if feasible(slot) {
                        consider(slot, &mut best);
                        return best;
                    }
                }
                // Feasible nodes are rare: fall back to the first from a random start.
                let start = self.rng.random_range(0..bound);
                for i in 0..bound {
                    let slot = Slot((start + i) % bound);
                    if feasible(slot) {
                        consider(slot, &mut best);
                        break;
                    }
                }
            }
        }
        best
    }
}

/// A random stride in [1, n) coprime to n, so `start + i * stride mod n` visits every slot once.
fn coprime_stride(n: u32, rng: &mut Pcg64Mcg) -> u32 {
    if n <= 2 {
        return 1;
    }
    loop {
        let s = rng.random_range(1..n);
        if gcd(s, n) == 1 {
            return s;
        }
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Algorithm for Baseline {
    fn name(&self) -> &'static str {
        match self.rule {
            Rule::Exhaustive => "exhaustive",
            Rule::KubeAdaptive => "kube-adaptive",
            Rule::NomadLog2 => "nomad-log2",
            Rule::Random => "random",
        }
    }

    /// Places replicas and tasks one at a time (as kube-scheduler and Nomad do).
    fn place(
        &mut self,
        table: &mut NodeTable,
        req: &PlacementRequest,
    ) -> Result<Vec<Placement>, PlacementError> {
        let mut rr = self.resolver.resolve(table, req)?;
        let count = rr.count() as usize;
        let ask = rr.ask();
        let mut out: Vec<Placement> = Vec::with_capacity(count);
        for placed in 0..count {
            let Some((slot, score)) = self.pick(table, &rr) else {
                for p in &out {
                    table.release(p.node, &ask)?;
                }
                let diagnosis = Diagnosis::unexamined(table.len() as u64);
                return Err(if placed == 0 && count == 1 {
                    PlacementError::NoFeasibleNode(diagnosis)
                } else {
                    PlacementError::NotEnoughNodes {
                        wanted: count as u32,
                        found: placed as u32,
                        diagnosis,
                    }
                });
            };
            // `pick` only returns live slots, so the view exists.
            let Some((node, zone)) = table.node(slot).map(|v| (v.id, v.zone_id)) else {
                continue;
            };
            table.reserve(node, &ask)?;
            rr.avoid_slot(slot.0, zone.0);
            out.push(Placement {
                node,
                slot,
                zone,
                score,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_percentage_rule() {
        assert_eq!(Baseline::kube_nodes_to_find(50), 100);
        // 50 - 1000/125 = 42%.
        assert_eq!(Baseline::kube_nodes_to_find(1000), 420);
        // Floor of 5% for large clusters.
        assert_eq!(Baseline::kube_nodes_to_find(1_000_000), 50_000);
    }

    #[test]
    fn coprime_strides_visit_every_slot() {
        let mut rng = Pcg64Mcg::seed_from_u64(1);
        for n in [1u32, 2, 3, 10, 97, 1000] {
            let s = coprime_stride(n, &mut rng);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                seen[((u64::from(i) * u64::from(s)) % u64::from(n)) as usize] = true;
            }
            assert!(seen.iter().all(|x| *x), "n={n} stride={s}");
        }
    }
}
