//! Replica-to-replica transport over gRPC: one long-lived client stream per peer carries
//! batches of raft-rs messages; snapshots go in 1 MiB chunks on their own stream.
//!
//! Sending never blocks the replica thread: each peer has a bounded queue, and when it is full
//! or the peer is unreachable messages are dropped and raft is told (it retransmits).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use stellar_proto::v1 as pb;
use stellar_proto::v1::raft_client::RaftClient;
use tokio::sync::mpsc;

use crate::replica_thread::{Outbox, ReplicaHandle};

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 8192;
/// Snapshot chunk size.
const CHUNK: usize = 1 << 20;

struct Peer {
    address: String,
    tx: mpsc::Sender<Message>,
}

/// The production [`Outbox`]: per-peer gRPC streams on the given tokio runtime.
pub struct GrpcTransport {
    id: u64,
    /// This replica's advertised address, sent with every batch.
    address: String,
    runtime: tokio::runtime::Handle,
    peers: Mutex<HashMap<u64, Peer>>,
    replica: Mutex<Option<ReplicaHandle>>,
}

impl std::fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTransport")
            .field("id", &self.id)
            .finish()
    }
}

fn endpoint(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

impl GrpcTransport {
    /// A transport for replica `id`; sender tasks run on `runtime`.
    pub fn new(id: u64, address: String, runtime: tokio::runtime::Handle) -> Arc<GrpcTransport> {
        Arc::new(GrpcTransport {
            id,
            address,
            runtime,
            peers: Mutex::new(HashMap::new()),
            replica: Mutex::new(None),
        })
    }

    /// Connects the transport to the replica it reports failures to.
    pub fn attach(&self, replica: ReplicaHandle) {
        if let Ok(mut g) = self.replica.lock() {
            *g = Some(replica);
        }
    }

    fn replica(&self) -> Option<ReplicaHandle> {
        self.replica.lock().ok().and_then(|g| g.clone())
    }

    fn spawn_peer(&self, to: u64, address: String) -> mpsc::Sender<Message> {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let from = (self.id, self.address.clone());
        let replica = self.replica();
        self.runtime
            .spawn(peer_loop(from, to, address, rx, replica));
        tx
    }

    fn send_snapshot(&self, to: u64, address: String, msg: Message) {
        let from = (self.id, self.address.clone());
        let replica = self.replica();
        self.runtime.spawn(async move {
            let ok = match send_snapshot(&from, to, &address, msg).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(from = from.0, to, error = %e, "snapshot send failed");
                    false
                }
            };
            if let Some(r) = replica {
                r.snapshot_done(to, ok);
            }
        });
    }
}

impl Outbox for GrpcTransport {
    fn send(&self, msgs: Vec<Message>, addresses: &HashMap<u64, String>) {
        let mut unreachable = Vec::new();
        {
            let Ok(mut peers) = self.peers.lock() else {
                return;
            };
            for msg in msgs {
                let to = msg.to;
                let Some(address) = addresses.get(&to) else {
                    unreachable.push(to);
                    continue;
                };
                if msg.get_msg_type() == MessageType::MsgSnapshot {
                    self.send_snapshot(to, address.clone(), msg);
                    continue;
                }
                let stale = peers
                    .get(&to)
                    .is_some_and(|p| &p.address != address || p.tx.is_closed());
                if stale || !peers.contains_key(&to) {
                    let tx = self.spawn_peer(to, address.clone());
                    peers.insert(
                        to,
                        Peer {
                            address: address.clone(),
                            tx,
                        },
                    );
                }
                let peer = peers.get(&to).expect("inserted");
                if peer.tx.try_send(msg).is_err() {
                    unreachable.push(to);
                }
            }
        }
        if !unreachable.is_empty()
            && let Some(r) = self.replica()
        {
            unreachable.sort_unstable();
            unreachable.dedup();
            for id in unreachable {
                r.unreachable(id);
            }
        }
    }
}

async fn peer_loop(
    (from, from_address): (u64, String),
    to: u64,
    address: String,
    mut rx: mpsc::Receiver<Message>,
    replica: Option<ReplicaHandle>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut logged = false;
    loop {
        let channel = match tonic::transport::Endpoint::new(endpoint(&address))
            .map(|e| e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true))
        {
            Ok(e) => e.connect().await,
            Err(e) => {
                tracing::error!(from, to, %address, error = %e, "bad peer address");
                return;
            }
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                if !logged {
                    tracing::warn!(from, to, %address, error = %e, "peer unreachable; retrying");
                    logged = true;
                }
                if let Some(r) = &replica {
                    r.unreachable(to);
                }
                // Drain what piled up: raft will resend.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                if rx.is_closed() {
                    return;
                }
                continue;
            }
        };
        if logged {
            tracing::info!(from, to, %address, "peer reachable again");
            logged = false;
        }
        backoff = Duration::from_millis(50);
        let mut client = RaftClient::new(channel)
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20);
        let (btx, brx) = mpsc::channel::<pb::RaftBatch>(64);
        let call = tokio::spawn(async move {
            client
                .send(tokio_stream::wrappers::ReceiverStream::new(brx))
                .await
        });
        // Forward batches until the stream breaks or the replica drops us.
        let mut closed = false;
        loop {
            let Some(first) = rx.recv().await else {
                closed = true;
                break;
            };
            let mut batch = pb::RaftBatch {
                from,
                to,
                cluster: 0,
                messages: Vec::with_capacity(16),
                from_address: from_address.clone(),
            };
            let mut next = Some(first);
            while let Some(m) = next.take() {
                if let Ok(b) = m.write_to_bytes() {
                    batch.messages.push(b);
                }
                if batch.messages.len() < 256 {
                    next = rx.try_recv().ok();
                }
            }
            if btx.send(batch).await.is_err() {
                break;
            }
        }
        drop(btx);
        match call.await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                tracing::debug!(from, to, %status, "raft stream ended");
                if let Some(r) = &replica {
                    r.unreachable(to);
                }
            }
            Err(_) => {}
        }
        if closed {
            return;
        }
        tokio::time::sleep(backoff).await;
    }
}

async fn send_snapshot(
    (from, from_address): &(u64, String),
    to: u64,
    address: &str,
    mut msg: Message,
) -> Result<(), String> {
    let from = *from;
    let channel = tonic::transport::Endpoint::new(endpoint(address))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = RaftClient::new(channel);
    let data = std::mem::take(&mut msg.mut_snapshot().data);
    let header = msg.write_to_bytes().map_err(|e| e.to_string())?;
    let total = data.len() as u64;
    let mut chunks = Vec::with_capacity(data.len() / CHUNK + 1);
    chunks.push(pb::SnapshotChunk {
        from,
        to,
        cluster: 0,
        message: header,
        data: Vec::new(),
        total_len: total,
        from_address: from_address.clone(),
    });
    for c in data.chunks(CHUNK) {
        chunks.push(pb::SnapshotChunk {
            from,
            to,
            cluster: 0,
            message: Vec::new(),
            data: c.to_vec(),
            total_len: total,
            from_address: String::new(),
        });
    }
    tracing::info!(from, to, bytes = total, "sending a snapshot");
    client
        .snapshot(tokio_stream::iter(chunks))
        .await
        .map_err(|s| s.to_string())?;
    Ok(())
}
