//! The gateway's session with the leader (`Edge.Session`): what changed among its workers
//! goes up in batched reports, never per heartbeat. The first report of every session lists
//! every attached node (a new leader learns who is where); registrations wait for the ack
//! that says they are committed; a worker whose stream ended is reported down only if it has
//! not come back within a short hold (a reconnect is not a transition).
//!
//! ```text
//!  agent: register(record) ─┐              ┌─▶ Session stream ─GatewayReport(seq)─▶ leader
//!         gone(node) ─hold─▶ pending report ┤   every 200 ms with deltas, 1 s keepalive
//!         draining / load ──┘              └◀─ GatewayAck(seq) ─▶ registrations answered
//!  stream lost ─▶ waiters fail (workers retry), deltas kept, reconnect (leader hint / next)
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;
use stellar_proto::wire::LEADER_METADATA;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::hub::WorkerHub;

/// Reports go out this often while there is something to say.
const REPORT_EVERY: Duration = Duration::from_millis(200);
/// A report goes out at least this often (the leader judges a silent gateway dead).
const KEEPALIVE: Duration = Duration::from_secs(1);
/// A worker whose stream ended is reported down only after this long without coming back.
pub const DOWN_HOLD: Duration = Duration::from_secs(2);

type Waiter = oneshot::Sender<Result<(), String>>;

#[derive(Default)]
struct Pending {
    joined: Vec<(pb::NodeRecord, Waiter)>,
    down: Vec<u64>,
    draining: Vec<u64>,
    loads: HashMap<u64, pb::NodeLoad>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.joined.is_empty()
            && self.down.is_empty()
            && self.draining.is_empty()
            && self.loads.is_empty()
    }
}

/// The reporter's queue (see the module docs).
pub struct Session {
    address: String,
    pending: Mutex<Pending>,
    wake: Notify,
    connected: tokio::sync::watch::Sender<bool>,
    /// The gateways with a session on the leader, as of its last acknowledgement.
    gateways: Mutex<Vec<Arc<str>>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A reporter for the gateway advertised at `address` (its identity to the leader).
    pub fn new(address: String) -> Arc<Session> {
        Arc::new(Session {
            address,
            pending: Mutex::default(),
            wake: Notify::new(),
            connected: tokio::sync::watch::Sender::new(false),
            gateways: Mutex::default(),
        })
    }

    /// Whether a session with the leader is open now.
    pub fn connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// The gateways the leader last said have a session (this one included): peers that
    /// hold no node yet are known only from here.
    pub fn gateways(&self) -> Vec<Arc<str>> {
        self.gateways.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Queues a worker's registration; answered once the leader committed it (or refused).
    pub fn register(&self, record: pb::NodeRecord) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.joined.push((record, tx));
        }
        self.wake.notify_one();
        rx
    }

    /// A worker's stream ended: reported down after [`DOWN_HOLD`] unless it is back.
    pub fn gone(self: &Arc<Self>, hub: &Arc<WorkerHub>, node: u64) {
        let (me, hub) = (self.clone(), hub.clone());
        tokio::spawn(async move {
            tokio::time::sleep(DOWN_HOLD).await;
            if !hub.holds(node) {
                if let Ok(mut p) = me.pending.lock() {
                    p.down.push(node);
                }
                me.wake.notify_one();
            }
        });
    }

    /// A worker is draining.
    pub fn draining(&self, node: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.draining.push(node);
        }
        self.wake.notify_one();
    }

    /// A worker's coordinate moved beyond the gateway's threshold.
    pub fn load(&self, node: u64, coordinate: pb::Coordinate) {
        if let Ok(mut p) = self.pending.lock() {
            p.loads.insert(
                node,
                pb::NodeLoad {
                    node,
                    free: None,
                    coordinate: Some(coordinate),
                },
            );
        }
    }

    /// Keeps a session open with whichever replica leads, until `closed` fires.
    pub async fn run(
        self: Arc<Self>,
        client: ClusterClient,
        hub: Arc<WorkerHub>,
        mut closed: tokio::sync::watch::Receiver<bool>,
    ) {
        let endpoints = client.endpoints().to_vec();
        let mut next = 0usize;
        let mut hint: Option<String> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let target = hint.take().unwrap_or_else(|| {
                let t = endpoints[next % endpoints.len()].clone();
                next += 1;
                t
            });
            let ended = tokio::select! {
                e = self.clone().one(&client, &target, &hub) => e,
                _ = closed.wait_for(|c| *c) => return,
            };
            self.connected.send_replace(false);
            match ended {
                Ended::Redirect(to) => {
                    tracing::info!(from = %target, to = %to, "gateway session: following the leader hint");
                    hint = Some(to);
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ended::Lost(why, was_open) => {
                    if was_open {
                        backoff = Duration::from_millis(100);
                    }
                    tracing::warn!(replica = %target, error = %why, "gateway session lost; reconnecting");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = closed.wait_for(|c| *c) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One session with `target`, until it breaks.
    async fn one(self: Arc<Self>, client: &ClusterClient, target: &str, hub: &WorkerHub) -> Ended {
        let mut edge = match client.edge_for(target) {
            Ok(e) => e,
            Err(s) => return Ended::Lost(s.to_string(), false),
        };
        let (tx, rx) = mpsc::channel::<pb::GatewayReport>(16);
        let first = pb::GatewayReport {
            seq: 0,
            gateway: self.address.clone(),
            attached: hub.nodes(),
            resync: true,
            ..Default::default()
        };
        let _ = tx.try_send(first);
        let mut acks = match edge
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return ended_by(&s, false),
        };
        self.connected.send_replace(true);
        tracing::info!(replica = %target, "gateway session open with the leader");
        let mut waiters: HashMap<u64, Vec<Waiter>> = HashMap::new();
        let mut seq = 0u64;
        let mut last = stellar_proto::clock::now();
        let fail = |waiters: &mut HashMap<u64, Vec<Waiter>>, why: &str| {
            for (_, ws) in waiters.drain() {
                for w in ws {
                    let _ = w.send(Err(why.to_string()));
                }
            }
        };
        loop {
            let due = !self.pending.lock().map(|p| p.is_empty()).unwrap_or(true);
            let wait = if due { REPORT_EVERY } else { KEEPALIVE };
            let sleep = wait.saturating_sub(last.elapsed());
            tokio::select! {
                ack = acks.message() => match ack {
                    Ok(Some(a)) => {
                        hub.tickets.set_key(&a.ticket_key);
                        if !a.error.is_empty() {
                            tracing::warn!(seq = a.seq, error = %a.error, "the leader refused part of a report");
                        }
                        if !a.gateways.is_empty()
                            && let Ok(mut g) = self.gateways.lock()
                        {
                            *g = a.gateways.iter().map(|s| Arc::from(s.as_str())).collect();
                        }
                        for w in waiters.remove(&a.seq).unwrap_or_default() {
                            let _ = w.send(if a.error.is_empty() { Ok(()) } else { Err(a.error.clone()) });
                        }
                        continue;
                    }
                    Ok(None) => {
                        fail(&mut waiters, "the leader closed the gateway session");
                        return Ended::Lost("closed by the replica".into(), true);
                    }
                    Err(s) => {
                        fail(&mut waiters, &s.to_string());
                        return ended_by(&s, true);
                    }
                },
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified(), if !due => continue,
            }
            let taken = self
                .pending
                .lock()
                .map(|mut p| std::mem::take(&mut *p))
                .map_err(|_| ());
            let Ok(p) = taken else {
                return Ended::Lost("poisoned".into(), true);
            };
            seq += 1;
            let (joined, ws): (Vec<_>, Vec<_>) = p.joined.into_iter().unzip();
            let report = pb::GatewayReport {
                seq,
                gateway: self.address.clone(),
                joined,
                down: p.down.clone(),
                draining: p.draining.clone(),
                loads: p.loads.into_values().collect(),
                attached: Vec::new(),
                resync: false,
            };
            if !ws.is_empty() {
                waiters.insert(seq, ws);
            }
            last = stellar_proto::clock::now();
            if tx.send(report).await.is_err() {
                // Keep what must not be lost for the next session.
                if let Ok(mut q) = self.pending.lock() {
                    q.down.extend(p.down);
                    q.draining.extend(p.draining);
                }
                fail(&mut waiters, "the gateway session broke");
                return Ended::Lost("the session's sender closed".into(), true);
            }
        }
    }
}

enum Ended {
    Redirect(String),
    Lost(String, bool),
}

fn ended_by(s: &tonic::Status, was_open: bool) -> Ended {
    match s
        .metadata()
        .get(LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
    {
        Some(l) if !l.is_empty() => Ended::Redirect(l.trim_start_matches("http://").to_string()),
        _ => Ended::Lost(s.to_string(), was_open),
    }
}
