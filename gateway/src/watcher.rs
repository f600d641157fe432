//! Follows the control plane's `Edge.Watch` stream into the gateway's view: from any replica
//! (a follower's applied state will do), resumed from the last applied index after a
//! reconnect, starting over with a reset when the replica no longer has the changes since
//! then. Each applied event wakes only the workers whose assignments it may change.
//!
//! ```text
//!  replica ─Watch(from = view.applied)─▶ events ─▶ view.apply ─▶ hub.wake(affected nodes)
//!     └ stream ends / replica down ─▶ next replica, same `from`
//! ```

use std::sync::Arc;
use std::time::Duration;

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;

use crate::hub::WorkerHub;
use crate::view::View;

/// Follows the watch until `closed` fires.
pub async fn follow(
    client: ClusterClient,
    view: Arc<View>,
    hub: Arc<WorkerHub>,
    mut closed: tokio::sync::watch::Receiver<bool>,
) {
    let endpoints = client.endpoints().to_vec();
    // Gateways start on a random replica, so their watches spread over the replicas rather
    // than all landing on the first (often the leader).
    let mut next = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as usize
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let target = endpoints[next % endpoints.len()].clone();
        next = next.wrapping_add(1);
        let from = if view.complete() { view.applied() } else { 0 };
        let outcome = tokio::select! {
            r = one(&client, &target, from, &view, &hub) => r,
            _ = closed.wait_for(|c| *c) => return,
        };
        match outcome {
            Ok(events) => {
                if events > 0 {
                    backoff = Duration::from_millis(100);
                }
                tracing::info!(replica = %target, "watch stream ended; resuming on the next replica");
            }
            Err(e) => {
                tracing::warn!(replica = %target, error = %e, "watch failed; trying the next replica")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One watch stream; the events it delivered.
async fn one(
    client: &ClusterClient,
    target: &str,
    from: u64,
    view: &View,
    hub: &WorkerHub,
) -> Result<u64, String> {
    let mut edge = client.edge_for(target).map_err(|s| s.to_string())?;
    let mut stream = edge
        .watch(pb::WatchRequest { from_index: from })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut events = 0u64;
    loop {
        match stream.message().await {
            Ok(Some(ev)) => {
                let reset = ev.reset;
                let affected = view.apply(ev);
                hub.wake(&affected);
                if reset {
                    tracing::info!(replica = %target, "watch: receiving the cluster's state");
                }
                if matches!(affected, crate::view::Affected::All) {
                    let (functions, allocations, nodes) = view.counts();
                    tracing::info!(
                        applied = view.applied(),
                        functions,
                        allocations,
                        nodes,
                        "watch: cluster state loaded"
                    );
                }
                events += 1;
            }
            Ok(None) => return Ok(events),
            Err(s) => return Err(s.message().to_string()),
        }
    }
}
