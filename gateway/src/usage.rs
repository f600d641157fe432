//! Usage records on their way into the replicated ledger: the gateway hands over each
//! invocation's record as its answer arrives, the worker's batched reports follow (the ledger
//! deduplicates by invocation id, so the second copy counts nothing), and one writer task
//! turns them into `Usage` commands of up to [`USAGE_BATCH`] records.
//!
//! ```text
//!  InvocationResult.usage ──┐
//!  UsageReport (worker) ────┴─▶ bounded queue ─▶ writer: batch ≤ 1024 / 20 ms ─▶ Raft
//!                                     UsageAck(ids) to each node's worker ◀─ committed
//! ```
//!
//! A worker keeps every record until it is acknowledged and reports it again when the
//! acknowledgement is late, so a leader that fails between a result and its commit loses
//! nothing: the next leader gets the record from the worker.

use std::time::Duration;

use stellar_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::node::ReplicaHandle;
use crate::replica::Request;
use crate::service::WRITE_TIMEOUT;
use crate::workers::WorkerHub;

/// Usage records per Raft command.
pub const USAGE_BATCH: usize = 1024;
/// Records waiting for the writer; past it new ones are dropped here (and counted later
/// from the worker's own report).
const QUEUE: usize = 65_536;
/// How long the writer gathers a batch once the first record arrived.
const LINGER: Duration = Duration::from_millis(20);
/// Attempts per batch while this replica still leads.
const ATTEMPTS: u32 = 3;

/// The sending side of the usage queue.
#[derive(Debug, Clone)]
pub struct UsageWriter {
    tx: mpsc::Sender<pb::UsageRecord>,
}

impl UsageWriter {
    /// Starts the writer task on the current runtime; committed records are acknowledged
    /// to their workers through `hub`.
    pub fn spawn(replica: ReplicaHandle, hub: std::sync::Arc<WorkerHub>) -> UsageWriter {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(replica, hub, rx));
        UsageWriter { tx }
    }

    /// Queues a record; false if the queue is full or the writer stopped.
    pub fn record(&self, r: pb::UsageRecord) -> bool {
        self.tx.try_send(r).is_ok()
    }
}

async fn write_loop(
    replica: ReplicaHandle,
    hub: std::sync::Arc<WorkerHub>,
    mut rx: mpsc::Receiver<pb::UsageRecord>,
) {
    while let Some(first) = rx.recv().await {
        let records = crate::batching::gather(&mut rx, first, USAGE_BATCH, LINGER).await;
        let ids: Vec<(u64, Vec<u8>)> = records
            .iter()
            .map(|r| (r.node, r.invocation_id.clone()))
            .collect();
        if write_batch(&replica, records).await {
            hub.ack_usage(ids);
        }
    }
}

/// Records a batch; true when every record is now in the ledger (or refused for good, so
/// the worker may forget it too).
async fn write_batch(replica: &ReplicaHandle, records: Vec<pb::UsageRecord>) -> bool {
    match try_batch(replica, records.clone()).await {
        Ok(()) => true,
        Err(crate::Error::Apply(e)) => {
            // One bad record refuses its whole command: record the others one by one.
            tracing::warn!(records = records.len(), error = %e, "usage batch refused; recording its records one by one");
            for r in records {
                let id = hex::encode(&r.invocation_id);
                if let Err(e) = try_batch(replica, vec![r]).await {
                    tracing::warn!(invocation = %id, error = %e, "usage record refused");
                }
            }
            true
        }
        // Not recorded here: the workers keep the records and report them again.
        Err(_) => false,
    }
}

async fn try_batch(replica: &ReplicaHandle, records: Vec<pb::UsageRecord>) -> crate::Result<()> {
    let n = records.len();
    let cmd = pb::Command {
        request_id: Vec::new(),
        kind: Some(pb::command::Kind::Usage(pb::UsageCmd {
            records,
            unix_ms: crate::clock::unix_ms(),
        })),
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        match replica
            .write(Request::Command(cmd.clone()), WRITE_TIMEOUT)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e @ crate::Error::Apply(_)) => return Err(e),
            Err(e) if attempt < ATTEMPTS && replica.info().is_leader => {
                tracing::debug!(records = n, error = %e, "usage batch not recorded yet; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                tracing::warn!(records = n, error = %e, "usage batch not recorded on this replica; the workers will report it again");
                return Err(e);
            }
        }
    }
}
