//! Simulated home nodes for `edge-bench`: thousands of workers in one process, each with its
//! own signed registration, its own gRPC stream (on its own connection by default) to a
//! gateway, heartbeats at the interval the gateway asks for, and usage reports kept until
//! acknowledged. They run no code: what the edge tier costs is streams, keepalives and
//! deltas, not invocations (`invoke-bench` measures those).
//!
//! The parent drives a process over stdin/stdout, one command or event per line:
//!
//! ```text
//!  parent ─kill N────────▶ N attached workers drop their connection  ─▶ killed NODE UNIX_MS
//!         ─silence N─────▶ N stop their keepalives, stream kept open ─▶ silenced NODE UNIX_MS
//!         ─stop-usage────▶ no new usage records (unacknowledged ones are still resent)
//!         ─stats─────────▶ stats {"attached":…,"usage_acked":…,…}
//!  a worker whose gateway is gone re-registers with the next one (--gateways order)
//! ```

#![allow(clippy::disallowed_methods)] // a load generator's timers and timestamps read the clock

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use stellar_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// What one process simulates.
#[derive(Debug, Clone)]
pub struct SimWorkersConfig {
    /// Gateways to dial, in order of preference after the first (which is spread by index).
    pub gateways: Vec<String>,
    /// Workers in this process.
    pub count: usize,
    /// The first worker's index in the whole run (identities derive from seed and index).
    pub first: usize,
    /// Seed of the identities.
    pub seed: u64,
    /// The join token the gateways accept.
    pub join_token: String,
    /// Usage records are for this tenant's function.
    pub tenant: String,
    /// The function usage records name.
    pub function: String,
    /// Usage records this process reports per second (spread over its attached workers).
    pub usage_per_sec: f64,
    /// New registrations per second while ramping up.
    pub ramp_per_sec: f64,
    /// Workers sharing one HTTP/2 connection (1: a connection each, as real home nodes).
    pub streams_per_connection: usize,
}

/// A command for one simulated worker.
enum Cmd {
    Kill,
    Silence,
    Usage(Box<pb::Receipt>),
}

/// How a worker's session ended.
enum End {
    Killed,
    Silenced,
    Lost,
    /// The gateway sent it to another (by index in the list).
    Redirected(usize),
}

#[derive(Default)]
struct Stats {
    attached: AtomicU64,
    registrations: AtomicU64,
    reconnects: AtomicU64,
    redirects: AtomicU64,
    refused: AtomicU64,
    usage_sent: AtomicU64,
    usage_acked: AtomicU64,
    usage_unacked: AtomicU64,
}

struct Sim {
    cfg: SimWorkersConfig,
    stats: Stats,
    usage_on: AtomicBool,
    /// Shared channels when several streams use one connection, by (gateway, group).
    shared: std::sync::Mutex<HashMap<(usize, usize), Channel>>,
}

struct Worker {
    index: usize,
    key: SigningKey,
    node: u64,
    attached: AtomicBool,
    cmds: mpsc::Sender<Cmd>,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The identity of worker `index` of a run seeded with `seed`.
pub fn identity(seed: u64, index: usize) -> SigningKey {
    let mut h = Sha256::new();
    h.update(b"stellar-edge-bench");
    h.update(seed.to_le_bytes());
    h.update((index as u64).to_le_bytes());
    SigningKey::from_bytes(&h.finalize().into())
}

impl Sim {
    fn channel(&self, gateway: usize, worker: usize) -> Result<Channel, String> {
        let make = || {
            Endpoint::from_shared(format!("http://{}", self.cfg.gateways[gateway]))
                .map(|e| {
                    e.tcp_nodelay(true)
                        .connect_timeout(Duration::from_secs(5))
                        .connect_lazy()
                })
                .map_err(|e| e.to_string())
        };
        if self.cfg.streams_per_connection <= 1 {
            return make();
        }
        let key = (gateway, worker / self.cfg.streams_per_connection);
        let mut shared = self.shared.lock().map_err(|_| "poisoned".to_string())?;
        if let Some(c) = shared.get(&key) {
            return Ok(c.clone());
        }
        let c = make()?;
        shared.insert(key, c.clone());
        Ok(c)
    }

    fn register(&self, w: &Worker, nonce: Vec<u8>) -> pb::WorkerMessage {
        let public_key = w.key.verifying_key().to_bytes();
        let msg = stellar_proto::identity::registration_message(
            &public_key,
            &self.cfg.join_token,
            &nonce,
        );
        // Regions and zones spread like a fleet's: 8 regions of 4 zones.
        let (region, zone) = (w.index % 8, (w.index / 8) % 4);
        pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Register(pb::Register {
                node: w.node,
                public_key: public_key.to_vec(),
                attributes: Some(pb::NodeAttributes {
                    region: format!("r{region}"),
                    zone: format!("r{region}-z{zone}"),
                    arch: "x86_64".into(),
                    runtimes: vec!["wasm".into()],
                    capacity: Some(pb::Resources {
                        cpu_millis: 2000,
                        memory_mib: 2048,
                        disk_mib: 16_384,
                    }),
                    uplink_kbps: 20_000,
                    downlink_kbps: 100_000,
                    labels: Vec::new(),
                }),
                signature: w.key.sign(&msg).to_bytes().to_vec(),
                join_token: self.cfg.join_token.clone(),
                nonce,
            })),
        }
    }
}

fn heartbeat(w: &Worker, seq: u64) -> pb::WorkerMessage {
    // A fixed coordinate per node: the gateway reports it once, then only if it moves.
    let c = |k: u64| ((w.node >> k) & 0xff) as f32 / 4.0;
    pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Heartbeat(pb::Heartbeat {
            free: Some(pb::Resources {
                cpu_millis: 2000,
                memory_mib: 2048,
                disk_mib: 16_384,
            }),
            coordinate: Some(pb::Coordinate {
                vec: vec![c(0), c(8), c(16)],
                height_ms: 1.0 + c(24) / 8.0,
                error: 0.2,
            }),
            running: Vec::new(),
            seq,
            rtt_ms: 0.0,
        })),
    }
}

/// One worker's receipt chain and its unsettled receipts (resent on a new stream and every
/// few seconds). A simulated worker runs nothing, so its tickets carry no MAC: every receipt
/// is a forgery the gateways must refuse and settle, never bill.
#[derive(Default)]
struct Unacked {
    receipts: std::collections::BTreeMap<u64, pb::Receipt>,
    seq: u64,
    head: [u8; 32],
}

impl Unacked {
    fn is_empty(&self) -> bool {
        self.receipts.is_empty()
    }
    fn all(&self) -> Vec<pb::Receipt> {
        self.receipts.values().cloned().collect()
    }
    /// Chains and signs `r` with the worker's key, as a real worker would.
    fn sign(&mut self, key: &SigningKey, mut r: pb::Receipt) -> pb::Receipt {
        self.seq += 1;
        r.seq = self.seq;
        r.prev_hash = self.head.to_vec();
        r.signature = key
            .sign(&stellar_proto::receipts::receipt_message(&r))
            .to_bytes()
            .to_vec();
        self.head = stellar_proto::receipts::receipt_hash(&r);
        self.receipts.insert(r.seq, r.clone());
        r
    }
}

const RESEND_EVERY: Duration = Duration::from_secs(3);

async fn session(
    sim: &Sim,
    w: &Worker,
    gateway: usize,
    cmds: &mut mpsc::Receiver<Cmd>,
    unacked: &mut Unacked,
) -> End {
    let Ok(channel) = sim.channel(gateway, w.index) else {
        return End::Lost;
    };
    let mut client = pb::agent_client::AgentClient::new(channel);
    let nonce = match client.challenge(pb::ChallengeRequest {}).await {
        Ok(r) => r.into_inner().nonce,
        Err(_) => return End::Lost,
    };
    let (tx, rx) = mpsc::channel::<pb::WorkerMessage>(32);
    let _ = tx.try_send(sim.register(w, nonce));
    let mut inbound = match client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => {
            if s.code() == tonic::Code::Unauthenticated
                || s.code() == tonic::Code::FailedPrecondition
            {
                sim.stats.refused.fetch_add(1, Ordering::Relaxed);
            }
            return End::Lost;
        }
    };
    let heartbeat_ms = match inbound.message().await {
        Ok(Some(pb::ControlMessage {
            kind: Some(pb::control_message::Kind::Registered(r)),
        })) => u64::from(r.heartbeat_ms.max(50)),
        Ok(Some(pb::ControlMessage {
            kind: Some(pb::control_message::Kind::Redirect(r)),
        })) => {
            sim.stats.redirects.fetch_add(1, Ordering::Relaxed);
            return match sim.cfg.gateways.iter().position(|g| *g == r.gateway) {
                Some(i) => End::Redirected(i),
                None => End::Lost,
            };
        }
        _ => return End::Lost,
    };
    sim.stats.registrations.fetch_add(1, Ordering::Relaxed);
    sim.stats.attached.fetch_add(1, Ordering::Relaxed);
    w.attached.store(true, Ordering::Relaxed);
    let end = attached(sim, w, heartbeat_ms, &tx, &mut inbound, cmds, unacked).await;
    w.attached.store(false, Ordering::Relaxed);
    sim.stats.attached.fetch_sub(1, Ordering::Relaxed);
    end
}

async fn attached(
    sim: &Sim,
    w: &Worker,
    heartbeat_ms: u64,
    tx: &mpsc::Sender<pb::WorkerMessage>,
    inbound: &mut tonic::Streaming<pb::ControlMessage>,
    cmds: &mut mpsc::Receiver<Cmd>,
    unacked: &mut Unacked,
) -> End {
    let report = |receipts: Vec<pb::Receipt>| pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Usage(pb::UsageReport {
            receipts,
        })),
    };
    if !unacked.is_empty() {
        let _ = tx.try_send(report(unacked.all()));
    }
    // Keepalives spread over the interval, as independent devices' are.
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(w.node ^ unix_ms() as u64);
    let offset = Duration::from_millis(rng.random_range(0..heartbeat_ms));
    let mut beat = tokio::time::interval_at(
        tokio::time::Instant::now() + offset,
        Duration::from_millis(heartbeat_ms),
    );
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resend = tokio::time::interval(RESEND_EVERY);
    resend.tick().await;
    let mut silenced = false;
    let mut seq = 0u64;
    loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(pb::ControlMessage { kind: Some(pb::control_message::Kind::UsageAck(a)) })) => {
                    for seq in a.seqs {
                        if unacked.receipts.remove(&seq).is_some() {
                            sim.stats.usage_acked.fetch_add(1, Ordering::Relaxed);
                            sim.stats.usage_unacked.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return if silenced { End::Silenced } else { End::Lost },
            },
            _ = beat.tick(), if !silenced => {
                seq += 1;
                let _ = tx.try_send(heartbeat(w, seq));
            }
            _ = resend.tick(), if !silenced && !unacked.is_empty() => {
                let _ = tx.try_send(report(unacked.all()));
            }
            c = cmds.recv() => match c {
                None | Some(Cmd::Kill) => return End::Killed,
                Some(Cmd::Silence) => {
                    silenced = true;
                    say(&format!("silenced {} {}", w.node, unix_ms()));
                }
                Some(Cmd::Usage(r)) => {
                    if silenced {
                        continue;
                    }
                    sim.stats.usage_sent.fetch_add(1, Ordering::Relaxed);
                    sim.stats.usage_unacked.fetch_add(1, Ordering::Relaxed);
                    let r = unacked.sign(&w.key, *r);
                    let _ = tx.try_send(report(vec![r]));
                }
            }
        }
    }
}

async fn run_worker(sim: Arc<Sim>, w: Arc<Worker>, mut cmds: mpsc::Receiver<Cmd>) {
    let g = sim.cfg.gateways.len();
    let mut gateway = w.index % g;
    let mut backoff = Duration::from_millis(100);
    let mut unacked = Unacked::default();
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(w.node);
    loop {
        match session(&sim, &w, gateway, &mut cmds, &mut unacked).await {
            End::Killed => {
                // The connection (or, when shared, the stream) is dropped here.
                say(&format!("killed {} {}", w.node, unix_ms()));
                return;
            }
            End::Silenced => return,
            End::Redirected(to) => gateway = to,
            End::Lost => {
                sim.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                // Devices' gateway lists come in different orders: a dead gateway's workers
                // spread over the others rather than all landing on the next one.
                if g > 1 {
                    gateway = (gateway + 1 + rng.random_range(0..g - 1)) % g;
                }
                let jitter = rng.random_range(0..=backoff.as_millis() as u64);
                tokio::time::sleep(backoff / 2 + Duration::from_millis(jitter / 2)).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        if matches!(cmds.try_recv(), Ok(Cmd::Kill)) {
            say(&format!("killed {} {}", w.node, unix_ms()));
            return;
        }
    }
}

fn stats_line(sim: &Sim) -> String {
    let s = &sim.stats;
    let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
    serde_json::json!({
        "attached": v(&s.attached),
        "registrations": v(&s.registrations),
        "reconnects": v(&s.reconnects),
        "redirects": v(&s.redirects),
        "refused": v(&s.refused),
        "usage_sent": v(&s.usage_sent),
        "usage_acked": v(&s.usage_acked),
        "usage_unacked": v(&s.usage_unacked),
    })
    .to_string()
}

/// Runs the simulated workers until stdin closes.
pub async fn run(cfg: SimWorkersConfig) -> Result<(), String> {
    if cfg.gateways.is_empty() {
        return Err("--gateways needs at least one address".into());
    }
    let sim = Arc::new(Sim {
        cfg: cfg.clone(),
        stats: Stats::default(),
        usage_on: AtomicBool::new(true),
        shared: std::sync::Mutex::new(HashMap::new()),
    });
    let mut workers: Vec<Arc<Worker>> = Vec::with_capacity(cfg.count);
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(cfg.seed ^ cfg.first as u64);
    let ramp = Duration::from_secs_f64(1.0 / cfg.ramp_per_sec.max(1.0));
    let mut next = tokio::time::Instant::now();
    for i in 0..cfg.count {
        let index = cfg.first + i;
        let key = identity(cfg.seed, index);
        let node = stellar_proto::identity::node_id(key.verifying_key().as_bytes());
        let (tx, rx) = mpsc::channel(8);
        let w = Arc::new(Worker {
            index,
            key,
            node,
            attached: AtomicBool::new(false),
            cmds: tx,
        });
        workers.push(w.clone());
        tokio::spawn(run_worker(sim.clone(), w, rx));
        next += ramp;
        tokio::time::sleep_until(next).await;
    }
    // Usage: records at the configured rate on random attached workers.
    {
        let (sim, workers) = (sim.clone(), workers.clone());
        tokio::spawn(async move {
            let tick = Duration::from_millis(50);
            let per_tick = sim.cfg.usage_per_sec * tick.as_secs_f64();
            let mut owed = 0.0f64;
            let mut n = 0u64;
            let mut every = tokio::time::interval(tick);
            loop {
                every.tick().await;
                if !sim.usage_on.load(Ordering::Relaxed) {
                    continue;
                }
                owed += per_tick;
                while owed >= 1.0 {
                    owed -= 1.0;
                    let w = &workers[rng.random_range(0..workers.len())];
                    if !w.attached.load(Ordering::Relaxed) {
                        continue;
                    }
                    n += 1;
                    let mut id = [0u8; 16];
                    rng.fill(&mut id);
                    let record = pb::Receipt {
                        ticket: Some(pb::Ticket {
                            invocation_id: hex::encode(id).into_bytes(),
                            tenant: sim.cfg.tenant.clone(),
                            function: sim.cfg.function.clone(),
                            node: w.node,
                            ..Default::default()
                        }),
                        fuel: 1_000 + n % 1_000,
                        wall_us: 500,
                        peak_memory_bytes: 1 << 20,
                        bytes_in: 5,
                        bytes_out: 12,
                        ..Default::default()
                    };
                    let _ = w.cmds.try_send(Cmd::Usage(Box::new(record)));
                }
            }
        });
    }
    say(&format!("spawned {}", cfg.count));
    // Commands from the parent, on a blocking thread (stdin is blocking).
    let (line_tx, mut lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut pick = rand_pcg::Pcg64Mcg::seed_from_u64(cfg.seed.wrapping_add(7));
    while let Some(line) = lines.recv().await {
        let mut parts = line.split_whitespace();
        let cmd = parts.next().unwrap_or("");
        let n: usize = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        match cmd {
            "kill" | "silence" => {
                let mut chosen = 0;
                let mut tries = 0;
                while chosen < n && tries < workers.len() * 4 {
                    tries += 1;
                    let w = &workers[pick.random_range(0..workers.len())];
                    if !w.attached.load(Ordering::Relaxed) || w.cmds.is_closed() {
                        continue;
                    }
                    let c = if cmd == "kill" {
                        Cmd::Kill
                    } else {
                        Cmd::Silence
                    };
                    if w.cmds.try_send(c).is_ok() {
                        // Not chosen again: it is leaving.
                        w.attached.store(false, Ordering::Relaxed);
                        chosen += 1;
                    }
                }
            }
            "stop-usage" => sim.usage_on.store(false, Ordering::Relaxed),
            "stats" => say(&format!("stats {}", stats_line(&sim))),
            _ => {}
        }
    }
    Ok(())
}
