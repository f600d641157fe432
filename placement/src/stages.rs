//! The stages of a decision, each a tiny named type (Nomad's `feasible/stack.go` shape):
//!
//! ```text
//!  candidates (nearest-first, sampled)        see placer.rs
//!    -> class filters   runtime, arch, region, labels      once per node class
//!    -> node filters    state, anti-affinity, reputation, cpu, memory, disk, uplink
//!    -> scorers         latency, reputation, fit, zone spread,      each in [0, 1]
//!                       bandwidth (only with a transfer estimate; the one stage that
//!                       reads the cold downlink)
//!    -> normalisation   weighted mean of the scorers that apply
//!    -> limit           stop after k feasible candidates
//!    -> select          best score (or best m for a batch)
//! ```
//!
//! Every filter has a [`FilterKind`], so a refusal can say how many nodes each stage removed.

use std::fmt;

use crate::node::NodeState;
use crate::request::{Fit, ResolvedLabel, ResolvedRequest};
use crate::table::{Class, HotNode, NodeTable, Slot, TIERS};

/// The filter stages, in the order they run; the names appear in refusals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterKind {
    /// The node does not offer the workload's runtime.
    Runtime,
    /// The node's architecture is not one the workload runs on.
    Arch,
    /// The node is outside the requested region.
    Region,
    /// The node's labels fail a constraint.
    Labels,
    /// The node is draining, down or quarantined.
    State,
    /// The node already runs a replica of this workload.
    AntiAffinity,
    /// The node's reputation is below the floor.
    Reputation,
    /// Not enough free CPU.
    Cpu,
    /// Not enough free memory.
    Memory,
    /// Not enough free disk.
    Disk,
    /// Uplink slower than required.
    Uplink,
}

impl FilterKind {
    /// Every filter kind, in pipeline order.
    pub const ALL: [FilterKind; 11] = [
        FilterKind::Runtime,
        FilterKind::Arch,
        FilterKind::Region,
        FilterKind::Labels,
        FilterKind::State,
        FilterKind::AntiAffinity,
        FilterKind::Reputation,
        FilterKind::Cpu,
        FilterKind::Memory,
        FilterKind::Disk,
        FilterKind::Uplink,
    ];

    /// Whether the filter looks at one node's changing state (the others judge whole classes).
    pub fn is_node_level(self) -> bool {
        self >= FilterKind::State
    }

    /// Short stable name, for JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            FilterKind::Runtime => "runtime",
            FilterKind::Arch => "arch",
            FilterKind::Region => "region",
            FilterKind::Labels => "labels",
            FilterKind::State => "state",
            FilterKind::AntiAffinity => "anti-affinity",
            FilterKind::Reputation => "reputation",
            FilterKind::Cpu => "cpu",
            FilterKind::Memory => "memory",
            FilterKind::Disk => "disk",
            FilterKind::Uplink => "uplink",
        }
    }

    /// The phrase after the count in a refusal, kube-scheduler style.
    pub fn reason(self) -> &'static str {
        match self {
            FilterKind::Runtime => "node(s) without the requested runtime",
            FilterKind::Arch => "node(s) of another architecture",
            FilterKind::Region => "node(s) outside the requested region",
            FilterKind::Labels => "node(s) didn't match the label constraints",
            FilterKind::State => "node(s) not ready",
            FilterKind::AntiAffinity => "node(s) already running a replica",
            FilterKind::Reputation => "node(s) below the reputation floor",
            FilterKind::Cpu => "Insufficient cpu",
            FilterKind::Memory => "Insufficient memory",
            FilterKind::Disk => "Insufficient disk",
            FilterKind::Uplink => "Insufficient uplink bandwidth",
        }
    }
}

/// A filter that decides for a whole node class at once (stable attributes only).
pub(crate) trait ClassFilter {
    /// Which stage this is.
    const KIND: FilterKind;
    /// Whether members of `class` may host the request.
    fn admits(req: &ResolvedRequest, table: &NodeTable, class: &Class) -> bool;
}

/// A filter over one node's changing state.
pub(crate) trait NodeFilter {
    /// Which stage this is.
    const KIND: FilterKind;
    /// Whether the node in `slot` may host the request.
    fn admits(req: &ResolvedRequest, node: &HotNode, slot: u32) -> bool;
}

/// The node offers the workload's runtime.
pub(crate) struct RuntimeFilter;
impl ClassFilter for RuntimeFilter {
    const KIND: FilterKind = FilterKind::Runtime;
    fn admits(req: &ResolvedRequest, _: &NodeTable, class: &Class) -> bool {
        class.runtimes.contains(req.runtime)
    }
}

/// The node's architecture is accepted (wasm accepts all).
pub(crate) struct ArchFilter;
impl ClassFilter for ArchFilter {
    const KIND: FilterKind = FilterKind::Arch;
    fn admits(req: &ResolvedRequest, _: &NodeTable, class: &Class) -> bool {
        req.arch.contains(class.arch)
    }
}

/// The node is inside the requested region, if one was asked for.
pub(crate) struct RegionFilter;
impl ClassFilter for RegionFilter {
    const KIND: FilterKind = FilterKind::Region;
    fn admits(req: &ResolvedRequest, _: &NodeTable, class: &Class) -> bool {
        req.region.is_none_or(|r| r == class.region)
    }
}

/// Every label constraint holds.
pub(crate) struct LabelFilter;
impl ClassFilter for LabelFilter {
    const KIND: FilterKind = FilterKind::Labels;
    fn admits(req: &ResolvedRequest, table: &NodeTable, class: &Class) -> bool {
        if req.labels.is_empty() {
            return true;
        }
        let set = table.labelset(class.labels);
        let value_of = |k: Option<u32>| {
            k.and_then(|k| {
                set.binary_search_by_key(&k, |(key, _)| *key)
                    .ok()
                    .map(|i| set[i].1)
            })
        };
        req.labels.iter().all(|c| match *c {
            ResolvedLabel::Equals(k, v) => v.is_some() && value_of(k) == v,
            ResolvedLabel::NotEquals(k, v) => v.is_none() || value_of(k) != v,
            ResolvedLabel::Exists(k) => value_of(k).is_some(),
            ResolvedLabel::Absent(k) => value_of(k).is_none(),
        })
    }
}

/// Only ready nodes take new work.
pub(crate) struct StateFilter;
impl NodeFilter for StateFilter {
    const KIND: FilterKind = FilterKind::State;
    #[inline]
    fn admits(_: &ResolvedRequest, node: &HotNode, _: u32) -> bool {
        node.state == NodeState::Ready as u8
    }
}

/// Replicas of one workload go to distinct nodes.
pub(crate) struct AntiAffinityFilter;
impl NodeFilter for AntiAffinityFilter {
    const KIND: FilterKind = FilterKind::AntiAffinity;
    #[inline]
    fn admits(req: &ResolvedRequest, _: &HotNode, slot: u32) -> bool {
        req.avoid.is_empty() || req.avoid.binary_search(&slot).is_err()
    }
}

/// The node's reputation reaches the request's floor.
pub(crate) struct ReputationFilter;
impl NodeFilter for ReputationFilter {
    const KIND: FilterKind = FilterKind::Reputation;
    #[inline]
    fn admits(req: &ResolvedRequest, node: &HotNode, _: u32) -> bool {
        node.reputation >= req.min_reputation
    }
}

/// Enough free CPU.
pub(crate) struct CpuFilter;
impl NodeFilter for CpuFilter {
    const KIND: FilterKind = FilterKind::Cpu;
    #[inline]
    fn admits(req: &ResolvedRequest, node: &HotNode, _: u32) -> bool {
        req.ask.cpu_millis <= node.free.cpu_millis
    }
}

/// Enough free memory.
pub(crate) struct MemoryFilter;
impl NodeFilter for MemoryFilter {
    const KIND: FilterKind = FilterKind::Memory;
    #[inline]
    fn admits(req: &ResolvedRequest, node: &HotNode, _: u32) -> bool {
        req.ask.memory_mib <= node.free.memory_mib
    }
}

/// Enough free disk.
pub(crate) struct DiskFilter;
impl NodeFilter for DiskFilter {
    const KIND: FilterKind = FilterKind::Disk;
    #[inline]
    fn admits(req: &ResolvedRequest, node: &HotNode, _: u32) -> bool {
        req.ask.disk_mib <= node.free.disk_mib
    }
}

/// Uplink at least as fast as required.
pub(crate) struct UplinkFilter;
impl NodeFilter for UplinkFilter {
    const KIND: FilterKind = FilterKind::Uplink;
    #[inline]
    fn admits(req: &ResolvedRequest, node: &HotNode, _: u32) -> bool {
        req.min_uplink_kbps <= node.uplink_kbps
    }
}

/// Runs filters in order and returns the kind of the first that refuses.
macro_rules! first_refusal {
    ($trait:ident, $args:tt; $($filter:ident),+ $(,)?) => {{
        $( if !<$filter as $trait>::admits $args { return Some(<$filter as $trait>::KIND); } )+
        None
    }};
}

impl ResolvedRequest {
    /// The first class filter refusing `class`, or `None` if its members may qualify.
    pub(crate) fn class_refusal(&self, table: &NodeTable, class: &Class) -> Option<FilterKind> {
        first_refusal!(ClassFilter, (self, table, class);
            RuntimeFilter, ArchFilter, RegionFilter, LabelFilter)
    }

    /// The first node filter refusing the node, or `None` if it is feasible.
    #[inline]
    pub(crate) fn node_refusal(&self, node: &HotNode, slot: u32) -> Option<FilterKind> {
        first_refusal!(NodeFilter, (self, node, slot);
            StateFilter, AntiAffinityFilter, ReputationFilter,
            CpuFilter, MemoryFilter, DiskFilter, UplinkFilter)
    }

    /// Why the node in `slot` cannot host this request, or `None` if it can; a slot that
    /// holds no node is refused as not ready.
    pub fn refusal(&self, table: &NodeTable, slot: Slot) -> Option<FilterKind> {
        if !table.is_live(slot) {
            return Some(FilterKind::State);
        }
        let node = table.rec(slot.0);
        self.class_refusal(table, &table.classes[node.class as usize])
            .or_else(|| self.node_refusal(node, slot.0))
    }

    /// The score the node in `slot` would get (feasibility is not checked), or `None` if the
    /// slot holds no node.
    pub fn score(&self, table: &NodeTable, slot: Slot) -> Option<Score> {
        table
            .is_live(slot)
            .then(|| self.score_node(table, table.rec(slot.0)))
    }

    /// Calls `f` with every feasible node and its score, walking the records as stored and
    /// judging class filters once per class. A full scan: for baselines, oracles and
    /// diagnostics, never for decisions.
    pub fn for_each_feasible(&self, table: &NodeTable, mut f: impl FnMut(Slot, Score)) {
        for class in &table.classes {
            if class.len() == 0 || self.class_refusal(table, class).is_some() {
                continue;
            }
            for tier in 0..TIERS {
                for node in class.tier(tier) {
                    if self.node_refusal(node, node.slot).is_none() {
                        f(Slot(node.slot), self.score_node(table, node));
                    }
                }
            }
        }
    }

    /// Runs every scorer on `node` (a record of `table`) and combines them.
    #[inline]
    pub(crate) fn score_node(&self, table: &NodeTable, node: &HotNode) -> Score {
        let (est_rtt_ms, latency) = LatencyScorer::score(self, node);
        let reputation = ReputationScorer::score(self, node);
        let fit = FitScorer::score(self, node);
        let zone_spread = ZoneSpreadScorer::score(self, node);
        let (est_transfer_s, bandwidth) = BandwidthScorer::score(self, table, node);
        let total = Normaliser::combine(self, latency, reputation, fit, zone_spread, bandwidth);
        Score {
            total,
            est_rtt_ms,
            latency,
            reputation,
            fit,
            zone_spread,
            est_transfer_s,
            bandwidth,
        }
    }
}

/// Why a node scored what it did; every part is in [0, 1], higher is better.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    /// The normalised total that selection maximises.
    pub total: f32,
    /// Estimated RTT from the origin (Vivaldi), in ms; `NaN` without an origin.
    pub est_rtt_ms: f32,
    /// Latency part: `1 / (1 + rtt / latency_scale_ms)`.
    pub latency: f32,
    /// Reputation part: the reputation itself.
    pub reputation: f32,
    /// Fit part: Nomad's bin-pack or spread score of the node after placement.
    pub fit: f32,
    /// Zone-spread part: 0 in a zone that already holds a replica, else 1.
    pub zone_spread: f32,
    /// Estimated seconds to move the request's transfer over the node's links; `NaN`
    /// without a transfer estimate.
    pub est_transfer_s: f32,
    /// Bandwidth part: `1 / (1 + t / t_ref)`, `t_ref` being the same bytes at 20 Mbit/s both
    /// ways; 0 without a transfer estimate (and then left out of the total).
    pub bandwidth: f32,
}

/// Relative weights of the scorers. The defaults make latency dominant, because nearness to
/// the caller is what the product sells; reputation is already floored by a filter and mostly
/// breaks ties among equally near nodes; fit (bin-pack or spread) breaks the remaining ties.
/// Bandwidth counts only for requests that say how many bytes they move, and then weighs
/// nearly as much as latency: a video segment's upload over a slow home link can take
/// longer than transcoding it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    /// Latency to the origin (default 0.8).
    pub latency: f32,
    /// Node reputation (default 0.15).
    pub reputation: f32,
    /// Bin-pack or spread fit (default 0.05).
    pub fit: f32,
    /// Zone spread among replicas, when a replica already exists (default 0.05).
    pub zone_spread: f32,
    /// Transfer time over the node's links, when the request has a transfer (default 0.5).
    pub bandwidth: f32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            latency: 0.8,
            reputation: 0.15,
            fit: 0.05,
            zone_spread: 0.05,
            bandwidth: 0.5,
        }
    }
}

/// Scores estimated latency from the origin: `1 / (1 + rtt / scale)`, 0.5 at `scale` ms.
pub(crate) struct LatencyScorer;
impl LatencyScorer {
    #[inline]
    fn score(req: &ResolvedRequest, node: &HotNode) -> (f32, f32) {
        match &req.origin {
            None => (f32::NAN, 0.0),
            Some(o) => {
                let rtt = o.distance_ms(&node.coord);
                (rtt, 1.0 / (1.0 + rtt / req.latency_scale_ms))
            }
        }
    }
}

/// Scores reputation as itself: a node that verified well is trusted with more work.
pub(crate) struct ReputationScorer;
impl ReputationScorer {
    #[inline]
    fn score(_: &ResolvedRequest, node: &HotNode) -> f32 {
        node.reputation
    }
}

/// Nomad's `ScoreFitBinPack`/`ScoreFitSpread` on CPU and memory after placement.
pub(crate) struct FitScorer;
impl FitScorer {
    #[inline]
    fn score(req: &ResolvedRequest, node: &HotNode) -> f32 {
        let free_pct = |free: u32, ask: u32, cap: u32| {
            if cap == 0 {
                0.0
            } else {
                (free.saturating_sub(ask) as f32 / cap as f32).clamp(0.0, 1.0)
            }
        };
        let cpu = free_pct(
            node.free.cpu_millis,
            req.ask.cpu_millis,
            node.cap_cpu_millis,
        );
        let mem = free_pct(
            node.free.memory_mib,
            req.ask.memory_mib,
            node.cap_memory_mib,
        );
        // 10^x for x in [0, 1]; the sum runs from 2 (both full) to 20 (both empty).
        let total = (cpu * std::f32::consts::LN_10).exp() + (mem * std::f32::consts::LN_10).exp();
        let score = match req.fit {
            Fit::BinPack => 20.0 - total,
            Fit::Spread => total - 2.0,
        };
        (score / 18.0).clamp(0.0, 1.0)
    }
}

/// Prefers zones that hold no replica yet, for availability when a zone's network fails.
pub(crate) struct ZoneSpreadScorer;
impl ZoneSpreadScorer {
    #[inline]
    fn score(req: &ResolvedRequest, node: &HotNode) -> f32 {
        if req.avoid_zones.binary_search(&node.zone).is_ok() {
            0.0
        } else {
            1.0
        }
    }
}

/// Reference rate (kbit/s, both ways) at which the bandwidth score is 0.5: a good home
/// fibre line's uplink, so a few-Mbit/s DSL uplink scores low and gigabit fibre near 1.
pub const BANDWIDTH_REF_KBPS: u32 = 20_000;

/// Scores the estimated transfer time `t = in/downlink + out/uplink` as `1 / (1 + t / t_ref)`,
/// `t_ref` being the same bytes at [`BANDWIDTH_REF_KBPS`] both ways; a link of 0 kbit/s that
/// must carry bytes scores 0. Only requests with a transfer estimate pay for reading the
/// downlink from the cold array.
pub(crate) struct BandwidthScorer;
impl BandwidthScorer {
    #[inline]
    fn score(req: &ResolvedRequest, table: &NodeTable, node: &HotNode) -> (f32, f32) {
        match &req.transfer {
            None => (f32::NAN, 0.0),
            Some(t) => {
                let secs = t.seconds(table.downlink_kbps(node.slot), node.uplink_kbps);
                (secs, 1.0 / (1.0 + secs * t.inv_ref_s))
            }
        }
    }
}

/// Combines the scorers into one total: the weighted mean over the scorers that apply.
pub(crate) struct Normaliser;
impl Normaliser {
    #[inline]
    fn combine(
        req: &ResolvedRequest,
        latency: f32,
        reputation: f32,
        fit: f32,
        spread: f32,
        bandwidth: f32,
    ) -> f32 {
        let w = &req.weights;
        // Latency applies only with an origin; zone spread only once a replica exists;
        // bandwidth only with a transfer estimate.
        let wl = if req.origin.is_some() { w.latency } else { 0.0 };
        let ws = if req.avoid_zones.is_empty() {
            0.0
        } else {
            w.zone_spread
        };
        let wb = if req.transfer.is_some() {
            w.bandwidth
        } else {
            0.0
        };
        let sum = wl + w.reputation + w.fit + ws + wb;
        if sum <= 0.0 {
            return 0.0;
        }
        (wl * latency + w.reputation * reputation + w.fit * fit + ws * spread + wb * bandwidth)
            / sum
    }
}

/// How many nodes each filter removed, for "0/N nodes are available: ..." refusals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diagnosis {
    /// Nodes considered (all nodes in the table when the search was exhaustive).
    pub total: u64,
    counts: [u64; FilterKind::ALL.len()],
}

impl Diagnosis {
    /// A diagnosis of `total` nodes with nothing recorded, for algorithms that do not count.
    pub fn unexamined(total: u64) -> Self {
        Diagnosis {
            total,
            counts: [0; FilterKind::ALL.len()],
        }
    }

    pub(crate) fn reset(&mut self, total: u64) {
        self.total = total;
        self.counts = [0; FilterKind::ALL.len()];
    }

    #[inline]
    pub(crate) fn add(&mut self, kind: FilterKind, n: u64) {
        self.counts[kind as usize] += n;
    }

    /// Nodes removed by `kind`.
    pub fn removed_by(&self, kind: FilterKind) -> u64 {
        self.counts[kind as usize]
    }

    /// `(filter, nodes removed)` for every filter that removed any, in pipeline order.
    pub fn removed(&self) -> Vec<(FilterKind, u64)> {
        FilterKind::ALL
            .iter()
            .filter(|k| self.counts[**k as usize] > 0)
            .map(|k| (*k, self.counts[*k as usize]))
            .collect()
    }

    /// Total nodes removed by any filter.
    pub fn removed_total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let available = self.total.saturating_sub(self.removed_total());
        write!(f, "{available}/{} nodes are available", self.total)?;
        let removed = self.removed();
        for (i, (kind, n)) in removed.iter().enumerate() {
            let sep = if i == 0 { ": " } else { ", " };
            write!(f, "{sep}{n} {}", kind.reason())?;
        }
        f.write_str(".")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnosis_reads_like_kube_scheduler() {
        let mut d = Diagnosis::default();
        d.reset(10);
        d.add(FilterKind::Memory, 3);
        d.add(FilterKind::Arch, 7);
        assert_eq!(
            d.to_string(),
            "0/10 nodes are available: 7 node(s) of another architecture, 3 Insufficient memory."
        );
        assert_eq!(d.removed_by(FilterKind::Memory), 3);
    }

    #[test]
    fn filter_kinds_index_their_counters() {
        for (i, k) in FilterKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }

    use crate::node::{Arch, Bandwidth, NodeId, NodeSpec, Resources, RuntimeSet};
    use crate::request::{PlacementRequest, Transfer};
    use crate::vivaldi::Coordinate;

    /// A node like every other in these tests but for its links.
    fn spec(id: u64, uplink_kbps: u32, downlink_kbps: u32) -> NodeSpec {
        NodeSpec {
            id: NodeId(id),
            region: "cn-east".into(),
            zone: "shanghai".into(),
            arch: Arch::X86_64,
            runtimes: RuntimeSet::WASM,
            capacity: Resources::new(4000, 4096, 10_000),
            free: Resources::new(4000, 4096, 10_000),
            bandwidth: Bandwidth {
                uplink_kbps,
                downlink_kbps,
            },
            reputation: 0.9,
            labels: Vec::new(),
            coordinate: Coordinate {
                vec: [1.0, 0.0, 0.0],
                height_ms: 2.0,
            },
            state: NodeState::Ready,
        }
    }

    /// Three nodes alike but for their links: fibre, DSL, and the reference rate both ways.
    fn three_links() -> (NodeTable, [Slot; 3]) {
        let mut t = NodeTable::new();
        let fibre = t.join(spec(1, 100_000, 500_000)).unwrap();
        let dsl = t.join(spec(2, 2_000, 10_000)).unwrap();
        let reference = t
            .join(spec(3, BANDWIDTH_REF_KBPS, BANDWIDTH_REF_KBPS))
            .unwrap();
        (t, [fibre, dsl, reference])
    }

    fn resolve(t: &NodeTable, transfer: Option<Transfer>) -> ResolvedRequest {
        let req = PlacementRequest {
            transfer,
            ..Default::default()
        };
        ResolvedRequest::resolve(t, &req, Weights::default(), 20.0, 0.5).unwrap()
    }

    const SEGMENT: Transfer = Transfer {
        bytes_in: 2_500_000,
        bytes_out: 1_200_000,
    };

    #[test]
    fn a_faster_link_outscores_a_slow_one_when_bytes_move() {
        let (t, [fibre, dsl, reference]) = three_links();
        let rr = resolve(&t, Some(SEGMENT));
        let score = |slot| rr.score(&t, slot).unwrap();
        let (f, d, r) = (score(fibre), score(dsl), score(reference));
        assert!(f.total > r.total && r.total > d.total, "{f:?} {r:?} {d:?}");
        assert!(f.bandwidth > 0.8 && d.bandwidth < 0.2, "{f:?} vs {d:?}");
        assert!((r.bandwidth - 0.5).abs() < 1e-6, "{r:?}");
        // 20 Mbit in at 10 Mbit/s + 9.6 Mbit out at 2 Mbit/s.
        assert!((d.est_transfer_s - 6.8).abs() < 1e-4, "{d:?}");
        assert!((f.est_transfer_s - 0.136).abs() < 1e-4, "{f:?}");
        // Bandwidth enters the weighted mean with its weight.
        let w = Weights::default();
        let want = (w.reputation * f.reputation + w.fit * f.fit + w.bandwidth * f.bandwidth)
            / (w.reputation + w.fit + w.bandwidth);
        assert!((f.total - want).abs() < 1e-6);
    }

    #[test]
    fn scores_are_unchanged_without_a_transfer() {
        let (t, slots) = three_links();
        let rr = resolve(&t, None);
        let w = Weights::default();
        for slot in slots {
            let s = rr.score(&t, slot).unwrap();
            assert!(s.est_transfer_s.is_nan());
            assert_eq!(s.bandwidth, 0.0);
            // The weighted mean of reputation and fit alone (no origin, no replica yet).
            let want = (w.reputation * s.reputation + w.fit * s.fit) / (w.reputation + w.fit);
            assert_eq!(s.total, want);
            assert_eq!(s.total, rr.score(&t, slots[0]).unwrap().total);
        }
        // Zero bytes both ways is the same as no estimate.
        let zero = resolve(&t, Some(Transfer::default()));
        for slot in slots {
            let (a, b) = (zero.score(&t, slot).unwrap(), rr.score(&t, slot).unwrap());
            assert_eq!(a.total, b.total);
            assert!(a.est_transfer_s.is_nan());
        }
    }

    #[test]
    fn a_link_without_bandwidth_scores_zero() {
        let (mut t, _) = three_links();
        let mute = t.join(spec(9, 0, 50_000)).unwrap();
        let s = resolve(&t, Some(SEGMENT)).score(&t, mute).unwrap();
        assert_eq!(s.bandwidth, 0.0);
        assert_eq!(s.est_transfer_s, f32::INFINITY);
        assert!(s.total.is_finite());
    }
}
