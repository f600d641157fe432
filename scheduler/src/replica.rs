//! One control-plane replica without threads or sockets: the raft-rs `RawNode`, the state
//! machine, the leader's soft state and the bookkeeping that answers clients.
//!
//! A driver (the server's replica thread, or the deterministic test harness) feeds it ticks,
//! peer messages, client requests and reads, calls [`Replica::process`], and delivers the
//! [`Output`]s. `process` follows raft-rs's Ready protocol exactly:
//!
//! ```text
//!  propose queued batch ─▶ ready() ─▶ send messages ─▶ install snapshot ─▶ apply committed
//!      ─▶ persist entries + HardState (fsync) ─▶ send persisted messages
//!      ─▶ advance() ─▶ record commit ─▶ send ─▶ apply committed ─▶ advance_apply()
//!      ─▶ answer reads whose index is applied ─▶ snapshot + compact if due
//! ```
//!
//! Nothing is stepped or proposed between `ready()` and `advance()`: work that apply creates
//! (re-plans, lost replicas) is queued and proposed on the next round. If the disk refuses the
//! persist step, the Ready is kept and retried; until then no new work is accepted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;

use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message,
};
use raft::{RawNode, Ready, SnapshotStatus, StateRole};
use raft_proto::ConfChangeI;
use sha2::{Digest, Sha256};
use stellar_placement::{Coordinate, NodeState, Origin, Resources};
use stellar_proto::v1 as pb;

use crate::changes::{ChangeLog, Changes, Page};
use crate::error::{ApplyError, Error, Result};
use crate::leader::LeaderState;
use crate::logger::raft_logger;
use crate::state::{
    DedupeScope, Effects, FunctionVersion, StateMachine, node_state_from_pb, node_state_to_pb,
    result_of,
};
use crate::storage::DiskStorage;

/// How many times a plan refused as stale is re-planned before the client is told.
pub const MAX_PLAN_ATTEMPTS: u32 = 5;

/// Static settings of one replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This replica's id (non-zero, unique in the cluster).
    pub id: u64,
    /// Where the log, HardState and snapshot live.
    pub data_dir: PathBuf,
    /// The static peer list (`id`, client/raft address), this replica included. Empty means
    /// "join": wait to be added to a running cluster.
    pub peers: Vec<(u64, String)>,
    /// Ticks without a leader before a follower campaigns (raft-rs `election_tick`).
    pub election_tick: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_tick: usize,
    /// Randomise election timeouts in [election, 2×election) (production); the harness turns
    /// it off and randomises tick delivery itself, so schedules replay exactly.
    pub randomized_election: bool,
    /// Applied entries between local snapshots.
    pub snapshot_every: u64,
    /// Entries kept behind a snapshot for followers that lag a little.
    pub keep_entries: u64,
    /// Largest batch entry (many commands per Raft entry).
    pub max_batch_bytes: usize,
    /// Seed of the leader's placement RNG.
    pub seed: u64,
    /// Ticks a dead gateway's nodes have to re-attach elsewhere before they go down.
    pub gateway_reattach_ticks: u64,
    /// Ticks a new leader waits for gateways to report who is attached before judging any
    /// node down.
    pub node_grace_ticks: u64,
    /// Ticks between the leader's liveness rounds (dirty nodes only, never a sweep), which
    /// are also its job rounds (`job_driver.rs`).
    pub liveness_every_ticks: u64,
    /// The wall clock the leader stamps job commands with (apply reads no clock).
    pub clock: fn() -> u64,
}

impl ReplicaConfig {
    /// Production defaults for a replica ticking every 50 ms: elections after 0.5–1 s,
    /// heartbeats every 100 ms, a dead gateway's nodes down after 10 s unless they re-attach,
    /// 10 s grace for gateways to resync with a new leader, liveness rounds every 250 ms.
    pub fn new(id: u64, data_dir: PathBuf, peers: Vec<(u64, String)>) -> Self {
        ReplicaConfig {
            id,
            data_dir,
            peers,
            election_tick: 10,
            heartbeat_tick: 2,
            randomized_election: true,
            snapshot_every: 20_000,
            keep_entries: 5_000,
            max_batch_bytes: 1 << 20,
            seed: id,
            gateway_reattach_ticks: 200,
            node_grace_ticks: 200,
            liveness_every_ticks: 5,
            clock: stellar_proto::clock::unix_ms,
        }
    }
}

/// A client write.
#[derive(Debug, Clone)]
pub enum Request {
    /// A command applied as is.
    Command(pb::Command),
    /// A new function version; the leader plans its replicas into the command.
    Deploy(pb::Command),
    /// One more replica of a function (one allocation, planned on the leader).
    Allocate {
        /// Makes retries safe.
        request_id: Vec<u8>,
        /// Owning tenant.
        tenant: String,
        /// Function name.
        function: String,
        /// Where its callers are (the latency stage scores from here).
        origin: Origin,
    },
    /// Adds a voter (ConfChangeV2).
    AddReplica {
        /// The new replica's id.
        id: u64,
        /// Its address.
        address: String,
    },
    /// Removes a voter (ConfChangeV2).
    RemoveReplica {
        /// The replica to remove.
        id: u64,
    },
}

/// A client read.
#[derive(Debug, Clone)]
pub enum Query {
    /// One function with its allocations.
    Function {
        /// Owning tenant.
        tenant: String,
        /// Function name.
        name: String,
    },
    /// Functions of a tenant (all tenants if `None`).
    Functions {
        /// Filter.
        tenant: Option<String>,
    },
    /// A node's receipt proof: its leaf in a closed period and the audit path.
    ReceiptProof {
        /// The node.
        node: u64,
        /// The period (None: the node's latest closed one).
        period: Option<u64>,
        /// (unix ms, signature) by the node's key; None when an admin asks.
        signed: Option<(u64, Vec<u8>)>,
    },
    /// Nodes, filtered.
    Nodes {
        /// Region filter.
        region: Option<String>,
        /// State filter.
        state: Option<NodeState>,
        /// Most nodes returned.
        limit: usize,
    },
    /// Everything changed after an applied index (`Edge.Watch`).
    WatchChanges {
        /// The watcher's last applied index.
        from: u64,
    },
    /// One page of a watcher's reset.
    WatchPage {
        /// Where the page starts.
        page: Page,
    },
    /// A stored module, by content address.
    Module {
        /// Its sha256.
        sha256: [u8; 32],
    },
    /// The usage ledger, priced (one tenant's, or everyone's if `None`).
    Usage {
        /// Filter.
        tenant: Option<String>,
        /// Only usage recorded in this unix hour or later.
        since_hour: u64,
        /// Also the cells and the receipt totals (admin, for the audit).
        cells: bool,
    },
    /// Who a token belongs to, by its sha256.
    Token {
        /// The token's sha256.
        sha256: Vec<u8>,
    },
    /// Whether any admin token exists yet (the cluster was bootstrapped).
    AdminBootstrapped,
    /// One job with its tasks.
    Job {
        /// Owning tenant.
        tenant: String,
        /// Job name.
        name: String,
    },
    /// Jobs of a tenant (all tenants if `None`), without their tasks.
    Jobs {
        /// Filter.
        tenant: Option<String>,
    },
    /// Whether one of a tenant's jobs names a blob (what it may download).
    JobBlob {
        /// The tenant asking.
        tenant: String,
        /// The blob's sha256 (hex).
        sha256: String,
    },
    /// Every blob a kept job names (the blob sweep keeps them).
    JobBlobs,
}

/// What a request or read is answered with.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A write was committed and applied.
    Applied(pb::CommandResult),
    /// One function.
    Function(Box<pb::FunctionStatus>),
    /// A function listing.
    Functions(Vec<pb::FunctionStatus>),
    /// A node listing.
    Nodes(pb::ListNodesResponse),
    /// A receipt proof, or why not.
    ReceiptProof(Box<std::result::Result<pb::GetReceiptProofResponse, crate::state::ProofError>>),
    /// Membership after a change.
    Membership(Vec<pb::ReplicaInfo>),
    /// Changes for a watcher.
    Changes(Box<Changes>),
    /// A reset page and where the next starts.
    WatchPage(Box<pb::WatchEvent>, Option<Page>),
    /// A module's bytes (`None`: not stored).
    Module(Option<std::sync::Arc<[u8]>>),
    /// The priced usage ledger.
    Usage(pb::GetUsageResponse),
    /// A token's tenant and admin flag (`None`: unknown or revoked).
    Token(Option<(String, bool)>),
    /// A yes/no answer.
    Flag(bool),
    /// One job.
    Job(Box<pb::JobStatus>),
    /// A job listing.
    Jobs(Vec<pb::JobStatus>),
    /// Blob addresses.
    Blobs(std::collections::BTreeSet<String>),
}

/// What the driver must do after `process`.
#[derive(Debug)]
pub enum Output {
    /// Answer the request or read with this token.
    Reply {
        /// The driver's token.
        token: u64,
        /// The answer.
        result: Result<Reply>,
    },
    /// Deliver these messages to their `to` replicas (loss is tolerated).
    Send(Vec<Message>),
}

#[derive(Debug)]
enum PendingKind {
    Plain,
    Plan {
        request: Option<Box<Request>>,
        fid: Option<u32>,
        nodes: Vec<u64>,
        ask: Resources,
        attempt: u32,
        /// Lost allocations this plan replaces (internal re-placement).
        lost: Vec<u64>,
    },
    /// A wave of task attempts the job round placed.
    Wave {
        tasks: Vec<crate::job_driver::TaskId>,
        held: Vec<(u64, Resources)>,
    },
    /// Attempts the job round judged lost.
    Lost(Vec<crate::state::AttemptKey>),
}

#[derive(Debug)]
struct Pending {
    token: u64,
    kind: PendingKind,
}

/// Where a stalled Ready stopped (the disk refused a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Snapshot,
    Persist,
}

/// The leader's answer to a gateway's report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportReply {
    /// Nodes to register (committed before the gateway is acknowledged).
    pub register: Vec<pb::NodeRecord>,
    /// Every gateway with a session now: peers learn of one that holds no node yet.
    pub gateways: Vec<String>,
}

/// One replica; see the module docs.
pub struct Replica {
    cfg: ReplicaConfig,
    raw: RawNode<DiskStorage>,
    state: StateMachine,
    leader: Option<LeaderState>,
    role: StateRole,
    leader_id: u64,
    ticks: u64,
    next_seq: u64,
    /// Proposed batches by sequence number, one entry per command.
    pending: BTreeMap<(u64, u64), Vec<Pending>>,
    /// Requests waiting to be proposed, with their attempt count.
    queued: VecDeque<(u64, Request, u32)>,
    /// Internal commands (liveness, re-placement) waiting to be proposed.
    internal: VecDeque<(pb::Command, PendingKind)>,
    /// A membership change in flight: (term, seq, token).
    pending_conf: Option<(u64, u64, u64)>,
    reads: HashMap<u64, Query>,
    ready_reads: Vec<(u64, u64)>,
    replacing: std::collections::HashSet<u64>,
    addresses: BTreeMap<u64, String>,
    outputs: Vec<Output>,
    stalled: Option<(Ready, Stage)>,
    storage_error: Option<String>,
    removed: bool,
    snapshots_installed: u64,
    changes: ChangeLog,
    /// A task attempt ended or a job changed since the last job round: run one at the next
    /// tick instead of waiting for the round's period (a stage's next task starts within a
    /// tick of the last one's end).
    jobs_dirty: bool,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.cfg.id)
            .field("role", &self.role)
            .field("applied", &self.state.applied_index())
            .finish()
    }
}

/// An entry's proposer, the term it was proposed in and a per-process sequence number: the
/// term makes it unique across restarts (a restarted replica leads only in a later term).
fn context(proposer: u64, term: u64, seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&proposer.to_be_bytes());
    v.extend_from_slice(&term.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v
}

fn parse_context(ctx: &[u8]) -> Option<(u64, u64, u64)> {
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_be_bytes(
            ctx.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    Some((word(0)?, word(1)?, word(2)?))
}

fn command(request_id: Vec<u8>, kind: pb::command::Kind) -> pb::Command {
    pb::Command {
        request_id,
        kind: Some(kind),
    }
}

impl Replica {
    /// Opens the replica's storage and state: a new data dir bootstraps from the peer list; an
    /// existing one restores its snapshot and replays its log, and refuses a peer list that
    /// contradicts the membership it stored.
    pub fn open(cfg: ReplicaConfig) -> Result<Replica> {
        if cfg.id == 0 {
            return Err(Error::Config("replica id must be non-zero".into()));
        }
        let mut store = DiskStorage::open(&cfg.data_dir)?;
        let voters: Vec<u64> = cfg.peers.iter().map(|p| p.0).collect();
        if !cfg.peers.is_empty() && !voters.contains(&cfg.id) {
            return Err(Error::Config(format!(
                "--peers lists {voters:?} but not this replica's id {}; add `{}=ADDR`",
                cfg.id, cfg.id
            )));
        }
        if store.is_fresh() {
            if !cfg.peers.is_empty() {
                store.bootstrap(&voters)?;
            }
        } else {
            check_membership(&cfg, &store)?;
        }
        let mut state = StateMachine::new();
        if let Some((meta, data)) = store.read_snapshot_file()? {
            let snap = pb::StateSnapshot::decode(&data[..]).map_err(|e| {
                Error::Storage(format!(
                    "snapshot at index {} does not decode: {e}",
                    meta.index
                ))
            })?;
            state = StateMachine::from_snapshot(snap)
                .map_err(|e| Error::Storage(format!("snapshot is inconsistent: {e}")))?;
            state.set_applied_index(meta.index);
        }
        let applied = state.applied_index();
        let mut rc = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            max_uncommitted_size: 512 << 20,
            max_committed_size_per_ready: 16 << 20,
            ..Default::default()
        };
        if !cfg.randomized_election {
            rc.min_election_tick = cfg.election_tick;
            rc.max_election_tick = cfg.election_tick + 1;
        }
        rc.validate()
            .map_err(|e| Error::Config(format!("raft configuration: {e}")))?;
        let raw = RawNode::new(&rc, store, &raft_logger(cfg.id))
            .map_err(|e| Error::Config(format!("raft: {e}")))?;
        let mut addresses: BTreeMap<u64, String> = cfg.peers.iter().cloned().collect();
        for (id, a) in state.replica_addresses() {
            addresses.insert(*id, a.clone());
        }
        for (id, a) in raw.store().members() {
            addresses.entry(id).or_insert(a);
        }
        Ok(Replica {
            cfg,
            raw,
            changes: ChangeLog::new(state.applied_index()),
            jobs_dirty: false,
            state,
            leader: None,
            role: StateRole::Follower,
            leader_id: 0,
            ticks: 0,
            next_seq: 1,
            pending: BTreeMap::new(),
            queued: VecDeque::new(),
            internal: VecDeque::new(),
            pending_conf: None,
            reads: HashMap::new(),
            ready_reads: Vec::new(),
            replacing: Default::default(),
            addresses,
            outputs: Vec::new(),
            stalled: None,
            storage_error: None,
            removed: false,
            snapshots_installed: 0,
        })
    }

    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    /// The committed state (as applied here).
    pub fn state(&self) -> &StateMachine {
        &self.state
    }

    /// Whether this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.role == StateRole::Leader
    }

    /// The leader's id as far as this replica knows (0 = unknown).
    pub fn leader_id(&self) -> u64 {
        self.leader_id
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The commit index.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// The address of replica `id`, from the peer list and committed membership.
    pub fn address_of(&self, id: u64) -> Option<&str> {
        self.addresses.get(&id).map(String::as_str)
    }

    /// Records a peer's address if none is known (from the peer's own introduction).
    pub fn learn_address(&mut self, id: u64, address: String) {
        if id != 0 && id != self.cfg.id && !address.is_empty() {
            self.addresses.entry(id).or_insert(address);
        }
    }

    /// Every known replica address.
    pub fn addresses(&self) -> &BTreeMap<u64, String> {
        &self.addresses
    }

    /// Whether this replica was removed from the cluster (it should shut down).
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// The storage error that stalls this replica, if any.
    pub fn storage_error(&self) -> Option<&str> {
        self.storage_error.as_deref()
    }

    /// Takes what the driver must deliver.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    fn not_leader(&self) -> Error {
        let leader = (self.leader_id != 0).then_some(self.leader_id);
        Error::NotLeader {
            leader,
            address: leader.and_then(|l| self.address_of(l).map(str::to_string)),
        }
    }

    fn reply(&mut self, token: u64, result: Result<Reply>) {
        if token != 0 {
            self.outputs.push(Output::Reply { token, result });
        }
    }

    /// Advances logical time by one tick (the driver's clock, e.g. every 50 ms).
    pub fn tick(&mut self) {
        if self.stalled.is_some() {
            return;
        }
        self.ticks += 1;
        self.raw.tick();
        let round = self
            .ticks
            .is_multiple_of(self.cfg.liveness_every_ticks.max(1));
        if self.is_leader() && round {
            self.liveness_round();
        }
        if self.is_leader() && (round || self.jobs_dirty) {
            self.jobs_dirty = false;
            self.job_round();
        }
    }

    /// Steps a message from a peer; messages are dropped while the replica is stalled.
    pub fn step(&mut self, msg: Message) {
        if self.stalled.is_some() {
            return;
        }
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(replica = self.cfg.id, error = %e, "dropped a raft message");
        }
    }

    /// Queues a client write; it is answered after commit and apply (or refused now).
    pub fn submit(&mut self, token: u64, request: Request) {
        if let Some(e) = &self.storage_error {
            let e = Error::Storage(format!("{e}; writes resume when the disk accepts them"));
            self.reply(token, Err(e));
            return;
        }
        self.queued.push_back((token, request, 0));
    }

    /// A linearizable read (ReadIndex), or a read of local state if `stale`.
    pub fn read(&mut self, token: u64, query: Query, stale: bool) {
        if stale {
            let r = self.answer(&query);
            self.reply(token, r);
            return;
        }
        self.reads.insert(token, query);
        self.raw.read_index(token.to_be_bytes().to_vec());
    }

    /// A read timed out in the driver: forget it.
    pub fn cancel_read(&mut self, token: u64) {
        self.reads.remove(&token);
    }

    /// A gateway opened a session with this leader.
    pub fn gateway_open(&mut self, address: &str, session: u64) -> Result<()> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.ensure_leader_state()?
            .liveness
            .open(address, session)
            .map_err(|e| ApplyError::Invalid(e.to_string()).into())
    }

    /// A gateway's report: the soft state takes its deltas at once; the nodes to register
    /// (new, or with a new key or attributes) come back to be committed before the gateway
    /// is acknowledged. Transitions are committed by the next liveness rounds.
    pub fn gateway_report(
        &mut self,
        session: u64,
        report: &pb::GatewayReport,
    ) -> Result<ReportReply> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.ensure_leader_state()?;
        let leader = self.leader.as_mut().expect("ensured");
        for l in &report.loads {
            if let Some(c) = l.coordinate.as_ref().and_then(coordinate_of) {
                leader.set_coordinate(l.node, c);
            }
        }
        let register = leader
            .liveness
            .report(&self.state, session, report)
            .map_err(|e| Error::from(ApplyError::Invalid(e.to_string())))?;
        Ok(ReportReply {
            register,
            gateways: leader.liveness.live_gateways(),
        })
    }

    /// A gateway's session ended (stream closed or silent): unless its nodes re-attach
    /// elsewhere within the window, they go down.
    pub fn gateway_closed(&mut self, address: &str, session: u64) {
        let now = self.ticks;
        if let Some(l) = self.leader.as_mut() {
            l.liveness.close(address, session, now);
        }
    }

    /// A peer could not be reached.
    pub fn report_unreachable(&mut self, id: u64) {
        if self.stalled.is_none() {
            self.raw.report_unreachable(id);
        }
    }

    /// A snapshot send finished.
    pub fn report_snapshot(&mut self, id: u64, ok: bool) {
        if self.stalled.is_none() {
            let status = if ok {
                SnapshotStatus::Finish
            } else {
                SnapshotStatus::Failure
            };
            self.raw.report_snapshot(id, status);
        }
    }

    /// Asks raft to hand leadership to `id` (used before removing the leader).
    pub fn transfer_leader(&mut self, id: u64) {
        if self.stalled.is_none() {
            self.raw.transfer_leader(id);
        }
    }

    fn ensure_leader_state(&mut self) -> Result<&mut LeaderState> {
        if self.leader.is_none() {
            let seed = self.cfg.seed ^ self.raw.raft.term.rotate_left(17);
            let built = LeaderState::build(
                &self.state,
                seed,
                self.ticks,
                (self.cfg.node_grace_ticks, self.cfg.gateway_reattach_ticks),
            )?;
            tracing::info!(
                replica = self.cfg.id,
                term = self.raw.raft.term,
                nodes = built.nodes(),
                "leader soft state rebuilt from committed state"
            );
            self.leader = Some(built);
        }
        Ok(self.leader.as_mut().expect("just built"))
    }

    /// Proposes queued work and runs the Ready protocol until raft has nothing more; the
    /// outputs wait in [`Replica::take_outputs`].
    pub fn process(&mut self) {
        self.process_with(&mut |_| {});
    }

    /// [`Replica::process`], handing outputs to `flush` as soon as they exist: the leader's
    /// appends go out before its own fsync (raft thesis §10.2.1), a follower's acks before it
    /// applies, and replies before the next round, instead of all at the end.
    pub fn process_with(&mut self, flush: &mut dyn FnMut(&mut Vec<Output>)) {
        for _ in 0..16 {
            if let Some((rd, stage)) = self.stalled.take() {
                self.resume_ready(rd, stage, flush);
                if self.stalled.is_some() {
                    return;
                }
            }
            self.propose_queued();
            if !self.raw.has_ready() {
                break;
            }
            let mut rd = self.raw.ready();
            if !rd.messages().is_empty() {
                self.outputs.push(Output::Send(rd.take_messages()));
                flush(&mut self.outputs);
            }
            self.resume_ready(rd, Stage::Snapshot, flush);
            flush(&mut self.outputs);
            if self.stalled.is_some() {
                return;
            }
        }
        self.maybe_snapshot();
    }

    fn resume_ready(
        &mut self,
        mut rd: Ready,
        stage: Stage,
        flush: &mut dyn FnMut(&mut Vec<Output>),
    ) {
        if stage == Stage::Snapshot && !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            if let Err(e) = self.install_snapshot(&snap) {
                self.stall(rd, Stage::Snapshot, e);
                return;
            }
        }
        if let Err(e) = self.raw.mut_store().persist(
            rd.entries(),
            rd.hs(),
            rd.must_sync() || !rd.entries().is_empty(),
        ) {
            self.stall(rd, Stage::Persist, e);
            return;
        }
        if self.storage_error.take().is_some() {
            tracing::info!(replica = self.cfg.id, "storage accepts writes again");
        }
        if !rd.persisted_messages().is_empty() {
            self.outputs
                .push(Output::Send(rd.take_persisted_messages()));
            flush(&mut self.outputs);
        }
        // Committed entries are already persisted here (raft-rs hands out only persisted
        // ones), so applying them after this Ready's own writes is safe and keeps the acks
        // above off the apply path.
        let committed = rd.take_committed_entries();
        self.apply_entries(committed);
        for rs in rd.take_read_states() {
            if let Ok(bytes) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) {
                self.ready_reads.push((rs.index, u64::from_be_bytes(bytes)));
            }
        }
        if let Some(ss) = rd.ss() {
            let (role, leader) = (ss.raft_state, ss.leader_id);
            self.on_soft_state(role, leader);
        }
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index()
            && let Err(e) = self.raw.mut_store().set_commit(commit)
        {
            tracing::warn!(replica = self.cfg.id, error = %e, "could not record the commit index");
        }
        let msgs = light.take_messages();
        if !msgs.is_empty() {
            self.outputs.push(Output::Send(msgs));
        }
        let committed = light.take_committed_entries();
        self.apply_entries(committed);
        self.raw.advance_apply();
        self.serve_reads();
    }

    fn stall(&mut self, rd: Ready, stage: Stage, e: Error) {
        if self.storage_error.is_none() {
            tracing::error!(
                replica = self.cfg.id,
                error = %e,
                "storage refused a write; this replica pauses (committed data is intact) and retries"
            );
        }
        self.storage_error = Some(e.to_string());
        let queued: Vec<u64> = self.queued.drain(..).map(|q| q.0).collect();
        for token in queued {
            self.reply(token, Err(Error::Storage(e.to_string())));
        }
        self.stalled = Some((rd, stage));
    }

    fn install_snapshot(&mut self, snap: &raft::eraftpb::Snapshot) -> Result<()> {
        let decoded = pb::StateSnapshot::decode(&snap.data[..])
            .map_err(|e| Error::Storage(format!("received snapshot does not decode: {e}")))?;
        let mut state = StateMachine::from_snapshot(decoded)
            .map_err(|e| Error::Storage(format!("received snapshot is inconsistent: {e}")))?;
        self.raw.mut_store().apply_snapshot(snap)?;
        state.set_applied_index(snap.get_metadata().index);
        for (id, a) in state.replica_addresses() {
            self.addresses.insert(*id, a.clone());
        }
        self.state = state;
        self.leader = None;
        self.snapshots_installed += 1;
        self.changes.restart(snap.get_metadata().index);
        tracing::info!(
            replica = self.cfg.id,
            index = snap.get_metadata().index,
            "installed a snapshot from the leader"
        );
        Ok(())
    }

    fn on_soft_state(&mut self, role: StateRole, leader: u64) {
        let was_leader = self.role == StateRole::Leader;
        if role != self.role || leader != self.leader_id {
            tracing::info!(
                replica = self.cfg.id,
                term = self.raw.raft.term,
                ?role,
                leader,
                "role changed"
            );
        }
        self.role = role;
        self.leader_id = leader;
        let term = self.raw.raft.term;
        let stale_pending = self.pending.keys().any(|(t, _)| *t != term);
        if role == StateRole::Leader && !was_leader {
            // Voters' addresses known only from --peers go into the replicated state, so a
            // replica added later (or restored from a snapshot) can reach everyone.
            let missing: Vec<(u64, String)> = self
                .voters()
                .into_iter()
                .filter(|v| !self.state.replica_addresses().contains_key(v))
                .filter_map(|v| self.addresses.get(&v).map(|a| (v, a.clone())))
                .collect();
            for (id, address) in missing {
                let cmd = command(
                    Vec::new(),
                    pb::command::Kind::ReplicaAddress(pb::SetReplicaAddressCmd {
                        id,
                        address,
                        remove: false,
                    }),
                );
                self.internal.push_back((cmd, PendingKind::Plain));
            }
        }
        if (was_leader && role != StateRole::Leader) || stale_pending {
            self.leader = None;
            self.replacing.clear();
            self.internal.clear();
            let pending: Vec<Pending> = std::mem::take(&mut self.pending)
                .into_values()
                .flatten()
                .collect();
            for p in pending {
                self.reply(p.token, Err(Error::OutcomeUnknown));
            }
            if let Some((_, _, token)) = self.pending_conf.take() {
                self.reply(token, Err(Error::OutcomeUnknown));
            }
        }
        if role == StateRole::Leader && !was_leader {
            self.replace_stranded();
        }
    }

    fn propose_queued(&mut self) {
        if self.queued.is_empty() && self.internal.is_empty() {
            return;
        }
        if !self.is_leader() {
            let err = self.not_leader();
            let queued: Vec<u64> = self.queued.drain(..).map(|q| q.0).collect();
            for token in queued {
                self.reply(token, Err(err.clone()));
            }
            self.internal.clear();
            return;
        }
        let mut batch = pb::CommandBatch::default();
        let mut batch_pending: Vec<Pending> = Vec::new();
        let mut bytes = 0usize;
        while let Some((cmd, kind)) = self.internal.pop_front() {
            bytes += cmd.encoded_len();
            batch.commands.push(cmd);
            batch_pending.push(Pending { token: 0, kind });
        }
        while let Some((token, request, attempt)) = self.queued.pop_front() {
            match self.prepare(token, request, attempt) {
                Ok(Some((cmd, kind))) => {
                    let len = cmd.encoded_len();
                    if bytes + len > self.cfg.max_batch_bytes && !batch.commands.is_empty() {
                        self.propose_batch(
                            std::mem::take(&mut batch),
                            std::mem::take(&mut batch_pending),
                        );
                        bytes = 0;
                    }
                    bytes += len;
                    batch.commands.push(cmd);
                    batch_pending.push(Pending { token, kind });
                }
                Ok(None) => {}
                Err(e) => self.reply(token, Err(e)),
            }
        }
        if !batch.commands.is_empty() {
            self.propose_batch(batch, batch_pending);
        }
    }

    fn propose_batch(&mut self, batch: pb::CommandBatch, pending: Vec<Pending>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let data = batch.encode_to_vec();
        let term = self.raw.raft.term;
        match self.raw.propose(context(self.cfg.id, term, seq), data) {
            Ok(()) => {
                self.pending.insert((term, seq), pending);
            }
            Err(e) => {
                let err = match e {
                    raft::Error::ProposalDropped if self.is_leader() => Error::Overloaded,
                    _ => self.not_leader(),
                };
                for p in pending {
                    self.undo_plan(&p.kind);
                    self.reply(p.token, Err(err.clone()));
                }
            }
        }
    }

    fn undo_plan(&mut self, kind: &PendingKind) {
        if let Some(l) = self.leader.as_mut() {
            match kind {
                PendingKind::Wave { tasks, held } => {
                    l.release_tasks(held);
                    l.jobs.wave_done(tasks);
                }
                PendingKind::Lost(keys) => l.jobs.lost_done(keys),
                _ => {}
            }
        }
        if let PendingKind::Plan {
            fid,
            nodes,
            ask,
            lost,
            ..
        } = kind
        {
            if let Some(l) = self.leader.as_mut() {
                l.plan_done(*fid, nodes, *ask, false);
            }
            for a in lost {
                self.replacing.remove(a);
            }
        }
    }

    /// Turns a request into the command to propose (planning placements on the leader).
    fn prepare(
        &mut self,
        token: u64,
        request: Request,
        attempt: u32,
    ) -> Result<Option<(pb::Command, PendingKind)>> {
        match request {
            Request::Command(cmd) => Ok(Some((cmd, PendingKind::Plain))),
            Request::Deploy(cmd) => {
                let seen = cmd.kind.as_ref().and_then(|k| {
                    self.state
                        .deduped(DedupeScope::of(k), &cmd.request_id)
                        .cloned()
                });
                if let Some(r) = seen {
                    self.reply(token, result_of(r).map(Reply::Applied).map_err(Error::from));
                    return Ok(None);
                }
                self.prepare_deploy(cmd, attempt).map(Some)
            }
            Request::Allocate {
                request_id,
                tenant,
                function,
                origin,
            } => {
                let scope = DedupeScope {
                    method: "plan",
                    tenant: &tenant,
                };
                if let Some(r) = self.state.deduped(scope, &request_id) {
                    let r = r.clone();
                    self.reply(token, result_of(r).map(Reply::Applied).map_err(Error::from));
                    return Ok(None);
                }
                let (fid, f) = self.state.function(&tenant, &function).ok_or_else(|| {
                    ApplyError::NotFound(format!(
                        "function {} not found",
                        crate::state::shown(&format!("{tenant}/{function}"))
                    ))
                })?;
                let version = f.current().expect("live function has a version").clone();
                let original = Request::Allocate {
                    request_id: request_id.clone(),
                    tenant: tenant.clone(),
                    function: function.clone(),
                    origin: origin.clone(),
                };
                let nodes = self.plan(Some(fid), (&tenant, &function), &version, 1, origin)?;
                let cmd = command(
                    request_id,
                    pb::command::Kind::Plan(pb::PlanCmd {
                        tenant,
                        function,
                        version: version.version,
                        place_on: nodes.clone(),
                        stop: vec![],
                        lost: vec![],
                        grow: true,
                    }),
                );
                Ok(Some((
                    cmd,
                    PendingKind::Plan {
                        request: Some(Box::new(original)),
                        fid: Some(fid),
                        nodes,
                        ask: version.reservation(),
                        attempt,
                        lost: vec![],
                    },
                )))
            }
            Request::AddReplica { id, address } => {
                self.propose_conf_change(token, id, Some(address))?;
                Ok(None)
            }
            Request::RemoveReplica { id } => {
                self.propose_conf_change(token, id, None)?;
                Ok(None)
            }
        }
    }

    fn plan(
        &mut self,
        fid: Option<u32>,
        key: (&str, &str),
        version: &FunctionVersion,
        count: u32,
        origin: Origin,
    ) -> Result<Vec<u64>> {
        self.ensure_leader_state()?;
        let leader = self.leader.as_mut().expect("ensured");
        leader.plan(&self.state, fid, key, version, count, origin)
    }

    fn prepare_deploy(
        &mut self,
        mut cmd: pb::Command,
        attempt: u32,
    ) -> Result<(pb::Command, PendingKind)> {
        // Kept with its module bytes: if the stored copy is freed before this applies, the
        // re-plan sends them.
        let original = Request::Deploy(cmd.clone());
        let Some(pb::command::Kind::Deploy(d)) = cmd.kind.as_mut() else {
            return Err(Error::Apply(ApplyError::Invalid("not a deploy".into())));
        };
        crate::state::validate_name("function", &d.name)?;
        if !self.state.has_tenant(&d.tenant) {
            return Err(ApplyError::NotFound(format!(
                "tenant {} not found",
                crate::state::shown(&d.tenant)
            ))
            .into());
        }
        if let Some(i) = &d.image {
            stellar_proto::limits::check_image(i).map_err(ApplyError::Invalid)?;
        }
        if d.module_sha256.is_empty() && !d.module.is_empty() {
            d.module_sha256 = Sha256::digest(&d.module).to_vec();
        }
        if let Ok(sha) = <[u8; 32]>::try_from(d.module_sha256.as_slice())
            && self.state.module(&sha).is_some()
        {
            d.module.clear();
        }
        let version = FunctionVersion {
            version: 0,
            module_sha256: [0; 32],
            limits: d.limits.unwrap_or_default(),
            replicas: d.replicas,
            region: d.region.clone(),
            constraints: d.constraints.clone(),
            idempotent: d.idempotent,
            load_failures: 0,
            load_error: String::new(),
            failed_nodes: Vec::new(),
            image: d.image.clone(),
        };
        if version.limits.memory_mib == 0 {
            return Err(ApplyError::Invalid("memory must be at least 1 MiB".into()).into());
        }
        if d.replicas > crate::state::MAX_REPLICAS {
            return Err(ApplyError::Invalid(format!(
                "replicas must be 0..={} (0: placed on the first call), got {}",
                crate::state::MAX_REPLICAS,
                d.replicas
            ))
            .into());
        }
        let fid = self.state.function(&d.tenant, &d.name).map(|(id, _)| id);
        let origin = origin_of(&d.near_region, &d.near_zone, None);
        let nodes = if d.replicas == 0 {
            Vec::new()
        } else {
            let (tenant, name) = (d.tenant.clone(), d.name.clone());
            self.plan(None, (&tenant, &name), &version, d.replicas, origin)?
        };
        d.place_on = nodes.clone();
        Ok((
            cmd,
            PendingKind::Plan {
                request: Some(Box::new(original)),
                fid,
                nodes,
                ask: version.reservation(),
                attempt,
                lost: vec![],
            },
        ))
    }

    fn propose_conf_change(&mut self, token: u64, id: u64, address: Option<String>) -> Result<()> {
        if self.pending_conf.is_some() || self.raw.raft.has_pending_conf() {
            return Err(Error::Apply(ApplyError::Invalid(
                "another membership change is in progress; retry when it completes".into(),
            )));
        }
        if id == 0 {
            return Err(Error::Apply(ApplyError::Invalid(
                "replica id 0 is reserved".into(),
            )));
        }
        let voters = self.voters();
        match &address {
            Some(a) => {
                if voters.contains(&id) {
                    return Err(ApplyError::AlreadyExists(format!(
                        "replica {id} is already a member"
                    ))
                    .into());
                }
                if a.is_empty() {
                    return Err(
                        ApplyError::Invalid("the new replica needs an address".into()).into(),
                    );
                }
            }
            None => {
                if !voters.contains(&id) {
                    return Err(
                        ApplyError::NotFound(format!("replica {id} is not a member")).into(),
                    );
                }
                if voters.len() == 1 {
                    return Err(ApplyError::Invalid("cannot remove the last replica".into()).into());
                }
                if id == self.cfg.id {
                    let to = voters
                        .iter()
                        .copied()
                        .find(|v| *v != id)
                        .expect("more than one");
                    self.raw.transfer_leader(to);
                    return Err(self.not_leader());
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut single = ConfChangeSingle {
            node_id: id,
            ..Default::default()
        };
        single.set_change_type(if address.is_some() {
            ConfChangeType::AddNode
        } else {
            ConfChangeType::RemoveNode
        });
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        let term = self.raw.raft.term;
        let ctx = format!(
            "{} {} {} {}",
            self.cfg.id,
            term,
            seq,
            address.unwrap_or_default()
        );
        self.raw
            .propose_conf_change(ctx.into_bytes(), cc)
            .map_err(|_| self.not_leader())?;
        self.pending_conf = Some((term, seq, token));
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&e),
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    if cc.merge_from_bytes(&e.data).is_ok() {
                        self.apply_conf_change(&cc, &e.context);
                    }
                }
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    if cc.merge_from_bytes(&e.data).is_ok() {
                        let v2 = cc.into_v2();
                        self.apply_conf_change(&v2, &e.context);
                    }
                }
            }
            self.state.set_applied_index(e.index);
        }
    }

    fn apply_normal(&mut self, e: &Entry) {
        if e.data.is_empty() {
            return;
        }
        let batch = match pb::CommandBatch::decode(&e.data[..]) {
            Ok(b) => b,
            Err(err) => {
                tracing::error!(replica = self.cfg.id, index = e.index, error = %err, "undecodable log entry skipped");
                return;
            }
        };
        let mut mine = match parse_context(&e.context) {
            Some((proposer, term, seq)) if proposer == self.cfg.id => {
                self.pending.remove(&(term, seq))
            }
            _ => None,
        };
        for (i, cmd) in batch.commands.into_iter().enumerate() {
            let mut fx = Effects::default();
            let addresses = matches!(cmd.kind, Some(pb::command::Kind::ReplicaAddress(_)));
            let keys = crate::changes::keys_of(&cmd);
            let result = self.state.apply(e.index, cmd, &mut fx);
            self.changes.record(e.index, keys, &fx, &self.state);
            if addresses {
                for (id, a) in self.state.replica_addresses() {
                    if *id != self.cfg.id {
                        self.addresses.insert(*id, a.clone());
                    }
                }
            }
            let accepted = result.error_code.is_empty();
            let pending = mine
                .as_mut()
                .and_then(|m| m.get_mut(i))
                .map(|p| (p.token, std::mem::replace(&mut p.kind, PendingKind::Plain)));
            let mut own_placed = false;
            let mut own_started = false;
            if let Some((token, kind)) = pending {
                match kind {
                    PendingKind::Wave { tasks, held } => {
                        if let Some(l) = self.leader.as_mut() {
                            l.jobs.wave_done(&tasks);
                            if accepted {
                                own_started = true;
                            } else {
                                tracing::debug!(replica = self.cfg.id, reason = %result.error_message, "a task wave was refused; re-placing next round");
                                l.release_tasks(&held);
                            }
                        }
                    }
                    PendingKind::Lost(keys) => {
                        if let Some(l) = self.leader.as_mut() {
                            l.jobs.lost_done(&keys);
                        }
                    }
                    PendingKind::Plain => self.reply(
                        token,
                        result_of(result).map(Reply::Applied).map_err(Error::from),
                    ),
                    PendingKind::Plan {
                        request,
                        fid,
                        nodes,
                        ask,
                        attempt,
                        lost,
                    } => {
                        if let Some(l) = self.leader.as_mut() {
                            l.plan_done(fid, &nodes, ask, accepted);
                            own_placed = accepted;
                        }
                        for a in &lost {
                            self.replacing.remove(a);
                        }
                        let stale = result.error_code == crate::error::STALE_PLAN;
                        match request {
                            Some(req) if stale && attempt + 1 < MAX_PLAN_ATTEMPTS => {
                                tracing::debug!(replica = self.cfg.id, attempt, reason = %result.error_message, "re-planning a stale plan");
                                self.queued.push_back((token, *req, attempt + 1));
                            }
                            _ => self.reply(
                                token,
                                result_of(result).map(Reply::Applied).map_err(Error::from),
                            ),
                        }
                    }
                }
            }
            if let Some(l) = self.leader.as_mut() {
                l.observe(&self.state, &fx, own_placed);
                l.observe_tasks(&fx, own_started);
                l.liveness.observe(&fx.nodes_changed);
                l.liveness.observe(&fx.nodes_joined);
            }
            if !fx.jobs.is_empty() || !fx.tasks_ended.is_empty() {
                self.jobs_dirty = true;
            }
            if self.is_leader() && !fx.nodes_down.is_empty() {
                self.queue_replacements(&fx.nodes_down);
            }
            if self.is_leader() {
                for &fid in &fx.load_failed {
                    self.queue_load_replacement(fid);
                }
            }
        }
    }

    fn apply_conf_change(&mut self, cc: &ConfChangeV2, ctx: &[u8]) {
        let ctx = String::from_utf8_lossy(ctx).into_owned();
        let mut parts = ctx.splitn(4, ' ');
        let proposer: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let term: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let seq: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let address = parts.next().unwrap_or("").to_string();
        let result = self.raw.apply_conf_change(cc);
        let mine = proposer == self.cfg.id
            && self
                .pending_conf
                .is_some_and(|(t, s, _)| t == term && s == seq);
        let token = if mine {
            self.pending_conf.take().map(|(_, _, t)| t).unwrap_or(0)
        } else {
            0
        };
        match result {
            Ok(cs) => {
                for c in cc.get_changes() {
                    match c.get_change_type() {
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            if !address.is_empty() {
                                self.state
                                    .set_replica_address(c.node_id, Some(address.clone()));
                                self.addresses.insert(c.node_id, address.clone());
                            }
                        }
                        ConfChangeType::RemoveNode => {
                            self.state.set_replica_address(c.node_id, None);
                            if c.node_id == self.cfg.id {
                                self.removed = true;
                            }
                        }
                    }
                }
                let members: Vec<(u64, String)> = cs
                    .voters
                    .iter()
                    .map(|&id| (id, self.addresses.get(&id).cloned().unwrap_or_default()))
                    .collect();
                if let Err(e) = self.raw.mut_store().set_members(&members) {
                    tracing::warn!(replica = self.cfg.id, error = %e, "could not record membership");
                }
                tracing::info!(replica = self.cfg.id, voters = ?cs.voters, "membership changed");
                let info = self.membership();
                self.reply(token, Ok(Reply::Membership(info)));
            }
            Err(e) => {
                self.reply(
                    token,
                    Err(ApplyError::Invalid(format!("membership change refused: {e}")).into()),
                );
            }
        }
    }

    /// Current voter ids, ascending (the conf's set iterates in hash order).
    pub fn voters(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        ids.sort_unstable();
        ids
    }

    /// Current voters with their addresses.
    pub fn membership(&self) -> Vec<pb::ReplicaInfo> {
        self.voters()
            .into_iter()
            .map(|id| pb::ReplicaInfo {
                id,
                address: self.addresses.get(&id).cloned().unwrap_or_default(),
                voter: true,
            })
            .collect()
    }

    /// Places one replica of function `fid` instead of one that failed to load, away from
    /// the nodes where it failed (the version records them).
    fn queue_load_replacement(&mut self, fid: u32) {
        if let Some(name) = self.queue_replacement(fid, None) {
            tracing::info!(replica = self.cfg.id, function = %name, "re-placing a replica whose module failed to load");
        }
    }

    fn queue_replacements(&mut self, nodes: &[u64]) {
        let lost = LeaderState::lost_allocations(&self.state, nodes);
        for a in lost {
            if self.replacing.insert(a.id) {
                self.queue_replacement(a.function, Some(a.id));
            }
        }
    }

    /// Queues a plan for one replica of function `fid`'s current version in place of one
    /// gone (`lost`: the allocation it replaces, still committed) or already removed (a load
    /// failure); the function's name when a plan was queued.
    fn queue_replacement(&mut self, fid: u32, lost: Option<u64>) -> Option<String> {
        let f = self.state.function_by_id(fid)?;
        let version = f.current().cloned()?;
        let (tenant, name) = (f.tenant.clone(), f.name.clone());
        let nodes = match self.plan(Some(fid), (&tenant, &name), &version, 1, Origin::Anywhere) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(replica = self.cfg.id, function = %name, error = %e, "replica cannot be re-placed now");
                // A lost replica is still removed (with nothing in its place).
                lost?;
                Vec::new()
            }
        };
        let lost: Vec<u64> = lost.into_iter().collect();
        let cmd = command(
            Vec::new(),
            pb::command::Kind::Plan(pb::PlanCmd {
                tenant,
                function: name.clone(),
                version: version.version,
                place_on: nodes.clone(),
                stop: vec![],
                lost: lost.clone(),
                grow: false,
            }),
        );
        self.internal.push_back((
            cmd,
            PendingKind::Plan {
                request: None,
                fid: Some(fid),
                nodes,
                ask: version.reservation(),
                attempt: 0,
                lost,
            },
        ));
        Some(name)
    }

    /// The leader's liveness round: transitions of the nodes whose gateway said something
    /// (or whose gateway died) go into one command; the work is O(those nodes), never O(N).
    fn liveness_round(&mut self) {
        let now = self.ticks;
        if self.ensure_leader_state().is_err() {
            return;
        }
        let leader = self.leader.as_mut().expect("ensured");
        let transitions = leader.liveness.transitions(&self.state, now, 10_000);
        if transitions.is_empty() {
            return;
        }
        let down = transitions
            .iter()
            .filter(|t| t.state == pb::NodeState::Down as i32)
            .count();
        tracing::info!(
            replica = self.cfg.id,
            down,
            other = transitions.len() - down,
            "committing node liveness transitions"
        );
        let cmd = command(
            Vec::new(),
            pb::command::Kind::NodeTransitions(pb::NodeTransitionsCmd { transitions }),
        );
        self.internal.push_back((cmd, PendingKind::Plain));
    }

    /// The leader's job round: lost attempts, waves of pending tasks and backup copies of
    /// stragglers become internal commands (`job_driver.rs`).
    fn job_round(&mut self) {
        if self.state.jobs().is_empty() || self.ensure_leader_state().is_err() {
            return;
        }
        let now = (self.cfg.clock)();
        let leader = self.leader.as_mut().expect("ensured");
        let mut driver = std::mem::take(&mut leader.jobs);
        let round = driver.round(&self.state, leader, now);
        leader.jobs = driver;
        tracing::debug!(
            replica = self.cfg.id,
            lost = round.lost.len(),
            waves = round.waves.len(),
            "job round"
        );
        if !round.lost.is_empty() {
            tracing::info!(
                replica = self.cfg.id,
                attempts = round.lost.len(),
                "task attempts lost with their nodes"
            );
            let keys = round.lost.iter().map(|(_, k)| *k).collect();
            let cmd = command(
                Vec::new(),
                pb::command::Kind::TaskReports(pb::TaskReportsCmd {
                    reports: round.lost.into_iter().map(|(r, _)| r).collect(),
                    unix_ms: now,
                }),
            );
            self.internal.push_back((cmd, PendingKind::Lost(keys)));
        }
        for w in round.waves {
            let cmd = command(Vec::new(), pb::command::Kind::StartAttempts(w.command));
            self.internal.push_back((
                cmd,
                PendingKind::Wave {
                    tasks: w.tasks,
                    held: w.held,
                },
            ));
        }
    }

    /// Once per leadership: replicas a previous leader left on down nodes are re-placed.
    fn replace_stranded(&mut self) {
        let down_nodes: Vec<u64> = self
            .state
            .nodes()
            .iter()
            .filter(|(_, n)| {
                n.allocations > 0 && matches!(n.state, NodeState::Down | NodeState::Quarantined)
            })
            .map(|(&id, _)| id)
            .collect();
        if !down_nodes.is_empty() {
            self.queue_replacements(&down_nodes);
        }
    }

    fn serve_reads(&mut self) {
        if self.ready_reads.is_empty() {
            return;
        }
        let applied = self.state.applied_index();
        let ready: Vec<(u64, u64)> = std::mem::take(&mut self.ready_reads);
        for (index, token) in ready {
            if index <= applied {
                if let Some(q) = self.reads.remove(&token) {
                    let r = self.answer(&q);
                    self.reply(token, r);
                }
            } else {
                self.ready_reads.push((index, token));
            }
        }
    }

    fn maybe_snapshot(&mut self) {
        let applied = self.state.applied_index();
        let snap_index = self.raw.store().snapshot_metadata().index;
        let wanted = self.raw.store().snapshot_wanted();
        let due = applied >= snap_index + self.cfg.snapshot_every;
        let asked = wanted > 0 && applied >= wanted && applied > snap_index;
        if !(due || asked) || applied == 0 || self.stalled.is_some() {
            return;
        }
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let data = self.state.to_snapshot().encode_to_vec();
        let keep = self.cfg.keep_entries;
        match self.raw.mut_store().save_snapshot(applied, cs, &data, keep) {
            Ok(()) => tracing::info!(
                replica = self.cfg.id,
                index = applied,
                bytes = data.len(),
                "saved a snapshot and compacted the log"
            ),
            Err(e) => {
                tracing::warn!(replica = self.cfg.id, error = %e, "snapshot failed; will retry")
            }
        }
    }

    /// Answers a read from the applied state.
    pub fn answer(&self, q: &Query) -> Result<Reply> {
        match q {
            Query::Function { tenant, name } => {
                let (fid, _) = self.state.function(tenant, name).ok_or_else(|| {
                    ApplyError::NotFound(format!(
                        "function {} not found in tenant {}",
                        crate::state::shown(name),
                        crate::state::shown(tenant)
                    ))
                })?;
                Ok(Reply::Function(Box::new(self.function_status(fid))))
            }
            Query::Functions { tenant } => Ok(Reply::Functions(
                self.state
                    .functions(tenant.as_deref())
                    .into_iter()
                    .map(|(id, _)| self.function_status(id))
                    .collect(),
            )),
            Query::ReceiptProof {
                node,
                period,
                signed,
            } => {
                if let Some((unix_ms, signature)) = signed {
                    let msg = stellar_proto::receipts::proof_request_message(
                        *node,
                        period.unwrap_or(0),
                        *unix_ms,
                    );
                    let by_node = self.state.nodes().get(node).is_some_and(|n| {
                        stellar_proto::receipts::signed_by(&n.public_key, &msg, signature)
                    });
                    if !by_node {
                        return Ok(Reply::ReceiptProof(Box::new(Err(
                            crate::state::ProofError::NotSigned { node: *node },
                        ))));
                    }
                }
                Ok(Reply::ReceiptProof(Box::new(
                    self.state.receipts().proof(*node, *period),
                )))
            }
            Query::Nodes {
                region,
                state,
                limit,
            } => {
                let mut out = pb::ListNodesResponse::default();
                for (&id, n) in self.state.nodes() {
                    if region
                        .as_deref()
                        .is_some_and(|r| self.state.node_location(n).0 != r)
                    {
                        continue;
                    }
                    if state.is_some_and(|s| s != n.state) {
                        continue;
                    }
                    out.total += 1;
                    if out.nodes.len() < *limit {
                        let chain = self.state.receipts().chain(id);
                        out.nodes.push(pb::NodeInfo {
                            id,
                            attributes: Some(self.state.node_attributes_pb(n)),
                            state: node_state_to_pb(n.state) as i32,
                            reputation: n.reputation,
                            allocated: Some(pb::Resources {
                                cpu_millis: n.allocated.cpu_millis,
                                memory_mib: n.allocated.memory_mib,
                                disk_mib: n.allocated.disk_mib,
                            }),
                            allocations: n.allocations,
                            gateway: self.state.node_gateway(n).to_string(),
                            receipts_recorded: chain.map_or(0, |c| c.recorded),
                            receipt_seq: chain.map_or(0, |c| c.seq),
                            receipts_refused: chain
                                .filter(|c| c.refused.iter().any(|&n| n > 0))
                                .map(|c| c.refused.to_vec())
                                .unwrap_or_default(),
                            checks_matched: chain.map_or(0, |c| c.standing.checks_matched),
                            checks_mismatched: chain.map_or(0, |c| c.standing.checks_mismatched),
                            timeouts: chain.map_or(0, |c| c.standing.timeouts),
                            lost_streams: chain.map_or(0, |c| c.standing.lost_streams),
                        });
                    }
                }
                Ok(Reply::Nodes(out))
            }
            Query::WatchChanges { from } => Ok(Reply::Changes(Box::new(
                self.changes.since(*from, &self.state),
            ))),
            Query::WatchPage { page } => {
                let (ev, next) = crate::changes::reset_page(&self.state, *page);
                Ok(Reply::WatchPage(Box::new(ev), next))
            }
            Query::Module { sha256 } => Ok(Reply::Module(self.state.module(sha256))),
            Query::Usage {
                tenant,
                since_hour,
                cells,
            } => Ok(Reply::Usage(self.usage(
                tenant.as_deref(),
                *since_hour,
                *cells,
            ))),
            Query::Token { sha256 } => Ok(Reply::Token(
                self.state.token(sha256).map(|(t, a)| (t.to_string(), a)),
            )),
            Query::AdminBootstrapped => Ok(Reply::Flag(self.state.has_admin_token())),
            Query::Job { tenant, name } => {
                let j = self.state.job(tenant, name).ok_or_else(|| {
                    ApplyError::NotFound(format!(
                        "job {} not found in tenant {}",
                        crate::state::shown(name),
                        crate::state::shown(tenant)
                    ))
                })?;
                let mut status = crate::job_status::status_of(j);
                status.applied_index = self.state.applied_index();
                Ok(Reply::Job(Box::new(status)))
            }
            Query::Jobs { tenant } => Ok(Reply::Jobs(
                self.state
                    .jobs()
                    .values()
                    .filter(|j| tenant.as_deref().is_none_or(|t| t == j.tenant))
                    .map(|j| {
                        let mut s = crate::job_status::status_of(j);
                        if let Some(j) = s.job.as_mut() {
                            j.stages.clear();
                        }
                        s
                    })
                    .collect(),
            )),
            Query::JobBlob { tenant, sha256 } => {
                Ok(Reply::Flag(self.state.tenant_job_has_blob(tenant, sha256)))
            }
            Query::JobBlobs => Ok(Reply::Blobs(self.state.job_blob_shas())),
        }
    }

    /// The bill per (tenant, function) and the credit per node: each (function, node, hour)
    /// cell priced once and split into credit and fee (see `pricing.rs`).
    fn usage(
        &self,
        tenant: Option<&str>,
        since_hour: u64,
        with_cells: bool,
    ) -> pb::GetUsageResponse {
        use crate::pricing;
        use crate::state::UsageTotals;
        #[derive(Default)]
        struct Line {
            t: UsageTotals,
            micros: u64,
        }
        let mut bill: BTreeMap<(String, String), Line> = BTreeMap::new();
        let mut credits: BTreeMap<u64, Line> = BTreeMap::new();
        let mut out = pb::GetUsageResponse::default();
        let mut cell = |tenant: &str, function: String, node: u64, hour: u64, t: &UsageTotals| {
            let (cost, credit, fee) = pricing::price_cell(t);
            let b = bill
                .entry((tenant.to_string(), function.clone()))
                .or_default();
            pricing::add(&mut b.t, t);
            b.micros += cost;
            let c = credits.entry(node).or_default();
            pricing::add(&mut c.t, t);
            c.micros += credit;
            out.platform_fee_micros += fee;
            if with_cells {
                out.cells.push(t.record((tenant, &function), node, hour));
            }
        };
        for (&(fid, node, hour), t) in self.state.usage() {
            if hour < since_hour {
                continue;
            }
            let Some(f) = self.state.function_by_id(fid) else {
                continue;
            };
            if tenant.is_some_and(|want| want != f.tenant) {
                continue;
            }
            cell(&f.tenant, f.name.clone(), node, hour, t);
        }
        // Re-execution checks bill the platform (tenant ""), and credit the checking nodes.
        if tenant.is_none() {
            for (&(node, hour), t) in self.state.receipts().check_usage() {
                if hour >= since_hour {
                    cell("", crate::state::CHECKS_FUNCTION.to_string(), node, hour, t);
                }
            }
        }
        // Jobs' tasks bill as `job/NAME` lines (the winning attempt of each task only).
        for ((t_name, job, node, hour), t) in self.state.job_usage() {
            if *hour < since_hour || tenant.is_some_and(|want| want != t_name) {
                continue;
            }
            cell(t_name, format!("job/{job}"), *node, *hour, t);
        }
        out.bill = bill
            .into_iter()
            .map(|((tenant, function), l)| pb::UsageLine {
                tenant,
                function,
                invocations: l.t.invocations,
                fuel: l.t.fuel,
                wall_us: l.t.wall_us,
                memory_mib_ms: l.t.memory_mib_ms,
                bytes_in: l.t.bytes_in,
                bytes_out: l.t.bytes_out,
                cost_micros: l.micros,
                cpu_ns: l.t.cpu_ns,
            })
            .collect();
        out.total_micros = out.bill.iter().map(|l| l.cost_micros).sum();
        out.credits = credits
            .into_iter()
            .map(|(node, l)| pb::NodeCredit {
                node,
                invocations: l.t.invocations,
                fuel: l.t.fuel,
                credit_micros: l.micros,
                cpu_ns: l.t.cpu_ns,
            })
            .collect();
        if with_cells {
            out.receipts = self
                .state
                .nodes()
                .keys()
                .filter_map(|&n| {
                    let c = self.state.receipts().chain(n)?;
                    Some(c.usage.record(("", ""), n, 0))
                })
                .collect();
        }
        out
    }

    fn function_status(&self, fid: u32) -> pb::FunctionStatus {
        let f = self.state.function_by_id(fid).expect("caller checked");
        let v = f.current().expect("live function has a version");
        let nodes: Vec<u64> = f.on_nodes.keys().copied().collect();
        pb::FunctionStatus {
            tenant: f.tenant.clone(),
            name: f.name.clone(),
            version: v.version,
            module_sha256: v.module().map(hex::encode).unwrap_or_default(),
            limits: Some(v.limits),
            replicas: v.replicas,
            region: v.region.clone(),
            allocations: f
                .on_nodes
                .values()
                .filter_map(|a| self.state.allocations().get(a))
                .map(|a| self.state.allocation_pb(a))
                .collect(),
            idempotent: v.idempotent,
            load_failures: v.load_failures,
            load_error: v.load_error.clone(),
            image: v.image.clone(),
            ready: Vec::new(),
            placements: self
                .leader
                .as_ref()
                .map(|l| l.reasons(&f.tenant, &f.name, &nodes))
                .unwrap_or_default(),
        }
    }

    /// Status as this replica sees it.
    pub fn status(&self) -> pb::ClusterStatusResponse {
        let (nodes, allocations, functions) = self.state.counts();
        pb::ClusterStatusResponse {
            id: self.cfg.id,
            leader: self.leader_id,
            term: self.raw.raft.term,
            commit_index: self.commit_index(),
            applied_index: self.state.applied_index(),
            replicas: self.membership(),
            role: format!("{:?}", self.role).to_lowercase(),
            snapshot_index: self.raw.store().snapshot_metadata().index,
            nodes: nodes as u64,
            allocations: allocations as u64,
            functions: functions as u64,
            snapshots_installed: self.snapshots_installed,
            storage_error: self.storage_error.clone().unwrap_or_default(),
        }
    }

    /// Flushes unsynced metadata (commit index, membership) on a clean shutdown.
    pub fn shutdown(&mut self) {
        if let Err(e) = self.raw.mut_store().sync() {
            tracing::warn!(replica = self.cfg.id, error = %e, "final sync failed");
        }
    }
}

/// Refuses a restart whose `--peers` contradicts the membership stored in the data dir.
fn check_membership(cfg: &ReplicaConfig, store: &DiskStorage) -> Result<()> {
    if cfg.peers.is_empty() {
        return Ok(());
    }
    let stored = store.members();
    let stored: Vec<(u64, String)> = if stored.is_empty() {
        let st = raft::Storage::initial_state(store).map_err(|e| Error::Storage(e.to_string()))?;
        st.conf_state
            .voters
            .iter()
            .map(|&v| (v, String::new()))
            .collect()
    } else {
        stored
    };
    if stored.is_empty() {
        return Ok(());
    }
    let mut want: Vec<u64> = cfg.peers.iter().map(|p| p.0).collect();
    let mut have: Vec<u64> = stored.iter().map(|p| p.0).collect();
    want.sort_unstable();
    have.sort_unstable();
    let addr_conflict = cfg.peers.iter().find(|(id, a)| {
        stored
            .iter()
            .any(|(sid, sa)| sid == id && !sa.is_empty() && sa != a)
    });
    if want != have || addr_conflict.is_some() {
        let show = |v: &[(u64, String)]| {
            v.iter()
                .map(|(id, a)| {
                    if a.is_empty() {
                        id.to_string()
                    } else {
                        format!("{id}={a}")
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        return Err(Error::Config(format!(
            "--peers {} contradicts the membership stored in {}: {}. The stored membership is \
             authoritative: start without --peers, or with exactly the stored list; change \
             membership with `stellar cluster add|remove`",
            show(&cfg.peers),
            cfg.data_dir.display(),
            show(&stored)
        )));
    }
    Ok(())
}

/// Builds the `Deploy` command a client sends (module hashed here so apply can verify it).
pub fn deploy_command(request_id: Vec<u8>, mut d: pb::DeployCmd) -> pb::Command {
    if d.module_sha256.is_empty() && d.image.is_none() {
        d.module_sha256 = Sha256::digest(&d.module).to_vec();
    }
    command(request_id, pb::command::Kind::Deploy(d))
}

/// Builds the node-state command an admin sends (drain, quarantine, return to service).
pub fn node_state_command(request_id: Vec<u8>, node: u64, state: i32) -> Result<pb::Command> {
    node_state_from_pb(state)?;
    Ok(command(
        request_id,
        pb::command::Kind::NodeTransitions(pb::NodeTransitionsCmd {
            transitions: vec![pb::NodeTransition {
                node,
                state,
                gateway: String::new(),
            }],
        }),
    ))
}

/// Where callers are, from a request's fields: the zone they named (region and zone), else
/// a coordinate (the gateway they reached), else anywhere. A region without a zone names no
/// point the latency stage can score from, so it falls through to the coordinate.
pub fn origin_of(region: &str, zone: &str, near: Option<&pb::Coordinate>) -> Origin {
    if !region.is_empty() && !zone.is_empty() {
        return Origin::Zone {
            region: region.to_string(),
            zone: zone.to_string(),
        };
    }
    match near.and_then(coordinate_of) {
        Some(c) => Origin::Coordinate(c),
        None => Origin::Anywhere,
    }
}

/// A node coordinate from the wire (None: malformed, e.g. not three dimensions).
pub fn coordinate_of(c: &pb::Coordinate) -> Option<Coordinate> {
    Coordinate::from_parts(&c.vec, c.height_ms)
}

/// Parses one `ID=HOST:PORT` peer of a `--peers` list.
pub fn parse_peer(s: &str) -> std::result::Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("peer `{s}` must be ID=HOST:PORT, e.g. 1=127.0.0.1:7001"))?;
    let id: u64 = id
        .parse()
        .map_err(|_| format!("peer id `{id}` in `{s}` is not a number"))?;
    if id == 0 {
        return Err("peer id 0 is reserved".into());
    }
    if !addr.contains(':') {
        return Err(format!("peer address `{addr}` needs a port (HOST:PORT)"));
    }
    Ok((id, addr.to_string()))
}
