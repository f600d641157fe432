//! The worker's connection to the control plane: it dials out (the control plane never
//! connects to a home node), registers with a signed identity, follows leader hints,
//! reconnects with jittered exponential backoff, and serves assignments and invocations
//! over one bidirectional `Agent.Attach` stream.
//!
//! ```text
//!  connect(addr) ─Register(node, key, attrs, signature)─▶ Registered | NotLeader(hint)
//!  loop select:
//!    Assignment start ─▶ module loaded? ─no─▶ FetchModule ─▶ ModuleChunk.. ─▶ compile
//!                     ─▶ AllocationUpdate RUNNING (or STOPPED + why)
//!    Invocation       ─▶ blocking thread: Sandbox::invoke ─▶ InvocationResult + UsageRecord
//!    every heartbeat  ─▶ Heartbeat(free, running, coordinate, seq) ◀─ HeartbeatAck: RTT ─▶ Vivaldi
//!    every second     ─▶ UsageReport (batched)
//!    Task             ─▶ layers + inputs fetched ─▶ container run ─▶ outputs up ─▶ TaskResult
//!    SIGTERM          ─▶ Draining, refuse new invocations, finish in-flight (bounded), flush
//! ```

mod cheats;
mod container_instances;
mod settlement;
mod task_runs;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use stellar_placement::{
    Coordinate, LATENCY_FILTER_WINDOW, LatencyFilter, VivaldiConfig, VivaldiNode,
};
use stellar_proto::v1 as pb;
use stellar_proto::v1::agent_client::AgentClient;
use tokio::sync::{Semaphore, mpsc};
use tonic::Status;

use crate::container::ContainerRuntime;
use crate::container::downloads::{LayerDownloads, Progress};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::sandbox::{InvocationInput, InvocationLimits, Sandbox, SandboxConfig};

/// How a worker joins and what it offers.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Control-plane replicas to dial (any one will do; leader hints are followed).
    pub join: Vec<String>,
    /// The cluster's join token.
    pub token: String,
    /// Identity, compiled-module cache and scratch space live here.
    pub data_dir: PathBuf,
    /// Region and zone the node reports (placement and latency estimates use them).
    pub region: String,
    /// Zone within the region.
    pub zone: String,
    /// Free-form labels for placement constraints.
    pub labels: Vec<(String, String)>,
    /// What the node offers (None: all cores and 3/4 of memory).
    pub capacity: Option<pb::Resources>,
    /// Sandbox sizing (its cache dir is set under `data_dir`).
    pub sandbox: SandboxConfig,
    /// How long a drain waits for in-flight invocations.
    pub drain_timeout: Duration,
    /// Offer to run container functions when the device can (root, overlayfs, user
    /// namespaces, cgroups): checked at start, and registered as the `container` runtime.
    pub containers: bool,
}

/// Why a session with one replica ended.
enum Ended {
    /// Shutdown was asked for and the drain is done.
    Shutdown,
    /// Not the leader: try this address (empty: unknown).
    Redirect(String),
    /// The connection failed or dropped; back off and retry.
    Lost(String),
    /// The control plane refused this worker for a reason retrying will not fix.
    Refused(String),
}

/// One instance (allocation) this worker runs.
struct Instance {
    tenant: String,
    function: String,
    /// The module's content address (empty for a container function).
    sha256: String,
    limits: pb::FunctionLimits,
    ready: bool,
    /// A container function's image (its layers in the node's layer cache once ready).
    image: Option<pb::ContainerImage>,
}

impl Instance {
    /// Whether it waits for layer `sha`.
    fn needs_layer(&self, sha: &str) -> bool {
        self.image
            .as_ref()
            .is_some_and(|i| i.layers.iter().any(|l| l.sha256 == sha))
    }
}

/// The node's container runtime and the layers on their way to it.
struct Containers {
    runtime: ContainerRuntime,
    downloads: LayerDownloads,
}

/// Worker state that survives reconnects.
struct Agent {
    cfg: AgentConfig,
    identity: Identity,
    sandbox: Arc<Sandbox>,
    attributes: pb::NodeAttributes,
    instances: HashMap<u64, Instance>,
    vivaldi: VivaldiNode,
    vivaldi_cfg: VivaldiConfig,
    /// Per-gateway moving median of RTT samples (Serf's latency filter).
    rtts: LatencyFilter<String>,
    /// Every gateway this worker knows: `--join`, then those its gateways named.
    gateways: Vec<String>,
    /// The gateway of the current stream.
    current: String,
    /// Connections for RTT probes, one per gateway probed (made once, reused).
    probes: HashMap<String, tonic::transport::Channel>,
    rng: rand_pcg::Pcg64,
    slots: Arc<Semaphore>,
    /// The receipt book and the receipts not yet settled.
    settlement: Arc<Mutex<settlement::Settlement>>,
    /// Nothing, except in a cheating test build.
    cheat: Arc<cheats::Cheater>,
    /// None: this node does not run containers (switched off, or it cannot).
    containers: Option<Containers>,
    /// Job task attempts (None without containers).
    tasks: Option<task_runs::TaskRuns>,
    /// What task runs and input checks report (outlives each stream).
    task_events: mpsc::UnboundedReceiver<task_runs::TaskEvent>,
}

/// Runs the worker until `shutdown` resolves (then drains) or it is refused for good.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    if cfg.join.is_empty() {
        return Err(Error::Control(
            "--join needs at least one control-plane address".into(),
        ));
    }
    let identity = Identity::load_or_create(&cfg.data_dir)?;
    let book =
        crate::receipts::ReceiptBook::open(&cfg.data_dir.join("receipts"), identity.clone())?;
    let mut sandbox_cfg = cfg.sandbox.clone();
    sandbox_cfg.cache_dir = Some(cfg.data_dir.join("artefacts"));
    let slots = sandbox_cfg.slots as usize;
    let sandbox = Arc::new(
        tokio::task::spawn_blocking(move || Sandbox::new(sandbox_cfg))
            .await
            .map_err(|e| Error::Config(format!("sandbox start panicked: {e}")))??,
    );
    tracing::info!(
        node = format!("{:016x}", identity.node()),
        data_dir = %cfg.data_dir.display(),
        "worker identity loaded"
    );
    let containers = if cfg.containers {
        open_containers(&cfg.data_dir).await
    } else {
        tracing::info!("containers switched off (--containers false): wasm functions only");
        None
    };
    let attributes = attributes(&cfg, containers.is_some());
    let vivaldi_cfg = VivaldiConfig::default();
    let (task_events_tx, task_events) = mpsc::unbounded_channel();
    let tasks = match &containers {
        Some(_) => Some(
            task_runs::TaskRuns::open(&cfg.data_dir.join("tasks"), task_events_tx).map_err(
                |e| Error::Config(format!("{}: {e}", cfg.data_dir.join("tasks").display())),
            )?,
        ),
        None => None,
    };
    let mut agent = Agent {
        rng: rand_pcg::Pcg64::seed_from_u64(identity.node()),
        vivaldi: VivaldiNode::new(&vivaldi_cfg),
        vivaldi_cfg,
        rtts: LatencyFilter::new(LATENCY_FILTER_WINDOW, MAX_KNOWN_GATEWAYS),
        gateways: cfg.join.clone(),
        current: String::new(),
        probes: HashMap::new(),
        identity,
        sandbox,
        attributes,
        instances: HashMap::new(),
        slots: Arc::new(Semaphore::new(slots)),
        settlement: Arc::new(Mutex::new(settlement::Settlement::open(book)?)),
        cheat: Arc::new(cheats::Cheater::from_env()),
        containers,
        tasks,
        task_events,
        cfg,
    };
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    let mut hint: Option<String> = None;
    // Workers of a fleet share one --join list: each starts at its own place in it, so a
    // restart of every device (or a dead gateway) does not send them all to the first one.
    let mut next = agent.rng.random_range(0..agent.gateways.len());
    loop {
        let addr = hint.take().unwrap_or_else(|| {
            let a = agent.gateways[next % agent.gateways.len()].clone();
            next += 1;
            a
        });
        let (ended, registered) = agent.session(&addr, &mut shutdown).await;
        if registered {
            backoff = Duration::from_millis(100);
        }
        match ended {
            Ended::Shutdown => return Ok(()),
            Ended::Refused(why) => return Err(Error::Control(why)),
            Ended::Redirect(to) => {
                tracing::info!(from = %addr, to = %to, "not the leader; following the hint");
                if !to.is_empty() {
                    hint = Some(to);
                }
                // A hint-less redirect (election in progress) waits a little.
                let pause = Duration::from_millis(if hint.is_some() { 20 } else { 200 });
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = &mut shutdown => return Ok(()),
                }
            }
            Ended::Lost(why) => {
                // Full jitter: a fleet of workers must not reconnect in lockstep.
                let wait = backoff.mul_f64(agent.rng.random_range(0.5..1.0));
                tracing::warn!(%addr, error = %why, retry_in_ms = wait.as_millis() as u64, "control plane unreachable");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut shutdown => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Gateways a worker remembers (from `--join` and what its gateways told it).
const MAX_KNOWN_GATEWAYS: usize = 64;
/// A probe answered later than this is a fault, not a sample.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The container runtime, when this device can run containers (why not is logged).
async fn open_containers(data_dir: &std::path::Path) -> Option<Containers> {
    let dir = data_dir.join("containers");
    let opened = tokio::task::spawn_blocking(move || {
        crate::container::capability()?;
        let runtime = ContainerRuntime::open(&dir)?;
        let downloads = LayerDownloads::new(&dir.join("fetch"))
            .map_err(|e| format!("{}: {e}", dir.join("fetch").display()))?;
        Ok::<_, String>(Containers { runtime, downloads })
    })
    .await;
    match opened {
        Ok(Ok(c)) => {
            tracing::info!(
                layers = c.runtime.layers().list().len(),
                "containers available: registering the container runtime"
            );
            Some(c)
        }
        Ok(Err(why)) => {
            tracing::warn!(reason = %why, "this device cannot run containers: wasm functions only");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "container check panicked: wasm functions only");
            None
        }
    }
}

/// Messages from tasks the session spawned.
enum Event {
    Loaded {
        sha256: String,
        result: std::result::Result<(), String>,
    },
    /// A layer fetched over the stream was unpacked into the cache (or why not).
    LayerReady {
        sha256: String,
        result: std::result::Result<(), String>,
    },
    /// An RTT sample to a gateway this worker is not attached to.
    Probed {
        gateway: String,
        rtt_ms: f64,
        coordinate: pb::Coordinate,
    },
}

impl Agent {
    async fn session(
        &mut self,
        addr: &str,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> (Ended, bool) {
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = match tonic::transport::Endpoint::from_shared(url) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5)),
            Err(e) => return (Ended::Refused(format!("bad address `{addr}`: {e}")), false),
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => return (Ended::Lost(format!("connect: {e}")), false),
        };
        let mut client = AgentClient::new(channel)
            .max_decoding_message_size(32 << 20)
            .max_encoding_message_size(32 << 20);
        // A fresh nonce from this gateway, signed into the registration (no replay).
        let nonce = match client.challenge(pb::ChallengeRequest {}).await {
            Ok(r) => r.into_inner().nonce,
            Err(s) => return (ended_by(s), false),
        };
        let (tx, rx) = mpsc::channel::<pb::WorkerMessage>(256);
        let register = pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Register(pb::Register {
                node: self.identity.node(),
                public_key: self.identity.public_key().to_vec(),
                attributes: Some(self.attributes.clone()),
                signature: self
                    .identity
                    .sign_registration(&self.cfg.token, &nonce)
                    .to_vec(),
                join_token: self.cfg.token.clone(),
                nonce,
            })),
        };
        let _ = tx.send(register).await;
        let mut inbound = match client
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return (ended_by(s), false),
        };
        let heartbeat_ms = match inbound.message().await {
            Ok(Some(pb::ControlMessage {
                kind: Some(pb::control_message::Kind::Registered(r)),
            })) => {
                for g in r.gateways {
                    if !self.gateways.contains(&g) && self.gateways.len() < MAX_KNOWN_GATEWAYS {
                        self.gateways.push(g);
                    }
                }
                r.heartbeat_ms.max(50)
            }
            Ok(Some(pb::ControlMessage {
                kind: Some(pb::control_message::Kind::Redirect(r)),
            })) => {
                tracing::info!(from = %addr, to = %r.gateway, reason = %r.reason, "gateway redirected this worker");
                return (Ended::Redirect(r.gateway), false);
            }
            Ok(Some(pb::ControlMessage {
                kind: Some(pb::control_message::Kind::NotLeader(n)),
            })) => return (Ended::Redirect(n.leader_address), false),
            Ok(_) => return (Ended::Lost("stream closed before Registered".into()), false),
            Err(s) => return (ended_by(s), false),
        };
        tracing::info!(
            %addr,
            node = format!("{:016x}", self.identity.node()),
            "registered with the control plane"
        );
        self.current = addr.to_string();
        // Whatever usage the last connection left unacknowledged goes out first.
        self.flush_usage(&tx, true).await;
        // Instances survive a reconnect, but the control plane re-sends what this node
        // should run; until then nothing is reported ready.
        for i in self.instances.values_mut() {
            i.ready = false;
        }
        // Layers half fetched over the last stream resume when reassigned.
        if let Some(c) = self.containers.as_mut() {
            c.downloads.suspend();
        }
        if let Some(t) = self.tasks.as_mut() {
            t.suspend();
        }
        let (events_tx, mut events) = mpsc::channel::<Event>(256);
        let mut fetching: HashMap<String, Vec<u8>> = HashMap::new();
        let mut heartbeat = tokio::time::interval(Duration::from_millis(u64::from(heartbeat_ms)));
        let mut usage_tick = tokio::time::interval(Duration::from_secs(1));
        // One RTT probe per keepalive period to another gateway, round robin: the coordinate
        // learns from several peers, not just the gateway of the stream.
        let mut probe = tokio::time::interval(Duration::from_millis(u64::from(heartbeat_ms)));
        let mut probe_next = 0usize;
        let mut seq = 0u64;
        let mut sent_at: HashMap<u64, Instant> = HashMap::new();
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        if let Some(kind) = m.kind
                            && let Some(end) = self.on_message(kind, &tx, &events_tx, &mut fetching, &mut sent_at).await
                        {
                            return (end, true);
                        }
                    }
                    Ok(None) => return (Ended::Lost("the control plane closed the stream".into()), true),
                    Err(s) => return (ended_by(s), true),
                },
                Some(ev) = events.recv() => self.on_event(ev, &tx).await,
                Some(ev) = self.task_events.recv() => self.on_task_event(ev, &tx).await,
                _ = heartbeat.tick() => {
                    seq += 1;
                    sent_at.insert(seq, crate::clock::now());
                    sent_at.retain(|s, _| *s + 16 > seq);
                    let _ = tx.send(self.heartbeat(seq)).await;
                }
                _ = usage_tick.tick() => self.flush_usage(&tx, false).await,
                _ = probe.tick() => {
                    let others: Vec<&String> =
                        self.gateways.iter().filter(|g| **g != self.current).collect();
                    if !others.is_empty() {
                        let g = others[probe_next % others.len()].clone();
                        probe_next = probe_next.wrapping_add(1);
                        self.probe(g, events_tx.clone());
                    }
                }
                _ = shutdown.as_mut() => {
                    self.drain(&tx, &mut events).await;
                    return (Ended::Shutdown, true);
                }
            }
        }
    }

    /// Stops instance `allocation` (unloading its module when no other instance uses it).
    async fn stop(&mut self, allocation: u64, tx: &mpsc::Sender<pb::WorkerMessage>) {
        if let Some(i) = self.instances.remove(&allocation) {
            tracing::info!(allocation, function = %i.function, "instance stopped");
            // Layers stay cached for the next function that uses them, while the disk allows.
            if i.image.is_some() {
                self.prune_layers();
            } else if !self.instances.values().any(|o| o.sha256 == i.sha256) {
                self.sandbox.unload(&i.sha256);
            }
        }
        let _ = tx
            .send(update(allocation, pb::AllocationState::Stopped, ""))
            .await;
    }

    async fn on_message(
        &mut self,
        kind: pb::control_message::Kind,
        tx: &mpsc::Sender<pb::WorkerMessage>,
        events: &mpsc::Sender<Event>,
        fetching: &mut HashMap<String, Vec<u8>>,
        sent_at: &mut HashMap<u64, Instant>,
    ) -> Option<Ended> {
        use pb::control_message::Kind;
        match kind {
            Kind::Registered(_) => {}
            Kind::NotLeader(n) => return Some(Ended::Redirect(n.leader_address)),
            Kind::Redirect(r) => return Some(Ended::Redirect(r.gateway)),
            Kind::Assignment(a) if a.start => self.start(a, tx, events, fetching).await,
            Kind::Assignment(a) => self.stop(a.allocation, tx).await,
            Kind::AssignmentSet(set) => {
                // Instances removed while this node was away are not in the set: stop them.
                let keep: std::collections::HashSet<u64> = set.allocations.into_iter().collect();
                let gone: Vec<u64> = self
                    .instances
                    .keys()
                    .copied()
                    .filter(|id| !keep.contains(id))
                    .collect();
                for id in gone {
                    self.stop(id, tx).await;
                }
                // Task attempts that ended while this node was away are dropped too.
                self.keep_tasks(&set.tasks);
            }
            Kind::ModuleChunk(c) => {
                if !c.error.is_empty() {
                    fetching.remove(&c.sha256);
                    let _ = events
                        .send(Event::Loaded {
                            sha256: c.sha256,
                            result: Err(c.error),
                        })
                        .await;
                    return None;
                }
                let buf = fetching.entry(c.sha256.clone()).or_default();
                if c.offset as usize != buf.len() {
                    fetching.remove(&c.sha256);
                    return Some(Ended::Lost("module chunks out of order".into()));
                }
                buf.extend_from_slice(&c.data);
                if c.last {
                    let bytes = fetching.remove(&c.sha256).unwrap_or_default();
                    let (sandbox, events, sha) = (self.sandbox.clone(), events.clone(), c.sha256);
                    tokio::task::spawn_blocking(move || {
                        let result = sandbox
                            .load(&sha, &bytes)
                            .map(|_| ())
                            .map_err(|e| e.to_string());
                        let _ = events.blocking_send(Event::Loaded {
                            sha256: sha,
                            result,
                        });
                    });
                }
            }
            Kind::BlobChunk(c) => {
                if self.tasks.as_ref().is_some_and(|t| t.fetching(&c.sha256)) {
                    self.on_input_chunk(&c);
                } else {
                    self.on_layer_chunk(c, tx, events).await;
                }
            }
            Kind::Task(t) => self.on_task(t, tx).await,
            Kind::CancelTask(k) => self.cancel_task(&k),
            Kind::TaskAck(a) => self.task_acked(&a),
            Kind::Invocation(inv) => self.invoke(inv, tx).await,
            Kind::UsageAck(ack) => {
                if let Ok(mut s) = self.settlement.lock() {
                    s.settled(&ack.seqs);
                }
            }
            Kind::Cancel(_) => {
                // Invocations are bounded by their own deadline; nothing to cancel early.
            }
            Kind::HeartbeatAck(ack) => {
                if let (Some(t), Some(c)) = (sent_at.remove(&ack.seq), ack.coordinate) {
                    let rtt_ms = t.elapsed().as_secs_f64() * 1000.0;
                    let current = self.current.clone();
                    self.observe(&current, &c, rtt_ms);
                }
            }
        }
        None
    }

    async fn start(
        &mut self,
        a: pb::Assignment,
        tx: &mpsc::Sender<pb::WorkerMessage>,
        events: &mpsc::Sender<Event>,
        fetching: &mut HashMap<String, Vec<u8>>,
    ) {
        if a.image.is_some() {
            return self.start_container(a, tx).await;
        }
        let sha = a.module_sha256.to_ascii_lowercase();
        let loaded = self.sandbox.loaded(&sha).is_some();
        self.instances.insert(
            a.allocation,
            Instance {
                tenant: a.tenant,
                function: a.function,
                sha256: sha.clone(),
                limits: a.limits.unwrap_or_default(),
                ready: loaded,
                image: None,
            },
        );
        if loaded {
            let _ = tx
                .send(update(a.allocation, pb::AllocationState::Running, ""))
                .await;
        } else if !fetching.contains_key(&sha) {
            fetching.insert(sha.clone(), Vec::new());
            let _ = tx
                .send(pb::WorkerMessage {
                    kind: Some(pb::worker_message::Kind::FetchModule(pb::FetchModule {
                        sha256: sha,
                    })),
                })
                .await;
        }
        let _ = events;
    }

    /// Measures the RTT to `gateway` in a task of its own; the sample comes back as an event.
    fn probe(&mut self, gateway: String, events: mpsc::Sender<Event>) {
        let c = self.vivaldi.coordinate();
        let req = pb::PingRequest {
            coordinate: Some(pb::Coordinate {
                vec: c.vec.to_vec(),
                height_ms: c.height_ms,
                error: self.vivaldi.error() as f32,
            }),
            rtt_ms: self.rtts.median(&gateway).unwrap_or(0.0) as f32,
        };
        let fresh = !self.probes.contains_key(&gateway);
        let channel = match self.probes.get(&gateway) {
            Some(c) => c.clone(),
            None => {
                let url = if gateway.contains("://") {
                    gateway.clone()
                } else {
                    format!("http://{gateway}")
                };
                let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url) else {
                    return;
                };
                let c = endpoint
                    .connect_timeout(PROBE_TIMEOUT)
                    .tcp_nodelay(true)
                    .connect_lazy();
                self.probes.insert(gateway.clone(), c.clone());
                c
            }
        };
        tokio::spawn(async move {
            let attempt = async {
                let mut client = AgentClient::new(channel);
                // A new connection is warmed first: the sample is one request's round trip.
                if fresh {
                    client.ping(req.clone()).await.ok()?;
                }
                let t = crate::clock::now();
                let reply = client.ping(req).await.ok()?.into_inner();
                Some((t.elapsed().as_secs_f64() * 1000.0, reply.coordinate?))
            };
            if let Ok(Some((rtt_ms, coordinate))) =
                tokio::time::timeout(PROBE_TIMEOUT, attempt).await
            {
                let _ = events
                    .send(Event::Probed {
                        gateway,
                        rtt_ms,
                        coordinate,
                    })
                    .await;
            }
        });
    }

    /// Folds one filtered RTT sample to `gateway` at `peer` into the coordinate.
    fn observe(&mut self, gateway: &str, peer: &pb::Coordinate, rtt_ms: f64) {
        let Some(peer_coordinate) = Coordinate::from_parts(&peer.vec, peer.height_ms) else {
            return;
        };
        let Some(filtered) = self.rtts.sample(gateway.to_string(), rtt_ms) else {
            return;
        };
        let peer_error = if peer.error > 0.0 {
            f64::from(peer.error)
        } else {
            0.5
        };
        let _ = self.vivaldi.observe(
            &self.vivaldi_cfg,
            &peer_coordinate,
            peer_error,
            filtered,
            &mut self.rng,
        );
    }

    async fn on_event(&mut self, ev: Event, tx: &mpsc::Sender<pb::WorkerMessage>) {
        match ev {
            Event::Probed {
                gateway,
                rtt_ms,
                coordinate,
            } => self.observe(&gateway, &coordinate, rtt_ms),
            Event::LayerReady { sha256, result } => {
                self.task_layer_ready(&sha256, &result, tx).await;
                self.layer_ready(&sha256, result, tx).await;
            }
            Event::Loaded { sha256, result } => {
                for (id, i) in self
                    .instances
                    .iter_mut()
                    .filter(|(_, i)| i.image.is_none() && i.sha256 == sha256)
                {
                    match &result {
                        Ok(()) => {
                            i.ready = true;
                            tracing::info!(allocation = id, function = %i.function, "instance ready");
                            let _ = tx.send(update(*id, pb::AllocationState::Running, "")).await;
                        }
                        Err(e) => {
                            tracing::warn!(allocation = id, function = %i.function, error = %e, "instance failed to load");
                            let _ = tx.send(update(*id, pb::AllocationState::Failed, e)).await;
                        }
                    }
                }
                if result.is_err() {
                    self.instances
                        .retain(|_, i| i.image.is_some() || i.sha256 != sha256);
                }
            }
        }
    }

    async fn invoke(&mut self, inv: pb::Invocation, tx: &mpsc::Sender<pb::WorkerMessage>) {
        let refuse = |code: &str, msg: String| pb::InvocationResult {
            invocation_id: inv.invocation_id.clone(),
            error_code: code.to_string(),
            error_message: msg,
            ..Default::default()
        };
        // A worker signs a receipt only for the call it ran: a ticket for another call,
        // node, function or input is refused before anything runs.
        if let Some(i) = self.instances.get(&inv.allocation)
            && let Err(why) = settlement::ticket_matches(
                inv.ticket.as_ref(),
                &inv,
                self.identity.node(),
                (&i.tenant, &i.function),
            )
        {
            let r = refuse("BAD_TICKET", format!("not run: {why}"));
            let _ = tx.send(result_message(r)).await;
            return;
        }
        if self
            .instances
            .get(&inv.allocation)
            .is_some_and(|i| i.image.is_some())
        {
            return self.invoke_container(inv, tx).await;
        }
        let instance = self.instances.get(&inv.allocation).filter(|i| i.ready);
        let function = instance.and_then(|i| self.sandbox.loaded(&i.sha256));
        let (Some(i), Some(function)) = (instance, function) else {
            let r = refuse(
                "UNAVAILABLE",
                format!("allocation {} is not running here", inv.allocation),
            );
            // Straight to the outbound queue: this loop drains `events`, so queueing the
            // refusal there could wait on itself.
            let _ = tx.send(result_message(r)).await;
            return;
        };
        let random_seed = match crate::sandbox::seed_or_fresh(&inv.random_seed) {
            Ok(s) => s,
            Err(e) => {
                let r = refuse("UNAVAILABLE", format!("not run: {e}"));
                let _ = tx.send(result_message(r)).await;
                return;
            }
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            let r = refuse(
                "RESOURCE_EXHAUSTED",
                "every sandbox slot is busy; retry on another instance".into(),
            );
            let _ = tx.send(result_message(r)).await;
            return;
        };
        let mut limits = InvocationLimits::from_spec(&i.limits);
        // A private scratch directory per invocation, removed afterwards.
        let scratch = i.limits.scratch_dir.then(|| {
            self.cfg
                .data_dir
                .join("scratch")
                .join(hex::encode(&inv.invocation_id))
        });
        if let Some(dir) = &scratch {
            if let Err(e) = std::fs::create_dir_all(dir) {
                let r = refuse("UNAVAILABLE", format!("cannot make a scratch dir: {e}"));
                let _ = tx.send(result_message(r)).await;
                return;
            }
            limits.dirs.push(crate::sandbox::Preopen {
                host: dir.clone(),
                guest: "/scratch".into(),
            });
        }
        let name = i.function.clone();
        let (sandbox, settlement, tx) = (self.sandbox.clone(), self.settlement.clone(), tx.clone());
        let cheat = self.cheat.clone();
        let ticket = inv.ticket.clone();
        tokio::task::spawn_blocking(move || {
            let input = InvocationInput {
                invocation_id: inv.invocation_id.clone(),
                random_seed,
                args: inv.args,
                env: inv.env.into_iter().map(|l| (l.key, l.value)).collect(),
                stdin: inv.stdin,
            };
            let out = sandbox.invoke(&function, &name, &input, &limits);
            drop(permit);
            if let Some(dir) = &scratch {
                let _ = std::fs::remove_dir_all(dir);
            }
            // A slot on the stream first, so the result goes out under the receipt book's
            // lock, in chain order (see `settlement::finished`).
            let slot = tokio::runtime::Handle::current().block_on(tx.reserve());
            settlement::finished(
                (&settlement, &cheat),
                ticket,
                inv.invocation_id,
                &out.metering,
                &out.result,
                (out.stdout, out.stderr),
                |r| {
                    if let Ok(slot) = slot {
                        slot.send(result_message(r));
                    }
                },
            );
            if let Some(m) = cheat.forged(&settlement) {
                let _ = tx.blocking_send(m);
            }
        });
    }

    fn heartbeat(&self, seq: u64) -> pb::WorkerMessage {
        let cap = self.attributes.capacity.unwrap_or_default();
        let (mut cpu, mut mem, mut disk) = (0u32, 0u32, 0u32);
        let mut running = Vec::new();
        for (id, i) in &self.instances {
            cpu = cpu.saturating_add(i.limits.cpu_millis);
            mem = mem.saturating_add(i.limits.memory_mib);
            if let Some(image) = &i.image {
                disk = disk.saturating_add(stellar_proto::limits::container_disk_mib(image));
            }
            if i.ready {
                running.push(*id);
            }
        }
        running.sort_unstable();
        let c = self.vivaldi.coordinate();
        pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Heartbeat(pb::Heartbeat {
                free: Some(pb::Resources {
                    cpu_millis: cap.cpu_millis.saturating_sub(cpu),
                    memory_mib: cap.memory_mib.saturating_sub(mem),
                    disk_mib: cap.disk_mib.saturating_sub(disk),
                }),
                coordinate: Some(pb::Coordinate {
                    vec: c.vec.to_vec(),
                    height_ms: c.height_ms,
                    error: self.vivaldi.error() as f32,
                }),
                running,
                seq,
                rtt_ms: self.rtts.median(&self.current).unwrap_or(0.0) as f32,
            })),
        }
    }

    /// Reports the records whose acknowledgement is overdue (every unacknowledged one when
    /// `all`); they stay kept until acknowledged.
    async fn flush_usage(&self, tx: &mpsc::Sender<pb::WorkerMessage>, all: bool) {
        let receipts = match self.settlement.lock() {
            Ok(mut s) => {
                s.save_watermark();
                let due = s.due(all);
                if !due.is_empty() {
                    tracing::debug!(
                        kept = s.unsettled(),
                        resent = due.len(),
                        "receipts not settled in time; sending them again"
                    );
                }
                due
            }
            Err(_) => return,
        };
        for chunk in receipts.chunks(1024) {
            let msg = pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Usage(pb::UsageReport {
                    receipts: chunk.to_vec(),
                })),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    }

    /// Stops taking work, finishes what is in flight (bounded), reports usage, tells the
    /// control plane.
    async fn drain(
        &mut self,
        tx: &mpsc::Sender<pb::WorkerMessage>,
        events: &mut mpsc::Receiver<Event>,
    ) {
        tracing::info!("draining: finishing in-flight invocations");
        let _ = tx
            .send(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Draining(pb::Draining {})),
            })
            .await;
        for i in self.instances.values_mut() {
            i.ready = false;
        }
        let (all, slots) = (self.sandbox.config().slots, self.slots.clone());
        let deadline = tokio::time::sleep(self.cfg.drain_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                permits = slots.acquire_many(all) => {
                    drop(permits);
                    break;
                }
                Some(ev) = events.recv() => self.on_event(ev, tx).await,
                _ = &mut deadline => {
                    tracing::warn!(timeout_ms = self.cfg.drain_timeout.as_millis() as u64, "drain timed out with invocations still running");
                    break;
                }
            }
        }
        self.flush_usage(tx, true).await;
        // Give the stream a moment to carry the last messages out.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tracing::info!("drained");
    }
}

fn result_message(r: pb::InvocationResult) -> pb::WorkerMessage {
    pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Result(r)),
    }
}

fn update(allocation: u64, state: pb::AllocationState, message: &str) -> pb::WorkerMessage {
    pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Allocation(pb::AllocationUpdate {
            allocation,
            state: state as i32,
            message: message.to_string(),
        })),
    }
}

fn ended_by(s: Status) -> Ended {
    match s.code() {
        tonic::Code::Unauthenticated
        | tonic::Code::FailedPrecondition
        | tonic::Code::InvalidArgument => Ended::Refused(s.message().to_string()),
        _ => Ended::Lost(format!("{}: {}", s.code(), s.message())),
    }
}

/// The node's static attributes: detected hardware plus the operator's region, zone, labels.
fn attributes(cfg: &AgentConfig, containers: bool) -> pb::NodeAttributes {
    let capacity = cfg.capacity.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        pb::Resources {
            cpu_millis: cores * 1000,
            memory_mib: (total_memory_mib() / 4 * 3) as u32,
            disk_mib: 0,
        }
    });
    let mut capacity = capacity;
    if capacity.disk_mib == 0 {
        capacity.disk_mib = free_disk_mib(&cfg.data_dir);
    }
    pb::NodeAttributes {
        region: cfg.region.clone(),
        zone: cfg.zone.clone(),
        arch: std::env::consts::ARCH.to_string(),
        runtimes: if containers {
            vec!["wasm".into(), "container".into()]
        } else {
            vec!["wasm".into()]
        },
        capacity: Some(capacity),
        uplink_kbps: 0,
        downlink_kbps: 0,
        labels: cfg
            .labels
            .iter()
            .map(|(k, v)| pb::Label {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
    }
}

/// Space available to the worker's data dir (scratch dirs and the module cache live there).
fn free_disk_mib(dir: &std::path::Path) -> u32 {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()) >> 20)
        .map_or(0, |mib| mib.min(u64::from(u32::MAX)) as u32)
}

fn total_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(1024, |kb| kb / 1024)
}
