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
//!  Invoke ─▶ pick a ready instance (fewest outstanding of two random) ─Invocation─▶ worker
//!         ◀─InvocationResult── answered to the caller; UsageReport ─▶ Usage command (Raft)
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

use crate::error::Error;
use crate::node::ReplicaHandle;
use crate::replica::{Query, Reply, Request, node_state_command};
use crate::service::{ControlStream, WRITE_TIMEOUT, to_status};

/// Module bytes per `ModuleChunk`.
const MODULE_CHUNK: usize = 1 << 20;
/// How often a link re-checks the committed allocations of its node.
const RECONCILE_EVERY: Duration = Duration::from_millis(200);
/// Usage records per Raft command.
const USAGE_BATCH: usize = 1024;

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
}

/// An invocation waiting for its worker's answer.
struct Pending {
    node: u64,
    reply: oneshot::Sender<Result<pb::InvocationResult, Status>>,
}

/// Attached workers and invocations in flight, shared by the `Agent` and `Control` services.
pub struct WorkerHub {
    links: Mutex<HashMap<u64, Link>>,
    pending: Mutex<HashMap<Vec<u8>, Pending>>,
    generation: AtomicU64,
    invocations: AtomicU64,
    closed: tokio::sync::watch::Sender<bool>,
    id_prefix: String,
}

impl std::fmt::Debug for WorkerHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHub")
            .field("attached", &self.attached())
            .finish_non_exhaustive()
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
            id_prefix: {
                let mut b = [0u8; 8];
                if let Err(e) = getrandom::fill(&mut b) {
                    // Last resort: the process id (repeats only if a restart reuses it).
                    tracing::warn!(error = %e, "no OS randomness for invocation ids");
                    b = u64::from(std::process::id()).to_le_bytes();
                }
                hex::encode(b)
            },
        })
    }

    /// Ends every worker stream (the replica is shutting down; workers reconnect elsewhere
    /// or when it is back), so a graceful shutdown does not wait on them.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// `stream`, ended when the hub closes.
    fn until_closed(&self, stream: ControlStream) -> ControlStream {
        let mut closed = self.closed.subscribe();
        Box::pin(futures::StreamExt::take_until(stream, async move {
            let _ = closed.wait_for(|c| *c).await;
        }))
    }

    fn attach(&self, node: u64, tx: Outbox) -> u64 {
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
                },
            );
        }
        generation
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
        if gone && let Ok(mut pending) = self.pending.lock() {
            let lost: Vec<Vec<u8>> = pending
                .iter()
                .filter(|(_, p)| p.node == node)
                .map(|(k, _)| k.clone())
                .collect();
            for id in lost {
                if let Some(p) = pending.remove(&id) {
                    let _ = p.reply.send(Err(Status::unavailable(format!(
                        "worker {node:016x} disconnected during the invocation; it may have run"
                    ))));
                }
            }
        }
    }

    fn set_ready(&self, node: u64, allocation: u64, ready: bool) {
        if let Ok(mut links) = self.links.lock()
            && let Some(l) = links.get_mut(&node)
        {
            if ready {
                l.ready.insert(allocation);
            } else {
                l.ready.remove(&allocation);
            }
        }
    }

    fn complete(&self, node: u64, result: pb::InvocationResult) {
        let p = self
            .pending
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&result.invocation_id));
        if let Ok(mut links) = self.links.lock()
            && let Some(l) = links.get_mut(&node)
        {
            l.outstanding = l.outstanding.saturating_sub(1);
        }
        if let Some(p) = p {
            let _ = p.reply.send(Ok(result));
        }
    }

    /// Workers attached to this replica.
    pub fn attached(&self) -> usize {
        self.links.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Runs one invocation on one of `candidates` (allocation, node) that is attached and
    /// ready: of two picked at random, the one with fewer invocations outstanding.
    pub async fn invoke(
        &self,
        candidates: &[(u64, u64)],
        mut invocation: pb::Invocation,
        timeout: Duration,
    ) -> Result<(u64, u64, pb::InvocationResult), Status> {
        let n = self.invocations.fetch_add(1, Ordering::Relaxed);
        let (allocation, node, tx) = {
            let mut links = self
                .links
                .lock()
                .map_err(|_| Status::internal("worker table poisoned"))?;
            let ready: Vec<(u64, u64)> = candidates
                .iter()
                .copied()
                .filter(|(a, node)| links.get(node).is_some_and(|l| l.ready.contains(a)))
                .collect();
            if ready.is_empty() {
                return Err(Status::unavailable(format!(
                    "no ready instance ({} allocated, none attached and ready yet); retry shortly",
                    candidates.len()
                )));
            }
            // Power of two choices, deterministic per invocation number.
            let i = (n as usize).wrapping_mul(0x9E37_79B9) % ready.len();
            let j = (n as usize / ready.len().max(1) + 1) % ready.len();
            let load = |k: usize| links.get(&ready[k].1).map_or(usize::MAX, |l| l.outstanding);
            let pick = if load(j) < load(i) { j } else { i };
            let (allocation, node) = ready[pick];
            let link = links.get_mut(&node).expect("filtered on presence");
            link.outstanding += 1;
            (allocation, node, link.tx.clone())
        };
        // Globally unique (the ledger deduplicates usage by it): this hub's random prefix,
        // fresh on every start, and a counter.
        let id = format!("{}{n:016x}", self.id_prefix).into_bytes();
        invocation.invocation_id = id.clone();
        invocation.allocation = allocation;
        let (reply, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id.clone(), Pending { node, reply });
        }
        let sent = tx
            .send(Ok(control(pb::control_message::Kind::Invocation(
                invocation,
            ))))
            .await;
        if sent.is_err() {
            self.pending.lock().ok().and_then(|mut p| p.remove(&id));
            return Err(Status::unavailable(format!(
                "worker {node:016x} disconnected; retry"
            )));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r.map(|r| (node, allocation, r)),
            Ok(Err(_)) => Err(Status::unavailable("the worker's link closed")),
            Err(_) => {
                self.pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Ok(mut links) = self.links.lock()
                    && let Some(l) = links.get_mut(&node)
                {
                    l.outstanding = l.outstanding.saturating_sub(1);
                }
                Err(Status::deadline_exceeded(format!(
                    "worker {node:016x} did not answer within {} ms",
                    timeout.as_millis()
                )))
            }
        }
    }
}

/// The `Agent` service: workers dial in and keep one stream.
#[derive(Clone)]
pub struct AgentService {
    replica: ReplicaHandle,
    hub: Arc<WorkerHub>,
    heartbeat_ms: u32,
    join_token: Option<Arc<str>>,
}

impl AgentService {
    /// Serves `replica`; workers must present `join_token` (none set: workers are refused)
    /// and heartbeat every `heartbeat_ms`.
    pub fn new(
        replica: ReplicaHandle,
        hub: Arc<WorkerHub>,
        heartbeat_ms: u32,
        join_token: Option<String>,
    ) -> Self {
        AgentService {
            replica,
            hub,
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
        let generation = self.hub.attach(node, tx.clone());
        tokio::spawn(reconcile(self.replica.clone(), node, tx.clone()));
        let (replica, hub) = (self.replica.clone(), self.hub.clone());
        tokio::spawn(async move {
            let mut usage = Vec::new();
            while let Some(msg) = inbound.next().await {
                let Ok(msg) = msg else { break };
                let Some(kind) = msg.kind else { continue };
                if let Err(e) = on_message(&replica, &hub, node, &tx, kind, &mut usage).await {
                    tracing::warn!(node = format!("{node:016x}"), error = %e, "worker stream refused a message");
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
            flush_usage(&replica, &mut usage).await;
            hub.detach(node, generation);
            tracing::info!(node = format!("{node:016x}"), "worker stream ended");
        });
        Ok(Response::new(stream))
    }
}

async fn on_message(
    replica: &ReplicaHandle,
    hub: &WorkerHub,
    node: u64,
    tx: &Outbox,
    kind: pb::worker_message::Kind,
    usage: &mut Vec<pb::UsageRecord>,
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
            replica
                .heartbeat(node, coordinate)
                .await
                .map_err(to_status)?;
            // The replica is a fixed landmark at the origin; the worker's RTT to it moves
            // the worker's own coordinate.
            let _ = tx
                .send(Ok(control(pb::control_message::Kind::HeartbeatAck(
                    pb::HeartbeatAck {
                        seq: hb.seq,
                        coordinate: Some(pb::Coordinate {
                            vec: vec![0.0; 3],
                            height_ms: 0.0,
                        }),
                    },
                ))))
                .await;
        }
        Kind::Allocation(u) => {
            let running = u.state == pb::AllocationState::Running as i32;
            hub.set_ready(node, u.allocation, running);
            if !running && !u.message.is_empty() {
                tracing::warn!(
                    node = format!("{node:016x}"),
                    allocation = u.allocation,
                    message = %u.message,
                    "worker could not start an instance"
                );
            }
        }
        Kind::Result(r) => hub.complete(node, r),
        Kind::Usage(report) => {
            for mut r in report.records {
                // A worker reports only its own usage.
                r.node = node;
                usage.push(r);
            }
            // The worker batches (one report a second); record each report at once.
            flush_usage(replica, usage).await;
        }
        Kind::Draining(_) => {
            tracing::info!(node = format!("{node:016x}"), "worker draining");
            set_node_state(replica, node, pb::NodeState::Draining).await;
        }
        Kind::FetchModule(f) => send_module(replica, tx, &f.sha256).await,
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

async fn flush_usage(replica: &ReplicaHandle, usage: &mut Vec<pb::UsageRecord>) {
    while !usage.is_empty() {
        let records: Vec<pb::UsageRecord> = usage.drain(..usage.len().min(USAGE_BATCH)).collect();
        let n = records.len();
        let cmd = pb::Command {
            request_id: Vec::new(),
            kind: Some(pb::command::Kind::Usage(pb::UsageCmd { records })),
        };
        if let Err(e) = replica.write(Request::Command(cmd), WRITE_TIMEOUT).await {
            tracing::warn!(records = n, error = %e, "usage report not recorded");
        }
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
