//! The replicated state machine: tenants, tokens, functions, modules, nodes, allocations and
//! usage totals.
//!
//! `apply` is deterministic: no clock, no randomness, no I/O; every time or random choice was
//! made by the proposer and travels in the command. Every command is validated here, against
//! the state it is applied to, and a refused command changes nothing. Maps are ordered so a
//! snapshot's bytes depend only on the logical state (replicas compare digests of it).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use prost::Message as _;
use sha2::{Digest, Sha256};
use stellar_placement::{Arch, ArchSet, NodeState, Resources, Runtime, RuntimeSet};
use stellar_proto::v1 as pb;

use crate::error::ApplyError;

use crate::modules::ModuleStore;

mod jobs;
mod receipts;
mod reputation;
pub use crate::modules::{MAX_MODULES_TOTAL_BYTES, MAX_TENANT_MODULE_BYTES};
pub use jobs::{AttemptKey, MAX_FINISHED_JOBS, attempt_key, job_blobs, task_key};
pub use receipts::{CHECKS_FUNCTION, KEPT_PERIODS, ProofError, ReceiptChain, ReceiptLedger};
pub use reputation::{Evidence, QUARANTINE_BELOW, Standing};
pub use stellar_proto::limits::MAX_MODULE_BYTES;
/// Retried request ids remembered, oldest forgotten first.
pub const DEDUPE_CAPACITY: usize = 200_000;
/// Invocation ids remembered for usage deduplication, oldest forgotten first.
pub const SEEN_INVOCATIONS_CAPACITY: usize = 1_000_000;
/// Most nodes one registration command may carry (keeps an entry under a few MiB).
pub const MAX_NODES_PER_COMMAND: usize = 10_000;
/// Most replicas of one function.
pub const MAX_REPLICAS: u32 = 10_000;
/// Most labels on a node or constraints on a function.
pub const MAX_LABELS: usize = 32;

/// Longest client request id (16 random bytes is the usual choice).
pub const MAX_REQUEST_ID_BYTES: usize = 64;

type Result<T> = std::result::Result<T, ApplyError>;

/// What a request id is remembered under besides itself: the method and the tenant it acts
/// for (empty for cluster-wide admin commands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupeScope<'a> {
    /// The command kind, e.g. `deploy`.
    pub method: &'static str,
    /// The tenant the command acts for; empty for admin commands.
    pub tenant: &'a str,
}

impl<'a> DedupeScope<'a> {
    /// The scope of a command.
    pub fn of(kind: &'a pb::command::Kind) -> DedupeScope<'a> {
        use pb::command::Kind;
        let (method, tenant) = match kind {
            Kind::CreateTenant(_) => ("create_tenant", ""),
            Kind::PutToken(c) => ("put_token", if c.admin { "" } else { c.tenant.as_str() }),
            Kind::RevokeToken(_) => ("revoke_token", ""),
            Kind::Deploy(c) => ("deploy", c.tenant.as_str()),
            Kind::DeleteFunction(c) => ("delete_function", c.tenant.as_str()),
            Kind::RegisterNodes(_) => ("register_nodes", ""),
            Kind::NodeTransitions(_) => ("node_transitions", ""),
            Kind::Reputations(_) => ("reputations", ""),
            Kind::Plan(c) => ("plan", c.tenant.as_str()),
            Kind::Usage(_) => ("usage", ""),
            Kind::ReplicaAddress(_) => ("replica_address", ""),
            Kind::AllocationStates(_) => ("allocation_states", ""),
            Kind::SubmitJob(c) => ("submit_job", c.tenant.as_str()),
            Kind::StartAttempts(_) => ("start_attempts", ""),
            Kind::TaskReports(_) => ("task_reports", ""),
            Kind::CancelJob(c) => ("cancel_job", c.tenant.as_str()),
            Kind::TicketKey(_) => ("ticket_key", ""),
        };
        DedupeScope { method, tenant }
    }

    /// The dedupe table's key: method, tenant and request id, each length-prefixed so no
    /// two different triples share a key.
    fn key(&self, request_id: &[u8]) -> Vec<u8> {
        let mut k =
            Vec::with_capacity(4 + self.method.len() + self.tenant.len() + request_id.len());
        for part in [self.method.as_bytes(), self.tenant.as_bytes(), request_id] {
            k.push(part.len() as u8);
            k.extend_from_slice(part);
        }
        k
    }
}

/// Interned strings (region, zone, label keys and values), so a million nodes share them.
#[derive(Debug, Default, Clone)]
struct Symbols {
    names: Vec<Arc<str>>,
    ids: rustc_hash::FxHashMap<Arc<str>, u32>,
}

impl Symbols {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.names.len() as u32;
        let a: Arc<str> = Arc::from(s);
        self.names.push(a.clone());
        self.ids.insert(a, id);
        id
    }

    fn get(&self, id: u32) -> &str {
        &self.names[id as usize]
    }
}

/// A committed node: its static attributes, lifecycle state, reputation and committed load.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The worker's ed25519 public key (zeros when registered by an admin without one).
    pub public_key: [u8; 32],
    region: u32,
    zone: u32,
    /// CPU architecture.
    pub arch: Arch,
    /// Sandboxes offered.
    pub runtimes: RuntimeSet,
    /// Capacity lent by the owner.
    pub capacity: Resources,
    /// Upload rate in kbit/s.
    pub uplink_kbps: u32,
    /// Download rate in kbit/s.
    pub downlink_kbps: u32,
    labels: u32,
    /// Lifecycle state (transitions are committed; heartbeats are not).
    pub state: NodeState,
    /// Reputation in [0, 1].
    pub reputation: f32,
    /// Whether a worker agent heartbeats for it (only such nodes can be marked down).
    pub managed: bool,
    /// The gateway holding its worker's stream (interned address), if any.
    gateway: Option<u32>,
    /// Sum of the resources of its live allocations.
    pub allocated: Resources,
    /// Number of live allocations.
    pub allocations: u32,
    /// What running task attempts hold on it (besides its allocations).
    pub task_reserved: Resources,
    /// Task attempts running on it.
    pub task_attempts: u32,
}

/// One version of a function: what it runs and with which limits.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionVersion {
    /// 1, 2, ...
    pub version: u32,
    /// The module's content address.
    pub module_sha256: [u8; 32],
    /// Per-invocation limits and the per-replica reservation.
    pub limits: pb::FunctionLimits,
    /// Desired replica count.
    pub replicas: u32,
    /// Region preference (empty = anywhere).
    pub region: String,
    /// Label constraints on nodes.
    pub constraints: Vec<pb::LabelConstraint>,
    /// Whether an invocation may be retried on another instance.
    pub idempotent: bool,
    /// Workers that could not load this version's module.
    pub load_failures: u32,
    /// The last such worker's reason.
    pub load_error: String,
    /// Nodes where loading failed (placement avoids them), at most [`MAX_FAILED_NODES`].
    pub failed_nodes: Vec<u64>,
    /// A container function's image (its layers live in the blob store, not here);
    /// `module_sha256` is then all zeros.
    pub image: Option<pb::ContainerImage>,
}

/// Image layer bytes one tenant's live container functions may refer to (each distinct layer
/// counted once): the blob store's replicas keep them all.
pub const MAX_TENANT_IMAGE_BYTES: u64 = 16 << 30;

/// Load failures after which a version is not re-placed any more (its module is broken,
/// not the nodes): calls then fail at once with MODULE_LOAD_FAILED.
pub const MAX_LOAD_FAILURES: u32 = 3;
/// Failed nodes remembered per version.
pub const MAX_FAILED_NODES: usize = 16;

impl FunctionVersion {
    /// Whether the version has failed to load on enough nodes to stop trying.
    pub fn broken(&self) -> bool {
        self.load_failures >= MAX_LOAD_FAILURES
    }

    /// What one replica reserves on its node (a container's disk too: see
    /// [`stellar_proto::limits::container_disk_mib`]).
    pub fn reservation(&self) -> Resources {
        let disk = self
            .image
            .as_ref()
            .map_or(0, stellar_proto::limits::container_disk_mib);
        Resources::new(self.limits.cpu_millis, self.limits.memory_mib, disk)
    }

    /// The module this version runs (None for a container function).
    pub fn module(&self) -> Option<[u8; 32]> {
        self.image.is_none().then_some(self.module_sha256)
    }

    /// The runtime its nodes must offer.
    pub fn runtime(&self) -> Runtime {
        if self.image.is_some() {
            Runtime::Container
        } else {
            Runtime::Wasm
        }
    }

    /// The node archs it runs on: any for wasm, the image's for a container.
    pub fn archs(&self) -> ArchSet {
        self.image
            .as_ref()
            .and_then(|i| i.arch.parse::<Arch>().ok())
            .map_or(ArchSet::ANY, ArchSet::only)
    }
}

/// A tenant's function and its version history.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    /// Owning tenant.
    pub tenant: String,
    /// Name, unique within the tenant.
    pub name: String,
    /// Every version ever deployed, oldest first.
    pub versions: Vec<FunctionVersion>,
    /// Deleted functions keep their id (allocation records point at it) until redeployed.
    pub deleted: bool,
    /// Live allocations by node: a function never has two replicas on one node.
    pub on_nodes: BTreeMap<u64, u64>,
}

impl Function {
    /// The version new replicas run.
    pub fn current(&self) -> Option<&FunctionVersion> {
        self.versions.last()
    }
}

/// A committed placement of one replica of a function version on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Cluster-unique id, assigned in apply.
    pub id: u64,
    /// Index into the function arena.
    pub function: u32,
    /// The version it runs.
    pub version: u32,
    /// Where it runs.
    pub node: u64,
    /// Pending until the worker reports it running.
    pub state: pb::AllocationState,
    /// What it reserves on the node.
    pub resources: Resources,
}

/// Usage totals per (function, node): the tenant's bill and the owner's credit come from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// Invocations counted.
    pub invocations: u64,
    /// Fuel consumed (the deterministic compute unit).
    pub fuel: u64,
    /// Wall-clock microseconds.
    pub wall_us: u64,
    /// Request bytes.
    pub bytes_in: u64,
    /// Response bytes.
    pub bytes_out: u64,
    /// Peak memory in MiB times wall milliseconds.
    pub memory_mib_ms: u64,
    /// Containers' CPU nanoseconds (from their cgroups).
    pub cpu_ns: u64,
}

impl UsageTotals {
    /// Totals from their snapshot record.
    pub fn of(u: &pb::UsageTotal) -> UsageTotals {
        UsageTotals {
            invocations: u.invocations,
            fuel: u.fuel,
            wall_us: u.wall_us,
            bytes_in: u.bytes_in,
            bytes_out: u.bytes_out,
            memory_mib_ms: u.memory_mib_ms,
            cpu_ns: u.cpu_ns,
        }
    }

    /// Adds one run's usage record.
    pub fn count(&mut self, r: &pb::UsageRecord) {
        self.invocations += 1;
        self.fuel = self.fuel.saturating_add(r.fuel);
        self.wall_us = self.wall_us.saturating_add(r.wall_us);
        self.bytes_in = self.bytes_in.saturating_add(r.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(r.bytes_out);
        let mib_ms = (r.peak_memory_bytes >> 20).saturating_mul(r.wall_us / 1000);
        self.memory_mib_ms = self.memory_mib_ms.saturating_add(mib_ms);
        self.cpu_ns = self.cpu_ns.saturating_add(r.cpu_ns);
    }

    /// The snapshot record of these totals for `(tenant, function, node, hour)`.
    pub fn record(&self, (tenant, function): (&str, &str), node: u64, hour: u64) -> pb::UsageTotal {
        pb::UsageTotal {
            tenant: tenant.to_string(),
            function: function.to_string(),
            node,
            hour,
            invocations: self.invocations,
            fuel: self.fuel,
            wall_us: self.wall_us,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            memory_mib_ms: self.memory_mib_ms,
            cpu_ns: self.cpu_ns,
        }
    }
}

/// The whole replicated state; see the module docs for the rules `apply` follows.
#[derive(Debug, Clone, Default)]
pub struct StateMachine {
    applied_index: u64,
    symbols: Symbols,
    label_sets: Vec<Vec<(u32, u32)>>,
    label_set_ids: rustc_hash::FxHashMap<Vec<(u32, u32)>, u32>,
    tenants: BTreeSet<String>,
    tokens: BTreeMap<Vec<u8>, (String, bool)>,
    functions: Vec<Function>,
    /// Function ids by tenant, then name (no allocation on lookup; listings sort by name).
    function_ids: rustc_hash::FxHashMap<String, rustc_hash::FxHashMap<String, u32>>,
    modules: ModuleStore,
    nodes: BTreeMap<u64, Node>,
    allocations: BTreeMap<u64, Allocation>,
    node_allocations: BTreeSet<(u64, u64)>,
    next_allocation_id: u64,
    /// Keyed by (function id, node, unix hour recorded).
    usage: BTreeMap<(u32, u64, u64), UsageTotals>,
    receipts: ReceiptLedger,
    dedupe: rustc_hash::FxHashMap<Vec<u8>, (u64, pb::CommandResult)>,
    dedupe_order: VecDeque<Vec<u8>>,
    replicas: BTreeMap<u64, String>,
    jobs: BTreeMap<u64, pb::JobRecord>,
    job_ids: BTreeMap<(String, String), u64>,
    next_job_id: u64,
    /// Ended jobs still kept, oldest (smallest id) forgotten first.
    finished_jobs: BTreeSet<u64>,
    /// Keyed by (tenant, job name, node, unix hour recorded).
    job_usage: BTreeMap<(String, String, u64, u64), UsageTotals>,
}

/// What applying one command changed, for the leader's soft state (placement table).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    /// Allocations created (node, resources).
    pub placed: Vec<Allocation>,
    /// Allocations removed (stopped, lost or replaced).
    pub removed: Vec<Allocation>,
    /// Nodes registered or re-registered.
    pub nodes_joined: Vec<u64>,
    /// Nodes whose state or reputation changed.
    pub nodes_changed: Vec<u64>,
    /// Nodes that went down with live allocations: the leader re-places them.
    pub nodes_down: Vec<u64>,
    /// Functions (arena ids) whose current version failed to load on a node and may be
    /// placed again: the leader places a replacement.
    pub load_failed: Vec<u32>,
    /// Jobs created, advanced or ended.
    pub jobs: Vec<u64>,
    /// Task attempts started or ended (their nodes' gateways start or cancel them).
    pub attempts: Vec<AttemptKey>,
    /// Attempts started: (node, what each holds there).
    pub tasks_started: Vec<(u64, Resources)>,
    /// Attempts ended: (node, what each gave back).
    pub tasks_ended: Vec<(u64, Resources)>,
}

fn invalid(msg: impl Into<String>) -> ApplyError {
    ApplyError::Invalid(msg.into())
}

fn not_found(what: &str, name: impl std::fmt::Display) -> ApplyError {
    ApplyError::NotFound(format!("{what} {} not found", shown(&name.to_string())))
}

/// Longest gateway address a node record may name.
pub const MAX_ADDRESS_BYTES: usize = 256;

/// Checks a tenant or function name: 1–63 of `[a-z0-9-]`, starting with a letter or digit.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    stellar_proto::text::check_name(what, name).map_err(invalid)
}

pub use stellar_proto::text::shown;

fn sha32(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| invalid(format!("{what} must be 32 bytes, got {}", bytes.len())))
}

/// Maps the wire node state to the placement model's; `Unspecified` is refused.
pub fn node_state_from_pb(s: i32) -> Result<NodeState> {
    match pb::NodeState::try_from(s) {
        Ok(pb::NodeState::Ready) => Ok(NodeState::Ready),
        Ok(pb::NodeState::Draining) => Ok(NodeState::Draining),
        Ok(pb::NodeState::Down) => Ok(NodeState::Down),
        Ok(pb::NodeState::Quarantined) => Ok(NodeState::Quarantined),
        _ => Err(invalid(format!(
            "node state {s} is not one of ready, draining, down, quarantined"
        ))),
    }
}

/// Maps the placement model's node state to the wire's.
pub fn node_state_to_pb(s: NodeState) -> pb::NodeState {
    match s {
        NodeState::Ready => pb::NodeState::Ready,
        NodeState::Draining => pb::NodeState::Draining,
        NodeState::Down => pb::NodeState::Down,
        NodeState::Quarantined => pb::NodeState::Quarantined,
    }
}

fn check_limits(limits: &pb::FunctionLimits) -> Result<()> {
    if limits.memory_mib == 0 || limits.memory_mib > 64 * 1024 {
        return Err(invalid(format!(
            "memory must be 1..=65536 MiB, got {}",
            limits.memory_mib
        )));
    }
    if limits.cpu_millis > 64_000 {
        return Err(invalid(format!(
            "cpu must be at most 64 cores (64000 millicores), got {}",
            limits.cpu_millis
        )));
    }
    if limits.timeout_ms == 0 || limits.timeout_ms > 15 * 60 * 1000 {
        return Err(invalid(format!(
            "timeout must be 1 ms ..= 15 min, got {} ms",
            limits.timeout_ms
        )));
    }
    Ok(())
}

fn check_constraints(constraints: &[pb::LabelConstraint]) -> Result<()> {
    if constraints.len() > MAX_LABELS {
        return Err(invalid(format!(
            "at most {MAX_LABELS} constraints, got {}",
            constraints.len()
        )));
    }
    if let Some(c) = constraints.iter().find(|c| c.key.is_empty()) {
        return Err(invalid(format!(
            "constraint with empty key (value `{}`)",
            c.value
        )));
    }
    Ok(())
}

impl StateMachine {
    /// An empty state (a new cluster).
    pub fn new() -> Self {
        StateMachine {
            next_allocation_id: 1,
            ..Default::default()
        }
    }

    /// The log index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Records that every entry up to `index` has been applied (conf changes, empty entries).
    pub fn set_applied_index(&mut self, index: u64) {
        debug_assert!(index >= self.applied_index);
        self.applied_index = index;
    }

    /// Receipt chains and the ticket key.
    pub fn receipts(&self) -> &ReceiptLedger {
        &self.receipts
    }

    /// Committed nodes by id.
    pub fn nodes(&self) -> &BTreeMap<u64, Node> {
        &self.nodes
    }

    /// A node's region and zone names.
    pub fn node_location(&self, node: &Node) -> (&str, &str) {
        (self.symbols.get(node.region), self.symbols.get(node.zone))
    }

    /// A node's labels.
    pub fn node_labels(&self, node: &Node) -> Vec<(&str, &str)> {
        self.label_sets[node.labels as usize]
            .iter()
            .map(|&(k, v)| (self.symbols.get(k), self.symbols.get(v)))
            .collect()
    }

    /// The address of the gateway holding a node's worker stream ("" when none).
    pub fn node_gateway(&self, node: &Node) -> &str {
        node.gateway.map_or("", |g| self.symbols.get(g))
    }

    /// Live allocations by id.
    pub fn allocations(&self) -> &BTreeMap<u64, Allocation> {
        &self.allocations
    }

    /// Live allocation ids on `node`.
    pub fn allocations_on(&self, node: u64) -> impl Iterator<Item = u64> + '_ {
        self.node_allocations
            .range((node, 0)..=(node, u64::MAX))
            .map(|&(_, a)| a)
    }

    /// The function arena (deleted ones included); allocation records index into it.
    pub fn function_by_id(&self, id: u32) -> Option<&Function> {
        self.functions.get(id as usize)
    }

    /// A live function by tenant and name, with its arena id.
    pub fn function(&self, tenant: &str, name: &str) -> Option<(u32, &Function)> {
        let id = self.function_id(tenant, name)?;
        let f = &self.functions[id as usize];
        (!f.deleted).then_some((id, f))
    }

    /// The arena id of a function (deleted ones included).
    fn function_id(&self, tenant: &str, name: &str) -> Option<u32> {
        self.function_ids.get(tenant)?.get(name).copied()
    }

    /// Live functions, optionally of one tenant, in (tenant, name) order.
    pub fn functions(&self, tenant: Option<&str>) -> Vec<(u32, &Function)> {
        let mut tenants: Vec<&String> = self
            .function_ids
            .keys()
            .filter(|t| tenant.is_none_or(|want| want == t.as_str()))
            .collect();
        tenants.sort_unstable();
        let mut out = Vec::new();
        for t in tenants {
            let start = out.len();
            out.extend(
                self.function_ids[t]
                    .values()
                    .map(|&id| (id, &self.functions[id as usize]))
                    .filter(|(_, f)| !f.deleted),
            );
            out[start..].sort_unstable_by(|a, b| a.1.name.cmp(&b.1.name));
        }
        out
    }

    /// A stored module by content address.
    pub fn module(&self, sha256: &[u8; 32]) -> Option<Arc<[u8]>> {
        self.modules.get(sha256)
    }

    /// Whether a tenant exists.
    pub fn has_tenant(&self, name: &str) -> bool {
        self.tenants.contains(name)
    }

    /// Whether an admin token exists (the cluster was bootstrapped).
    pub fn has_admin_token(&self) -> bool {
        self.tokens.values().any(|(_, admin)| *admin)
    }

    /// The tenant and admin flag of a token hash.
    pub fn token(&self, sha256: &[u8]) -> Option<(&str, bool)> {
        self.tokens.get(sha256).map(|(t, a)| (t.as_str(), *a))
    }

    /// Every live token: (sha256, tenant, admin).
    pub fn tokens(&self) -> impl Iterator<Item = (&[u8], &str, bool)> + '_ {
        self.tokens
            .iter()
            .map(|(h, (t, a))| (h.as_slice(), t.as_str(), *a))
    }

    /// Usage totals per (function id, node).
    pub fn usage(&self) -> &BTreeMap<(u32, u64, u64), UsageTotals> {
        &self.usage
    }

    /// Client addresses of replicas, by replica id, as committed.
    pub fn replica_addresses(&self) -> &BTreeMap<u64, String> {
        &self.replicas
    }

    /// Sets or removes a replica's client address (from conf-change entries).
    pub fn set_replica_address(&mut self, id: u64, address: Option<String>) {
        match address {
            Some(a) => {
                self.replicas.insert(id, a);
            }
            None => {
                self.replicas.remove(&id);
            }
        }
    }

    /// The result `request_id` was answered with for this method and tenant, if it is still
    /// remembered.
    pub fn deduped(&self, scope: DedupeScope<'_>, request_id: &[u8]) -> Option<&pb::CommandResult> {
        self.dedupe.get(&scope.key(request_id)).map(|(_, r)| r)
    }

    /// Applies one command at `index` and answers it; a refused command changes nothing.
    pub fn apply(
        &mut self,
        index: u64,
        cmd: pb::Command,
        effects: &mut Effects,
    ) -> pb::CommandResult {
        self.applied_index = self.applied_index.max(index);
        let Some(kind) = cmd.kind else {
            return error_result(&invalid("empty command"));
        };
        // Retries are answered per (method, tenant, request id): one tenant's id never
        // answers another tenant's request, nor another method's.
        let key = if cmd.request_id.is_empty() {
            None
        } else {
            if cmd.request_id.len() > MAX_REQUEST_ID_BYTES {
                return error_result(&invalid(format!(
                    "request id is {} bytes; at most {MAX_REQUEST_ID_BYTES}",
                    cmd.request_id.len()
                )));
            }
            let key = DedupeScope::of(&kind).key(&cmd.request_id);
            if let Some((_, r)) = self.dedupe.get(&key) {
                return r.clone();
            }
            Some(key)
        };
        let result = match self.apply_kind(kind, effects) {
            Ok(r) => r,
            Err(e) => error_result(&e),
        };
        // A stale plan changed nothing and its retry is re-planned, so it is not an answer
        // to remember.
        if let Some(key) = key
            && result.error_code != crate::error::STALE_PLAN
        {
            self.remember(key, index, result.clone());
        }
        result
    }

    fn remember(&mut self, id: Vec<u8>, index: u64, result: pb::CommandResult) {
        if self.dedupe_order.len() >= DEDUPE_CAPACITY
            && let Some(old) = self.dedupe_order.pop_front()
        {
            self.dedupe.remove(&old);
        }
        self.dedupe_order.push_back(id.clone());
        self.dedupe.insert(id, (index, result));
    }

    fn apply_kind(
        &mut self,
        kind: pb::command::Kind,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        use pb::command::Kind;
        match kind {
            Kind::CreateTenant(c) => self.create_tenant(c),
            Kind::PutToken(c) => self.put_token(c),
            Kind::RevokeToken(c) => {
                self.tokens
                    .remove(&c.token_sha256)
                    .ok_or_else(|| not_found("token", hex::encode(&c.token_sha256)))?;
                Ok(ok_result())
            }
            Kind::Deploy(c) => self.deploy(c, fx),
            Kind::DeleteFunction(c) => self.delete_function(c, fx),
            Kind::RegisterNodes(c) => self.register_nodes(c, fx),
            Kind::NodeTransitions(c) => self.node_transitions(c, fx),
            Kind::Reputations(c) => self.reputations(c, fx),
            Kind::Plan(c) => self.plan(c, fx),
            Kind::Usage(c) => self.record_usage(c, fx),
            Kind::ReplicaAddress(c) => {
                if c.id == 0 {
                    return Err(invalid("replica id 0 is reserved"));
                }
                let addr = (!c.remove).then_some(c.address);
                self.set_replica_address(c.id, addr);
                Ok(ok_result())
            }
            Kind::AllocationStates(c) => self.allocation_states(c, fx),
            Kind::SubmitJob(c) => self.submit_job(c, fx),
            Kind::StartAttempts(c) => self.start_attempts(c, fx),
            Kind::TaskReports(c) => self.task_reports(c, fx),
            Kind::CancelJob(c) => self.cancel_job(c, fx),
            Kind::TicketKey(c) => self.set_ticket_key(c),
        }
    }

    fn create_tenant(&mut self, c: pb::CreateTenantCmd) -> Result<pb::CommandResult> {
        validate_name("tenant", &c.name)?;
        if self.tenants.contains(&c.name) {
            return Err(ApplyError::AlreadyExists(format!(
                "tenant `{}` already exists",
                c.name
            )));
        }
        if !c.token_sha256.is_empty() {
            sha32(&c.token_sha256, "token hash")?;
            if self.tokens.contains_key(&c.token_sha256) {
                return Err(invalid("token hash already in use"));
            }
            self.tokens.insert(c.token_sha256, (c.name.clone(), false));
        }
        self.tenants.insert(c.name);
        Ok(ok_result())
    }

    fn put_token(&mut self, c: pb::PutTokenCmd) -> Result<pb::CommandResult> {
        sha32(&c.token_sha256, "token hash")?;
        if !c.admin && !self.tenants.contains(&c.tenant) {
            return Err(not_found("tenant", c.tenant));
        }
        if self.tokens.contains_key(&c.token_sha256) {
            return Err(invalid("token hash already in use"));
        }
        self.tokens.insert(c.token_sha256, (c.tenant, c.admin));
        Ok(ok_result())
    }

    fn deploy(&mut self, mut c: pb::DeployCmd, fx: &mut Effects) -> Result<pb::CommandResult> {
        validate_name("function", &c.name)?;
        if !self.tenants.contains(&c.tenant) {
            return Err(not_found("tenant", c.tenant));
        }
        let limits = c.limits.unwrap_or_default();
        check_limits(&limits)?;
        check_constraints(&c.constraints)?;
        // 0 replicas: the module and limits are stored; the gateway places one on first call.
        if c.replicas > MAX_REPLICAS {
            return Err(invalid(format!(
                "replicas must be 0..={MAX_REPLICAS}, got {}",
                c.replicas
            )));
        }
        if c.place_on.len() > c.replicas as usize {
            return Err(invalid("plan places more replicas than requested"));
        }
        let image = c.image.take();
        if let Some(i) = &image {
            stellar_proto::limits::check_image(i).map_err(invalid)?;
            if !c.module.is_empty() || !c.module_sha256.is_empty() {
                return Err(invalid("a deploy carries a module or an image, not both"));
            }
        }
        let sha = if image.is_some() {
            [0; 32]
        } else {
            sha32(&c.module_sha256, "module sha256")?
        };
        let new_module = if image.is_some() {
            None
        } else if c.module.is_empty() {
            if !self.modules.contains(&sha) {
                // The leader left the bytes out because the module was stored when it
                // planned; it has since been freed: the leader re-plans with the bytes.
                return Err(ApplyError::StalePlan(format!(
                    "module {} is no longer stored",
                    hex::encode(sha)
                )));
            }
            None
        } else {
            if c.module.len() > MAX_MODULE_BYTES {
                return Err(ApplyError::Limit(format!(
                    "module is {} bytes; the limit is {MAX_MODULE_BYTES}",
                    c.module.len()
                )));
            }
            if !c.module.starts_with(b"\0asm") {
                return Err(invalid("module is not WebAssembly (no \\0asm header)"));
            }
            let actual: [u8; 32] = Sha256::digest(&c.module).into();
            if actual != sha {
                return Err(invalid(format!(
                    "module sha256 mismatch: declared {}, content {}",
                    hex::encode(sha),
                    hex::encode(actual)
                )));
            }
            Some(c.module)
        };
        let existing = self.function_id(&c.tenant, &c.name);
        // The module the function runs now, which this version stops referring to.
        let replacing = existing
            .map(|id| &self.functions[id as usize])
            .filter(|f| !f.deleted)
            .and_then(|f| f.current())
            .and_then(FunctionVersion::module);
        if let Some(i) = &image {
            self.check_image_quota(&c.tenant, &c.name, i)?;
        }
        if image.is_none() {
            let len = new_module
                .as_ref()
                .map_or_else(|| self.modules.get(&sha).map_or(0, |b| b.len()), Vec::len);
            self.modules
                .check_reference(&c.tenant, &sha, len as u64, replacing.as_ref())?;
        }
        let next_version = existing.map_or(1, |id| {
            self.functions[id as usize]
                .versions
                .last()
                .map_or(1, |v| v.version + 1)
        });
        let version = FunctionVersion {
            version: next_version,
            module_sha256: sha,
            limits,
            replicas: c.replicas,
            region: c.region,
            constraints: c.constraints,
            idempotent: c.idempotent,
            load_failures: 0,
            load_error: String::new(),
            failed_nodes: Vec::new(),
            image,
        };
        // The old version's replicas stop; the plan must hold once they are gone.
        let stopping: Vec<u64> = existing
            .map(|id| {
                self.functions[id as usize]
                    .on_nodes
                    .values()
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        let stop_set: BTreeSet<u64> = stopping.iter().copied().collect();
        self.check_placements(existing, &version, &c.place_on, &stop_set)?;

        // Validated: mutate.
        if let Some(bytes) = new_module {
            self.modules.insert(sha, bytes);
        }
        if version.image.is_none() {
            self.modules.reference(&c.tenant, &sha);
        }
        if let Some(old) = replacing {
            self.modules.release(&c.tenant, &old);
        }
        let fid = match existing {
            Some(id) => id,
            None => {
                let id = self.functions.len() as u32;
                self.functions.push(Function {
                    tenant: c.tenant.clone(),
                    name: c.name.clone(),
                    versions: Vec::new(),
                    deleted: false,
                    on_nodes: BTreeMap::new(),
                });
                self.function_ids
                    .entry(c.tenant)
                    .or_default()
                    .insert(c.name, id);
                id
            }
        };
        for a in stopping {
            self.remove_allocation(a, fx);
        }
        let f = &mut self.functions[fid as usize];
        f.deleted = false;
        f.versions.push(version);
        let mut result = ok_result();
        result.version = next_version;
        for node in c.place_on {
            let a = self.add_allocation(fid, next_version, node, fx);
            result.allocations.push(self.allocation_pb(&a));
        }
        Ok(result)
    }

    /// Refuses an image that would take `tenant`'s live container functions (`name`'s new
    /// version replacing its current one) past [`MAX_TENANT_IMAGE_BYTES`] of distinct layers.
    fn check_image_quota(
        &self,
        tenant: &str,
        name: &str,
        image: &pb::ContainerImage,
    ) -> Result<()> {
        let mut layers: BTreeMap<&str, u64> = BTreeMap::new();
        let others = self
            .function_ids
            .get(tenant)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(n, _)| n.as_str() != name)
            .map(|(_, &id)| &self.functions[id as usize])
            .filter(|f| !f.deleted)
            .filter_map(|f| f.current().and_then(|v| v.image.as_ref()));
        for i in others.chain(std::iter::once(image)) {
            for l in &i.layers {
                layers.insert(&l.sha256, l.size);
            }
        }
        let total: u64 = layers.values().sum();
        if total > MAX_TENANT_IMAGE_BYTES {
            return Err(ApplyError::Limit(format!(
                "tenant `{tenant}`'s container functions would use {total} bytes of image layers; its quota is {MAX_TENANT_IMAGE_BYTES} (each distinct layer counted once): delete functions it no longer runs"
            )));
        }
        Ok(())
    }

    /// Verifies that `nodes` can each take one replica of `version` of function `fid`, once
    /// the allocations in `stopping` are gone.
    fn check_placements(
        &self,
        fid: Option<u32>,
        version: &FunctionVersion,
        nodes: &[u64],
        stopping: &BTreeSet<u64>,
    ) -> Result<()> {
        let ask = version.reservation();
        let (runtime, archs) = (version.runtime(), version.archs());
        let mut seen = BTreeSet::new();
        for &n in nodes {
            if !seen.insert(n) {
                return Err(ApplyError::StalePlan(format!(
                    "node {n:016x} appears twice in the plan"
                )));
            }
            let node = self
                .nodes
                .get(&n)
                .ok_or_else(|| ApplyError::StalePlan(format!("node {n:016x} is not registered")))?;
            if node.state != NodeState::Ready {
                return Err(ApplyError::StalePlan(format!(
                    "node {n:016x} is {}",
                    node.state
                )));
            }
            if !node.runtimes.contains(runtime) || !archs.contains(node.arch) {
                return Err(ApplyError::StalePlan(format!(
                    "node {n:016x} ({}) does not run {runtime} functions of this arch",
                    node.arch.as_str()
                )));
            }
            // Running task attempts hold their share too.
            let mut allocated = add(node.allocated, node.task_reserved);
            if let Some(f) = fid.map(|id| &self.functions[id as usize])
                && let Some(a) = f.on_nodes.get(&n)
            {
                if !stopping.contains(a) {
                    return Err(ApplyError::StalePlan(format!(
                        "node {n:016x} already runs a replica of `{}`",
                        f.name
                    )));
                }
                // Its replica of the old version stops first.
                allocated = sub(allocated, self.allocations[a].resources);
            }
            let cpu = allocated.cpu_millis as u64 + ask.cpu_millis as u64;
            let mem = allocated.memory_mib as u64 + ask.memory_mib as u64;
            if cpu > node.capacity.cpu_millis as u64 || mem > node.capacity.memory_mib as u64 {
                return Err(ApplyError::StalePlan(format!(
                    "node {n:016x} has {}m CPU / {} MiB committed of {}m / {} MiB; the replica needs {}m / {} MiB",
                    allocated.cpu_millis,
                    allocated.memory_mib,
                    node.capacity.cpu_millis,
                    node.capacity.memory_mib,
                    ask.cpu_millis,
                    ask.memory_mib
                )));
            }
            if ask.disk_mib > 0
                && u64::from(allocated.disk_mib) + u64::from(ask.disk_mib)
                    > u64::from(node.capacity.disk_mib)
            {
                return Err(ApplyError::StalePlan(format!(
                    "node {n:016x} has {} MiB of disk committed of {}; the replica needs {} MiB",
                    allocated.disk_mib, node.capacity.disk_mib, ask.disk_mib
                )));
            }
            if !version.region.is_empty() && self.symbols.get(node.region) != version.region {
                return Err(invalid(format!(
                    "node {n:016x} is in {} but the function is pinned to {}",
                    self.symbols.get(node.region),
                    version.region
                )));
            }
            let labels = if version.constraints.is_empty() {
                Vec::new()
            } else {
                self.node_labels(node)
            };
            for c in &version.constraints {
                let has = labels.iter().find(|(k, _)| *k == c.key).map(|(_, v)| *v);
                let holds = if c.absent {
                    has.is_none()
                } else if c.value.is_empty() {
                    has.is_some()
                } else {
                    has == Some(c.value.as_str())
                };
                if !holds {
                    return Err(invalid(format!(
                        "node {n:016x} does not satisfy constraint {}{}{}",
                        c.key,
                        if c.absent { " absent" } else { "=" },
                        c.value
                    )));
                }
            }
        }
        Ok(())
    }

    fn add_allocation(
        &mut self,
        fid: u32,
        version: u32,
        node: u64,
        fx: &mut Effects,
    ) -> Allocation {
        let f = &mut self.functions[fid as usize];
        let resources = f
            .versions
            .iter()
            .rev()
            .find(|v| v.version == version)
            .map(FunctionVersion::reservation)
            .unwrap_or_default();
        let a = Allocation {
            id: self.next_allocation_id,
            function: fid,
            version,
            node,
            state: pb::AllocationState::Pending,
            resources,
        };
        self.next_allocation_id += 1;
        f.on_nodes.insert(node, a.id);
        let n = self.nodes.get_mut(&node).expect("checked before mutation");
        n.allocated = add(n.allocated, resources);
        n.allocations += 1;
        self.allocations.insert(a.id, a);
        self.node_allocations.insert((node, a.id));
        fx.placed.push(a);
        a
    }

    fn remove_allocation(&mut self, id: u64, fx: &mut Effects) {
        let Some(a) = self.allocations.remove(&id) else {
            return;
        };
        self.node_allocations.remove(&(a.node, id));
        let f = &mut self.functions[a.function as usize];
        if f.on_nodes.get(&a.node) == Some(&id) {
            f.on_nodes.remove(&a.node);
        }
        if let Some(n) = self.nodes.get_mut(&a.node) {
            n.allocated = sub(n.allocated, a.resources);
            n.allocations -= 1;
        }
        fx.removed.push(a);
    }

    fn delete_function(
        &mut self,
        c: pb::DeleteFunctionCmd,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        let (fid, f) = self
            .function(&c.tenant, &c.name)
            .ok_or_else(|| not_found("function", format!("{}/{}", c.tenant, c.name)))?;
        let allocs: Vec<u64> = f.on_nodes.values().copied().collect();
        let module = f.current().and_then(FunctionVersion::module);
        let mut result = ok_result();
        result.count = allocs.len() as u32;
        for a in allocs {
            self.remove_allocation(a, fx);
        }
        self.functions[fid as usize].deleted = true;
        if let Some(sha) = module {
            self.modules.release(&c.tenant, &sha);
        }
        Ok(result)
    }

    fn register_nodes(
        &mut self,
        c: pb::RegisterNodesCmd,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        if c.nodes.len() > MAX_NODES_PER_COMMAND {
            return Err(invalid(format!(
                "at most {MAX_NODES_PER_COMMAND} nodes per registration, got {}",
                c.nodes.len()
            )));
        }
        let mut ids = BTreeSet::new();
        for n in &c.nodes {
            validate_node(n)?;
            if !ids.insert(n.id) {
                return Err(invalid(format!("node {:016x} appears twice", n.id)));
            }
        }
        let count = c.nodes.len() as u32;
        let mut previous = None;
        for n in c.nodes {
            let node = self.node_from_record(n.clone());
            let entry = self.nodes.entry(n.id);
            match entry {
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    // Re-registration: new attributes; committed load, state and reputation
                    // kept (reconnecting must not reset a poor reputation).
                    let old = o.get();
                    let (allocated, allocations, state, reputation, gateway) = (
                        old.allocated,
                        old.allocations,
                        old.state,
                        old.reputation,
                        old.gateway,
                    );
                    let (task_reserved, task_attempts) = (old.task_reserved, old.task_attempts);
                    previous = Some(state);
                    let slot = o.get_mut();
                    *slot = node;
                    slot.allocated = allocated;
                    slot.allocations = allocations;
                    slot.task_reserved = task_reserved;
                    slot.task_attempts = task_attempts;
                    slot.state = state;
                    slot.reputation = reputation;
                    // A registration through a gateway names it; an admin import keeps it.
                    slot.gateway = slot.gateway.or(gateway);
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(node);
                }
            }
            fx.nodes_joined.push(n.id);
        }
        let mut result = ok_result();
        result.count = count;
        if count == 1
            && let Some(state) = previous
        {
            result.previous_state = node_state_to_pb(state) as i32;
        }
        Ok(result)
    }

    fn node_from_record(&mut self, r: pb::NodeRecord) -> Node {
        let a = r.attributes.unwrap_or_default();
        let mut runtimes = RuntimeSet::NONE;
        for rt in &a.runtimes {
            if let Ok(rt) = rt.parse::<Runtime>() {
                runtimes = runtimes.with(rt);
            }
        }
        let mut labels: Vec<(u32, u32)> = a
            .labels
            .iter()
            .map(|l| (self.symbols.intern(&l.key), self.symbols.intern(&l.value)))
            .collect();
        labels.sort_unstable_by(|x, y| self.symbols.get(x.0).cmp(self.symbols.get(y.0)));
        let labels = match self.label_set_ids.get(&labels) {
            Some(&id) => id,
            None => {
                let id = self.label_sets.len() as u32;
                self.label_sets.push(labels.clone());
                self.label_set_ids.insert(labels, id);
                id
            }
        };
        let cap = a.capacity.unwrap_or_default();
        let mut public_key = [0u8; 32];
        if r.public_key.len() == 32 {
            public_key.copy_from_slice(&r.public_key);
        }
        Node {
            public_key,
            region: self.symbols.intern(&a.region),
            zone: self.symbols.intern(&a.zone),
            arch: a.arch.parse().unwrap_or(Arch::X86_64),
            runtimes,
            capacity: Resources::new(cap.cpu_millis, cap.memory_mib, cap.disk_mib),
            uplink_kbps: a.uplink_kbps,
            downlink_kbps: a.downlink_kbps,
            labels,
            state: node_state_from_pb(r.state).unwrap_or(NodeState::Ready),
            reputation: r.reputation,
            managed: r.managed,
            gateway: (!r.gateway.is_empty()).then(|| self.symbols.intern(&r.gateway)),
            allocated: Resources::default(),
            allocations: 0,
            task_reserved: Resources::default(),
            task_attempts: 0,
        }
    }

    fn node_transitions(
        &mut self,
        c: pb::NodeTransitionsCmd,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        let mut parsed = Vec::with_capacity(c.transitions.len());
        for t in &c.transitions {
            let state = node_state_from_pb(t.state)?;
            if !self.nodes.contains_key(&t.node) {
                return Err(not_found("node", format!("{:016x}", t.node)));
            }
            if t.gateway.len() > MAX_ADDRESS_BYTES {
                return Err(invalid(format!(
                    "gateway address of node {:016x} is {} bytes; at most {MAX_ADDRESS_BYTES}",
                    t.node,
                    t.gateway.len()
                )));
            }
            parsed.push((t.node, state, t.gateway.as_str()));
        }
        let mut result = ok_result();
        if let [(node, _, _)] = parsed.as_slice() {
            result.previous_state = node_state_to_pb(self.nodes[node].state) as i32;
        }
        for (id, state, gateway) in parsed {
            let gateway = if state == NodeState::Down {
                None
            } else if gateway.is_empty() {
                self.nodes[&id].gateway
            } else {
                Some(self.symbols.intern(gateway))
            };
            let n = self.nodes.get_mut(&id).expect("checked above");
            if n.state == state && n.gateway == gateway {
                continue;
            }
            n.gateway = gateway;
            if n.state == state {
                // Moved to another gateway: a change watchers see, not a state change.
                result.count += 1;
                fx.nodes_changed.push(id);
                continue;
            }
            let was = n.state;
            n.state = state;
            result.count += 1;
            fx.nodes_changed.push(id);
            if matches!(state, NodeState::Down | NodeState::Quarantined) && n.allocations > 0 {
                fx.nodes_down.push(id);
            }
            // An admin returning a quarantined node gives it a fresh start (a new node's
            // prior): otherwise its next evidence would quarantine it again at once.
            if was == NodeState::Quarantined && state == NodeState::Ready {
                n.reputation = self.receipts.reset_standing(id);
            }
        }
        Ok(result)
    }

    fn reputations(
        &mut self,
        c: pb::ReputationsCmd,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        for u in &c.updates {
            if !(0.0..=1.0).contains(&u.reputation) {
                return Err(invalid(format!(
                    "reputation of node {:016x} must be in [0, 1], got {}",
                    u.node, u.reputation
                )));
            }
            if !self.nodes.contains_key(&u.node) {
                return Err(not_found("node", format!("{:016x}", u.node)));
            }
        }
        for u in c.updates {
            self.nodes.get_mut(&u.node).expect("checked").reputation = u.reputation;
            fx.nodes_changed.push(u.node);
        }
        Ok(ok_result())
    }

    fn plan(&mut self, c: pb::PlanCmd, fx: &mut Effects) -> Result<pb::CommandResult> {
        let (fid, f) = self
            .function(&c.tenant, &c.function)
            .ok_or_else(|| not_found("function", format!("{}/{}", c.tenant, c.function)))?;
        let current = f.current().expect("a live function has a version").clone();
        if c.version != current.version {
            return Err(ApplyError::StalePlan(format!(
                "plan is for version {} but `{}` is at version {}",
                c.version, c.function, current.version
            )));
        }
        let mut gone = BTreeSet::new();
        for &a in c.stop.iter().chain(&c.lost) {
            let alloc = self
                .allocations
                .get(&a)
                .filter(|x| x.function == fid)
                .ok_or_else(|| {
                    ApplyError::StalePlan(format!(
                        "allocation {a} is not a live replica of `{}`",
                        c.function
                    ))
                })?;
            if !gone.insert(a) {
                return Err(invalid(format!("allocation {a} listed twice")));
            }
            if c.lost.contains(&a)
                && self
                    .nodes
                    .get(&alloc.node)
                    .is_some_and(|n| n.state == NodeState::Ready)
            {
                return Err(ApplyError::StalePlan(format!(
                    "allocation {a} is not lost: node {:016x} is ready",
                    alloc.node
                )));
            }
        }
        let live = f.on_nodes.len() - gone.len() + c.place_on.len();
        let desired = if c.grow {
            current.replicas as usize + c.place_on.len()
        } else {
            current.replicas as usize
        };
        if live > desired.min(MAX_REPLICAS as usize) {
            return Err(ApplyError::StalePlan(format!(
                "plan would run {live} replicas of `{}`; {desired} are wanted",
                c.function
            )));
        }
        self.check_placements(Some(fid), &current, &c.place_on, &gone)?;
        for a in gone {
            self.remove_allocation(a, fx);
        }
        if c.grow {
            let f = &mut self.functions[fid as usize];
            let v = f.versions.last_mut().expect("checked");
            v.replicas += c.place_on.len() as u32;
        }
        let mut result = ok_result();
        result.version = current.version;
        for node in c.place_on {
            let a = self.add_allocation(fid, current.version, node, fx);
            result.allocations.push(self.allocation_pb(&a));
        }
        Ok(result)
    }

    /// Workers' reports about their instances. An update whose allocation is gone, or is
    /// on another node than the reporter's, is skipped (reports race with re-placements;
    /// a node speaks only for itself); one with an unknown state refuses the batch.
    fn allocation_states(
        &mut self,
        c: pb::AllocationStatesCmd,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        let mut states = Vec::with_capacity(c.updates.len());
        for u in &c.updates {
            let state = pb::AllocationState::try_from(u.state)
                .map_err(|_| invalid(format!("allocation state {} is unknown", u.state)))?;
            if !matches!(
                state,
                pb::AllocationState::Running
                    | pb::AllocationState::Stopped
                    | pb::AllocationState::Failed
            ) {
                return Err(invalid(
                    "workers report allocations running, stopped or failed only",
                ));
            }
            states.push(state);
        }
        let mut result = ok_result();
        for (u, state) in c.updates.into_iter().zip(states) {
            let Some(a) = self.allocations.get_mut(&u.allocation) else {
                continue;
            };
            if u.node != 0 && a.node != u.node {
                continue;
            }
            let (fid, version, node) = (a.function, a.version, a.node);
            match state {
                pb::AllocationState::Running => a.state = pb::AllocationState::Running,
                pb::AllocationState::Failed => {
                    self.remove_allocation(u.allocation, fx);
                    let f = &mut self.functions[fid as usize];
                    let current = f.current().map(|v| v.version);
                    if let Some(v) = f.versions.iter_mut().rev().find(|v| v.version == version) {
                        v.load_failures = v.load_failures.saturating_add(1);
                        v.load_error = u.message;
                        if !v.failed_nodes.contains(&node)
                            && v.failed_nodes.len() < MAX_FAILED_NODES
                        {
                            v.failed_nodes.push(node);
                        }
                        if current == Some(version) && !v.broken() && !f.deleted {
                            fx.load_failed.push(fid);
                        }
                    }
                }
                _ => self.remove_allocation(u.allocation, fx),
            }
            result.count += 1;
        }
        Ok(result)
    }

    /// The wire form of an allocation.
    pub fn allocation_pb(&self, a: &Allocation) -> pb::Allocation {
        let f = &self.functions[a.function as usize];
        pb::Allocation {
            id: a.id,
            tenant: f.tenant.clone(),
            function: f.name.clone(),
            version: a.version,
            node: a.node,
            state: a.state as i32,
            resources: Some(pb::Resources {
                cpu_millis: a.resources.cpu_millis,
                memory_mib: a.resources.memory_mib,
                disk_mib: a.resources.disk_mib,
            }),
        }
    }

    /// The wire form of a node's attributes.
    pub fn node_attributes_pb(&self, n: &Node) -> pb::NodeAttributes {
        let (region, zone) = self.node_location(n);
        pb::NodeAttributes {
            region: region.to_string(),
            zone: zone.to_string(),
            arch: n.arch.as_str().to_string(),
            runtimes: [Runtime::Wasm, Runtime::Container]
                .into_iter()
                .filter(|r| n.runtimes.contains(*r))
                .map(|r| r.as_str().to_string())
                .collect(),
            capacity: Some(pb::Resources {
                cpu_millis: n.capacity.cpu_millis,
                memory_mib: n.capacity.memory_mib,
                disk_mib: n.capacity.disk_mib,
            }),
            uplink_kbps: n.uplink_kbps,
            downlink_kbps: n.downlink_kbps,
            labels: self
                .node_labels(n)
                .into_iter()
                .map(|(k, v)| pb::Label {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        }
    }

    /// The whole state in its canonical encoding (snapshot contents).
    pub fn to_snapshot(&self) -> pb::StateSnapshot {
        let (jobs, job_usage) = self.jobs_snapshot();
        let (ticket_key, receipt_chains, seen_receipts) = self.receipts.snapshot();
        let (open_period, closed_periods) = self.receipts.period_snapshot();
        let check_usage = self.receipts.check_snapshot();
        pb::StateSnapshot {
            applied_index: self.applied_index,
            tenants: self
                .tenants
                .iter()
                .map(|t| pb::TenantRecord { name: t.clone() })
                .collect(),
            tokens: self
                .tokens
                .iter()
                .map(|(h, (t, admin))| pb::TokenRecord {
                    token_sha256: h.clone(),
                    tenant: t.clone(),
                    admin: *admin,
                })
                .collect(),
            functions: self
                .functions
                .iter()
                .map(|f| pb::FunctionRecord {
                    tenant: f.tenant.clone(),
                    name: f.name.clone(),
                    deleted: f.deleted,
                    versions: f
                        .versions
                        .iter()
                        .map(|v| pb::FunctionVersionRecord {
                            version: v.version,
                            module_sha256: v.module_sha256.to_vec(),
                            limits: Some(v.limits),
                            replicas: v.replicas,
                            region: v.region.clone(),
                            constraints: v.constraints.clone(),
                            idempotent: v.idempotent,
                            load_failures: v.load_failures,
                            load_error: v.load_error.clone(),
                            failed_nodes: v.failed_nodes.clone(),
                            image: v.image.clone(),
                        })
                        .collect(),
                })
                .collect(),
            modules: self
                .modules
                .iter()
                .map(|(h, b)| pb::ModuleRecord {
                    sha256: h.to_vec(),
                    bytes: b.to_vec(),
                })
                .collect(),
            nodes: self
                .nodes
                .iter()
                .map(|(&id, n)| pb::NodeRecord {
                    id,
                    public_key: n.public_key.to_vec(),
                    attributes: Some(self.node_attributes_pb(n)),
                    state: node_state_to_pb(n.state) as i32,
                    reputation: n.reputation,
                    managed: n.managed,
                    gateway: self.node_gateway(n).to_string(),
                })
                .collect(),
            allocations: self
                .allocations
                .values()
                .map(|a| self.allocation_pb(a))
                .collect(),
            usage: self
                .usage
                .iter()
                .map(|(&(fid, node, hour), t)| {
                    let f = &self.functions[fid as usize];
                    t.record((&f.tenant, &f.name), node, hour)
                })
                .collect(),
            dedupe: self
                .dedupe_order
                .iter()
                .map(|id| {
                    let (index, r) = &self.dedupe[id];
                    pb::DedupeRecord {
                        request_id: id.clone(),
                        index: *index,
                        result: r.encode_to_vec(),
                    }
                })
                .collect(),
            replicas: self
                .replicas
                .iter()
                .map(|(&id, a)| pb::ReplicaAddress {
                    id,
                    address: a.clone(),
                })
                .collect(),
            next_allocation_id: self.next_allocation_id,
            seen_invocations: Vec::new(),
            jobs,
            next_job_id: self.next_job_id,
            job_usage,
            ticket_key,
            receipt_chains,
            seen_receipts,
            open_period,
            closed_periods,
            check_usage,
        }
    }

    /// A digest of the canonical encoding: equal states have equal digests.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.to_snapshot().encode_to_vec()).into()
    }

    /// Rebuilds the state from a snapshot; a snapshot that does not decode or is inconsistent
    /// is refused (the replica then refuses to start rather than serve a wrong state).
    pub fn from_snapshot(s: pb::StateSnapshot) -> std::result::Result<StateMachine, ApplyError> {
        let mut m = StateMachine::new();
        m.applied_index = s.applied_index;
        m.tenants = s.tenants.into_iter().map(|t| t.name).collect();
        m.tokens = s
            .tokens
            .into_iter()
            .map(|t| (t.token_sha256, (t.tenant, t.admin)))
            .collect();
        for f in s.functions {
            let id = m.functions.len() as u32;
            let mut versions = Vec::with_capacity(f.versions.len());
            for v in f.versions {
                versions.push(FunctionVersion {
                    version: v.version,
                    module_sha256: sha32(&v.module_sha256, "snapshot module sha256")?,
                    limits: v.limits.unwrap_or_default(),
                    replicas: v.replicas,
                    region: v.region,
                    constraints: v.constraints,
                    idempotent: v.idempotent,
                    load_failures: v.load_failures,
                    load_error: v.load_error,
                    failed_nodes: v.failed_nodes,
                    image: v.image,
                });
            }
            m.function_ids
                .entry(f.tenant.clone())
                .or_default()
                .insert(f.name.clone(), id);
            m.functions.push(Function {
                tenant: f.tenant,
                name: f.name,
                versions,
                deleted: f.deleted,
                on_nodes: BTreeMap::new(),
            });
        }
        for md in s.modules {
            let h = sha32(&md.sha256, "snapshot module sha256")?;
            m.modules.insert(h, md.bytes);
        }
        // References are derived state: each live function's current version.
        for f in m.functions.iter().filter(|f| !f.deleted) {
            if let Some(sha) = f.current().and_then(FunctionVersion::module) {
                m.modules.reference(&f.tenant, &sha);
            }
        }
        for n in s.nodes {
            let id = n.id;
            let node = m.node_from_record(n);
            m.nodes.insert(id, node);
        }
        let mut fx = Effects::default();
        for a in s.allocations {
            let fid = m.function_id(&a.tenant, &a.function).ok_or_else(|| {
                invalid(format!(
                    "snapshot allocation {} names an unknown function",
                    a.id
                ))
            })?;
            if !m.nodes.contains_key(&a.node) {
                return Err(invalid(format!(
                    "snapshot allocation {} names an unknown node",
                    a.id
                )));
            }
            let r = a.resources.unwrap_or_default();
            let alloc = Allocation {
                id: a.id,
                function: fid,
                version: a.version,
                node: a.node,
                state: pb::AllocationState::try_from(a.state)
                    .unwrap_or(pb::AllocationState::Pending),
                resources: Resources::new(r.cpu_millis, r.memory_mib, r.disk_mib),
            };
            m.functions[fid as usize].on_nodes.insert(a.node, a.id);
            let n = m.nodes.get_mut(&a.node).expect("checked");
            n.allocated = add(n.allocated, alloc.resources);
            n.allocations += 1;
            m.allocations.insert(a.id, alloc);
            m.node_allocations.insert((a.node, a.id));
        }
        fx.placed.clear();
        for u in s.usage {
            let fid = m
                .function_id(&u.tenant, &u.function)
                .ok_or_else(|| invalid("snapshot usage names an unknown function"))?;
            m.usage.insert((fid, u.node, u.hour), UsageTotals::of(&u));
        }
        for d in s.dedupe {
            let r = pb::CommandResult::decode(d.result.as_slice())
                .map_err(|e| invalid(format!("snapshot dedupe record: {e}")))?;
            m.dedupe_order.push_back(d.request_id.clone());
            m.dedupe.insert(d.request_id, (d.index, r));
        }
        m.replicas = s.replicas.into_iter().map(|r| (r.id, r.address)).collect();
        m.next_allocation_id = s.next_allocation_id.max(1);
        m.receipts = ReceiptLedger::restore(
            s.ticket_key,
            s.receipt_chains,
            s.seen_receipts,
            s.seen_invocations,
        )?;
        m.receipts
            .restore_periods(s.open_period, s.closed_periods)?;
        m.receipts.restore_checks(s.check_usage);
        m.restore_jobs(s.jobs, s.next_job_id, s.job_usage)?;
        Ok(m)
    }

    /// Counts for status pages: (nodes, live allocations, live functions).
    pub fn counts(&self) -> (usize, usize, usize) {
        let live = self.functions.iter().filter(|f| !f.deleted).count();
        (self.nodes.len(), self.allocations.len(), live)
    }

    /// Invariant: each node's recorded load is the sum of its live allocations.
    pub fn check_load_accounting(&self) -> std::result::Result<(), String> {
        let mut load: BTreeMap<u64, (Resources, u32)> = BTreeMap::new();
        for a in self.allocations.values() {
            let e = load.entry(a.node).or_default();
            e.0 = add(e.0, a.resources);
            e.1 += 1;
        }
        for (id, n) in &self.nodes {
            let (l, c) = load.remove(id).unwrap_or_default();
            if l != n.allocated || c != n.allocations {
                return Err(format!(
                    "node {id:016x}: recorded load {:?} x{} differs from its allocations {l:?} x{c}",
                    n.allocated, n.allocations
                ));
            }
        }
        match load.keys().next() {
            Some(id) => Err(format!("allocations on unregistered node {id:016x}")),
            None => Ok(()),
        }
    }

    /// Invariant: no node is overcommitted by committed allocations.
    pub fn check_capacity(&self) -> std::result::Result<(), String> {
        for (id, n) in &self.nodes {
            if n.allocated.cpu_millis > n.capacity.cpu_millis
                || n.allocated.memory_mib > n.capacity.memory_mib
            {
                return Err(format!(
                    "node {id:016x} overcommitted: {:?} allocated of {:?}",
                    n.allocated, n.capacity
                ));
            }
        }
        Ok(())
    }

    /// Invariant: a function's live replicas are on distinct nodes.
    pub fn check_distinct_replicas(&self) -> std::result::Result<(), String> {
        let mut seen: BTreeSet<(u32, u64)> = BTreeSet::new();
        for a in self.allocations.values() {
            if !seen.insert((a.function, a.node)) {
                let f = &self.functions[a.function as usize];
                return Err(format!(
                    "function `{}/{}` has two replicas on node {:016x}",
                    f.tenant, f.name, a.node
                ));
            }
        }
        Ok(())
    }
}

fn validate_node(n: &pb::NodeRecord) -> Result<()> {
    let id = n.id;
    if id == 0 {
        return Err(invalid("node id 0 is reserved"));
    }
    if n.gateway.len() > MAX_ADDRESS_BYTES {
        return Err(invalid(format!(
            "node {id:016x}: gateway address is {} bytes; at most {MAX_ADDRESS_BYTES}",
            n.gateway.len()
        )));
    }
    if !n.public_key.is_empty() && n.public_key.len() != 32 {
        return Err(invalid(format!(
            "node {id:016x}: public key must be 32 bytes (ed25519), got {}",
            n.public_key.len()
        )));
    }
    let a = n
        .attributes
        .as_ref()
        .ok_or_else(|| invalid(format!("node {id:016x}: attributes missing")))?;
    for (what, v) in [("region", &a.region), ("zone", &a.zone)] {
        if v.is_empty() || v.len() > 64 {
            return Err(invalid(format!(
                "node {id:016x}: {what} must be 1-64 characters"
            )));
        }
    }
    a.arch
        .parse::<Arch>()
        .map_err(|e| invalid(format!("node {id:016x}: {e}")))?;
    if a.runtimes.is_empty() {
        return Err(invalid(format!("node {id:016x}: offers no runtime")));
    }
    for r in &a.runtimes {
        r.parse::<Runtime>()
            .map_err(|e| invalid(format!("node {id:016x}: {e}")))?;
    }
    let cap = a.capacity.unwrap_or_default();
    if cap.cpu_millis == 0 || cap.memory_mib == 0 {
        return Err(invalid(format!(
            "node {id:016x}: capacity must have CPU and memory"
        )));
    }
    if a.labels.len() > MAX_LABELS {
        return Err(invalid(format!(
            "node {id:016x}: at most {MAX_LABELS} labels"
        )));
    }
    if a.labels.iter().any(|l| l.key.is_empty()) {
        return Err(invalid(format!("node {id:016x}: label with an empty key")));
    }
    if !(0.0..=1.0).contains(&n.reputation) {
        return Err(invalid(format!(
            "node {id:016x}: reputation must be in [0, 1], got {}",
            n.reputation
        )));
    }
    if n.state != 0 {
        node_state_from_pb(n.state)?;
    }
    Ok(())
}

fn add(a: Resources, b: Resources) -> Resources {
    Resources::new(
        a.cpu_millis.saturating_add(b.cpu_millis),
        a.memory_mib.saturating_add(b.memory_mib),
        a.disk_mib.saturating_add(b.disk_mib),
    )
}

fn sub(a: Resources, b: Resources) -> Resources {
    Resources::new(
        a.cpu_millis.saturating_sub(b.cpu_millis),
        a.memory_mib.saturating_sub(b.memory_mib),
        a.disk_mib.saturating_sub(b.disk_mib),
    )
}

fn ok_result() -> pb::CommandResult {
    pb::CommandResult::default()
}

/// The stored form of a refusal.
pub fn error_result(e: &ApplyError) -> pb::CommandResult {
    pb::CommandResult {
        error_code: e.code().to_string(),
        error_message: e.to_string(),
        ..Default::default()
    }
}

/// Splits a stored result into success or the refusal it records.
pub fn result_of(r: pb::CommandResult) -> std::result::Result<pb::CommandResult, ApplyError> {
    if r.error_code.is_empty() {
        Ok(r)
    } else {
        Err(ApplyError::from_code(&r.error_code, &r.error_message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest module apply accepts (a header; the edge validates the rest).
    const MODULE: &[u8] = b"\0asm\x01\0\0\0";

    fn cmd(request_id: &[u8], kind: pb::command::Kind) -> pb::Command {
        pb::Command {
            request_id: request_id.to_vec(),
            kind: Some(kind),
        }
    }

    fn tenant(name: &str) -> pb::Command {
        cmd(
            b"",
            pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
                name: name.into(),
                token_sha256: vec![],
            }),
        )
    }

    /// A deploy of `module` as `tenant/name` (shared with the ledger's tests).
    pub(super) fn deploy(tenant: &str, name: &str, module: &[u8]) -> pb::command::Kind {
        pb::command::Kind::Deploy(pb::DeployCmd {
            tenant: tenant.into(),
            name: name.into(),
            module: module.to_vec(),
            module_sha256: Sha256::digest(module).to_vec(),
            limits: Some(pb::FunctionLimits {
                cpu_millis: 100,
                memory_mib: 16,
                timeout_ms: 1000,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn machine() -> StateMachine {
        let mut m = StateMachine::new();
        let mut fx = Effects::default();
        for (i, t) in ["acme", "globex"].into_iter().enumerate() {
            let r = m.apply(i as u64 + 1, tenant(t), &mut fx);
            assert!(r.error_code.is_empty(), "{r:?}");
        }
        m
    }

    /// A module of `len` bytes (the header, then filler) distinct per `seed`.
    fn big_module(len: usize, seed: u8) -> Vec<u8> {
        let mut m = MODULE.to_vec();
        m.resize(len, seed);
        m
    }

    fn ok(r: &pb::CommandResult) {
        assert!(r.error_code.is_empty(), "{r:?}");
    }

    fn image_deploy(tenant: &str, name: &str, layers: &[(u8, u64)]) -> pb::command::Kind {
        pb::command::Kind::Deploy(pb::DeployCmd {
            tenant: tenant.into(),
            name: name.into(),
            limits: Some(pb::FunctionLimits {
                cpu_millis: 100,
                memory_mib: 16,
                timeout_ms: 1000,
                ..Default::default()
            }),
            image: Some(pb::ContainerImage {
                layers: layers
                    .iter()
                    .map(|&(b, size)| pb::ImageLayer {
                        sha256: hex::encode([b; 32]),
                        size,
                        gzip: false,
                    })
                    .collect(),
                cmd: vec!["/bin/true".into()],
                arch: "x86_64".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn container_versions_keep_their_image_and_count_against_the_tenants_image_quota() {
        let mut m = machine();
        let mut fx = Effects::default();
        let gib = 1u64 << 30;
        ok(&m.apply(
            10,
            cmd(b"", image_deploy("acme", "c", &[(1, 3 * gib)])),
            &mut fx,
        ));
        // A container version refers to no module; its image survives a snapshot.
        assert_eq!(m.modules.total_bytes(), 0);
        let back = StateMachine::from_snapshot(m.to_snapshot()).unwrap();
        let (_, f) = back.function("acme", "c").unwrap();
        let v = f.current().unwrap();
        assert_eq!(v.module(), None);
        assert_eq!(v.runtime(), Runtime::Container);
        assert_eq!(v.reservation().disk_mib, 3 * 1024 + 256);
        // Shared layers count once; past the quota a deploy is refused and changes nothing.
        let d = [(1, 3 * gib), (2, gib)]; // layer 1 is c's too: 4 GiB in all so far
        ok(&m.apply(11, cmd(b"", image_deploy("acme", "d", &d)), &mut fx));
        for (i, (name, layer)) in [("e", 3), ("f", 4), ("g", 5)].into_iter().enumerate() {
            let k = image_deploy("acme", name, &[(layer, 4 * gib)]);
            ok(&m.apply(12 + i as u64, cmd(b"", k), &mut fx)); // 16 GiB: the quota, reached
        }
        let before = m.to_snapshot();
        let r = m.apply(20, cmd(b"", image_deploy("acme", "h", &[(6, 1)])), &mut fx);
        assert!(r.error_message.contains("quota"), "{r:?}");
        assert_eq!(
            m.to_snapshot().functions,
            before.functions,
            "nothing changed"
        );
        // Replacing a function's own image frees its layers; another tenant is not affected.
        ok(&m.apply(
            21,
            cmd(b"", image_deploy("acme", "e", &[(5, 4 * gib)])),
            &mut fx,
        ));
        ok(&m.apply(22, cmd(b"", image_deploy("acme", "h", &[(6, 1)])), &mut fx));
        ok(&m.apply(
            23,
            cmd(b"", image_deploy("globex", "x", &[(7, 4 * gib)])),
            &mut fx,
        ));
        // A deploy with both a module and an image, or a bad image, is refused.
        let mut both = image_deploy("acme", "y", &[(6, 1)]);
        if let pb::command::Kind::Deploy(d) = &mut both {
            d.module = MODULE.to_vec();
        }
        assert!(!m.apply(24, cmd(b"", both), &mut fx).error_code.is_empty());
        let bad = image_deploy("acme", "z", &[]);
        assert!(!m.apply(25, cmd(b"", bad), &mut fx).error_code.is_empty());
    }

    #[test]
    fn modules_are_freed_with_their_last_function_and_quota_is_per_tenant() {
        let mut m = machine();
        let mut fx = Effects::default();
        let mib = 1 << 20;
        let v1 = big_module(15 * mib, 1);
        ok(&m.apply(10, cmd(b"", deploy("acme", "f", &v1)), &mut fx));
        let sha1: [u8; 32] = Sha256::digest(&v1).into();
        assert!(m.module(&sha1).is_some());
        // A new version of the only function using v1 frees v1: it leaves the snapshot.
        let before = m.to_snapshot().encode_to_vec().len();
        let v2 = big_module(mib, 2);
        ok(&m.apply(11, cmd(b"", deploy("acme", "f", &v2)), &mut fx));
        assert!(m.module(&sha1).is_none(), "the replaced module was kept");
        let after = m.to_snapshot().encode_to_vec().len();
        assert!(after + 13 * mib < before, "{before} -> {after}");
        // Deleting the function frees v2.
        let sha2: [u8; 32] = Sha256::digest(&v2).into();
        ok(&m.apply(
            12,
            cmd(
                b"",
                pb::command::Kind::DeleteFunction(pb::DeleteFunctionCmd {
                    tenant: "acme".into(),
                    name: "f".into(),
                }),
            ),
            &mut fx,
        ));
        assert!(m.module(&sha2).is_none());
        assert_eq!(m.modules.total_bytes(), 0);
        // One tenant fills its quota and is refused, naming it; another still deploys.
        let per = 15 * mib;
        let fit = (MAX_TENANT_MODULE_BYTES as usize) / per;
        for i in 0..fit {
            let name = format!("f{i}");
            ok(&m.apply(
                20 + i as u64,
                cmd(b"", deploy("acme", &name, &big_module(per, 10 + i as u8))),
                &mut fx,
            ));
        }
        let r = m.apply(
            90,
            cmd(b"", deploy("acme", "one-more", &big_module(per, 99))),
            &mut fx,
        );
        assert_eq!(r.error_code, "resource_exhausted", "{r:?}");
        assert!(r.error_message.contains("quota"), "{r:?}");
        ok(&m.apply(
            91,
            cmd(b"", deploy("globex", "g", &big_module(per, 98))),
            &mut fx,
        ));
        // The same module again costs acme nothing more.
        ok(&m.apply(
            92,
            cmd(b"", deploy("acme", "again", &big_module(per, 10))),
            &mut fx,
        ));
        // Quota accounting survives a snapshot.
        let back = StateMachine::from_snapshot(m.to_snapshot()).unwrap();
        assert_eq!(
            back.modules.tenant_bytes("acme"),
            m.modules.tenant_bytes("acme")
        );
        assert_eq!(back.digest(), m.digest());
    }

    fn report(node: u64, allocation: u64, state: pb::AllocationState) -> pb::Command {
        cmd(
            b"",
            pb::command::Kind::AllocationStates(pb::AllocationStatesCmd {
                updates: vec![pb::AllocationStateUpdate {
                    allocation,
                    state: state as i32,
                    node,
                    message: "incompatible import type for `wasi_snapshot_preview1::fd_write`"
                        .into(),
                }],
            }),
        )
    }

    #[test]
    fn workers_report_their_own_instances_and_load_failures_are_bounded() {
        let mut m = machine();
        let mut fx = Effects::default();
        let nodes = (1..=5).map(crate::fuzzing::node).collect();
        ok(&m.apply(
            5,
            cmd(
                b"",
                pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd { nodes }),
            ),
            &mut fx,
        ));
        let mut d = deploy("acme", "f", MODULE);
        if let pb::command::Kind::Deploy(c) = &mut d {
            c.replicas = 1;
            c.place_on = vec![1];
        }
        let placed = m.apply(6, cmd(b"", d), &mut fx);
        let alloc = placed.allocations[0].id;
        // Another node cannot speak for this allocation.
        let mut fx = Effects::default();
        ok(&m.apply(7, report(2, alloc, pb::AllocationState::Running), &mut fx));
        assert_eq!(m.allocations()[&alloc].state, pb::AllocationState::Pending);
        ok(&m.apply(8, report(1, alloc, pb::AllocationState::Running), &mut fx));
        assert_eq!(m.allocations()[&alloc].state, pb::AllocationState::Running);
        // A load failure removes the allocation, records why, and asks for a replacement;
        // the third failure does not.
        let fid = m.function("acme", "f").unwrap().0;
        let mut alloc = alloc;
        for failure in 1..=3u32 {
            let mut fx = Effects::default();
            ok(&m.apply(
                10 + u64::from(failure),
                report(u64::from(failure), alloc, pb::AllocationState::Failed),
                &mut fx,
            ));
            assert!(!m.allocations().contains_key(&alloc));
            let v = m
                .function("acme", "f")
                .unwrap()
                .1
                .current()
                .unwrap()
                .clone();
            assert_eq!(v.load_failures, failure);
            assert!(v.load_error.contains("fd_write"), "{}", v.load_error);
            assert_eq!(v.failed_nodes.len(), failure as usize);
            assert_eq!(fx.load_failed, if failure < 3 { vec![fid] } else { vec![] });
            assert_eq!(v.broken(), failure >= 3);
            // The leader's replacement, on the next node.
            let next = u64::from(failure) + 1;
            let plan = cmd(
                b"",
                pb::command::Kind::Plan(pb::PlanCmd {
                    tenant: "acme".into(),
                    function: "f".into(),
                    version: 1,
                    place_on: vec![next],
                    ..Default::default()
                }),
            );
            let r = m.apply(20 + u64::from(failure), plan, &mut Effects::default());
            ok(&r);
            alloc = r.allocations[0].id;
        }
        // Stale reports (an allocation already gone) change nothing and refuse nothing.
        ok(&m.apply(40, report(1, 999_999, pb::AllocationState::Failed), &mut fx));
        let back = StateMachine::from_snapshot(m.to_snapshot()).unwrap();
        assert_eq!(back.digest(), m.digest());
    }

    #[test]
    fn a_stale_plan_is_not_remembered_so_its_retry_is_applied() {
        let mut m = machine();
        let mut fx = Effects::default();
        let mut stale = deploy("acme", "f", MODULE);
        if let pb::command::Kind::Deploy(d) = &mut stale {
            d.replicas = 1;
            d.place_on = vec![42]; // no such node
        }
        let r = m.apply(10, cmd(b"rid", stale), &mut fx);
        assert_eq!(r.error_code, "stale_plan", "{r:?}");
        let r = m.apply(11, cmd(b"rid", deploy("acme", "f", MODULE)), &mut fx);
        ok(&r);
        assert!(m.function("acme", "f").is_some());
    }

    #[test]
    fn request_ids_are_scoped_to_tenant_and_method() {
        let mut m = machine();
        let mut fx = Effects::default();
        let id = b"same-request-id";
        let a = m.apply(10, cmd(id, deploy("acme", "a-fn", MODULE)), &mut fx);
        assert!(a.error_code.is_empty(), "{a:?}");
        // Globex reuses acme's id: its own function is created, not acme's answer returned.
        let b = m.apply(11, cmd(id, deploy("globex", "b-fn", MODULE)), &mut fx);
        assert!(b.error_code.is_empty(), "{b:?}");
        assert!(
            m.function("globex", "b-fn").is_some(),
            "globex's deploy was swallowed"
        );
        assert!(m.function("globex", "a-fn").is_none());
        // A retry within the tenant is answered, not applied twice.
        let again = m.apply(12, cmd(id, deploy("acme", "a-fn", MODULE)), &mut fx);
        assert_eq!(again, a);
        assert_eq!(m.function("acme", "a-fn").unwrap().1.versions.len(), 1);
        // The same id on another method of the same tenant is a different request.
        let del = m.apply(
            13,
            cmd(
                id,
                pb::command::Kind::DeleteFunction(pb::DeleteFunctionCmd {
                    tenant: "acme".into(),
                    name: "a-fn".into(),
                }),
            ),
            &mut fx,
        );
        assert!(del.error_code.is_empty(), "{del:?}");
        assert!(m.function("acme", "a-fn").is_none());
        // What the replica asks before planning a deploy sees only the caller's own answer.
        let scope = |t| DedupeScope {
            method: "deploy",
            tenant: t,
        };
        assert!(m.deduped(scope("acme"), id).is_some());
        assert!(m.deduped(scope("initech"), id).is_none());
        // The scoped table survives a snapshot.
        let back = StateMachine::from_snapshot(m.to_snapshot()).unwrap();
        assert_eq!(back.digest(), m.digest());
        assert!(back.deduped(scope("globex"), id).is_some());
    }
}
