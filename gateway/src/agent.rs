//! The `Agent` service on a gateway: home nodes dial in (NAT-friendly) and keep one stream;
//! the control plane never connects to them and never hears from them directly.
//!
//! ```text
//!  worker ─Challenge─────────▶ a fresh nonce (challenge.rs: taken once, within a minute)
//!  worker ─Register(signed)──▶ join token + signature over key, token, nonce ─▶ nonce taken
//!                              ─▶ session: joined ─▶ committed (ack)
//!         ◀─Registered──────── link in the hub (one per node; a newer stream wins)
//!         ◀─Assignment──────── reconcile: the view's allocations on the node vs what the
//!                              stream was told (woken by watch events, level-triggered)
//!         ─FetchModule───────▶ module cache (fetched once from any replica), 1 MiB chunks
//!         ─AllocationUpdate──▶ RUNNING: ready for calls; FAILED: recorded through Raft
//!         ─Heartbeat─────────▶ alive (soft); coordinate moved ─▶ session: load
//!                              ◀─HeartbeatAck (the worker's RTT sample)
//!         ─InvocationResult──▶ hub: answers the call it was sent for, if it was sent here
//!         ─UsageReport───────▶ usage writer ─▶ Raft ◀─UsageAck── once committed
//!         ─Draining──────────▶ no new calls; session: draining
//!         ◀─Task / CancelTask── reconcile: the view's running attempts on the node
//!         ─TaskOutputChunk───▶ task_relay: PutBlob per file ─▶ TaskResult ─▶ ReportTasks
//!         ◀─TaskAck─────────── once the report is committed
//!  stream ends / silent ─▶ calls on it fail at once ─▶ session: gone (after a hold)
//! ```

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use stellar_proto::v1 as pb;
use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamExt;
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

use crate::allocation_states::AllocationStateWriter;
use crate::coordinates::Coordinates;
use crate::hub::{Completion, MAX_FOREIGN_RESULTS, Outbox, WorkerHub, control};
use crate::modules::Modules;
use crate::session::Session;
use crate::usage::UsageWriter;
use crate::view::View;
use stellar_proto::client::ClusterClient;

/// How long a worker's registration may wait for the leader to commit it.
const REGISTER_WAIT: Duration = Duration::from_secs(15);
/// A coordinate that moved less than this (ms) is not worth telling the leader.
const COORDINATE_SLACK_MS: f32 = 2.0;
/// Messages queued for one worker; a full queue drops acks, never blocks the reader.
const OUTBOX: usize = 256;

/// The server side of a worker's stream.
pub type WorkerStream = Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

/// What the agent service shares with the rest of the gateway.
#[derive(Debug, Clone)]
pub struct Edge {
    /// Attached workers and calls in flight.
    pub hub: Arc<WorkerHub>,
    /// The committed state, as watched.
    pub view: Arc<View>,
    /// The session with the leader (liveness deltas).
    pub session: Arc<Session>,
    /// Usage on its way to the ledger.
    pub usage: UsageWriter,
    /// Instance states on their way to the control plane.
    pub states: AllocationStateWriter,
    /// Modules for workers.
    pub modules: Arc<Modules>,
    /// The control plane (image layers are relayed from it to workers).
    pub client: ClusterClient,
    /// This gateway's network coordinate and its peers'.
    pub coordinates: Arc<Coordinates>,
    /// This gateway's advertised address (workers are told the others).
    pub advertise: String,
    /// Nodes above the mean this gateway holds before it sends workers elsewhere.
    pub balance_slack: usize,
}

impl Edge {
    /// The gateways a worker may be sent to, with the ready nodes each holds.
    pub fn loads(&self) -> Vec<(Arc<str>, usize)> {
        crate::balance::loads(
            self.view.gateway_loads(),
            &self.session.gateways(),
            &self.advertise,
            |g| self.coordinates.answers(g),
        )
    }
}

/// The `Agent` service: workers dial in and keep one stream.
#[derive(Clone)]
pub struct AgentService {
    edge: Edge,
    heartbeat_ms: u32,
    join_token: Option<Arc<str>>,
    closed: tokio::sync::watch::Receiver<bool>,
    nonces: Arc<crate::challenge::Nonces>,
}

impl AgentService {
    /// Serves workers presenting `join_token` (none: workers are refused), asked to
    /// heartbeat every `heartbeat_ms`; their streams end when `closed` fires.
    pub fn new(
        edge: Edge,
        heartbeat_ms: u32,
        join_token: Option<String>,
        closed: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        AgentService {
            edge,
            heartbeat_ms,
            join_token: join_token.map(Into::into),
            closed,
            nonces: Arc::default(),
        }
    }

    fn check(&self, reg: &pb::Register) -> Result<(), Status> {
        let Some(expected) = &self.join_token else {
            return Err(Status::failed_precondition(
                "this gateway accepts no workers: start it with --join-token",
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
            &reg.nonce,
            &reg.signature,
        ) {
            return Err(Status::unauthenticated(
                "the registration signature does not match the node's public key, id and nonce",
            ));
        }
        // Only a registration signed by the key holder takes its nonce: nobody else can
        // spend a worker's nonce before it does.
        self.nonces.redeem(&reg.nonce).map_err(|e| match e {
            crate::challenge::NonceError::Unknown => Status::unauthenticated(e.to_string()),
            crate::challenge::NonceError::Busy => Status::unavailable(e.to_string()),
        })
    }

    /// `stream`, ended when the gateway shuts down.
    fn until_closed(&self, stream: WorkerStream) -> WorkerStream {
        let mut closed = self.closed.clone();
        Box::pin(futures::StreamExt::take_until(stream, async move {
            let _ = closed.wait_for(|c| *c).await;
        }))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    type AttachStream = WorkerStream;

    async fn ping(
        &self,
        req: GrpcRequest<pb::PingRequest>,
    ) -> Result<Response<pb::PingReply>, Status> {
        let r = req.into_inner();
        if let Some(c) = r.coordinate.as_ref()
            && r.rtt_ms > 0.0
        {
            self.edge.coordinates.observe(c, f64::from(r.rtt_ms));
        }
        Ok(Response::new(pb::PingReply {
            coordinate: Some(self.edge.coordinates.me_wire()),
        }))
    }

    async fn challenge(
        &self,
        _: GrpcRequest<pb::ChallengeRequest>,
    ) -> Result<Response<pb::ChallengeReply>, Status> {
        let nonce = self
            .nonces
            .issue()
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::ChallengeReply {
            nonce: nonce.to_vec(),
        }))
    }

    async fn attach(
        &self,
        req: GrpcRequest<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<WorkerStream>, Status> {
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
        self.check(&reg)?;
        if let Some((to, reason)) = crate::balance::redirect_for(
            &self.edge.loads(),
            &self.edge.advertise,
            self.edge.balance_slack,
        ) {
            tracing::debug!(node = format!("{:016x}", reg.node), to = %to, %reason, "worker redirected");
            let msg = control(pb::control_message::Kind::Redirect(pb::Redirect {
                gateway: to,
                reason,
            }));
            let stream: WorkerStream = Box::pin(futures::stream::iter([Ok(msg)]));
            return Ok(Response::new(stream));
        }
        let attrs = reg
            .attributes
            .ok_or_else(|| Status::invalid_argument("Register needs attributes"))?;
        let node = reg.node;
        let (region, zone) = (attrs.region.clone(), attrs.zone.clone());
        let public_key = reg.public_key.clone();
        let record = pb::NodeRecord {
            id: node,
            public_key: reg.public_key,
            attributes: Some(attrs),
            state: pb::NodeState::Ready as i32,
            reputation: 1.0,
            managed: true,
            gateway: String::new(),
        };
        let committed = self.edge.session.register(record);
        match tokio::time::timeout(REGISTER_WAIT, committed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(why))) => {
                return Err(Status::unavailable(format!(
                    "the control plane did not register this node: {why}; retrying is safe"
                )));
            }
            Ok(Err(_)) | Err(_) => {
                return Err(Status::unavailable(format!(
                    "no leader confirmed the registration within {} s; retrying is safe",
                    REGISTER_WAIT.as_secs()
                )));
            }
        }
        let (tx, rx) = mpsc::channel::<Result<pb::ControlMessage, Status>>(OUTBOX);
        let stream = self.until_closed(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let _ = tx
            .send(Ok(control(pb::control_message::Kind::Registered(
                pb::Registered {
                    node,
                    heartbeat_ms: self.heartbeat_ms,
                    gateways: self
                        .edge
                        .view
                        .gateways()
                        .iter()
                        .filter(|g| ***g != *self.edge.advertise)
                        .map(|g| g.to_string())
                        .collect(),
                },
            ))))
            .await;
        let (generation, wake) = self.edge.hub.attach(node, tx.clone(), region, zone);
        tracing::info!(node = format!("{node:016x}"), "worker attached");
        tokio::spawn(reconcile(self.edge.view.clone(), node, tx.clone(), wake));
        let edge = self.edge.clone();
        tokio::spawn(async move {
            let mut reported: Option<pb::Coordinate> = None;
            let mut uploads = crate::task_relay::TaskUploads::default();
            while let Some(msg) = inbound.next().await {
                let Ok(msg) = msg else { break };
                edge.hub.heard(node, generation);
                let Some(kind) = msg.kind else { continue };
                // Task outputs are awaited here: a worker uploads no faster than the
                // control plane stores (gRPC flow control holds it back meanwhile).
                let kind = match kind {
                    pb::worker_message::Kind::TaskOutput(o) => {
                        edge.hub.storing(node, generation, true);
                        uploads.chunk((node, &edge.view, &edge.client), o).await;
                        edge.hub.storing(node, generation, false);
                        continue;
                    }
                    pb::worker_message::Kind::TaskResult(r) => {
                        uploads.result((node, &edge.view), &edge.client, &tx, r);
                        continue;
                    }
                    k => k,
                };
                let link = (node, generation, public_key.as_slice());
                if let Err(e) = on_message(&edge, link, &tx, &mut reported, kind) {
                    tracing::warn!(node = format!("{node:016x}"), error = %e, "worker stream refused a message");
                    let _ = tx.try_send(Err(e));
                    break;
                }
            }
            if edge.hub.detach(node, generation) {
                edge.session.gone(&edge.hub, node);
            }
            tracing::info!(node = format!("{node:016x}"), "worker stream ended");
        });
        Ok(Response::new(stream))
    }
}

/// Hands a result to the call waiting for it; too many results for calls this node was not
/// sent end its stream.
fn on_result(
    edge: &Edge,
    node: u64,
    generation: u64,
    r: pb::InvocationResult,
) -> Result<(), Status> {
    match edge.hub.complete(node, generation, r) {
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
    }
    Ok(())
}

/// Handles one message from a worker. It never waits on the worker's outbound queue (acks
/// are dropped when it is full, module transfers run in their own task): the worker may be
/// waiting on us to read, and both sides blocking on each other would stall the stream.
fn on_message(
    edge: &Edge,
    (node, generation, public_key): (u64, u64, &[u8]),
    tx: &Outbox,
    reported: &mut Option<pb::Coordinate>,
    kind: pb::worker_message::Kind,
) -> Result<(), Status> {
    use pb::worker_message::Kind;
    match kind {
        Kind::Register(_) => return Err(Status::invalid_argument("already registered")),
        Kind::Heartbeat(hb) => {
            if let Some(c) = hb.coordinate.as_ref().filter(|c| c.vec.len() == 3) {
                if let Some(ms) = edge.coordinates.to_worker_ms(c) {
                    edge.hub.set_rtt(node, ms);
                }
                if hb.rtt_ms > 0.0 {
                    edge.coordinates.observe(c, f64::from(hb.rtt_ms));
                }
                let dist = |a: &pb::Coordinate, b: &[f32]| -> f32 {
                    a.vec
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (x - y) * (x - y))
                        .sum::<f32>()
                        .sqrt()
                };
                let moved = reported.as_ref().is_none_or(|r| {
                    r.vec.len() != 3
                        || dist(c, &r.vec) + (c.height_ms - r.height_ms).abs() > COORDINATE_SLACK_MS
                });
                if moved {
                    edge.session.load(node, c.clone());
                    *reported = Some(c.clone());
                }
            }
            let _ = tx.try_send(Ok(control(pb::control_message::Kind::HeartbeatAck(
                pb::HeartbeatAck {
                    seq: hb.seq,
                    coordinate: Some(edge.coordinates.me_wire()),
                },
            ))));
        }
        Kind::Allocation(u) => {
            let running = u.state == pb::AllocationState::Running as i32;
            // A failure to load (older workers say STOPPED with a reason).
            let failed = u.state == pb::AllocationState::Failed as i32
                || (u.state == pb::AllocationState::Stopped as i32 && !u.message.is_empty());
            let newly_ready = edge.hub.set_ready(node, u.allocation, running);
            if newly_ready {
                edge.states
                    .report(node, u.allocation, pb::AllocationState::Running, "");
            }
            if failed {
                tracing::warn!(
                    node = format!("{node:016x}"),
                    allocation = u.allocation,
                    message = %u.message,
                    "worker could not load an instance's module"
                );
                if !edge
                    .states
                    .report(node, u.allocation, pb::AllocationState::Failed, &u.message)
                {
                    tracing::warn!(
                        node = format!("{node:016x}"),
                        "allocation-state queue full; failure not recorded"
                    );
                }
            }
        }
        Kind::Result(mut r) => {
            // The receipt is checked here, in stream order, whether or not a caller still
            // waits: the ledger needs each node's receipts in sequence.
            if let Some(receipt) = r.receipt.take() {
                match edge
                    .hub
                    .tickets
                    .check(&receipt, node, public_key, Some(&r.stdout))
                {
                    Ok(record) => {
                        edge.usage.record(record);
                        r.receipt = Some(receipt);
                    }
                    Err(v) => {
                        let signed =
                            stellar_proto::receipts::signature_checks(public_key, &receipt);
                        edge.usage.refuse(node, &receipt, v, signed);
                        // Its output is not what it signed for (or not signed at all): the
                        // caller gets an error, not bytes this node would not stand by.
                        r = pb::InvocationResult {
                            invocation_id: r.invocation_id,
                            error_code: "BAD_RECEIPT".into(),
                            error_message: format!(
                                "worker {node:016x} answered with a receipt refused as {}; \
                                 the call's output was discarded",
                                v.as_str_name()
                            ),
                            ..Default::default()
                        };
                    }
                }
            }
            on_result(edge, node, generation, r)?;
        }
        Kind::Usage(report) => {
            for receipt in report.receipts {
                match edge.hub.tickets.check(&receipt, node, public_key, None) {
                    Ok(record) => edge.usage.record(record),
                    Err(v) => {
                        let signed =
                            stellar_proto::receipts::signature_checks(public_key, &receipt);
                        edge.usage.refuse(node, &receipt, v, signed);
                    }
                }
            }
        }
        Kind::Draining(_) => {
            tracing::info!(node = format!("{node:016x}"), "worker draining");
            edge.hub.set_draining(node);
            edge.session.draining(node);
        }
        Kind::TaskOutput(_) | Kind::TaskResult(_) => {
            // Handled by the stream's reader (they wait on uploads).
        }
        Kind::FetchBlob(f) => {
            // A worker gets only the layers of images it was assigned and its tasks' inputs.
            let (assignments, tasks) = (edge.view.assignments(node), edge.view.tasks(node));
            if !crate::blob_relay::assigned(&assignments, &tasks, &f.sha256) {
                let refusal = pb::BlobChunk {
                    sha256: f.sha256,
                    last: true,
                    error: "no image or task assigned to this node has that blob".into(),
                    ..Default::default()
                };
                let _ = tx.try_send(Ok(control(pb::control_message::Kind::BlobChunk(refusal))));
                return Ok(());
            }
            tokio::spawn(crate::blob_relay::relay(
                edge.client.clone(),
                f,
                node,
                tx.clone(),
            ));
        }
        Kind::FetchModule(f) => {
            let (modules, tx) = (edge.modules.clone(), tx.clone());
            tokio::spawn(async move {
                let bytes = modules.get(&f.sha256).await;
                if let Err(e) = &bytes {
                    tracing::warn!(sha256 = %f.sha256, error = %e, "module not available for a worker");
                }
                for chunk in crate::modules::chunks(&f.sha256, bytes) {
                    if tx
                        .send(Ok(control(pb::control_message::Kind::ModuleChunk(chunk))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    }
    Ok(())
}

/// Keeps a worker's instances equal to the watched allocations on its node: a start for
/// each new one, a stop for each gone one, and once per stream the whole set (the worker
/// stops what is not in it); re-run whenever a watch event touches the node.
async fn reconcile(view: Arc<View>, node: u64, tx: Outbox, wake: Arc<Notify>) {
    let mut told: HashMap<u64, pb::Assignment> = HashMap::new();
    let mut told_tasks: std::collections::HashSet<crate::view::TaskId> = Default::default();
    let mut first = true;
    loop {
        if tx.is_closed() {
            return;
        }
        // Task attempts: each sent once per stream (the worker ignores one it runs or ran),
        // and cancelled once gone from the view (another attempt won, or the job ended).
        let tasks = view.tasks(node);
        let now_tasks: std::collections::HashSet<crate::view::TaskId> = tasks
            .iter()
            .map(|t| crate::view::task_id(&t.key.unwrap_or_default()))
            .collect();
        let mut task_msgs = Vec::new();
        for t in tasks {
            let id = crate::view::task_id(&t.key.unwrap_or_default());
            if told_tasks.insert(id) {
                task_msgs.push(pb::control_message::Kind::Task(t));
            }
        }
        let gone: Vec<crate::view::TaskId> = told_tasks.difference(&now_tasks).copied().collect();
        for id in gone {
            told_tasks.remove(&id);
            task_msgs.push(pb::control_message::Kind::CancelTask(pb::TaskKey {
                job: id.0,
                stage: id.1,
                task: id.2,
                attempt: id.3,
            }));
        }
        for m in task_msgs {
            if tx.send(Ok(control(m))).await.is_err() {
                return;
            }
        }
        let now = view.assignments(node);
        let current: std::collections::HashSet<u64> = now.iter().map(|a| a.allocation).collect();
        let mut out = Vec::new();
        for a in now {
            let changed = told.get(&a.allocation).is_none_or(|t| *t != a);
            if changed {
                told.insert(a.allocation, a.clone());
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
        if first && view.complete() {
            // The whole set once per stream: the worker stops instances removed while it
            // was away (or attached elsewhere), which no stop assignment will ever name. Not
            // before the view is loaded: an empty view would stop everything.
            first = false;
            let set = pb::AssignmentSet {
                allocations: told.keys().copied().collect(),
                tasks: told_tasks
                    .iter()
                    .map(|&(job, stage, task, attempt)| pb::TaskKey {
                        job,
                        stage,
                        task,
                        attempt,
                    })
                    .collect(),
            };
            if tx
                .send(Ok(control(pb::control_message::Kind::AssignmentSet(set))))
                .await
                .is_err()
            {
                return;
            }
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next(
        rx: &mut mpsc::Receiver<Result<pb::ControlMessage, Status>>,
    ) -> Option<pb::control_message::Kind> {
        rx.try_recv().ok().and_then(|m| m.ok()).and_then(|m| m.kind)
    }

    #[tokio::test]
    async fn a_stream_gets_its_whole_assignment_set_once_the_view_is_loaded() {
        let view = View::new();
        let (tx, mut rx) = mpsc::channel(16);
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(reconcile(view.clone(), 1, tx, wake.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Nothing is known yet: no set (it would stop every instance on the worker).
        assert!(next(&mut rx).is_none());
        view.apply(pb::WatchEvent {
            applied_index: 3,
            reset: true,
            functions: vec![pb::WatchedFunction {
                tenant: "acme".into(),
                name: "f".into(),
                version: 1,
                module_sha256: "ab".repeat(32),
                ..Default::default()
            }],
            allocations: vec![pb::Allocation {
                id: 7,
                tenant: "acme".into(),
                function: "f".into(),
                version: 1,
                node: 1,
                ..Default::default()
            }],
            ..Default::default()
        });
        wake.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        match next(&mut rx) {
            Some(pb::control_message::Kind::Assignment(a)) => {
                assert!(a.start && a.allocation == 7, "{a:?}")
            }
            other => panic!("expected the start assignment, got {other:?}"),
        }
        match next(&mut rx) {
            Some(pb::control_message::Kind::AssignmentSet(s)) => assert_eq!(s.allocations, vec![7]),
            other => panic!("expected the whole set, got {other:?}"),
        }
        // Later changes are deltas only: a removal is a stop, not another set.
        view.apply(pb::WatchEvent {
            applied_index: 4,
            removed_allocations: vec![7],
            ..Default::default()
        });
        wake.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        match next(&mut rx) {
            Some(pb::control_message::Kind::Assignment(a)) => {
                assert!(!a.start && a.allocation == 7, "{a:?}")
            }
            other => panic!("expected a stop, got {other:?}"),
        }
        assert!(next(&mut rx).is_none());
        task.abort();
    }
}
