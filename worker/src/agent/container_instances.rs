//! The agent's container instances: an assignment with an image becomes ready once every
//! layer is in the node's layer cache (missing ones fetched over the stream, each once,
//! whatever number of instances wait for it); a call runs in the container sandbox on a task
//! of its own and comes back as a result with a usage record, as a wasm call does.
//!
//! ```text
//!  Assignment(image) ─ all layers cached? ─yes─▶ RUNNING
//!                     └ no ─▶ FetchBlob(sha) per missing layer ─▶ BlobChunk… ─▶ file
//!                              ─▶ unpack + verify (blocking) ─▶ LayerReady ─▶ RUNNING | FAILED
//!  Invocation ─▶ slot ─▶ container::invocation::invoke ─▶ InvocationResult + UsageRecord
//! ```

use std::collections::HashSet;

use stellar_proto::v1 as pb;
use tokio::sync::mpsc;

use super::{Agent, Event, Instance, Progress, result_message, update};
use crate::container::ContainerCall;

/// Free disk (MiB) under which unused cached layers are removed.
pub const LAYER_CACHE_FLOOR_MIB: u64 = 2048;

impl Agent {
    /// Starts a container instance: ready at once when its layers are cached, else after
    /// they are fetched.
    pub(super) async fn start_container(
        &mut self,
        a: pb::Assignment,
        tx: &mpsc::Sender<pb::WorkerMessage>,
    ) {
        let image = a.image.clone().unwrap_or_default();
        let Some(c) = self.containers.as_mut() else {
            let why = "this node cannot run containers (its worker found no usable cgroup, overlayfs or user namespaces)";
            let _ = tx
                .send(update(a.allocation, pb::AllocationState::Failed, why))
                .await;
            return;
        };
        let mut fetch = Vec::new();
        for l in &image.layers {
            if c.runtime.layers().has(&l.sha256) || c.downloads.fetching(&l.sha256) {
                continue;
            }
            match c.downloads.start(&l.sha256) {
                Ok(Some(offset)) => fetch.push((l.sha256.clone(), offset)),
                Ok(None) => {}
                Err(why) => {
                    let _ = tx
                        .send(update(a.allocation, pb::AllocationState::Failed, &why))
                        .await;
                    return;
                }
            }
        }
        let ready = image
            .layers
            .iter()
            .all(|l| c.runtime.layers().has(&l.sha256));
        tracing::info!(
            allocation = a.allocation,
            function = %a.function,
            layers = image.layers.len(),
            fetching = fetch.len(),
            "container instance assigned"
        );
        self.instances.insert(
            a.allocation,
            Instance {
                tenant: a.tenant,
                function: a.function,
                sha256: String::new(),
                limits: a.limits.unwrap_or_default(),
                ready,
                image: Some(image),
            },
        );
        // Room for what it fetches: unused layers go first when the disk is low.
        if !fetch.is_empty() {
            self.prune_layers();
        }
        if ready {
            let _ = tx
                .send(update(a.allocation, pb::AllocationState::Running, ""))
                .await;
        }
        for (sha, offset) in fetch {
            if offset > 0 {
                tracing::info!(layer = %sha, offset, "resuming a layer fetch cut short");
            }
            let msg = pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::FetchBlob(pb::FetchBlob {
                    sha256: sha,
                    offset,
                })),
            };
            let _ = tx.send(msg).await;
        }
    }

    /// One chunk of a layer on its way: written; the last one hands the file to the cache.
    pub(super) async fn on_layer_chunk(
        &mut self,
        chunk: pb::BlobChunk,
        tx: &mpsc::Sender<pb::WorkerMessage>,
        events: &mpsc::Sender<Event>,
    ) {
        let Some(c) = self.containers.as_mut() else {
            return;
        };
        let gzip = self
            .instances
            .values()
            .filter_map(|i| i.image.as_ref())
            .flat_map(|i| &i.layers)
            .find(|l| l.sha256 == chunk.sha256)
            .map(|l| l.gzip)
            .or_else(|| {
                self.tasks
                    .as_ref()
                    .and_then(|t| t.layer_gzip(&chunk.sha256))
            })
            .unwrap_or(false);
        match c.downloads.chunk(&chunk) {
            Progress::Partial => {}
            Progress::Failed(why) => {
                let why = format!("layer {}: {why}", chunk.sha256);
                self.task_layer_ready(&chunk.sha256, &Err(why.clone()), tx)
                    .await;
                self.layer_ready(&chunk.sha256, Err(why), tx).await;
            }
            Progress::Finished(path) => {
                let (layers, events, sha) =
                    (c.runtime.layers().clone(), events.clone(), chunk.sha256);
                tokio::task::spawn_blocking(move || {
                    let result = std::fs::File::open(&path)
                        .map_err(|e| format!("{}: {e}", path.display()))
                        .and_then(|f| {
                            layers
                                .unpack(std::io::BufReader::new(f), &sha, gzip)
                                .map(|_| ())
                                .map_err(|e| format!("layer {sha}: {e}"))
                        });
                    let _ = std::fs::remove_file(&path);
                    let _ = events.blocking_send(Event::LayerReady {
                        sha256: sha,
                        result,
                    });
                });
            }
        }
    }

    /// A layer is cached (instances with every layer now become ready) or failed (the
    /// instances waiting for it fail, with why).
    pub(super) async fn layer_ready(
        &mut self,
        sha: &str,
        result: Result<(), String>,
        tx: &mpsc::Sender<pb::WorkerMessage>,
    ) {
        let Some(c) = self.containers.as_ref() else {
            return;
        };
        let mut failed = Vec::new();
        for (id, i) in self
            .instances
            .iter_mut()
            .filter(|(_, i)| !i.ready && i.needs_layer(sha))
        {
            match &result {
                Ok(()) => {
                    let all = i.image.as_ref().is_some_and(|img| {
                        img.layers.iter().all(|l| c.runtime.layers().has(&l.sha256))
                    });
                    if all {
                        i.ready = true;
                        tracing::info!(allocation = id, function = %i.function, "container instance ready");
                        let _ = tx.send(update(*id, pb::AllocationState::Running, "")).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(allocation = id, function = %i.function, error = %e, "container instance failed to load");
                    let _ = tx.send(update(*id, pb::AllocationState::Failed, e)).await;
                    failed.push(*id);
                }
            }
        }
        for id in failed {
            self.instances.remove(&id);
        }
    }

    /// When the node's disk runs low, gives back cached layers that no instance here uses,
    /// least recently unpacked first, until [`LAYER_CACHE_FLOOR_MIB`] is free again: the
    /// device is someone's, and their disk comes first.
    pub(super) fn prune_layers(&self) {
        let Some(c) = self.containers.as_ref() else {
            return;
        };
        if u64::from(super::free_disk_mib(&self.cfg.data_dir)) >= LAYER_CACHE_FLOOR_MIB {
            return;
        }
        let mut used: HashSet<String> = self
            .instances
            .values()
            .filter_map(|i| i.image.as_ref())
            .flat_map(|i| i.layers.iter().map(|l| l.sha256.clone()))
            .collect();
        // And the layers of task attempts waiting or running here.
        used.extend(self.task_layers());
        // Inline, blocking this loop for a moment: it is rare, and a layer must not vanish
        // under an instance that starts meanwhile.
        for sha in c.runtime.layers().unused_oldest_first(&used) {
            if u64::from(super::free_disk_mib(&self.cfg.data_dir)) >= LAYER_CACHE_FLOOR_MIB {
                break;
            }
            match c.runtime.layers().remove(&sha) {
                Ok(()) => {
                    tracing::info!(layer = %sha, "disk low: unused layer removed from the cache")
                }
                Err(e) => {
                    tracing::warn!(layer = %sha, error = %e, "cannot remove a cached layer")
                }
            }
        }
    }

    /// Runs one call of a ready container instance on a task of its own.
    pub(super) async fn invoke_container(
        &mut self,
        inv: pb::Invocation,
        tx: &mpsc::Sender<pb::WorkerMessage>,
    ) {
        let refuse = |code: &str, msg: String| {
            result_message(pb::InvocationResult {
                invocation_id: inv.invocation_id.clone(),
                error_code: code.to_string(),
                error_message: msg,
                ..Default::default()
            })
        };
        let instance = self.instances.get(&inv.allocation).filter(|i| i.ready);
        let (Some(i), Some(c)) = (instance, self.containers.as_ref()) else {
            let why = format!("allocation {} is not running here", inv.allocation);
            let _ = tx.send(refuse("UNAVAILABLE", why)).await;
            return;
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            let why = "every sandbox slot is busy; retry on another instance".to_string();
            let _ = tx.send(refuse("RESOURCE_EXHAUSTED", why)).await;
            return;
        };
        let (runtime, image, limits) = (
            c.runtime.clone(),
            i.image.clone().unwrap_or_default(),
            i.limits,
        );
        let (settlement, tx, ticket) = (self.settlement.clone(), tx.clone(), inv.ticket.clone());
        let cheat = self.cheat.clone();
        tokio::spawn(async move {
            let call = ContainerCall {
                args: inv.args,
                env: inv.env.into_iter().map(|l| (l.key, l.value)).collect(),
                stdin: inv.stdin,
                ..Default::default()
            };
            let out = crate::container::invocation::invoke(&runtime, &image, &limits, call).await;
            drop(permit);
            // A slot on the stream first, so the result goes out under the receipt book's
            // lock, in chain order (see `settlement::finished`).
            let slot = tx.reserve().await;
            super::settlement::finished(
                (&settlement, &cheat),
                ticket,
                inv.invocation_id,
                &out.outcome.metering,
                &out.outcome.result,
                (out.stdout, out.stderr),
                |r| {
                    if let Ok(slot) = slot {
                        slot.send(result_message(r));
                    }
                },
            );
            if let Some(m) = cheat.forged(&settlement) {
                let _ = tx.send(m).await;
            }
        });
    }
}
