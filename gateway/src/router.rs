//! Invocation routing on a gateway: finds a function's ready instances among this gateway's
//! workers, routes each call by estimated latency to the caller and outstanding requests
//! (power of two choices), forwards a call to the gateway that holds an instance when none is
//! here, places a first instance when a function has none (scale from zero), retries an
//! idempotent call once on another instance when its worker vanishes, keeps recent
//! invocations for `stellar logs`. Usage reaches the ledger from the worker's receipt, checked
//! where it arrived (`agent.rs`); each call carries a ticket the hub seals. The replica
//! thread is never on this path: routing reads the watched view.
//!
//! ```text
//!  Invoke(tenant, name, stdin, near)
//!    │ view.route: allocations of the current version
//!    ├─ none ─▶ one caller per function: Allocate (leader) ─▶ view catches up ─▶ wait ready
//!    ├─ ready here ─▶ hub.invoke: choose(near, outstanding) ─Invocation─▶ worker ─Result─▶
//!    │     worker vanished + idempotent ─▶ once more, that node excluded
//!    │     refused unrun (busy / not here) ─▶ another instance
//!    ├─ ready only elsewhere ─▶ Control.Invoke on the gateway holding it (once, marked
//!    │     forwarded: the peer never forwards again)
//!    └─ answer (usage from its checked receipt);  log ring per function
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stellar_proto::client::ClusterClient;
use stellar_proto::limits::MAX_INVOKE_INPUT;
use stellar_proto::v1 as pb;
use stellar_proto::wire::FORWARDED_METADATA;

use crate::error::GatewayError;
use crate::hub::{HubError, Near, WorkerHub};
use crate::view::{Route, View};

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
/// How long a call for a function this gateway has not heard of waits for the watch to
/// catch up (a deploy through another gateway a moment ago).
const UNKNOWN_WAIT: Duration = Duration::from_millis(500);
/// How long a call waits for a gateway that just started to load the cluster's state.
const LOADING_WAIT: Duration = Duration::from_secs(5);
/// A function's default per-invocation timeout when its limits set none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of the function's own timeout for the round trip to the worker.
const TIMEOUT_SLACK: Duration = Duration::from_secs(5);
/// Attempts for calls a worker refused without running them (busy, not running there).
const UNRUN_ATTEMPTS: u32 = 3;

/// The typed error for a version whose module failed to load and that has no instance left:
/// at once when it is not placed again (too many failures), or after a pause (`waited`)
/// when no other node took a replacement.
fn broken(route: &Route, name: &str, waited: bool) -> Option<GatewayError> {
    let gave_up = route.load_failures >= MAX_LOAD_FAILURES || (waited && route.load_failures > 0);
    (route.allocations.is_empty() && gave_up).then(|| load_failed(route, name, ""))
}

/// Workers that may fail to load a version before it is no longer placed (the control
/// plane's rule, mirrored for the error message).
const MAX_LOAD_FAILURES: u32 = 3;

/// The typed error for a module that failed to load and that no node runs (`detail`: why no
/// other node takes it, when known).
fn load_failed(route: &Route, name: &str, detail: &str) -> GatewayError {
    GatewayError::ModuleLoadFailed(format!(
        "`{name}` failed to load on {} worker(s) ({}) and no other node is trying it{detail}. Fix the module and deploy a new version; `stellar logs {name}` shows the failures",
        route.load_failures, route.load_error
    ))
}

fn timeout_of(route: &Route) -> Duration {
    let own = if route.timeout_ms == 0 {
        DEFAULT_TIMEOUT
    } else {
        Duration::from_millis(u64::from(route.timeout_ms))
    };
    own + TIMEOUT_SLACK
}

type FunctionKey = (String, String);

/// Where a call comes from, as the router needs it.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The caller's bearer token (a forwarded call presents it to the peer gateway).
    pub token: String,
    /// Whether another gateway forwarded this call here (it is never forwarded again).
    pub forwarded: bool,
}

/// A gateway's router (see the module docs).
#[derive(Debug)]
pub struct Router {
    hub: Arc<WorkerHub>,
    view: Arc<View>,
    /// Evidence for nodes' reputations (timeouts, lost streams) on its way to the ledger.
    usage: crate::usage::UsageWriter,
    /// Re-executes a share of successful WebAssembly calls elsewhere to check them.
    checks: Arc<crate::checks::Checks>,
    /// The gateway's own client (admin token) for the control plane.
    client: ClusterClient,
    /// This gateway's advertised address (a node held here is not forwarded).
    advertise: String,
    /// Where this gateway (and so its callers) is, and its peers.
    coordinates: Arc<crate::coordinates::Coordinates>,
    peers: Mutex<HashMap<String, ClusterClient>>,
    scaling: Mutex<HashMap<FunctionKey, Arc<tokio::sync::Mutex<()>>>>,
    logs: Mutex<HashMap<FunctionKey, VecDeque<pb::InvocationLog>>>,
}

impl Router {
    /// A router over `hub`'s workers and `view`'s state; `client` reaches the control plane
    /// and `advertise` is this gateway's address as other gateways know it.
    pub fn new(
        hub: Arc<WorkerHub>,
        view: Arc<View>,
        usage: crate::usage::UsageWriter,
        client: ClusterClient,
        advertise: String,
        coordinates: Arc<crate::coordinates::Coordinates>,
        checks: Arc<crate::checks::Checks>,
    ) -> Self {
        Router {
            hub,
            view,
            usage,
            checks,
            client,
            advertise,
            coordinates,
            peers: Mutex::default(),
            scaling: Mutex::default(),
            logs: Mutex::default(),
        }
    }

    /// The hub of attached workers.
    pub fn hub(&self) -> &Arc<WorkerHub> {
        &self.hub
    }

    /// The watched state.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// Whether `address` is this gateway's own.
    pub fn is_me(&self, address: &str) -> bool {
        address == self.advertise
    }

    /// The current route of `key`, waiting briefly for a function the view has not seen.
    async fn route(&self, key: &FunctionKey) -> Result<Route, GatewayError> {
        let start = stellar_proto::clock::now();
        while !self.view.complete() {
            if start.elapsed() >= LOADING_WAIT {
                return Err(GatewayError::Unavailable(
                    "this gateway has not loaded the cluster's state yet (is the control plane up?); retry in a moment".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let start = stellar_proto::clock::now();
        loop {
            if let Some(r) = self.view.route(&key.0, &key.1) {
                return Ok(r);
            }
            if start.elapsed() >= UNKNOWN_WAIT {
                return Err(GatewayError::NotFound(format!(
                    "function {} not found in tenant {}",
                    stellar_proto::text::shown(&key.1),
                    stellar_proto::text::shown(&key.0)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Places a first instance of a function that has none; one caller per function does
    /// it while the others wait for its result.
    async fn scale_from_zero(&self, key: &FunctionKey, near: &Near) -> Result<bool, GatewayError> {
        let lock = self
            .scaling
            .lock()
            .map_err(|_| GatewayError::Unavailable("gateway state poisoned".into()))?
            .entry(key.clone())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        let route = self.route(key).await?;
        if !route.allocations.is_empty() {
            return Ok(false);
        }
        if let Some(e) = broken(&route, &key.1, false) {
            return Err(e);
        }
        let mut request_id = [0u8; 16];
        getrandom::fill(&mut request_id)
            .map_err(|e| GatewayError::Unavailable(format!("no OS randomness: {e}")))?;
        tracing::info!(tenant = %key.0, function = %key.1, "no instance: placing one for the first call");
        let placed = self
            .client
            .call(|mut c| {
                // The callers are where they said, else near this gateway (they reached it).
                let req = pb::AllocateRequest {
                    request_id: request_id.to_vec(),
                    tenant: key.0.clone(),
                    function: key.1.clone(),
                    near_region: near.region.clone(),
                    near_zone: near.zone.clone(),
                    near: Some(self.coordinates.me_wire()),
                };
                async move { c.allocate(req).await }
            })
            .await
            .map_err(|s| match GatewayError::from_status(&s) {
                // Every node it could go to has failed to load it.
                GatewayError::NoCapacity(p) if route.load_failures > 0 => {
                    load_failed(&route, &key.1, &format!(": {p}"))
                }
                GatewayError::NoCapacity(p) => GatewayError::NoCapacity(format!(
                    "no instance of `{}` and none can be placed: {p} Try another --region, a smaller --memory, or `stellar nodes` to see free capacity",
                    key.1
                )),
                other => other,
            })?;
        self.view
            .wait_for(placed.applied_index, Duration::from_secs(5))
            .await;
        Ok(true)
    }

    /// This gateway's network coordinate (what requests entering here are near).
    pub fn coordinate(&self) -> pb::Coordinate {
        self.coordinates.me_wire()
    }

    /// The nearest gateway other than this one (by the coordinates the gateways measure
    /// between them; unknown ones last) that holds a ready-looking node of `route`: the call
    /// is forwarded there.
    fn elsewhere(&self, route: &Route) -> Option<String> {
        route
            .allocations
            .iter()
            .filter_map(|&(_, node)| {
                let g = self.view.gateway_of(node)?;
                let ready = self.view.node_state(node) == Some(pb::NodeState::Ready as i32);
                (ready && !g.is_empty() && !self.is_me(&g)).then(|| g.to_string())
            })
            .min_by(|a, b| {
                let ms = |g: &str| self.coordinates.to_peer_ms(g).unwrap_or(f32::INFINITY);
                ms(a).total_cmp(&ms(b))
            })
    }

    fn peer(&self, address: &str, token: &str) -> Result<ClusterClient, GatewayError> {
        let mut peers = self
            .peers
            .lock()
            .map_err(|_| GatewayError::Unavailable("gateway state poisoned".into()))?;
        let c = match peers.get(address) {
            Some(c) => c.clone(),
            None => {
                let c = ClusterClient::new(&[address.to_string()])
                    .map_err(|s| GatewayError::Unavailable(s.message().to_string()))?;
                peers.insert(address.to_string(), c.clone());
                c
            }
        };
        Ok(c.with_token(token))
    }

    /// Runs the call on the gateway at `address`, once.
    async fn forward(
        &self,
        address: &str,
        ctx: &CallContext,
        req: pb::InvokeRequest,
    ) -> Result<pb::InvokeResponse, GatewayError> {
        let peer = self.peer(address, &ctx.token)?;
        let mut c = peer
            .client_for(address)
            .map_err(|s| GatewayError::Unavailable(s.message().to_string()))?;
        let mut r = tonic::Request::new(req);
        r.metadata_mut().insert(
            FORWARDED_METADATA,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        c.invoke(r)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| GatewayError::from_forwarded(&s))
    }

    /// Runs `tenant`'s function once and returns its output and usage.
    pub async fn invoke(
        &self,
        tenant: String,
        req: pb::InvokeRequest,
        ctx: &CallContext,
    ) -> Result<pb::InvokeResponse, GatewayError> {
        if req.stdin.len() > MAX_INVOKE_INPUT {
            return Err(GatewayError::InvalidArgument(format!(
                "stdin is {} bytes; at most {MAX_INVOKE_INPUT} per invocation",
                req.stdin.len()
            )));
        }
        let key: FunctionKey = (tenant, req.function.clone());
        let start = stellar_proto::clock::now();
        let mut scaled = false;
        let route = loop {
            let route = self.route(&key).await?;
            if route.allocations.is_empty() && !scaled {
                let near = Near {
                    region: req.near_region.clone(),
                    zone: req.near_zone.clone(),
                };
                scaled = self.scale_from_zero(&key, &near).await?;
                continue;
            }
            if !self.hub.ready_of(&route.allocations).is_empty() {
                break route;
            }
            if !ctx.forwarded
                && let Some(gw) = self.elsewhere(&route)
            {
                let mut r = self.forward(&gw, ctx, req).await?;
                r.scaled_from_zero |= scaled;
                return Ok(r);
            }
            if let Some(e) = broken(&route, &key.1, start.elapsed() >= REPLACEMENT_WAIT) {
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
        };
        self.run_here(&key, route, req, scaled).await
    }

    /// Runs the call on one of this gateway's ready instances of `route`.
    async fn run_here(
        &self,
        key: &FunctionKey,
        route: Route,
        req: pb::InvokeRequest,
        scaled: bool,
    ) -> Result<pb::InvokeResponse, GatewayError> {
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
            // The hub completes and seals it for the node it picks.
            ticket: Some(pb::Ticket {
                tenant: key.0.clone(),
                function: key.1.clone(),
                version: route.version,
                code_sha256: route.code_sha256.clone(),
                ..Default::default()
            }),
        };
        let timeout = timeout_of(&route);
        let mut exclude: Vec<u64> = Vec::new();
        let mut attempts = 0u32;
        let mut lost_once = false;
        loop {
            attempts += 1;
            let outcome = self
                .hub
                .invoke(
                    &route.allocations,
                    &near,
                    &exclude,
                    invocation.clone(),
                    timeout,
                )
                .await;
            // Evidence for the node's reputation (committed with the next usage batch).
            match &outcome {
                Err(HubError::WorkerLost { node }) => {
                    self.usage.incident(*node, pb::Incident::LostStream);
                }
                Err(HubError::Timeout { node, .. }) => {
                    self.usage.incident(*node, pb::Incident::Timeout);
                }
                _ => {}
            }
            match outcome {
                Ok(answered) => {
                    let crate::hub::Answered {
                        node,
                        allocation,
                        result: ref res,
                        ..
                    } = answered;
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
                    let check = (!route.container
                        && route.allocations.len() > 1
                        && res.error_code.is_empty()
                        && res.receipt.is_some()
                        && self
                            .checks
                            .wanted(node, self.view.reputation(node).unwrap_or(0.0)))
                    .then(|| crate::checks::Checkable {
                        allocations: route.allocations.clone(),
                        invocation: invocation.clone(),
                        answered: answered.clone(),
                        timeout,
                    });
                    let response =
                        self.finish(key, node, allocation, answered.result, attempts, scaled);
                    if let Some(c) = check {
                        // After the caller has its answer: the check adds no latency.
                        let (checks, hub, usage, view) = (
                            self.checks.clone(),
                            self.hub.clone(),
                            self.usage.clone(),
                            self.view.clone(),
                        );
                        tokio::spawn(async move {
                            let reputation = |n| view.reputation(n).unwrap_or(0.0);
                            checks.run(&hub, &usage, reputation, c).await;
                        });
                    }
                    return Ok(response);
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
                Err(HubError::NoTicketKey) => {
                    return Err(GatewayError::Unavailable(format!(
                        "`{}` was not called: this gateway has no session with the leader \
                         yet, so it cannot issue the call's ticket; retry in a moment",
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
        // Checked (and sent to the ledger) where it arrived; a receipt that failed was
        // taken off the result there.
        let usage = res
            .receipt
            .as_ref()
            .map(stellar_proto::receipts::usage_record);
        let log = pb::InvocationLog {
            invocation_id: res.invocation_id.clone(),
            node,
            allocation,
            unix_ms: stellar_proto::clock::unix_ms(),
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
