//! The control plane's errors: one enum for what the state machine refuses (carried in the
//! log's results, so it has stable codes) and one for everything a caller can be told.
//! Conversion to `tonic::Status` happens only at the gRPC edge (`service.rs`).

use stellar_placement::PlacementError;

/// The control plane's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the deterministic state machine refused a command; the command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The command is malformed or out of range; resending it unchanged fails again.
    #[error("{0}")]
    Invalid(String),
    /// A tenant, function, node or allocation the command names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The command would create something that exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// A placement plan no longer holds against the state it was applied to; the leader
    /// re-plans.
    #[error("stale plan: {0}")]
    StalePlan(String),
    /// A size or count limit of the cluster would be exceeded.
    #[error("{0}")]
    Limit(String),
}

/// The stored code of a refused plan (the leader re-plans; the dedupe table forgets it).
pub const STALE_PLAN: &str = "stale_plan";

impl ApplyError {
    /// The stable code stored in results and shown to API clients.
    pub fn code(&self) -> &'static str {
        match self {
            ApplyError::Invalid(_) => "invalid_argument",
            ApplyError::NotFound(_) => "not_found",
            ApplyError::AlreadyExists(_) => "already_exists",
            ApplyError::StalePlan(_) => STALE_PLAN,
            ApplyError::Limit(_) => "resource_exhausted",
        }
    }

    /// Rebuilds an error from its stored code and message (results kept for retried requests).
    pub fn from_code(code: &str, message: &str) -> ApplyError {
        let m = message.to_string();
        match code {
            "not_found" => ApplyError::NotFound(m),
            "already_exists" => ApplyError::AlreadyExists(m),
            STALE_PLAN => {
                ApplyError::StalePlan(m.strip_prefix("stale plan: ").unwrap_or(&m).to_string())
            }
            "resource_exhausted" => ApplyError::Limit(m),
            _ => ApplyError::Invalid(m),
        }
    }
}

/// Everything a request to the control plane can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// This replica is not the leader; retry on `address` (unknown while an election runs).
    #[error("not the leader; {}", leader_hint(*.leader, .address.as_deref()))]
    NotLeader {
        /// The leader's replica id, if known.
        leader: Option<u64>,
        /// The leader's client address, if known.
        address: Option<String>,
    },
    /// The state machine refused the command.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// No node can take the workload (message says which filters refused how many nodes).
    #[error("{0}")]
    Placement(String),
    /// Leadership changed while the write was in flight: it may or may not have committed.
    /// Retrying with the same request id is safe (the state machine deduplicates).
    #[error("leadership changed while the request was in flight; retry with the same request id")]
    OutcomeUnknown,
    /// The proposal queue is full: back off and retry.
    #[error("the control plane is overloaded (proposal queue full); back off and retry")]
    Overloaded,
    /// The request did not complete in time (no quorum, or a slow disk).
    #[error("timed out after {0} ms waiting for the cluster; is a quorum of replicas up?")]
    Timeout(u64),
    /// The replica's disk refused a write; committed data is intact, new writes wait.
    #[error("storage error: {0}")]
    Storage(String),
    /// The replica's configuration or data directory is not usable.
    #[error("configuration error: {0}")]
    Config(String),
    /// The replica is shutting down.
    #[error("the replica is shutting down")]
    Stopped,
}

pub use stellar_proto::text::{MAX_ERROR_MESSAGE, clip_message, truncate_chars};

fn leader_hint(leader: Option<u64>, address: Option<&str>) -> String {
    match (leader, address) {
        (Some(id), Some(addr)) => format!("the leader is replica {id} at {addr}"),
        (Some(id), None) => format!("the leader is replica {id}"),
        _ => "no leader is known yet (election in progress); retry shortly".to_string(),
    }
}

impl From<PlacementError> for Error {
    fn from(e: PlacementError) -> Self {
        Error::Placement(e.to_string())
    }
}

impl From<raft_engine::Error> for Error {
    fn from(e: raft_engine::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for e in [
            ApplyError::Invalid("x".into()),
            ApplyError::StalePlan("y".into()),
            ApplyError::Limit("z".into()),
        ] {
            let back = ApplyError::from_code(e.code(), &e.to_string());
            assert_eq!(back, e);
        }
    }

    #[test]
    fn long_messages_are_clipped_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let c = clip_message(long);
        assert!(c.len() <= MAX_ERROR_MESSAGE, "{}", c.len());
        assert!(c.ends_with('…'));
        assert_eq!(clip_message("short".into()), "short");
    }

    #[test]
    fn not_leader_says_where_to_go() {
        let e = Error::NotLeader {
            leader: Some(2),
            address: Some("127.0.0.1:7002".into()),
        };
        assert!(e.to_string().contains("127.0.0.1:7002"));
        let e = Error::NotLeader {
            leader: None,
            address: None,
        };
        assert!(e.to_string().contains("election"));
    }
}
