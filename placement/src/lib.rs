//! StellarCloud's placement engine: decides which home nodes run a workload.
//!
//! Pure and synchronous (no I/O, no async, no clock), so the control plane and the
//! million-node simulator run the very same code. See the crate README for the flow.

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
    WorkloadKind,
};
pub use stages::{Diagnosis, FilterKind, Score, Weights};
pub use table::{NodeTable, NodeView, RegionId, Slot, TableError, ZoneId};
pub use vivaldi::{Coordinate, VivaldiConfig, VivaldiError, VivaldiNode};
