//! The node table: every known node in one dense array, plus the candidate indexes placement
//! walks instead of scanning.
//!
//! Layout (why not pure struct-of-arrays): a decision probes ~20 nodes of one index bucket and
//! reads nearly every placement field of each. So each node has one 64-byte, cache-line-aligned
//! hot record, and the records are stored *in* their bucket: a probe window is a contiguous run
//! of memory (one TLB entry, sequential prefetch) instead of 20 random cache misses across the
//! whole table. A slot (stable for the node's life) finds its record through a small location
//! array; fields most decisions never read live in a side array (disk capacity, and the
//! downlink, which only the bandwidth scorer reads, for requests with a transfer estimate),
//! the labels in the class.
//!
//! Indexes: nodes sharing zone, arch, runtimes and labels form a *class* (Nomad's computed node
//! class), so those filters run once per class. Each class splits its members into *tiers* by
//! Vivaldi height (the access-link delay), so the search can visit the fastest nodes of the
//! nearest zone first; nodes likely to be refused (tight, low reputation) are filed lower and
//! nodes that cannot take work (not ready, saturated) are parked in a last tier. Zones keep a
//! running coordinate sum (their centroid) and a cached nearest-first order.

use rustc_hash::FxHashMap;

use crate::node::{Arch, Bandwidth, NodeId, NodeSpec, NodeState, Resources, RuntimeSet};
use crate::vivaldi::{Coordinate, DIMENSIONS};

/// Number of tiers per class: 12 by Vivaldi height, then one for parked nodes.
pub const TIERS: usize = 13;
/// Lowest height (ms) of each tier: fine where fibre access links sit (a millisecond there is
/// a large share of a metro RTT), coarse for cable, DSL and wireless links. The last tier
/// holds parked nodes whatever their height; its floor puts it after every other tier.
pub const TIER_FLOOR_MS: [f32; TIERS] = [
    0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 10_000.0,
];
/// The tier of nodes that cannot take work now (not ready) or have too little free to take
/// any workload worth placing: they stay findable (a refusal must be exact) but are probed
/// only after every other node.
pub const PARKED_TIER: u8 = (TIERS - 1) as u8;
/// Below this much free CPU a node counts as saturated.
pub const SATURATED_CPU_MILLIS: u32 = 50;
/// Below this much free memory a node counts as saturated.
pub const SATURATED_MEMORY_MIB: u32 = 64;
/// Below this much free CPU a node counts as tight: typical functions may not fit any more.
pub const TIGHT_CPU_MILLIS: u32 = 500;
/// Below this much free memory a node counts as tight.
pub const TIGHT_MEMORY_MIB: u32 = 512;
/// Below this reputation a node is filed as if tight: most requests' floors refuse it, and
/// since the scores pass it over it would otherwise stay roomy in the best tiers for ever.
pub const LOW_REPUTATION: f32 = 0.5;
/// Tiers a tight or low-reputation node is filed below its height tier, so roomy nodes
/// nearly as near are probed first and the walk wastes fewer probes on likely refusals.
pub const TIGHT_TIER_SHIFT: u8 = 3;

/// Most nodes one table can hold (slot indexes are `u32`, one value is reserved).
pub const MAX_NODES: usize = u32::MAX as usize - 1;
/// Most zones one table can hold: the nearest-first order is a zones x zones matrix, rebuilt
/// when zones appear (32 MB and well under a second at this limit; cities, not streets).
pub const MAX_ZONES: usize = 4096;

/// Dense index of a node inside one table; valid until that node leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub u32);

/// Dense index of a zone (a city or metro area) inside one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ZoneId(pub u16);

/// Dense index of a region (a group of zones) inside one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u16);

/// Interned label key or value.
pub(crate) type Sym = u32;

/// What a table operation refused; the table is unchanged after any of these.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TableError {
    /// A node with this id is already in the table.
    #[error("node {0} has already joined")]
    DuplicateNode(NodeId),
    /// No node with this id is in the table.
    #[error("node {0} is not in the table")]
    UnknownNode(NodeId),
    /// The node's declaration is inconsistent.
    #[error("node {id}: {reason}")]
    InvalidSpec {
        /// The node that declared it.
        id: NodeId,
        /// What is wrong, in words.
        reason: &'static str,
    },
    /// The table is at its size limit.
    #[error("the table is full: at most {0} {1}")]
    Full(usize, &'static str),
    /// A reservation asked for more than the node has free.
    #[error("node {id} has {free:?} free, cannot reserve {asked:?}")]
    InsufficientCapacity {
        /// The node.
        id: NodeId,
        /// What was asked for.
        asked: Resources,
        /// What the node had free.
        free: Resources,
    },
}

/// Result alias for table operations.
pub type Result<T, E = TableError> = std::result::Result<T, E>;

/// The per-node record every decision reads: exactly one cache line.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct HotNode {
    /// Here rather than in a side array: committing a decision then needs no other miss.
    pub id: NodeId,
    pub coord: Coordinate,
    pub free: Resources,
    /// CPU and memory capacity (what the fit score needs); disk capacity is cold.
    pub cap_cpu_millis: u32,
    pub cap_memory_mib: u32,
    pub uplink_kbps: u32,
    pub reputation: f32,
    pub class: u32,
    /// The node's stable slot (the record itself moves between buckets).
    pub slot: u32,
    pub zone: u16,
    pub state: u8,
    pub tier: u8,
}

const _: () = assert!(size_of::<HotNode>() == 64);

#[cfg(test)]
impl HotNode {
    const EMPTY: HotNode = HotNode {
        id: NodeId(0),
        coord: Coordinate::ORIGIN,
        free: Resources::new(0, 0, 0),
        cap_cpu_millis: 0,
        cap_memory_mib: 0,
        uplink_kbps: 0,
        reputation: 0.0,
        class: u32::MAX,
        slot: u32::MAX,
        zone: u16::MAX,
        state: NodeState::Down as u8,
        tier: 0,
    };
}

/// Nodes that share every stable attribute placement filters on.
#[derive(Clone, Debug)]
pub(crate) struct Class {
    pub zone: u16,
    pub region: u16,
    pub arch: Arch,
    pub runtimes: RuntimeSet,
    pub labels: u32,
    /// Member records per tier.
    tiers: [Vec<HotNode>; TIERS],
    /// Members in all tiers.
    len: u32,
    /// Bit `t` set when tier `t` has members.
    occupied: u16,
}

impl Class {
    fn new(zone: u16, region: u16, arch: Arch, runtimes: RuntimeSet, labels: u32) -> Self {
        Class {
            zone,
            region,
            arch,
            runtimes,
            labels,
            tiers: Default::default(),
            len: 0,
            occupied: 0,
        }
    }

    /// Members in all tiers.
    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Bit `t` set when tier `t` has members.
    #[inline]
    pub fn occupied(&self) -> u16 {
        self.occupied
    }

    /// The member records of one tier.
    #[inline]
    pub fn tier(&self, tier: usize) -> &[HotNode] {
        &self.tiers[tier]
    }

    /// Files a record in its tier; returns its position there.
    fn push(&mut self, node: HotNode) -> u32 {
        let bucket = &mut self.tiers[node.tier as usize];
        bucket.push(node);
        self.len += 1;
        self.occupied |= 1 << node.tier;
        (bucket.len() - 1) as u32
    }

    /// Takes the record at `pos` of `tier` out in O(1); also returns the slot of the record
    /// moved into `pos`, whose location must be updated.
    fn swap_remove(&mut self, tier: u8, pos: u32) -> (HotNode, Option<u32>) {
        let bucket = &mut self.tiers[tier as usize];
        let node = bucket.swap_remove(pos as usize);
        self.len -= 1;
        if bucket.is_empty() {
            self.occupied &= !(1 << tier);
        }
        (node, bucket.get(pos as usize).map(|n| n.slot))
    }
}

/// Where a slot's record is: class (28 bits), tier (4 bits), position (32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc(u64);

/// The fields most decisions never read, per slot.
#[derive(Clone, Copy, Debug, Default)]
struct ColdNode {
    disk_cap_mib: u32,
    downlink_kbps: u32,
}

impl Loc {
    const VACANT: Loc = Loc(u64::MAX);

    pub(crate) fn new(class: u32, tier: u8, pos: u32) -> Self {
        debug_assert!(class < 1 << 28 && (tier as usize) < 16);
        Loc(u64::from(class) << 36 | u64::from(tier) << 32 | u64::from(pos))
    }
    fn class(self) -> usize {
        (self.0 >> 36) as usize
    }
    fn tier(self) -> usize {
        ((self.0 >> 32) & 0xF) as usize
    }
    fn pos(self) -> usize {
        (self.0 & 0xFFFF_FFFF) as usize
    }
}

/// Most node classes one table can hold (a location packs the class into 28 bits).
pub const MAX_CLASSES: usize = 1 << 28;

#[derive(Clone, Debug)]
pub(crate) struct Zone {
    pub name: String,
    pub region: u16,
    pub classes: Vec<u32>,
    pub count: u32,
    vec_sum: [f64; DIMENSIONS],
}

impl Zone {
    /// Mean position of the zone's members (origin when empty); always current.
    #[inline]
    pub fn centroid(&self) -> [f32; DIMENSIONS] {
        let n = f64::from(self.count.max(1));
        self.vec_sum.map(|s| (s / n) as f32)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ClassKey {
    zone: u16,
    arch: Arch,
    runtimes: RuntimeSet,
    labels: u32,
}

/// A read-only copy of one node's placement-relevant state.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView<'a> {
    /// Stable identity.
    pub id: NodeId,
    /// Region name.
    pub region: &'a str,
    /// Zone name.
    pub zone: &'a str,
    /// Zone index in this table.
    pub zone_id: ZoneId,
    /// CPU architecture.
    pub arch: Arch,
    /// Offered runtimes.
    pub runtimes: RuntimeSet,
    /// Total capacity.
    pub capacity: Resources,
    /// Free capacity (after reservations).
    pub free: Resources,
    /// Link bandwidth.
    pub bandwidth: Bandwidth,
    /// Reputation in [0, 1].
    pub reputation: f32,
    /// Vivaldi coordinate.
    pub coordinate: Coordinate,
    /// Lifecycle state.
    pub state: NodeState,
}

/// Every node known to a placement engine, with the indexes decisions walk.
#[derive(Clone, Debug, Default)]
pub struct NodeTable {
    /// Slot -> where its record is.
    locs: Vec<Loc>,
    /// Slot -> fields no decision reads.
    cold: Vec<ColdNode>,
    by_id: FxHashMap<NodeId, u32>,
    free_slots: Vec<u32>,
    live: usize,
    regions: Vec<String>,
    region_by_name: FxHashMap<String, u16>,
    pub(crate) zones: Vec<Zone>,
    zone_by_name: FxHashMap<(u16, String), u16>,
    pub(crate) classes: Vec<Class>,
    class_by_key: FxHashMap<ClassKey, u32>,
    symbols: Vec<String>,
    symbol_by_name: FxHashMap<String, Sym>,
    labelsets: Vec<Box<[(Sym, Sym)]>>,
    labelset_by_key: FxHashMap<Box<[(Sym, Sym)]>, u32>,
    /// Row `z` lists all zones by centroid distance from zone `z`, nearest first.
    zone_order: Vec<u16>,
    zone_order_stale: bool,
    moves_since_order: usize,
}

/// Maps a Vivaldi height to its tier.
#[inline]
pub(crate) fn tier_of(height_ms: f32) -> u8 {
    let mut t = 0;
    while t + 1 < PARKED_TIER as usize && height_ms >= TIER_FLOOR_MS[t + 1] {
        t += 1;
    }
    t as u8
}

/// The tier a node belongs in: its height tier; a few tiers lower when it is tight or of
/// low reputation; the parked tier when it is not ready or saturated.
#[inline]
pub(crate) fn tier_for(node: &HotNode) -> u8 {
    let free = &node.free;
    if node.state != NodeState::Ready as u8
        || free.cpu_millis < SATURATED_CPU_MILLIS
        || free.memory_mib < SATURATED_MEMORY_MIB
    {
        PARKED_TIER
    } else if free.cpu_millis < TIGHT_CPU_MILLIS
        || free.memory_mib < TIGHT_MEMORY_MIB
        || node.reputation < LOW_REPUTATION
    {
        (tier_of(node.coord.height_ms) + TIGHT_TIER_SHIFT).min(PARKED_TIER - 1)
    } else {
        tier_of(node.coord.height_ms)
    }
}

impl NodeTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table with room for `nodes` nodes before it reallocates.
    pub fn with_capacity(nodes: usize) -> Self {
        let mut t = Self::default();
        t.locs.reserve_exact(nodes);
        t.cold.reserve_exact(nodes);
        t.by_id.reserve(nodes);
        t
    }

    /// Number of nodes in the table (any state).
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether the table holds no node.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// One past the highest slot index; iterate `0..slot_bound()` and skip vacant slots.
    pub fn slot_bound(&self) -> u32 {
        self.locs.len() as u32
    }

    /// Whether `slot` currently holds a node.
    #[inline]
    pub fn is_live(&self, slot: Slot) -> bool {
        self.locs
            .get(slot.0 as usize)
            .is_some_and(|l| *l != Loc::VACANT)
    }

    /// The record of a live slot.
    #[inline]
    pub(crate) fn rec(&self, slot: u32) -> &HotNode {
        let l = self.locs[slot as usize];
        &self.classes[l.class()].tiers[l.tier()][l.pos()]
    }

    #[inline]
    fn rec_mut(&mut self, slot: u32) -> &mut HotNode {
        let l = self.locs[slot as usize];
        &mut self.classes[l.class()].tiers[l.tier()][l.pos()]
    }

    /// The downlink of a slot, from the cold array: read only when a request has a transfer
    /// estimate, so the record stays one cache line.
    #[inline]
    pub(crate) fn downlink_kbps(&self, slot: u32) -> u32 {
        self.cold[slot as usize].downlink_kbps
    }

    /// The full capacity of a live slot (disk capacity lives in the cold array).
    fn capacity(&self, slot: u32) -> Resources {
        let h = self.rec(slot);
        Resources::new(
            h.cap_cpu_millis,
            h.cap_memory_mib,
            self.cold[slot as usize].disk_cap_mib,
        )
    }

    /// The slot of node `id`, if it is in the table.
    #[inline]
    pub fn slot_of(&self, id: NodeId) -> Option<Slot> {
        self.by_id.get(&id).map(|s| Slot(*s))
    }

    /// The node in `slot`, if any.
    pub fn id_of(&self, slot: Slot) -> Option<NodeId> {
        self.is_live(slot).then(|| self.rec(slot.0).id)
    }

    /// A read-only view of the node in `slot`.
    pub fn node(&self, slot: Slot) -> Option<NodeView<'_>> {
        if !self.is_live(slot) {
            return None;
        }
        let h = self.rec(slot.0);
        let class = &self.classes[h.class as usize];
        let zone = &self.zones[h.zone as usize];
        Some(NodeView {
            id: h.id,
            region: &self.regions[zone.region as usize],
            zone: &zone.name,
            zone_id: ZoneId(h.zone),
            arch: class.arch,
            runtimes: class.runtimes,
            capacity: self.capacity(slot.0),
            free: h.free,
            bandwidth: Bandwidth {
                uplink_kbps: h.uplink_kbps,
                downlink_kbps: self.cold[slot.0 as usize].downlink_kbps,
            },
            reputation: h.reputation,
            coordinate: h.coord,
            state: NodeState::from_u8(h.state).unwrap_or(NodeState::Down),
        })
    }

    /// The labels of the node in `slot`, as `(key, value)` pairs sorted by key.
    pub fn labels(&self, slot: Slot) -> Vec<(&str, &str)> {
        if !self.is_live(slot) {
            return Vec::new();
        }
        let class = &self.classes[self.rec(slot.0).class as usize];
        self.labelsets[class.labels as usize]
            .iter()
            .map(|(k, v)| {
                (
                    self.symbols[*k as usize].as_str(),
                    self.symbols[*v as usize].as_str(),
                )
            })
            .collect()
    }

    /// Looks a region up by name.
    pub fn region_id(&self, name: &str) -> Option<RegionId> {
        self.region_by_name.get(name).map(|r| RegionId(*r))
    }

    /// Looks a zone up by region and zone name.
    pub fn zone_id(&self, region: &str, zone: &str) -> Option<ZoneId> {
        let r = *self.region_by_name.get(region)?;
        self.zone_by_name
            .get(&(r, zone.to_owned()))
            .map(|z| ZoneId(*z))
    }

    /// Number of zones ever seen (zones are never removed).
    pub fn zone_count(&self) -> usize {
        self.zones.len()
    }

    /// `(region, zone)` names of a zone.
    pub fn zone_name(&self, zone: ZoneId) -> Option<(&str, &str)> {
        let z = self.zones.get(zone.0 as usize)?;
        Some((&self.regions[z.region as usize], &z.name))
    }

    /// Number of node classes (equivalence classes of stable attributes).
    pub fn class_count(&self) -> usize {
        self.classes.len()
    }

    pub(crate) fn symbol(&self, name: &str) -> Option<Sym> {
        self.symbol_by_name.get(name).copied()
    }

    pub(crate) fn labelset(&self, id: u32) -> &[(Sym, Sym)] {
        &self.labelsets[id as usize]
    }

    /// Adds a node; everything about it is checked first, so a refusal changes nothing.
    pub fn join(&mut self, spec: NodeSpec) -> Result<Slot> {
        let id = spec.id;
        let invalid = |reason| TableError::InvalidSpec { id, reason };
        if self.by_id.contains_key(&id) {
            return Err(TableError::DuplicateNode(id));
        }
        if !(spec.reputation.is_finite() && (0.0..=1.0).contains(&spec.reputation)) {
            return Err(invalid("reputation must be a number within [0, 1]"));
        }
        if !spec.coordinate.is_valid() {
            return Err(invalid(
                "coordinate must be finite with a non-negative height",
            ));
        }
        if !spec.free.fits_in(&spec.capacity) {
            return Err(invalid("free capacity exceeds total capacity"));
        }
        if spec.region.is_empty() || spec.zone.is_empty() {
            return Err(invalid("region and zone must be non-empty"));
        }
        if spec.labels.iter().any(|(k, _)| k.is_empty()) {
            return Err(invalid("label keys must be non-empty"));
        }
        let mut keys: Vec<&str> = spec.labels.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("label keys must be unique"));
        }
        if self.live >= MAX_NODES {
            return Err(TableError::Full(MAX_NODES, "nodes"));
        }
        let new_zone = self
            .region_by_name
            .get(&spec.region)
            .and_then(|r| self.zone_by_name.get(&(*r, spec.zone.clone())))
            .is_none();
        if new_zone && self.zones.len() >= MAX_ZONES {
            return Err(TableError::Full(MAX_ZONES, "zones"));
        }
        if self.classes.len() >= MAX_CLASSES {
            return Err(TableError::Full(MAX_CLASSES, "node classes"));
        }

        // Validated: from here on nothing fails.
        let zone = self.intern_zone(&spec.region, &spec.zone);
        let labels = self.intern_labels(&spec.labels);
        let class = self.intern_class(ClassKey {
            zone,
            arch: spec.arch,
            runtimes: spec.runtimes,
            labels,
        });
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.locs.push(Loc::VACANT);
                self.cold.push(ColdNode::default());
                (self.locs.len() - 1) as u32
            }
        };
        let mut node = HotNode {
            id,
            coord: spec.coordinate,
            free: spec.free,
            cap_cpu_millis: spec.capacity.cpu_millis,
            cap_memory_mib: spec.capacity.memory_mib,
            uplink_kbps: spec.bandwidth.uplink_kbps,
            reputation: spec.reputation,
            class,
            slot,
            zone,
            state: spec.state as u8,
            tier: 0,
        };
        node.tier = tier_for(&node);
        let pos = self.classes[class as usize].push(node);
        self.locs[slot as usize] = Loc::new(class, node.tier, pos);
        self.cold[slot as usize] = ColdNode {
            disk_cap_mib: spec.capacity.disk_mib,
            downlink_kbps: spec.bandwidth.downlink_kbps,
        };
        self.by_id.insert(id, slot);
        let z = &mut self.zones[zone as usize];
        z.count += 1;
        for (s, v) in z.vec_sum.iter_mut().zip(spec.coordinate.vec) {
            *s += f64::from(v);
        }
        if z.count == 1 {
            // A zone that was empty sits last in the cached order: re-sort before relying on it.
            self.zone_order_stale = true;
        }
        self.live += 1;
        self.moves_since_order += 1;
        Ok(Slot(slot))
    }

    /// Removes a node; its slot may be reused by a later join.
    pub fn leave(&mut self, id: NodeId) -> Result<()> {
        let slot = self.by_id.remove(&id).ok_or(TableError::UnknownNode(id))?;
        let h = self.unlink(slot);
        self.locs[slot as usize] = Loc::VACANT;
        let z = &mut self.zones[h.zone as usize];
        z.count -= 1;
        for (s, v) in z.vec_sum.iter_mut().zip(h.coord.vec) {
            *s -= f64::from(v);
        }
        if z.count == 0 {
            z.vec_sum = [0.0; DIMENSIONS];
            self.zone_order_stale = true;
        }
        self.free_slots.push(slot);
        self.live -= 1;
        self.moves_since_order += 1;
        Ok(())
    }

    /// Replaces the free capacity a heartbeat reported. The caller accounts for reservations
    /// the worker has not seen yet (the control plane subtracts in-flight allocations), or
    /// the next decision may overcommit the node.
    pub fn set_free(&mut self, id: NodeId, free: Resources) -> Result<()> {
        let slot = self.slot_checked(id)?;
        if !free.fits_in(&self.capacity(slot)) {
            return Err(TableError::InvalidSpec {
                id,
                reason: "free capacity exceeds total capacity",
            });
        }
        self.rec_mut(slot).free = free;
        self.refile(slot);
        Ok(())
    }

    /// Sets a node's reputation (a committed transition in the control plane).
    pub fn set_reputation(&mut self, id: NodeId, reputation: f32) -> Result<()> {
        let slot = self.slot_checked(id)?;
        if !(reputation.is_finite() && (0.0..=1.0).contains(&reputation)) {
            return Err(TableError::InvalidSpec {
                id,
                reason: "reputation must be a number within [0, 1]",
            });
        }
        self.rec_mut(slot).reputation = reputation;
        self.refile(slot);
        Ok(())
    }

    /// Sets a node's lifecycle state.
    pub fn set_state(&mut self, id: NodeId, state: NodeState) -> Result<()> {
        let slot = self.slot_checked(id)?;
        self.rec_mut(slot).state = state as u8;
        self.refile(slot);
        Ok(())
    }

    /// Moves a node to a new Vivaldi coordinate, re-filing it if its height tier changed.
    pub fn set_coordinate(&mut self, id: NodeId, coordinate: Coordinate) -> Result<()> {
        let slot = self.slot_checked(id)?;
        if !coordinate.is_valid() {
            return Err(TableError::InvalidSpec {
                id,
                reason: "coordinate must be finite with a non-negative height",
            });
        }
        let h = *self.rec(slot);
        let z = &mut self.zones[h.zone as usize];
        for ((s, new), old) in z.vec_sum.iter_mut().zip(coordinate.vec).zip(h.coord.vec) {
            *s += f64::from(new) - f64::from(old);
        }
        self.rec_mut(slot).coord = coordinate;
        self.refile(slot);
        self.moves_since_order += 1;
        Ok(())
    }

    /// Takes `amount` from a node's free capacity, or refuses without changing anything.
    pub fn reserve(&mut self, id: NodeId, amount: &Resources) -> Result<()> {
        let slot = self.slot_checked(id)?;
        self.reserve_slot(Slot(slot), amount)
    }

    /// Gives `amount` back to a node, capped at its capacity: release each reservation once.
    pub fn release(&mut self, id: NodeId, amount: &Resources) -> Result<()> {
        let slot = self.slot_checked(id)?;
        self.release_slot(Slot(slot), amount);
        Ok(())
    }

    pub(crate) fn release_slot(&mut self, slot: Slot, amount: &Resources) {
        let cap = self.capacity(slot.0);
        let h = self.rec_mut(slot.0);
        h.free = h.free.add_capped(amount, &cap);
        self.refile(slot.0);
    }

    pub(crate) fn reserve_slot(&mut self, slot: Slot, amount: &Resources) -> Result<()> {
        let loc = self.locs[slot.0 as usize];
        self.reserve_at(slot.0, loc, amount).map(|_| ())
    }

    /// Reserves on the record at `hint` if it still holds `slot` (a decision just found it
    /// there: no location lookup, no id lookup), else wherever `slot` is now. Returns the
    /// node's id and zone.
    pub(crate) fn reserve_at(
        &mut self,
        slot: u32,
        hint: Loc,
        amount: &Resources,
    ) -> Result<(NodeId, u16)> {
        let at_hint = self
            .classes
            .get(hint.class())
            .and_then(|c| c.tiers.get(hint.tier()))
            .and_then(|b| b.get(hint.pos()));
        let loc = if at_hint.is_some_and(|h| h.slot == slot) {
            hint
        } else {
            self.locs[slot as usize]
        };
        let h = &mut self.classes[loc.class()].tiers[loc.tier()][loc.pos()];
        let Some(left) = h.free.checked_sub(amount) else {
            return Err(TableError::InsufficientCapacity {
                id: h.id,
                asked: *amount,
                free: h.free,
            });
        };
        h.free = left;
        let placed = (h.id, h.zone);
        self.refile_at(slot, loc);
        Ok(placed)
    }

    fn slot_checked(&self, id: NodeId) -> Result<u32> {
        self.by_id
            .get(&id)
            .copied()
            .ok_or(TableError::UnknownNode(id))
    }

    /// Moves a node's record to the tier its state calls for, if that changed.
    #[inline]
    fn refile(&mut self, slot: u32) {
        let loc = self.locs[slot as usize];
        self.refile_at(slot, loc);
    }

    /// `refile` for a record whose location is known.
    #[inline]
    fn refile_at(&mut self, slot: u32, loc: Loc) {
        let h = &self.classes[loc.class()].tiers[loc.tier()][loc.pos()];
        let tier = tier_for(h);
        if tier != h.tier {
            let mut node = self.unlink_at(slot, loc);
            node.tier = tier;
            let pos = self.classes[node.class as usize].push(node);
            self.locs[slot as usize] = Loc::new(node.class, tier, pos);
        }
    }

    /// Takes `slot`'s record out of its bucket in O(1), fixing the location of the record
    /// moved into its place; the slot's own location is left for the caller to set.
    fn unlink(&mut self, slot: u32) -> HotNode {
        let loc = self.locs[slot as usize];
        self.unlink_at(slot, loc)
    }

    fn unlink_at(&mut self, slot: u32, l: Loc) -> HotNode {
        let (node, moved) = self.classes[l.class()].swap_remove(l.tier() as u8, l.pos() as u32);
        debug_assert_eq!(node.slot, slot);
        if let Some(moved) = moved {
            self.locs[moved as usize] = l;
        }
        node
    }

    fn intern_zone(&mut self, region: &str, zone: &str) -> u16 {
        let r = match self.region_by_name.get(region) {
            Some(r) => *r,
            None => {
                let r = self.regions.len() as u16;
                self.regions.push(region.to_owned());
                self.region_by_name.insert(region.to_owned(), r);
                r
            }
        };
        let key = (r, zone.to_owned());
        if let Some(z) = self.zone_by_name.get(&key) {
            return *z;
        }
        let z = self.zones.len() as u16;
        self.zones.push(Zone {
            name: zone.to_owned(),
            region: r,
            classes: Vec::new(),
            count: 0,
            vec_sum: [0.0; DIMENSIONS],
        });
        self.zone_by_name.insert(key, z);
        self.zone_order_stale = true;
        z
    }

    fn intern_symbol(&mut self, s: &str) -> Sym {
        if let Some(v) = self.symbol_by_name.get(s) {
            return *v;
        }
        let v = self.symbols.len() as Sym;
        self.symbols.push(s.to_owned());
        self.symbol_by_name.insert(s.to_owned(), v);
        v
    }

    fn intern_labels(&mut self, labels: &[(String, String)]) -> u32 {
        let mut set: Vec<(Sym, Sym)> = labels
            .iter()
            .map(|(k, v)| (self.intern_symbol(k), self.intern_symbol(v)))
            .collect();
        set.sort_unstable();
        let set = set.into_boxed_slice();
        if let Some(id) = self.labelset_by_key.get(&set) {
            return *id;
        }
        let id = self.labelsets.len() as u32;
        self.labelsets.push(set.clone());
        self.labelset_by_key.insert(set, id);
        id
    }

    fn intern_class(&mut self, key: ClassKey) -> u32 {
        if let Some(c) = self.class_by_key.get(&key) {
            return *c;
        }
        let c = self.classes.len() as u32;
        self.classes.push(Class::new(
            key.zone,
            self.zones[key.zone as usize].region,
            key.arch,
            key.runtimes,
            key.labels,
        ));
        self.zones[key.zone as usize].classes.push(c);
        self.class_by_key.insert(key, c);
        c
    }

    /// Recomputes each zone's nearest-first order of the other zones (decisions call it when
    /// zones appeared or many nodes moved; call it yourself after a bulk load).
    pub fn refresh_zone_order(&mut self) {
        let n = self.zones.len();
        let centroids: Vec<[f32; DIMENSIONS]> = self.zones.iter().map(Zone::centroid).collect();
        self.zone_order.clear();
        self.zone_order.reserve(n * n);
        let mut row: Vec<(f32, u16)> = Vec::with_capacity(n);
        for from in &centroids {
            let from_c = Coordinate {
                vec: *from,
                height_ms: 0.0,
            };
            row.clear();
            row.extend(self.zones.iter().enumerate().map(|(i, z)| {
                // Empty zones go last: nothing to find there.
                let d = if z.count == 0 {
                    f32::INFINITY
                } else {
                    from_c.vec_distance_ms(&centroids[i])
                };
                (d, i as u16)
            }));
            row.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            self.zone_order.extend(row.iter().map(|(_, i)| *i));
        }
        self.zone_order_stale = false;
        self.moves_since_order = 0;
    }

    /// Refreshes the zone order when zones appeared or many nodes moved since the last time.
    pub(crate) fn ensure_zone_order(&mut self) {
        if self.zone_order_stale || self.moves_since_order > (self.live / 4).max(4096) {
            self.refresh_zone_order();
        }
    }

    /// Zones nearest-first from `zone` (needs a fresh order; see `ensure_zone_order`).
    pub(crate) fn zones_near(&self, zone: u16) -> &[u16] {
        let n = self.zones.len();
        let start = zone as usize * n;
        &self.zone_order[start..start + n]
    }

    /// The zone whose centroid is nearest to `coord` (a linear pass over zones).
    pub(crate) fn nearest_zone(&self, coord: &Coordinate) -> Option<u16> {
        let mut best: Option<(f32, u16)> = None;
        for (i, z) in self.zones.iter().enumerate() {
            if z.count == 0 {
                continue;
            }
            let d = coord.vec_distance_ms(&z.centroid());
            if best.is_none_or(|(bd, _)| d < bd) {
                best = Some((d, i as u16));
            }
        }
        best.map(|(_, z)| z)
    }

    /// Region names, indexed by `RegionId`.
    pub fn region_names(&self) -> &[String] {
        &self.regions
    }

    /// Checks the internal indexes against the node records (for tests; O(n)).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut seen = 0usize;
        for (ci, class) in self.classes.iter().enumerate() {
            let members: usize = class.tiers.iter().map(Vec::len).sum();
            let occupied = class
                .tiers
                .iter()
                .enumerate()
                .filter(|(_, b)| !b.is_empty())
                .fold(0u16, |m, (t, _)| m | 1 << t);
            if members != class.len() || occupied != class.occupied {
                return Err(format!("class {ci} counts are stale"));
            }
            for (t, bucket) in class.tiers.iter().enumerate() {
                for (pos, h) in bucket.iter().enumerate() {
                    let slot = h.slot;
                    let here = Loc::new(ci as u32, t as u8, pos as u32);
                    if self.locs.get(slot as usize) != Some(&here) {
                        return Err(format!(
                            "slot {slot}'s location does not point at its record"
                        ));
                    }
                    if self.by_id.get(&h.id) != Some(&slot) {
                        return Err(format!("slot {slot} is not mapped from its id"));
                    }
                    if h.class as usize != ci || h.zone != class.zone || h.tier as usize != t {
                        return Err(format!("slot {slot} filed in the wrong class or tier"));
                    }
                    if tier_for(h) as usize != t {
                        return Err(format!(
                            "slot {slot} in tier {t} with height {}",
                            h.coord.height_ms
                        ));
                    }
                    if !h.free.fits_in(&self.capacity(slot)) {
                        return Err(format!("slot {slot} overcommitted"));
                    }
                    seen += 1;
                }
            }
        }
        if seen != self.live || self.by_id.len() != self.live {
            return Err(format!(
                "{seen} indexed, {} mapped, {} live",
                self.by_id.len(),
                self.live
            ));
        }
        let counted: usize = self.zones.iter().map(|z| z.count as usize).sum();
        if counted != self.live {
            return Err(format!("zones count {counted}, {} live", self.live));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Bandwidth, NodeSpec};

    pub(crate) fn spec(id: u64, zone: &str, height: f32) -> NodeSpec {
        NodeSpec {
            id: NodeId(id),
            region: "cn-east".into(),
            zone: zone.into(),
            arch: Arch::Aarch64,
            runtimes: RuntimeSet::WASM,
            capacity: Resources::new(4000, 4096, 10_000),
            free: Resources::new(4000, 4096, 10_000),
            bandwidth: Bandwidth {
                uplink_kbps: 20_000,
                downlink_kbps: 100_000,
            },
            reputation: 0.9,
            labels: vec![("isp".into(), "telecom".into())],
            coordinate: Coordinate {
                vec: [id as f32, 0.0, 0.0],
                height_ms: height,
            },
            state: NodeState::Ready,
        }
    }

    #[test]
    fn hot_record_is_one_cache_line() {
        assert_eq!(size_of::<HotNode>(), 64);
        assert_eq!(align_of::<HotNode>(), 64);
    }

    #[test]
    fn tiers_follow_the_floors() {
        assert_eq!(tier_of(0.0), 0);
        assert_eq!(tier_of(0.99), 0);
        assert_eq!(tier_of(1.99), 2);
        assert_eq!(tier_of(1.2), 1);
        assert_eq!(tier_of(2.0), 3);
        assert_eq!(tier_of(31.0), 10);
        assert_eq!(tier_of(500.0), 11);
        let node = |height_ms, free, reputation, state: NodeState| HotNode {
            coord: Coordinate {
                vec: [0.0; 3],
                height_ms,
            },
            free,
            reputation,
            state: state as u8,
            ..HotNode::EMPTY
        };
        let roomy = Resources::new(1000, 1024, 0);
        let tight = Resources::new(400, 1024, 0);
        let full = Resources::new(10, 1024, 0);
        let ready = NodeState::Ready;
        let cases = [
            (node(0.5, roomy, 0.9, ready), 0),
            (node(0.5, tight, 0.9, ready), TIGHT_TIER_SHIFT),
            (node(0.5, roomy, 0.1, ready), TIGHT_TIER_SHIFT),
            (node(500.0, tight, 0.9, ready), PARKED_TIER - 1),
            (node(0.5, full, 0.9, ready), PARKED_TIER),
            (node(0.5, roomy, 0.9, NodeState::Down), PARKED_TIER),
        ];
        for (n, tier) in cases {
            assert_eq!(tier_for(&n), tier, "{n:?}");
        }
    }

    #[test]
    fn join_leave_and_slot_reuse_keep_indexes_consistent() {
        let mut t = NodeTable::new();
        for i in 0..100 {
            t.join(spec(
                i,
                if i.is_multiple_of(2) {
                    "shanghai"
                } else {
                    "hangzhou"
                },
                i as f32 % 40.0,
            ))
            .unwrap();
        }
        t.check_invariants().unwrap();
        for i in (0..100).step_by(3) {
            t.leave(NodeId(i)).unwrap();
        }
        t.check_invariants().unwrap();
        assert_eq!(t.len(), 66);
        let reused = t.join(spec(1000, "suzhou", 1.0)).unwrap();
        assert!(reused.0 < 100, "a vacant slot is reused");
        assert_eq!(t.id_of(reused), Some(NodeId(1000)));
        t.check_invariants().unwrap();
        assert_eq!(t.zone_count(), 3);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut t = NodeTable::new();
        t.join(spec(1, "shanghai", 1.0)).unwrap();
        assert_eq!(
            t.join(spec(1, "shanghai", 1.0)),
            Err(TableError::DuplicateNode(NodeId(1)))
        );
        let mut bad = spec(2, "shanghai", 1.0);
        bad.reputation = f32::NAN;
        assert!(matches!(t.join(bad), Err(TableError::InvalidSpec { .. })));
        let mut bad = spec(3, "newzone", 1.0);
        bad.free.memory_mib = bad.capacity.memory_mib + 1;
        assert!(matches!(t.join(bad), Err(TableError::InvalidSpec { .. })));
        let mut bad = spec(4, "shanghai", 1.0);
        bad.labels.push(("isp".into(), "unicom".into()));
        assert!(matches!(t.join(bad), Err(TableError::InvalidSpec { .. })));
        assert_eq!(t.len(), 1);
        assert_eq!(t.zone_count(), 1, "a refused join must not create its zone");
        assert_eq!(t.leave(NodeId(9)), Err(TableError::UnknownNode(NodeId(9))));
        assert!(t.set_reputation(NodeId(1), 1.5).is_err());
        assert!(
            t.set_coordinate(
                NodeId(1),
                Coordinate {
                    vec: [0.0; 3],
                    height_ms: -1.0
                }
            )
            .is_err()
        );
        t.check_invariants().unwrap();
    }

    #[test]
    fn coordinate_updates_move_nodes_between_tiers() {
        let mut t = NodeTable::new();
        for i in 0..10 {
            t.join(spec(i, "shanghai", 1.0)).unwrap();
        }
        t.set_coordinate(
            NodeId(3),
            Coordinate {
                vec: [0.0; 3],
                height_ms: 20.0,
            },
        )
        .unwrap();
        t.check_invariants().unwrap();
        let slot = t.slot_of(NodeId(3)).unwrap();
        assert_eq!(t.rec(slot.0).tier, tier_of(20.0));
        assert_eq!(t.node(slot).unwrap().coordinate.height_ms, 20.0);
    }

    #[test]
    fn reserve_refuses_overcommit_and_release_is_capped() {
        let mut t = NodeTable::new();
        t.join(spec(1, "shanghai", 1.0)).unwrap();
        let big = Resources::new(3000, 1000, 0);
        t.reserve(NodeId(1), &big).unwrap();
        let err = t.reserve(NodeId(1), &big).unwrap_err();
        assert!(matches!(err, TableError::InsufficientCapacity { .. }));
        let slot = t.slot_of(NodeId(1)).unwrap();
        assert_eq!(t.node(slot).unwrap().free.cpu_millis, 1000);
        t.reserve(NodeId(1), &Resources::new(990, 0, 0)).unwrap();
        assert_eq!(t.rec(slot.0).tier, PARKED_TIER);
        t.check_invariants().unwrap();
        t.release(NodeId(1), &big).unwrap();
        assert_ne!(t.rec(slot.0).tier, PARKED_TIER);
        t.release(NodeId(1), &big).unwrap();
        assert_eq!(t.node(slot).unwrap().free, t.node(slot).unwrap().capacity);
    }

    #[test]
    fn zone_order_is_nearest_first() {
        let mut t = NodeTable::new();
        for (i, (zone, x)) in [("a", 0.0), ("b", 100.0), ("c", 10.0)].iter().enumerate() {
            let mut s = spec(i as u64, zone, 1.0);
            s.coordinate.vec = [*x, 0.0, 0.0];
            t.join(s).unwrap();
        }
        t.ensure_zone_order();
        let a = t.zone_id("cn-east", "a").unwrap().0;
        let names: Vec<&str> = t
            .zones_near(a)
            .iter()
            .map(|z| t.zone_name(ZoneId(*z)).unwrap().1)
            .collect();
        assert_eq!(names, ["a", "c", "b"]);
        let near_b = Coordinate {
            vec: [90.0, 0.0, 0.0],
            height_ms: 0.0,
        };
        assert_eq!(
            t.nearest_zone(&near_b),
            t.zone_id("cn-east", "b").map(|z| z.0)
        );
    }
}
