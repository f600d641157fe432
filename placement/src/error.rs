//! The errors a placement decision can end in; each says what to change to succeed.

use crate::request::RequestError;
use crate::stages::Diagnosis;
use crate::table::TableError;

/// Why a placement produced no (complete) result; nothing was reserved in any case.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// The request itself is invalid; no node was looked at.
    #[error("invalid placement request: {0}")]
    Invalid(#[from] RequestError),
    /// No node in the table can take even one replica.
    #[error("no node can take this workload: {0}")]
    NoFeasibleNode(Diagnosis),
    /// Fewer distinct feasible nodes exist than replicas or tasks were asked for.
    #[error(
        "only {found} of the {wanted} distinct nodes needed can take this workload: {diagnosis}"
    )]
    NotEnoughNodes {
        /// Replicas or tasks asked for.
        wanted: u32,
        /// Distinct feasible nodes found.
        found: u32,
        /// What the filters removed in the last search.
        diagnosis: Diagnosis,
    },
    /// The table refused an operation (an internal inconsistency; please report it).
    #[error(transparent)]
    Table(#[from] TableError),
}

/// Result alias for placement decisions.
pub type Result<T, E = PlacementError> = std::result::Result<T, E>;
