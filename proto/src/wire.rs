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

/// A stable error code: what clients match on, its HTTP status and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StableCode {
    /// The code (`x-stellar-error`, the HTTP body's `error.code`, `InvokeResponse.error_code`).
    pub code: &'static str,
    /// The HTTP status a gateway answers it with.
    pub http: u16,
    /// What it means for the caller, and whether the call may have run.
    pub meaning: &'static str,
}

const fn code(code: &'static str, http: u16, meaning: &'static str) -> StableCode {
    StableCode {
        code,
        http,
        meaning,
    }
}

/// Every code of a gateway's refusal of a call (gRPC `x-stellar-error`, the HTTP error body):
/// the one list, which the gateway, its OpenAPI document and the tests are checked against.
pub const GATEWAY_ERROR_CODES: &[StableCode] = &[
    code(
        "INVALID_ARGUMENT",
        400,
        "the request is malformed or over a limit; it did not run",
    ),
    code(
        "UNAUTHENTICATED",
        401,
        "no token, or an unknown or revoked one; it did not run",
    ),
    code(
        "PERMISSION_DENIED",
        403,
        "the token may not call this function; it did not run",
    ),
    code(
        "NOT_FOUND",
        404,
        "no such function for this tenant (or no such route); it did not run",
    ),
    code(
        "METHOD_NOT_ALLOWED",
        405,
        "the route takes another method (HTTP only)",
    ),
    code(
        "PAYLOAD_TOO_LARGE",
        413,
        "the body is over the 8 MiB stdin limit (HTTP only)",
    ),
    code(
        "URI_TOO_LONG",
        414,
        "the request target is over 8 KiB (HTTP only)",
    ),
    code(
        "MODULE_LOAD_FAILED",
        500,
        "the function's module failed to load on several workers; deploy a new version",
    ),
    code("INTERNAL", 500, "an unexpected failure; it may have run"),
    code(
        "WORKER_LOST",
        502,
        "the worker vanished mid-call; it may have run",
    ),
    code(
        "NO_READY_INSTANCE",
        503,
        "instances exist but none was ready in time; it did not run, retry",
    ),
    code(
        "NO_CAPACITY",
        503,
        "no instance exists and none can be placed; it did not run",
    ),
    code(
        "UNAVAILABLE",
        503,
        "the gateway could not serve it now (election, overload); it did not run, retry",
    ),
    code(
        "DEADLINE_EXCEEDED",
        504,
        "the worker did not answer in time; it may have run",
    ),
];

/// Every `InvokeResponse.error_code`: the call reached a worker and did not succeed (HTTP
/// answers 500 with the code, the message and the function's stderr).
pub const CALL_ERROR_CODES: &[StableCode] = &[
    code(
        "OUT_OF_FUEL",
        500,
        "the function used up its fuel (`FunctionLimits.fuel`)",
    ),
    code(
        "DEADLINE_EXCEEDED",
        500,
        "the function ran past its timeout",
    ),
    code(
        "MEMORY_LIMIT",
        500,
        "the function tried to grow past its memory limit",
    ),
    code(
        "OUTPUT_TOO_LARGE",
        500,
        "stdout or stderr went past the output cap (what fit is kept)",
    ),
    code(
        "TRAP",
        500,
        "the function trapped (a panic, an out-of-bounds access)",
    ),
    code(
        "EXIT_CODE",
        500,
        "the function exited with a non-zero status",
    ),
    code(
        "INSTANTIATE",
        500,
        "the function could not start with these limits",
    ),
    code("PIDS_LIMIT", 500, "a container reached its process limit"),
    code(
        "SIGNALLED",
        500,
        "a container's program was killed by a signal",
    ),
    code(
        "IMAGE_INVALID",
        500,
        "the container image cannot run on the node",
    ),
    code(
        "SANDBOX_FAILED",
        500,
        "the node could not build the sandbox (the node's fault)",
    ),
    code(
        "BAD_TICKET",
        500,
        "the worker refused a call whose ticket did not match; it did not run",
    ),
    code(
        "BAD_RECEIPT",
        500,
        "the worker's receipt was refused; its output was discarded",
    ),
    code(
        "UNAVAILABLE",
        500,
        "the worker could not take the call now; it did not run",
    ),
    code(
        "RESOURCE_EXHAUSTED",
        500,
        "the worker had no room for the call; it did not run",
    ),
];

/// The stable code `code` of a gateway refusal, if it is one.
pub fn gateway_error(code: &str) -> Option<&'static StableCode> {
    GATEWAY_ERROR_CODES.iter().find(|c| c.code == code)
}
