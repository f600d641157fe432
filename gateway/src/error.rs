//! Why an invocation failed before the function could answer, with the stable code every
//! client matches on (gRPC `x-stellar-error` metadata, the HTTP error body), and the one
//! place these errors become `tonic::Status`.

use stellar_proto::wire::ERROR_METADATA;
use tonic::{Code, Status};

/// Why a gateway could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is wrong or a port is taken; the message says what to change.
    #[error("{0}")]
    Config(String),
}

/// Why an invocation failed before the function could answer; each has a stable code for
/// HTTP clients.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GatewayError {
    /// No such function for this tenant.
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong (too large, bad name).
    #[error("{0}")]
    InvalidArgument(String),
    /// Instances exist but none became ready in time.
    #[error("{0}")]
    NoReadyInstance(String),
    /// No instance exists and none can be placed (the placer's diagnosis says why).
    #[error("{0}")]
    NoCapacity(String),
    /// The worker vanished mid-call and the function is not idempotent (or the retry failed).
    #[error("{0}")]
    WorkerLost(String),
    /// The worker did not answer in time.
    #[error("{0}")]
    Timeout(String),
    /// The control plane could not serve the call now (election, storage, overload).
    #[error("{0}")]
    Unavailable(String),
    /// The function's module failed to load on several workers; it is not placed again
    /// until a new version is deployed.
    #[error("{0}")]
    ModuleLoadFailed(String),
    /// The caller's token no longer allows the call (revoked between gateways).
    #[error("{0}")]
    Denied(String),
}

impl GatewayError {
    /// The stable error code HTTP clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NotFound(_) => "NOT_FOUND",
            GatewayError::InvalidArgument(_) => "INVALID_ARGUMENT",
            GatewayError::NoReadyInstance(_) => "NO_READY_INSTANCE",
            GatewayError::NoCapacity(_) => "NO_CAPACITY",
            GatewayError::WorkerLost(_) => "WORKER_LOST",
            GatewayError::Timeout(_) => "DEADLINE_EXCEEDED",
            GatewayError::Unavailable(_) => "UNAVAILABLE",
            GatewayError::ModuleLoadFailed(_) => "MODULE_LOAD_FAILED",
            GatewayError::Denied(_) => "PERMISSION_DENIED",
        }
    }

    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        http_status_of(self.code())
    }

    /// The gRPC status, with the stable code in `x-stellar-error` metadata.
    pub fn into_status(self) -> Status {
        let msg = stellar_proto::text::clip_message(self.to_string());
        let code = self.code();
        let mut s = match &self {
            GatewayError::NotFound(_) => Status::not_found(msg),
            GatewayError::InvalidArgument(_) => Status::invalid_argument(msg),
            GatewayError::NoCapacity(_) | GatewayError::ModuleLoadFailed(_) => {
                Status::failed_precondition(msg)
            }
            GatewayError::Timeout(_) => Status::deadline_exceeded(msg),
            GatewayError::Denied(_) => Status::permission_denied(msg),
            GatewayError::NoReadyInstance(_)
            | GatewayError::WorkerLost(_)
            | GatewayError::Unavailable(_) => Status::unavailable(msg),
        };
        if let Ok(v) = code.parse() {
            s.metadata_mut().insert(ERROR_METADATA, v);
        }
        s
    }
}

/// The HTTP status for a gateway error code (also for codes read back from gRPC metadata).
pub fn http_status_of(code: &str) -> u16 {
    stellar_proto::wire::gateway_error(code).map_or(503, |c| c.http)
}

impl GatewayError {
    /// The error a peer (the control plane, another gateway) answered with, by its stable
    /// code when it has one, else by its gRPC code.
    pub fn from_status(s: &Status) -> GatewayError {
        let msg = s.message().to_string();
        let stable = s
            .metadata()
            .get(ERROR_METADATA)
            .and_then(|v| v.to_str().ok());
        match stable {
            Some("NOT_FOUND") => GatewayError::NotFound(msg),
            Some("INVALID_ARGUMENT") => GatewayError::InvalidArgument(msg),
            Some("NO_READY_INSTANCE") => GatewayError::NoReadyInstance(msg),
            Some("NO_CAPACITY") => GatewayError::NoCapacity(msg),
            Some("WORKER_LOST") => GatewayError::WorkerLost(msg),
            Some("DEADLINE_EXCEEDED") => GatewayError::Timeout(msg),
            Some("MODULE_LOAD_FAILED") => GatewayError::ModuleLoadFailed(msg),
            Some("PERMISSION_DENIED") => GatewayError::Denied(msg),
            Some(_) => GatewayError::Unavailable(msg),
            None => match s.code() {
                Code::NotFound => GatewayError::NotFound(msg),
                Code::InvalidArgument => GatewayError::InvalidArgument(msg),
                Code::FailedPrecondition => GatewayError::NoCapacity(msg),
                Code::DeadlineExceeded => GatewayError::Timeout(msg),
                Code::Unauthenticated | Code::PermissionDenied => GatewayError::Denied(msg),
                _ => GatewayError::Unavailable(msg),
            },
        }
    }
}

impl GatewayError {
    /// The failure of a call forwarded to the gateway holding the instance: the peer's own
    /// answer when it gave one (its refusals carry a stable code); a transport failure after
    /// the request left may have run the call (WORKER_LOST, never retried as "did not run"),
    /// one before any connection was made did not.
    pub fn from_forwarded(s: &Status) -> GatewayError {
        let stable = s.metadata().get(ERROR_METADATA).is_some();
        let broke = matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
        );
        if !stable && broke && !stellar_proto::client::never_connected(s) {
            return GatewayError::WorkerLost(format!(
                "the gateway holding the instance gave no answer ({}); the call may have run",
                s.message()
            ));
        }
        GatewayError::from_status(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_stable_codes_to_grpc_and_http() {
        let e = GatewayError::NoReadyInstance("none".into());
        assert_eq!((e.code(), e.http_status()), ("NO_READY_INSTANCE", 503));
        let s = e.into_status();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.metadata().get(ERROR_METADATA).unwrap(),
            "NO_READY_INSTANCE"
        );
        assert_eq!(GatewayError::NotFound("x".into()).http_status(), 404);
        assert_eq!(GatewayError::WorkerLost("x".into()).http_status(), 502);
        assert_eq!(GatewayError::Timeout("x".into()).http_status(), 504);
        // A peer's answer keeps its stable code across the hop.
        let peer = GatewayError::WorkerLost("gone".into()).into_status();
        assert_eq!(GatewayError::from_status(&peer).code(), "WORKER_LOST");
        assert_eq!(
            GatewayError::from_status(&Status::not_found("function `f` not found")).code(),
            "NOT_FOUND"
        );
    }

    #[test]
    fn a_forward_that_broke_after_sending_may_have_run_and_is_not_retried() {
        // A connection that broke mid-call: no stable code.
        let broke = GatewayError::from_forwarded(&Status::unknown("h2 protocol error"));
        assert_eq!(broke.code(), "WORKER_LOST");
        assert!(!stellar_proto::client::did_not_run(&broke.into_status()));
        // The peer's own refusals keep their meaning.
        let peer = GatewayError::NoReadyInstance("none".into()).into_status();
        assert_eq!(
            GatewayError::from_forwarded(&peer).code(),
            "NO_READY_INSTANCE"
        );
        let denied = GatewayError::Denied("revoked".into()).into_status();
        assert_eq!(
            GatewayError::from_forwarded(&denied).code(),
            "PERMISSION_DENIED"
        );
    }

    #[test]
    fn every_refusal_is_in_the_one_list_of_stable_codes_and_survives_a_hop() {
        let all = [
            GatewayError::NotFound(String::new()),
            GatewayError::InvalidArgument(String::new()),
            GatewayError::NoReadyInstance(String::new()),
            GatewayError::NoCapacity(String::new()),
            GatewayError::WorkerLost(String::new()),
            GatewayError::Timeout(String::new()),
            GatewayError::Unavailable(String::new()),
            GatewayError::ModuleLoadFailed(String::new()),
            GatewayError::Denied(String::new()),
        ];
        for e in all {
            let listed = stellar_proto::wire::gateway_error(e.code())
                .unwrap_or_else(|| panic!("{} is not in GATEWAY_ERROR_CODES", e.code()));
            assert_eq!(e.http_status(), listed.http, "{}", e.code());
            let code = e.code();
            assert_eq!(GatewayError::from_status(&e.into_status()).code(), code);
        }
    }
}
