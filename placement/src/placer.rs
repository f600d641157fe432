//! One placement decision: find feasible candidates nearest-first, score a bounded sample,
//! select, and reserve.
//!
//! The candidate source is a best-first walk over *units* — one zone's feasible classes in one
//! height tier — keyed by a lower bound on latency from the origin (distance to the zone's
//! centroid plus the tier's floor). Inside a unit, nodes are probed from a random position
//! (seeded RNG) along records stored back to back, until `k` feasible candidates are
//! scored (the limit stage; `k = max(2, ceil(log2 N))` by default, Nomad's rule). A decision
//! therefore touches a few dozen nodes however large the table is. Only when the visit budget
//! runs out with nothing feasible does the walk go on to the end, so a refusal is exact.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::error::{PlacementError, Result};
use crate::node::NodeId;
use crate::request::{PlacementRequest, RequestError, ResolvedRequest, WorkloadKind};
use crate::stages::{Diagnosis, FilterKind, Score, Weights};
use crate::table::{Loc, NodeTable, Slot, TIER_FLOOR_MS, TIERS, ZoneId};
use crate::vivaldi::Coordinate;

/// Extra key (ms) for zones that already hold a replica: visited after every other zone
/// within a second, which is what "preferably distinct zones" means here.
const SPREAD_PENALTY_MS: f32 = 1000.0;
/// Records prefetched per run (a decision wants ~20 at a million nodes).
const CHUNK: usize = 32;

/// How many feasible candidates one decision scores (the limit stage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleSize {
    /// `max(2, ceil(log2 N))` for a table of N nodes (Nomad's rule).
    Log2,
    /// A fixed number (at least 1).
    Fixed(usize),
}

/// Tunables of the placer; the defaults are documented on each field.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlacerConfig {
    /// Feasible candidates scored per decision (default `Log2`).
    pub sample: SampleSize,
    /// Sparrow's probe ratio `d`: a batch of m tasks scores `max(k, d·m)` candidates (default 2).
    pub batch_probe_ratio: f32,
    /// Nodes visited per wanted candidate before the walk settles for what it has (default 64).
    pub visit_budget_per_candidate: usize,
    /// Scorer weights.
    pub weights: Weights,
    /// RTT (ms) at which the latency score is 0.5 (default 20).
    pub latency_scale_ms: f32,
    /// Reputation floor for requests that set none (default 0.5).
    pub min_reputation: f32,
}

/// A placer configuration that would make scores meaningless.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A weight is negative, NaN or infinite, or all weights are zero.
    #[error("scorer weights must be finite and non-negative, and not all zero: {0:?}")]
    Weights(Weights),
    /// The latency scale is not a positive number.
    #[error("latency_scale_ms must be a positive number, got {0}")]
    LatencyScale(f32),
    /// The default reputation floor is outside [0, 1].
    #[error("min_reputation must be within [0, 1], got {0}")]
    MinReputation(f32),
    /// The batch probe ratio is below 1 or not finite.
    #[error("batch_probe_ratio must be a number of at least 1, got {0}")]
    ProbeRatio(f32),
    /// A fixed sample size of zero, or a zero visit budget.
    #[error("sample size and visit budget must be at least 1")]
    ZeroLimit,
}

impl PlacerConfig {
    /// Checks the configuration; `Placer::new` refuses what this refuses.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let w = &self.weights;
        let all = [w.latency, w.reputation, w.fit, w.zone_spread, w.bandwidth];
        if all.iter().any(|x| !x.is_finite() || *x < 0.0) || all.iter().all(|x| *x == 0.0) {
            return Err(ConfigError::Weights(*w));
        }
        if !(self.latency_scale_ms.is_finite() && self.latency_scale_ms > 0.0) {
            return Err(ConfigError::LatencyScale(self.latency_scale_ms));
        }
        if !(self.min_reputation.is_finite() && (0.0..=1.0).contains(&self.min_reputation)) {
            return Err(ConfigError::MinReputation(self.min_reputation));
        }
        if !(self.batch_probe_ratio.is_finite() && self.batch_probe_ratio >= 1.0) {
            return Err(ConfigError::ProbeRatio(self.batch_probe_ratio));
        }
        if self.sample == SampleSize::Fixed(0) || self.visit_budget_per_candidate == 0 {
            return Err(ConfigError::ZeroLimit);
        }
        Ok(())
    }
}

impl Default for PlacerConfig {
    fn default() -> Self {
        PlacerConfig {
            sample: SampleSize::Log2,
            batch_probe_ratio: 2.0,
            visit_budget_per_candidate: 64,
            weights: Weights::default(),
            latency_scale_ms: 20.0,
            min_reputation: 0.5,
        }
    }
}

/// Where one replica or task goes, and why it scored as it did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placement {
    /// The chosen node.
    pub node: NodeId,
    /// Its slot in the table the decision ran on.
    pub slot: Slot,
    /// Its zone.
    pub zone: ZoneId,
    /// Its score breakdown at decision time.
    pub score: Score,
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    slot: u32,
    /// Where the record was when scored (a hint: batch commits may move records).
    loc: Loc,
    score: Score,
}

/// Buffers reused across decisions so the hot path does not allocate.
#[derive(Clone, Debug, Default)]
struct Scratch {
    heap: BinaryHeap<Reverse<u64>>,
    /// Feasible class ids of every expanded zone, back to back.
    zone_classes: Vec<u32>,
    /// `(start, len)` into `zone_classes` per expanded zone.
    zones: Vec<(u32, u32)>,
    candidates: Vec<Candidate>,
}

/// Running totals of the search's work, for dashboards and for tuning the index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchStats {
    /// Searches run (one per replica of a function, one per batch).
    pub searches: u64,
    /// Nodes probed by the node filters.
    pub nodes_visited: u64,
    /// Feasible nodes scored.
    pub candidates_scored: u64,
    /// Zone-tier units probed.
    pub units_probed: u64,
    /// Zones whose classes were filtered.
    pub zones_expanded: u64,
    /// Probed nodes refused, per node filter (indexed by `FilterKind as usize`).
    pub refused_by: [u64; FilterKind::ALL.len()],
}

/// Makes placement decisions against a [`NodeTable`]; deterministic for a given seed.
#[derive(Clone, Debug)]
pub struct Placer {
    config: PlacerConfig,
    rng: Pcg64Mcg,
    scratch: Scratch,
    diagnosis: Diagnosis,
    stats: SearchStats,
}

impl Placer {
    /// A placer whose random choices all follow from `seed`; refuses an invalid config.
    pub fn new(config: PlacerConfig, seed: u64) -> std::result::Result<Self, ConfigError> {
        config.validate()?;
        Ok(Placer {
            config,
            rng: Pcg64Mcg::seed_from_u64(seed),
            scratch: Scratch::default(),
            diagnosis: Diagnosis::default(),
            stats: SearchStats::default(),
        })
    }

    /// Work done by all searches so far.
    pub fn stats(&self) -> SearchStats {
        self.stats
    }

    /// The configuration in force.
    pub fn config(&self) -> &PlacerConfig {
        &self.config
    }

    /// Checks a request against `table` with this placer's weights and defaults.
    pub fn resolve(
        &self,
        table: &NodeTable,
        req: &PlacementRequest,
    ) -> std::result::Result<ResolvedRequest, RequestError> {
        ResolvedRequest::resolve(
            table,
            req,
            self.config.weights,
            self.config.latency_scale_ms,
            self.config.min_reputation,
        )
    }

    /// The number of feasible candidates a decision scores in a table of `nodes` nodes.
    pub fn sample_size(&self, nodes: usize) -> usize {
        match self.config.sample {
            SampleSize::Fixed(n) => n.max(1),
            SampleSize::Log2 => {
                let log2 = usize::BITS - nodes.saturating_sub(1).leading_zeros();
                (log2 as usize).max(2)
            }
        }
    }

    /// Places every replica or task of `req` and reserves their capacity, or reserves nothing.
    pub fn place(
        &mut self,
        table: &mut NodeTable,
        req: &PlacementRequest,
    ) -> Result<Vec<Placement>> {
        table.ensure_zone_order();
        let mut rr = self.resolve(table, req)?;
        let k = self.sample_size(table.len());
        let count = rr.count as usize;
        if count > table.len() {
            return Err(RequestError::CountExceedsNodes {
                count: rr.count,
                nodes: table.len(),
            }
            .into());
        }
        let mut out = Vec::with_capacity(count);
        match rr.kind {
            WorkloadKind::Function => {
                // One replica at a time, each steering away from the nodes and zones taken.
                for placed in 0..count {
                    self.search(table, &rr, k, 1);
                    let Some(best) = self.best_candidate() else {
                        Self::rollback(table, &out, &rr);
                        return Err(self.shortfall(rr.count, placed));
                    };
                    let p = match Self::commit(table, best, &rr) {
                        Ok(p) => p,
                        Err(e) => {
                            Self::rollback(table, &out, &rr);
                            return Err(e);
                        }
                    };
                    rr.avoid_slot(p.slot.0, p.zone.0);
                    out.push(p);
                }
            }
            WorkloadKind::Batch => {
                // Sparrow batch sampling: score d·m candidates, keep the best m.
                let probes =
                    (self.config.batch_probe_ratio.max(1.0) * count as f32).ceil() as usize;
                self.search(table, &rr, probes.max(k).max(count), count);
                let found = self.scratch.candidates.len();
                if found < count {
                    return Err(self.shortfall(rr.count, found));
                }
                let cands = &mut self.scratch.candidates;
                cands.sort_unstable_by(|a, b| {
                    b.score
                        .total
                        .total_cmp(&a.score.total)
                        .then(a.slot.cmp(&b.slot))
                });
                cands.truncate(count);
                for i in 0..count {
                    let c = self.scratch.candidates[i];
                    match Self::commit(table, c, &rr) {
                        Ok(p) => out.push(p),
                        Err(e) => {
                            Self::rollback(table, &out, &rr);
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn best_candidate(&self) -> Option<Candidate> {
        let mut best: Option<Candidate> = None;
        for c in &self.scratch.candidates {
            if best.is_none_or(|b| c.score.total > b.score.total) {
                best = Some(*c);
            }
        }
        best
    }

    fn commit(table: &mut NodeTable, c: Candidate, rr: &ResolvedRequest) -> Result<Placement> {
        let (node, zone) = table.reserve_at(c.slot, c.loc, &rr.ask)?;
        Ok(Placement {
            node,
            slot: Slot(c.slot),
            zone: ZoneId(zone),
            score: c.score,
        })
    }

    fn rollback(table: &mut NodeTable, placed: &[Placement], rr: &ResolvedRequest) {
        for p in placed {
            table.release_slot(p.slot, &rr.ask);
        }
    }

    fn shortfall(&self, wanted: u32, found: usize) -> PlacementError {
        if found == 0 && wanted == 1 {
            PlacementError::NoFeasibleNode(self.diagnosis.clone())
        } else {
            PlacementError::NotEnoughNodes {
                wanted,
                found: found as u32,
                diagnosis: self.diagnosis.clone(),
            }
        }
    }

    /// Fills `scratch.candidates` with up to `want` scored feasible nodes, nearest-first; past
    /// the visit budget it stops as soon as it holds `need`.
    fn search(&mut self, table: &NodeTable, rr: &ResolvedRequest, want: usize, need: usize) {
        let Placer {
            config,
            rng,
            scratch: s,
            diagnosis,
            stats,
        } = self;
        stats.searches += 1;
        s.candidates.clear();
        s.heap.clear();
        s.zone_classes.clear();
        s.zones.clear();
        diagnosis.reset(table.len() as u64);
        if table.is_empty() {
            return;
        }
        let walk = Walk {
            table,
            rr,
            want,
            need,
            budget: want.saturating_mul(config.visit_budget_per_candidate),
        };
        let home_zone = rr.origin_zone.unwrap_or_else(|| random_zone(table, rng));
        let home = table.zones[home_zone as usize].centroid();
        let order = table.zones_near(home_zone);
        // Zone keys are distances from the origin, or from the home zone without one.
        let from = rr.origin.unwrap_or(Coordinate {
            vec: home,
            height_ms: 0.0,
        });
        let mut next = 0;
        let mut visits = 0;
        loop {
            // Expand zones lazily, while they might hold units better than the best queued.
            while let Some(&z) = order.get(next) {
                let zone = &table.zones[z as usize];
                if zone.count == 0 {
                    next += 1;
                    continue;
                }
                let mut key = from.vec_distance_ms(&zone.centroid());
                // A penalised zone is expanded at once: its units sink to the bottom of the
                // heap, and it must not hold back the nearer zones behind it in the order.
                let penalised = rr.avoid_zones.binary_search(&z).is_ok();
                if penalised {
                    key += SPREAD_PENALTY_MS;
                } else if s
                    .heap
                    .peek()
                    .is_some_and(|Reverse(top)| key > unit_key(*top))
                {
                    break;
                }
                next += 1;
                stats.zones_expanded += 1;
                walk.expand_zone(z, key, s, diagnosis);
            }
            let Some(Reverse(unit)) = s.heap.pop() else {
                break;
            };
            stats.units_probed += 1;
            if walk.probe_unit(unit, &mut visits, rng, s, diagnosis) {
                break;
            }
        }
        stats.nodes_visited += visits as u64;
        stats.candidates_scored += s.candidates.len() as u64;
        for kind in FilterKind::ALL.into_iter().filter(|k| k.is_node_level()) {
            stats.refused_by[kind as usize] += diagnosis.removed_by(kind);
        }
    }
}

/// The fixed inputs of one search.
struct Walk<'a> {
    table: &'a NodeTable,
    rr: &'a ResolvedRequest,
    want: usize,
    need: usize,
    budget: usize,
}

impl Walk<'_> {
    /// Runs the class filters over a zone and queues one unit per non-empty height tier.
    fn expand_zone(&self, z: u16, key: f32, s: &mut Scratch, diagnosis: &mut Diagnosis) {
        let zone = &self.table.zones[z as usize];
        let start = s.zone_classes.len();
        for &c in &zone.classes {
            let class = &self.table.classes[c as usize];
            let n = class.len();
            if n == 0 {
                continue;
            }
            match self.rr.class_refusal(self.table, class) {
                Some(kind) => diagnosis.add(kind, n as u64),
                None => s.zone_classes.push(c),
            }
        }
        let len = s.zone_classes.len() - start;
        if len == 0 {
            return;
        }
        let rec = s.zones.len() as u64;
        s.zones.push((start as u32, len as u32));
        let occupied = s.zone_classes[start..]
            .iter()
            .fold(0u16, |m, &c| m | self.table.classes[c as usize].occupied());
        for (tier, floor) in TIER_FLOOR_MS.iter().enumerate() {
            if occupied & (1 << tier) != 0 {
                let k = (key + floor).max(0.0);
                s.heap.push(Reverse(
                    (u64::from(k.to_bits()) << 32) | (rec << 8) | tier as u64,
                ));
            }
        }
    }

    /// Probes one unit from a random position; true when the search is done.
    fn probe_unit(
        &self,
        unit: u64,
        visits: &mut usize,
        rng: &mut Pcg64Mcg,
        s: &mut Scratch,
        diagnosis: &mut Diagnosis,
    ) -> bool {
        let rec = ((unit >> 8) & 0xFF_FFFF) as usize;
        let tier = (unit & 0xFF) as usize;
        debug_assert!(tier < TIERS);
        let (start, len) = s.zones[rec];
        let classes = &s.zone_classes[start as usize..(start + len) as usize];
        let bucket = |ci: usize| self.table.classes[classes[ci] as usize].tier(tier);
        let total: usize = (0..classes.len()).map(|ci| bucket(ci).len()).sum();
        if total == 0 {
            return false;
        }
        let mut pos = rng.random_range(0..total);
        let mut ci = 0;
        while pos >= bucket(ci).len() {
            pos -= bucket(ci).len();
            ci += 1;
        }
        let mut remaining = total;
        while remaining > 0 {
            // A run of records stored back to back: prefetch it whole, then judge each.
            let b = bucket(ci);
            let take = (b.len() - pos).min(CHUNK).min(remaining);
            let run = &b[pos..pos + take];
            for node in run {
                prefetch(node);
            }
            for (i, node) in run.iter().enumerate() {
                *visits += 1;
                match self.rr.node_refusal(node, node.slot) {
                    Some(kind) => diagnosis.add(kind, 1),
                    None => s.candidates.push(Candidate {
                        slot: node.slot,
                        loc: Loc::new(classes[ci], tier as u8, (pos + i) as u32),
                        score: self.rr.score_node(self.table, node),
                    }),
                }
                let have = s.candidates.len();
                if have >= self.want || (*visits >= self.budget && have >= self.need) {
                    return true;
                }
            }
            pos += take;
            remaining -= take;
            if pos >= b.len() {
                pos = 0;
                ci = (ci + 1) % classes.len();
            }
        }
        false
    }
}

#[inline]
fn unit_key(unit: u64) -> f32 {
    f32::from_bits((unit >> 32) as u32)
}

/// A zone drawn with probability proportional to its size (for requests without an origin).
fn random_zone(table: &NodeTable, rng: &mut Pcg64Mcg) -> u16 {
    let mut r = rng.random_range(0..table.len());
    for (i, z) in table.zones.iter().enumerate() {
        if r < z.count as usize {
            return i as u16;
        }
        r -= z.count as usize;
    }
    0
}

/// Asks the CPU to start loading a node record, so the misses of a window overlap.
#[inline(always)]
#[allow(unsafe_code)]
fn prefetch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: SSE is part of the x86_64 baseline, and a prefetch is only a hint: it never
        // faults and `p` is a valid reference anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((p as *const T).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{
        Arch, ArchSet, Bandwidth, NodeSpec, NodeState, Resources, Runtime, RuntimeSet,
    };
    use crate::request::{Fit, LabelConstraint, LabelOp, Origin};
    use crate::stages::FilterKind;
    use crate::vivaldi::Coordinate;

    /// A node in `zone` at x = `x` ms with access height `h` ms.
    fn node(id: u64, zone: &str, x: f32, h: f32) -> NodeSpec {
        NodeSpec {
            id: NodeId(id),
            region: if x < 50.0 { "east" } else { "west" }.into(),
            zone: zone.into(),
            arch: Arch::X86_64,
            runtimes: RuntimeSet::WASM_AND_CONTAINER,
            capacity: Resources::new(2000, 2048, 10_000),
            free: Resources::new(2000, 2048, 10_000),
            bandwidth: Bandwidth {
                uplink_kbps: 20_000,
                downlink_kbps: 100_000,
            },
            reputation: 0.9,
            labels: vec![(
                "isp".into(),
                if id.is_multiple_of(2) {
                    "telecom"
                } else {
                    "unicom"
                }
                .into(),
            )],
            coordinate: Coordinate {
                vec: [x, 0.0, 0.0],
                height_ms: h,
            },
            state: NodeState::Ready,
        }
    }

    /// 3 zones: a (x=0), b (x=10), c (x=100); heights spread 1..40 ms.
    fn table() -> NodeTable {
        let mut t = NodeTable::new();
        let mut id = 0;
        for (zone, x) in [("a", 0.0), ("b", 10.0), ("c", 100.0)] {
            for i in 0..200 {
                t.join(node(
                    id,
                    zone,
                    x + (i % 5) as f32 * 0.1,
                    1.0 + (i % 40) as f32,
                ))
                .unwrap();
                id += 1;
            }
        }
        t
    }

    fn near(x: f32) -> Origin {
        Origin::Coordinate(Coordinate {
            vec: [x, 0.0, 0.0],
            height_ms: 5.0,
        })
    }

    #[test]
    fn picks_a_fast_node_in_the_nearest_zone() {
        let mut t = table();
        let mut p = Placer::new(PlacerConfig::default(), 1).unwrap();
        let req = PlacementRequest {
            origin: near(99.0),
            ..Default::default()
        };
        let out = p.place(&mut t, &req).unwrap();
        assert_eq!(out.len(), 1);
        let v = t.node(out[0].slot).unwrap();
        assert_eq!(v.zone, "c");
        assert!(
            v.coordinate.height_ms < 2.0,
            "height {}",
            v.coordinate.height_ms
        );
        assert!(out[0].score.est_rtt_ms < 10.0, "{:?}", out[0].score);
        t.check_invariants().unwrap();
    }

    #[test]
    fn reservations_prevent_overcommit() {
        let mut t = NodeTable::new();
        t.join(node(1, "a", 0.0, 1.0)).unwrap();
        t.join(node(2, "a", 0.0, 30.0)).unwrap();
        let mut p = Placer::new(PlacerConfig::default(), 1).unwrap();
        let req = PlacementRequest {
            cpu_cores: 1.5,
            ..Default::default()
        };
        let a = p.place(&mut t, &req).unwrap()[0].node;
        let b = p.place(&mut t, &req).unwrap()[0].node;
        assert_ne!(a, b, "the second decision must see the first reservation");
        let err = p.place(&mut t, &req).unwrap_err();
        match err {
            PlacementError::NoFeasibleNode(d) => {
                assert_eq!(d.removed_by(FilterKind::Cpu), 2);
                assert!(
                    d.to_string()
                        .starts_with("0/2 nodes are available: 2 Insufficient cpu")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        t.release(a, &Resources::new(1500, 128, 0)).unwrap();
        assert_eq!(p.place(&mut t, &req).unwrap()[0].node, a);
    }

    #[test]
    fn refusal_counts_every_node_once() {
        let mut t = table();
        t.set_state(NodeId(0), NodeState::Down).unwrap();
        let mut p = Placer::new(PlacerConfig::default(), 1).unwrap();
        let req = PlacementRequest {
            runtime: Runtime::Container,
            arch: ArchSet::only(Arch::Aarch64),
            ..Default::default()
        };
        let Err(PlacementError::NoFeasibleNode(d)) = p.place(&mut t, &req) else {
            panic!("expected a refusal");
        };
        assert_eq!(d.total, 600);
        assert_eq!(d.removed_total(), 600);
        assert_eq!(d.removed_by(FilterKind::Arch), 600);

        let req = PlacementRequest {
            memory_mib: 4096.0,
            labels: vec![LabelConstraint {
                key: "isp".into(),
                op: LabelOp::Equals("telecom".into()),
            }],
            ..Default::default()
        };
        let Err(PlacementError::NoFeasibleNode(d)) = p.place(&mut t, &req) else {
            panic!("expected a refusal");
        };
        assert_eq!(d.removed_by(FilterKind::Labels), 300);
        assert_eq!(d.removed_by(FilterKind::State), 1);
        assert_eq!(d.removed_by(FilterKind::Memory), 299);
    }

    #[test]
    fn replicas_go_to_distinct_nodes_and_zones() {
        let mut t = table();
        let mut p = Placer::new(PlacerConfig::default(), 9).unwrap();
        let req = PlacementRequest {
            count: 3,
            origin: near(0.0),
            ..Default::default()
        };
        let out = p.place(&mut t, &req).unwrap();
        let mut zones: Vec<_> = out.iter().map(|p| p.zone).collect();
        zones.sort();
        zones.dedup();
        assert_eq!(zones.len(), 3, "three zones exist, so three are used");
        // A fourth replica that must avoid the first three nodes still finds a node.
        let more = PlacementRequest {
            existing: out.iter().map(|p| p.node).collect(),
            ..req.clone()
        };
        let extra = p
            .place(&mut t, &PlacementRequest { count: 1, ..more })
            .unwrap();
        assert!(out.iter().all(|p| p.node != extra[0].node));
    }

    #[test]
    fn region_constraint_and_unknown_region() {
        let mut t = table();
        let mut p = Placer::new(PlacerConfig::default(), 2).unwrap();
        let req = PlacementRequest {
            region: Some("west".into()),
            origin: near(0.0),
            ..Default::default()
        };
        let out = p.place(&mut t, &req).unwrap();
        assert_eq!(t.node(out[0].slot).unwrap().region, "west");
        let bad = PlacementRequest {
            region: Some("north".into()),
            ..Default::default()
        };
        let err = p.place(&mut t, &bad).unwrap_err();
        assert!(
            err.to_string().contains("known regions: east, west"),
            "{err}"
        );
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let mut t = table();
        let before = t.clone();
        let mut p = Placer::new(PlacerConfig::default(), 3).unwrap();
        let req = PlacementRequest {
            kind: WorkloadKind::Batch,
            count: 50,
            cpu_cores: 1.0,
            fit: Fit::BinPack,
            origin: near(10.0),
            ..Default::default()
        };
        let out = p.place(&mut t, &req).unwrap();
        let mut nodes: Vec<_> = out.iter().map(|p| p.node).collect();
        nodes.sort();
        nodes.dedup();
        assert_eq!(nodes.len(), 50);
        // 300 nodes are on telecom: 301 tasks cannot all fit, so none is placed.
        let huge = PlacementRequest {
            count: 301,
            labels: vec![LabelConstraint {
                key: "isp".into(),
                op: LabelOp::Equals("telecom".into()),
            }],
            ..req
        };
        let mut t2 = before.clone();
        let err = p.place(&mut t2, &huge).unwrap_err();
        assert!(
            matches!(
                err,
                PlacementError::NotEnoughNodes {
                    wanted: 301,
                    found: 300,
                    ..
                }
            ),
            "{err}"
        );
        for s in 0..t2.slot_bound() {
            assert_eq!(
                t2.node(Slot(s)).unwrap().free,
                before.node(Slot(s)).unwrap().free
            );
        }
    }

    #[test]
    fn batch_with_a_transfer_prefers_high_bandwidth_nodes() {
        // One zone: a quarter of the nodes on DSL (2 Mbit/s up), the rest on fibre.
        let mut t = NodeTable::new();
        for i in 0..200 {
            let mut s = node(i, "a", 0.0, 1.0);
            s.labels.clear();
            if i % 4 == 0 {
                s.bandwidth = Bandwidth {
                    uplink_kbps: 2_000,
                    downlink_kbps: 10_000,
                };
            }
            t.join(s).unwrap();
        }
        let req = PlacementRequest {
            kind: WorkloadKind::Batch,
            count: 20,
            cpu_cores: 1.0,
            transfer: Some(crate::request::Transfer {
                bytes_in: 2_500_000,
                bytes_out: 1_200_000,
            }),
            ..Default::default()
        };
        let is_fast =
            |t: &NodeTable, p: &Placement| t.node(p.slot).unwrap().bandwidth.uplink_kbps > 2_000;
        for seed in 0..10 {
            let mut with = t.clone();
            let mut p = Placer::new(PlacerConfig::default(), seed).unwrap();
            let out = p.place(&mut with, &req).unwrap();
            assert_eq!(out.len(), 20);
            assert!(
                out.iter().all(|p| is_fast(&with, p)),
                "seed {seed}: a DSL node was chosen over fibre ones"
            );
            assert!(out.iter().all(|p| p.score.est_transfer_s < 1.0));
            // Without the estimate the links are not looked at.
            let mut without = t.clone();
            let mut p = Placer::new(PlacerConfig::default(), seed).unwrap();
            let plain = PlacementRequest {
                transfer: None,
                ..req.clone()
            };
            let out = p.place(&mut without, &plain).unwrap();
            assert!(out.iter().all(|p| p.score.est_transfer_s.is_nan()));
        }
    }

    #[test]
    fn batch_commits_that_move_records_reserve_the_right_nodes() {
        // One class, one tier: every commit turns a node tight and moves its record, so the
        // later candidates' location hints go stale and must fall back to the slot's location.
        let mut t = NodeTable::new();
        for i in 0..40 {
            let mut s = node(i, "a", 0.0, 1.0);
            s.labels.clear();
            s.capacity = Resources::new(1000, 1024, 10_000);
            s.free = s.capacity;
            t.join(s).unwrap();
        }
        let mut p = Placer::new(PlacerConfig::default(), 8).unwrap();
        let req = PlacementRequest {
            kind: WorkloadKind::Batch,
            count: 20,
            cpu_cores: 0.6,
            memory_mib: 100.0,
            ..Default::default()
        };
        let out = p.place(&mut t, &req).unwrap();
        t.check_invariants().unwrap();
        let mut nodes: Vec<_> = out.iter().map(|p| p.node).collect();
        nodes.sort();
        nodes.dedup();
        assert_eq!(nodes.len(), 20);
        for p in &out {
            let v = t.node(p.slot).unwrap();
            assert_eq!(v.id, p.node);
            assert_eq!(v.free.cpu_millis, 400, "600 m taken from exactly this node");
        }
        let untouched = (0..t.slot_bound())
            .filter_map(|s| t.node(Slot(s)))
            .filter(|v| v.free.cpu_millis == 1000)
            .count();
        assert_eq!(untouched, 20);
    }

    #[test]
    fn same_seed_same_placements() {
        let run = |seed| {
            let mut t = table();
            let mut p = Placer::new(PlacerConfig::default(), seed).unwrap();
            (0..50u32)
                .map(|i| {
                    let req = PlacementRequest {
                        origin: if i.is_multiple_of(3) {
                            Origin::Anywhere
                        } else {
                            near(i as f32)
                        },
                        ..Default::default()
                    };
                    p.place(&mut t, &req).unwrap()[0].node
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn more_replicas_than_nodes_is_refused_at_once() {
        let mut t = table();
        let mut p = Placer::new(PlacerConfig::default(), 1).unwrap();
        let req = PlacementRequest {
            count: u32::MAX,
            ..Default::default()
        };
        let err = p.place(&mut t, &req).unwrap_err();
        assert!(
            matches!(
                err,
                PlacementError::Invalid(RequestError::CountExceedsNodes { nodes: 600, .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn invalid_configs_are_refused() {
        let bad = [
            PlacerConfig {
                latency_scale_ms: 0.0,
                ..Default::default()
            },
            PlacerConfig {
                weights: Weights {
                    latency: f32::NAN,
                    ..Default::default()
                },
                ..Default::default()
            },
            PlacerConfig {
                weights: Weights {
                    latency: 0.0,
                    reputation: 0.0,
                    fit: 0.0,
                    zone_spread: 0.0,
                    bandwidth: 0.0,
                },
                ..Default::default()
            },
            PlacerConfig {
                sample: SampleSize::Fixed(0),
                ..Default::default()
            },
            PlacerConfig {
                batch_probe_ratio: 0.5,
                ..Default::default()
            },
            PlacerConfig {
                min_reputation: 2.0,
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(Placer::new(cfg, 0).is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn a_zone_that_empties_and_refills_is_found_again() {
        let mut t = table();
        let mut p = Placer::new(PlacerConfig::default(), 4).unwrap();
        let in_a: Vec<NodeSpec> = (0..200).map(|i| node(i, "a", 0.0, 1.0)).collect();
        for s in &in_a {
            t.leave(s.id).unwrap();
        }
        // Decide once with zone a empty, so the cached order puts it last.
        p.place(&mut t, &PlacementRequest::default()).unwrap();
        for s in in_a {
            t.join(s).unwrap();
        }
        let out = p
            .place(
                &mut t,
                &PlacementRequest {
                    origin: near(0.0),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(t.node(out[0].slot).unwrap().zone, "a");
    }

    #[test]
    fn vacant_slots_are_refused_not_a_panic() {
        let mut t = table();
        let p = Placer::new(PlacerConfig::default(), 4).unwrap();
        let slot = t.slot_of(NodeId(5)).unwrap();
        t.leave(NodeId(5)).unwrap();
        let rr = p.resolve(&t, &PlacementRequest::default()).unwrap();
        assert_eq!(rr.refusal(&t, slot), Some(FilterKind::State));
        assert_eq!(rr.score(&t, slot), None);
        assert_eq!(rr.refusal(&t, Slot(1_000_000)), Some(FilterKind::State));
    }

    #[test]
    fn empty_table_refuses_with_a_diagnosis() {
        let mut t = NodeTable::new();
        let mut p = Placer::new(PlacerConfig::default(), 4).unwrap();
        let err = p.place(&mut t, &PlacementRequest::default()).unwrap_err();
        assert!(
            err.to_string().contains("count 1 exceeds the 0 nodes"),
            "{err}"
        );
    }

    #[test]
    fn sample_size_follows_log2() {
        let p = Placer::new(PlacerConfig::default(), 0).unwrap();
        assert_eq!(p.sample_size(0), 2);
        assert_eq!(p.sample_size(3), 2);
        assert_eq!(p.sample_size(10_000), 14);
        assert_eq!(p.sample_size(1 << 20), 20);
        assert_eq!(p.sample_size(1_000_000), 20);
    }
}
