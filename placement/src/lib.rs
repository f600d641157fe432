//! StellarCloud's placement engine: decides which home nodes run a workload.
//!
//! Pure and synchronous (no I/O, no async, no clock), so the control plane and the
//! million-node simulator run the very same code. See the crate README for the flow.
//!
//! ```
//! use stellar_placement::*;
//!
//! let mut table = NodeTable::new();
//! for (i, zone, x) in [(1, "shanghai", 0.0), (2, "shanghai", 0.5), (3, "chengdu", 30.0)] {
//!     table.join(NodeSpec {
//!         id: NodeId(i),
//!         region: if zone == "chengdu" { "cn-southwest" } else { "cn-east" }.into(),
//!         zone: zone.into(),
//!         arch: Arch::Aarch64,
//!         runtimes: RuntimeSet::WASM,
//!         capacity: Resources::new(4000, 4096, 32_768),
//!         free: Resources::new(4000, 4096, 32_768),
//!         bandwidth: Bandwidth { uplink_kbps: 50_000, downlink_kbps: 300_000 },
//!         reputation: 0.95,
//!         labels: vec![("isp".into(), "telecom".into())],
//!         coordinate: Coordinate { vec: [x, 0.0, 0.0], height_ms: 1.0 },
//!         state: NodeState::Ready,
//!     })?;
//! }
//! let mut placer = Placer::new(PlacerConfig::default(), 42)?;
//! let request = PlacementRequest {
//!     cpu_cores: 0.5,
//!     memory_mib: 256.0,
//!     count: 2,
//!     origin: Origin::Zone { region: "cn-east".into(), zone: "shanghai".into() },
//!     ..Default::default()
//! };
//! let placed = placer.place(&mut table, &request)?;
//! // Two replicas on two nodes, the first in the callers' city.
//! assert_eq!(placed.len(), 2);
//! assert_ne!(placed[0].node, placed[1].node);
//! assert_eq!(table.node(placed[0].slot).unwrap().zone, "shanghai");
//!
//! // Asking for more than any node has free says why, per filter.
//! let huge = PlacementRequest { memory_mib: 65_536.0, ..Default::default() };
//! let err = placer.place(&mut table, &huge).unwrap_err();
//! assert!(err.to_string().contains("0/3 nodes are available: 3 Insufficient memory"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod error;
pub mod node;
pub mod placer;
pub mod request;
pub mod stages;
pub mod table;
pub mod vivaldi;

pub use error::{PlacementError, Result};
pub use node::{
    Arch, ArchSet, Bandwidth, NodeId, NodeSpec, NodeState, Resources, Runtime, RuntimeSet,
};
pub use placer::{ConfigError, Placement, Placer, PlacerConfig, SampleSize, SearchStats};
pub use request::{
    Fit, LabelConstraint, LabelOp, Origin, PlacementRequest, RequestError, ResolvedRequest,
    Transfer, WorkloadKind,
};
pub use stages::{BANDWIDTH_REF_KBPS, Diagnosis, FilterKind, Score, Weights};
pub use table::{NodeTable, NodeView, RegionId, Slot, TableError, ZoneId};
pub use vivaldi::{
    Coordinate, LATENCY_FILTER_WINDOW, LatencyFilter, VivaldiConfig, VivaldiError, VivaldiNode,
};
