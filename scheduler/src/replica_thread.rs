//! The replica's driver: one OS thread owns the [`Replica`] (and so the `RawNode`) and loops
//! over ticks, client requests, peer messages and persistence; async gRPC handlers talk to it
//! through a [`ReplicaHandle`].
//!
//! ```text
//!  gRPC handlers ──(semaphore: bounded in-flight)──▶ channel ──▶ replica thread
//!                ◀──────────── oneshot reply ◀─────────────────┤ tick every `tick`
//!  Raft service ──▶ channel (peer messages) ───────────────────┤ process(): Ready protocol
//!                                                              └▶ Transport (per-peer streams)
//! ```
//!
//! The fsync in `process` blocks only this thread; everything that arrived meanwhile is
//! batched into the next round (group commit).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use raft::eraftpb::Message;
use stellar_proto::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::error::{Error, Result};
use crate::replica::{Output, Query, Replica, Reply, Request};

/// Most client requests in flight per replica; beyond it callers wait (backpressure).
pub const MAX_IN_FLIGHT: usize = 16_384;

/// Where replica messages go (gRPC streams in production).
pub trait Outbox: Send + Sync + 'static {
    /// Sends messages to their `to` replicas; may drop them (raft retransmits).
    fn send(&self, msgs: Vec<Message>, addresses: &HashMap<u64, String>);
}

/// A gateway's session with the leader, as the `Edge` service sees it.
enum GatewayEvent {
    Open {
        address: String,
        session: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    Report {
        session: u64,
        report: Box<pb::GatewayReport>,
        reply: oneshot::Sender<Result<crate::replica::ReportReply>>,
    },
    Closed {
        address: String,
        session: u64,
    },
}

// Travels boxed inside `Event::Call`, so the variants' sizes matter little.
#[allow(clippy::large_enum_variant)]
enum Call {
    Write(Request),
    Read { query: Query, stale: bool },
}

enum Event {
    Call {
        call: Box<Call>,
        reply: oneshot::Sender<Result<Reply>>,
        _permit: OwnedSemaphorePermit,
    },
    Status(oneshot::Sender<pb::ClusterStatusResponse>),
    Raft(Box<Message>),
    Unreachable(u64),
    SnapshotDone {
        to: u64,
        ok: bool,
    },
    PeerAddress(u64, String),
    Gateway(GatewayEvent),
    Shutdown,
}

/// What handlers can read without a round trip to the replica thread.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Leader id (0 = unknown).
    pub leader: u64,
    /// Leader address, if known.
    pub leader_address: Option<String>,
    /// Whether this replica leads.
    pub is_leader: bool,
    /// The storage error stalling the replica, if any.
    pub storage_error: Option<String>,
    /// The applied index (moves whenever the state does).
    pub applied: u64,
}

/// A cloneable handle to the replica thread.
#[derive(Clone)]
pub struct ReplicaHandle {
    id: u64,
    tx: Sender<Event>,
    permits: Arc<Semaphore>,
    info: Arc<RwLock<Snapshot>>,
    applied: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for ReplicaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaHandle")
            .field("id", &self.id)
            .finish()
    }
}

/// The running replica thread.
#[derive(Debug)]
pub struct ReplicaThread {
    handle: ReplicaHandle,
    join: Option<JoinHandle<()>>,
}

impl ReplicaThread {
    /// Whether the thread ended by itself (the replica was removed from the cluster).
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl ReplicaThread {
    /// Starts the thread that owns `replica`, ticking every `tick`.
    pub fn start(replica: Replica, tick: Duration, outbox: Arc<dyn Outbox>) -> ReplicaThread {
        let (tx, rx) = crossbeam_channel::unbounded();
        let info = Arc::new(RwLock::new(Snapshot::default()));
        let (applied_tx, applied) = tokio::sync::watch::channel(0);
        let handle = ReplicaHandle {
            id: replica.id(),
            tx,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            info: info.clone(),
            applied,
        };
        let join = std::thread::Builder::new()
            .name(format!("replica-{}", replica.id()))
            .spawn(move || run(replica, rx, tick, outbox, (info, applied_tx)))
            .expect("spawn the replica thread");
        ReplicaThread {
            handle,
            join: Some(join),
        }
    }

    /// A handle for gRPC handlers.
    pub fn handle(&self) -> ReplicaHandle {
        self.handle.clone()
    }

    /// Stops the thread after it flushed its storage.
    pub fn stop(mut self) {
        let _ = self.handle.tx.send(Event::Shutdown);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl ReplicaHandle {
    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Leader and health as last seen by the replica thread.
    pub fn info(&self) -> Snapshot {
        self.info.read().map(|g| g.clone()).unwrap_or_default()
    }

    async fn permit(&self, timeout: Duration) -> Result<OwnedSemaphorePermit> {
        match tokio::time::timeout(timeout, self.permits.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::Overloaded),
        }
    }

    async fn wait<T>(rx: oneshot::Receiver<Result<T>>, timeout: Duration) -> Result<T> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::Timeout(timeout.as_millis() as u64)),
        }
    }

    /// Proposes a write and waits until it is committed and applied (or refused).
    pub async fn write(&self, request: Request, timeout: Duration) -> Result<Reply> {
        let info = self.info();
        if !info.is_leader {
            // Fail fast with a hint rather than queueing on a follower.
            let leader = (info.leader != 0).then_some(info.leader);
            return Err(Error::NotLeader {
                leader,
                address: info.leader_address,
            });
        }
        self.call(Call::Write(request), timeout).await
    }

    /// A read: linearizable (ReadIndex) unless `stale`.
    pub async fn read(&self, query: Query, stale: bool, timeout: Duration) -> Result<Reply> {
        self.call(Call::Read { query, stale }, timeout).await
    }

    async fn call(&self, call: Call, timeout: Duration) -> Result<Reply> {
        let permit = self.permit(timeout).await?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Event::Call {
                call: Box::new(call),
                reply,
                _permit: permit,
            })
            .map_err(|_| Error::Stopped)?;
        Self::wait(rx, timeout).await
    }

    /// The replica's view of the cluster.
    pub async fn status(&self) -> Result<pb::ClusterStatusResponse> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Event::Status(tx))
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Fires whenever the applied index moves (watchers wait on it instead of polling).
    pub fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.clone()
    }

    /// A gateway opened session `session` with this replica (refused unless it leads).
    pub async fn gateway_open(&self, address: String, session: u64) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Event::Gateway(GatewayEvent::Open {
                address,
                session,
                reply,
            }))
            .map_err(|_| Error::Stopped)?;
        Self::wait(rx, Duration::from_secs(5)).await
    }

    /// A gateway's report, taken into the leader's soft state; returns the nodes to register.
    pub async fn gateway_report(
        &self,
        session: u64,
        report: pb::GatewayReport,
    ) -> Result<crate::replica::ReportReply> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Event::Gateway(GatewayEvent::Report {
                session,
                report: Box::new(report),
                reply,
            }))
            .map_err(|_| Error::Stopped)?;
        Self::wait(rx, Duration::from_secs(5)).await
    }

    /// A gateway's session ended.
    pub fn gateway_closed(&self, address: String, session: u64) {
        let _ = self
            .tx
            .send(Event::Gateway(GatewayEvent::Closed { address, session }));
    }

    /// A message from a peer.
    pub fn deliver(&self, msg: Message) {
        let _ = self.tx.send(Event::Raft(Box::new(msg)));
    }

    /// A peer introduced itself (a replica that joined empty learns its leader this way).
    pub fn learn_address(&self, id: u64, address: String) {
        let _ = self.tx.send(Event::PeerAddress(id, address));
    }

    /// The transport could not reach `id`.
    pub fn unreachable(&self, id: u64) {
        let _ = self.tx.send(Event::Unreachable(id));
    }

    /// A snapshot send to `to` finished.
    pub fn snapshot_done(&self, to: u64, ok: bool) {
        let _ = self.tx.send(Event::SnapshotDone { to, ok });
    }
}

/// A caller waiting for its answer; the permit is held until then (bounded in-flight).
struct Waiter {
    tx: oneshot::Sender<Result<Reply>>,
    read: bool,
    _permit: OwnedSemaphorePermit,
}

fn run(
    mut replica: Replica,
    rx: Receiver<Event>,
    tick: Duration,
    outbox: Arc<dyn Outbox>,
    (info, applied): (Arc<RwLock<Snapshot>>, tokio::sync::watch::Sender<u64>),
) {
    let ticker = crossbeam_channel::tick(tick);
    let mut waiters: HashMap<u64, Waiter> = HashMap::new();
    let mut next_token: u64 = 1;
    let mut ticks: u64 = 0;
    let mut addresses: HashMap<u64, String> = HashMap::new();
    let mut stopping = false;
    while !stopping {
        let mut handle = |ev: Event, replica: &mut Replica| -> bool {
            match ev {
                Event::Call {
                    call,
                    reply,
                    _permit,
                } => {
                    let token = next_token;
                    next_token += 1;
                    let read = matches!(*call, Call::Read { .. });
                    waiters.insert(
                        token,
                        Waiter {
                            tx: reply,
                            read,
                            _permit,
                        },
                    );
                    match *call {
                        Call::Write(request) => replica.submit(token, request),
                        Call::Read { query, stale } => replica.read(token, query, stale),
                    }
                }
                Event::Status(tx) => {
                    let _ = tx.send(replica.status());
                }
                Event::Raft(m) => replica.step(*m),
                Event::Unreachable(id) => replica.report_unreachable(id),
                Event::SnapshotDone { to, ok } => replica.report_snapshot(to, ok),
                Event::PeerAddress(id, address) => replica.learn_address(id, address),
                Event::Gateway(GatewayEvent::Open {
                    address,
                    session,
                    reply,
                }) => {
                    let _ = reply.send(replica.gateway_open(&address, session));
                }
                Event::Gateway(GatewayEvent::Report {
                    session,
                    report,
                    reply,
                }) => {
                    let _ = reply.send(replica.gateway_report(session, &report));
                }
                Event::Gateway(GatewayEvent::Closed { address, session }) => {
                    replica.gateway_closed(&address, session);
                }
                Event::Shutdown => return true,
            }
            false
        };
        let ticks_before = ticks;
        crossbeam_channel::select! {
            recv(rx) -> ev => match ev {
                Ok(ev) => stopping = handle(ev, &mut replica),
                Err(_) => stopping = true,
            },
            recv(ticker) -> _ => {
                replica.tick();
                ticks += 1;
            },
        }
        // Batch whatever else is waiting: one Ready (one fsync) for all of it.
        for _ in 0..8192 {
            match rx.try_recv() {
                Ok(ev) => {
                    if handle(ev, &mut replica) {
                        stopping = true;
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        while ticker.try_recv().is_ok() {
            replica.tick();
            ticks += 1;
        }
        sync_addresses(&mut addresses, &replica);
        replica.process_with(&mut |outs| deliver(outs, &*outbox, &addresses, &mut waiters));
        // Outputs made outside the Ready loop (refusals, stale reads) and any address learnt
        // during it.
        sync_addresses(&mut addresses, &replica);
        deliver(
            &mut replica.take_outputs(),
            &*outbox,
            &addresses,
            &mut waiters,
        );
        if ticks / 20 != ticks_before / 20 {
            // Forget callers that gave up (their reads may never be answered by raft).
            waiters.retain(|token, w| {
                let open = !w.tx.is_closed();
                if !open && w.read {
                    replica.cancel_read(*token);
                }
                open
            });
        }
        let snapshot = Snapshot {
            leader: replica.leader_id(),
            leader_address: replica.address_of(replica.leader_id()).map(str::to_string),
            is_leader: replica.is_leader(),
            storage_error: replica.storage_error().map(str::to_string),
            applied: replica.state().applied_index(),
        };
        let index = snapshot.applied;
        if let Ok(mut g) = info.write() {
            *g = snapshot;
        }
        applied.send_if_modified(|a| {
            let moved = *a != index;
            *a = index;
            moved
        });
        if replica.is_removed() {
            tracing::warn!(
                replica = replica.id(),
                "this replica was removed from the cluster; stopping"
            );
            break;
        }
    }
    replica.shutdown();
    for (_, w) in waiters.drain() {
        let _ = w.tx.send(Err(Error::Stopped));
    }
}

/// Keeps the transport's copy of peer addresses equal to the replica's.
fn sync_addresses(addresses: &mut HashMap<u64, String>, replica: &Replica) {
    let theirs = replica.addresses();
    if addresses.len() != theirs.len() || theirs.iter().any(|(k, v)| addresses.get(k) != Some(v)) {
        *addresses = theirs.iter().map(|(k, v)| (*k, v.clone())).collect();
    }
}

/// Sends raft messages and answers waiting callers.
fn deliver(
    outs: &mut Vec<Output>,
    outbox: &dyn Outbox,
    addresses: &HashMap<u64, String>,
    waiters: &mut HashMap<u64, Waiter>,
) {
    for out in outs.drain(..) {
        match out {
            Output::Send(msgs) => outbox.send(msgs, addresses),
            Output::Reply { token, result } => {
                if let Some(w) = waiters.remove(&token) {
                    let _ = w.tx.send(result);
                }
            }
        }
    }
}
