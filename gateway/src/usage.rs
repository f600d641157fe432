//! Usage on its way into the replicated ledger: every receipt a worker sends (with its
//! result, or again in a `UsageReport` until settled) is checked where it arrives
//! (`receipts.rs`); its usage record, or the refusal, is queued here, and one writer task
//! sends them to the leader (`Edge.RecordUsage`) in batches of up to [`USAGE_BATCH`]. The
//! ledger answers a verdict per record (it checks each node's chain).
//!
//! ```text
//!  checked receipt ─▶ usage record ─┐
//!  refused receipt ─▶ refusal ──────┴─▶ bounded queue ─▶ writer: batch ≤ 1024 / 20 ms ─▶ leader
//!     UsageAck(seqs) to each node's worker ◀─ settled: recorded, duplicate, refused for good
//!                                              (a GAP is not: the worker sends it again)
//! ```
//!
//! A worker keeps every receipt until it is settled and sends it again when the settlement
//! is late, so a gateway or leader that fails between a result and its commit loses
//! nothing: the receipt comes again from the worker, through whichever gateway it reaches
//! next.

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

/// One thing for the ledger: a checked receipt's usage, or a refused receipt.
#[derive(Debug, Clone)]
enum Entry {
    Record(pb::UsageRecord),
    Refusal(pb::ReceiptRefusal, u64),
    Incident(pb::NodeIncident),
}

/// The sending side of the usage queue.
#[derive(Debug, Clone)]
pub struct UsageWriter {
    tx: mpsc::Sender<Entry>,
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

    /// Queues a checked receipt's usage. A full queue drops it here; the worker sends the
    /// receipt again until it is settled.
    pub fn record(&self, r: pb::UsageRecord) {
        let node = r.node;
        if self.tx.try_send(Entry::Record(r)).is_err() {
            tracing::warn!(
                node = format!("{node:016x}"),
                "usage queue full; the worker will send the receipt again"
            );
        }
    }

    /// Queues evidence about `node` for its reputation (best effort: a full queue drops it).
    pub fn incident(&self, node: u64, kind: pb::Incident) {
        let i = pb::NodeIncident {
            node,
            kind: kind as i32,
        };
        let _ = self.tx.try_send(Entry::Incident(i));
    }

    /// Queues a refusal of `node`'s receipt `r` (counted against it in the ledger; the
    /// worker is told to forget the receipt). `signed`: the node's signature on it checked,
    /// so the ledger takes it as a void link of the node's chain.
    pub fn refuse(&self, node: u64, r: &pb::Receipt, v: pb::ReceiptVerdict, signed: bool) {
        let mut f = pb::ReceiptRefusal {
            node,
            verdict: v as i32,
            ..Default::default()
        };
        if signed {
            f.seq = r.seq;
            f.prev_hash = r.prev_hash.clone();
            f.receipt_hash = stellar_proto::receipts::receipt_hash(r).to_vec();
        }
        let _ = self.tx.try_send(Entry::Refusal(f, r.seq));
    }
}

async fn write_loop(
    client: ClusterClient,
    hub: std::sync::Arc<WorkerHub>,
    mut rx: mpsc::Receiver<Entry>,
) {
    while let Some(first) = rx.recv().await {
        let entries = crate::batching::gather(&mut rx, first, USAGE_BATCH, LINGER).await;
        let (mut records, mut refusals, mut refused) = (Vec::new(), Vec::new(), Vec::new());
        let mut incidents = Vec::new();
        for e in entries {
            match e {
                Entry::Record(r) => records.push(r),
                Entry::Refusal(f, seq) => {
                    refused.push((f.node, seq));
                    refusals.push(f);
                }
                Entry::Incident(i) => incidents.push(i),
            }
        }
        let keys: Vec<(u64, u64)> = records.iter().map(|r| (r.node, r.seq)).collect();
        // One id for the batch and all its retries: a batch the ledger applied before its
        // answer was lost is answered again, not applied twice (refusals and incidents
        // would count twice against their nodes).
        let mut request_id = vec![0u8; 16];
        if let Err(e) = getrandom::fill(&mut request_id) {
            tracing::warn!(error = %e, "no OS randomness for a usage batch id; sent without one");
            request_id.clear();
        }
        let req = pb::RecordUsageRequest {
            records,
            refusals,
            incidents,
            request_id,
        };
        if let Some(verdicts) = write_batch(&client, req).await {
            let mut settled = refused;
            for (k, v) in keys.into_iter().zip(verdicts) {
                match v {
                    pb::ReceiptVerdict::Recorded | pb::ReceiptVerdict::Duplicate => settled.push(k),
                    // An earlier receipt is still on its way: the worker sends this one again.
                    pb::ReceiptVerdict::Gap => {}
                    v => {
                        tracing::warn!(
                            node = format!("{:016x}", k.0),
                            seq = k.1,
                            verdict = v.as_str_name(),
                            "the ledger refused a receipt"
                        );
                        settled.push(k);
                    }
                }
            }
            hub.ack_usage(settled);
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

/// Records a batch; the ledger's verdict per record, or None when it was not recorded (the
/// workers send the receipts again).
async fn write_batch(
    client: &ClusterClient,
    req: pb::RecordUsageRequest,
) -> Option<Vec<pb::ReceiptVerdict>> {
    let n = req.records.len();
    let r = client
        .edge_call(RetryPolicy::Safe, |mut c| {
            let req = req.clone();
            async move { c.record_usage(req).await }
        })
        .await;
    match r {
        Ok(resp) => {
            let verdicts = resp.verdicts;
            (verdicts.len() == n).then(|| {
                verdicts
                    .into_iter()
                    .map(|v| pb::ReceiptVerdict::try_from(v).unwrap_or(pb::ReceiptVerdict::Unknown))
                    .collect()
            })
        }
        Err(e) if refused(&e) => {
            // A batch the ledger will never take (a bug here): settle it rather than have
            // the workers send it forever.
            tracing::error!(records = n, error = %e.message(), "usage batch refused");
            Some(vec![pb::ReceiptVerdict::Unknown; n])
        }
        Err(e) => {
            tracing::warn!(error = %e.message(), "usage batch not recorded; the workers will send it again");
            None
        }
    }
}
