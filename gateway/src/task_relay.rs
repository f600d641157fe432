//! Task attempts' outputs and results on their way from a worker to the control plane. A
//! worker uploads each file its task wrote over its own stream, then sends the result; the
//! gateway pipes each file into a `PutBlob` of its own (stored on two replicas before it is
//! answered), and reports the result with `Edge.ReportTasks` only once every upload it names
//! is stored. The worker is told `TaskAck` once the report is committed (it then forgets
//! the attempt and its files); until then it keeps them and sends them again on its next
//! stream.
//!
//! ```text
//!  TaskOutputChunk(offset 0) ─ attempt runs on this node? ─no─▶ dropped (ack with error)
//!                             └ yes ─▶ PutBlob stream ◀─ chunks… (awaited: backpressure)
//!  TaskResult ─▶ wait for its uploads ─▶ ReportTasks (retried) ─▶ TaskAck(key[, error])
//!             └ an upload cut short by an election ─▶ Task again (the worker re-sends)
//! ```

use std::collections::HashMap;
use std::time::Duration;

use stellar_proto::client::{ClusterClient, RetryPolicy};
use stellar_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::hub::{Outbox, control};
use crate::view::{TaskId, View, task_id};

/// Chunks buffered per upload between the worker's stream and the control plane.
const UPLOAD_BUFFER: usize = 8;
/// How long a result's report is retried (a leader election, a replica restart).
const REPORT_FOR: Duration = Duration::from_secs(120);
/// Times an attempt's outputs are asked for again after the control plane cut their
/// uploads short (an election takes a second or two; this covers a slow one).
const RESENDS: u32 = 20;
/// The pause before each such ask.
const RESEND_AFTER: Duration = Duration::from_secs(1);

type Upload = JoinHandle<Result<pb::PutBlobResponse, tonic::Status>>;

/// The uploads of one worker stream (see the module docs).
#[derive(Default)]
pub struct TaskUploads {
    /// The file being received, per attempt: its chunks' way to the control plane.
    open: HashMap<TaskId, (String, mpsc::Sender<pb::BlobChunk>)>,
    /// Uploads started, per attempt, by sha256.
    started: HashMap<TaskId, Vec<(String, Upload)>>,
    /// Results seen per attempt on this stream (each may be asked for again).
    resends: HashMap<TaskId, u32>,
}

impl std::fmt::Debug for TaskUploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskUploads")
            .field("open", &self.open.len())
            .field("attempts", &self.started.len())
            .finish()
    }
}

fn ack(key: pb::TaskKey, error: String) -> pb::ControlMessage {
    control(pb::control_message::Kind::TaskAck(pb::TaskAck {
        key: Some(key),
        error,
    }))
}

impl TaskUploads {
    /// One chunk of an output file: the first opens its upload, every one is forwarded
    /// (waiting while the control plane is slower than the worker).
    pub async fn chunk(
        &mut self,
        (node, view, client): (u64, &View, &ClusterClient),
        out: pb::TaskOutputChunk,
    ) {
        let Some(chunk) = out.chunk else { return };
        let id = task_id(&out.key.unwrap_or_default());
        if chunk.offset == 0 {
            if !view.runs_task(node, id) {
                tracing::debug!(
                    node = format!("{node:016x}"),
                    ?id,
                    "output of an attempt not running here dropped"
                );
                return;
            }
            let (tx, rx) = mpsc::channel(UPLOAD_BUFFER);
            let mut rx = Some(rx);
            let client = client.clone();
            let upload = tokio::spawn(async move {
                client
                    .call_with(RetryPolicy::Unrun, |mut c| {
                        let chunks = rx.take();
                        async move {
                            let Some(chunks) = chunks else {
                                return Err(tonic::Status::unavailable(
                                    "the leader changed during the upload",
                                ));
                            };
                            c.put_blob(tokio_stream::wrappers::ReceiverStream::new(chunks))
                                .await
                        }
                    })
                    .await
            });
            self.started
                .entry(id)
                .or_default()
                .push((chunk.sha256.clone(), upload));
            self.open.insert(id, (chunk.sha256.clone(), tx));
        }
        let last = chunk.last;
        if let Some((sha, tx)) = self.open.get(&id)
            && *sha == chunk.sha256
        {
            // A failed upload closes its receiver: the result then names an output that
            // was not stored, and the report says so.
            let _ = tx.send(chunk).await;
        }
        if last {
            self.open.remove(&id);
        }
    }

    /// An attempt's result: reported once its uploads are stored, then acknowledged to the
    /// worker (on a task of its own: the stream goes on meanwhile). An upload cut short by
    /// the control plane (a leader election) is not the node's fault: the task is sent to
    /// the worker again, which sends its outputs and result again (it keeps them until the
    /// ack), up to [`RESENDS`] times.
    pub fn result(
        &mut self,
        (node, view): (u64, &std::sync::Arc<View>),
        client: &ClusterClient,
        tx: &Outbox,
        r: pb::TaskResult,
    ) {
        let key = r.key.unwrap_or_default();
        let id = task_id(&key);
        self.open.remove(&id);
        let uploads = self.started.remove(&id).unwrap_or_default();
        let resends = self.resends.entry(id).or_insert(0);
        *resends += 1;
        let resend = *resends <= RESENDS;
        let (client, tx, view) = (client.clone(), tx.clone(), view.clone());
        tokio::spawn(async move {
            let mut failed = String::new();
            let mut transient = false;
            let mut stored: Vec<(String, u64)> = Vec::new();
            for (sha, up) in uploads {
                match up.await {
                    Ok(Ok(r)) => stored.push((r.sha256, r.size)),
                    Ok(Err(s)) => {
                        transient |= stellar_proto::client::retryable(&s);
                        failed = format!("output {sha} was not stored: {}", s.message());
                    }
                    Err(e) => failed = format!("output {sha} was not stored: {e}"),
                }
            }
            let mut result = r;
            // A success may name only outputs this stream uploaded for this attempt, at the
            // size stored: a worker cannot claim a blob it never sent (another tenant's,
            // found by its sha256) as its output.
            // (An upload that failed is handled below: asked for again, or not stored.)
            if let Some(why) = failed
                .is_empty()
                .then(|| unproven_output(&result, &stored))
                .flatten()
            {
                tracing::warn!(node = format!("{node:016x}"), ?id, reason = %why, "task result names an output it did not upload");
                result.error_code = "OUTPUT_NOT_UPLOADED".into();
                result.error_message = why;
                result.node_fault = true;
                result.outputs.clear();
            }
            if !failed.is_empty() && result.error_code.is_empty() {
                if transient && resend {
                    tokio::time::sleep(RESEND_AFTER).await;
                    if let Some(t) = view
                        .tasks(node)
                        .into_iter()
                        .find(|t| t.key.map(|k| task_id(&k)) == Some(id))
                    {
                        tracing::info!(node = format!("{node:016x}"), ?id, reason = %failed, "task outputs not stored; asking the worker again");
                        let _ = tx
                            .send(Ok(control(pb::control_message::Kind::Task(t))))
                            .await;
                        return;
                    }
                }
                // Not the program's fault: the attempt is retried elsewhere.
                result.error_code = "OUTPUT_NOT_STORED".into();
                result.error_message = failed;
                result.node_fault = true;
            }
            let mut answer = report(&client, node, result.clone()).await;
            if let Ok(why) = &answer
                && !why.is_empty()
            {
                // Its outputs are not stored where the log may name them: the attempt ends
                // as the node's fault now (retried elsewhere), not at its deadline.
                tracing::warn!(node = format!("{node:016x}"), ?id, reason = %why, "task result refused; reported as not stored");
                result.error_code = "OUTPUT_NOT_STORED".into();
                result.error_message = why.clone();
                result.node_fault = true;
                result.outputs.clear();
                answer = report(&client, node, result).await.map(|_| why.clone());
            }
            match answer {
                Ok(why) => {
                    let _ = tx.send(Ok(ack(key, why))).await;
                }
                Err(s) => {
                    // No ack: the worker keeps the result and sends it again on its next
                    // stream; the leader judges the attempt lost meanwhile if it must.
                    tracing::warn!(node = format!("{node:016x}"), ?id, error = %s.message(), "task result not reported");
                }
            }
        });
    }
}

/// Why a successful `result` may not be reported as it is: an output it names that was not
/// stored from this stream for the attempt (by sha256 and size); None when each was.
fn unproven_output(result: &pb::TaskResult, stored: &[(String, u64)]) -> Option<String> {
    if !result.error_code.is_empty() {
        return None;
    }
    result
        .outputs
        .iter()
        .find(|o| {
            !stored
                .iter()
                .any(|(sha, size)| *sha == o.sha256 && *size == o.size)
        })
        .map(|o| {
            format!(
                "output `{}` ({}, {} bytes) was not uploaded by this attempt",
                o.name, o.sha256, o.size
            )
        })
}

/// Reports one attempt's end to the leader, retried through elections for [`REPORT_FOR`];
/// why it was refused (empty: taken).
async fn report(
    client: &ClusterClient,
    node: u64,
    result: pb::TaskResult,
) -> Result<String, tonic::Status> {
    let req = pb::ReportTasksRequest {
        reports: vec![pb::TaskReport {
            result: Some(result),
            node,
            lost: false,
        }],
    };
    let started = stellar_proto::clock::now();
    loop {
        let r = client
            .edge_call(RetryPolicy::Safe, |mut c| {
                let req = req.clone();
                async move { c.report_tasks(req).await }
            })
            .await;
        match r {
            Ok(a) => return Ok(a.refused.into_iter().next().unwrap_or_default()),
            Err(s) if started.elapsed() < REPORT_FOR => {
                tracing::debug!(error = %s.message(), "task report not taken yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_names_only_outputs_its_stream_uploaded() {
        let out = |name: &str, sha: &str, size| pb::BlobRef {
            name: name.into(),
            sha256: sha.into(),
            size,
        };
        let ok = |outputs| pb::TaskResult {
            outputs,
            ..Default::default()
        };
        let stored = vec![("aa".repeat(32), 10), ("bb".repeat(32), 0)];
        let a = out("a.ts", &"aa".repeat(32), 10);
        let b = out("b.ts", &"bb".repeat(32), 0);
        assert_eq!(unproven_output(&ok(vec![a.clone(), b]), &stored), None);
        // A blob it never sent (another tenant's, say), or one at another size: refused.
        let theirs = out("c.ts", &"cc".repeat(32), 5);
        let why = unproven_output(&ok(vec![a.clone(), theirs]), &stored).expect("refused");
        assert!(why.contains("c.ts"), "{why}");
        let resized = out("a.ts", &"aa".repeat(32), 11);
        assert!(unproven_output(&ok(vec![resized]), &stored).is_some());
        // A failure names no outputs that matter: passed on as it is.
        let failed = pb::TaskResult {
            error_code: "EXIT".into(),
            outputs: vec![out("x", &"dd".repeat(32), 1)],
            ..Default::default()
        };
        assert_eq!(unproven_output(&failed, &[]), None);
    }
}
