//! A deterministic in-process cluster: real replicas (raft-rs, raft-engine on disk, the real
//! state machine) driven by one seeded RNG, with a network that drops, delays, duplicates,
//! reorders and partitions messages, and replicas that crash and restart from their data dirs.
//!
//! Everything that varies comes from the seed: which replica ticks (election timeouts are
//! fixed; tick delivery is jittered instead), which message is lost or late, when a replica
//! crashes, what clients send. A failing seed therefore replays exactly:
//! `STELLAR_SIM_SEED=<seed> cargo test -p stellar-scheduler --test cluster_sim`.
//!
//! Checks, one per invariant: at most one leader per term; every replica's state machine is
//! equal at the same applied index; no node overcommitted by committed allocations; a
//! function's replicas on distinct nodes; load accounting consistent; and at the end, after
//! healing, no acknowledged write lost (client-side oracle).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use raft::eraftpb::{Message, MessageType};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use stellar_proto::v1 as pb;
use stellar_scheduler::replica::deploy_command;
use stellar_scheduler::{Error, Output, Replica, ReplicaConfig, Reply, Request};

/// Knobs of one schedule.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub replicas: u64,
    pub steps: u64,
    pub drop: f64,
    pub duplicate: f64,
    pub max_delay: u64,
    pub crash: f64,
    pub partition: f64,
    pub client_rate: f64,
    pub snapshot_every: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            replicas: 3,
            steps: 400,
            drop: 0.05,
            duplicate: 0.03,
            max_delay: 4,
            crash: 0.004,
            partition: 0.004,
            client_rate: 0.5,
            snapshot_every: 25,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Tenant(String),
    Nodes(Vec<u64>),
    Deploy { tenant: String, name: String },
    Allocate { tenant: String, name: String },
}

#[derive(Debug, Clone)]
struct Outstanding {
    op: Op,
    request_id: Vec<u8>,
    attempts: u32,
    /// Step before which a retry is not sent (client backoff).
    not_before: u64,
}

struct InFlight {
    at: u64,
    seq: u64,
    from: u64,
    msg: Message,
}

/// One simulated cluster run.
pub struct Sim {
    pub seed: u64,
    cfg: SimConfig,
    rng: Pcg64Mcg,
    root: tempfile::TempDir,
    replicas: BTreeMap<u64, Option<Replica>>,
    down_until: BTreeMap<u64, u64>,
    net: Vec<InFlight>,
    seq: u64,
    now: u64,
    /// Partition id per replica; messages cross only within a partition.
    side: BTreeMap<u64, u8>,
    partition_until: u64,
    leaders: BTreeMap<u64, u64>,
    digests: BTreeMap<u64, [u8; 32]>,
    /// Applied index at which each replica's digest was last checked.
    checked_at: BTreeMap<u64, u64>,
    next_token: u64,
    outstanding: BTreeMap<u64, (u64, Outstanding)>,
    retry: Vec<Outstanding>,
    next_request: u64,
    // Oracle: what clients were told succeeded.
    acked_tenants: BTreeSet<String>,
    acked_nodes: BTreeSet<u64>,
    acked_functions: BTreeSet<(String, String)>,
    acked_allocations: BTreeSet<u64>,
    known_tenants: Vec<String>,
    known_functions: Vec<(String, String)>,
    next_node: u64,
    pub stats: SimStats,
}

/// What a run did, to show that faults really happened.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimStats {
    pub acked: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub snapshots_sent: u64,
    pub elections: u64,
    pub dropped: u64,
}

fn shm_root() -> tempfile::TempDir {
    // Prefer tmpfs: thousands of schedules would spend their time in fsync otherwise. The
    // storage code is the same; the process-level tests exercise fsync on a real disk.
    let base = PathBuf::from("/dev/shm");
    if base.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("stellar-sim")
            .tempdir_in(&base)
    {
        return d;
    }
    tempfile::tempdir().expect("temp dir")
}

impl Sim {
    pub fn new(seed: u64, cfg: SimConfig) -> Sim {
        let root = shm_root();
        let mut sim = Sim {
            seed,
            rng: Pcg64Mcg::seed_from_u64(seed),
            root,
            replicas: BTreeMap::new(),
            down_until: BTreeMap::new(),
            net: Vec::new(),
            seq: 0,
            now: 0,
            side: BTreeMap::new(),
            partition_until: 0,
            leaders: BTreeMap::new(),
            digests: BTreeMap::new(),
            checked_at: BTreeMap::new(),
            next_token: 1,
            outstanding: BTreeMap::new(),
            retry: Vec::new(),
            next_request: 1,
            acked_tenants: BTreeSet::new(),
            acked_nodes: BTreeSet::new(),
            acked_functions: BTreeSet::new(),
            acked_allocations: BTreeSet::new(),
            known_tenants: Vec::new(),
            known_functions: Vec::new(),
            next_node: 1,
            stats: SimStats::default(),
            cfg,
        };
        for id in 1..=sim.cfg.replicas {
            let r = sim.open(id);
            sim.replicas.insert(id, Some(r));
            sim.side.insert(id, 0);
        }
        sim
    }

    fn replica_config(&self, id: u64) -> ReplicaConfig {
        let peers = (1..=self.cfg.replicas)
            .map(|i| (i, format!("sim-{i}")))
            .collect();
        let mut c = ReplicaConfig::new(id, self.root.path().join(format!("r{id}")), peers);
        c.randomized_election = false;
        c.snapshot_every = self.cfg.snapshot_every;
        c.keep_entries = 3;
        c.seed = self.seed ^ id;
        c
    }

    fn open(&self, id: u64) -> Replica {
        Replica::open(self.replica_config(id))
            .unwrap_or_else(|e| panic!("seed {}: replica {id} failed to open: {e}", self.seed))
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "seed {} step {}: {what}\nreplay: STELLAR_SIM_SEED={} cargo test -p stellar-scheduler --test cluster_sim -- --nocapture",
            self.seed, self.now, self.seed
        )
    }

    fn request_id(&mut self) -> Vec<u8> {
        let id = self.next_request;
        self.next_request += 1;
        let mut v = self.seed.to_be_bytes().to_vec();
        v.extend_from_slice(&id.to_be_bytes());
        v
    }

    fn live_ids(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .filter(|(_, r)| r.is_some())
            .map(|(&id, _)| id)
            .collect()
    }

    /// Runs the faulty phase, then heals everything and lets the cluster settle.
    pub fn run(mut self) -> SimStats {
        for _ in 0..self.cfg.steps {
            self.step(true);
        }
        // Heal: everyone up, one partition, no loss; finish outstanding work.
        let down: Vec<u64> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in down {
            self.restart(id);
        }
        for s in self.side.values_mut() {
            *s = 0;
        }
        let mut settled = 0;
        for _ in 0..3000 {
            self.step(false);
            if self.outstanding.is_empty() && self.retry.is_empty() && self.converged() {
                settled += 1;
                if settled > 30 {
                    break;
                }
            } else {
                settled = 0;
            }
        }
        if !(self.outstanding.is_empty() && self.retry.is_empty()) {
            let o = self.outstanding.len() + self.retry.len();
            let sample: Vec<String> = self
                .outstanding
                .iter()
                .take(3)
                .map(|(t, (to, o))| {
                    format!("token {t} at r{to}: {:?} attempt {}", o.op, o.attempts)
                })
                .collect();
            self.fail(&format!(
                "{o} client requests never completed after healing (liveness): {}",
                sample.join("; ")
            ));
        }
        if !self.converged() {
            let view: Vec<String> = self
                .replicas
                .values()
                .flatten()
                .map(|r| {
                    format!(
                        "r{} term {} leader {} commit {} applied {}",
                        r.id(),
                        r.term(),
                        r.leader_id(),
                        r.commit_index(),
                        r.state().applied_index()
                    )
                })
                .collect();
            self.fail(&format!(
                "replicas did not converge after healing: {}",
                view.join("; ")
            ));
        }
        self.check_acknowledged();
        self.stats
    }

    fn converged(&self) -> bool {
        let applied: BTreeSet<u64> = self
            .replicas
            .values()
            .flatten()
            .map(|r| r.state().applied_index())
            .collect();
        let commit = self
            .replicas
            .values()
            .flatten()
            .find(|r| r.is_leader())
            .map(|r| r.commit_index());
        applied.len() == 1 && commit.is_some() && applied.first().copied() == commit
    }

    fn step(&mut self, faulty: bool) {
        self.now += 1;
        if faulty {
            self.faults();
        }
        // Ticks, jittered per replica so elections spread out.
        for id in self.live_ids() {
            if self.rng.random_bool(0.85) {
                self.replica(id).tick();
            }
        }
        self.deliver(faulty);
        if faulty || !self.retry.is_empty() {
            self.clients(faulty);
        }
        for id in self.live_ids() {
            self.replica(id).process();
            let outs = self.replica(id).take_outputs();
            self.route(id, outs, faulty);
        }
        self.check();
    }

    fn replica(&mut self, id: u64) -> &mut Replica {
        self.replicas
            .get_mut(&id)
            .and_then(Option::as_mut)
            .expect("live replica")
    }

    fn faults(&mut self) {
        let n = self.cfg.replicas;
        let down = self.replicas.values().filter(|r| r.is_none()).count() as u64;
        // Crash a replica (keeping a majority up most of the time, but not always).
        if self.rng.random_bool(self.cfg.crash) && down < n {
            let id = self.rng.random_range(1..=n);
            if let Some(r) = self.replicas.get_mut(&id).and_then(Option::take) {
                drop(r);
                self.stats.crashes += 1;
                let back = self.now + self.rng.random_range(5..60);
                self.down_until.insert(id, back);
                // Requests in flight at that replica get no answer: the client retries.
                let lost: Vec<u64> = self
                    .outstanding
                    .iter()
                    .filter(|(_, (to, _))| *to == id)
                    .map(|(&t, _)| t)
                    .collect();
                for t in lost {
                    let (_, mut o) = self.outstanding.remove(&t).expect("present");
                    o.not_before = self.now + 3;
                    self.retry.push(o);
                }
            }
        }
        let due: Vec<u64> = self
            .down_until
            .iter()
            .filter(|(_, t)| **t <= self.now)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.restart(id);
        }
        // Partitions.
        if self.partition_until != 0 && self.now >= self.partition_until {
            for s in self.side.values_mut() {
                *s = 0;
            }
            self.partition_until = 0;
        } else if self.partition_until == 0 && self.rng.random_bool(self.cfg.partition) {
            for id in 1..=n {
                let s = self.rng.random_range(0..2u8);
                self.side.insert(id, s);
            }
            self.partition_until = self.now + self.rng.random_range(10..80);
            self.stats.partitions += 1;
        }
    }

    fn restart(&mut self, id: u64) {
        self.down_until.remove(&id);
        if self.replicas.get(&id).is_some_and(Option::is_none) {
            let r = self.open(id);
            self.replicas.insert(id, Some(r));
        }
    }

    fn deliver(&mut self, faulty: bool) {
        let now = self.now;
        let mut due: Vec<InFlight> = Vec::new();
        let mut keep = Vec::with_capacity(self.net.len());
        for m in self.net.drain(..) {
            if m.at <= now {
                due.push(m);
            } else {
                keep.push(m);
            }
        }
        self.net = keep;
        due.sort_by_key(|m| (m.at, m.seq));
        for m in due {
            let to = m.msg.to;
            let crossing = self.side.get(&m.from) != self.side.get(&to);
            let up = self.replicas.get(&to).is_some_and(Option::is_some);
            let is_snap = m.msg.get_msg_type() == MessageType::MsgSnapshot;
            if crossing || !up || (faulty && self.rng.random_bool(self.cfg.drop)) {
                self.stats.dropped += 1;
                if is_snap && let Some(Some(r)) = self.replicas.get_mut(&m.from) {
                    r.report_snapshot(to, false);
                }
                continue;
            }
            if is_snap {
                self.stats.snapshots_sent += 1;
            }
            self.replica(to).step(m.msg);
            if is_snap && let Some(Some(r)) = self.replicas.get_mut(&m.from) {
                r.report_snapshot(to, true);
            }
        }
    }

    fn route(&mut self, from: u64, outs: Vec<Output>, faulty: bool) {
        for o in outs {
            match o {
                Output::Send(msgs) => {
                    for msg in msgs {
                        let delay = if faulty {
                            self.rng.random_range(1..=self.cfg.max_delay)
                        } else {
                            1
                        };
                        let dup = faulty && self.rng.random_bool(self.cfg.duplicate);
                        if dup {
                            self.seq += 1;
                            let extra = self.rng.random_range(1..=self.cfg.max_delay * 2);
                            self.net.push(InFlight {
                                at: self.now + extra,
                                seq: self.seq,
                                from,
                                msg: msg.clone(),
                            });
                        }
                        self.seq += 1;
                        self.net.push(InFlight {
                            at: self.now + delay,
                            seq: self.seq,
                            from,
                            msg,
                        });
                    }
                }
                Output::Reply { token, result } => self.on_reply(token, result),
            }
        }
    }

    fn on_reply(&mut self, token: u64, result: Result<Reply, Error>) {
        let Some((_, o)) = self.outstanding.remove(&token) else {
            return;
        };
        match result {
            Ok(Reply::Applied(r)) => {
                self.stats.acked += 1;
                match &o.op {
                    Op::Tenant(t) => {
                        self.acked_tenants.insert(t.clone());
                    }
                    Op::Nodes(ids) => self.acked_nodes.extend(ids),
                    Op::Deploy { tenant, name } => {
                        self.acked_functions.insert((tenant.clone(), name.clone()));
                        self.acked_allocations
                            .extend(r.allocations.iter().map(|a| a.id));
                    }
                    Op::Allocate { .. } => {
                        self.acked_allocations
                            .extend(r.allocations.iter().map(|a| a.id));
                    }
                }
            }
            Ok(other) => self.fail(&format!("unexpected reply {other:?}")),
            Err(
                Error::NotLeader { .. }
                | Error::OutcomeUnknown
                | Error::Overloaded
                | Error::Storage(_),
            ) => {
                let mut o = o;
                o.not_before = self.now + 3;
                self.retry.push(o);
            }
            Err(Error::Placement(_)) => {}
            Err(Error::Apply(e)) => {
                // A deploy or allocation may be refused (no room, not found yet); a tenant
                // retried after success is answered from the dedupe table, never refused.
                if matches!(o.op, Op::Tenant(_) | Op::Nodes(_)) {
                    self.fail(&format!("{:?} refused: {e}", o.op));
                }
            }
            Err(e) => self.fail(&format!("unexpected error {e}")),
        }
    }

    fn clients(&mut self, faulty: bool) {
        let live = self.live_ids();
        if live.is_empty() {
            return;
        }
        // Retries go to the replica a random client would try next.
        let now = self.now;
        let (due, later): (Vec<Outstanding>, Vec<Outstanding>) = std::mem::take(&mut self.retry)
            .into_iter()
            .partition(|o| o.not_before <= now);
        self.retry = later;
        for mut o in due {
            if o.attempts > 300 {
                self.fail(&format!("{:?} retried 300 times", o.op));
            }
            o.attempts += 1;
            o.not_before = now + 3;
            let to = live[self.rng.random_range(0..live.len())];
            self.send(to, o);
        }
        if !faulty || !self.rng.random_bool(self.cfg.client_rate) {
            return;
        }
        let op = match self.rng.random_range(0..10) {
            0 | 1 => {
                let t = format!("t{}", self.known_tenants.len());
                self.known_tenants.push(t.clone());
                Op::Tenant(t)
            }
            2 | 3 => {
                let k = self.rng.random_range(1..4);
                let ids: Vec<u64> = (0..k).map(|i| self.next_node + i).collect();
                self.next_node += k;
                Op::Nodes(ids)
            }
            4 | 5 if !self.acked_tenants.is_empty() => {
                let tenants: Vec<&String> = self.acked_tenants.iter().collect();
                let tenant = tenants[self.rng.random_range(0..tenants.len())].clone();
                let name = format!("f{}", self.known_functions.len());
                self.known_functions.push((tenant.clone(), name.clone()));
                Op::Deploy { tenant, name }
            }
            _ if !self.acked_functions.is_empty() => {
                let fs: Vec<&(String, String)> = self.acked_functions.iter().collect();
                let (tenant, name) = fs[self.rng.random_range(0..fs.len())].clone();
                Op::Allocate { tenant, name }
            }
            _ => return,
        };
        let request_id = self.request_id();
        let to = live[self.rng.random_range(0..live.len())];
        self.send(
            to,
            Outstanding {
                op,
                request_id,
                attempts: 0,
                not_before: 0,
            },
        );
    }

    fn send(&mut self, to: u64, o: Outstanding) {
        let token = self.next_token;
        self.next_token += 1;
        let rid = o.request_id.clone();
        let request = match &o.op {
            Op::Tenant(t) => Request::Command(pb::Command {
                request_id: rid,
                kind: Some(pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
                    name: t.clone(),
                    token_sha256: vec![],
                })),
            }),
            Op::Nodes(ids) => Request::Command(pb::Command {
                request_id: rid,
                kind: Some(pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
                    nodes: ids.iter().map(|&id| node_record(id)).collect(),
                })),
            }),
            Op::Deploy { tenant, name } => Request::Deploy(deploy_command(
                rid,
                pb::DeployCmd {
                    tenant: tenant.clone(),
                    name: name.clone(),
                    module: b"\0asm\x01\0\0\0".to_vec(),
                    limits: Some(pb::FunctionLimits {
                        cpu_millis: 500,
                        memory_mib: 512,
                        timeout_ms: 1000,
                        fuel: 0,
                        max_output_bytes: 0,
                        scratch_dir: false,
                        pids: 0,
                    }),
                    replicas: 2,
                    ..Default::default()
                },
            )),
            Op::Allocate { tenant, name } => Request::Allocate {
                request_id: rid,
                tenant: tenant.clone(),
                function: name.clone(),
                origin: stellar_placement::Origin::Anywhere,
            },
        };
        self.outstanding.insert(token, (to, o));
        self.replica(to).submit(token, request);
    }

    fn check(&mut self) {
        let ids = self.live_ids();
        for id in ids {
            let r = self.replicas[&id].as_ref().expect("live");
            // 1. At most one leader per term.
            if r.is_leader() {
                let term = r.term();
                match self.leaders.get(&term) {
                    Some(&l) if l != id => {
                        self.fail(&format!("two leaders in term {term}: {l} and {id}"))
                    }
                    Some(_) => {}
                    None => {
                        self.stats.elections += 1;
                        self.leaders.insert(term, id);
                    }
                }
            }
            let st = r.state();
            let idx = st.applied_index();
            if self.checked_at.get(&id) == Some(&idx) {
                continue;
            }
            self.checked_at.insert(id, idx);
            // 2. Equal state machines at equal applied index.
            let d = st.digest();
            match self.digests.get(&idx) {
                Some(prev) if *prev != d => {
                    self.fail(&format!("replica {id} diverged at applied index {idx}"))
                }
                Some(_) => {}
                None => {
                    self.digests.insert(idx, d);
                }
            }
            // 3. No node overcommitted by committed allocations.
            if let Err(e) = st.check_capacity() {
                self.fail(&format!("replica {id}: {e}"));
            }
            // 4. A function's replicas on distinct nodes.
            if let Err(e) = st.check_distinct_replicas() {
                self.fail(&format!("replica {id}: {e}"));
            }
            // 5. Committed load matches the allocations.
            if let Err(e) = st.check_load_accounting() {
                self.fail(&format!("replica {id}: {e}"));
            }
        }
    }

    /// 6. No acknowledged write lost, on every replica.
    fn check_acknowledged(&self) {
        for (id, r) in self.replicas.iter() {
            let st = r.as_ref().expect("healed").state();
            for t in &self.acked_tenants {
                if !st.has_tenant(t) {
                    self.fail(&format!("acknowledged tenant {t} missing on replica {id}"));
                }
            }
            for n in &self.acked_nodes {
                if !st.nodes().contains_key(n) {
                    self.fail(&format!("acknowledged node {n} missing on replica {id}"));
                }
            }
            for (t, f) in &self.acked_functions {
                if st.function(t, f).is_none() {
                    self.fail(&format!(
                        "acknowledged function {t}/{f} missing on replica {id}"
                    ));
                }
            }
            for a in &self.acked_allocations {
                if !st.allocations().contains_key(a) {
                    self.fail(&format!(
                        "acknowledged allocation {a} missing on replica {id}"
                    ));
                }
            }
        }
    }
}

/// A registration for a small home node (2 cores, 2 GiB): room for a few replicas, so
/// capacity and distinct-node checks bite.
pub fn node_record(id: u64) -> pb::NodeRecord {
    let zones = ["shanghai", "hangzhou", "beijing"];
    pb::NodeRecord {
        id,
        public_key: vec![],
        attributes: Some(pb::NodeAttributes {
            region: if id % 3 == 2 {
                "cn-north".into()
            } else {
                "cn-east".into()
            },
            zone: zones[(id % 3) as usize].into(),
            arch: "aarch64".into(),
            runtimes: vec!["wasm".into()],
            capacity: Some(pb::Resources {
                cpu_millis: 2000,
                memory_mib: 2048,
                disk_mib: 8192,
            }),
            uplink_kbps: 20_000,
            downlink_kbps: 100_000,
            labels: vec![],
        }),
        state: pb::NodeState::Ready as i32,
        reputation: 0.9,
        managed: false,
        gateway: String::new(),
    }
}
