//! The leader's job round (soft state, rebuilt by each new leader from the committed jobs):
//! every few ticks it looks at the running jobs' current stages and proposes what changed:
//! attempts lost with their node or past their deadline, waves of pending tasks placed
//! together (Sparrow batch sampling through the same placer as functions, all-or-nothing
//! per wave, scored by bandwidth as well as fit and reputation), and backup copies of
//! stragglers once most of a stage is done (MapReduce's backup tasks, LATE's rule of
//! comparing with the stage's own finished tasks).
//!
//! ```text
//!  round(now) ─▶ per running job, current stage:
//!    running attempt on a down node / past deadline ─▶ TaskReports(lost)
//!    pending tasks ─▶ place_tasks (batch, ≤ MAX_WAVE) ─▶ StartAttempts (one wave)
//!    ≥ 75% done, attempt slower than the stage's median by far ─▶ StartAttempts(backup)
//!  applied or refused ─▶ wave_done / lost_done (forget in flight; refused: give back)
//! ```

use std::collections::HashSet;

use stellar_placement::{NodeState, Resources};
use stellar_proto::job_spec;
use stellar_proto::v1 as pb;

use crate::state::{AttemptKey, StateMachine, task_key};

/// Most tasks placed in one wave (one command).
pub const MAX_WAVE: u32 = 256;
/// Share of a stage's tasks done before stragglers get a backup copy.
pub const BACKUP_AFTER_DONE: f64 = 0.75;
/// A running attempt is a straggler past this many times the stage's median task time...
pub const STRAGGLER_FACTOR: f64 = 1.5;
/// ...and at least this much longer than the median, ms (short tasks vary by noise).
pub const STRAGGLER_MIN_EXTRA_MS: u64 = 2_000;
/// Time past an attempt's deadline before it counts as lost without a report, ms: its
/// worker kills it at the deadline and reports, unless it is gone.
pub const OVERRUN_GRACE_MS: u64 = 60_000;

/// The slowest input fetch the deadline allows for, bytes per ms (1 Mbit/s): a task is not
/// judged lost while its inputs could still be on their way over a slow home link.
pub const FETCH_FLOOR_BYTES_PER_MS: u64 = 125;

/// A task by (job, stage, task index).
pub type TaskId = (u64, u32, u32);

/// A wave to propose: the command and what it holds in the leader's table.
#[derive(Debug, Clone, PartialEq)]
pub struct Wave {
    /// The StartAttempts command.
    pub command: pb::StartAttemptsCmd,
    /// (node, reservation) per start, held in the placement table until applied.
    pub held: Vec<(u64, Resources)>,
    /// The tasks it starts.
    pub tasks: Vec<TaskId>,
}

/// What one round decided.
#[derive(Debug, Default)]
pub struct Round {
    /// Attempts judged lost (one TaskReports command), with their keys.
    pub lost: Vec<(pb::TaskReport, AttemptKey)>,
    /// Waves of starts.
    pub waves: Vec<Wave>,
}

/// Places tasks: the leader's placement table behind a trait so the round can be tested
/// without a whole leader.
pub trait TaskPlacer {
    /// Chooses up to `count` distinct nodes for tasks needing `ask` (all or nothing), not
    /// on `avoid`; fewer only when fewer are feasible, none with why.
    fn place_tasks(
        &mut self,
        need: &TaskNeed,
        count: u32,
        avoid: &[u64],
    ) -> Result<Vec<u64>, String>;
}

/// What each task of a stage needs from a node.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskNeed {
    /// CPU, memory and disk held while it runs.
    pub ask: Resources,
    /// The node arch its image runs on.
    pub arch: String,
    /// Keep to this region (empty: anywhere).
    pub region: String,
    /// Bytes it downloads (its inputs) and, as an estimate, uploads.
    pub bytes_in: u64,
    /// Where its inputs come from (the job's `near`): nodes a short RTT away score higher.
    pub origin: Option<stellar_placement::Coordinate>,
}

/// Attempts and tasks with a command in flight (not proposed again until applied).
#[derive(Debug, Default)]
pub struct JobDriver {
    starting: HashSet<TaskId>,
    losing: HashSet<AttemptKey>,
    /// Why each job's pending tasks could not be placed, last time (logged on change).
    unplaced: std::collections::HashMap<u64, String>,
}

fn need_of(spec: &pb::JobSpec, stage: usize, t: &pb::TaskRecord) -> TaskNeed {
    let s = &spec.stages[stage];
    let l = s.limits.unwrap_or_default();
    let image = s.image.clone().unwrap_or_default();
    let bytes_in: u64 = t.inputs.iter().map(|b| b.size).sum();
    // Its layers, its inputs and about as much again for its outputs, and the scratch.
    let disk = u64::from(stellar_proto::limits::container_disk_mib(&image))
        + (2 * bytes_in).div_ceil(1 << 20);
    TaskNeed {
        ask: Resources::new(
            l.cpu_millis,
            l.memory_mib,
            disk.min(u64::from(u32::MAX)) as u32,
        ),
        arch: image.arch,
        region: spec.region.clone(),
        bytes_in,
        origin: spec.near.as_ref().and_then(crate::replica::coordinate_of),
    }
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2])
}

impl JobDriver {
    /// One round at `now_ms` (see the module docs).
    pub fn round(
        &mut self,
        state: &StateMachine,
        placer: &mut dyn TaskPlacer,
        now_ms: u64,
    ) -> Round {
        let mut round = Round::default();
        self.unplaced.retain(|j, _| {
            state
                .jobs()
                .get(j)
                .is_some_and(|j| j.state == pb::JobState::Running as i32)
        });
        for (&jid, j) in state.jobs() {
            if j.state != pb::JobState::Running as i32 {
                continue;
            }
            let Some(spec) = j.spec.as_ref() else {
                continue;
            };
            let si = j.stages.len() - 1;
            let stage = &j.stages[si];
            let max = job_spec::max_attempts(spec);
            let limits = spec.stages[si].limits.unwrap_or_default();
            let deadline_ms = u64::from(if limits.timeout_ms == 0 {
                job_spec::DEFAULT_TASK_TIMEOUT_MS
            } else {
                limits.timeout_ms
            }) + OVERRUN_GRACE_MS;
            // The worker's clock starts once inputs are in; ours when the attempt starts.
            let fetch_ms = |t: &pb::TaskRecord| {
                t.inputs.iter().map(|b| b.size).sum::<u64>() / FETCH_FLOOR_BYTES_PER_MS
            };
            let mut pending: Vec<&pb::TaskRecord> = Vec::new();
            for t in &stage.tasks {
                for a in t
                    .attempts
                    .iter()
                    .filter(|a| a.state == pb::AttemptState::Running as i32)
                {
                    let key = (jid, si as u32, t.index, a.number);
                    let node_gone = state.nodes().get(&a.node).is_none_or(|n| {
                        matches!(n.state, NodeState::Down | NodeState::Quarantined)
                    });
                    let overran = now_ms.saturating_sub(a.started_ms) > deadline_ms + fetch_ms(t);
                    if (node_gone || overran) && self.losing.insert(key) {
                        let why = if node_gone {
                            format!("node {:016x} went down", a.node)
                        } else {
                            format!("no report {} s past its deadline", OVERRUN_GRACE_MS / 1000)
                        };
                        round.lost.push((
                            pb::TaskReport {
                                result: Some(pb::TaskResult {
                                    key: Some(task_key(key)),
                                    error_code: "LOST".into(),
                                    error_message: why,
                                    node_fault: true,
                                    ..Default::default()
                                }),
                                node: a.node,
                                lost: true,
                            },
                            key,
                        ));
                    }
                }
                if t.state == pb::TaskState::Pending as i32
                    && !self.starting.contains(&(jid, si as u32, t.index))
                    && (t.attempts.len() as u32) < max
                {
                    pending.push(t);
                }
            }
            // Tasks that ran before go elsewhere when they can: their nodes failed them.
            let (fresh, again): (Vec<&pb::TaskRecord>, Vec<&pb::TaskRecord>) =
                pending.into_iter().partition(|t| t.attempts.is_empty());
            if !fresh.is_empty() {
                // One ask for the wave: the largest task's (the placer reserves it per node).
                let need = fresh
                    .iter()
                    .map(|t| need_of(spec, si, t))
                    .max_by_key(|n| n.bytes_in)
                    .expect("not empty");
                let count = (fresh.len() as u32).min(MAX_WAVE);
                let nodes = self.placed(
                    jid,
                    &spec.name,
                    fresh.len(),
                    placer.place_tasks(&need, count, &[]),
                );
                if !nodes.is_empty() {
                    let tasks: Vec<&pb::TaskRecord> =
                        fresh.iter().take(nodes.len()).copied().collect();
                    round
                        .waves
                        .push(self.wave(jid, si, &tasks, &nodes, need.ask, false, now_ms));
                }
            }
            for t in again {
                let need = need_of(spec, si, t);
                let tried: Vec<u64> = t.attempts.iter().map(|a| a.node).collect();
                let nodes = match placer.place_tasks(&need, 1, &tried) {
                    Ok(n) => Ok(n),
                    // Every node that could take it failed it once: try them again.
                    Err(_) => placer.place_tasks(&need, 1, &[]),
                };
                let nodes = self.placed(jid, &spec.name, 1, nodes);
                if !nodes.is_empty() {
                    round
                        .waves
                        .push(self.wave(jid, si, &[t], &nodes, need.ask, false, now_ms));
                }
            }
            if !spec.no_backup_tasks {
                self.backups(jid, si, j, spec, placer, now_ms, &mut round);
            }
        }
        round
    }

    /// A placement's nodes; why not, logged once per reason and job.
    fn placed(
        &mut self,
        jid: u64,
        name: &str,
        pending: usize,
        r: Result<Vec<u64>, String>,
    ) -> Vec<u64> {
        match r {
            Ok(n) => {
                self.unplaced.remove(&jid);
                n
            }
            Err(why) => {
                if self.unplaced.get(&jid) != Some(&why) {
                    tracing::info!(job = %name, pending, reason = %why, "job tasks wait for a node");
                    self.unplaced.insert(jid, why);
                }
                Vec::new()
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backups(
        &mut self,
        jid: u64,
        si: usize,
        j: &pb::JobRecord,
        spec: &pb::JobSpec,
        placer: &mut dyn TaskPlacer,
        now_ms: u64,
        round: &mut Round,
    ) {
        let stage = &j.stages[si];
        let done: Vec<u64> = stage
            .tasks
            .iter()
            .filter(|t| t.state == pb::TaskState::Succeeded as i32)
            .filter_map(|t| {
                t.attempts
                    .iter()
                    .find(|a| a.state == pb::AttemptState::Succeeded as i32)
                    .map(|a| a.finished_ms.saturating_sub(a.started_ms))
            })
            .collect();
        let n = stage.tasks.len();
        if done.is_empty() || (done.len() as f64) < BACKUP_AFTER_DONE * n as f64 {
            return;
        }
        let Some(med) = median(done) else { return };
        let threshold = ((med as f64 * STRAGGLER_FACTOR) as u64).max(med + STRAGGLER_MIN_EXTRA_MS);
        let max = job_spec::max_attempts(spec);
        for t in &stage.tasks {
            if t.state != pb::TaskState::Running as i32
                || self.starting.contains(&(jid, si as u32, t.index))
                || t.attempts.len() as u32 >= max
            {
                continue;
            }
            let live: Vec<&pb::TaskAttempt> = t
                .attempts
                .iter()
                .filter(|a| a.state == pb::AttemptState::Running as i32)
                .collect();
            let [a] = live.as_slice() else { continue };
            if a.backup || now_ms.saturating_sub(a.started_ms) <= threshold {
                continue;
            }
            let need = need_of(spec, si, t);
            let nodes = placer.place_tasks(&need, 1, &[a.node]).unwrap_or_default();
            if !nodes.is_empty() {
                tracing::info!(
                    job = %spec.name,
                    stage = si + 1,
                    task = t.index,
                    elapsed_ms = now_ms.saturating_sub(a.started_ms),
                    median_ms = med,
                    "straggler: starting a backup copy"
                );
                round
                    .waves
                    .push(self.wave(jid, si, &[t], &nodes, need.ask, true, now_ms));
            }
        }
    }

    /// A wave of `tasks` on `nodes`, each holding `ask`: the very amount the placer
    /// reserved on each node (so the leader's table gets back what it gave).
    #[allow(clippy::too_many_arguments)]
    fn wave(
        &mut self,
        jid: u64,
        si: usize,
        tasks: &[&pb::TaskRecord],
        nodes: &[u64],
        ask: Resources,
        backup: bool,
        now_ms: u64,
    ) -> Wave {
        let mut w = Wave {
            command: pb::StartAttemptsCmd {
                starts: Vec::new(),
                unix_ms: now_ms,
            },
            held: Vec::new(),
            tasks: Vec::new(),
        };
        for (t, &node) in tasks.iter().zip(nodes) {
            let id = (jid, si as u32, t.index);
            self.starting.insert(id);
            w.command.starts.push(pb::AttemptStart {
                key: Some(pb::TaskKey {
                    job: jid,
                    stage: si as u32,
                    task: t.index,
                    attempt: t.attempts.len() as u32 + 1,
                }),
                node,
                backup,
                reserve: Some(pb::Resources {
                    cpu_millis: ask.cpu_millis,
                    memory_mib: ask.memory_mib,
                    disk_mib: ask.disk_mib,
                }),
            });
            w.held.push((node, ask));
            w.tasks.push(id);
        }
        w
    }

    /// A wave was applied or refused: its tasks may be looked at again.
    pub fn wave_done(&mut self, tasks: &[TaskId]) {
        for t in tasks {
            self.starting.remove(t);
        }
    }

    /// A lost-attempts report was applied or refused.
    pub fn lost_done(&mut self, keys: &[AttemptKey]) {
        for k in keys {
            self.losing.remove(k);
        }
    }
}
