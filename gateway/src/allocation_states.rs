//! What workers say about their instances, on its way into the replicated state: an
//! instance that became ready (so `stellar status` shows it RUNNING, not PENDING forever)
//! and one whose module failed to load (recorded on the function version with the reason,
//! and re-placed on another node a bounded number of times). One writer task batches the
//! reports of every attached worker into `AllocationStates` commands.
//!
//! ```text
//!  AllocationUpdate(RUNNING | FAILED + why) ─▶ bounded queue ─▶ writer: ≤ 1024 / 50 ms ─▶ Raft
//!        (node = the stream's own node)                 apply: skips what is stale or not
//!                                                       that node's; FAILED ─▶ leader re-plans
//! ```
//!
//! Transitions, not heartbeats: each instance reports RUNNING once per stream, so the
//! control plane commits a handful of small entries per deploy, never one per call.

use std::time::Duration;

use stellar_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::node::ReplicaHandle;
use crate::replica::Request;
use crate::service::WRITE_TIMEOUT;

/// Updates per Raft command.
const BATCH: usize = 1024;
/// Updates waiting for the writer; past it new ones are dropped (a RUNNING is re-reported
/// on the worker's next stream; a failure is logged here either way).
const QUEUE: usize = 16_384;
/// How long the writer gathers a batch once the first update arrived.
const LINGER: Duration = Duration::from_millis(50);
/// Longest failure reason kept in the state, bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// The sending side of the allocation-state queue.
#[derive(Debug, Clone)]
pub struct AllocationStateWriter {
    tx: mpsc::Sender<pb::AllocationStateUpdate>,
}

impl AllocationStateWriter {
    /// Starts the writer task on the current runtime.
    pub fn spawn(replica: ReplicaHandle) -> AllocationStateWriter {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(replica, rx));
        AllocationStateWriter { tx }
    }

    /// Queues `node`'s report about `allocation`; false if the queue is full.
    pub fn report(
        &self,
        node: u64,
        allocation: u64,
        state: pb::AllocationState,
        reason: &str,
    ) -> bool {
        let mut message = reason.to_string();
        crate::error::truncate_chars(&mut message, MAX_REASON_BYTES);
        self.tx
            .try_send(pb::AllocationStateUpdate {
                allocation,
                state: state as i32,
                node,
                message,
            })
            .is_ok()
    }
}

async fn write_loop(replica: ReplicaHandle, mut rx: mpsc::Receiver<pb::AllocationStateUpdate>) {
    while let Some(first) = rx.recv().await {
        let updates = crate::batching::gather(&mut rx, first, BATCH, LINGER).await;
        let n = updates.len();
        let cmd = pb::Command {
            request_id: Vec::new(),
            kind: Some(pb::command::Kind::AllocationStates(
                pb::AllocationStatesCmd { updates },
            )),
        };
        if let Err(e) = replica.write(Request::Command(cmd), WRITE_TIMEOUT).await {
            // Not the leader any more, or no quorum: the workers re-report on their next
            // stream (to the new leader), so nothing is retried here.
            tracing::warn!(updates = n, error = %e, "allocation states not recorded");
        }
    }
}
