//! Who is calling a gateway: bearer tokens resolved from the watched state (token hashes
//! arrive with every other committed change), so an invocation never waits on a replica.
//! A token the view does not know yet (created a moment ago through another gateway) is
//! checked once with the control plane and remembered briefly.
//!
//! ```text
//!  Bearer stl_… ─▶ sha256 ─▶ view.token ─hit─▶ Caller
//!                              └─miss─▶ WhoAmI (replica, with that token) ─▶ cache (2 s)
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stellar_proto::client::ClusterClient;
use stellar_proto::tokens::{Caller, token_hash};
use stellar_proto::v1 as pb;
use tonic::Status;

use crate::view::View;

/// How long a token checked with the control plane is trusted without the view.
const CHECKED_FOR: Duration = Duration::from_secs(2);
/// Tokens remembered from such checks; past it the memory starts over.
const CACHE_CAPACITY: usize = 10_000;

/// When a token was checked with the control plane, and who it named (None: refused).
type Checked = (Instant, Option<Caller>);

fn unknown() -> Status {
    Status::unauthenticated(
        "unknown or revoked token; ask the cluster's admin for one (`stellar token create`)",
    )
}

/// Resolves callers (see the module docs).
#[derive(Debug)]
pub struct Callers {
    view: Arc<View>,
    client: ClusterClient,
    /// Tokens checked with the control plane: the caller, or None when it refused them.
    checked: Mutex<HashMap<[u8; 32], Checked>>,
}

impl Callers {
    /// Resolves against `view`, asking the control plane through `client` on a miss.
    pub fn new(view: Arc<View>, client: ClusterClient) -> Self {
        Callers {
            view,
            client,
            checked: Mutex::default(),
        }
    }

    /// The caller a token names; UNAUTHENTICATED for an unknown or revoked token.
    pub async fn resolve(&self, token: &str) -> Result<Caller, Status> {
        let hash = token_hash(token);
        if let Some((tenant, admin)) = self.view.token(&hash) {
            return Ok(Caller { tenant, admin });
        }
        if let Some((at, c)) = self.checked.lock().ok().and_then(|m| m.get(&hash).cloned())
            && at.elapsed() < CHECKED_FOR
        {
            return c.ok_or_else(unknown);
        }
        let who = self
            .client
            .with_token(token)
            .call(|mut c| async move { c.who_am_i(pb::WhoAmIRequest {}).await })
            .await;
        let caller = match who {
            Ok(w) => Some(Caller {
                tenant: w.tenant,
                admin: w.admin,
            }),
            Err(s) if s.code() == tonic::Code::Unauthenticated => None,
            Err(s) => return Err(s),
        };
        if let Ok(mut m) = self.checked.lock() {
            if m.len() >= CACHE_CAPACITY {
                m.clear();
            }
            m.insert(hash, (stellar_proto::clock::now(), caller.clone()));
        }
        caller.ok_or_else(unknown)
    }
}
