//! Blobs in an S3-compatible object store shared by every replica (`--blob-store
//! s3://bucket/prefix`), through the `object_store` crate. The store keeps its own copies, so
//! replicas neither push blobs to each other nor count copies: a blob is referable once it
//! is in the bucket.
//!
//! ```text
//!  writer(sha, size) ─▶ multipart upload of prefix/<sha> ◀─ write(chunk)… (hashed, bounded)
//!  finish() ─ sha256 == name and size right? ─yes─▶ complete (the object appears whole)
//!                                           └─no──▶ abort (no object, no parts kept)
//!  read(sha, offset) ─▶ ranged GET;  list ─▶ LIST prefix/;  remove ─▶ DELETE
//! ```
//!
//! An object's "stored or last touched" time is its last-modified time, or a later touch
//! this replica saw (touches are kept in memory: the leader, which checks a command's blobs,
//! is also the only replica that sweeps a shared store).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, WriteMultipart};

use crate::blob_backend::{BlobBackend, BlobRead, BlobSink};
use crate::blobs::{BlobCheck, BlobError, MAX_BLOB_BYTES, Result, check_name};

/// Bytes per part of a multipart upload (S3's smallest part is 5 MiB).
const PART_BYTES: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// An object store holding the cluster's blobs (see the module docs).
#[derive(Debug, Clone)]
pub struct ObjectBlobs {
    store: Arc<dyn ObjectStore>,
    url: String,
    prefix: Path,
    touched: Arc<Mutex<HashMap<String, SystemTime>>>,
}

fn store_error(url: &str, what: &str, e: object_store::Error) -> BlobError {
    match e {
        object_store::Error::NotFound { .. } => BlobError::Missing(what.to_string()),
        e => BlobError::Store(format!("{url}: {what}: {e}")),
    }
}

impl ObjectBlobs {
    /// The store at `url` (`s3://bucket[/prefix]`), configured from the `AWS_*` environment
    /// and then `options` (`aws_endpoint`, `aws_allow_http`, `aws_access_key_id`, …).
    pub fn s3(url: &str, options: &[(String, String)]) -> Result<ObjectBlobs> {
        let rest = url.strip_prefix("s3://").unwrap_or(url);
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(BlobError::Config(format!(
                "--blob-store {url}: no bucket; expected s3://BUCKET[/PREFIX]"
            )));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (k, v) in options {
            let key: AmazonS3ConfigKey = k.parse().map_err(|e| {
                BlobError::Config(format!(
                    "--blob-store-opt {k}: {e}; keys are object_store's, e.g. aws_endpoint, aws_allow_http, aws_region"
                ))
            })?;
            builder = builder.with_config(key, v);
        }
        let store = builder
            .build()
            .map_err(|e| BlobError::Config(format!("--blob-store {url}: {e}")))?;
        Ok(ObjectBlobs {
            store: Arc::new(store),
            url: url.trim_end_matches('/').to_string(),
            prefix: Path::from(prefix.trim_matches('/')),
            touched: Arc::default(),
        })
    }

    /// Fails with what to fix when the bucket cannot be listed (wrong endpoint, bucket or
    /// credentials): better at start than at the first upload.
    pub async fn check(&self) -> Result<()> {
        let first = tokio::time::timeout(
            Duration::from_secs(30),
            self.store.list(Some(&self.prefix)).next(),
        )
        .await
        .map_err(|_| {
            BlobError::Config(format!(
                "blob store {}: no answer in 30 s; check AWS_ENDPOINT_URL (or --blob-store-opt aws_endpoint=…)",
                self.url
            ))
        })?;
        match first {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(BlobError::Config(format!(
                "blob store {}: cannot list the bucket ({e}); check the bucket exists and the AWS_* credentials, endpoint and region",
                self.url
            ))),
        }
    }

    fn path(&self, sha: &str) -> Path {
        self.prefix.child(sha)
    }
}

#[async_trait::async_trait]
impl BlobBackend for ObjectBlobs {
    fn shared(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        self.url.clone()
    }

    async fn size(&self, sha: &str) -> Result<Option<u64>> {
        check_name(sha)?;
        match self.store.head(&self.path(sha)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(&self.url, sha, e)),
        }
    }

    async fn writer(&self, sha: &str, size: u64) -> Result<Box<dyn BlobSink>> {
        check_name(sha)?;
        if size > MAX_BLOB_BYTES {
            return Err(BlobError::TooLarge(format!(
                "blob {sha} is {size} bytes; the limit is {MAX_BLOB_BYTES}"
            )));
        }
        let upload = self
            .store
            .put_multipart(&self.path(sha))
            .await
            .map_err(|e| store_error(&self.url, sha, e))?;
        Ok(Box::new(ObjectSink {
            upload: Some(WriteMultipart::new_with_chunk_size(upload, PART_BYTES)),
            url: self.url.clone(),
            check: BlobCheck::new(sha, size),
        }))
    }

    async fn read(&self, sha: &str, offset: u64) -> Result<BlobRead> {
        check_name(sha)?;
        let path = self.path(sha);
        let size = self
            .store
            .head(&path)
            .await
            .map_err(|e| store_error(&self.url, sha, e))?
            .size;
        if offset >= size {
            return Ok(BlobRead {
                size,
                bytes: futures::stream::empty().boxed(),
            });
        }
        let opts = GetOptions {
            range: Some(GetRange::Offset(offset)),
            ..GetOptions::default()
        };
        let got = self
            .store
            .get_opts(&path, opts)
            .await
            .map_err(|e| store_error(&self.url, sha, e))?;
        let (url, sha) = (self.url.clone(), sha.to_string());
        let bytes = got
            .into_stream()
            .map_err(move |e| store_error(&url, &sha, e))
            .boxed();
        Ok(BlobRead { size, bytes })
    }

    async fn list(&self) -> Result<Vec<(String, u64, SystemTime)>> {
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&self.prefix))
            .try_collect()
            .await
            .map_err(|e| store_error(&self.url, "list", e))?;
        let touched = self.touched.lock().map(|t| t.clone()).unwrap_or_default();
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.to_string();
                check_name(&name).ok()?;
                let ms = u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0);
                let stored = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
                let at = touched.get(&name).map_or(stored, |t| (*t).max(stored));
                Some((name, m.size, at))
            })
            .collect())
    }

    async fn touch(&self, sha: &str) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(stellar_proto::clock::unix_ms());
        if check_name(sha).is_ok()
            && let Ok(mut t) = self.touched.lock()
        {
            t.insert(sha.to_string(), now);
        }
    }

    async fn remove(&self, sha: &str) -> Result<()> {
        check_name(sha)?;
        match self.store.delete(&self.path(sha)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                if let Ok(mut t) = self.touched.lock() {
                    t.remove(sha);
                }
                Ok(())
            }
            Err(e) => Err(store_error(&self.url, sha, e)),
        }
    }
}

/// A multipart upload that completes only when the bytes hash to the blob's name.
struct ObjectSink {
    upload: Option<WriteMultipart>,
    url: String,
    check: BlobCheck,
}

#[async_trait::async_trait]
impl BlobSink for ObjectSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.check.feed(&data)?;
        let Some(upload) = self.upload.as_mut() else {
            return Err(BlobError::Store(format!("{}: upload ended", self.url)));
        };
        upload
            .wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(|e| store_error(&self.url, self.check.sha(), e))?;
        upload.write(&data);
        Ok(())
    }

    fn written(&self) -> u64 {
        self.check.written()
    }

    async fn finish(mut self: Box<Self>) -> Result<u64> {
        let Some(upload) = self.upload.take() else {
            return Err(BlobError::Store(format!("{}: upload ended", self.url)));
        };
        let written = match self.check.verify() {
            Ok(n) => n,
            Err(e) => {
                let _ = upload.abort().await;
                return Err(e);
            }
        };
        upload
            .finish()
            .await
            .map_err(|e| store_error(&self.url, self.check.sha(), e))?;
        Ok(written)
    }
}

impl Drop for ObjectSink {
    fn drop(&mut self) {
        // Unfinished (the sender went away, or a write failed): abort the upload so the
        // store keeps no orphaned parts.
        if let Some(upload) = self.upload.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}
