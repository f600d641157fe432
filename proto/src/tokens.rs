//! Bearer tokens as every role sees them: a call names its tenant by the token it carries, and
//! the cluster stores only each token's sha256. Replicas resolve tokens from their applied
//! state, gateways from the state they watch; both use these helpers.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::metadata::MetadataMap;

/// The file in a replica's data dir that holds the cluster's bootstrap admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

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
                crate::text::shown(requested)
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
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)?;
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
