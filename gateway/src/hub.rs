//! The workers attached to this gateway and the invocations in flight on them: one link per
//! node (a newer stream replaces an older one), the instances each reported ready, and the
//! calls waiting for a result. A result is accepted only from the node and stream generation
//! the call was sent to.
//!
//! ```text
//!  attach(node) ─▶ Link{generation, outbox, ready, outstanding, rtt, last heard}
//!  invoke ─▶ candidates(ready, not excluded) ─▶ choose (p2c on latency + queue)
//!         ─▶ pending[id] = (node, generation) ─Invocation─▶ worker
//!  complete(node, generation, result) ─▶ Accepted | Late | Foreign (counted; 3 closes)
//!  detach / reattach ─▶ calls on the old stream fail at once (WORKER_LOST)
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stellar_proto::v1 as pb;
use tokio::sync::{Notify, mpsc, oneshot};
use tonic::Status;

use crate::view::Affected;

/// A worker's outbound queue (what the gateway sends down its stream).
pub type Outbox = mpsc::Sender<Result<pb::ControlMessage, Status>>;

/// A message for a worker.
pub fn control(kind: pb::control_message::Kind) -> pb::ControlMessage {
    pb::ControlMessage { kind: Some(kind) }
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
    /// The worker's measured distance to this gateway (its Vivaldi coordinate against the
    /// gateway's), in ms: the gateway-to-worker hop every call pays.
    rtt_ms: f32,
    /// Results this stream sent for calls that were issued to another node or stream.
    foreign_results: u32,
    /// When the worker last said anything (a silent stream is closed).
    last_heard: Instant,
    /// This gateway is storing one of the worker's output chunks: it is not reading the
    /// stream meanwhile, so the worker's silence is ours, not the worker's.
    storing: bool,
    /// Wakes the link's reconcile task when its node's assignments may have changed.
    wake: Arc<Notify>,
    /// The worker is draining: no new calls.
    draining: bool,
}

/// Results for calls issued elsewhere that end a worker's stream: such a result is never
/// an accident (ids are 128 random bits and only the node that ran a call learns its id
/// before it is answered).
pub const MAX_FOREIGN_RESULTS: u32 = 3;

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
    /// No leader has given this gateway the ticket key yet, so it cannot issue the ticket
    /// a worker's usage is billed by (nothing was sent).
    #[error("no ticket key yet: this gateway has no session with the leader")]
    NoTicketKey,
}

/// An invocation's answer and where it ran.
#[derive(Debug, Clone)]
pub struct Answered {
    /// The node that ran it.
    pub node: u64,
    /// Its allocation there.
    pub allocation: u64,
    /// The worker's result.
    pub result: pb::InvocationResult,
    /// The random seed the call ran with (a re-execution check repeats it).
    pub seed: Vec<u8>,
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
    /// Seals the tickets of calls sent from here and checks workers' receipts.
    pub tickets: crate::receipts::TicketDesk,
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
            tickets: Default::default(),
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

    /// Attaches `node`'s new stream (replacing any older one, whose calls fail at once); its
    /// generation, and the notifier that wakes its reconcile task.
    pub fn attach(
        &self,
        node: u64,
        tx: Outbox,
        region: String,
        zone: String,
    ) -> (u64, Arc<Notify>) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let wake = Arc::new(Notify::new());
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
                    last_heard: stellar_proto::clock::now(),
                    storing: false,
                    wake: wake.clone(),
                    draining: false,
                },
            );
        }
        // Calls on the replaced stream will never be answered there.
        self.fail_pending(node, |g| g != generation);
        (generation, wake)
    }

    /// Whether `node` has a stream here now.
    pub fn holds(&self, node: u64) -> bool {
        self.links.lock().is_ok_and(|l| l.contains_key(&node))
    }

    /// Every node attached here (a new leader learns them in one report).
    pub fn nodes(&self) -> Vec<u64> {
        self.links
            .lock()
            .map(|l| l.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Wakes the reconcile tasks of the nodes whose assignments may have changed.
    pub fn wake(&self, affected: &Affected) {
        let Ok(links) = self.links.lock() else {
            return;
        };
        match affected {
            Affected::All => links.values().for_each(|l| l.wake.notify_one()),
            Affected::Nodes(nodes) => {
                for n in nodes {
                    if let Some(l) = links.get(n) {
                        l.wake.notify_one();
                    }
                }
            }
        }
    }

    /// The worker on `node` (this stream) said something: it is alive.
    pub fn heard(&self, node: u64, generation: u64) {
        if let Ok(mut links) = self.links.lock()
            && let Some(l) = links.get_mut(&node)
            && l.generation == generation
        {
            l.last_heard = stellar_proto::clock::now();
        }
    }

    /// This gateway starts (`true`) or ends storing a chunk the worker on `node` sent: while
    /// it does, it reads nothing more from the stream, so the worker is not judged silent
    /// (a control plane slow to store, e.g. through an election, is not the worker's fault).
    pub fn storing(&self, node: u64, generation: u64, busy: bool) {
        if let Ok(mut links) = self.links.lock()
            && let Some(l) = links.get_mut(&node)
            && l.generation == generation
        {
            l.storing = busy;
            l.last_heard = stellar_proto::clock::now();
        }
    }

    /// Ends the streams of workers silent for longer than `silent` (their keepalive
    /// stopped: a dead device, a cut line); the nodes they were on.
    pub fn close_silent(&self, silent: Duration) -> Vec<u64> {
        let quiet: Vec<(u64, u64)> = match self.links.lock() {
            Ok(links) => links
                .iter()
                .filter(|(_, l)| !l.storing && l.last_heard.elapsed() > silent)
                .map(|(&n, l)| (n, l.generation))
                .collect(),
            Err(_) => return Vec::new(),
        };
        for &(node, generation) in &quiet {
            if let Ok(links) = self.links.lock()
                && let Some(l) = links.get(&node)
            {
                let _ = l.tx.try_send(Err(Status::unavailable(format!(
                    "no heartbeat for {} ms; reconnect",
                    silent.as_millis()
                ))));
            }
            self.detach(node, generation);
        }
        quiet.into_iter().map(|(n, _)| n).collect()
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

    /// Forgets `node`'s stream `generation` (a newer one stays); true if it was the current
    /// one (the node is no longer attached here).
    pub fn detach(&self, node: u64, generation: u64) -> bool {
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
        gone
    }

    /// Marks an instance ready or not; true when it just became ready on this stream.
    pub fn set_ready(&self, node: u64, allocation: u64, ready: bool) -> bool {
        if let Ok(mut links) = self.links.lock()
            && let Some(l) = links.get_mut(&node)
            && !l.draining
        {
            if ready {
                return l.ready.insert(allocation);
            }
            l.ready.remove(&allocation);
        }
        false
    }

    /// A draining node takes no new calls: none of its instances is ready any more, and none
    /// becomes ready again on this stream.
    pub fn set_draining(&self, node: u64) {
        if let Ok(mut links) = self.links.lock()
            && let Some(l) = links.get_mut(&node)
        {
            l.ready.clear();
            l.draining = true;
        }
    }

    /// Sends `msg` (a Redirect) to at most `count` attached workers that have no call in
    /// flight and are not draining, and routes no new call to them (they are leaving); how
    /// many were sent.
    pub fn shed(&self, count: usize, msg: &pb::ControlMessage) -> usize {
        let Ok(mut links) = self.links.lock() else {
            return 0;
        };
        let mut sent = 0;
        for l in links.values_mut() {
            if sent >= count {
                break;
            }
            if l.outstanding > 0 || l.draining {
                continue;
            }
            if l.tx.try_send(Ok(msg.clone())).is_ok() {
                l.ready.clear();
                l.draining = true;
                sent += 1;
            }
        }
        sent
    }

    /// The worker's measured distance to this gateway.
    pub fn set_rtt(&self, node: u64, rtt_ms: f32) {
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
    pub fn complete(&self, node: u64, generation: u64, result: pb::InvocationResult) -> Completion {
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

    /// Tells workers that these (node, receipt seq) receipts are settled, so they stop
    /// keeping them. Best effort: a worker whose queue is full sends them again, and the
    /// ledger answers DUPLICATE.
    pub fn ack_usage(&self, receipts: Vec<(u64, u64)>) {
        let mut by_node: HashMap<u64, Vec<u64>> = HashMap::new();
        for (node, seq) in receipts {
            by_node.entry(node).or_default().push(seq);
        }
        let Ok(links) = self.links.lock() else {
            return;
        };
        for (node, seqs) in by_node {
            if let Some(l) = links.get(&node) {
                let _ =
                    l.tx.try_send(Ok(control(pb::control_message::Kind::UsageAck(
                        pb::UsageAck { seqs },
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
    ) -> Result<Answered, HubError> {
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
        let fresh = fresh_invocation().and_then(|(id, seed)| {
            self.tickets
                .ready()
                .then_some((id, seed))
                .ok_or(HubError::NoTicketKey)
        });
        let (id, seed) = match fresh {
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
        // A re-execution check brings the seed of the call it repeats.
        if invocation.random_seed.is_empty() {
            invocation.random_seed = seed;
        }
        let seed = invocation.random_seed.clone();
        invocation.allocation = allocation;
        let mut ticket = invocation.ticket.take().unwrap_or_default();
        // Checked ready above; a key that vanished meanwhile leaves the ticket unsealed and
        // the worker's receipt is refused (never billed).
        self.tickets.issue(&mut ticket, &invocation, node);
        invocation.ticket = Some(ticket);
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
            Ok(Ok(r)) => r.map(|result| Answered {
                node,
                allocation,
                result,
                seed,
            }),
            Ok(Err(_)) => Err(HubError::WorkerLost { node }),
            Err(_) => Err(HubError::Timeout {
                node,
                ms: timeout.as_millis() as u64,
            }),
        }
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
    async fn a_caller_that_cancels_frees_its_pending_entry_and_outstanding_count() {
        let hub = WorkerHub::new();
        hub.tickets.set_key(&[1; 32]);
        let (tx, mut rx) = mpsc::channel(8);
        let (generation, _) = hub.attach(1, tx, "r".into(), "z".into());
        hub.set_ready(1, 10, true);
        let outstanding = |hub: &WorkerHub| hub.links.lock().unwrap()[&1].outstanding;
        let call = {
            let hub = hub.clone();
            tokio::spawn(async move {
                hub.invoke(
                    &[(10, 1)],
                    &Near::default(),
                    &[],
                    pb::Invocation::default(),
                    Duration::from_secs(60),
                )
                .await
            })
        };
        let sent = match rx.recv().await {
            Some(Ok(pb::ControlMessage {
                kind: Some(pb::control_message::Kind::Invocation(i)),
            })) => i,
            other => panic!("expected an invocation, got {other:?}"),
        };
        assert_eq!(hub.pending.lock().unwrap().len(), 1);
        assert_eq!(outstanding(&hub), 1);
        // The caller goes away (its gRPC stream was cancelled): its task is dropped.
        call.abort();
        let _ = call.await;
        assert_eq!(hub.pending.lock().unwrap().len(), 0, "entry freed");
        assert_eq!(outstanding(&hub), 0, "the node is not counted busy");
        // The worker's late answer finds nobody and is not held against it.
        let late = pb::InvocationResult {
            invocation_id: sent.invocation_id,
            ..Default::default()
        };
        assert_eq!(hub.complete(1, generation, late), Completion::Late);
        assert_eq!(hub.refused_results(1), 0);
    }

    #[tokio::test]
    async fn results_are_accepted_only_from_the_node_and_stream_they_were_sent_to() {
        let hub = WorkerHub::new();
        hub.tickets.set_key(&[1; 32]);
        let (a_tx, mut a_rx) = mpsc::channel(8);
        let (b_tx, _b_rx) = mpsc::channel(8);
        let (a_gen, _) = hub.attach(1, a_tx, "r".into(), "z".into());
        let (b_gen, _) = hub.attach(2, b_tx, "r".into(), "z".into());
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
        let Answered {
            node,
            allocation,
            result: r,
            ..
        } = call.await.unwrap().unwrap();
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
    fn a_worker_is_not_silent_while_the_gateway_stores_its_upload() {
        let hub = WorkerHub::new();
        let (tx, _rx) = mpsc::channel(4);
        let (generation, _) = hub.attach(1, tx, "r".into(), "z".into());
        let (tx2, _rx2) = mpsc::channel(4);
        hub.attach(2, tx2, "r".into(), "z".into());
        hub.storing(1, generation, true);
        std::thread::sleep(Duration::from_millis(30));
        // Node 1's chunk is being stored: not closed; node 2 said nothing: closed.
        assert_eq!(hub.close_silent(Duration::from_millis(10)), vec![2]);
        // Once stored, its silence counts again, from then on.
        hub.storing(1, generation, false);
        assert!(hub.close_silent(Duration::from_millis(20)).is_empty());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(hub.close_silent(Duration::from_millis(20)), vec![1]);
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
