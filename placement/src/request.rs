//! What a caller asks for, and its checked, interned form that the stages evaluate.

use crate::node::{ArchSet, NodeId, Resources, Runtime};
use crate::stages::{BANDWIDTH_REF_KBPS, Weights};
use crate::table::{NodeTable, Sym};
use crate::vivaldi::Coordinate;

/// How the replicas or tasks of one request relate to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    /// Replicas of a function: distinct nodes, preferably distinct zones, placed one by one.
    Function,
    /// Tasks of a batch job: distinct nodes, placed together by Sparrow-style batch sampling.
    Batch,
}

/// How to weigh a node's remaining capacity (Nomad's `binpack` and `spread` algorithms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fit {
    /// Prefer fuller nodes, to keep whole boxes free for large work.
    BinPack,
    /// Prefer emptier nodes, so a weak home box is not crowded.
    Spread,
}

/// Where the callers of the workload are, so placement can pick nodes near them.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// No latency preference: any zone.
    Anywhere,
    /// The callers' estimated network coordinate (as the gateway measures it).
    Coordinate(Coordinate),
    /// The callers' zone (e.g. from GeoIP), by region and zone name.
    Zone {
        /// Region name.
        region: String,
        /// Zone name within the region.
        zone: String,
    },
}

/// A label test; all of a request's constraints must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelConstraint {
    /// Label key.
    pub key: String,
    /// The test applied to the key's value.
    pub op: LabelOp,
}

/// The tests a label constraint can apply (kube's node-selector operators).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelOp {
    /// The key is present with exactly this value.
    Equals(String),
    /// The key is absent or has another value.
    NotEquals(String),
    /// The key is present.
    Exists,
    /// The key is absent.
    Absent,
}

/// Bytes one task moves over its node's access link, so placement can weigh bandwidth: a
/// video segment is megabytes, and a home uplink is a few Mbit/s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Transfer {
    /// Bytes the task downloads to the node (its input).
    pub bytes_in: u64,
    /// Bytes the task uploads from the node (its output).
    pub bytes_out: u64,
}

/// One placement request: `count` replicas or tasks with the same needs.
#[derive(Clone, Debug, PartialEq)]
pub struct PlacementRequest {
    /// Function replicas or batch tasks.
    pub kind: WorkloadKind,
    /// The sandbox the workload needs.
    pub runtime: Runtime,
    /// Architectures the workload runs on (any, for wasm).
    pub arch: ArchSet,
    /// CPU per replica, in cores (0.25 = a quarter core).
    pub cpu_cores: f64,
    /// Memory per replica, in MiB.
    pub memory_mib: f64,
    /// Scratch disk per replica, in MiB.
    pub disk_mib: f64,
    /// Minimum uplink of the node, in Mbit/s (video segments upload their output).
    pub min_uplink_mbps: f64,
    /// Number of replicas or tasks; at least one.
    pub count: u32,
    /// Keep to this region, if set.
    pub region: Option<String>,
    /// Where the callers are.
    pub origin: Origin,
    /// Reputation floor; `None` takes the placer's default.
    pub min_reputation: Option<f32>,
    /// Label constraints; all must hold.
    pub labels: Vec<LabelConstraint>,
    /// Nodes already running replicas of this function: never chosen again, and their zones
    /// are avoided when others exist.
    pub existing: Vec<NodeId>,
    /// Bin-pack or spread.
    pub fit: Fit,
    /// Bytes each replica or task moves, if known: turns on the bandwidth scorer. `None`
    /// (or zero bytes both ways) leaves the scores as they are without it.
    pub transfer: Option<Transfer>,
}

impl Default for PlacementRequest {
    fn default() -> Self {
        PlacementRequest {
            kind: WorkloadKind::Function,
            runtime: Runtime::Wasm,
            arch: ArchSet::ANY,
            cpu_cores: 0.1,
            memory_mib: 128.0,
            disk_mib: 0.0,
            min_uplink_mbps: 0.0,
            count: 1,
            region: None,
            origin: Origin::Anywhere,
            min_reputation: None,
            labels: Vec::new(),
            existing: Vec::new(),
            fit: Fit::Spread,
            transfer: None,
        }
    }
}

/// Why a request was refused before any node was looked at.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// A resource amount is negative, NaN or infinite.
    #[error("{field} must be a finite, non-negative number, got {value}")]
    InvalidResource {
        /// The field name.
        field: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// A resource amount is larger than any node could ever offer.
    #[error("{field} = {value} is larger than any node can offer")]
    ResourceTooLarge {
        /// The field name.
        field: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// Zero replicas or tasks.
    #[error("count must be at least 1 (zero replicas or tasks were asked for)")]
    ZeroCount,
    /// More replicas or tasks than nodes: each needs a node of its own.
    #[error(
        "count {count} exceeds the {nodes} nodes known; each replica or task needs its own node"
    )]
    CountExceedsNodes {
        /// Replicas or tasks asked for.
        count: u32,
        /// Nodes in the table.
        nodes: usize,
    },
    /// The region constraint names a region no node is in.
    #[error("unknown region `{name}`; known regions: {known}")]
    UnknownRegion {
        /// The requested name.
        name: String,
        /// The regions the table knows, comma-separated.
        known: String,
    },
    /// The origin names a zone no node is in.
    #[error("unknown zone `{region}/{zone}`")]
    UnknownZone {
        /// Region name.
        region: String,
        /// Zone name.
        zone: String,
    },
    /// The origin coordinate is not finite.
    #[error("origin coordinate must be finite with a non-negative height")]
    InvalidOrigin,
    /// The reputation floor is outside [0, 1].
    #[error("min_reputation must be within [0, 1], got {0}")]
    InvalidReputation(f32),
    /// A label constraint has an empty key.
    #[error("label constraint keys must be non-empty")]
    EmptyLabelKey,
}

/// A label constraint with its strings replaced by interned symbols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResolvedLabel {
    /// Key present with value; `None` symbols never occur in the table.
    Equals(Option<Sym>, Option<Sym>),
    NotEquals(Option<Sym>, Option<Sym>),
    Exists(Option<Sym>),
    Absent(Option<Sym>),
}

/// A transfer estimate in the units the bandwidth scorer divides by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ResolvedTransfer {
    /// Input in kbit: seconds on the downlink = `in_kbit / downlink_kbps`.
    pub in_kbit: f32,
    /// Output in kbit: seconds on the uplink = `out_kbit / uplink_kbps`.
    pub out_kbit: f32,
    /// `1 / t_ref`, where `t_ref` is the seconds the same bytes take at the reference rate
    /// both ways.
    pub inv_ref_s: f32,
}

impl ResolvedTransfer {
    /// The estimate for `t`, or `None` when it moves no bytes (bandwidth is then irrelevant).
    fn new(t: Transfer) -> Option<Self> {
        let in_kbit = t.bytes_in as f64 * 8.0 / 1000.0;
        let out_kbit = t.bytes_out as f64 * 8.0 / 1000.0;
        let ref_s = (in_kbit + out_kbit) / f64::from(BANDWIDTH_REF_KBPS);
        (ref_s > 0.0).then(|| ResolvedTransfer {
            in_kbit: in_kbit as f32,
            out_kbit: out_kbit as f32,
            inv_ref_s: (1.0 / ref_s) as f32,
        })
    }

    /// Estimated seconds over links of these speeds; infinite when a link that must carry
    /// bytes has none.
    #[inline]
    pub fn seconds(&self, downlink_kbps: u32, uplink_kbps: u32) -> f32 {
        let leg = |kbit: f32, kbps: u32| {
            if kbit == 0.0 {
                0.0
            } else if kbps == 0 {
                f32::INFINITY
            } else {
                kbit / kbps as f32
            }
        };
        leg(self.in_kbit, downlink_kbps) + leg(self.out_kbit, uplink_kbps)
    }
}

/// A checked request bound to one table: what the filter and scorer stages evaluate.
#[derive(Clone, Debug)]
pub struct ResolvedRequest {
    pub(crate) kind: WorkloadKind,
    pub(crate) runtime: Runtime,
    pub(crate) arch: ArchSet,
    pub(crate) ask: Resources,
    pub(crate) min_uplink_kbps: u32,
    pub(crate) count: u32,
    pub(crate) region: Option<u16>,
    pub(crate) origin: Option<Coordinate>,
    pub(crate) origin_zone: Option<u16>,
    pub(crate) min_reputation: f32,
    pub(crate) labels: Vec<ResolvedLabel>,
    /// Slots that must not be chosen (existing and already-placed replicas), sorted.
    pub(crate) avoid: Vec<u32>,
    /// Zones that already hold a replica, sorted.
    pub(crate) avoid_zones: Vec<u16>,
    pub(crate) fit: Fit,
    /// The transfer estimate, if the request moves bytes: the bandwidth scorer applies.
    pub(crate) transfer: Option<ResolvedTransfer>,
    pub(crate) weights: Weights,
    pub(crate) latency_scale_ms: f32,
}

fn amount(field: &'static str, value: f64, scale: f64) -> Result<u32, RequestError> {
    if !value.is_finite() || value < 0.0 {
        return Err(RequestError::InvalidResource { field, value });
    }
    let scaled = (value * scale).ceil();
    if scaled > f64::from(u32::MAX) {
        return Err(RequestError::ResourceTooLarge { field, value });
    }
    Ok(scaled as u32)
}

impl ResolvedRequest {
    /// Checks `req` against `table` and interns its names; refuses invalid requests.
    pub(crate) fn resolve(
        table: &NodeTable,
        req: &PlacementRequest,
        weights: Weights,
        latency_scale_ms: f32,
        default_min_reputation: f32,
    ) -> Result<Self, RequestError> {
        let ask = Resources::new(
            amount("cpu_cores", req.cpu_cores, 1000.0)?,
            amount("memory_mib", req.memory_mib, 1.0)?,
            amount("disk_mib", req.disk_mib, 1.0)?,
        );
        let min_uplink_kbps = amount("min_uplink_mbps", req.min_uplink_mbps, 1000.0)?;
        if req.count == 0 {
            return Err(RequestError::ZeroCount);
        }
        let min_reputation = req.min_reputation.unwrap_or(default_min_reputation);
        if !(min_reputation.is_finite() && (0.0..=1.0).contains(&min_reputation)) {
            return Err(RequestError::InvalidReputation(min_reputation));
        }
        let region = match &req.region {
            None => None,
            Some(name) => Some(
                table
                    .region_id(name)
                    .ok_or_else(|| RequestError::UnknownRegion {
                        name: name.clone(),
                        known: table.region_names().join(", "),
                    })?
                    .0,
            ),
        };
        let (origin, origin_zone) = match &req.origin {
            Origin::Anywhere => (None, None),
            Origin::Coordinate(c) => {
                if !c.is_valid() {
                    return Err(RequestError::InvalidOrigin);
                }
                (Some(*c), table.nearest_zone(c))
            }
            Origin::Zone { region, zone } => {
                let z = table
                    .zone_id(region, zone)
                    .ok_or_else(|| RequestError::UnknownZone {
                        region: region.clone(),
                        zone: zone.clone(),
                    })?;
                let centroid = table.zones[z.0 as usize].centroid();
                (
                    Some(Coordinate {
                        vec: centroid,
                        height_ms: 0.0,
                    }),
                    Some(z.0),
                )
            }
        };
        let mut labels = Vec::with_capacity(req.labels.len());
        for c in &req.labels {
            if c.key.is_empty() {
                return Err(RequestError::EmptyLabelKey);
            }
            let k = table.symbol(&c.key);
            labels.push(match &c.op {
                LabelOp::Equals(v) => ResolvedLabel::Equals(k, table.symbol(v)),
                LabelOp::NotEquals(v) => ResolvedLabel::NotEquals(k, table.symbol(v)),
                LabelOp::Exists => ResolvedLabel::Exists(k),
                LabelOp::Absent => ResolvedLabel::Absent(k),
            });
        }
        let mut avoid = Vec::with_capacity(req.existing.len());
        let mut avoid_zones = Vec::new();
        for id in &req.existing {
            if let Some(slot) = table.slot_of(*id) {
                avoid.push(slot.0);
                avoid_zones.push(table.rec(slot.0).zone);
            }
        }
        avoid.sort_unstable();
        avoid.dedup();
        avoid_zones.sort_unstable();
        avoid_zones.dedup();
        Ok(ResolvedRequest {
            kind: req.kind,
            runtime: req.runtime,
            arch: req.arch,
            ask,
            min_uplink_kbps,
            count: req.count,
            region,
            origin,
            origin_zone,
            min_reputation,
            labels,
            avoid,
            avoid_zones,
            fit: req.fit,
            transfer: req.transfer.and_then(ResolvedTransfer::new),
            weights,
            latency_scale_ms,
        })
    }

    /// Resources each replica or task takes from its node.
    pub fn ask(&self) -> Resources {
        self.ask
    }

    /// Number of replicas or tasks asked for.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Marks `slot` as taken by this request (its zone becomes one to spread away from).
    pub fn avoid_slot(&mut self, slot: u32, zone: u16) {
        if let Err(i) = self.avoid.binary_search(&slot) {
            self.avoid.insert(i, slot);
        }
        if let Err(i) = self.avoid_zones.binary_search(&zone) {
            self.avoid_zones.insert(i, zone);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(req: &PlacementRequest) -> Result<ResolvedRequest, RequestError> {
        ResolvedRequest::resolve(&NodeTable::new(), req, Weights::default(), 20.0, 0.5)
    }

    #[test]
    fn invalid_requests_are_typed_errors() {
        type Check = fn(&RequestError) -> bool;
        let cases: Vec<(PlacementRequest, Check)> = vec![
            (
                PlacementRequest {
                    cpu_cores: -1.0,
                    ..Default::default()
                },
                |e| {
                    matches!(
                        e,
                        RequestError::InvalidResource {
                            field: "cpu_cores",
                            ..
                        }
                    )
                },
            ),
            (
                PlacementRequest {
                    memory_mib: f64::NAN,
                    ..Default::default()
                },
                |e| {
                    matches!(
                        e,
                        RequestError::InvalidResource {
                            field: "memory_mib",
                            ..
                        }
                    )
                },
            ),
            (
                PlacementRequest {
                    disk_mib: f64::INFINITY,
                    ..Default::default()
                },
                |e| matches!(e, RequestError::InvalidResource { .. }),
            ),
            (
                PlacementRequest {
                    cpu_cores: 1e12,
                    ..Default::default()
                },
                |e| matches!(e, RequestError::ResourceTooLarge { .. }),
            ),
            (
                PlacementRequest {
                    count: 0,
                    ..Default::default()
                },
                |e| matches!(e, RequestError::ZeroCount),
            ),
            (
                PlacementRequest {
                    region: Some("mars".into()),
                    ..Default::default()
                },
                |e| matches!(e, RequestError::UnknownRegion { .. }),
            ),
            (
                PlacementRequest {
                    min_reputation: Some(1.5),
                    ..Default::default()
                },
                |e| matches!(e, RequestError::InvalidReputation(_)),
            ),
            (
                PlacementRequest {
                    origin: Origin::Zone {
                        region: "cn".into(),
                        zone: "x".into(),
                    },
                    ..Default::default()
                },
                |e| matches!(e, RequestError::UnknownZone { .. }),
            ),
            (
                PlacementRequest {
                    origin: Origin::Coordinate(Coordinate {
                        vec: [f32::NAN; 3],
                        height_ms: 0.0,
                    }),
                    ..Default::default()
                },
                |e| matches!(e, RequestError::InvalidOrigin),
            ),
        ];
        for (req, check) in cases {
            let err = resolve(&req).unwrap_err();
            assert!(check(&err), "{err:?} for {req:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn amounts_round_up_to_whole_units() {
        let r = resolve(&PlacementRequest {
            cpu_cores: 0.0001,
            memory_mib: 0.5,
            min_uplink_mbps: 2.5,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.ask(), Resources::new(1, 1, 0));
        assert_eq!(r.min_uplink_kbps, 2500);
    }

    #[test]
    fn transfers_resolve_to_seconds_per_link() {
        let with = |bytes_in, bytes_out| {
            resolve(&PlacementRequest {
                transfer: Some(Transfer {
                    bytes_in,
                    bytes_out,
                }),
                ..Default::default()
            })
            .unwrap()
            .transfer
        };
        assert_eq!(with(0, 0), None, "moving nothing leaves bandwidth out");
        let t = with(2_500_000, 1_250_000).unwrap();
        // 20 Mbit in at 100 Mbit/s + 10 Mbit out at 10 Mbit/s.
        assert!((t.seconds(100_000, 10_000) - 1.2).abs() < 1e-5);
        // The reference: 30 Mbit at 20 Mbit/s.
        assert!((1.0 / t.inv_ref_s - 1.5).abs() < 1e-5);
        assert_eq!(t.seconds(0, 10_000), f32::INFINITY);
        let upload_only = with(0, 1_000_000).unwrap();
        assert!((upload_only.seconds(0, 8_000) - 1.0).abs() < 1e-6);
    }
}
