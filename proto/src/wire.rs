//! Conventions every role follows on the wire beyond the generated messages: the metadata
//! keys that tell a client where the leader is and which stable error it got.

/// Trailing metadata naming the leader's address on an UNAVAILABLE answer from a replica
/// that does not lead (clients follow it).
pub const LEADER_METADATA: &str = "x-stellar-leader";

/// Metadata carrying an invocation error's stable code (`NO_READY_INSTANCE`,
/// `WORKER_LOST`, ...) on gRPC answers: what tells the four kinds of UNAVAILABLE apart.
pub const ERROR_METADATA: &str = "x-stellar-error";

/// Set by a gateway on an invocation it forwards to the gateway that holds the instance, so
/// the receiver runs it on its own workers and never forwards it again.
pub const FORWARDED_METADATA: &str = "x-stellar-forwarded";
