//! The leader's soft state: the placement table (free capacity, coordinates), plans in
//! flight, and node liveness from gateways' reports (`liveness.rs`). None of it goes through
//! Raft; a new leader rebuilds it from the committed state and gives gateways a grace period
//! to tell it who is attached before judging any node down.

use std::collections::HashMap;

use stellar_placement::{
    Bandwidth, Coordinate, Fit, LabelConstraint, LabelOp, NodeId, NodeSpec, NodeState, NodeTable,
    Origin, PlacementRequest, Placer, PlacerConfig, Resources, Score, WorkloadKind,
};
use stellar_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::job_driver::{JobDriver, TaskNeed, TaskPlacer};
use crate::liveness::Liveness;
use crate::state::{Allocation, Effects, FunctionVersion, Node, StateMachine};

/// The placer's CPU request for an exact millicore amount: the placement library rounds
/// `cores × 1000` up, so aim half a millicore low to land exactly on `millis`.
pub fn cores_for_millis(millis: u32) -> f64 {
    (f64::from(millis) - 0.5).max(0.0) / 1000.0
}

/// Soft state kept only on the leader.
pub struct LeaderState {
    table: NodeTable,
    placer: Placer,
    /// Nodes chosen by plans proposed but not yet applied, per function id.
    inflight: HashMap<u32, Vec<u64>>,
    /// Which gateway holds each node's stream; transitions to commit.
    pub liveness: Liveness,
    /// Why each replica this leader placed went where it did, per (tenant, function), for
    /// `stellar status` and deploy answers ("why this node"). Soft state, bounded.
    reasons: HashMap<(String, String), HashMap<u64, pb::PlacementReason>>,
    /// Jobs' tasks with commands in flight (`job_driver.rs`).
    pub jobs: JobDriver,
}

/// Functions whose placement reasons are kept; past it the oldest knowledge is dropped.
const MAX_REASONED_FUNCTIONS: usize = 10_000;

fn reason_of(
    node: u64,
    region: &str,
    zone: &str,
    score: &Score,
    candidates: u32,
) -> pb::PlacementReason {
    pb::PlacementReason {
        node,
        region: region.to_string(),
        zone: zone.to_string(),
        total: score.total,
        latency: score.latency,
        reputation: score.reputation,
        fit: score.fit,
        zone_spread: score.zone_spread,
        est_rtt_ms: score.est_rtt_ms,
        candidates,
    }
}

impl std::fmt::Debug for LeaderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderState")
            .field("nodes", &self.table.len())
            .field("inflight", &self.inflight.len())
            .finish()
    }
}

/// What a node has left: its capacity less its allocations and running task attempts.
fn free_of(n: &Node) -> Resources {
    n.capacity
        .checked_sub(&n.allocated)
        .and_then(|r| r.checked_sub(&n.task_reserved))
        .unwrap_or_default()
}

fn spec_of(state: &StateMachine, id: u64, n: &Node) -> NodeSpec {
    let (region, zone) = state.node_location(n);
    NodeSpec {
        id: NodeId(id),
        region: region.to_string(),
        zone: zone.to_string(),
        arch: n.arch,
        runtimes: n.runtimes,
        capacity: n.capacity,
        free: free_of(n),
        bandwidth: Bandwidth {
            uplink_kbps: n.uplink_kbps,
            downlink_kbps: n.downlink_kbps,
        },
        reputation: n.reputation,
        labels: state
            .node_labels(n)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        coordinate: Coordinate::default(),
        state: n.state,
    }
}

impl LeaderState {
    /// Builds the table from committed nodes; gateways get `grace_ticks` to report who is
    /// attached before any node can be judged down, and a dead gateway's nodes
    /// `reattach_ticks` to re-attach elsewhere.
    pub fn build(
        state: &StateMachine,
        seed: u64,
        now: u64,
        (grace_ticks, reattach_ticks): (u64, u64),
    ) -> Result<LeaderState> {
        let mut table = NodeTable::with_capacity(state.nodes().len());
        for (&id, n) in state.nodes() {
            table
                .join(spec_of(state, id, n))
                .map_err(|e| Error::Config(format!("node {id:016x} cannot join the table: {e}")))?;
        }
        let placer =
            Placer::new(PlacerConfig::default(), seed).map_err(|e| Error::Config(e.to_string()))?;
        Ok(LeaderState {
            table,
            placer,
            inflight: HashMap::new(),
            liveness: Liveness::new(now, grace_ticks, reattach_ticks),
            reasons: HashMap::new(),
            jobs: JobDriver::default(),
        })
    }

    /// Nodes in the placement table.
    pub fn nodes(&self) -> usize {
        self.table.len()
    }

    /// Chooses `count` nodes for replicas of `version` of function `fid` (named `key`) and
    /// reserves their capacity in the soft table until the plan is applied or refused.
    pub fn plan(
        &mut self,
        state: &StateMachine,
        fid: Option<u32>,
        key: (&str, &str),
        version: &FunctionVersion,
        count: u32,
        origin: Origin,
    ) -> Result<Vec<u64>> {
        let mut existing: Vec<NodeId> = Vec::new();
        if let Some(fid) = fid {
            if let Some(f) = state.function_by_id(fid)
                && f.current().is_some_and(|c| c.version == version.version)
            {
                existing.extend(f.on_nodes.keys().map(|&n| NodeId(n)));
            }
            if let Some(nodes) = self.inflight.get(&fid) {
                existing.extend(nodes.iter().map(|&n| NodeId(n)));
            }
        }
        // Nodes where this version failed to load are not tried again.
        existing.extend(version.failed_nodes.iter().map(|&n| NodeId(n)));
        let labels = version
            .constraints
            .iter()
            .map(|c| LabelConstraint {
                key: c.key.clone(),
                op: if c.absent {
                    LabelOp::Absent
                } else if c.value.is_empty() {
                    LabelOp::Exists
                } else {
                    LabelOp::Equals(c.value.clone())
                },
            })
            .collect();
        let req = PlacementRequest {
            kind: WorkloadKind::Function,
            runtime: version.runtime(),
            arch: version.archs(),
            cpu_cores: cores_for_millis(version.limits.cpu_millis),
            memory_mib: f64::from(version.limits.memory_mib),
            disk_mib: f64::from(version.reservation().disk_mib),
            min_uplink_mbps: 0.0,
            count,
            region: (!version.region.is_empty()).then(|| version.region.clone()),
            origin,
            min_reputation: None,
            labels,
            existing,
            fit: Fit::Spread,
            transfer: None,
        };
        let scored_before = self.placer.stats().candidates_scored;
        let placed = self.placer.place(&mut self.table, &req)?;
        let per_replica =
            (self.placer.stats().candidates_scored - scored_before) / u64::from(count.max(1));
        let nodes: Vec<u64> = placed.iter().map(|p| p.node.0).collect();
        if let Some(fid) = fid {
            self.inflight.entry(fid).or_default().extend(&nodes);
        }
        if self.reasons.len() >= MAX_REASONED_FUNCTIONS {
            self.reasons.clear();
        }
        let reasons = self
            .reasons
            .entry((key.0.to_string(), key.1.to_string()))
            .or_default();
        for p in &placed {
            let (region, zone) = state
                .nodes()
                .get(&p.node.0)
                .map(|n| state.node_location(n))
                .unwrap_or(("", ""));
            let candidates = u32::try_from(per_replica).unwrap_or(u32::MAX);
            reasons.insert(
                p.node.0,
                reason_of(p.node.0, region, zone, &p.score, candidates),
            );
        }
        Ok(nodes)
    }

    /// Why the replicas of `tenant/function` on `nodes` were placed there, where this leader
    /// placed them.
    pub fn reasons(&self, tenant: &str, function: &str, nodes: &[u64]) -> Vec<pb::PlacementReason> {
        let Some(r) = self
            .reasons
            .get(&(tenant.to_string(), function.to_string()))
        else {
            return Vec::new();
        };
        nodes.iter().filter_map(|n| r.get(n).cloned()).collect()
    }

    /// A plan of ours was applied or refused: forget it as in flight, and give back its
    /// reservations if it was refused.
    pub fn plan_done(&mut self, fid: Option<u32>, nodes: &[u64], ask: Resources, accepted: bool) {
        if let Some(fid) = fid
            && let Some(list) = self.inflight.get_mut(&fid)
        {
            for n in nodes {
                if let Some(i) = list.iter().position(|x| x == n) {
                    list.swap_remove(i);
                }
            }
            if list.is_empty() {
                self.inflight.remove(&fid);
            }
        }
        if !accepted {
            for &n in nodes {
                let _ = self.table.release(NodeId(n), &ask);
            }
        }
    }

    /// Mirrors committed changes that did not come from our own accepted plans.
    pub fn observe(&mut self, state: &StateMachine, fx: &Effects, own_placed: bool) {
        if !own_placed {
            for a in &fx.placed {
                let _ = self.table.reserve(NodeId(a.node), &a.resources);
            }
        }
        for a in &fx.removed {
            let _ = self.table.release(NodeId(a.node), &a.resources);
        }
        for &id in fx.nodes_joined.iter().chain(&fx.nodes_changed) {
            let Some(n) = state.nodes().get(&id) else {
                continue;
            };
            if self.table.slot_of(NodeId(id)).is_some() {
                let _ = self.table.set_state(NodeId(id), n.state);
                let _ = self.table.set_reputation(NodeId(id), n.reputation);
                if fx.nodes_joined.contains(&id) {
                    let free = free_of(n);
                    let _ = self.table.set_free(NodeId(id), free);
                }
            } else if let Err(e) = self.table.join(spec_of(state, id, n)) {
                tracing::warn!(node = %NodeId(id), error = %e, "node could not join the placement table");
            }
        }
    }

    /// Mirrors committed task attempts: those a wave of ours started are already reserved.
    pub fn observe_tasks(&mut self, fx: &Effects, own_started: bool) {
        if !own_started {
            for (n, r) in &fx.tasks_started {
                let _ = self.table.reserve(NodeId(*n), r);
            }
        }
        for (n, r) in &fx.tasks_ended {
            let _ = self.table.release(NodeId(*n), r);
        }
    }

    /// A wave of ours was refused: give back what its placement reserved.
    pub fn release_tasks(&mut self, held: &[(u64, Resources)]) {
        for (n, r) in held {
            let _ = self.table.release(NodeId(*n), r);
        }
    }

    /// A node's network coordinate as its gateway reported it (soft: placement only).
    pub fn set_coordinate(&mut self, node: u64, c: Coordinate) {
        if c.is_valid() {
            let _ = self.table.set_coordinate(NodeId(node), c);
        }
    }

    /// Allocations that sit on nodes no longer ready: the leader re-places them.
    pub fn lost_allocations(state: &StateMachine, nodes: &[u64]) -> Vec<Allocation> {
        let mut out = Vec::new();
        for &n in nodes {
            if state
                .nodes()
                .get(&n)
                .is_some_and(|x| matches!(x.state, NodeState::Down | NodeState::Quarantined))
            {
                out.extend(
                    state
                        .allocations_on(n)
                        .filter_map(|a| state.allocations().get(&a).copied()),
                );
            }
        }
        out
    }
}

impl TaskPlacer for LeaderState {
    fn place_tasks(
        &mut self,
        need: &TaskNeed,
        count: u32,
        avoid: &[u64],
    ) -> std::result::Result<Vec<u64>, String> {
        let arch = need
            .arch
            .parse::<stellar_placement::Arch>()
            .map_err(|e| e.to_string())?;
        if self.table.is_empty() {
            return Err("no nodes are registered".into());
        }
        let mut req = PlacementRequest {
            kind: WorkloadKind::Batch,
            runtime: stellar_placement::Runtime::Container,
            arch: stellar_placement::ArchSet::only(arch),
            cpu_cores: cores_for_millis(need.ask.cpu_millis),
            memory_mib: f64::from(need.ask.memory_mib),
            disk_mib: f64::from(need.ask.disk_mib),
            min_uplink_mbps: 0.0,
            // A wave takes distinct nodes: at most one task per node per round.
            count: count.min(self.table.len() as u32),
            region: (!need.region.is_empty()).then(|| need.region.clone()),
            // Near where the inputs enter (the gateway that took the job), when known.
            origin: need.origin.map_or(Origin::Anywhere, Origin::Coordinate),
            min_reputation: None,
            labels: Vec::new(),
            existing: avoid.iter().map(|&n| NodeId(n)).collect(),
            fit: Fit::Spread,
            // Its inputs come down; about as much goes back up (the bandwidth stage).
            transfer: (need.bytes_in > 0).then_some(stellar_placement::Transfer {
                bytes_in: need.bytes_in,
                bytes_out: need.bytes_in,
            }),
        };
        // All or nothing per wave: when fewer nodes can take a task now, the wave is as
        // large as what they can take (the rest wait for the next round).
        loop {
            match self.placer.place(&mut self.table, &req) {
                Ok(placed) => return Ok(placed.iter().map(|p| p.node.0).collect()),
                Err(stellar_placement::PlacementError::NotEnoughNodes { found, .. })
                    if found > 0 && found < req.count =>
                {
                    req.count = found;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forty container nodes in two zones: twenty at 5 ms from the origin, twenty at 200.
    fn two_places() -> LeaderState {
        let mut m = StateMachine::new();
        let nodes = (1..=40)
            .map(|id| {
                let mut n = crate::fuzzing::node(id);
                let a = n.attributes.as_mut().expect("attrs");
                a.runtimes = vec!["container".into()];
                a.capacity.as_mut().expect("capacity").disk_mib = 100_000;
                // Zones are places: the sampler draws from the zones nearest the origin.
                a.zone = if id <= 20 { "near" } else { "far" }.into();
                n
            })
            .collect();
        let mut fx = Effects::default();
        let cmd = pb::Command {
            request_id: vec![],
            kind: Some(pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
                nodes,
            })),
        };
        let r = m.apply(1, cmd, &mut fx);
        assert!(r.error_code.is_empty(), "{r:?}");
        let mut leader = LeaderState::build(&m, 7, 0, (0, 0)).expect("leader state");
        for id in 1..=40u64 {
            let x = if id <= 20 { 5.0 } else { 200.0 };
            leader.set_coordinate(id, Coordinate::from_parts(&[x, 0.0, 0.0], 1.0).unwrap());
        }
        leader
    }

    #[test]
    fn task_waves_go_near_where_the_inputs_enter() {
        let need = |x: f32| TaskNeed {
            ask: Resources::new(1000, 256, 100),
            arch: "x86_64".into(),
            region: String::new(),
            bytes_in: 64 << 20,
            origin: Coordinate::from_parts(&[x, 0.0, 0.0], 0.0),
        };
        let mut leader = two_places();
        let near = leader.place_tasks(&need(0.0), 8, &[]).expect("placed");
        assert_eq!(near.len(), 8);
        assert!(near.iter().all(|&n| n <= 20), "{near:?}");
        let far = leader.place_tasks(&need(205.0), 8, &[]).expect("placed");
        assert!(far.iter().all(|&n| n > 20), "{far:?}");
        // Without an origin, latency plays no part: the choice spans both places.
        let mut anywhere = need(0.0);
        anywhere.origin = None;
        let mut leader = two_places();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..8 {
            let placed = leader.place_tasks(&anywhere, 4, &[]).expect("placed");
            seen.extend(placed.iter().map(|&n| n <= 20));
        }
        assert_eq!(
            seen.len(),
            2,
            "placements without an origin kept to one place"
        );
    }

    #[test]
    fn cores_for_millis_rounds_back_exactly() {
        for m in 0..=64_000u32 {
            let back = (cores_for_millis(m) * 1000.0).ceil() as u32;
            assert_eq!(back, m, "millis {m}");
        }
    }
}
