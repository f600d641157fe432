//! Blobs on the wire: a client's upload received into the replica's [`BlobBackend`], pushed
//! to peer replicas until two hold it (a committed deploy may then refer to it), pulled from a
//! peer when this replica lacks one that a gateway asks for, and sent in 1 MiB chunks. With a
//! shared backend (an S3-compatible store) the store keeps the copies: nothing is pushed or
//! pulled between replicas, one stored copy is enough, and only the leader sweeps.
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

use crate::blob_backend::BlobBackend;
use crate::blobs::BlobError;
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
        BlobError::Io { .. } | BlobError::Store(_) => Status::unavailable(e.to_string()),
        BlobError::Config(_) => Status::failed_precondition(e.to_string()),
    }
}

/// The replica's blob store with its peers (see the module docs).
#[derive(Debug, Clone)]
pub struct Blobs {
    backend: std::sync::Arc<dyn BlobBackend>,
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
    /// Blobs in `backend`, with the peers `replica` knows.
    pub fn new(backend: std::sync::Arc<dyn BlobBackend>, replica: ReplicaHandle) -> Blobs {
        Blobs { backend, replica }
    }

    /// The size of `sha` where this replica keeps blobs; None when absent or unreadable.
    pub async fn size(&self, sha: &str) -> Option<u64> {
        self.backend.size(sha).await.ok().flatten()
    }

    /// Marks `sha` as wanted now (see [`BlobBackend::touch`]).
    pub async fn touch(&self, sha: &str) {
        self.backend.touch(sha).await
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

    /// Copies a deploy needs: two, or every replica of a smaller cluster; one in a shared
    /// store (it keeps its own copies).
    pub async fn copies_needed(&self) -> usize {
        if self.backend.shared() {
            return 1;
        }
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
        if self.size(&sha).await == Some(size) {
            // Already here: the rest of the stream is not needed.
            while let Some(c) = stream.next().await {
                if c?.last {
                    break;
                }
            }
            return Ok((sha, size));
        }
        let mut w = self.backend.writer(&sha, size).await.map_err(status)?;
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
            w.write(chunk.data.into()).await.map_err(status)?;
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
        let n = w.finish().await.map_err(status)?;
        tracing::info!(blob = %sha, bytes = n, "blob stored");
        Ok((sha, n))
    }

    /// Sends blob `sha` from `offset` on as chunks of [`CHUNK`] bytes (the last one has
    /// `last`); only what this replica's backend holds.
    pub async fn send(
        &self,
        sha: &str,
        offset: u64,
    ) -> Result<ReceiverStream<Result<pb::BlobChunk, Status>>, Status> {
        let read = self.backend.read(sha, offset).await.map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (sha, size) = (sha.to_string(), read.size);
        tokio::spawn(async move {
            let mut bytes = read.bytes;
            let mut at = offset.min(size);
            let mut buf = bytes::BytesMut::new();
            loop {
                // Fill one chunk (or what is left of the blob) from pieces of any size.
                let want = ((size - at) as usize).min(CHUNK);
                while buf.len() < want {
                    match bytes.next().await {
                        Some(Ok(piece)) => buf.extend_from_slice(&piece),
                        Some(Err(e)) => {
                            let _ = tx.send(Err(status(e))).await;
                            return;
                        }
                        None => {
                            let e = Status::unavailable(format!(
                                "blob {sha}: the store ended the read at {} of {size} bytes",
                                at + buf.len() as u64
                            ));
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                let data = buf.split_to(want).to_vec();
                let chunk = pb::BlobChunk {
                    sha256: sha.clone(),
                    size,
                    offset: at,
                    data,
                    last: at + want as u64 == size,
                    error: String::new(),
                };
                at += want as u64;
                if tx.send(Ok(chunk)).await.is_err() || at == size {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Replicas holding `sha`: this one and the peers that answer that they do (each
    /// touches its copy, so a deploy checked now finds it still there).
    pub async fn copies(&self, sha: &str) -> usize {
        let here = usize::from(self.size(sha).await.is_some());
        self.touch(sha).await;
        if self.backend.shared() {
            return here;
        }
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

    /// Refuses `what` (blob `sha`, said to be `size` bytes) unless enough replicas hold it at
    /// that size; `hint` names what uploads it.
    pub async fn check_stored(
        &self,
        what: &str,
        sha: &str,
        size: u64,
        hint: &str,
    ) -> Result<(), Status> {
        if let Some(stored) = self.size(sha).await
            && stored != size
        {
            return Err(Status::invalid_argument(format!(
                "{what} is {stored} bytes, not the {size} said"
            )));
        }
        let (copies, need) = (self.copies(sha).await, self.copies_needed().await);
        if copies < need {
            let held = if self.backend.shared() {
                format!("is not in {}", self.backend.describe())
            } else {
                format!("is stored on {copies} replica(s), {need} are needed")
            };
            return Err(Status::failed_precondition(format!(
                "{what} {held}: upload it first with PutBlob ({hint})"
            )));
        }
        Ok(())
    }

    /// Pushes a blob stored here to peers until `need` replicas (this one included) hold it;
    /// the copies it made or found. Pushes still under way when enough are reached go on.
    pub async fn replicate(&self, sha: &str, need: usize) -> usize {
        if self.backend.shared() {
            return 1;
        }
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
        let size = self.size(sha).await.unwrap_or(0);
        let chunks = self
            .send(sha, 0)
            .await?
            .filter_map(|r| futures::future::ready(r.ok()));
        tokio::time::timeout(peer_timeout(size), c.copy_blob(chunks))
            .await
            .map_err(|_| Status::deadline_exceeded(format!("copying blob {sha} to {peer}")))??;
        Ok(())
    }

    /// Removes the blobs no live function's image and no kept job refers to, unless stored or touched within
    /// `grace` (an upload whose deploy is on its way); how many went.
    pub async fn sweep(&self, grace: Duration) -> usize {
        if self.backend.shared() {
            // One sweeper for a shared store: the leader, which also checks new commands'
            // blobs (and so holds their touches).
            match self.replica.status().await {
                Ok(s) if s.leader == s.id => {}
                _ => return 0,
            }
        }
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
        let stored = match self.backend.list().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(store = %self.backend.describe(), error = %e, "blob sweep: cannot list the store");
                return 0;
            }
        };
        for (sha, bytes) in unreferenced(stored, &referenced, grace, now) {
            if self.backend.remove(&sha).await.is_ok() {
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
        if self.size(sha).await.is_some() {
            return Ok(());
        }
        if self.backend.shared() {
            return Err(Status::not_found(format!(
                "blob {sha} is not in {}; upload it again",
                self.backend.describe()
            )));
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
