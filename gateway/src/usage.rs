//! Usage records on their way into the replicated ledger: the router hands over each
//! invocation's record as its answer arrives, the worker's batched reports follow (the ledger
//! deduplicates by invocation id, so the second copy counts nothing), and one writer task
//! sends them to the leader (`Edge.RecordUsage`) in batches of up to [`USAGE_BATCH`].
//!
//! ```text
//!  InvocationResult.usage ──┐
//!  UsageReport (worker) ────┴─▶ bounded queue ─▶ writer: batch ≤ 1024 / 20 ms ─▶ leader ─▶ Raft
//!                                     UsageAck(ids) to each node's worker ◀─ committed
//! ```
//!
//! A worker keeps every record until it is acknowledged and reports it again when the
//! acknowledgement is late, so a gateway or leader that fails between a result and its
//! commit loses nothing: the record comes again from the worker, through whichever gateway
//! it reaches next.

use std::time::Duration;

use stellar_proto::v1 as pb;
use tokio::sync::mpsc;

use stellar_proto::client::{ClusterClient, RetryPolicy};
use tonic::Code;

use crate::hub::WorkerHub;

/// Usage records per Raft command.
pub const USAGE_BATCH: usize = 1024;
/// Records waiting for the writer; past it new ones are dropped here (and counted later
/// from the worker's own report).
const QUEUE: usize = 65_536;
/// How long the writer gathers a batch once the first record arrived.
const LINGER: Duration = Duration::from_millis(20);

/// The sending side of the usage queue.
#[derive(Debug, Clone)]
pub struct UsageWriter {
    tx: mpsc::Sender<pb::UsageRecord>,
}

impl UsageWriter {
    /// Starts the writer task on the current runtime, writing through `client` (the
    /// gateway's admin-token client); committed records are acknowledged to their workers
    /// through `hub`.
    pub fn spawn(client: ClusterClient, hub: std::sync::Arc<WorkerHub>) -> UsageWriter {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(client, hub, rx));
        UsageWriter { tx }
    }

    /// Queues a record; false if the queue is full or the writer stopped.
    pub fn record(&self, r: pb::UsageRecord) -> bool {
        self.tx.try_send(r).is_ok()
    }
}

async fn write_loop(
    client: ClusterClient,
    hub: std::sync::Arc<WorkerHub>,
    mut rx: mpsc::Receiver<pb::UsageRecord>,
) {
    while let Some(first) = rx.recv().await {
        let records = crate::batching::gather(&mut rx, first, USAGE_BATCH, LINGER).await;
        let ids: Vec<(u64, Vec<u8>)> = records
            .iter()
            .map(|r| (r.node, r.invocation_id.clone()))
            .collect();
        if write_batch(&client, records).await {
            hub.ack_usage(ids);
        }
    }
}

/// Whether the control plane refused a batch for what it holds (a bad record), not for
/// where or when it was sent: retrying it unchanged would be refused again.
fn refused(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
    )
}

/// Records a batch; true when every record is now in the ledger (or refused for good, so
/// the worker may forget it too).
async fn write_batch(client: &ClusterClient, records: Vec<pb::UsageRecord>) -> bool {
    match try_batch(client, records.clone()).await {
        Ok(()) => true,
        Err(e) if refused(&e) => {
            // One bad record refuses its whole command: record the others one by one.
            tracing::warn!(records = records.len(), error = %e.message(), "usage batch refused; recording its records one by one");
            for r in records {
                let id = String::from_utf8_lossy(&r.invocation_id).into_owned();
                if let Err(e) = try_batch(client, vec![r]).await {
                    tracing::warn!(invocation = %id, error = %e.message(), "usage record refused");
                }
            }
            true
        }
        // Not recorded: the workers keep the records and report them again.
        Err(e) => {
            tracing::warn!(error = %e.message(), "usage batch not recorded; the workers will report it again");
            false
        }
    }
}

async fn try_batch(
    client: &ClusterClient,
    records: Vec<pb::UsageRecord>,
) -> Result<(), tonic::Status> {
    client
        .edge_call(RetryPolicy::Safe, |mut c| {
            let req = pb::RecordUsageRequest {
                records: records.clone(),
            };
            async move { c.record_usage(req).await }
        })
        .await
        .map(|_| ())
}
