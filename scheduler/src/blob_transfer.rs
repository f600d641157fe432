//! Blobs on the wire: a client's upload received into the [`BlobStore`], pushed to peer
//! replicas until two hold it (a committed deploy may then refer to it), pulled from a peer
//! when this replica lacks one that a gateway asks for, and sent in 1 MiB chunks.
//!
//! ```text
//!  Control.PutBlob ─▶ receive (hash, size, fsync) ─▶ replicate ─▶ peer Raft.HasBlob?
//!                                                      └ no ─▶ peer Raft.CopyBlob (chunks)
//!  Edge.FetchBlob ─▶ here? ─no─▶ pull: peer Raft.ReadBlob ─▶ receive ─▶ send (chunks)
//!  Control.Deploy(image) ─▶ copies(layer) >= 2 (1 in a one-replica cluster)? else refused
//! ```
//!
//! Replica-to-replica calls ride the `Raft` service, as raft messages do (issue 18's mutual
//! TLS covers both); a blob's bytes are checked against its name wherever they land.

use std::time::Duration;

use futures::{Stream, StreamExt};
use stellar_proto::v1 as pb;
use stellar_proto::v1::raft_client::RaftClient;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::blobs::{BlobError, BlobStore};
use crate::replica::{Query, Reply};
use crate::replica_thread::ReplicaHandle;
use crate::service::READ_TIMEOUT;

/// Bytes per chunk on the wire.
pub const CHUNK: usize = 1 << 20;
/// Replicas that must hold a blob before a committed command may refer to it.
pub const MIN_COPIES: usize = 2;
/// How long an unreferenced blob is kept after it was stored or last asked about.
pub const SWEEP_GRACE: Duration = Duration::from_secs(3600);
/// How often a replica sweeps its blob store.
pub const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// How long one peer call may take before the next peer is tried: a minute, plus the time
/// the blob takes at 4 MiB/s (replicas sit on datacentre links, not home uplinks).
fn peer_timeout(bytes: u64) -> Duration {
    Duration::from_secs(60 + bytes / (4 << 20))
}

/// A blob error as the gRPC status a client acts on.
pub fn status(e: BlobError) -> Status {
    match e {
        BlobError::BadName(_) | BlobError::Corrupt { .. } | BlobError::Size { .. } => {
            Status::invalid_argument(e.to_string())
        }
        BlobError::TooLarge(_) => Status::resource_exhausted(e.to_string()),
        BlobError::Missing(_) => Status::not_found(e.to_string()),
        BlobError::Io { .. } => Status::unavailable(e.to_string()),
    }
}

/// The replica's blob store with its peers (see the module docs).
#[derive(Debug, Clone)]
pub struct Blobs {
    store: BlobStore,
    replica: ReplicaHandle,
}

fn peer_client(address: &str) -> Result<RaftClient<tonic::transport::Channel>, Status> {
    let url = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let channel = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| Status::internal(format!("peer address {address}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(RaftClient::new(channel)
        .max_decoding_message_size(CHUNK + (64 << 10))
        .max_encoding_message_size(CHUNK + (64 << 10)))
}

impl Blobs {
    /// Blobs in `store`, with the peers `replica` knows.
    pub fn new(store: BlobStore, replica: ReplicaHandle) -> Blobs {
        Blobs { store, replica }
    }

    /// The local store.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// The other replicas' addresses, and how many replicas the cluster has.
    async fn peers(&self) -> (Vec<String>, usize) {
        match self.replica.status().await {
            Ok(s) => {
                let me = s.id;
                let peers: Vec<String> = s
                    .replicas
                    .iter()
                    .filter(|r| r.id != me && !r.address.is_empty())
                    .map(|r| r.address.clone())
                    .collect();
                (peers, s.replicas.len().max(1))
            }
            Err(_) => (Vec::new(), 1),
        }
    }

    /// Copies a deploy needs: two, or every replica of a smaller cluster.
    pub async fn copies_needed(&self) -> usize {
        self.peers().await.1.min(MIN_COPIES)
    }

    /// Receives one blob from `stream` into the local store; its name and size.
    pub async fn receive(
        &self,
        mut stream: impl Stream<Item = Result<pb::BlobChunk, Status>> + Unpin,
    ) -> Result<(String, u64), Status> {
        let mut chunk = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty blob stream"))??;
        let (sha, size) = (chunk.sha256.clone(), chunk.size);
        if self.store.size(&sha) == Some(size) {
            // Already here: the rest of the stream is not needed.
            while let Some(c) = stream.next().await {
                if c?.last {
                    break;
                }
            }
            return Ok((sha, size));
        }
        let mut w = self.store.writer(&sha, size).map_err(status)?;
        loop {
            if !chunk.error.is_empty() {
                return Err(Status::aborted(format!(
                    "blob {sha}: the sender gave up: {}",
                    chunk.error
                )));
            }
            if chunk.sha256 != sha || chunk.offset != w.written() {
                return Err(Status::invalid_argument(format!(
                    "blob {sha}: chunk for `{}` at offset {} after {} bytes",
                    chunk.sha256,
                    chunk.offset,
                    w.written()
                )));
            }
            w.write(&chunk.data).map_err(status)?;
            if chunk.last {
                break;
            }
            chunk = stream.next().await.ok_or_else(|| {
                Status::invalid_argument(format!(
                    "blob {sha}: the stream ended at {} of {size} bytes without its last chunk",
                    w.written()
                ))
            })??;
        }
        let n = tokio::task::spawn_blocking(move || w.finish())
            .await
            .map_err(|e| Status::internal(format!("blob write panicked: {e}")))?
            .map_err(status)?;
        tracing::info!(blob = %sha, bytes = n, "blob stored");
        Ok((sha, n))
    }

    /// Sends blob `sha` from `offset` on as chunks (the last one has `last`); only what is
    /// stored here.
    pub fn send(
        &self,
        sha: &str,
        offset: u64,
    ) -> Result<ReceiverStream<Result<pb::BlobChunk, Status>>, Status> {
        let (mut file, size) = self.store.open_at(sha, offset).map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let sha = sha.to_string();
        tokio::task::spawn_blocking(move || {
            let mut at = offset.min(size);
            let mut buf = vec![0u8; CHUNK];
            loop {
                let want = ((size - at) as usize).min(CHUNK);
                let sent = match std::io::Read::read_exact(&mut file, &mut buf[..want]) {
                    Ok(()) => tx.blocking_send(Ok(pb::BlobChunk {
                        sha256: sha.clone(),
                        size,
                        offset: at,
                        data: buf[..want].to_vec(),
                        last: at + want as u64 == size,
                        error: String::new(),
                    })),
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::unavailable(format!(
                            "blob {sha}: read at {at}: {e}"
                        ))));
                        return;
                    }
                };
                at += want as u64;
                if sent.is_err() || at == size {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Replicas holding `sha`: this one and the peers that answer that they do (each
    /// touches its copy, so a deploy checked now finds it still there).
    pub async fn copies(&self, sha: &str) -> usize {
        let here = usize::from(self.store.size(sha).is_some());
        self.store.touch(sha);
        let (peers, _) = self.peers().await;
        let asks = peers.iter().map(|p| async move {
            let mut c = peer_client(p).ok()?;
            let req = pb::HasBlobRequest {
                cluster: 0,
                sha256: vec![sha.to_string()],
            };
            let r = tokio::time::timeout(Duration::from_secs(5), c.has_blob(req))
                .await
                .ok()?
                .ok()?;
            Some(r.into_inner().present.first().copied().unwrap_or(false))
        });
        let there = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter(|p| *p == Some(true))
            .count();
        here + there
    }

    /// Pushes a blob stored here to peers until `need` replicas (this one included) hold it;
    /// the copies it made or found. Pushes still under way when enough are reached go on.
    pub async fn replicate(&self, sha: &str, need: usize) -> usize {
        let (peers, _) = self.peers().await;
        let mut held = 1;
        let (done_tx, mut done) = tokio::sync::mpsc::channel::<bool>(peers.len().max(1));
        for p in peers.clone() {
            let (blobs, sha, done_tx) = (self.clone(), sha.to_string(), done_tx.clone());
            tokio::spawn(async move {
                let ok = blobs.push_to(&p, &sha).await;
                if let Err(e) = &ok {
                    tracing::warn!(peer = %p, blob = %sha, error = %e, "blob copy to a peer failed");
                }
                let _ = done_tx.send(ok.is_ok()).await;
            });
        }
        drop(done_tx);
        while held < need {
            match done.recv().await {
                Some(true) => held += 1,
                Some(false) => {}
                None => break,
            }
        }
        held
    }

    async fn push_to(&self, peer: &str, sha: &str) -> Result<(), Status> {
        let mut c = peer_client(peer)?;
        let has = c
            .has_blob(pb::HasBlobRequest {
                cluster: 0,
                sha256: vec![sha.to_string()],
            })
            .await?
            .into_inner();
        if has.present.first().copied().unwrap_or(false) {
            return Ok(());
        }
        let size = self.store.size(sha).unwrap_or(0);
        let chunks = self
            .send(sha, 0)?
            .filter_map(|r| futures::future::ready(r.ok()));
        tokio::time::timeout(peer_timeout(size), c.copy_blob(chunks))
            .await
            .map_err(|_| Status::deadline_exceeded(format!("copying blob {sha} to {peer}")))??;
        Ok(())
    }

    /// Removes the blobs no live function's image and no kept job refers to, unless stored or touched within
    /// `grace` (an upload whose deploy is on its way); how many went.
    pub async fn sweep(&self, grace: Duration) -> usize {
        let live = match self
            .replica
            .read(Query::Functions { tenant: None }, true, READ_TIMEOUT)
            .await
        {
            Ok(Reply::Functions(fs)) => fs,
            _ => return 0, // no state to judge by: keep everything
        };
        let mut referenced: std::collections::HashSet<String> = live
            .iter()
            .filter_map(|f| f.image.as_ref())
            .flat_map(|i| i.layers.iter().map(|l| l.sha256.clone()))
            .collect();
        // Jobs' inputs, outputs and images stay while their jobs are kept.
        match self.replica.read(Query::JobBlobs, true, READ_TIMEOUT).await {
            Ok(Reply::Blobs(b)) => referenced.extend(b),
            _ => return 0,
        }
        let mut removed = 0;
        let now = std::time::UNIX_EPOCH + Duration::from_millis(stellar_proto::clock::unix_ms());
        for (sha, bytes) in unreferenced(self.store.list(), &referenced, grace, now) {
            if self.store.remove(&sha).is_ok() {
                tracing::info!(blob = %sha, bytes, "blob removed: no live function or kept job refers to it");
                removed += 1;
            }
        }
        removed
    }

    /// Makes sure `sha` is stored here, reading it from a peer when it is not.
    pub async fn ensure_local(&self, sha: &str) -> Result<(), Status> {
        if !stellar_proto::limits::is_sha256_hex(sha) {
            return Err(status(BlobError::BadName(sha.to_string())));
        }
        if self.store.size(sha).is_some() {
            return Ok(());
        }
        let (peers, _) = self.peers().await;
        let mut last = Status::not_found(format!(
            "blob {sha} is stored on no replica; upload it again (stellar deploy --image does)"
        ));
        for p in peers {
            let pulled = async {
                let mut c = peer_client(&p)?;
                let stream = c
                    .read_blob(pb::FetchBlob {
                        sha256: sha.to_string(),
                        offset: 0,
                    })
                    .await?
                    .into_inner();
                self.receive(stream).await
            };
            // Its size is known only from the first chunk: the largest blob's time bounds it.
            let limit = peer_timeout(crate::blobs::MAX_BLOB_BYTES);
            match tokio::time::timeout(limit, pulled).await {
                Ok(Ok(_)) => {
                    tracing::info!(peer = %p, blob = %sha, "blob copied from a peer");
                    return Ok(());
                }
                Ok(Err(e)) if e.code() != tonic::Code::NotFound => last = e,
                Ok(Err(_)) => {}
                Err(_) => last = Status::deadline_exceeded(format!("reading blob {sha} from {p}")),
            }
        }
        Err(last)
    }
}

/// The stored blobs (name, size, when stored or last touched) that the sweep removes at
/// `now`: referred to by no live function and untouched for longer than `grace`.
pub fn unreferenced(
    stored: Vec<(String, u64, std::time::SystemTime)>,
    referenced: &std::collections::HashSet<String>,
    grace: Duration,
    now: std::time::SystemTime,
) -> Vec<(String, u64)> {
    stored
        .into_iter()
        .filter(|(sha, _, at)| {
            !referenced.contains(sha) && now.duration_since(*at).is_ok_and(|age| age > grace)
        })
        .map(|(sha, size, _)| (sha, size))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_spares_referenced_and_recent_blobs() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hour_ago = now - Duration::from_secs(3700);
        let (a, b, c) = ("aa".repeat(32), "bb".repeat(32), "cc".repeat(32));
        let stored = vec![
            (a.clone(), 1, hour_ago),
            (b.clone(), 2, hour_ago),
            (c, 3, now),
        ];
        let referenced = [b].into_iter().collect();
        assert_eq!(
            unreferenced(stored, &referenced, SWEEP_GRACE, now),
            vec![(a, 1)]
        );
    }
}
