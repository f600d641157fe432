//! What workers say about their instances, on its way into the replicated state: an
//! instance that became ready (so `stellar status` shows it RUNNING, not PENDING forever)
//! and one whose module failed to load (recorded on the function version with the reason,
//! and re-placed on another node a bounded number of times). One writer task batches the
//! reports of every attached worker into `Edge.ReportAllocations` calls to the leader.
//!
//! ```text
//!  AllocationUpdate(RUNNING | FAILED + why) ─▶ bounded queue ─▶ writer: ≤ 1024 / 50 ms ─▶ leader
//!        (node = the stream's own node)                 apply: skips what is stale or not
//!                                                       that node's; FAILED ─▶ leader re-plans
//! ```
//!
//! Transitions, not heartbeats: each instance reports RUNNING once per stream, so the
//! control plane commits a handful of small entries per deploy, never one per call.

use std::time::Duration;

use stellar_proto::v1 as pb;
use tokio::sync::mpsc;

use stellar_proto::client::{ClusterClient, RetryPolicy};

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
    /// Starts the writer task on the current runtime, writing through `client`.
    pub fn spawn(client: ClusterClient) -> AllocationStateWriter {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(client, rx));
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
        stellar_proto::text::truncate_chars(&mut message, MAX_REASON_BYTES);
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

async fn write_loop(client: ClusterClient, mut rx: mpsc::Receiver<pb::AllocationStateUpdate>) {
    while let Some(first) = rx.recv().await {
        let updates = crate::batching::gather(&mut rx, first, BATCH, LINGER).await;
        let n = updates.len();
        // A retry of this batch (the leader changed mid-write) is answered, not applied
        // again: a load failure counts once.
        let mut request_id = vec![0u8; 16];
        if getrandom::fill(&mut request_id).is_err() {
            request_id.clear();
        }
        let sent = client
            .edge_call(RetryPolicy::Safe, |mut c| {
                let req = pb::ReportAllocationsRequest {
                    updates: updates.clone(),
                    request_id: request_id.clone(),
                };
                async move { c.report_allocations(req).await }
            })
            .await;
        if let Err(e) = sent {
            // No leader within the client's patience: the workers re-report on their next
            // stream, so nothing more is retried here.
            tracing::warn!(updates = n, error = %e.message(), "allocation states not recorded");
        }
    }
}
