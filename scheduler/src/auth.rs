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
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use stellar_proto::v1 as pb;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::error::Error;
use crate::node::ReplicaHandle;
use crate::replica::{Query, Reply, Request};

/// The file in a replica's data dir that holds the cluster's bootstrap admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
const PENDING_SUFFIX: &str = ".pending";
/// The request id of the bootstrap proposal: a second leader's retry is answered, not applied.
const BOOTSTRAP_REQUEST_ID: &[u8] = b"admin-bootstrap";
/// Distinct tokens remembered per replica; past it the cache starts over (bounds memory
/// against callers presenting random tokens).
const CACHE_CAPACITY: usize = 10_000;

/// Who is calling, as its token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant the token belongs to (empty for admin tokens).
    pub tenant: String,
    /// Admin tokens may act for any tenant and change the cluster.
    pub admin: bool,
}

impl Caller {
    /// The tenant a tenant-scoped call acts for: a tenant token always acts for its own
    /// tenant; an admin names one (`requested`).
    pub fn tenant_for(&self, requested: &str) -> Result<String, Status> {
        if self.admin {
            if requested.is_empty() {
                return Err(Status::invalid_argument(
                    "an admin token must name the tenant to act for (--tenant NAME)",
                ));
            }
            return Ok(requested.to_string());
        }
        if !requested.is_empty() && requested != self.tenant {
            return Err(Status::permission_denied(format!(
                "this token belongs to tenant `{}` and cannot act for {}",
                self.tenant,
                crate::state::shown(requested)
            )));
        }
        Ok(self.tenant.clone())
    }

    /// A listing's tenant filter: a tenant sees only itself; an admin sees what it asks for
    /// (`None`: every tenant).
    pub fn filter(&self, requested: &str) -> Result<Option<String>, Status> {
        if self.admin {
            return Ok((!requested.is_empty()).then(|| requested.to_string()));
        }
        self.tenant_for(requested).map(Some)
    }

    /// Refuses a tenant token on an admin-only call.
    pub fn require_admin(&self, what: &str) -> Result<(), Status> {
        if self.admin {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{what} needs an admin token (this one belongs to tenant `{}`)",
                self.tenant
            )))
        }
    }
}

/// The sha256 of a token: all the cluster ever stores of it.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token (`stl_` and 32 random bytes in hex).
pub fn new_token() -> Result<String, Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| Error::Config(format!("no OS randomness: {e}")))?;
    Ok(format!("stl_{}", hex::encode(b)))
}

/// The bearer token of a call, from `authorization: Bearer …`.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let Some(v) = metadata.get("authorization") else {
        return Err(Status::unauthenticated(
            "no token: pass --token (or STELLAR_TOKEN); `stellar dev` prints an admin token",
        ));
    };
    let v = v
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
    parse_bearer(v)
}

/// The token in an `authorization` header value.
pub fn parse_bearer(v: &str) -> Result<&str, Status> {
    match v.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => {
            Ok(t.trim())
        }
        _ => Err(Status::unauthenticated(
            "the authorization header must be `Bearer TOKEN`",
        )),
    }
}

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

/// The admin token in `dir`, if this replica wrote one.
pub fn read_admin_token(dir: &Path) -> Option<String> {
    let s = std::fs::read_to_string(dir.join(ADMIN_TOKEN_FILE)).ok()?;
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Writes a secret to `path` atomically (temp file, fsync, rename, dir fsync), mode 0600.
pub fn write_secret(path: &Path, token: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
            let t = new_token()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_forms() {
        assert_eq!(parse_bearer("Bearer abc").unwrap(), "abc");
        assert_eq!(parse_bearer("bearer  abc ").unwrap(), "abc");
        assert!(parse_bearer("Basic abc").is_err());
        assert!(parse_bearer("Bearer ").is_err());
        assert!(parse_bearer("abc").is_err());
    }

    #[test]
    fn tenant_tokens_act_only_for_their_tenant() {
        let t = Caller {
            tenant: "acme".into(),
            admin: false,
        };
        assert_eq!(t.tenant_for("").unwrap(), "acme");
        assert_eq!(t.tenant_for("acme").unwrap(), "acme");
        assert_eq!(
            t.tenant_for("globex").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(t.filter("").unwrap(), Some("acme".to_string()));
        assert!(t.require_admin("adding nodes").is_err());
        let a = Caller {
            tenant: String::new(),
            admin: true,
        };
        assert!(a.tenant_for("").is_err());
        assert_eq!(a.tenant_for("globex").unwrap(), "globex");
        assert_eq!(a.filter("").unwrap(), None);
        assert!(a.require_admin("adding nodes").is_ok());
    }

    #[test]
    fn tokens_are_random_and_hash_to_32_bytes() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("stl_") && a.len() == 4 + 64);
        assert_eq!(token_hash(&a).len(), 32);
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn secret_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(ADMIN_TOKEN_FILE);
        write_secret(&p, "stl_x").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_admin_token(dir.path()).unwrap(), "stl_x");
    }
}
