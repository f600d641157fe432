//! Bearer tokens: every client call names its tenant by the token it carries, and the
//! cluster stores only each token's sha256. An admin token bootstraps a new cluster: the
//! first leader writes one to its data dir (mode 0600) before proposing its hash, so the
//! token is never committed without a copy on disk.
//!
//! ```text
//!  call ─authorization: Bearer stl_…─▶ sha256 ─▶ cache (valid while applied index unchanged)
//!                                           └─miss─▶ Query::Token (local applied state)
//!  first leader: admin.token.pending (fsync) ─▶ PutToken{admin} ─▶ committed ─▶ admin.token
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use stellar_proto::v1 as pb;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::error::Error;
use crate::replica::{Query, Reply, Request};
use crate::replica_thread::ReplicaHandle;
use stellar_proto::tokens::{
    ADMIN_TOKEN_FILE, Caller, bearer, new_token, token_hash, write_secret,
};

const PENDING_SUFFIX: &str = ".pending";
/// The request id of the bootstrap proposal: a second leader's retry is answered, not applied.
const BOOTSTRAP_REQUEST_ID: &[u8] = b"admin-bootstrap";
/// Distinct tokens remembered per replica; past it the cache starts over (bounds memory
/// against callers presenting random tokens).
const CACHE_CAPACITY: usize = 10_000;

/// Resolves tokens against the replica's applied state, caching each answer while the
/// applied index stays where it was (a revocation is seen as soon as it is applied here).
#[derive(Debug)]
pub struct TokenCache {
    replica: ReplicaHandle,
    cache: Mutex<HashMap<[u8; 32], CachedCaller>>,
}

/// A token's answer and the applied index it was read at.
type CachedCaller = (u64, Option<Caller>);

impl TokenCache {
    /// A cache over `replica`'s state.
    pub fn new(replica: ReplicaHandle) -> Self {
        TokenCache {
            replica,
            cache: Mutex::default(),
        }
    }

    /// The caller a token names, or UNAUTHENTICATED.
    pub async fn resolve(&self, token: &str) -> Result<Caller, Status> {
        let hash = token_hash(token);
        let applied = self.replica.info().applied;
        let hit = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&hash).filter(|e| e.0 == applied).map(|e| e.1.clone()));
        let caller = match hit {
            Some(c) => c,
            None => {
                let found = match self
                    .replica
                    .read(
                        Query::Token {
                            sha256: hash.to_vec(),
                        },
                        true,
                        Duration::from_secs(2),
                    )
                    .await
                    .map_err(crate::service::to_status)?
                {
                    Reply::Token(t) => t.map(|(tenant, admin)| Caller { tenant, admin }),
                    other => return Err(Status::internal(format!("unexpected reply {other:?}"))),
                };
                if let Ok(mut c) = self.cache.lock() {
                    if c.len() >= CACHE_CAPACITY {
                        c.clear();
                    }
                    c.insert(hash, (applied, found.clone()));
                }
                found
            }
        };
        caller.ok_or_else(|| {
            Status::unauthenticated(
                "unknown or revoked token; ask the cluster's admin for one (`stellar token create`)",
            )
        })
    }

    /// The caller of a gRPC call.
    pub async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        self.resolve(bearer(metadata)?).await
    }
}

/// Makes sure the cluster has an admin token: while this replica leads a cluster that has
/// none, it writes one to `dir` and proposes its hash. Returns once the cluster has one (or
/// `closed` fires); a token this replica wrote is then in `dir/admin.token`.
pub async fn bootstrap_admin(
    replica: ReplicaHandle,
    dir: PathBuf,
    mut closed: tokio::sync::watch::Receiver<bool>,
) {
    let path = dir.join(ADMIN_TOKEN_FILE);
    let pending = dir.join(format!("{ADMIN_TOKEN_FILE}{PENDING_SUFFIX}"));
    loop {
        match bootstrap_step(&replica, &path, &pending).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "admin bootstrap will retry"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
    }
}

async fn bootstrap_step(
    replica: &ReplicaHandle,
    path: &Path,
    pending: &Path,
) -> Result<bool, Error> {
    let info = replica.info();
    if info.applied == 0 {
        return Ok(false);
    }
    // Linearizable on the leader; a follower's view is enough to settle a pending file.
    let bootstrapped = matches!(
        replica
            .read(
                Query::AdminBootstrapped,
                !info.is_leader,
                Duration::from_secs(2)
            )
            .await?,
        Reply::Flag(true)
    );
    let pending_token = std::fs::read_to_string(pending)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if bootstrapped {
        if let Some(token) = pending_token {
            let ours = matches!(
                replica
                    .read(
                        Query::Token {
                            sha256: token_hash(&token).to_vec()
                        },
                        true,
                        Duration::from_secs(2)
                    )
                    .await?,
                Reply::Token(Some(_))
            );
            if ours {
                std::fs::rename(pending, path)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
                tracing::info!(path = %path.display(), "admin token written; use it with --token or STELLAR_TOKEN");
            } else {
                let _ = std::fs::remove_file(pending);
            }
        }
        return Ok(true);
    }
    if !info.is_leader {
        return Ok(false);
    }
    let token = match pending_token {
        Some(t) => t,
        None => {
            let t = new_token().map_err(|e| Error::Config(format!("no OS randomness: {e}")))?;
            write_secret(pending, &t)
                .map_err(|e| Error::Config(format!("cannot write {}: {e}", pending.display())))?;
            t
        }
    };
    let cmd = pb::Command {
        request_id: BOOTSTRAP_REQUEST_ID.to_vec(),
        kind: Some(pb::command::Kind::PutToken(pb::PutTokenCmd {
            tenant: String::new(),
            token_sha256: token_hash(&token).to_vec(),
            admin: true,
        })),
    };
    replica
        .write(Request::Command(cmd), Duration::from_secs(10))
        .await?;
    // The next step renames the pending file once the token is seen in the state.
    Ok(false)
}
