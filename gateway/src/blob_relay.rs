//! Image layers and task inputs on their way to workers: a worker asks for a layer of an
//! image it was assigned, or an input of a task it runs; the gateway streams it from any replica (`Edge.FetchBlob`) straight into the
//! worker's stream, chunk by chunk, holding at most a few chunks (layers are large and each
//! node unpacks a layer once). The worker checks the bytes against the name.
//!
//! ```text
//!  worker ─FetchBlob(sha, offset)─▶ assigned to this node? ─no─▶ BlobChunk(error)
//!                                   └ yes ─▶ Edge.FetchBlob ─▶ BlobChunk… ─▶ worker
//! ```

use stellar_proto::client::{ClusterClient, RetryPolicy};
use stellar_proto::v1 as pb;

use crate::hub::{Outbox, control};

/// Whether `sha` is a layer of an image in `assignments` or `tasks`, or an input of one of
/// the tasks (a worker fetches only those).
pub fn assigned(assignments: &[pb::Assignment], tasks: &[pb::Task], sha: &str) -> bool {
    let images = assignments
        .iter()
        .filter_map(|a| a.image.as_ref())
        .chain(tasks.iter().filter_map(|t| t.image.as_ref()));
    let mut layers = images.flat_map(|i| i.layers.iter().map(|l| &l.sha256));
    layers.any(|l| l == sha)
        || tasks
            .iter()
            .flat_map(|t| t.inputs.iter())
            .any(|b| b.sha256 == sha)
}

fn refusal(sha: &str, error: String) -> pb::ControlMessage {
    control(pb::control_message::Kind::BlobChunk(pb::BlobChunk {
        sha256: sha.to_string(),
        last: true,
        error,
        ..Default::default()
    }))
}

/// Streams blob `f` from the control plane to a worker's outbox; a failure reaches the
/// worker as a chunk with `error` set (it retries with the next assignment or stream).
pub async fn relay(client: ClusterClient, f: pb::FetchBlob, node: u64, tx: Outbox) {
    let sha = f.sha256.clone();
    let fetched = client
        .edge_call(RetryPolicy::Safe, |mut c| {
            let req = f.clone();
            async move { c.fetch_blob(req).await }
        })
        .await;
    let mut stream = match fetched {
        Ok(s) => s,
        Err(s) => {
            tracing::warn!(node = format!("{node:016x}"), blob = %sha, error = %s.message(), "blob not available for a worker");
            let _ = tx.send(Ok(refusal(&sha, s.message().to_string()))).await;
            return;
        }
    };
    loop {
        let msg = match stream.message().await {
            Ok(Some(chunk)) => {
                let last = chunk.last;
                let sent = tx
                    .send(Ok(control(pb::control_message::Kind::BlobChunk(chunk))))
                    .await;
                if sent.is_err() || last {
                    return;
                }
                continue;
            }
            Ok(None) => "the replica ended the transfer early".to_string(),
            Err(s) => s.message().to_string(),
        };
        tracing::warn!(node = format!("{node:016x}"), blob = %sha, error = %msg, "blob transfer to a worker cut short");
        let _ = tx.send(Ok(refusal(&sha, msg))).await;
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_layers_of_assigned_images_and_task_inputs_are_relayed() {
        let a = pb::Assignment {
            image: Some(pb::ContainerImage {
                layers: vec![pb::ImageLayer {
                    sha256: "aa".repeat(32),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(assigned(std::slice::from_ref(&a), &[], &"aa".repeat(32)));
        assert!(!assigned(std::slice::from_ref(&a), &[], &"bb".repeat(32)));
        assert!(!assigned(&[], &[], &"aa".repeat(32)));
        // A task's inputs and its image's layers, and nothing else.
        let t = pb::Task {
            image: a.image.clone(),
            inputs: vec![pb::BlobRef {
                name: "in.mp4".into(),
                sha256: "cc".repeat(32),
                size: 1,
            }],
            ..Default::default()
        };
        assert!(assigned(&[], std::slice::from_ref(&t), &"cc".repeat(32)));
        assert!(assigned(&[], std::slice::from_ref(&t), &"aa".repeat(32)));
        assert!(!assigned(&[a], &[t], &"dd".repeat(32)));
    }
}
