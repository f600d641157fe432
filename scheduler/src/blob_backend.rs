//! Where a replica keeps blob bytes, behind one trait: the local disk (the default; each
//! replica holds its own copies and pushes them to peers) or an S3-compatible object store
//! that every replica shares (`--blob-store s3://bucket/prefix`; the store keeps the copies).
//!
//! ```text
//!  Blobs (blob_transfer) ─▶ dyn BlobBackend ─┬─ BlobStore (blobs/<sha>, fsync'd, per replica)
//!                                            └─ ObjectBlobs (s3://bucket/prefix/<sha>, shared)
//! ```
//!
//! Either way a blob exists under its name only once its bytes were checked against it: the
//! disk renames a verified temporary file into place, the object store completes a multipart
//! upload only after the hash matched (and aborts it otherwise).

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::stream::BoxStream;

use crate::blobs::{BlobError, BlobStore, Result};

/// A blob's bytes from some offset on, with the blob's whole size.
pub struct BlobRead {
    /// The blob's size (not what is left after the offset).
    pub size: u64,
    /// The bytes from the offset to the end, in pieces of any length.
    pub bytes: BoxStream<'static, Result<Bytes>>,
}

/// A blob being written: visible under its name only after [`BlobSink::finish`] checked it.
/// Dropped unfinished, it leaves nothing behind.
#[async_trait::async_trait]
pub trait BlobSink: Send {
    /// Appends `data`; refused past the announced size.
    async fn write(&mut self, data: Bytes) -> Result<()>;
    /// Bytes written so far.
    fn written(&self) -> u64;
    /// Checks size and hash against the name, then makes the blob durable and visible.
    async fn finish(self: Box<Self>) -> Result<u64>;
}

/// The storage a replica's blobs live in (see the module docs).
#[async_trait::async_trait]
pub trait BlobBackend: Send + Sync + std::fmt::Debug {
    /// True when every replica sees the same store: no copies are pushed between replicas,
    /// one stored copy is enough for a command to refer to it, and only the leader sweeps.
    fn shared(&self) -> bool;
    /// Where the blobs are, for logs and errors.
    fn describe(&self) -> String;
    /// The size of a stored blob, None when it is not stored.
    async fn size(&self, sha: &str) -> Result<Option<u64>>;
    /// A sink for blob `sha` of `size` bytes; refused when it cannot fit.
    async fn writer(&self, sha: &str, size: u64) -> Result<Box<dyn BlobSink>>;
    /// Blob `sha` from `offset` on ([`BlobError::Missing`] when not stored).
    async fn read(&self, sha: &str, offset: u64) -> Result<BlobRead>;
    /// Every stored blob: name, size, and when it was stored or last touched.
    async fn list(&self) -> Result<Vec<(String, u64, SystemTime)>>;
    /// Marks `sha` as wanted now, so the sweep's grace period starts again.
    async fn touch(&self, sha: &str);
    /// Removes `sha` (nothing when absent).
    async fn remove(&self, sha: &str) -> Result<()>;
}

/// Which backend a replica uses: `url` None or `local` for its own disk, `s3://bucket[/prefix]`
/// for an S3-compatible store configured by the standard `AWS_*` environment variables and
/// then `options` (object_store's `aws_*` keys, e.g. `aws_endpoint`).
#[derive(Debug, Clone, Default)]
pub struct BlobStoreSpec {
    /// `local` (the default) or `s3://bucket[/prefix]`.
    pub url: Option<String>,
    /// object_store configuration keys and values, applied after the environment.
    pub options: Vec<(String, String)>,
}

/// The backend `spec` names, with `dir` for the local one; a remote store is checked
/// reachable before this returns, so a wrong endpoint or credentials stop the start.
pub async fn open(spec: &BlobStoreSpec, dir: &std::path::Path) -> Result<Arc<dyn BlobBackend>> {
    match spec.url.as_deref() {
        None | Some("local") => Ok(Arc::new(BlobStore::open(dir)?)),
        Some(url) if url.starts_with("s3://") => {
            let store = crate::object_blobs::ObjectBlobs::s3(url, &spec.options)?;
            store.check().await?;
            tracing::info!(store = %url, "blobs are kept in an S3-compatible store");
            Ok(Arc::new(store))
        }
        Some(other) => Err(BlobError::Config(format!(
            "--blob-store `{other}`: expected `local` or s3://BUCKET[/PREFIX]"
        ))),
    }
}

/// Reads a whole stream of blob bytes into memory (tests and small blobs).
pub async fn read_all(read: BlobRead) -> Result<Vec<u8>> {
    use futures::TryStreamExt;
    let parts: Vec<Bytes> = read.bytes.try_collect().await?;
    Ok(parts.concat())
}

#[async_trait::async_trait]
impl BlobBackend for BlobStore {
    fn shared(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        self.dir().display().to_string()
    }

    async fn size(&self, sha: &str) -> Result<Option<u64>> {
        Ok(BlobStore::size(self, sha))
    }

    async fn writer(&self, sha: &str, size: u64) -> Result<Box<dyn BlobSink>> {
        Ok(Box::new(BlobStore::writer(self, sha, size)?))
    }

    async fn read(&self, sha: &str, offset: u64) -> Result<BlobRead> {
        let (mut file, size) = self.open_at(sha, offset)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let sha = sha.to_string();
        let dir = self.dir().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut left = size - offset.min(size);
            let mut buf = vec![0u8; crate::blob_transfer::CHUNK];
            while left > 0 {
                let want = (left as usize).min(buf.len());
                let piece = std::io::Read::read_exact(&mut file, &mut buf[..want])
                    .map(|()| Bytes::copy_from_slice(&buf[..want]))
                    .map_err(|source| BlobError::Io {
                        path: dir.join(&sha),
                        source,
                    });
                let failed = piece.is_err();
                if tx.blocking_send(piece).is_err() || failed {
                    return;
                }
                left -= want as u64;
            }
        });
        Ok(BlobRead {
            size,
            bytes: Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)),
        })
    }

    async fn list(&self) -> Result<Vec<(String, u64, SystemTime)>> {
        Ok(BlobStore::list(self))
    }

    async fn touch(&self, sha: &str) {
        BlobStore::touch(self, sha)
    }

    async fn remove(&self, sha: &str) -> Result<()> {
        BlobStore::remove(self, sha)
    }
}

#[async_trait::async_trait]
impl BlobSink for crate::blobs::BlobWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        crate::blobs::BlobWriter::write(self, &data)
    }

    fn written(&self) -> u64 {
        crate::blobs::BlobWriter::written(self)
    }

    async fn finish(self: Box<Self>) -> Result<u64> {
        tokio::task::spawn_blocking(move || (*self).finish())
            .await
            .map_err(|e| BlobError::Io {
                path: std::path::PathBuf::new(),
                source: std::io::Error::other(format!("blob write panicked: {e}")),
            })?
    }
}
