//! Modules on their way to workers: a gateway fetches a module once from any replica
//! (`Edge.FetchModule`, content-addressed, so any replica's copy will do), checks its sha256,
//! keeps it in a bounded cache, and streams it to every worker that asks, in 1 MiB chunks.
//!
//! ```text
//!  worker ─FetchModule(sha)─▶ cache hit? ─no─▶ one fetch per sha (others wait) ─▶ verify
//!         ◀─ModuleChunk…──── bytes                                     └▶ cache (LRU, bytes)
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use stellar_proto::client::{ClusterClient, RetryPolicy};
use stellar_proto::v1 as pb;

/// Module bytes kept per gateway; past it the least recently used go.
pub const CACHE_BYTES: usize = 256 << 20;
/// Module bytes per chunk sent to a worker.
pub const CHUNK: usize = 1 << 20;

#[derive(Default)]
struct Cache {
    bytes: HashMap<String, Arc<[u8]>>,
    order: VecDeque<String>,
    total: usize,
}

/// The gateway's module cache (see the module docs).
pub struct Modules {
    client: ClusterClient,
    cache: Mutex<Cache>,
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Modules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Modules").finish_non_exhaustive()
    }
}

impl Modules {
    /// A cache that fetches through `client` (the gateway's admin-token client).
    pub fn new(client: ClusterClient) -> Arc<Modules> {
        Arc::new(Modules {
            client,
            cache: Mutex::default(),
            fetching: Mutex::default(),
        })
    }

    fn cached(&self, sha: &str) -> Option<Arc<[u8]>> {
        let mut c = self.cache.lock().ok()?;
        let b = c.bytes.get(sha).cloned()?;
        if let Some(i) = c.order.iter().position(|s| s == sha) {
            let s = c.order.remove(i).expect("present");
            c.order.push_back(s);
        }
        Some(b)
    }

    fn keep(&self, sha: &str, bytes: Arc<[u8]>) {
        let Ok(mut c) = self.cache.lock() else {
            return;
        };
        if c.bytes.contains_key(sha) || bytes.len() > CACHE_BYTES {
            return;
        }
        while c.total + bytes.len() > CACHE_BYTES {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(b) = c.bytes.remove(&old) {
                c.total -= b.len();
            }
        }
        c.total += bytes.len();
        c.order.push_back(sha.to_string());
        c.bytes.insert(sha.to_string(), bytes);
    }

    /// The module `sha` (hex), from the cache or the control plane; the error says why not.
    pub async fn get(&self, sha: &str) -> Result<Arc<[u8]>, String> {
        if let Some(b) = self.cached(sha) {
            return Ok(b);
        }
        let lock = self
            .fetching
            .lock()
            .map_err(|_| "module cache poisoned".to_string())?
            .entry(sha.to_string())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        if let Some(b) = self.cached(sha) {
            return Ok(b);
        }
        let fetched = self.fetch(sha).await;
        if let Ok(mut f) = self.fetching.lock() {
            f.remove(sha);
        }
        let bytes = fetched?;
        self.keep(sha, bytes.clone());
        Ok(bytes)
    }

    async fn fetch(&self, sha: &str) -> Result<Arc<[u8]>, String> {
        let mut stream = self
            .client
            .edge_call(RetryPolicy::Safe, |mut c| {
                let req = pb::FetchModule {
                    sha256: sha.to_string(),
                };
                async move { c.fetch_module(req).await }
            })
            .await
            .map_err(|s| s.message().to_string())?;
        let mut bytes = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    if !chunk.error.is_empty() {
                        return Err(chunk.error);
                    }
                    if chunk.offset != bytes.len() as u64 {
                        return Err(format!(
                            "module {sha}: chunk at offset {} after {} bytes",
                            chunk.offset,
                            bytes.len()
                        ));
                    }
                    bytes.extend_from_slice(&chunk.data);
                    if bytes.len() > stellar_proto::limits::MAX_MODULE_BYTES {
                        return Err(format!("module {sha} is over the size limit"));
                    }
                    if chunk.last {
                        break;
                    }
                }
                Ok(None) => {
                    return Err(format!(
                        "module {sha}: the replica ended the transfer early"
                    ));
                }
                Err(s) => return Err(s.message().to_string()),
            }
        }
        let got = hex::encode(Sha256::digest(&bytes));
        if got != sha {
            return Err(format!("module {sha}: received bytes hash to {got}"));
        }
        Ok(bytes.into())
    }
}

/// The chunks a worker gets for a module (`error` set on a refusal).
pub fn chunks(sha: &str, bytes: Result<Arc<[u8]>, String>) -> Vec<pb::ModuleChunk> {
    match bytes {
        Err(error) => vec![pb::ModuleChunk {
            sha256: sha.to_string(),
            last: true,
            error,
            ..Default::default()
        }],
        Ok(b) => {
            let total = b.len();
            let mut out = Vec::new();
            let mut offset = 0;
            loop {
                let end = (offset + CHUNK).min(total);
                out.push(pb::ModuleChunk {
                    sha256: sha.to_string(),
                    offset: offset as u64,
                    data: b[offset..end].to_vec(),
                    last: end == total,
                    error: String::new(),
                });
                if end == total {
                    return out;
                }
                offset = end;
            }
        }
    }
}
