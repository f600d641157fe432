//! The committed state a gateway needs, as the control plane's `Edge.Watch` stream tells it:
//! functions (current version), allocations, which gateway holds each node, and token hashes.
//! Applying an event says which nodes' assignments may have changed, so only their workers
//! are reconciled.
//!
//! ```text
//!  WatchEvent ─▶ apply ─▶ functions / allocations (by function, by node) / nodes / tokens
//!                 └─▶ affected nodes ─▶ hub wakes those workers' reconcile
//!  router ─▶ route(tenant, name) · token(hash) · gateway_of(node)
//! ```

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use stellar_proto::v1 as pb;

type FunctionKey = (String, String);
/// A task attempt by (job, stage, task, attempt).
pub type TaskId = (u64, u32, u32, u32);

/// The id of a wire task key.
pub fn task_id(k: &pb::TaskKey) -> TaskId {
    (k.job, k.stage, k.task, k.attempt)
}

/// A function as routing sees it: its current version and where that version runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    /// The current version.
    pub version: u32,
    /// What that version runs: its module's sha256 (hex) or its image's digest.
    pub code_sha256: String,
    /// A container function (its usage is not deterministic: never re-executed to check).
    pub container: bool,
    /// Safe to run twice (retried once elsewhere when a worker vanishes).
    pub idempotent: bool,
    /// The function's own per-call timeout, ms (0: the default).
    pub timeout_ms: u32,
    /// (allocation, node) of the current version.
    pub allocations: Vec<(u64, u64)>,
    /// Workers that could not load the current version.
    pub load_failures: u32,
    /// The last such worker's reason.
    pub load_error: String,
}

/// Which nodes an applied event may have changed the assignments of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affected {
    /// These nodes.
    Nodes(Vec<u64>),
    /// Everything (a reset).
    All,
}

#[derive(Debug, Default)]
struct State {
    applied: u64,
    functions: HashMap<FunctionKey, pb::WatchedFunction>,
    allocations: HashMap<u64, pb::Allocation>,
    by_function: HashMap<FunctionKey, BTreeSet<u64>>,
    by_node: HashMap<u64, BTreeSet<u64>>,
    /// Node → (state, gateway symbol).
    /// (state, gateway symbol, reputation) by node.
    nodes: HashMap<u64, (i32, u32, f32)>,
    gateways: Vec<Arc<str>>,
    gateway_ids: HashMap<Arc<str>, u32>,
    /// Ready nodes per gateway symbol (how loaded each gateway is).
    ready_on: Vec<usize>,
    tokens: HashMap<Vec<u8>, (String, bool)>,
    /// Running task attempts by key, and by node.
    tasks: HashMap<TaskId, (u64, pb::Task)>,
    tasks_by_node: HashMap<u64, BTreeSet<TaskId>>,
    /// True once a whole reset has been applied (before, routing knows nothing).
    complete: bool,
    resetting: bool,
}

impl State {
    fn gateway_id(&mut self, g: &str) -> u32 {
        if let Some(&id) = self.gateway_ids.get(g) {
            return id;
        }
        let id = self.gateways.len() as u32;
        let a: Arc<str> = Arc::from(g);
        self.gateways.push(a.clone());
        self.ready_on.push(0);
        self.gateway_ids.insert(a, id);
        id
    }

    fn remove_task(&mut self, id: TaskId, affected: &mut Vec<u64>) {
        if let Some((node, _)) = self.tasks.remove(&id) {
            if let Some(s) = self.tasks_by_node.get_mut(&node) {
                s.remove(&id);
                if s.is_empty() {
                    self.tasks_by_node.remove(&node);
                }
            }
            affected.push(node);
        }
    }

    fn remove_allocation(&mut self, id: u64, affected: &mut Vec<u64>) {
        if let Some(a) = self.allocations.remove(&id) {
            let key = (a.tenant.clone(), a.function.clone());
            if let Some(s) = self.by_function.get_mut(&key) {
                s.remove(&id);
                if s.is_empty() {
                    self.by_function.remove(&key);
                }
            }
            if let Some(s) = self.by_node.get_mut(&a.node) {
                s.remove(&id);
                if s.is_empty() {
                    self.by_node.remove(&a.node);
                }
            }
            affected.push(a.node);
        }
    }
}

/// The watched state (see the module docs); shared by the router, the agent service and the
/// control proxy.
#[derive(Debug)]
pub struct View {
    state: RwLock<State>,
    applied: tokio::sync::watch::Sender<u64>,
}

impl Default for View {
    fn default() -> Self {
        View {
            state: RwLock::default(),
            applied: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl View {
    /// An empty view (nothing known until the first reset arrives).
    pub fn new() -> Arc<View> {
        Arc::new(View::default())
    }

    /// The applied index the view is at (0: nothing yet).
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Whether a whole reset has been applied (the view is usable).
    pub fn complete(&self) -> bool {
        self.state.read().map(|s| s.complete).unwrap_or(false)
    }

    /// Waits until the view has applied `index` or `timeout` passes; true if it has.
    pub async fn wait_for(&self, index: u64, timeout: std::time::Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|a| *a >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Applies one event; the nodes whose assignments may have changed.
    pub fn apply(&self, ev: pb::WatchEvent) -> Affected {
        let Ok(mut s) = self.state.write() else {
            return Affected::Nodes(Vec::new());
        };
        let mut affected = Vec::new();
        if ev.reset {
            let gateways = std::mem::take(&mut s.gateways);
            let gateway_ids = std::mem::take(&mut s.gateway_ids);
            let ready_on = vec![0; gateways.len()];
            *s = State {
                gateways,
                gateway_ids,
                ready_on,
                resetting: true,
                ..State::default()
            };
        }
        for t in ev.tokens {
            if t.revoked {
                s.tokens.remove(&t.token_sha256);
            } else {
                s.tokens.insert(t.token_sha256, (t.tenant, t.admin));
            }
        }
        for f in ev.functions {
            let key = (f.tenant.clone(), f.name.clone());
            if f.deleted {
                s.functions.remove(&key);
            } else {
                s.functions.insert(key.clone(), f);
            }
            // A new version changes what its workers run.
            if let Some(ids) = s.by_function.get(&key) {
                affected.extend(
                    ids.iter()
                        .filter_map(|id| s.allocations.get(id).map(|a| a.node)),
                );
            }
        }
        for id in ev.removed_allocations {
            s.remove_allocation(id, &mut affected);
        }
        for a in ev.allocations {
            if s.allocations
                .get(&a.id)
                .is_some_and(|old| old.node != a.node)
            {
                s.remove_allocation(a.id, &mut affected);
            }
            affected.push(a.node);
            s.by_function
                .entry((a.tenant.clone(), a.function.clone()))
                .or_default()
                .insert(a.id);
            s.by_node.entry(a.node).or_default().insert(a.id);
            s.allocations.insert(a.id, a);
        }
        for w in ev.tasks {
            let Some(task) = w.task else { continue };
            let id = task_id(&task.key.unwrap_or_default());
            s.remove_task(id, &mut affected);
            if w.running {
                affected.push(w.node);
                s.tasks_by_node.entry(w.node).or_default().insert(id);
                s.tasks.insert(id, (w.node, task));
            }
        }
        let ready = pb::NodeState::Ready as i32;
        for n in ev.nodes {
            let g = s.gateway_id(&n.gateway);
            if let Some((old, og, _)) = s.nodes.insert(n.id, (n.state, g, n.reputation))
                && old == ready
            {
                s.ready_on[og as usize] -= 1;
            }
            if n.state == ready {
                s.ready_on[g as usize] += 1;
            }
        }
        s.applied = s.applied.max(ev.applied_index);
        let all = s.resetting && !ev.more;
        if all {
            s.resetting = false;
            s.complete = true;
        }
        let applied = s.applied;
        drop(s);
        self.applied.send_if_modified(|a| {
            let moved = *a != applied;
            *a = applied;
            moved
        });
        if all {
            Affected::All
        } else {
            affected.sort_unstable();
            affected.dedup();
            Affected::Nodes(affected)
        }
    }

    /// How to route `tenant/name` (None: no such function).
    pub fn route(&self, tenant: &str, name: &str) -> Option<Route> {
        let s = self.state.read().ok()?;
        let key = (tenant.to_string(), name.to_string());
        let f = s.functions.get(&key)?;
        let allocations = s
            .by_function
            .get(&key)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| s.allocations.get(id))
                    .filter(|a| a.version == f.version)
                    .map(|a| (a.id, a.node))
                    .collect()
            })
            .unwrap_or_default();
        Some(Route {
            version: f.version,
            container: f.image.is_some(),
            code_sha256: match &f.image {
                Some(i) => stellar_proto::receipts::image_code(i),
                None => f.module_sha256.clone(),
            },
            idempotent: f.idempotent,
            timeout_ms: f.limits.map_or(0, |l| l.timeout_ms),
            allocations,
            load_failures: f.load_failures,
            load_error: f.load_error.clone(),
        })
    }

    /// What `node` should run: one start assignment per allocation of a current version.
    pub fn assignments(&self, node: u64) -> Vec<pb::Assignment> {
        let Ok(s) = self.state.read() else {
            return Vec::new();
        };
        let Some(ids) = s.by_node.get(&node) else {
            return Vec::new();
        };
        ids.iter()
            .filter_map(|id| {
                let a = s.allocations.get(id)?;
                let f = s.functions.get(&(a.tenant.clone(), a.function.clone()))?;
                // An older version's allocation is being replaced: not started again.
                (f.version == a.version).then(|| pb::Assignment {
                    allocation: a.id,
                    start: true,
                    tenant: a.tenant.clone(),
                    function: a.function.clone(),
                    version: a.version,
                    module_sha256: f.module_sha256.clone(),
                    limits: f.limits,
                    image: f.image.clone(),
                })
            })
            .collect()
    }

    /// The task attempts `node` should be running.
    pub fn tasks(&self, node: u64) -> Vec<pb::Task> {
        let Ok(s) = self.state.read() else {
            return Vec::new();
        };
        s.tasks_by_node
            .get(&node)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| s.tasks.get(id).map(|(_, t)| t.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether attempt `id` runs on `node` now (its result is awaited from there).
    pub fn runs_task(&self, node: u64, id: TaskId) -> bool {
        self.state
            .read()
            .is_ok_and(|s| s.tasks.get(&id).is_some_and(|(n, _)| *n == node))
    }

    /// The tenant and admin flag of a token hash (None: unknown or revoked, as far as the
    /// view knows).
    pub fn token(&self, sha256: &[u8]) -> Option<(String, bool)> {
        self.state.read().ok()?.tokens.get(sha256).cloned()
    }

    /// The gateway holding `node`'s stream, by its advertised address ("" when none).
    pub fn gateway_of(&self, node: u64) -> Option<Arc<str>> {
        let s = self.state.read().ok()?;
        let &(_, g, _) = s.nodes.get(&node)?;
        s.gateways.get(g as usize).cloned()
    }

    /// Every gateway holding ready nodes, with how many (routing and rebalancing read it).
    pub fn gateway_loads(&self) -> Vec<(Arc<str>, usize)> {
        self.state
            .read()
            .map(|s| {
                s.gateways
                    .iter()
                    .zip(&s.ready_on)
                    .filter(|(g, n)| !g.is_empty() && **n > 0)
                    .map(|(g, n)| (g.clone(), *n))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The gateways holding ready nodes, by advertised address.
    pub fn gateways(&self) -> Vec<Arc<str>> {
        self.gateway_loads().into_iter().map(|(g, _)| g).collect()
    }

    /// A node's committed reputation, if known.
    pub fn reputation(&self, node: u64) -> Option<f32> {
        self.state.read().ok()?.nodes.get(&node).map(|n| n.2)
    }

    /// A node's committed state (as the wire enum's number), if known.
    pub fn node_state(&self, node: u64) -> Option<i32> {
        self.state.read().ok()?.nodes.get(&node).map(|n| n.0)
    }

    /// Functions, allocations and nodes known (for health and logs).
    pub fn counts(&self) -> (usize, usize, usize) {
        self.state
            .read()
            .map(|s| (s.functions.len(), s.allocations.len(), s.nodes.len()))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(id: u64, node: u64, version: u32) -> pb::Allocation {
        pb::Allocation {
            id,
            tenant: "acme".into(),
            function: "f".into(),
            version,
            node,
            ..Default::default()
        }
    }

    fn function(version: u32) -> pb::WatchedFunction {
        pb::WatchedFunction {
            tenant: "acme".into(),
            name: "f".into(),
            version,
            module_sha256: format!("{version:064x}"),
            ..Default::default()
        }
    }

    #[test]
    fn gateway_loads_follow_nodes_moving_going_down_and_a_reset() {
        let node = |id: u64, state: pb::NodeState, gateway: &str| pb::WatchedNode {
            id,
            state: state as i32,
            gateway: gateway.into(),
            ..Default::default()
        };
        let loads = |v: &View| {
            let mut l: Vec<(String, usize)> = v
                .gateway_loads()
                .into_iter()
                .map(|(g, n)| (g.to_string(), n))
                .collect();
            l.sort();
            l
        };
        let v = View::new();
        v.apply(pb::WatchEvent {
            applied_index: 1,
            reset: true,
            nodes: vec![
                node(1, pb::NodeState::Ready, "a"),
                node(2, pb::NodeState::Ready, "a"),
                node(3, pb::NodeState::Ready, "b"),
                node(4, pb::NodeState::Down, ""),
            ],
            ..Default::default()
        });
        assert_eq!(loads(&v), vec![("a".into(), 2), ("b".into(), 1)]);
        // 2 moves to b, 1 goes down, 4 comes back on a.
        v.apply(pb::WatchEvent {
            applied_index: 2,
            nodes: vec![
                node(2, pb::NodeState::Ready, "b"),
                node(1, pb::NodeState::Down, ""),
                node(4, pb::NodeState::Ready, "a"),
            ],
            ..Default::default()
        });
        assert_eq!(loads(&v), vec![("a".into(), 1), ("b".into(), 2)]);
        assert_eq!(v.gateways().len(), 2);
        // A reset starts the counts over.
        v.apply(pb::WatchEvent {
            applied_index: 3,
            reset: true,
            nodes: vec![node(9, pb::NodeState::Ready, "c")],
            ..Default::default()
        });
        assert_eq!(loads(&v), vec![("c".into(), 1)]);
    }

    #[test]
    fn events_build_routes_and_assignments_and_say_who_is_affected() {
        let v = View::new();
        assert!(!v.complete());
        let a = v.apply(pb::WatchEvent {
            applied_index: 5,
            reset: true,
            more: true,
            functions: vec![function(1)],
            tokens: vec![pb::WatchedToken {
                token_sha256: vec![1; 32],
                tenant: "acme".into(),
                admin: false,
                revoked: false,
            }],
            ..Default::default()
        });
        assert_eq!(a, Affected::Nodes(vec![]));
        assert!(!v.complete(), "the reset continues");
        let a = v.apply(pb::WatchEvent {
            applied_index: 5,
            allocations: vec![alloc(10, 1, 1), alloc(11, 2, 1)],
            nodes: vec![pb::WatchedNode {
                id: 1,
                gateway: "gw:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(a, Affected::All);
        assert!(v.complete());
        assert_eq!(v.applied(), 5);
        let r = v.route("acme", "f").unwrap();
        assert_eq!(r.allocations, vec![(10, 1), (11, 2)]);
        assert_eq!(v.assignments(1).len(), 1);
        assert_eq!(v.token(&[1; 32]).unwrap().0, "acme");
        assert_eq!(v.gateway_of(1).as_deref(), Some("gw:1"));
        // Version 2 replaces allocation 11 with 12 on node 3; 10 is removed.
        let a = v.apply(pb::WatchEvent {
            applied_index: 6,
            functions: vec![function(2)],
            allocations: vec![alloc(12, 3, 2)],
            removed_allocations: vec![10],
            ..Default::default()
        });
        let Affected::Nodes(n) = a else {
            panic!("not a reset")
        };
        assert_eq!(n, vec![1, 2, 3]);
        let r = v.route("acme", "f").unwrap();
        assert_eq!(
            r.allocations,
            vec![(12, 3)],
            "only the current version routes"
        );
        assert!(
            v.assignments(2).is_empty(),
            "an old version is not started again"
        );
        assert!(v.assignments(1).is_empty());
        // Deleted, revoked.
        let mut gone = function(2);
        gone.deleted = true;
        v.apply(pb::WatchEvent {
            applied_index: 7,
            functions: vec![gone],
            tokens: vec![pb::WatchedToken {
                token_sha256: vec![1; 32],
                revoked: true,
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(v.route("acme", "f").is_none());
        assert!(v.token(&[1; 32]).is_none());
    }
}
