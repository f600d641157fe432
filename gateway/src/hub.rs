//! Workers' streams on the leader: registration, assignments, module transfer, invocations
//! and usage. A worker dials in (NAT-friendly) and keeps one `Agent.Attach` stream; the
//! control plane never connects to it.
//!
//! ```text
//!  worker ─Register(signed)──▶ verify key→node id, signature, join token ─▶ RegisterNodes (Raft)
//!         ◀─Registered──────── link kept in the WorkerHub (one per node; a newer one wins)
//!         ◀─Assignment──────── reconcile loop: committed allocations on the node vs what the
//!                              link was told (level-triggered, re-run when state changes)
//!         ─FetchModule───────▶ module from the replicated state, in 1 MiB chunks
//!         ─AllocationUpdate──▶ RUNNING marks the instance ready for invocations
//!         ─Heartbeat─────────▶ leader soft state (liveness, coordinate) ◀─HeartbeatAck (RTT)
//!  Invoke ─▶ gateway picks a ready instance (workers::choose) ─Invocation─▶ worker
//!         ◀─InvocationResult── answered to the caller; its usage ─▶ UsageWriter (Raft)
//!         ─UsageReport───────▶ records not acknowledged in time ◀─UsageAck── once committed
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use stellar_placement::Coordinate;
use stellar_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

use crate::allocation_states::AllocationStateWriter;
use crate::error::Error;
use crate::node::ReplicaHandle;
use crate::replica::{Query, Reply, Request, node_state_command};
use crate::service::{ControlStream, WRITE_TIMEOUT, to_status};
use crate::usage::UsageWriter;

/// Module bytes per `ModuleChunk`.
const MODULE_CHUNK: usize = 1 << 20;
/// How often a link re-checks the committed allocations of its node.
const RECONCILE_EVERY: Duration = Duration::from_millis(200);

type Outbox = mpsc::Sender<Result<pb::ControlMessage, Status>>;

fn control(kind: pb::control_message::Kind) -> pb::ControlMessage {
    pb::ControlMessage { kind: Some(kind) }
}

/// Sends a worker to the leader (an empty address: unknown yet, retry another replica).
fn not_leader(info: crate::node::Snapshot) -> pb::ControlMessage {
    control(pb::control_message::Kind::NotLeader(pb::NotLeader {
        leader_address: info.leader_address.unwrap_or_default(),
    }))
}

/// One attached worker.
struct Link {
    generation: u64,
    tx: Outbox,
    /// Allocations the worker reported ready.
    ready: HashSet<u64>,
    /// Invocations sent and not yet answered.
    outstanding: usize,
    /// Where the node says it is (routing prefers instances near the caller).
    region: String,
    zone: String,
    /// The worker's measured distance to this replica (its Vivaldi coordinate against the
    /// replica's fixed landmark), in ms: the gateway-to-worker hop every call pays.
    rtt_ms: f32,
    /// Results this stream sent for calls that were issued to another node or stream.
    foreign_results: u32,
}

/// Results for calls issued elsewhere that end a worker's stream: such a result is never
/// an accident (ids are 128 random bits and only the node that ran a call learns its id
/// before it is answered).
const MAX_FOREIGN_RESULTS: u32 = 3;

/// What the hub did with a worker's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// It answered the call it was issued for.
    Accepted,
    /// No call is waiting for it: it came after its caller gave up (timeout, cancel).
    Late,
    /// The call was issued to another node or another stream: refused and counted
    /// against the sender.
    Foreign {
        /// Such results from this stream so far.
        count: u32,
    },
}

/// An invocation waiting for its worker's answer.
struct Pending {
    node: u64,
    generation: u64,
    reply: oneshot::Sender<Result<pb::InvocationResult, HubError>>,
}

/// Why the hub could not get an answer for an invocation.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    /// None of the candidates is attached and ready.
    #[error("no ready instance ({allocated} allocated, none attached and ready)")]
    NoReadyInstance {
        /// Allocations the function has.
        allocated: usize,
    },
    /// The worker's stream ended while the call was on it: the function may have run.
    #[error("worker {node:016x} disconnected during the invocation; it may have run")]
    WorkerLost {
        /// The node that vanished.
        node: u64,
    },
    /// The worker did not answer in time.
    #[error("worker {node:016x} did not answer within {ms} ms")]
    Timeout {
        /// The node.
        node: u64,
        /// How long the hub waited.
        ms: u64,
    },
    /// The OS gave no randomness for the invocation's id and seed (nothing was sent).
    #[error("no OS randomness for the invocation id: {0}")]
    NoRandomness(String),
}

/// A ready instance as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteCandidate {
    /// Allocation id.
    pub allocation: u64,
    /// Its node.
    pub node: u64,
    /// Estimated latency from the caller, ms.
    pub est_ms: f32,
    /// Invocations in flight on the node.
    pub outstanding: usize,
}

/// Where the caller is, for routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Near {
    /// The caller's region (empty: unknown).
    pub region: String,
    /// The caller's zone (empty: unknown).
    pub zone: String,
}

/// Estimated extra latency between a caller and a node by location tier, ms: the same
/// zone (a metro), the same region, elsewhere. Coarse on purpose: the gateway has no
/// coordinate for the caller, only where it says it is.
const TIER_MS: [f32; 3] = [1.0, 8.0, 40.0];
/// Candidates within this many ms of the nearest are "near enough" to share the load.
const NEAR_SLACK_MS: f32 = 5.0;
/// What one outstanding invocation is taken to add to the wait, ms.
const QUEUE_COST_MS: f32 = 0.5;

impl Near {
    /// The location tier's latency from this caller to a node at (`region`, `zone`).
    pub fn tier_ms(&self, region: &str, zone: &str) -> f32 {
        if self.region.is_empty() {
            0.0
        } else if self.region != region {
            TIER_MS[2]
        } else if self.zone.is_empty() || self.zone == zone {
            TIER_MS[0]
        } else {
            TIER_MS[1]
        }
    }
}

/// Picks an instance: the pool is the candidates within [`NEAR_SLACK_MS`] of the nearest
/// (plus one farther one when only one is near, so load spills over); of two drawn from it
/// with `draw`, the one with the lower estimated latency plus queueing cost wins.
pub fn choose(cands: &[RouteCandidate], draw: u64) -> Option<usize> {
    if cands.is_empty() {
        return None;
    }
    let best = cands.iter().map(|c| c.est_ms).fold(f32::INFINITY, f32::min);
    let mut pool: Vec<usize> = (0..cands.len())
        .filter(|&i| cands[i].est_ms <= best + NEAR_SLACK_MS)
        .collect();
    if pool.len() == 1 && cands.len() > 1 {
        // The next nearest, so a saturated near instance can shed load.
        let next = (0..cands.len())
            .filter(|i| *i != pool[0])
            .min_by(|&a, &b| cands[a].est_ms.total_cmp(&cands[b].est_ms))
            .expect("more than one candidate");
        pool.push(next);
    }
    let cost = |i: usize| cands[i].est_ms + cands[i].outstanding as f32 * QUEUE_COST_MS;
    let n = pool.len() as u64;
    let ia = draw % n;
    if n == 1 {
        return Some(pool[0]);
    }
    // The second choice is always another candidate.
    let ib = (ia + 1 + (draw / n) % (n - 1)) % n;
    let (a, b) = (pool[ia as usize], pool[ib as usize]);
    Some(if cost(b) < cost(a) { b } else { a })
}

/// splitmix64: spreads a counter into well-mixed bits for routing draws (soft state only).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Attached workers and invocations in flight, shared by the `Agent` and `Control` services.
pub struct WorkerHub {
    links: Mutex<HashMap<u64, Link>>,
    pending: Mutex<HashMap<Vec<u8>, Pending>>,
    generation: AtomicU64,
    invocations: AtomicU64,
    closed: tokio::sync::watch::Sender<bool>,
    /// Results refused because they came from a node the call was not sent to, by node
    /// (kept across reconnects).
    refused: Mutex<HashMap<u64, u64>>,
}

/// A fresh invocation's secrets, drawn from the OS for each call: its id (128 random bits,
/// shown to the caller, so it cannot be guessed by anyone else) and the seed of its WASI
/// random source (sent only to the node that runs it, never to the caller).
fn fresh_invocation() -> Result<(Vec<u8>, Vec<u8>), HubError> {
    let mut b = [0u8; 16 + 32];
    getrandom::fill(&mut b).map_err(|e| HubError::NoRandomness(e.to_string()))?;
    Ok((hex::encode(&b[..16]).into_bytes(), b[16..].to_vec()))
}

impl std::fmt::Debug for WorkerHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHub")
            .field("attached", &self.attached())
            .finish_non_exhaustive()
    }
}

/// Removes a pending invocation when its caller stops waiting (answered, timed out or
/// cancelled), so a dropped call leaks neither its entry nor its outstanding count.
struct PendingGuard<'a> {
    hub: &'a WorkerHub,
    id: Vec<u8>,
    node: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let was_pending = self
            .hub
            .pending
            .lock()
            .map(|mut p| p.remove(&self.id).is_some())
            .unwrap_or(false);
        if was_pending
            && let Ok(mut links) = self.hub.links.lock()
            && let Some(l) = links.get_mut(&self.node)
        {
            l.outstanding = l.outstanding.saturating_sub(1);
        }
    }
}

impl WorkerHub {
    /// An empty hub.
    pub fn new() -> Arc<WorkerHub> {
        Arc::new(WorkerHub {
            links: Mutex::default(),
            pending: Mutex::default(),
            generation: AtomicU64::new(0),
            invocations: AtomicU64::new(0),
            closed: tokio::sync::watch::Sender::new(false),
            refused: Mutex::default(),
        })
    }

    /// Ends every worker stream (the replica is shutting down; workers reconnect elsewhere
    /// or when it is back), so a graceful shutdown does not wait on them.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Fires when the hub closes (the replica is shutting down).
    pub fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// `stream`, ended when the hub closes.
    fn until_closed(&self, stream: ControlStream) -> ControlStream {
        let mut closed = self.closed.subscribe();
        Box::pin(futures::StreamExt::take_until(stream, async move {
            let _ = closed.wait_for(|c| *c).await;
        }))
    }

    fn attach(&self, node: u64, tx: Outbox, region: String, zone: String) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut links) = self.links.lock() {
            // A reconnect replaces the old stream; dropping its sender ends it.
            links.insert(
                node,
                Link {
                    generation,
                    tx,
                    ready: HashSet::new(),
                    outstanding: 0,
                    region,
                    zone,
                    rtt_ms: 0.0,
                    foreign_results: 0,
                },
            );
        }
        // Calls on the replaced stream will never be answered there.
        self.fail_pending(node, |g| g != generation);
        generation
    }

    fn fail_pending(&self, node: u64, which: impl Fn(u64) -> bool) {
        if let Ok(mut pending) = self.pending.lock() {
            let lost: Vec<Vec<u8>> = pending
                .iter()
                .filter(|(_, p)| p.node == node && which(p.generation))
                .map(|(k, _)| k.clone())
                .collect();
            for id in lost {
                if let Some(p) = pending.remove(&id) {
                    let _ = p.reply.send(Err(HubError::WorkerLost { node }));
                }
            }
        }
    }

    fn detach(&self, node: u64, generation: u64) {
        let gone = self
            .links
            .lock()
            .map(|mut links| {
                if links.get(&node).is_some_and(|l| l.generation == generation) {
                    links.remove(&node);
                    true
                } else {
                    false
                }
            })
            .unwrap_or(false);
        if gone {
            self.fail_pending(node, |g| g == generation);
        }
    }

    /// Marks an instance ready or not; true when it just became ready on this stream.
    fn set_ready(&self, node: u64, allocation: u64, ready: bool) -> bool {
        if let Ok(mut links) = self.links.lock()
            && let Some(l) = links.get_mut(&node)
        {
            if ready {
                return l.ready.insert(allocation);
            }
            l.ready.remove(&allocation);
        }
        false
    }

    /// A draining node takes no new calls: none of its instances is ready any more.
    fn set_draining(&self, node: u64) {
        if let Ok(mut links) = self.links.lock()
            && let Some(l) = links.get_mut(&node)
        {
            l.ready.clear();
        }
    }

    fn set_rtt(&self, node: u64, rtt_ms: f32) {
        if let Ok(mut links) = self.links.lock()
            && let Some(l) = links.get_mut(&node)
            && rtt_ms.is_finite()
        {
            l.rtt_ms = rtt_ms.max(0.0);
        }
    }

    /// Answers the call `result` is for, if it was sent to this node on this stream; a
    /// result for a call issued elsewhere is refused (the call stays open for its own node)
    /// and counted against the sender.
    fn complete(&self, node: u64, generation: u64, result: pb::InvocationResult) -> Completion {
        let Ok(mut pending) = self.pending.lock() else {
            return Completion::Late;
        };
        let p = match pending.get(&result.invocation_id) {
            None => return Completion::Late,
            Some(p) if p.node != node || p.generation != generation => {
                drop(pending);
                return self.refuse_foreign(node, generation);
            }
            Some(_) => pending.remove(&result.invocation_id),
        };
        drop(pending);
        if let Some(p) = p {
            if let Ok(mut links) = self.links.lock()
                && let Some(l) = links.get_mut(&node)
            {
                l.outstanding = l.outstanding.saturating_sub(1);
            }
            let _ = p.reply.send(Ok(result));
        }
        Completion::Accepted
    }

    fn refuse_foreign(&self, node: u64, generation: u64) -> Completion {
        if let Ok(mut r) = self.refused.lock() {
            *r.entry(node).or_default() += 1;
        }
        let count = self
            .links
            .lock()
            .ok()
            .and_then(|mut links| {
                let l = links
                    .get_mut(&node)
                    .filter(|l| l.generation == generation)?;
                l.foreign_results += 1;
                Some(l.foreign_results)
            })
            .unwrap_or(MAX_FOREIGN_RESULTS);
        Completion::Foreign { count }
    }

    /// Results refused from `node` because their calls were sent elsewhere (since start).
    pub fn refused_results(&self, node: u64) -> u64 {
        self.refused
            .lock()
            .ok()
            .and_then(|r| r.get(&node).copied())
            .unwrap_or(0)
    }

    /// Tells workers that these (node, invocation id) usage records are committed, so they
    /// stop keeping them. Best effort: a worker whose queue is full reports them again, and
    /// the ledger dedupes.
    pub fn ack_usage(&self, records: Vec<(u64, Vec<u8>)>) {
        let mut by_node: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
        for (node, id) in records {
            by_node.entry(node).or_default().push(id);
        }
        let Ok(links) = self.links.lock() else {
            return;
        };
        for (node, invocation_ids) in by_node {
            if let Some(l) = links.get(&node) {
                let _ =
                    l.tx.try_send(Ok(control(pb::control_message::Kind::UsageAck(
                        pb::UsageAck { invocation_ids },
                    ))));
            }
        }
    }

    /// Workers attached to this replica.
    pub fn attached(&self) -> usize {
        self.links.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Which of `allocations` (allocation, node) are attached and ready here.
    pub fn ready_of(&self, allocations: &[(u64, u64)]) -> Vec<u64> {
        let Ok(links) = self.links.lock() else {
            return Vec::new();
        };
        allocations
            .iter()
            .filter(|(a, n)| links.get(n).is_some_and(|l| l.ready.contains(a)))
            .map(|(a, _)| *a)
            .collect()
    }

    /// The ready instances among `allocations` (allocation, node), minus nodes in `exclude`,
    /// with their estimated latency from a caller `near` and their queue.
    pub fn candidates(
        &self,
        allocations: &[(u64, u64)],
        near: &Near,
        exclude: &[u64],
    ) -> Vec<RouteCandidate> {
        let Ok(links) = self.links.lock() else {
            return Vec::new();
        };
        allocations
            .iter()
            .filter(|(_, n)| !exclude.contains(n))
            .filter_map(|&(allocation, node)| {
                let l = links.get(&node)?;
                l.ready.contains(&allocation).then(|| RouteCandidate {
                    allocation,
                    node,
                    est_ms: near.tier_ms(&l.region, &l.zone) + l.rtt_ms,
                    outstanding: l.outstanding,
                })
            })
            .collect()
    }

    /// Runs one invocation on one of `allocations` (allocation, node) that is attached and
    /// ready, chosen by [`choose`]; `exclude` names nodes not to use (a retry's first node).
    pub async fn invoke(
        &self,
        allocations: &[(u64, u64)],
        near: &Near,
        exclude: &[u64],
        mut invocation: pb::Invocation,
        timeout: Duration,
    ) -> Result<(u64, u64, pb::InvocationResult), HubError> {
        let n = self.invocations.fetch_add(1, Ordering::Relaxed);
        let (allocation, node, generation, tx) = {
            let cands = self.candidates(allocations, near, exclude);
            let Some(pick) = choose(&cands, mix(n)) else {
                return Err(HubError::NoReadyInstance {
                    allocated: allocations.len(),
                });
            };
            let c = cands[pick];
            let mut links = self.links.lock().map_err(|_| HubError::NoReadyInstance {
                allocated: allocations.len(),
            })?;
            let Some(link) = links.get_mut(&c.node) else {
                return Err(HubError::WorkerLost { node: c.node });
            };
            link.outstanding += 1;
            (c.allocation, c.node, link.generation, link.tx.clone())
        };
        // Unique (the ledger deduplicates usage by it) and unguessable: a result is matched
        // to its call by this id, and every caller sees the ids of its own calls.
        let (id, seed) = match fresh_invocation() {
            Ok(fresh) => fresh,
            Err(e) => {
                if let Ok(mut links) = self.links.lock()
                    && let Some(l) = links.get_mut(&node)
                {
                    l.outstanding = l.outstanding.saturating_sub(1);
                }
                return Err(e);
            }
        };
        invocation.invocation_id = id.clone();
        invocation.random_seed = seed;
        invocation.allocation = allocation;
        let (reply, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(
                id.clone(),
                Pending {
                    node,
                    generation,
                    reply,
                },
            );
        }
        let _guard = PendingGuard {
            hub: self,
            id: id.clone(),
            node,
        };
        let sent = tx
            .send(Ok(control(pb::control_message::Kind::Invocation(
                invocation,
            ))))
            .await;
        if sent.is_err() {
            return Err(HubError::WorkerLost { node });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r.map(|r| (node, allocation, r)),
            Ok(Err(_)) => Err(HubError::WorkerLost { node }),
            Err(_) => Err(HubError::Timeout {
                node,
                ms: timeout.as_millis() as u64,
            }),
        }
    }
}

/// The `Agent` service: workers dial in and keep one stream.
#[derive(Clone)]
pub struct AgentService {
    replica: ReplicaHandle,
    hub: Arc<WorkerHub>,
    usage: UsageWriter,
    states: AllocationStateWriter,
    heartbeat_ms: u32,
    join_token: Option<Arc<str>>,
}

impl AgentService {
    /// Serves `replica`; workers must present `join_token` (none set: workers are refused)
    /// and heartbeat every `heartbeat_ms`.
    pub fn new(
        replica: ReplicaHandle,
        hub: Arc<WorkerHub>,
        usage: UsageWriter,
        heartbeat_ms: u32,
        join_token: Option<String>,
    ) -> Self {
        AgentService {
            states: AllocationStateWriter::spawn(replica.clone()),
            replica,
            hub,
            usage,
            heartbeat_ms,
            join_token: join_token.map(Into::into),
        }
    }

    fn check(&self, reg: &pb::Register) -> Result<(), Status> {
        let Some(expected) = &self.join_token else {
            return Err(Status::failed_precondition(
                "this control plane accepts no workers: start its replicas with --join-token",
            ));
        };
        if !constant_time_eq(reg.join_token.as_bytes(), expected.as_bytes()) {
            return Err(Status::unauthenticated(
                "wrong join token; ask the cluster's operator for the current one",
            ));
        }
        if !stellar_proto::identity::verify_registration(
            reg.node,
            &reg.public_key,
            &reg.join_token,
            &reg.signature,
        ) {
            return Err(Status::unauthenticated(
                "the registration signature does not match the node's public key and id",
            ));
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    type AttachStream = ControlStream;

    async fn attach(
        &self,
        req: GrpcRequest<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<ControlStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("stream closed before Register"))??;
        let Some(pb::worker_message::Kind::Register(reg)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message must be Register",
            ));
        };
        let (tx, rx) = mpsc::channel::<Result<pb::ControlMessage, Status>>(256);
        let stream = self
            .hub
            .until_closed(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let info = self.replica.info();
        if !info.is_leader {
            let _ = tx.send(Ok(not_leader(info))).await;
            return Ok(Response::new(stream));
        }
        self.check(&reg)?;
        let attrs = reg
            .attributes
            .ok_or_else(|| Status::invalid_argument("Register needs attributes"))?;
        let node = reg.node;
        let (region, zone) = (attrs.region.clone(), attrs.zone.clone());
        let record = pb::NodeRecord {
            id: node,
            public_key: reg.public_key,
            attributes: Some(attrs),
            state: pb::NodeState::Ready as i32,
            reputation: 1.0,
            managed: true,
        };
        let registered = self
            .replica
            .write(
                Request::Command(pb::Command {
                    request_id: Vec::new(),
                    kind: Some(pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
                        nodes: vec![record],
                    })),
                }),
                WRITE_TIMEOUT,
            )
            .await
            .map_err(to_status)?;
        // A worker that drained (SIGTERM) and came back is ready again. (A node an operator
        // drained becomes ready too when its worker restarts; quarantine stays.)
        if let Reply::Applied(r) = &registered
            && r.previous_state == pb::NodeState::Draining as i32
        {
            set_node_state(&self.replica, node, pb::NodeState::Ready).await;
        }
        tracing::info!(node = format!("{node:016x}"), "worker attached");
        let _ = tx
            .send(Ok(control(pb::control_message::Kind::Registered(
                pb::Registered {
                    node,
                    heartbeat_ms: self.heartbeat_ms,
                },
            ))))
            .await;
        let generation = self.hub.attach(node, tx.clone(), region, zone);
        tokio::spawn(reconcile(self.replica.clone(), node, tx.clone()));
        let (replica, hub, usage, states) = (
            self.replica.clone(),
            self.hub.clone(),
            self.usage.clone(),
            self.states.clone(),
        );
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let Ok(msg) = msg else { break };
                let Some(kind) = msg.kind else { continue };
                if let Err(e) = on_message(
                    &replica,
                    &hub,
                    (&usage, &states),
                    (node, generation),
                    &tx,
                    kind,
                )
                .await
                {
                    tracing::warn!(node = format!("{node:016x}"), error = %e, "worker stream refused a message");
                    let _ = tx.try_send(Err(e));
                    break;
                }
            }
            hub.detach(node, generation);
            tracing::info!(node = format!("{node:016x}"), "worker stream ended");
        });
        Ok(Response::new(stream))
    }
}

/// Handles one message from a worker. It never waits on the worker's outbound queue (acks
/// are dropped when it is full, module transfers run in their own task): the worker may be
/// waiting on us to read, and both sides blocking on each other would stall the stream.
async fn on_message(
    replica: &ReplicaHandle,
    hub: &WorkerHub,
    (usage, states): (&UsageWriter, &AllocationStateWriter),
    (node, generation): (u64, u64),
    tx: &Outbox,
    kind: pb::worker_message::Kind,
) -> Result<(), Status> {
    use pb::worker_message::Kind;
    match kind {
        Kind::Register(_) => return Err(Status::invalid_argument("already registered")),
        Kind::Heartbeat(hb) => {
            let coordinate = hb.coordinate.and_then(|c| {
                let v: [f32; 3] = c.vec.as_slice().try_into().ok()?;
                Some(Coordinate {
                    vec: v,
                    height_ms: c.height_ms,
                })
            });
            if let Some(c) = &coordinate {
                hub.set_rtt(node, c.distance_ms(&Coordinate::ORIGIN));
            }
            replica
                .heartbeat(node, coordinate)
                .await
                .map_err(to_status)?;
            // The replica is a fixed landmark at the origin; the worker's RTT to it moves
            // the worker's own coordinate.
            let _ = tx.try_send(Ok(control(pb::control_message::Kind::HeartbeatAck(
                pb::HeartbeatAck {
                    seq: hb.seq,
                    coordinate: Some(pb::Coordinate {
                        vec: vec![0.0; 3],
                        height_ms: 0.0,
                    }),
                },
            ))));
        }
        Kind::Allocation(u) => {
            let running = u.state == pb::AllocationState::Running as i32;
            // A failure to load (older workers say STOPPED with a reason).
            let failed = u.state == pb::AllocationState::Failed as i32
                || (u.state == pb::AllocationState::Stopped as i32 && !u.message.is_empty());
            let newly_ready = hub.set_ready(node, u.allocation, running);
            if newly_ready {
                states.report(node, u.allocation, pb::AllocationState::Running, "");
            }
            if failed {
                tracing::warn!(
                    node = format!("{node:016x}"),
                    allocation = u.allocation,
                    message = %u.message,
                    "worker could not load an instance's module"
                );
                if !states.report(node, u.allocation, pb::AllocationState::Failed, &u.message) {
                    tracing::warn!(
                        node = format!("{node:016x}"),
                        "allocation-state queue full; failure not recorded"
                    );
                }
            }
        }
        Kind::Result(r) => match hub.complete(node, generation, r) {
            Completion::Accepted => {}
            Completion::Late => {
                tracing::debug!(
                    node = format!("{node:016x}"),
                    "a result came after its caller stopped waiting"
                );
            }
            Completion::Foreign { count } => {
                tracing::warn!(
                    node = format!("{node:016x}"),
                    count,
                    "refused a result for a call this node was not sent"
                );
                if count >= MAX_FOREIGN_RESULTS {
                    return Err(Status::permission_denied(format!(
                        "{count} results for calls this node was not sent; stream closed"
                    )));
                }
            }
        },
        Kind::Usage(report) => {
            for mut r in report.records {
                // A worker reports only its own usage.
                r.node = node;
                if !usage.record(r) {
                    tracing::warn!(
                        node = format!("{node:016x}"),
                        "usage queue full; record dropped"
                    );
                }
            }
        }
        Kind::Draining(_) => {
            tracing::info!(node = format!("{node:016x}"), "worker draining");
            hub.set_draining(node);
            let replica = replica.clone();
            tokio::spawn(async move {
                set_node_state(&replica, node, pb::NodeState::Draining).await;
            });
        }
        Kind::FetchModule(f) => {
            let (replica, tx) = (replica.clone(), tx.clone());
            tokio::spawn(async move { send_module(&replica, &tx, &f.sha256).await });
        }
    }
    Ok(())
}

async fn set_node_state(replica: &ReplicaHandle, node: u64, state: pb::NodeState) {
    let written = match node_state_command(Vec::new(), node, state as i32) {
        Ok(cmd) => replica
            .write(Request::Command(cmd), WRITE_TIMEOUT)
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        tracing::warn!(node = format!("{node:016x}"), ?state, error = %e, "node state not recorded");
    }
}

async fn send_module(replica: &ReplicaHandle, tx: &Outbox, sha: &str) {
    let refuse = |error: String| {
        control(pb::control_message::Kind::ModuleChunk(pb::ModuleChunk {
            sha256: sha.to_string(),
            last: true,
            error,
            ..Default::default()
        }))
    };
    let key: Option<[u8; 32]> = hex::decode(sha).ok().and_then(|b| b.try_into().ok());
    let Some(key) = key else {
        let _ = tx
            .send(Ok(refuse(format!("`{sha}` is not a sha256"))))
            .await;
        return;
    };
    let bytes = match replica
        .read(Query::Module { sha256: key }, true, WRITE_TIMEOUT)
        .await
    {
        Ok(Reply::Module(Some(b))) => b,
        Ok(_) => {
            let _ = tx
                .send(Ok(refuse(format!("module {sha} is not stored"))))
                .await;
            return;
        }
        Err(e) => {
            let _ = tx.send(Ok(refuse(e.to_string()))).await;
            return;
        }
    };
    let total = bytes.len();
    let mut offset = 0;
    loop {
        let end = (offset + MODULE_CHUNK).min(total);
        let chunk = pb::ModuleChunk {
            sha256: sha.to_string(),
            offset: offset as u64,
            data: bytes[offset..end].to_vec(),
            last: end == total,
            error: String::new(),
        };
        if tx
            .send(Ok(control(pb::control_message::Kind::ModuleChunk(chunk))))
            .await
            .is_err()
        {
            return;
        }
        if end == total {
            return;
        }
        offset = end;
    }
}

/// Keeps a worker's instances equal to the committed allocations on its node: a start for
/// each new one, a stop for each gone one; re-checked whenever the applied state moves.
async fn reconcile(replica: ReplicaHandle, node: u64, tx: Outbox) {
    let mut told: HashMap<u64, pb::Assignment> = HashMap::new();
    let mut seen_applied = u64::MAX;
    loop {
        if tx.is_closed() {
            return;
        }
        let info = replica.info();
        if !info.is_leader {
            // Workers follow the leader; tell this one where to go and end its stream.
            let _ = tx.send(Ok(not_leader(info))).await;
            return;
        }
        if info.applied != seen_applied {
            seen_applied = info.applied;
            match replica
                .read(Query::NodeAssignments { node }, true, WRITE_TIMEOUT)
                .await
            {
                Ok(Reply::Assignments(now)) => {
                    let current: HashSet<u64> = now.iter().map(|a| a.allocation).collect();
                    let mut out = Vec::new();
                    for a in now {
                        if let std::collections::hash_map::Entry::Vacant(e) =
                            told.entry(a.allocation)
                        {
                            e.insert(a.clone());
                            out.push(a);
                        }
                    }
                    let gone: Vec<u64> = told
                        .keys()
                        .copied()
                        .filter(|id| !current.contains(id))
                        .collect();
                    for id in gone {
                        if let Some(mut a) = told.remove(&id) {
                            a.start = false;
                            out.push(a);
                        }
                    }
                    for a in out {
                        if tx
                            .send(Ok(control(pb::control_message::Kind::Assignment(a))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(Error::Stopped) => return,
                Err(e) => {
                    tracing::debug!(node = format!("{node:016x}"), error = %e, "reconcile read failed");
                    seen_applied = u64::MAX;
                }
            }
        }
        tokio::time::sleep(RECONCILE_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(node: u64, est_ms: f32, outstanding: usize) -> RouteCandidate {
        RouteCandidate {
            allocation: node * 10,
            node,
            est_ms,
            outstanding,
        }
    }

    #[tokio::test]
    async fn results_are_accepted_only_from_the_node_and_stream_they_were_sent_to() {
        let hub = WorkerHub::new();
        let (a_tx, mut a_rx) = mpsc::channel(8);
        let (b_tx, _b_rx) = mpsc::channel(8);
        let a_gen = hub.attach(1, a_tx, "r".into(), "z".into());
        let b_gen = hub.attach(2, b_tx, "r".into(), "z".into());
        hub.set_ready(1, 10, true);
        let call = {
            let hub = hub.clone();
            tokio::spawn(async move {
                hub.invoke(
                    &[(10, 1)],
                    &Near::default(),
                    &[],
                    pb::Invocation::default(),
                    Duration::from_secs(10),
                )
                .await
            })
        };
        let sent = match a_rx.recv().await {
            Some(Ok(pb::ControlMessage {
                kind: Some(pb::control_message::Kind::Invocation(i)),
            })) => i,
            other => panic!("expected an invocation on node 1's stream, got {other:?}"),
        };
        // 128 random bits, in hex; a secret seed of 32 bytes for the WASI random source.
        assert_eq!(sent.invocation_id.len(), 32);
        assert!(sent.invocation_id.iter().all(u8::is_ascii_hexdigit));
        assert_eq!(sent.random_seed.len(), 32);
        let forged = |stdout: &[u8]| pb::InvocationResult {
            invocation_id: sent.invocation_id.clone(),
            stdout: stdout.to_vec(),
            ..Default::default()
        };
        // Another node answering the call: refused, counted, the call still open.
        assert_eq!(
            hub.complete(2, b_gen, forged(b"forged")),
            Completion::Foreign { count: 1 }
        );
        assert_eq!(hub.refused_results(2), 1);
        // The right node on a stream it no longer has (an older generation): refused too.
        assert!(matches!(
            hub.complete(1, a_gen + 100, forged(b"stale")),
            Completion::Foreign { .. }
        ));
        assert!(!call.is_finished());
        // The node it was sent to, on that stream: answered.
        assert_eq!(
            hub.complete(1, a_gen, forged(b"real")),
            Completion::Accepted
        );
        let (node, allocation, r) = call.await.unwrap().unwrap();
        assert_eq!(
            (node, allocation, r.stdout.as_slice()),
            (1, 10, b"real".as_slice())
        );
        // A second answer to the same call finds nobody waiting.
        assert_eq!(hub.complete(1, a_gen, forged(b"again")), Completion::Late);
        // Ids never repeat.
        let ids: HashSet<Vec<u8>> = (0..1000).map(|_| fresh_invocation().unwrap().0).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn location_tiers() {
        let near = Near {
            region: "cn-east".into(),
            zone: "shanghai".into(),
        };
        assert!(near.tier_ms("cn-east", "shanghai") < near.tier_ms("cn-east", "hangzhou"));
        assert!(near.tier_ms("cn-east", "hangzhou") < near.tier_ms("cn-south", "guangzhou"));
        assert_eq!(Near::default().tier_ms("cn-south", "x"), 0.0);
    }

    #[test]
    fn routing_prefers_near_idle_instances() {
        assert_eq!(choose(&[], 7), None);
        // Two near, one far: the far one is never chosen while the near ones are idle.
        let c = [cand(1, 1.0, 0), cand(2, 41.0, 0), cand(3, 1.5, 0)];
        for draw in 0..1000 {
            let i = choose(&c, mix(draw)).unwrap();
            assert_ne!(c[i].node, 2, "draw {draw}");
        }
        // Among equally near instances the one with fewer calls in flight wins its pair.
        let c = [cand(1, 1.0, 50), cand(2, 1.0, 0)];
        for draw in 0..100 {
            assert_eq!(c[choose(&c, mix(draw)).unwrap()].node, 2);
        }
        // A single near instance that is swamped sheds load to the next nearest.
        let c = [cand(1, 1.0, 200), cand(2, 9.0, 0)];
        assert_eq!(c[choose(&c, mix(3)).unwrap()].node, 2);
        // Both choices are spread over the pool.
        let c: Vec<_> = (0..8).map(|n| cand(n, 1.0, 0)).collect();
        let mut seen = HashSet::new();
        for draw in 0..1000 {
            seen.insert(choose(&c, mix(draw)).unwrap());
        }
        assert_eq!(seen.len(), 8);
    }
}
