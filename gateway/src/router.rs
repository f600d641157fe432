//! The invocation gateway on the leader: finds a function's ready instances, routes each
//! call by estimated latency to the caller and outstanding requests (power of two choices),
//! places a first instance when a function has none (scale from zero), retries an idempotent
//! call once on another instance when its worker vanishes, keeps recent invocations for
//! `stellar logs`, and hands every usage record to the ledger.
//!
//! ```text
//!  Invoke(tenant, name, stdin, near)
//!    │ route: allocations of the current version (cached while the applied index stands)
//!    ├─ none ─▶ one caller per function: Allocate (plan-apply) ─▶ wait until ready
//!    ├─ hub.invoke: choose(near, outstanding) ─Invocation─▶ worker ─Result─▶
//!    │     worker vanished + idempotent ─▶ once more, that node excluded
//!    │     refused unrun (busy / not here) ─▶ another instance
//!    └─ answer + usage record ─▶ UsageWriter ─▶ Raft;  log ring per function
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stellar_proto::v1 as pb;
use tonic::Status;

use crate::error::{ApplyError, Error};
use crate::node::ReplicaHandle;
use crate::replica::{Query, Reply, Request};
use crate::service::{LEADER_METADATA, MAX_INVOKE_INPUT, WRITE_TIMEOUT};
use crate::usage::UsageWriter;
use crate::workers::{HubError, Near, WorkerHub};

/// Invocations kept per function for `stellar logs`.
const LOG_DEPTH: usize = 100;
/// Functions with kept logs; past it the oldest knowledge is dropped (bounded memory).
const LOG_FUNCTIONS: usize = 1_000;
/// Stderr bytes kept per logged invocation.
const LOG_STDERR: usize = 4096;
/// How long a call waits for an instance to become ready (module fetch and compile).
const READY_WAIT: Duration = Duration::from_secs(30);
/// How long a call waits for a replacement of an instance whose module failed to load
/// before it is told the module failed.
const REPLACEMENT_WAIT: Duration = Duration::from_secs(2);
/// A function's default per-invocation timeout when its limits set none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of the function's own timeout for the round trip to the worker.
const TIMEOUT_SLACK: Duration = Duration::from_secs(5);
/// Attempts for calls a worker refused without running them (busy, not running there).
const UNRUN_ATTEMPTS: u32 = 3;

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
    /// This replica does not lead; the leader's address when known.
    #[error("this replica is not the leader; retry on {}", .address.as_deref().unwrap_or("another replica"))]
    NotLeader {
        /// The leader's address.
        address: Option<String>,
    },
    /// The control plane could not serve the call now (election, storage, overload).
    #[error("{0}")]
    Unavailable(String),
    /// The function's module failed to load on several workers; it is not placed again
    /// until a new version is deployed.
    #[error("{0}")]
    ModuleLoadFailed(String),
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
            GatewayError::NotLeader { .. } => "NOT_LEADER",
            GatewayError::Unavailable(_) => "UNAVAILABLE",
            GatewayError::ModuleLoadFailed(_) => "MODULE_LOAD_FAILED",
        }
    }

    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        http_status_of(self.code())
    }

    /// The gRPC status, with the leader hint for NotLeader and the stable code in
    /// `x-stellar-error` metadata.
    pub fn into_status(self) -> Status {
        let msg = crate::error::clip_message(self.to_string());
        let code = self.code();
        let mut s = match &self {
            GatewayError::NotFound(_) => Status::not_found(msg),
            GatewayError::InvalidArgument(_) => Status::invalid_argument(msg),
            GatewayError::NoCapacity(_) | GatewayError::ModuleLoadFailed(_) => {
                Status::failed_precondition(msg)
            }
            GatewayError::Timeout(_) => Status::deadline_exceeded(msg),
            GatewayError::NoReadyInstance(_)
            | GatewayError::WorkerLost(_)
            | GatewayError::NotLeader { .. }
            | GatewayError::Unavailable(_) => Status::unavailable(msg),
        };
        if let GatewayError::NotLeader { address: Some(a) } = &self
            && let Ok(v) = a.parse()
        {
            s.metadata_mut().insert(LEADER_METADATA, v);
        }
        if let Ok(v) = code.parse() {
            s.metadata_mut().insert(ERROR_METADATA, v);
        }
        s
    }
}

/// The HTTP status for a gateway error code (also for codes read back from gRPC metadata).
pub fn http_status_of(code: &str) -> u16 {
    match code {
        "NOT_FOUND" => 404,
        "INVALID_ARGUMENT" => 400,
        "WORKER_LOST" => 502,
        "DEADLINE_EXCEEDED" => 504,
        "MODULE_LOAD_FAILED" => 500,
        _ => 503,
    }
}

/// Metadata key carrying a gateway error's stable code on gRPC answers.
pub const ERROR_METADATA: &str = "x-stellar-error";

impl From<Error> for GatewayError {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::NotLeader { address, .. } => GatewayError::NotLeader { address },
            Error::Apply(ApplyError::NotFound(_)) => GatewayError::NotFound(msg),
            Error::Apply(ApplyError::Invalid(_)) => GatewayError::InvalidArgument(msg),
            Error::Placement(_) => GatewayError::NoCapacity(msg),
            _ => GatewayError::Unavailable(msg),
        }
    }
}

/// What routing needs of a function, as last read.
#[derive(Debug)]
struct Route {
    idempotent: bool,
    timeout: Duration,
    /// (allocation, node) of the current version.
    allocations: Vec<(u64, u64)>,
    /// Workers that could not load the current version, and the last reason.
    load_failures: u32,
    load_error: String,
}

impl Route {
    /// The typed error for a version whose module failed to load and that has no instance
    /// left: at once when it is not placed again (too many failures), or after a pause
    /// (`waited`) when no other node took a replacement.
    fn broken(&self, name: &str, waited: bool) -> Option<GatewayError> {
        let gave_up = self.load_failures >= crate::state::MAX_LOAD_FAILURES
            || (waited && self.load_failures > 0);
        (self.allocations.is_empty() && gave_up).then(|| self.load_failed(name, ""))
    }

    /// The typed error for a module that failed to load and that no node runs (`detail`:
    /// why no other node takes it, when known).
    fn load_failed(&self, name: &str, detail: &str) -> GatewayError {
        GatewayError::ModuleLoadFailed(format!(
            "`{name}` failed to load on {} worker(s) ({}) and no other node is trying it{detail}. Fix the module and deploy a new version; `stellar logs {name}` shows the failures",
            self.load_failures, self.load_error
        ))
    }
}

type FunctionKey = (String, String);

/// The leader's invocation gateway (see the module docs).
#[derive(Debug)]
pub struct Gateway {
    replica: ReplicaHandle,
    hub: Arc<WorkerHub>,
    usage: UsageWriter,
    routes: Mutex<HashMap<FunctionKey, (u64, Arc<Route>)>>,
    scaling: Mutex<HashMap<FunctionKey, Arc<tokio::sync::Mutex<()>>>>,
    logs: Mutex<HashMap<FunctionKey, VecDeque<pb::InvocationLog>>>,
}

impl Gateway {
    /// A gateway over `replica`'s state and the workers attached to `hub`.
    pub fn new(replica: ReplicaHandle, hub: Arc<WorkerHub>, usage: UsageWriter) -> Self {
        Gateway {
            replica,
            hub,
            usage,
            routes: Mutex::default(),
            scaling: Mutex::default(),
            logs: Mutex::default(),
        }
    }

    /// The hub of attached workers.
    pub fn hub(&self) -> &Arc<WorkerHub> {
        &self.hub
    }

    async fn route(&self, key: &FunctionKey, fresh: bool) -> Result<Arc<Route>, GatewayError> {
        let applied = self.replica.info().applied;
        if !fresh
            && let Some(r) = self
                .routes
                .lock()
                .ok()
                .and_then(|m| m.get(key).filter(|e| e.0 == applied).map(|e| e.1.clone()))
        {
            return Ok(r);
        }
        let f = match self
            .replica
            .read(
                Query::Function {
                    tenant: key.0.clone(),
                    name: key.1.clone(),
                },
                true,
                Duration::from_secs(2),
            )
            .await?
        {
            Reply::Function(f) => f,
            other => {
                return Err(GatewayError::Unavailable(format!(
                    "unexpected reply {other:?}"
                )));
            }
        };
        let timeout_ms = f.limits.map_or(0, |l| l.timeout_ms);
        let route = Arc::new(Route {
            idempotent: f.idempotent,
            timeout: if timeout_ms == 0 {
                DEFAULT_TIMEOUT
            } else {
                Duration::from_millis(u64::from(timeout_ms))
            } + TIMEOUT_SLACK,
            allocations: f
                .allocations
                .iter()
                .filter(|a| a.version == f.version)
                .map(|a| (a.id, a.node))
                .collect(),
            load_failures: f.load_failures,
            load_error: f.load_error,
        });
        if let Ok(mut m) = self.routes.lock() {
            if m.len() >= LOG_FUNCTIONS * 10 {
                m.clear();
            }
            m.insert(key.clone(), (applied, route.clone()));
        }
        Ok(route)
    }

    /// Places a first instance of a function that has none; one caller per function does
    /// it while the others wait for its result.
    async fn scale_from_zero(&self, key: &FunctionKey) -> Result<(Arc<Route>, bool), GatewayError> {
        let lock = self
            .scaling
            .lock()
            .map_err(|_| GatewayError::Unavailable("gateway state poisoned".into()))?
            .entry(key.clone())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        let route = self.route(key, true).await?;
        if !route.allocations.is_empty() {
            return Ok((route, false));
        }
        if let Some(e) = route.broken(&key.1, false) {
            return Err(e);
        }
        let mut request_id = [0u8; 16];
        getrandom::fill(&mut request_id)
            .map_err(|e| GatewayError::Unavailable(format!("no OS randomness: {e}")))?;
        tracing::info!(tenant = %key.0, function = %key.1, "no instance: placing one for the first call");
        self.replica
            .write(
                Request::Allocate {
                    request_id: request_id.to_vec(),
                    tenant: key.0.clone(),
                    function: key.1.clone(),
                },
                WRITE_TIMEOUT,
            )
            .await
            .map_err(|e| match e {
                // Every node it could go to has failed to load it.
                Error::Placement(p) if route.load_failures > 0 => {
                    route.load_failed(&key.1, &format!(": {p}"))
                }
                Error::Placement(p) => GatewayError::NoCapacity(format!(
                    "no instance of `{}` and none can be placed: {p} Try another --region, a smaller --memory, or `stellar nodes` to see free capacity",
                    key.1
                )),
                other => other.into(),
            })?;
        Ok((self.route(key, true).await?, true))
    }

    /// Waits until one of the route's instances is attached and ready.
    async fn wait_ready(&self, key: &FunctionKey) -> Result<Arc<Route>, GatewayError> {
        let start = crate::clock::now();
        loop {
            let route = self.route(key, false).await?;
            if !self.hub.ready_of(&route.allocations).is_empty() {
                return Ok(route);
            }
            if let Some(e) = route.broken(&key.1, start.elapsed() >= REPLACEMENT_WAIT) {
                return Err(e);
            }
            if start.elapsed() >= READY_WAIT {
                return Err(GatewayError::NoReadyInstance(format!(
                    "no ready instance of `{}`: {} placed, none attached and ready after {} s; check `stellar status {}` and the workers' logs",
                    key.1,
                    route.allocations.len(),
                    READY_WAIT.as_secs(),
                    key.1
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Runs `tenant`'s function once and returns its output and usage.
    pub async fn invoke(
        &self,
        tenant: String,
        req: pb::InvokeRequest,
    ) -> Result<pb::InvokeResponse, GatewayError> {
        let info = self.replica.info();
        if !info.is_leader {
            return Err(GatewayError::NotLeader {
                address: info.leader_address,
            });
        }
        if req.stdin.len() > MAX_INVOKE_INPUT {
            return Err(GatewayError::InvalidArgument(format!(
                "stdin is {} bytes; at most {MAX_INVOKE_INPUT} per invocation",
                req.stdin.len()
            )));
        }
        let key: FunctionKey = (tenant, req.function.clone());
        let mut route = self.route(&key, false).await?;
        let mut scaled = false;
        if route.allocations.is_empty() {
            (route, scaled) = self.scale_from_zero(&key).await?;
        }
        if self.hub.ready_of(&route.allocations).is_empty() {
            route = self.wait_ready(&key).await?;
        }
        let near = Near {
            region: req.near_region.clone(),
            zone: req.near_zone.clone(),
        };
        let invocation = pb::Invocation {
            invocation_id: Vec::new(),
            allocation: 0,
            stdin: req.stdin,
            args: req.args,
            env: req.env,
            random_seed: Vec::new(),
        };
        let mut exclude: Vec<u64> = Vec::new();
        let mut attempts = 0u32;
        let mut lost_once = false;
        loop {
            attempts += 1;
            match self
                .hub
                .invoke(
                    &route.allocations,
                    &near,
                    &exclude,
                    invocation.clone(),
                    route.timeout,
                )
                .await
            {
                Ok((node, allocation, res)) => {
                    let unrun = matches!(
                        res.error_code.as_str(),
                        "UNAVAILABLE" | "RESOURCE_EXHAUSTED"
                    );
                    if unrun && attempts < UNRUN_ATTEMPTS {
                        // Refused before it ran: any other instance may take it.
                        exclude.push(node);
                        if self
                            .hub
                            .candidates(&route.allocations, &near, &exclude)
                            .is_empty()
                        {
                            exclude.clear();
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        continue;
                    }
                    return Ok(self.finish(&key, node, allocation, res, attempts, scaled));
                }
                Err(HubError::WorkerLost { node }) if route.idempotent && !lost_once => {
                    tracing::info!(tenant = %key.0, function = %key.1, node = format!("{node:016x}"), "worker vanished mid-call; retrying the idempotent call elsewhere");
                    lost_once = true;
                    exclude.push(node);
                }
                Err(HubError::WorkerLost { node }) => {
                    return Err(GatewayError::WorkerLost(if lost_once {
                        format!(
                            "`{}`: two workers vanished during the call (last {node:016x}); it may have run; retry",
                            key.1
                        )
                    } else {
                        format!(
                            "worker {node:016x} vanished during the call to `{}`; it may have run, so it was not retried (deploy with --idempotent to let the gateway retry)",
                            key.1
                        )
                    }));
                }
                Err(HubError::NoReadyInstance { allocated }) => {
                    return Err(GatewayError::NoReadyInstance(if exclude.is_empty() {
                        format!(
                            "no ready instance of `{}` ({allocated} placed); retry shortly",
                            key.1
                        )
                    } else {
                        format!(
                            "no other ready instance of `{}` to retry on ({allocated} placed); retry shortly",
                            key.1
                        )
                    }));
                }
                Err(HubError::NoRandomness(e)) => {
                    return Err(GatewayError::Unavailable(format!(
                        "`{}` was not called: no OS randomness for its id ({e}); retry",
                        key.1
                    )));
                }
                Err(HubError::Timeout { node, ms }) => {
                    return Err(GatewayError::Timeout(format!(
                        "worker {node:016x} did not answer `{}` within {ms} ms",
                        key.1
                    )));
                }
            }
        }
    }

    fn finish(
        &self,
        key: &FunctionKey,
        node: u64,
        allocation: u64,
        res: pb::InvocationResult,
        attempts: u32,
        scaled: bool,
    ) -> pb::InvokeResponse {
        let mut usage = res.usage;
        if let Some(u) = usage.as_mut() {
            // The ledger books it for the instance the gateway chose, whatever the worker says.
            u.node = node;
            u.tenant = key.0.clone();
            u.function = key.1.clone();
            u.invocation_id = res.invocation_id.clone();
            if !self.usage.record(u.clone()) {
                tracing::warn!("usage queue full; the worker's own report will carry this record");
            }
        }
        let log = pb::InvocationLog {
            invocation_id: res.invocation_id.clone(),
            node,
            allocation,
            unix_ms: crate::clock::unix_ms(),
            wall_us: usage.as_ref().map_or(0, |u| u.wall_us),
            fuel: usage.as_ref().map_or(0, |u| u.fuel),
            error_code: res.error_code.clone(),
            error_message: res.error_message.clone(),
            stderr: res.stderr[..res.stderr.len().min(LOG_STDERR)].to_vec(),
            stdout_bytes: res.stdout.len() as u64,
        };
        if let Ok(mut logs) = self.logs.lock() {
            if logs.len() >= LOG_FUNCTIONS && !logs.contains_key(key) {
                logs.clear();
            }
            let ring = logs.entry(key.clone()).or_default();
            if ring.len() >= LOG_DEPTH {
                ring.pop_back();
            }
            ring.push_front(log);
        }
        pb::InvokeResponse {
            stdout: res.stdout,
            stderr: res.stderr,
            error_code: res.error_code,
            error_message: res.error_message,
            usage,
            node,
            allocation,
            invocation_id: res.invocation_id,
            attempts,
            scaled_from_zero: scaled,
        }
    }

    /// The newest `limit` invocations of `tenant/name` this gateway ran.
    pub fn logs(&self, tenant: &str, name: &str, limit: usize) -> Vec<pb::InvocationLog> {
        self.logs
            .lock()
            .ok()
            .and_then(|l| {
                l.get(&(tenant.to_string(), name.to_string()))
                    .map(|r| r.iter().take(limit).cloned().collect())
            })
            .unwrap_or_default()
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
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(
            s.metadata().get(ERROR_METADATA).unwrap(),
            "NO_READY_INSTANCE"
        );
        let s = GatewayError::NotLeader {
            address: Some("127.0.0.1:7002".into()),
        }
        .into_status();
        assert_eq!(s.metadata().get(LEADER_METADATA).unwrap(), "127.0.0.1:7002");
        assert_eq!(GatewayError::NotFound("x".into()).http_status(), 404);
        assert_eq!(GatewayError::WorkerLost("x".into()).http_status(), 502);
        assert_eq!(GatewayError::Timeout("x".into()).http_status(), 504);
        let from: GatewayError =
            Error::Apply(ApplyError::NotFound("function `f` not found".into())).into();
        assert_eq!(from.code(), "NOT_FOUND");
    }
}
