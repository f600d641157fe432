//! The agent's job task attempts: a `Task` waits until its image's layers are cached and
//! its inputs fetched (each checked against its sha256), runs once in the container sandbox
//! with its inputs at `/in` and an empty `/out`, and the files it wrote there go up the
//! stream, each hashed, before its result. The attempt and its files are kept until the
//! gateway says the result is committed (`TaskAck`): a stream that drops meanwhile gets
//! them again when the control plane re-sends the task on the next one.
//!
//! ```text
//!  Task ─▶ tasks/<key>/{in,out} ─ layers cached? inputs here? ─no─▶ FetchBlob… ─▶ ready
//!        └ ran already ─▶ send its outputs and result again
//!  ready ─▶ run (sandbox, limits, /in /out bound) ─▶ hash /out/* ─▶ TaskEvent::Done
//!  Done ─▶ TaskOutputChunk… per file ─▶ TaskResult         TaskAck / CancelTask ─▶ removed
//! ```

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use stellar_proto::job_spec::{MAX_OUTPUTS_PER_TASK, is_file_name};
use stellar_proto::v1 as pb;
use tokio::sync::mpsc;

use super::{Agent, Progress};
use crate::container::{ContainerCall, ContainerLimits, OutputStream};
use crate::sandbox::{InvokeError, Preopen};

/// A task attempt by (job, stage, task, attempt).
pub type TaskId = (u64, u32, u32, u32);

/// Bytes per output chunk on the stream.
const CHUNK: usize = 1 << 20;
/// Bytes of stderr kept for the result.
const STDERR_TAIL: usize = 2048;
/// The program's stdout and stderr, each, before it is stopped: tasks write files, not
/// streams (`-loglevel error` keeps ffmpeg well under it).
const TASK_OUTPUT_BYTES: u64 = 16 << 20;

fn id_of(k: &pb::TaskKey) -> TaskId {
    (k.job, k.stage, k.task, k.attempt)
}

fn key_of((job, stage, task, attempt): TaskId) -> pb::TaskKey {
    pb::TaskKey {
        job,
        stage,
        task,
        attempt,
    }
}

/// Where one attempt stands.
enum RunState {
    /// Layers or inputs still on their way (by sha256).
    Waiting {
        layers: HashSet<String>,
        inputs: HashSet<String>,
    },
    /// In the sandbox.
    Running(tokio::task::AbortHandle),
    /// Ended: its result (its outputs are in its `out` dir) until acknowledged.
    Done(Box<pb::TaskResult>),
}

struct Run {
    task: pb::Task,
    dir: PathBuf,
    state: RunState,
}

/// What finished work reports back to the agent (on a channel that outlives streams).
pub(super) enum TaskEvent {
    /// An input fetched and checked (or why not), at this path.
    Input {
        sha256: String,
        result: Result<PathBuf, String>,
    },
    /// An attempt ended.
    Done {
        id: TaskId,
        result: Box<pb::TaskResult>,
    },
}

/// The node's task attempts (see the module docs).
pub(super) struct TaskRuns {
    dir: PathBuf,
    inputs: crate::container::downloads::LayerDownloads,
    runs: HashMap<TaskId, Run>,
    events: mpsc::UnboundedSender<TaskEvent>,
}

impl TaskRuns {
    /// Attempts under `dir` (what an earlier process left there is removed: the control
    /// plane re-sends what still runs).
    pub(super) fn open(
        dir: &Path,
        events: mpsc::UnboundedSender<TaskEvent>,
    ) -> std::io::Result<TaskRuns> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        Ok(TaskRuns {
            inputs: crate::container::downloads::LayerDownloads::new(&dir.join("fetch"))?,
            dir: dir.to_path_buf(),
            runs: HashMap::new(),
            events,
        })
    }

    /// Whether an input fetch is under way for `sha`.
    pub(super) fn fetching(&self, sha: &str) -> bool {
        self.inputs.fetching(sha)
    }

    /// Fetches cut short by a stream that ended resume on the next one.
    pub(super) fn suspend(&mut self) {
        self.inputs.suspend();
    }

    /// Whether layer `sha` of a task's image is gzip-compressed (None: no task uses it).
    pub(super) fn layer_gzip(&self, sha: &str) -> Option<bool> {
        self.runs
            .values()
            .filter_map(|r| r.task.image.as_ref())
            .flat_map(|i| i.layers.iter())
            .find(|l| l.sha256 == sha)
            .map(|l| l.gzip)
    }
}

fn fetch_message(sha: String, offset: u64) -> pb::WorkerMessage {
    pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::FetchBlob(pb::FetchBlob {
            sha256: sha,
            offset,
        })),
    }
}

/// A result the node produced without running the program (its own fault: retried elsewhere).
fn node_fault(key: pb::TaskKey, code: &str, why: String) -> pb::TaskResult {
    pb::TaskResult {
        key: Some(key),
        error_code: code.to_string(),
        error_message: why,
        node_fault: true,
        ..Default::default()
    }
}

/// Opens an output the sandbox wrote, refusing what is not a regular file: a symlink (which
/// would make this root process read a host file of the sandbox's choosing), a FIFO (which
/// would block the open), a device. Checked on the opened file, so a swap after a listing
/// cannot slip one through.
fn open_output(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = open_output(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// The files a task wrote to `out`, hashed; anything but flat regular files with plain
/// names is the program's mistake.
fn collect_outputs(out: &Path) -> Result<Vec<pb::BlobRef>, String> {
    let mut refs = Vec::new();
    let entries = std::fs::read_dir(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for e in entries {
        let e = e.map_err(|e| e.to_string())?;
        let name = e.file_name().to_string_lossy().into_owned();
        let meta = e.metadata().map_err(|e| format!("{name}: {e}"))?;
        if !meta.is_file() || !is_file_name(&name) {
            return Err(format!(
                "/out/{name} is not a regular file with a plain name (A-Z a-z 0-9 . _ -)"
            ));
        }
        if refs.len() >= MAX_OUTPUTS_PER_TASK {
            return Err(format!(
                "wrote more than {MAX_OUTPUTS_PER_TASK} files to /out"
            ));
        }
        let (sha256, size) = sha256_file(&e.path()).map_err(|e| format!("{name}: {e}"))?;
        refs.push(pb::BlobRef { name, sha256, size });
    }
    refs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(refs)
}

/// Gives the container's root (an unprivileged host uid) the task's directories.
fn hand_over(path: &Path, (uid, gid): (u32, u32)) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Whether a failure is the node's (retried elsewhere) rather than the program's.
fn is_node_fault(e: &InvokeError) -> bool {
    // A deadline on a home node says as much about the node as about the program.
    matches!(
        e,
        InvokeError::Sandbox(_)
            | InvokeError::DeadlineExceeded { .. }
            | InvokeError::ImageInvalid(_)
    )
}

impl Agent {
    /// A task attempt to run (or one this node ran: its result goes out again).
    pub(super) async fn on_task(&mut self, t: pb::Task, tx: &mpsc::Sender<pb::WorkerMessage>) {
        let key = t.key.unwrap_or_default();
        let id = id_of(&key);
        let Some(runs) = self.tasks.as_mut() else {
            let why = "this node cannot run containers".to_string();
            let _ = tx
                .send(result_message(node_fault(key, "SANDBOX_FAILED", why)))
                .await;
            return;
        };
        if let Some(run) = runs.runs.get(&id) {
            match &run.state {
                RunState::Done(r) => {
                    let (r, dir) = ((**r).clone(), run.dir.join("out"));
                    tokio::spawn(send_result(r, dir, tx.clone()));
                }
                RunState::Waiting { layers, inputs } => {
                    // A new stream: fetches cut short by the old one start again.
                    let (layers, inputs) = (layers.clone(), inputs.clone());
                    self.fetch_for_task(&layers, &inputs, tx).await;
                }
                RunState::Running(_) => {}
            }
            return;
        }
        let dir = runs
            .dir
            .join(format!("{}-{}-{}-{}", id.0, id.1, id.2, id.3));
        // Names become paths under in/: only plain file names (the control plane checks too).
        if let Some(b) = t.inputs.iter().find(|b| !is_file_name(&b.name)) {
            let why = format!("input name {:?} is not a plain file name", b.name);
            let _ = tx
                .send(result_message(node_fault(key, "INPUT_UNAVAILABLE", why)))
                .await;
            return;
        }
        let Some(c) = self.containers.as_ref() else {
            return;
        };
        let owner = c.runtime.host_ids();
        let made = (|| {
            std::fs::create_dir_all(dir.join("in"))?;
            std::fs::create_dir_all(dir.join("out"))?;
            Ok::<_, std::io::Error>(())
        })()
        .map_err(|e| format!("{}: {e}", dir.display()))
        .and_then(|_| hand_over(&dir.join("out"), owner))
        .and_then(|_| hand_over(&dir.join("in"), owner));
        if let Err(why) = made {
            let _ = tx
                .send(result_message(node_fault(key, "SANDBOX_FAILED", why)))
                .await;
            return;
        }
        let image = t.image.clone().unwrap_or_default();
        let layers: HashSet<String> = image
            .layers
            .iter()
            .filter(|l| !c.runtime.layers().has(&l.sha256))
            .map(|l| l.sha256.clone())
            .collect();
        let inputs: HashSet<String> = t.inputs.iter().map(|b| b.sha256.clone()).collect();
        tracing::info!(
            task = ?id,
            job = %t.job,
            layers_missing = layers.len(),
            inputs = inputs.len(),
            "task attempt received"
        );
        let runs = self.tasks.as_mut().expect("checked above");
        runs.runs.insert(
            id,
            Run {
                task: t,
                dir,
                state: RunState::Waiting {
                    layers: layers.clone(),
                    inputs: inputs.clone(),
                },
            },
        );
        if !layers.is_empty() {
            self.prune_layers();
        }
        self.fetch_for_task(&layers, &inputs, tx).await;
        self.start_ready_tasks(tx).await;
    }

    /// Asks for the layers and inputs not on their way yet.
    async fn fetch_for_task(
        &mut self,
        layers: &HashSet<String>,
        inputs: &HashSet<String>,
        tx: &mpsc::Sender<pb::WorkerMessage>,
    ) {
        let mut asks = Vec::new();
        if let Some(c) = self.containers.as_mut() {
            for sha in layers {
                if c.runtime.layers().has(sha) || c.downloads.fetching(sha) {
                    continue;
                }
                if let Ok(Some(offset)) = c.downloads.start(sha) {
                    asks.push(fetch_message(sha.clone(), offset));
                }
            }
        }
        if let Some(runs) = self.tasks.as_mut() {
            for sha in inputs {
                if runs.inputs.fetching(sha) {
                    continue;
                }
                if let Ok(Some(offset)) = runs.inputs.start(sha) {
                    asks.push(fetch_message(sha.clone(), offset));
                }
            }
        }
        for m in asks {
            let _ = tx.send(m).await;
        }
    }

    /// One chunk of a task input; the last hands the file to a check of its sha256.
    pub(super) fn on_input_chunk(&mut self, chunk: &pb::BlobChunk) {
        let Some(runs) = self.tasks.as_mut() else {
            return;
        };
        match runs.inputs.chunk(chunk) {
            Progress::Partial => {}
            Progress::Failed(why) => {
                let _ = runs.events.send(TaskEvent::Input {
                    sha256: chunk.sha256.clone(),
                    result: Err(why),
                });
            }
            Progress::Finished(path) => {
                let (events, sha) = (runs.events.clone(), chunk.sha256.clone());
                tokio::task::spawn_blocking(move || {
                    let result = match sha256_file(&path) {
                        Ok((got, _)) if got == sha => Ok(path),
                        Ok((got, _)) => {
                            let _ = std::fs::remove_file(&path);
                            Err(format!("input {sha} arrived with sha256 {got}"))
                        }
                        Err(e) => Err(format!("{}: {e}", path.display())),
                    };
                    let _ = events.send(TaskEvent::Input {
                        sha256: sha,
                        result,
                    });
                });
            }
        }
    }

    /// A layer was cached (or failed): attempts waiting for it may start, or fail.
    pub(super) async fn task_layer_ready(
        &mut self,
        sha: &str,
        result: &Result<(), String>,
        tx: &mpsc::Sender<pb::WorkerMessage>,
    ) {
        let Some(runs) = self.tasks.as_mut() else {
            return;
        };
        let mut failed = Vec::new();
        for (id, run) in &mut runs.runs {
            if let RunState::Waiting { layers, .. } = &mut run.state
                && layers.remove(sha)
                && let Err(e) = result
            {
                failed.push((*id, e.clone()));
            }
        }
        for (id, why) in failed {
            self.end_task(id, node_fault(key_of(id), "IMAGE_INVALID", why), tx)
                .await;
        }
        self.start_ready_tasks(tx).await;
    }

    /// A task event: an input is here (copied into each attempt waiting for it), or an
    /// attempt ended (its outputs and result go out).
    pub(super) async fn on_task_event(
        &mut self,
        ev: TaskEvent,
        tx: &mpsc::Sender<pb::WorkerMessage>,
    ) {
        match ev {
            TaskEvent::Input { sha256, result } => {
                let Some(runs) = self.tasks.as_mut() else {
                    return;
                };
                let owner = self
                    .containers
                    .as_ref()
                    .map(|c| c.runtime.host_ids())
                    .unwrap_or((0, 0));
                let mut failed = Vec::new();
                for (id, run) in &mut runs.runs {
                    let RunState::Waiting { inputs, .. } = &mut run.state else {
                        continue;
                    };
                    if !inputs.remove(&sha256) {
                        continue;
                    }
                    let placed = result.as_ref().map_err(Clone::clone).and_then(|src| {
                        for b in run.task.inputs.iter().filter(|b| b.sha256 == sha256) {
                            let to = run.dir.join("in").join(&b.name);
                            std::fs::copy(src, &to)
                                .map_err(|e| format!("{}: {e}", to.display()))?;
                            hand_over(&to, owner)?;
                        }
                        Ok(())
                    });
                    if let Err(why) = placed {
                        failed.push((*id, why));
                    }
                }
                if let Ok(p) = &result {
                    let _ = std::fs::remove_file(p);
                }
                for (id, why) in failed {
                    let why = format!("input {sha256}: {why}");
                    self.end_task(id, node_fault(key_of(id), "INPUT_UNAVAILABLE", why), tx)
                        .await;
                }
                self.start_ready_tasks(tx).await;
            }
            TaskEvent::Done { id, result } => {
                tracing::info!(task = ?id, error = %result.error_code, outputs = result.outputs.len(), "task attempt ended");
                self.end_task(id, *result, tx).await;
            }
        }
    }

    /// Records an attempt's result and sends it (outputs first).
    async fn end_task(
        &mut self,
        id: TaskId,
        result: pb::TaskResult,
        tx: &mpsc::Sender<pb::WorkerMessage>,
    ) {
        let Some(run) = self.tasks.as_mut().and_then(|r| r.runs.get_mut(&id)) else {
            return;
        };
        run.state = RunState::Done(Box::new(result.clone()));
        tokio::spawn(send_result(result, run.dir.join("out"), tx.clone()));
    }

    /// Starts every attempt whose layers and inputs are all here.
    async fn start_ready_tasks(&mut self, _tx: &mpsc::Sender<pb::WorkerMessage>) {
        let (Some(runs), Some(c)) = (self.tasks.as_mut(), self.containers.as_ref()) else {
            return;
        };
        let ready: Vec<TaskId> = runs
            .runs
            .iter()
            .filter(|(_, r)| {
                matches!(&r.state, RunState::Waiting { layers, inputs } if layers.is_empty() && inputs.is_empty())
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            let run = runs.runs.get_mut(&id).expect("listed");
            let t = run.task.clone();
            let limits = t.limits.unwrap_or_default();
            let call = ContainerCall {
                args: t.argv.clone(),
                env: t
                    .env
                    .iter()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                stdin: Vec::new(),
                dirs: vec![
                    Preopen {
                        host: run.dir.join("in"),
                        guest: "/in".into(),
                    },
                    Preopen {
                        host: run.dir.join("out"),
                        guest: "/out".into(),
                    },
                ],
                limits: ContainerLimits {
                    max_output_bytes: TASK_OUTPUT_BYTES,
                    ..crate::container::invocation::limits(&limits)
                },
            };
            let (runtime, events, out) =
                (c.runtime.clone(), runs.events.clone(), run.dir.join("out"));
            let who = (
                t.tenant.clone(),
                format!("job/{}", t.job),
                self.identity.node(),
            );
            let image = t.image.clone().unwrap_or_default();
            let key = t.key.unwrap_or_default();
            let handle = tokio::spawn(async move {
                let config = crate::container::invocation::image_config(&image);
                let layers: Vec<String> = image.layers.iter().map(|l| l.sha256.clone()).collect();
                let mut stderr: Vec<u8> = Vec::new();
                let mut sink = |s: OutputStream, d: &[u8]| {
                    if s == OutputStream::Stderr {
                        stderr.extend_from_slice(d);
                        if stderr.len() > 4 * STDERR_TAIL {
                            stderr.drain(..stderr.len() - STDERR_TAIL);
                        }
                    }
                };
                let outcome = runtime.run_cached(&config, &layers, call, &mut sink).await;
                let m = outcome.metering;
                let tail = stderr[stderr.len().saturating_sub(STDERR_TAIL)..].to_vec();
                let collected = match &outcome.result {
                    Ok(()) => tokio::task::spawn_blocking(move || collect_outputs(&out))
                        .await
                        .unwrap_or_else(|e| Err(e.to_string())),
                    Err(_) => Ok(Vec::new()),
                };
                let usage = pb::UsageRecord {
                    invocation_id: Vec::new(),
                    tenant: who.0,
                    function: who.1,
                    node: who.2,
                    fuel: 0,
                    wall_us: m.wall_us,
                    peak_memory_bytes: m.peak_memory_bytes,
                    bytes_in: 0,
                    bytes_out: collected
                        .as_ref()
                        .map_or(0, |o| o.iter().map(|b| b.size).sum()),
                    exit_code: m.exit_code,
                    cpu_ns: m.cpu_ns,
                    pids_peak: m.pids_peak.min(u64::from(u32::MAX)) as u32,
                    ..Default::default()
                };
                let mut result = pb::TaskResult {
                    key: Some(key),
                    exit_code: m.exit_code,
                    stderr_tail: tail,
                    usage: Some(usage),
                    ..Default::default()
                };
                match (outcome.result, collected) {
                    (Ok(()), Ok(outputs)) => result.outputs = outputs,
                    (Ok(()), Err(why)) => {
                        result.error_code = "OUTPUT_INVALID".into();
                        result.error_message = why;
                    }
                    (Err(e), _) => {
                        result.node_fault = is_node_fault(&e);
                        result.error_code = e.code().to_string();
                        result.error_message = e.to_string();
                    }
                }
                let _ = events.send(TaskEvent::Done {
                    id,
                    result: Box::new(result),
                });
            });
            tracing::info!(task = ?id, job = %t.job, argv0 = %t.argv.first().map(String::as_str).unwrap_or(""), "task attempt started");
            run.state = RunState::Running(handle.abort_handle());
        }
    }

    /// Stops an attempt (another won, or its job ended) and forgets it and its files.
    pub(super) fn cancel_task(&mut self, key: &pb::TaskKey) {
        self.forget_task(id_of(key), "cancelled");
    }

    /// Keeps only the attempts in `set` (what the control plane says this node holds).
    pub(super) fn keep_tasks(&mut self, set: &[pb::TaskKey]) {
        let keep: HashSet<TaskId> = set.iter().map(id_of).collect();
        let gone: Vec<TaskId> = self
            .tasks
            .as_ref()
            .map(|r| {
                r.runs
                    .keys()
                    .filter(|id| !keep.contains(id))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        for id in gone {
            self.forget_task(id, "ended while this node was away");
        }
    }

    /// Layers the node's task attempts use (kept when the disk runs low).
    pub(super) fn task_layers(&self) -> Vec<String> {
        self.tasks
            .as_ref()
            .map(|r| {
                r.runs
                    .values()
                    .filter_map(|run| run.task.image.as_ref())
                    .flat_map(|i| i.layers.iter().map(|l| l.sha256.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Its result is committed (or refused): forget it and its files.
    pub(super) fn task_acked(&mut self, ack: &pb::TaskAck) {
        if !ack.error.is_empty() {
            tracing::warn!(task = ?ack.key.as_ref().map(id_of), reason = %ack.error, "task result refused by the control plane");
        }
        if let Some(k) = &ack.key {
            self.forget_task(id_of(k), "acknowledged");
        }
    }

    fn forget_task(&mut self, id: TaskId, why: &str) {
        let Some(run) = self.tasks.as_mut().and_then(|r| r.runs.remove(&id)) else {
            return;
        };
        if let RunState::Running(h) = &run.state {
            // Dropping the run kills every process in its cgroup.
            h.abort();
        }
        tracing::info!(task = ?id, "task attempt {why}");
        let dir = run.dir;
        tokio::task::spawn_blocking(move || {
            // A run being torn down may still hold the dirs for a moment.
            for _ in 0..50 {
                if std::fs::remove_dir_all(&dir).is_ok() || !dir.exists() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            tracing::warn!(dir = %dir.display(), "task dir left behind");
        });
    }
}

fn result_message(r: pb::TaskResult) -> pb::WorkerMessage {
    pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::TaskResult(r)),
    }
}

/// Sends an attempt's output files (chunk by chunk, in order) and then its result.
async fn send_result(r: pb::TaskResult, out: PathBuf, tx: mpsc::Sender<pb::WorkerMessage>) {
    let key = r.key.unwrap_or_default();
    let mut result = r;
    for b in result.outputs.clone() {
        let path = out.join(&b.name);
        let opened = tokio::task::spawn_blocking({
            let path = path.clone();
            move || open_output(&path)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        let mut f = match opened.map(tokio::fs::File::from_std) {
            Ok(f) => f,
            Err(e) => {
                result.error_code = "OUTPUT_LOST".into();
                result.error_message = format!("{}: {e}", path.display());
                result.node_fault = true;
                result.outputs.clear();
                break;
            }
        };
        let mut offset = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match tokio::io::AsyncReadExt::read(&mut f, &mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    // The store refuses the short blob; the result says why.
                    result.error_code = "OUTPUT_LOST".into();
                    result.error_message = format!("{}: {e}", path.display());
                    result.node_fault = true;
                    0
                }
            };
            buf.truncate(n);
            let last = offset + n as u64 >= b.size || n == 0;
            let msg = pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::TaskOutput(pb::TaskOutputChunk {
                    key: Some(key),
                    chunk: Some(pb::BlobChunk {
                        sha256: b.sha256.clone(),
                        size: b.size,
                        offset,
                        data: buf,
                        last,
                        error: String::new(),
                    }),
                })),
            };
            if tx.send(msg).await.is_err() {
                return; // the stream ended: the next one re-sends the task
            }
            offset += n as u64;
            if last {
                break;
            }
        }
    }
    let _ = tx.send(result_message(result)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_only_regular_files_never_followed_links() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::write(out.join("b.txt"), b"bee").unwrap();
        std::fs::write(out.join("a.txt"), b"ay").unwrap();
        let refs = collect_outputs(out).unwrap();
        let names: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a.txt", "b.txt"]);
        assert_eq!(refs[0].sha256, hex::encode(Sha256::digest(b"ay")));
        assert_eq!(refs[1].size, 3);

        // A link to a host file is refused by the listing and by the open itself (a swap
        // after the listing), so the host file is never read.
        let secret = dir.path().join("..").join("host-secret");
        std::os::unix::fs::symlink(&secret, out.join("c.txt")).unwrap();
        let e = collect_outputs(out).unwrap_err();
        assert!(e.contains("c.txt"), "{e}");
        assert!(open_output(&out.join("c.txt")).is_err());
        std::fs::remove_file(out.join("c.txt")).unwrap();

        // A FIFO neither hangs the worker nor passes.
        nix::unistd::mkfifo(&out.join("d.txt"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(collect_outputs(out).is_err());
        assert!(open_output(&out.join("d.txt")).is_err());
    }
}
