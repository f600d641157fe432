//! What changed at which applied index, for `Edge.Watch`: every replica keeps the keys its
//! applies touched (functions, allocations, nodes, tokens, task attempts) in a bounded ring, and answers a
//! watcher with the current value of each key changed since the index it names. Soft state:
//! a restarted replica, an installed snapshot or an overflowing ring make watchers from
//! before start over with a reset (the state in pages), never miss a change.
//!
//! ```text
//!  apply(index, command) ─▶ keys of the command + its effects ─▶ ring [(index, key)]
//!  Watch(from) ─▶ from ≥ oldest? ─yes─▶ current values of keys with index > from
//!                               └─no──▶ reset: tokens, functions, allocations, nodes pages
//! ```

use std::collections::{BTreeSet, VecDeque};

use stellar_proto::v1 as pb;

use crate::state::{Effects, StateMachine, node_state_to_pb};

/// Keys kept; past it the oldest go and watchers that far behind get a reset.
pub const RING_CAPACITY: usize = 500_000;
/// Objects per reset page.
pub const PAGE: usize = 10_000;
/// Encoded bytes past which a page ends, and past which a watcher's delta is sent as a
/// (paged) reset instead: well under the 16 MiB a gateway takes in one message.
pub const PAGE_BYTES: usize = 4 << 20;

/// One changed object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// A token, by its sha256.
    Token(Vec<u8>),
    /// A function, by (tenant, name).
    Function(String, String),
    /// An allocation, by id.
    Allocation(u64),
    /// A node, by id.
    Node(u64),
    /// A task attempt, by (job, stage, task, attempt).
    Attempt(crate::state::AttemptKey),
}

/// Where a reset continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// Tokens and functions (small), then running task attempts.
    Start,
    /// Running task attempts after this one (None: from the first).
    Tasks(Option<crate::state::AttemptKey>),
    /// Allocations after this id.
    Allocations(u64),
    /// Nodes after this id.
    Nodes(u64),
}

/// The answer to a watcher.
#[derive(Debug, Clone)]
pub enum Changes {
    /// Everything changed since the index asked for, as of `event.applied_index`.
    Since(pb::WatchEvent),
    /// This replica no longer knows every change since then: start over with a reset.
    TooOld,
}

/// The ring of changed keys (see the module docs).
#[derive(Debug)]
pub struct ChangeLog {
    ring: VecDeque<(u64, Key)>,
    /// Every change after this index is in the ring.
    complete_after: u64,
    capacity: usize,
}

/// The keys a command touches, read before it is applied (its own names), completed after
/// with its effects (allocations placed and removed, nodes changed).
pub fn keys_of(cmd: &pb::Command) -> Vec<Key> {
    use pb::command::Kind;
    let mut keys = Vec::new();
    match &cmd.kind {
        Some(Kind::CreateTenant(c)) if !c.token_sha256.is_empty() => {
            keys.push(Key::Token(c.token_sha256.clone()));
        }
        Some(Kind::PutToken(c)) => keys.push(Key::Token(c.token_sha256.clone())),
        Some(Kind::RevokeToken(c)) => keys.push(Key::Token(c.token_sha256.clone())),
        Some(Kind::Deploy(c)) => keys.push(Key::Function(c.tenant.clone(), c.name.clone())),
        Some(Kind::DeleteFunction(c)) => keys.push(Key::Function(c.tenant.clone(), c.name.clone())),
        Some(Kind::Plan(c)) => keys.push(Key::Function(c.tenant.clone(), c.function.clone())),
        Some(Kind::AllocationStates(c)) => {
            keys.extend(c.updates.iter().map(|u| Key::Allocation(u.allocation)));
        }
        _ => {}
    }
    keys
}

impl ChangeLog {
    /// A log that knows every change after `applied` (the state it starts from).
    pub fn new(applied: u64) -> ChangeLog {
        ChangeLog::with_capacity(applied, RING_CAPACITY)
    }

    /// [`ChangeLog::new`] keeping at most `capacity` keys.
    pub fn with_capacity(applied: u64, capacity: usize) -> ChangeLog {
        ChangeLog {
            ring: VecDeque::new(),
            complete_after: applied,
            capacity: capacity.max(1),
        }
    }

    /// The state was replaced wholesale (a snapshot installed at `index`): watchers from
    /// before it start over.
    pub fn restart(&mut self, index: u64) {
        self.ring.clear();
        self.complete_after = index;
    }

    /// Records what one applied command at `index` touched: `before` (its keys) plus its
    /// effects, and the functions of allocation-state reports (their load failures).
    pub fn record(&mut self, index: u64, before: Vec<Key>, fx: &Effects, state: &StateMachine) {
        let mut keys = before;
        for a in fx.placed.iter().chain(&fx.removed) {
            keys.push(Key::Allocation(a.id));
            if let Some(f) = state.function_by_id(a.function) {
                keys.push(Key::Function(f.tenant.clone(), f.name.clone()));
            }
        }
        for &fid in &fx.load_failed {
            if let Some(f) = state.function_by_id(fid) {
                keys.push(Key::Function(f.tenant.clone(), f.name.clone()));
            }
        }
        keys.extend(fx.attempts.iter().map(|&k| Key::Attempt(k)));
        keys.extend(
            fx.nodes_joined
                .iter()
                .chain(&fx.nodes_changed)
                .map(|&n| Key::Node(n)),
        );
        keys.sort_unstable();
        keys.dedup();
        for k in keys {
            if self.ring.len() >= self.capacity
                && let Some((i, _)) = self.ring.pop_front()
            {
                self.complete_after = self.complete_after.max(i);
            }
            self.ring.push_back((index, k));
        }
    }

    /// The current value of everything changed after `from` (see [`Changes`]).
    pub fn since(&self, from: u64, state: &StateMachine) -> Changes {
        if from < self.complete_after || from == 0 {
            return Changes::TooOld;
        }
        let start = self.ring.partition_point(|(i, _)| *i <= from);
        let keys: BTreeSet<&Key> = self.ring.range(start..).map(|(_, k)| k).collect();
        let mut ev = pb::WatchEvent {
            applied_index: state.applied_index().max(from),
            ..Default::default()
        };
        for k in keys {
            add(&mut ev, k, state);
        }
        // Too much changed for one message (a wave of thousands of tasks, say): the watcher
        // gets the state again in pages.
        if prost::Message::encoded_len(&ev) > PAGE_BYTES {
            return Changes::TooOld;
        }
        Changes::Since(ev)
    }
}

/// The watched form of a function (its current version).
fn function_pb(state: &StateMachine, tenant: &str, name: &str) -> pb::WatchedFunction {
    let gone = pb::WatchedFunction {
        tenant: tenant.to_string(),
        name: name.to_string(),
        deleted: true,
        ..Default::default()
    };
    let Some((_, f)) = state.function(tenant, name) else {
        return gone;
    };
    let Some(v) = f.current().filter(|_| !f.deleted) else {
        return gone;
    };
    pb::WatchedFunction {
        tenant: f.tenant.clone(),
        name: f.name.clone(),
        version: v.version,
        module_sha256: v.module().map(hex::encode).unwrap_or_default(),
        limits: Some(v.limits),
        idempotent: v.idempotent,
        load_failures: v.load_failures,
        load_error: v.load_error.clone(),
        deleted: false,
        image: v.image.clone(),
    }
}

fn node_pb(state: &StateMachine, id: u64) -> Option<pb::WatchedNode> {
    let n = state.nodes().get(&id)?;
    let (region, zone) = state.node_location(n);
    Some(pb::WatchedNode {
        id,
        state: node_state_to_pb(n.state) as i32,
        region: region.to_string(),
        zone: zone.to_string(),
        gateway: state.node_gateway(n).to_string(),
        reputation: n.reputation,
    })
}

fn add(ev: &mut pb::WatchEvent, k: &Key, state: &StateMachine) {
    match k {
        Key::Token(h) => {
            let t = state.token(h);
            ev.tokens.push(pb::WatchedToken {
                token_sha256: h.clone(),
                tenant: t.map(|t| t.0.to_string()).unwrap_or_default(),
                admin: t.is_some_and(|t| t.1),
                revoked: t.is_none(),
            });
        }
        Key::Function(t, n) => ev.functions.push(function_pb(state, t, n)),
        Key::Allocation(id) => match state.allocations().get(id) {
            Some(a) => ev.allocations.push(state.allocation_pb(a)),
            None => ev.removed_allocations.push(*id),
        },
        Key::Node(id) => ev.nodes.extend(node_pb(state, *id)),
        Key::Attempt(k) => ev.tasks.push(state.watched_task(*k).unwrap_or_else(|| {
            // A forgotten job: whoever still runs the attempt stops it.
            pb::WatchedTask {
                task: Some(pb::Task {
                    key: Some(crate::state::task_key(*k)),
                    ..Default::default()
                }),
                node: 0,
                running: false,
            }
        })),
    }
}

/// One page of a reset from `page` on, and where the next one starts (None: it was the
/// last). The first page has `reset` set.
pub fn reset_page(state: &StateMachine, page: Page) -> (pb::WatchEvent, Option<Page>) {
    let mut ev = pb::WatchEvent {
        applied_index: state.applied_index(),
        reset: page == Page::Start,
        ..Default::default()
    };
    let next = match page {
        Page::Start => {
            for (h, tenant, admin) in state.tokens() {
                ev.tokens.push(pb::WatchedToken {
                    token_sha256: h.to_vec(),
                    tenant: tenant.to_string(),
                    admin,
                    revoked: false,
                });
            }
            for (_, f) in state.functions(None) {
                let w = function_pb(state, &f.tenant, &f.name);
                if !w.deleted {
                    ev.functions.push(w);
                }
            }
            Some(Page::Tasks(None))
        }
        Page::Tasks(after) => {
            // Running attempts, in key order, until the page is full by count or bytes (a
            // task names its inputs: an all-inputs task of a large job is large).
            let mut keys = state.running_attempts();
            keys.sort_unstable();
            let mut bytes = 0;
            let mut last = None;
            for k in keys.into_iter().filter(|k| after.is_none_or(|a| *k > a)) {
                if ev.tasks.len() == PAGE || bytes > PAGE_BYTES {
                    break;
                }
                if let Some(w) = state.watched_task(k) {
                    bytes += prost::Message::encoded_len(&w);
                    ev.tasks.push(w);
                }
                last = Some(k);
            }
            Some(match last {
                Some(k) if ev.tasks.len() == PAGE || bytes > PAGE_BYTES => Page::Tasks(Some(k)),
                _ => Page::Allocations(0),
            })
        }
        Page::Allocations(after) => {
            let mut last = None;
            for (&id, a) in state
                .allocations()
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .take(PAGE)
            {
                ev.allocations.push(state.allocation_pb(a));
                last = Some(id);
            }
            Some(match last {
                Some(id) if ev.allocations.len() == PAGE => Page::Allocations(id),
                _ => Page::Nodes(0),
            })
        }
        Page::Nodes(after) => {
            let mut last = None;
            for (&id, _) in state
                .nodes()
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .take(PAGE)
            {
                ev.nodes.extend(node_pb(state, id));
                last = Some(id);
            }
            match last {
                Some(id) if ev.nodes.len() == PAGE => Some(Page::Nodes(id)),
                _ => None,
            }
        }
    };
    ev.more = next.is_some();
    (ev, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(kind: pb::command::Kind) -> pb::Command {
        pb::Command {
            request_id: vec![],
            kind: Some(kind),
        }
    }

    fn apply(s: &mut StateMachine, log: &mut ChangeLog, index: u64, c: pb::Command) {
        let keys = keys_of(&c);
        let mut fx = Effects::default();
        let r = s.apply(index, c, &mut fx);
        assert!(r.error_code.is_empty(), "{r:?}");
        s.set_applied_index(index);
        log.record(index, keys, &fx, s);
    }

    fn token(h: u8) -> pb::Command {
        cmd(pb::command::Kind::PutToken(pb::PutTokenCmd {
            tenant: String::new(),
            token_sha256: vec![h; 32],
            admin: true,
        }))
    }

    #[test]
    fn a_watcher_gets_the_current_value_of_each_change_or_a_reset() {
        let mut s = StateMachine::new();
        let mut log = ChangeLog::with_capacity(0, 4);
        apply(&mut s, &mut log, 1, token(1));
        apply(
            &mut s,
            &mut log,
            2,
            cmd(pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
                nodes: vec![crate::fuzzing::node(5)],
            })),
        );
        apply(
            &mut s,
            &mut log,
            3,
            cmd(pb::command::Kind::RevokeToken(pb::RevokeTokenCmd {
                token_sha256: vec![1; 32],
            })),
        );
        // From index 1: the node joined and the token (now revoked), once each.
        let Changes::Since(ev) = log.since(1, &s) else {
            panic!("expected changes")
        };
        assert_eq!(ev.applied_index, 3);
        assert_eq!(ev.nodes.len(), 1);
        assert_eq!(ev.tokens.len(), 1);
        assert!(ev.tokens[0].revoked);
        // Nothing since the last index: an empty event at that index.
        let Changes::Since(ev) = log.since(3, &s) else {
            panic!("expected changes")
        };
        assert!(ev.nodes.is_empty() && ev.tokens.is_empty());
        // Past the ring's capacity the oldest changes go: a watcher from before needs a reset.
        for i in 4..10 {
            apply(&mut s, &mut log, i, token(i as u8));
        }
        assert!(matches!(log.since(1, &s), Changes::TooOld));
        assert!(matches!(log.since(8, &s), Changes::Since(_)));
        assert!(matches!(log.since(0, &s), Changes::TooOld));
        log.restart(9);
        assert!(matches!(log.since(8, &s), Changes::TooOld));
    }

    #[test]
    fn large_task_sets_are_paged_by_bytes_and_a_large_delta_becomes_a_reset() {
        let mut s = StateMachine::new();
        let mut log = ChangeLog::new(0);
        let mut index = 0;
        let mut run = |s: &mut StateMachine, log: &mut ChangeLog, kind| {
            index += 1;
            apply(s, log, index, cmd(kind));
            index
        };
        run(
            &mut s,
            &mut log,
            pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
                name: "acme".into(),
                token_sha256: vec![],
            }),
        );
        const JOBS: u64 = 60;
        let nodes = (1..=JOBS)
            .map(|id| {
                let mut n = crate::fuzzing::node(id);
                let a = n.attributes.as_mut().expect("attrs");
                a.runtimes = vec!["container".into()];
                a.capacity.as_mut().expect("capacity").disk_mib = 100_000;
                n
            })
            .collect();
        run(
            &mut s,
            &mut log,
            pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd { nodes }),
        );
        // Jobs of one task that takes 1,000 inputs with long names: ~0.3 MB each watched.
        let mut stage = crate::fuzzing::job_stage(pb::Fanout::All);
        stage.command = vec!["join".into()];
        let mut before = 0;
        for j in 0..JOBS {
            let inputs = (0..1000u32)
                .map(|i| pb::BlobRef {
                    name: format!("{i:04}-{}", "x".repeat(200)),
                    sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(format!("{j}/{i}"))),
                    size: 1,
                })
                .collect();
            before = run(
                &mut s,
                &mut log,
                pb::command::Kind::SubmitJob(pb::SubmitJobCmd {
                    tenant: "acme".into(),
                    spec: Some(pb::JobSpec {
                        name: format!("job{j}"),
                        inputs,
                        stages: vec![stage.clone()],
                        ..Default::default()
                    }),
                    unix_ms: 1,
                }),
            );
        }
        let jobs: Vec<u64> = s.jobs().keys().copied().collect();
        let starts = jobs
            .iter()
            .zip(1..=JOBS)
            .map(|(&job, node)| pb::AttemptStart {
                key: Some(pb::TaskKey {
                    job,
                    stage: 0,
                    task: 0,
                    attempt: 1,
                }),
                node,
                backup: false,
                reserve: Some(pb::Resources {
                    cpu_millis: 1000,
                    memory_mib: 256,
                    disk_mib: 100,
                }),
            })
            .collect();
        run(
            &mut s,
            &mut log,
            pb::command::Kind::StartAttempts(pb::StartAttemptsCmd { starts, unix_ms: 2 }),
        );
        assert_eq!(s.running_attempts().len(), JOBS as usize);
        // Sixty such tasks do not fit one message: the watcher is told to reset.
        assert!(matches!(log.since(before, &s), Changes::TooOld));
        // The reset carries every running attempt once, over several pages of bounded size.
        let mut page = Some(Page::Start);
        let (mut tasks, mut task_pages) = (Vec::new(), 0);
        while let Some(p) = page {
            let (ev, next) = reset_page(&s, p);
            assert!(
                prost::Message::encoded_len(&ev) < 2 * PAGE_BYTES,
                "a page of {} bytes",
                prost::Message::encoded_len(&ev)
            );
            if !ev.tasks.is_empty() {
                task_pages += 1;
            }
            tasks.extend(ev.tasks.into_iter().filter_map(|t| t.task?.key));
            page = next;
        }
        assert_eq!(tasks.len(), JOBS as usize);
        let unique: std::collections::HashSet<u64> = tasks.iter().map(|k| k.job).collect();
        assert_eq!(unique.len(), JOBS as usize);
        assert!(task_pages >= 4, "{task_pages} pages of tasks");
        // A small change after that is sent as it is.
        let after = run(&mut s, &mut log, token(7).kind.expect("kind"));
        assert!(matches!(log.since(after - 1, &s), Changes::Since(_)));
    }

    #[test]
    fn a_reset_pages_through_the_whole_state() {
        let mut s = StateMachine::new();
        let mut log = ChangeLog::new(0);
        let nodes: Vec<pb::NodeRecord> =
            (1..=(PAGE as u64 + 5)).map(crate::fuzzing::node).collect();
        for (i, chunk) in nodes.chunks(1000).enumerate() {
            apply(
                &mut s,
                &mut log,
                1 + i as u64,
                cmd(pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
                    nodes: chunk.to_vec(),
                })),
            );
        }
        let mut page = Some(Page::Start);
        let mut seen = 0;
        let mut events = 0;
        while let Some(p) = page {
            let (ev, next) = reset_page(&s, p);
            assert_eq!(ev.reset, events == 0);
            assert_eq!(ev.more, next.is_some());
            seen += ev.nodes.len();
            events += 1;
            page = next;
        }
        assert_eq!(seen, PAGE + 5);
        assert!(events >= 3, "tokens+functions, allocations, two node pages");
    }
}
