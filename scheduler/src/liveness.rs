//! Node liveness on the leader, from gateways' reports: which gateway holds each node's
//! stream is soft state; only transitions (down, back, moved, draining) are committed, in
//! batches. Nothing here runs per node per tick: a report costs O(its deltas), a gateway that
//! dies costs O(its nodes) once, and a new leader sweeps all nodes once, after its grace.
//!
//! ```text
//!  GatewayReport ─▶ attach/detach in `on` (node → gateway) ─▶ dirty nodes
//!  session ends  ─▶ gateway orphaned ─(reattach window)─▶ its nodes still there: detached
//!  new leader    ─(grace: gateways resync their full lists)─▶ one sweep: unclaimed → dirty
//!  every liveness tick: dirty nodes ─ desired (attached? where? draining?) vs committed ─▶
//!                       NodeTransitions (Raft); an applied change is checked again
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};

use stellar_placement::NodeState;
use stellar_proto::v1 as pb;

use crate::state::{StateMachine, node_state_to_pb};

/// Where a node's stream is, as its gateway last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attached {
    gateway: u32,
    draining: bool,
    /// It registered again while committed as draining: a worker that drained (SIGTERM) and
    /// came back is ready again.
    undrain: bool,
}

/// One gateway as the leader knows it.
#[derive(Debug, Default)]
struct Gateway {
    address: String,
    /// The session currently open for it (0: none).
    session: u64,
    /// When its session ended (tick): its nodes are detached at `orphaned + reattach`.
    orphaned: Option<u64>,
    nodes: HashSet<u64>,
}

/// The leader's view of which gateway holds which node (see the module docs).
#[derive(Debug)]
pub struct Liveness {
    gateways: Vec<Gateway>,
    by_address: HashMap<String, u32>,
    on: HashMap<u64, Attached>,
    /// Nodes that left while draining: they stay draining (they were asked to go), not down.
    drained: HashSet<u64>,
    dirty: BTreeSet<u64>,
    /// Until this tick a new leader waits for gateways to resync before judging anyone.
    grace_until: u64,
    swept: bool,
    reattach_ticks: u64,
}

/// Why a gateway report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// A report must name the gateway that sends it.
    #[error("a gateway report must name its gateway's address (1-256 bytes)")]
    NoAddress,
    /// Another session of the same gateway replaced this one.
    #[error("gateway {0} opened a newer session; this one is closed")]
    Superseded(String),
}

impl Liveness {
    /// A new leader's view: nobody attached, judged only after `grace_ticks`.
    pub fn new(now: u64, grace_ticks: u64, reattach_ticks: u64) -> Liveness {
        Liveness {
            gateways: Vec::new(),
            by_address: HashMap::new(),
            on: HashMap::new(),
            drained: HashSet::new(),
            dirty: BTreeSet::new(),
            grace_until: now + grace_ticks,
            swept: false,
            reattach_ticks,
        }
    }

    /// Nodes some gateway holds.
    pub fn attached(&self) -> usize {
        self.on.len()
    }

    /// The gateway holding `node`, if any.
    pub fn gateway_of(&self, node: u64) -> Option<&str> {
        self.on
            .get(&node)
            .map(|a| self.gateways[a.gateway as usize].address.as_str())
    }

    fn gateway_id(&mut self, address: &str) -> u32 {
        if let Some(&g) = self.by_address.get(address) {
            return g;
        }
        let g = self.gateways.len() as u32;
        self.gateways.push(Gateway {
            address: address.to_string(),
            ..Gateway::default()
        });
        self.by_address.insert(address.to_string(), g);
        g
    }

    /// The gateways with a session now (advertised addresses).
    pub fn live_gateways(&self) -> Vec<String> {
        self.gateways
            .iter()
            .filter(|g| g.session != 0)
            .map(|g| g.address.clone())
            .collect()
    }

    /// A gateway opened session `session` (a newer one replaces any older one).
    pub fn open(&mut self, address: &str, session: u64) -> Result<(), ReportError> {
        if address.is_empty() || address.len() > crate::state::MAX_ADDRESS_BYTES {
            return Err(ReportError::NoAddress);
        }
        let g = self.gateway_id(address);
        let gw = &mut self.gateways[g as usize];
        gw.session = session;
        gw.orphaned = None;
        Ok(())
    }

    /// Session `session` of `address` ended at `now`: unless the gateway comes back or its
    /// nodes re-attach elsewhere within the reattach window, its nodes go down.
    pub fn close(&mut self, address: &str, session: u64, now: u64) {
        if let Some(&g) = self.by_address.get(address) {
            let gw = &mut self.gateways[g as usize];
            if gw.session == session {
                gw.session = 0;
                gw.orphaned = Some(now);
            }
        }
    }

    fn attach(&mut self, node: u64, g: u32) {
        self.drained.remove(&node);
        let before = self.on.insert(
            node,
            Attached {
                gateway: g,
                draining: false,
                undrain: false,
            },
        );
        if let Some(b) = before
            && b.gateway != g
        {
            self.gateways[b.gateway as usize].nodes.remove(&node);
        }
        if let Some(b) = before {
            // Re-attaching keeps a drain in progress; `joined` clears it.
            if let Some(a) = self.on.get_mut(&node) {
                a.draining = b.draining;
                a.undrain = b.undrain;
            }
        }
        self.gateways[g as usize].nodes.insert(node);
        self.dirty.insert(node);
    }

    fn detach(&mut self, node: u64, g: u32) {
        if self.on.get(&node).is_some_and(|a| a.gateway == g) {
            if self.on.remove(&node).is_some_and(|a| a.draining) {
                self.drained.insert(node);
            }
            self.dirty.insert(node);
        }
        self.gateways[g as usize].nodes.remove(&node);
    }

    /// Takes one report of session `session` into the soft state; the joined nodes the
    /// control plane does not know as they are (new, new key or attributes) come back, to
    /// be registered (committed) before the gateway is acknowledged.
    pub fn report(
        &mut self,
        state: &StateMachine,
        session: u64,
        r: &pb::GatewayReport,
    ) -> Result<Vec<pb::NodeRecord>, ReportError> {
        let g = *self
            .by_address
            .get(&r.gateway)
            .ok_or(ReportError::NoAddress)?;
        if self.gateways[g as usize].session != session {
            return Err(ReportError::Superseded(r.gateway.clone()));
        }
        if r.resync {
            // Whatever this gateway held and no longer lists is gone from it.
            let listed: HashSet<u64> = r.attached.iter().copied().collect();
            let gone: Vec<u64> = self.gateways[g as usize]
                .nodes
                .iter()
                .copied()
                .filter(|n| !listed.contains(n))
                .collect();
            for n in gone {
                self.detach(n, g);
            }
        }
        for &n in &r.attached {
            if state.nodes().contains_key(&n) {
                self.attach(n, g);
            }
        }
        let mut register = Vec::new();
        for rec in &r.joined {
            let known = state
                .nodes()
                .get(&rec.id)
                .is_some_and(|n| n.managed && same_registration(state, n, rec));
            if !known {
                let mut rec = rec.clone();
                rec.gateway = r.gateway.clone();
                rec.managed = true;
                register.push(rec);
            }
            self.attach(rec.id, g);
            if let Some(a) = self.on.get_mut(&rec.id) {
                a.draining = false;
                a.undrain = state
                    .nodes()
                    .get(&rec.id)
                    .is_some_and(|n| n.state == NodeState::Draining);
            }
        }
        for &n in &r.down {
            self.detach(n, g);
        }
        for &n in &r.draining {
            if let Some(a) = self.on.get_mut(&n)
                && a.gateway == g
            {
                a.draining = true;
                a.undrain = false;
                self.dirty.insert(n);
            }
        }
        Ok(register)
    }

    /// A committed change to these nodes: check them again against what is desired (a
    /// transition may have raced with a newer report).
    pub fn observe(&mut self, nodes: &[u64]) {
        for &n in nodes {
            if self.on.contains_key(&n) {
                self.dirty.insert(n);
            }
        }
    }

    /// The transitions to commit now (at most `max`): orphaned gateways past the window lose
    /// their nodes, a new leader's grace ends with one sweep, and each dirty node's desired
    /// state is compared with the committed one.
    pub fn transitions(
        &mut self,
        state: &StateMachine,
        now: u64,
        max: usize,
    ) -> Vec<pb::NodeTransition> {
        for g in 0..self.gateways.len() {
            let expired = self.gateways[g]
                .orphaned
                .is_some_and(|t| now >= t + self.reattach_ticks);
            if expired {
                self.gateways[g].orphaned = None;
                let nodes: Vec<u64> = self.gateways[g].nodes.iter().copied().collect();
                if !nodes.is_empty() {
                    tracing::info!(
                        gateway = %self.gateways[g].address,
                        nodes = nodes.len(),
                        "gateway gone and its nodes did not re-attach elsewhere: marking them down"
                    );
                }
                for n in nodes {
                    self.detach(n, g as u32);
                }
            }
        }
        // Until the grace ends only what gateways reported is acted on: a node nobody has
        // claimed yet is not judged (its gateway may not have resynced with this leader).
        if now >= self.grace_until && !self.swept {
            // Once per leadership: committed-live nodes no gateway claimed during the grace.
            self.swept = true;
            for (&id, n) in state.nodes() {
                if n.managed && n.state == NodeState::Ready && !self.on.contains_key(&id) {
                    self.dirty.insert(id);
                }
            }
        }
        let mut out = Vec::new();
        while out.len() < max {
            let Some(id) = self.dirty.pop_first() else {
                break;
            };
            // Not committed yet: its registration is on its way through Raft (it stays
            // attached; forgetting it here would leave it committed ready but unwatched).
            let Some(n) = state.nodes().get(&id) else {
                continue;
            };
            if let Some(t) = self.desired(state, id, n) {
                out.push(t);
            }
        }
        out
    }

    fn desired(
        &mut self,
        state: &StateMachine,
        id: u64,
        n: &crate::state::Node,
    ) -> Option<pb::NodeTransition> {
        let transition = |s: NodeState, gateway: &str| pb::NodeTransition {
            node: id,
            state: node_state_to_pb(s) as i32,
            gateway: gateway.to_string(),
        };
        let Some(a) = self.on.get(&id).copied() else {
            // A drained node stays draining when its worker leaves (it was asked to go).
            if self.drained.remove(&id) {
                return (n.state == NodeState::Ready).then(|| transition(NodeState::Draining, ""));
            }
            return (n.managed && n.state == NodeState::Ready)
                .then(|| transition(NodeState::Down, ""));
        };
        let gw = self.gateways[a.gateway as usize].address.as_str();
        let moved = state.node_gateway(n) != gw;
        match n.state {
            NodeState::Quarantined => None,
            NodeState::Down => Some(transition(
                if a.draining {
                    NodeState::Draining
                } else {
                    NodeState::Ready
                },
                gw,
            )),
            NodeState::Ready if a.draining => Some(transition(NodeState::Draining, gw)),
            NodeState::Draining if a.undrain => {
                if let Some(x) = self.on.get_mut(&id) {
                    x.undrain = false;
                }
                Some(transition(NodeState::Ready, gw))
            }
            s if moved => Some(transition(s, gw)),
            _ => None,
        }
    }
}

/// Whether a worker's registration says what the committed node already says (same key,
/// same attributes up to order), so reconnecting commits nothing.
fn same_registration(state: &StateMachine, n: &crate::state::Node, rec: &pb::NodeRecord) -> bool {
    let key_matches = if rec.public_key.is_empty() {
        n.public_key == [0u8; 32]
    } else {
        n.public_key.as_slice() == rec.public_key.as_slice()
    };
    let Some(a) = rec.attributes.as_ref() else {
        return false;
    };
    let mut a = a.clone();
    a.labels
        .sort_by(|x, y| (&x.key, &x.value).cmp(&(&y.key, &y.value)));
    a.runtimes.sort_by_key(|r| r != "wasm");
    a.runtimes.dedup();
    let mut committed = state.node_attributes_pb(n);
    committed
        .labels
        .sort_by(|x, y| (&x.key, &x.value).cmp(&(&y.key, &y.value)));
    key_matches && a == committed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(ids: &[u64]) -> StateMachine {
        let mut s = StateMachine::new();
        let nodes = ids.iter().map(|&id| crate::fuzzing::node(id)).collect();
        let mut fx = crate::state::Effects::default();
        let r = s.apply(
            1,
            pb::Command {
                request_id: vec![],
                kind: Some(pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
                    nodes,
                })),
            },
            &mut fx,
        );
        assert!(r.error_code.is_empty(), "{r:?}");
        s
    }

    fn apply(s: &mut StateMachine, index: u64, transitions: Vec<pb::NodeTransition>) {
        let mut fx = crate::state::Effects::default();
        let r = s.apply(
            index,
            pb::Command {
                request_id: vec![],
                kind: Some(pb::command::Kind::NodeTransitions(pb::NodeTransitionsCmd {
                    transitions,
                })),
            },
            &mut fx,
        );
        assert!(r.error_code.is_empty(), "{r:?}");
    }

    fn report(gateway: &str, seq: u64) -> pb::GatewayReport {
        pb::GatewayReport {
            seq,
            gateway: gateway.into(),
            ..Default::default()
        }
    }

    fn state_of(s: &StateMachine, id: u64) -> (NodeState, String) {
        let n = &s.nodes()[&id];
        (n.state, s.node_gateway(n).to_string())
    }

    #[test]
    fn a_dead_gateways_nodes_go_down_unless_they_reattach_elsewhere() {
        let mut s = registered(&[1, 2, 3, 4]);
        let mut l = Liveness::new(0, 10, 20);
        l.open("gw-a:1", 1).unwrap();
        l.open("gw-b:1", 2).unwrap();
        let mut r = report("gw-a:1", 1);
        r.attached = vec![1, 2];
        r.resync = true;
        l.report(&s, 1, &r).unwrap();
        let mut r = report("gw-b:1", 1);
        r.attached = vec![3];
        r.resync = true;
        l.report(&s, 2, &r).unwrap();
        // During the grace period what gateways reported is recorded, but node 4, which no
        // gateway claimed yet, is not judged.
        let t = l.transitions(&s, 5, 100);
        assert_eq!(t.len(), 3, "{t:?}");
        apply(&mut s, 2, t);
        assert_eq!(state_of(&s, 4).0, NodeState::Ready);
        let t = l.transitions(&s, 10, 100);
        assert_eq!(t.len(), 1, "{t:?}");
        apply(&mut s, 6, t);
        assert_eq!(state_of(&s, 4).0, NodeState::Down);
        assert_eq!(state_of(&s, 1), (NodeState::Ready, "gw-a:1".into()));
        assert_eq!(state_of(&s, 3), (NodeState::Ready, "gw-b:1".into()));
        // Gateway a dies; node 2 re-attaches to b at once, node 1 never does.
        l.close("gw-a:1", 1, 11);
        let mut r = report("gw-b:1", 2);
        r.attached = vec![2];
        l.report(&s, 2, &r).unwrap();
        let t = l.transitions(&s, 12, 100);
        apply(&mut s, 3, t);
        assert_eq!(state_of(&s, 2), (NodeState::Ready, "gw-b:1".into()));
        assert_eq!(state_of(&s, 1).0, NodeState::Ready, "still in its window");
        let t = l.transitions(&s, 31, 100);
        assert_eq!(t.len(), 1, "{t:?}");
        apply(&mut s, 4, t);
        assert_eq!(state_of(&s, 1), (NodeState::Down, String::new()));
        assert_eq!(state_of(&s, 2).0, NodeState::Ready);
        // It comes back through b: ready again, on b.
        let mut r = report("gw-b:1", 3);
        r.attached = vec![1];
        l.report(&s, 2, &r).unwrap();
        let t = l.transitions(&s, 32, 100);
        apply(&mut s, 5, t);
        assert_eq!(state_of(&s, 1), (NodeState::Ready, "gw-b:1".into()));
    }

    #[test]
    fn a_node_whose_registration_is_in_flight_stays_attached() {
        // Found by edge-bench: a liveness round between a join report and the commit of its
        // registration forgot the node; the grace sweep then committed it down while its
        // worker was attached, and a later gateway death would not have touched it.
        let mut s = registered(&[1]);
        let mut l = Liveness::new(0, 10, 20);
        l.open("gw-a:1", 1).unwrap();
        let mut r = report("gw-a:1", 1);
        r.joined = vec![crate::fuzzing::node(7)];
        let register = l.report(&s, 1, &r).unwrap();
        assert_eq!(register.len(), 1);
        // A round before the registration commits.
        assert!(l.transitions(&s, 1, 100).is_empty());
        assert_eq!(l.gateway_of(7), Some("gw-a:1"));
        // The registration commits (ready, on gw-a), then the grace ends.
        let mut fx = crate::state::Effects::default();
        let res = s.apply(
            2,
            pb::Command {
                request_id: vec![],
                kind: Some(pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
                    nodes: register,
                })),
            },
            &mut fx,
        );
        assert!(res.error_code.is_empty(), "{res:?}");
        l.observe(&[7]);
        let t = l.transitions(&s, 11, 100);
        assert!(
            t.iter().all(|t| t.node != 7),
            "node 7 is attached and must not go down: {t:?}"
        );
        // Its gateway dies and it never comes back: now it goes down.
        l.close("gw-a:1", 1, 12);
        let t = l.transitions(&s, 40, 100);
        assert!(
            t.iter()
                .any(|t| t.node == 7 && t.state == pb::NodeState::Down as i32),
            "{t:?}"
        );
    }

    #[test]
    fn a_new_leader_marks_down_only_nodes_no_gateway_claimed_in_its_grace() {
        let mut s = registered(&[1, 2]);
        let mut l = Liveness::new(100, 10, 20);
        l.open("gw:1", 7).unwrap();
        let mut r = report("gw:1", 1);
        r.attached = vec![1];
        r.resync = true;
        l.report(&s, 7, &r).unwrap();
        let t = l.transitions(&s, 110, 100);
        let down: Vec<u64> = t
            .iter()
            .filter(|t| t.state == pb::NodeState::Down as i32)
            .map(|t| t.node)
            .collect();
        assert_eq!(down, vec![2]);
        apply(&mut s, 2, t);
        // Later ticks find nothing to do: no sweep, no work per node.
        assert!(l.transitions(&s, 111, 100).is_empty());
        assert!(l.transitions(&s, 500, 100).is_empty());
    }

    #[test]
    fn stream_down_draining_and_stale_sessions() {
        let mut s = registered(&[1, 2]);
        let mut l = Liveness::new(0, 0, 20);
        l.open("gw:1", 1).unwrap();
        let mut r = report("gw:1", 1);
        r.attached = vec![1, 2];
        r.resync = true;
        l.report(&s, 1, &r).unwrap();
        let t = l.transitions(&s, 1, 100);
        apply(&mut s, 2, t);
        let mut r = report("gw:1", 2);
        r.down = vec![1];
        r.draining = vec![2];
        l.report(&s, 1, &r).unwrap();
        let t = l.transitions(&s, 2, 100);
        apply(&mut s, 3, t);
        assert_eq!(state_of(&s, 1).0, NodeState::Down);
        assert_eq!(state_of(&s, 2).0, NodeState::Draining);
        // The drained worker restarts and registers again: ready.
        let mut r = report("gw:1", 3);
        r.joined = vec![crate::fuzzing::node(2)];
        let register = l.report(&s, 1, &r).unwrap();
        assert!(register.is_empty(), "known as it is: nothing to commit");
        let t = l.transitions(&s, 3, 100);
        apply(&mut s, 4, t);
        assert_eq!(state_of(&s, 2).0, NodeState::Ready);
        // A new node, or one with another key, is registered (committed) first.
        let mut r = report("gw:1", 4);
        let mut other = crate::fuzzing::node(9);
        other.public_key = vec![7; 32];
        r.joined = vec![other];
        let register = l.report(&s, 1, &r).unwrap();
        assert_eq!(register.len(), 1);
        assert_eq!(register[0].gateway, "gw:1");
        // A newer session of the same gateway supersedes the old one's reports.
        l.open("gw:1", 2).unwrap();
        assert!(matches!(
            l.report(&s, 1, &report("gw:1", 5)),
            Err(ReportError::Superseded(_))
        ));
        l.close("gw:1", 1, 10);
        assert!(
            l.transitions(&s, 100, 100).is_empty(),
            "old session's end ignored"
        );
    }
}
