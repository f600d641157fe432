//! Batch jobs in the replicated state: a job's stages, tasks and attempts, applied as
//! deterministically as the rest (times come in the commands). The leader decides where
//! attempts run (`job_driver.rs`); apply checks each wave against the state and takes all of
//! it or none, records how attempts end, bills only the attempt that won, and cuts the next
//! stage's tasks from the last one's outputs.
//!
//! ```text
//!  SubmitJob ─▶ stage 1 tasks (PENDING) from the job's inputs
//!  StartAttempts (a wave) ─▶ attempt RUNNING on its node, capacity held
//!  TaskReports ─▶ SUCCEEDED: outputs kept, billed, other attempts CANCELLED
//!              ├▶ node fault / LOST: PENDING again (until max attempts: job FAILED)
//!              └▶ program failed: task and job FAILED
//!  every task of the stage SUCCEEDED ─▶ next stage's tasks from its outputs, or job done
//! ```

use std::collections::BTreeSet;

use stellar_placement::{NodeState, Resources, Runtime};
use stellar_proto::job_spec::{self, MAX_OUTPUTS_PER_TASK, MAX_TASKS_PER_STAGE};
use stellar_proto::v1 as pb;

use super::{Effects, Result, StateMachine, UsageTotals, add, invalid, not_found, ok_result, sub};
use crate::error::ApplyError;

/// Finished jobs kept (with their outputs' addresses); past it the oldest is forgotten.
pub const MAX_FINISHED_JOBS: usize = 1_000;
/// Jobs running at once in the cluster.
pub const MAX_RUNNING_JOBS: usize = 1_000;
/// Bytes of an attempt's stderr kept in its record.
pub const STDERR_TAIL_BYTES: usize = 2_048;
/// Longest error message kept in a record.
const MAX_ERROR_BYTES: usize = 1_024;

/// Names one attempt: (job, stage index, task index, attempt number).
pub type AttemptKey = (u64, u32, u32, u32);

/// The key of a wire `TaskKey`.
pub fn attempt_key(k: &pb::TaskKey) -> AttemptKey {
    (k.job, k.stage, k.task, k.attempt)
}

/// The wire form of an attempt key.
pub fn task_key((job, stage, task, attempt): AttemptKey) -> pb::TaskKey {
    pb::TaskKey {
        job,
        stage,
        task,
        attempt,
    }
}

fn clip(s: &str) -> String {
    let mut end = s.len().min(MAX_ERROR_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn tail(b: &[u8]) -> Vec<u8> {
    b[b.len().saturating_sub(STDERR_TAIL_BYTES)..].to_vec()
}

fn running(a: &pb::TaskAttempt) -> bool {
    a.state == pb::AttemptState::Running as i32
}

/// The tasks of a stage cut from its inputs.
fn cut_tasks(stage: &pb::JobStage, inputs: Vec<pb::BlobRef>) -> Vec<pb::TaskRecord> {
    let task = |index: u32, inputs: Vec<pb::BlobRef>| pb::TaskRecord {
        index,
        inputs,
        state: pb::TaskState::Pending as i32,
        ..Default::default()
    };
    if stage.fanout == pb::Fanout::All as i32 {
        vec![task(0, inputs)]
    } else {
        inputs
            .into_iter()
            .enumerate()
            .map(|(i, b)| task(i as u32, vec![b]))
            .collect()
    }
}

impl StateMachine {
    /// Every job, by id.
    pub fn jobs(&self) -> &std::collections::BTreeMap<u64, pb::JobRecord> {
        &self.jobs
    }

    /// A tenant's job by name.
    pub fn job(&self, tenant: &str, name: &str) -> Option<&pb::JobRecord> {
        let id = self.job_ids.get(&(tenant.to_string(), name.to_string()))?;
        self.jobs.get(id)
    }

    /// Usage of tasks, per (tenant, job name, node, hour).
    pub fn job_usage(
        &self,
    ) -> &std::collections::BTreeMap<(String, String, u64, u64), UsageTotals> {
        &self.job_usage
    }

    /// Whether one of `tenant`'s jobs names blob `sha` (an input or an output): what a
    /// tenant may download.
    pub fn tenant_job_has_blob(&self, tenant: &str, sha: &str) -> bool {
        self.jobs
            .values()
            .filter(|j| j.tenant == tenant)
            .any(|j| job_blobs(j).any(|b| b.sha256 == sha))
    }

    /// Every blob a kept job names: the blob store keeps them.
    pub fn job_blob_shas(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for j in self.jobs.values() {
            out.extend(job_blobs(j).map(|b| b.sha256.clone()));
            for s in &j
                .spec
                .as_ref()
                .map(|s| s.stages.clone())
                .unwrap_or_default()
            {
                if let Some(i) = &s.image {
                    out.extend(i.layers.iter().map(|l| l.sha256.clone()));
                }
            }
        }
        out
    }

    /// The attempt `key` as its node's gateway needs it: what to run, where, and whether it
    /// still runs. None when the job is forgotten.
    pub fn watched_task(&self, key: AttemptKey) -> Option<pb::WatchedTask> {
        let (jid, si, ti, an) = key;
        let j = self.jobs.get(&jid)?;
        let spec = j.spec.as_ref()?;
        let stage = spec.stages.get(si as usize)?;
        let task = j.stages.get(si as usize)?.tasks.get(ti as usize)?;
        let a = task.attempts.get((an as usize).checked_sub(1)?)?;
        let mut limits = stage.limits.unwrap_or_default();
        if limits.timeout_ms == 0 {
            limits.timeout_ms = job_spec::DEFAULT_TASK_TIMEOUT_MS;
        }
        Some(pb::WatchedTask {
            task: Some(pb::Task {
                key: Some(task_key(key)),
                tenant: j.tenant.clone(),
                job: spec.name.clone(),
                image: stage.image.clone(),
                argv: job_spec::task_argv(stage, &task.inputs),
                env: stage.env.clone(),
                limits: Some(limits),
                inputs: task.inputs.clone(),
            }),
            node: a.node,
            running: running(a),
        })
    }

    /// Every running attempt's key (a watcher's reset).
    pub fn running_attempts(&self) -> Vec<AttemptKey> {
        let mut out = Vec::new();
        for (&jid, j) in &self.jobs {
            if j.state != pb::JobState::Running as i32 {
                continue;
            }
            for (si, s) in j.stages.iter().enumerate() {
                for t in &s.tasks {
                    for a in t.attempts.iter().filter(|a| running(a)) {
                        out.push((jid, si as u32, t.index, a.number));
                    }
                }
            }
        }
        out
    }

    pub(super) fn submit_job(
        &mut self,
        c: pb::SubmitJobCmd,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        let spec = c.spec.ok_or_else(|| invalid("a job needs a spec"))?;
        job_spec::check_job_spec(&spec).map_err(invalid)?;
        if !self.tenants.contains(&c.tenant) {
            return Err(not_found("tenant", &c.tenant));
        }
        let key = (c.tenant.clone(), spec.name.clone());
        if let Some(old) = self.job_ids.get(&key).and_then(|id| self.jobs.get(id)) {
            if old.state == pb::JobState::Running as i32 {
                return Err(ApplyError::AlreadyExists(format!(
                    "job `{}` is running; cancel it or choose another name",
                    spec.name
                )));
            }
            // A finished job's name is taken again: the old record goes.
            let id = old.id;
            self.forget_job(id);
        }
        let running = self
            .jobs
            .values()
            .filter(|j| j.state == pb::JobState::Running as i32)
            .count();
        if running >= MAX_RUNNING_JOBS {
            return Err(ApplyError::Limit(format!(
                "{running} jobs are running in the cluster; at most {MAX_RUNNING_JOBS}: wait for some to finish"
            )));
        }
        let id = self.next_job_id.max(1);
        self.next_job_id = id + 1;
        let tasks = cut_tasks(&spec.stages[0], spec.inputs.clone());
        let job = pb::JobRecord {
            id,
            tenant: c.tenant.clone(),
            state: pb::JobState::Running as i32,
            submitted_ms: c.unix_ms,
            stages: vec![pb::StageRecord {
                tasks,
                started_ms: c.unix_ms,
                finished_ms: 0,
            }],
            spec: Some(spec),
            ..Default::default()
        };
        self.jobs.insert(id, job);
        self.job_ids.insert(key, id);
        fx.jobs.push(id);
        let mut r = ok_result();
        r.job = id;
        Ok(r)
    }

    /// Verifies every start of a wave, then applies them all (or refuses the wave).
    pub(super) fn start_attempts(
        &mut self,
        c: pb::StartAttemptsCmd,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        let stale = |m: String| ApplyError::StalePlan(m);
        let mut seen_tasks = BTreeSet::new();
        let mut extra: std::collections::BTreeMap<u64, Resources> = Default::default();
        for s in &c.starts {
            let k = s.key.unwrap_or_default();
            if !seen_tasks.insert((k.job, k.stage, k.task)) {
                return Err(invalid(format!(
                    "task {}/{}/{} starts twice in one wave",
                    k.job, k.stage, k.task
                )));
            }
            let j = self
                .jobs
                .get(&k.job)
                .ok_or_else(|| stale(format!("job {} is gone", k.job)))?;
            if j.state != pb::JobState::Running as i32 {
                return Err(stale(format!("job {} has ended", k.job)));
            }
            if k.stage as usize + 1 != j.stages.len() {
                return Err(stale(format!(
                    "stage {} of job {} is not current",
                    k.stage, k.job
                )));
            }
            let spec = j.spec.as_ref().expect("a kept job has its spec");
            let t = j.stages[k.stage as usize]
                .tasks
                .get(k.task as usize)
                .ok_or_else(|| invalid(format!("job {} has no task {}", k.job, k.task)))?;
            let live: Vec<&pb::TaskAttempt> = t.attempts.iter().filter(|a| running(a)).collect();
            let ok = match s.backup {
                false => t.state == pb::TaskState::Pending as i32 && live.is_empty(),
                true => {
                    t.state == pb::TaskState::Running as i32
                        && live.len() == 1
                        && !live[0].backup
                        && live[0].node != s.node
                }
            };
            if !ok {
                return Err(stale(format!(
                    "task {}/{}/{} is no longer {}",
                    k.job,
                    k.stage,
                    k.task,
                    if s.backup { "a straggler" } else { "pending" }
                )));
            }
            if t.attempts.len() as u32 >= job_spec::max_attempts(spec) {
                return Err(stale(format!(
                    "task {}/{}/{} has used its {} attempts",
                    k.job,
                    k.stage,
                    k.task,
                    t.attempts.len()
                )));
            }
            let n = self
                .nodes
                .get(&s.node)
                .ok_or_else(|| stale(format!("node {:016x} is not registered", s.node)))?;
            if n.state != NodeState::Ready {
                return Err(stale(format!("node {:016x} is {}", s.node, n.state)));
            }
            let image = spec.stages[k.stage as usize]
                .image
                .clone()
                .unwrap_or_default();
            let arch_ok = image
                .arch
                .parse::<stellar_placement::Arch>()
                .is_ok_and(|a| a == n.arch);
            if !n.runtimes.contains(Runtime::Container) || !arch_ok {
                return Err(stale(format!(
                    "node {:016x} ({}) does not run {} containers",
                    s.node,
                    n.arch.as_str(),
                    image.arch
                )));
            }
            let r = s.reserve.unwrap_or_default();
            let r = Resources::new(r.cpu_millis, r.memory_mib, r.disk_mib);
            let e = extra.entry(s.node).or_default();
            *e = add(*e, r);
            let held = add(add(n.allocated, n.task_reserved), *e);
            if held.cpu_millis > n.capacity.cpu_millis || held.memory_mib > n.capacity.memory_mib {
                return Err(stale(format!(
                    "node {:016x} has no room for the task ({}m CPU / {} MiB held of {}m / {} MiB)",
                    s.node,
                    held.cpu_millis,
                    held.memory_mib,
                    n.capacity.cpu_millis,
                    n.capacity.memory_mib
                )));
            }
        }
        for s in c.starts {
            let k = s.key.unwrap_or_default();
            let r = s.reserve.unwrap_or_default();
            let reserve = Resources::new(r.cpu_millis, r.memory_mib, r.disk_mib);
            let j = self.jobs.get_mut(&k.job).expect("checked");
            let t = &mut j.stages[k.stage as usize].tasks[k.task as usize];
            let number = t.attempts.len() as u32 + 1;
            t.attempts.push(pb::TaskAttempt {
                number,
                node: s.node,
                state: pb::AttemptState::Running as i32,
                backup: s.backup,
                started_ms: c.unix_ms,
                reserved: Some(r),
                ..Default::default()
            });
            t.state = pb::TaskState::Running as i32;
            let n = self.nodes.get_mut(&s.node).expect("checked");
            n.task_reserved = add(n.task_reserved, reserve);
            n.task_attempts += 1;
            fx.attempts.push((k.job, k.stage, k.task, number));
            fx.tasks_started.push((s.node, reserve));
        }
        let mut r = ok_result();
        r.count = fx.attempts.len() as u32;
        Ok(r)
    }

    /// Ends attempt `a` of a task (found by the caller) in `state`, giving back what it held.
    fn end_attempt(
        nodes: &mut std::collections::BTreeMap<u64, super::Node>,
        a: &mut pb::TaskAttempt,
        state: pb::AttemptState,
        unix_ms: u64,
        fx: &mut Effects,
    ) {
        a.state = state as i32;
        a.finished_ms = unix_ms;
        let r = a.reserved.unwrap_or_default();
        let r = Resources::new(r.cpu_millis, r.memory_mib, r.disk_mib);
        if let Some(n) = nodes.get_mut(&a.node) {
            n.task_reserved = sub(n.task_reserved, r);
            n.task_attempts = n.task_attempts.saturating_sub(1);
        }
        fx.tasks_ended.push((a.node, r));
    }

    /// Records how attempts ended; reports about attempts already ended, or from another
    /// node than the attempt's, are skipped (counted out of `count`).
    pub(super) fn task_reports(
        &mut self,
        c: pb::TaskReportsCmd,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        for r in &c.reports {
            let res = r
                .result
                .as_ref()
                .ok_or_else(|| invalid("a task report needs a result"))?;
            res.key
                .as_ref()
                .ok_or_else(|| invalid("a task result needs its key"))?;
        }
        let mut taken = 0;
        for r in c.reports {
            if self.task_report(r, c.unix_ms, fx) {
                taken += 1;
            }
        }
        let mut result = ok_result();
        result.count = taken;
        Ok(result)
    }

    fn task_report(&mut self, r: pb::TaskReport, unix_ms: u64, fx: &mut Effects) -> bool {
        let res = r.result.unwrap_or_default();
        let key = attempt_key(&res.key.unwrap_or_default());
        let (jid, si, ti, an) = key;
        let Some(j) = self.jobs.get_mut(&jid) else {
            return false;
        };
        if j.state != pb::JobState::Running as i32 || si as usize + 1 != j.stages.len() {
            return false;
        }
        let spec = j.spec.clone().expect("a kept job has its spec");
        let Some(t) = j.stages[si as usize].tasks.get_mut(ti as usize) else {
            return false;
        };
        let Some(a) = t.attempts.get_mut((an as usize).wrapping_sub(1)) else {
            return false;
        };
        if !running(a) || a.node != r.node {
            return false;
        }
        a.exit_code = res.exit_code;
        a.stderr_tail = tail(&res.stderr_tail);
        let outputs_ok = res.outputs.len() <= MAX_OUTPUTS_PER_TASK
            && job_spec::check_blob_refs("output", &res.outputs).is_ok();
        let success = !r.lost && res.error_code.is_empty() && outputs_ok;
        fx.attempts.push(key);
        if success {
            Self::end_attempt(&mut self.nodes, a, pb::AttemptState::Succeeded, unix_ms, fx);
            a.usage = res.usage.clone();
            t.outputs = res.outputs;
            t.state = pb::TaskState::Succeeded as i32;
            // The first result wins; the other copy stops and is not billed.
            for other in t.attempts.iter_mut().filter(|o| running(o)) {
                other.error = "another attempt finished first".into();
                Self::end_attempt(
                    &mut self.nodes,
                    other,
                    pb::AttemptState::Cancelled,
                    unix_ms,
                    fx,
                );
                fx.attempts.push((jid, si, ti, other.number));
            }
            let tenant = j.tenant.clone();
            self.bill(&tenant, &spec.name, r.node, res.usage.as_ref(), unix_ms);
            self.advance(jid, unix_ms, fx);
            return true;
        }
        let retryable = r.lost || res.node_fault || !outputs_ok;
        a.error = clip(if r.lost {
            &res.error_message
        } else if !outputs_ok {
            "the outputs it named are invalid (names, count or addresses)"
        } else {
            &res.error_message
        });
        if !a.error.is_empty() && !res.error_code.is_empty() && !r.lost {
            a.error = clip(&format!("{}: {}", res.error_code, a.error));
        }
        let state = if r.lost {
            pb::AttemptState::Lost
        } else {
            pb::AttemptState::Failed
        };
        Self::end_attempt(&mut self.nodes, a, state, unix_ms, fx);
        let why = a.error.clone();
        if !retryable {
            // The program's own failure: it would fail again anywhere. Billed: it ran.
            let tenant = j.tenant.clone();
            a.usage = res.usage.clone();
            t.state = pb::TaskState::Failed as i32;
            self.bill(&tenant, &spec.name, r.node, res.usage.as_ref(), unix_ms);
            self.fail_job(
                jid,
                format!("task {} of stage {} failed: {why}", ti, si + 1),
                unix_ms,
                fx,
            );
            return true;
        }
        let others_run = t.attempts.iter().any(running);
        if !others_run {
            if t.attempts.len() as u32 >= job_spec::max_attempts(&spec) {
                t.state = pb::TaskState::Failed as i32;
                let n = t.attempts.len();
                self.fail_job(
                    jid,
                    format!(
                        "task {ti} of stage {} failed on {n} attempts; the last: {why}",
                        si + 1
                    ),
                    unix_ms,
                    fx,
                );
            } else {
                t.state = pb::TaskState::Pending as i32;
            }
        }
        true
    }

    fn bill(
        &mut self,
        tenant: &str,
        job: &str,
        node: u64,
        u: Option<&pb::UsageRecord>,
        unix_ms: u64,
    ) {
        let u = u.cloned().unwrap_or_default();
        let hour = unix_ms / 3_600_000;
        self.job_usage
            .entry((tenant.to_string(), job.to_string(), node, hour))
            .or_default()
            .count(&u);
    }

    /// After a task succeeded: when its whole stage has, the next stage starts from its
    /// outputs, or the job succeeds.
    fn advance(&mut self, jid: u64, unix_ms: u64, fx: &mut Effects) {
        let j = self.jobs.get_mut(&jid).expect("caller found it");
        let stage = j.stages.last_mut().expect("a job has a stage");
        if !stage
            .tasks
            .iter()
            .all(|t| t.state == pb::TaskState::Succeeded as i32)
        {
            return;
        }
        stage.finished_ms = unix_ms;
        let outputs: Vec<pb::BlobRef> = stage
            .tasks
            .iter()
            .flat_map(|t| {
                let mut o = t.outputs.clone();
                o.sort_by(|a, b| a.name.cmp(&b.name));
                o
            })
            .collect();
        let spec = j.spec.as_ref().expect("kept");
        let next = j.stages.len();
        if next == spec.stages.len() {
            // The job's result is a directory of files: their names must differ.
            if let Err(e) = job_spec::check_blob_refs("output", &outputs) {
                self.fail_job(jid, format!("the last stage's outputs: {e}"), unix_ms, fx);
                return;
            }
            let j = self.jobs.get_mut(&jid).expect("still here");
            j.state = pb::JobState::Succeeded as i32;
            j.finished_ms = unix_ms;
            j.outputs = outputs;
            self.finished(jid);
            return;
        }
        let st = &spec.stages[next];
        let name = st.name.clone();
        let problem = if outputs.is_empty() {
            Some(format!(
                "stage {next} wrote no files to /out; stage {} (`{name}`) has no inputs",
                next + 1
            ))
        } else if outputs.len() > MAX_TASKS_PER_STAGE {
            Some(format!(
                "stage {next} wrote {} files; a stage takes at most {MAX_TASKS_PER_STAGE}",
                outputs.len()
            ))
        } else if st.fanout == pb::Fanout::All as i32 {
            job_spec::check_blob_refs("output", &outputs)
                .err()
                .map(|e| {
                    format!(
                        "stage {} (`{name}`) takes every output at once: {e}",
                        next + 1
                    )
                })
        } else {
            None
        };
        if let Some(why) = problem {
            self.fail_job(jid, why, unix_ms, fx);
            return;
        }
        let tasks = cut_tasks(st, outputs);
        j.stages.push(pb::StageRecord {
            tasks,
            started_ms: unix_ms,
            finished_ms: 0,
        });
        fx.jobs.push(jid);
    }

    fn fail_job(&mut self, jid: u64, why: String, unix_ms: u64, fx: &mut Effects) {
        self.end_job(jid, pb::JobState::Failed, why, unix_ms, fx);
    }

    /// Ends a running job: every running attempt is cancelled (not billed) and unfinished
    /// tasks with it.
    fn end_job(
        &mut self,
        jid: u64,
        state: pb::JobState,
        why: String,
        unix_ms: u64,
        fx: &mut Effects,
    ) {
        let Some(j) = self.jobs.get_mut(&jid) else {
            return;
        };
        j.state = state as i32;
        j.error = clip(&why);
        j.finished_ms = unix_ms;
        for (si, s) in j.stages.iter_mut().enumerate() {
            for t in &mut s.tasks {
                for a in t.attempts.iter_mut().filter(|a| running(a)) {
                    a.error = format!(
                        "job {}",
                        state
                            .as_str_name()
                            .trim_start_matches("JOB_STATE_")
                            .to_lowercase()
                    );
                    Self::end_attempt(&mut self.nodes, a, pb::AttemptState::Cancelled, unix_ms, fx);
                    fx.attempts.push((jid, si as u32, t.index, a.number));
                }
                if matches!(
                    pb::TaskState::try_from(t.state),
                    Ok(pb::TaskState::Pending | pb::TaskState::Running)
                ) {
                    t.state = pb::TaskState::Cancelled as i32;
                }
            }
        }
        fx.jobs.push(jid);
        self.finished(jid);
    }

    pub(super) fn cancel_job(
        &mut self,
        c: pb::CancelJobCmd,
        fx: &mut Effects,
    ) -> Result<pb::CommandResult> {
        let j = self
            .job(&c.tenant, &c.name)
            .ok_or_else(|| not_found("job", format!("{}/{}", c.tenant, c.name)))?;
        let id = j.id;
        if j.state == pb::JobState::Running as i32 {
            self.end_job(
                id,
                pb::JobState::Cancelled,
                "cancelled by its tenant".into(),
                c.unix_ms,
                fx,
            );
        }
        let mut r = ok_result();
        r.job = id;
        Ok(r)
    }

    /// A job ended: past [`MAX_FINISHED_JOBS`] the oldest finished one is forgotten.
    fn finished(&mut self, jid: u64) {
        self.finished_jobs.insert(jid);
        while self.finished_jobs.len() > MAX_FINISHED_JOBS {
            let Some(oldest) = self.finished_jobs.pop_first() else {
                break;
            };
            self.forget_job(oldest);
        }
    }

    fn forget_job(&mut self, id: u64) {
        if let Some(j) = self.jobs.remove(&id) {
            let name = j.spec.map(|s| s.name).unwrap_or_default();
            self.job_ids.remove(&(j.tenant, name));
        }
        self.finished_jobs.remove(&id);
    }

    /// Rebuilds the job indexes and the nodes' task load from snapshot records.
    pub(super) fn restore_jobs(
        &mut self,
        jobs: Vec<pb::JobRecord>,
        next_job_id: u64,
        usage: Vec<pb::UsageTotal>,
    ) -> std::result::Result<(), ApplyError> {
        for j in jobs {
            let name = j
                .spec
                .as_ref()
                .map(|s| s.name.clone())
                .ok_or_else(|| invalid(format!("snapshot job {} has no spec", j.id)))?;
            for s in &j.stages {
                for t in &s.tasks {
                    for a in t.attempts.iter().filter(|a| running(a)) {
                        let r = a.reserved.unwrap_or_default();
                        let n = self.nodes.get_mut(&a.node).ok_or_else(|| {
                            invalid(format!("snapshot attempt on unknown node {:016x}", a.node))
                        })?;
                        n.task_reserved = add(
                            n.task_reserved,
                            Resources::new(r.cpu_millis, r.memory_mib, r.disk_mib),
                        );
                        n.task_attempts += 1;
                    }
                }
            }
            if j.state != pb::JobState::Running as i32 {
                self.finished_jobs.insert(j.id);
            }
            self.job_ids.insert((j.tenant.clone(), name), j.id);
            self.jobs.insert(j.id, j);
        }
        self.next_job_id = next_job_id;
        for u in usage {
            let t = UsageTotals::of(&u);
            self.job_usage
                .insert((u.tenant, u.function, u.node, u.hour), t);
        }
        Ok(())
    }

    /// Snapshot records of the jobs and their usage.
    pub(super) fn jobs_snapshot(&self) -> (Vec<pb::JobRecord>, Vec<pb::UsageTotal>) {
        let jobs = self.jobs.values().cloned().collect();
        let usage = self
            .job_usage
            .iter()
            .map(|((tenant, job, node, hour), t)| t.record((tenant, job), *node, *hour))
            .collect();
        (jobs, usage)
    }
}

/// Every blob a job names: its inputs, its tasks' inputs and outputs, its result.
pub fn job_blobs(j: &pb::JobRecord) -> impl Iterator<Item = &pb::BlobRef> {
    let spec_inputs = j.spec.iter().flat_map(|s| s.inputs.iter());
    let tasks = j
        .stages
        .iter()
        .flat_map(|s| s.tasks.iter())
        .flat_map(|t| t.inputs.iter().chain(t.outputs.iter()));
    spec_inputs.chain(tasks).chain(j.outputs.iter())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job_driver::{JobDriver, TaskNeed, TaskPlacer};

    fn cmd(kind: pb::command::Kind) -> pb::Command {
        pb::Command {
            request_id: vec![],
            kind: Some(kind),
        }
    }

    fn apply(m: &mut StateMachine, kind: pb::command::Kind) -> (pb::CommandResult, Effects) {
        let mut fx = Effects::default();
        let i = m.applied_index() + 1;
        let r = m.apply(i, cmd(kind), &mut fx);
        (r, fx)
    }

    fn blob(name: &str, fill: u8) -> pb::BlobRef {
        pb::BlobRef {
            name: name.into(),
            sha256: hex::encode([fill; 32]),
            size: 1 << 20,
        }
    }

    fn stage(fanout: pb::Fanout) -> pb::JobStage {
        crate::fuzzing::job_stage(fanout)
    }

    /// A tenant and three container nodes of 2 cores.
    fn machine() -> StateMachine {
        let mut m = StateMachine::new();
        let (r, _) = apply(
            &mut m,
            pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
                name: "acme".into(),
                token_sha256: vec![],
            }),
        );
        assert!(r.error_code.is_empty(), "{r:?}");
        let nodes = (1..=3)
            .map(|id| {
                let mut n = crate::fuzzing::node(id);
                let a = n.attributes.as_mut().expect("attrs");
                a.runtimes = vec!["container".into()];
                a.capacity = Some(pb::Resources {
                    cpu_millis: 2000,
                    memory_mib: 2048,
                    disk_mib: 100_000,
                });
                n
            })
            .collect();
        let (r, _) = apply(
            &mut m,
            pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd { nodes }),
        );
        assert!(r.error_code.is_empty(), "{r:?}");
        m
    }

    fn submit(m: &mut StateMachine, no_backup: bool) -> u64 {
        let spec = pb::JobSpec {
            name: "movie".into(),
            inputs: vec![blob("in.mp4", 1)],
            stages: vec![
                stage(pb::Fanout::All),
                stage(pb::Fanout::Each),
                stage(pb::Fanout::All),
            ],
            no_backup_tasks: no_backup,
            ..Default::default()
        };
        submit_spec(m, spec)
    }

    /// Submits `spec` for acme; the job's id.
    fn submit_spec(m: &mut StateMachine, spec: pb::JobSpec) -> u64 {
        let (r, fx) = apply(
            m,
            pb::command::Kind::SubmitJob(pb::SubmitJobCmd {
                tenant: "acme".into(),
                spec: Some(spec),
                unix_ms: 1_000,
            }),
        );
        assert!(r.error_code.is_empty(), "{r:?}");
        assert_eq!(fx.jobs, vec![r.job]);
        r.job
    }

    /// Places on the lowest-numbered nodes not avoided that have a free core (the real
    /// placer is tested in stellar-placement; this one makes the rounds predictable).
    struct FirstNodes(Vec<(u64, u32)>);
    impl FirstNodes {
        fn of(m: &StateMachine, nodes: &[u64]) -> FirstNodes {
            FirstNodes(
                nodes
                    .iter()
                    .map(|n| {
                        let x = &m.nodes()[n];
                        (
                            *n,
                            (x.capacity.cpu_millis - x.task_reserved.cpu_millis) / 1000,
                        )
                    })
                    .collect(),
            )
        }
    }
    impl TaskPlacer for FirstNodes {
        fn place_tasks(
            &mut self,
            _: &TaskNeed,
            count: u32,
            avoid: &[u64],
        ) -> std::result::Result<Vec<u64>, String> {
            let mut out = Vec::new();
            for (n, slots) in &mut self.0 {
                if out.len() < count as usize && *slots > 0 && !avoid.contains(n) {
                    *slots -= 1;
                    out.push(*n);
                }
            }
            if out.is_empty() {
                return Err("no node".into());
            }
            Ok(out)
        }
    }

    /// One driver round's commands, applied; the keys of the attempts started.
    fn round(m: &mut StateMachine, d: &mut JobDriver, nodes: &[u64], now: u64) -> Vec<AttemptKey> {
        let r = d.round(m, &mut FirstNodes::of(m, nodes), now);
        let mut started = Vec::new();
        if !r.lost.is_empty() {
            let keys: Vec<AttemptKey> = r.lost.iter().map(|(_, k)| *k).collect();
            let (res, _) = apply(
                m,
                pb::command::Kind::TaskReports(pb::TaskReportsCmd {
                    reports: r.lost.into_iter().map(|(r, _)| r).collect(),
                    unix_ms: now,
                }),
            );
            assert!(res.error_code.is_empty(), "{res:?}");
            d.lost_done(&keys);
        }
        for w in r.waves {
            let (res, fx) = apply(m, pb::command::Kind::StartAttempts(w.command));
            assert!(res.error_code.is_empty(), "{res:?}");
            d.wave_done(&w.tasks);
            started.extend(fx.attempts);
        }
        started
    }

    fn done(
        m: &mut StateMachine,
        key: AttemptKey,
        node: u64,
        outputs: Vec<pb::BlobRef>,
        now: u64,
    ) -> pb::CommandResult {
        apply(
            m,
            pb::command::Kind::TaskReports(pb::TaskReportsCmd {
                reports: vec![pb::TaskReport {
                    result: Some(pb::TaskResult {
                        key: Some(task_key(key)),
                        outputs,
                        usage: Some(pb::UsageRecord {
                            cpu_ns: 1_000_000_000,
                            wall_us: 1_000_000,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    node,
                    lost: false,
                }],
                unix_ms: now,
            }),
        )
        .0
    }

    /// `done` from the attempt's own node.
    fn done_here(
        m: &mut StateMachine,
        key: AttemptKey,
        outputs: Vec<pb::BlobRef>,
        now: u64,
    ) -> pb::CommandResult {
        let node = node_of(m, key);
        done(m, key, node, outputs, now)
    }

    fn node_of(m: &StateMachine, k: AttemptKey) -> u64 {
        m.jobs()[&k.0].stages[k.1 as usize].tasks[k.2 as usize].attempts[k.3 as usize - 1].node
    }

    #[test]
    fn a_job_runs_stage_by_stage_and_bills_each_task_once() {
        let mut m = machine();
        let jid = submit(&mut m, true);
        let mut d = JobDriver::default();
        // Stage 1: one task with the job's input, on one node, holding its share there.
        let s = round(&mut m, &mut d, &[1, 2, 3], 2_000);
        assert_eq!(s, vec![(jid, 0, 0, 1)]);
        assert_eq!(m.nodes()[&1].task_reserved.cpu_millis, 1000);
        assert!(
            m.watched_task(s[0])
                .is_some_and(|w| w.running && w.node == 1)
        );
        // Nothing more to start while it runs.
        assert!(round(&mut m, &mut d, &[1, 2, 3], 2_100).is_empty());
        // A report from another node is skipped; the real one advances the job.
        let segs = vec![blob("seg1.ts", 2), blob("seg0.ts", 3), blob("seg2.ts", 4)];
        assert_eq!(done(&mut m, s[0], 2, segs.clone(), 3_000).count, 0);
        assert_eq!(done(&mut m, s[0], 1, segs, 3_000).count, 1);
        assert_eq!(m.nodes()[&1].task_reserved.cpu_millis, 0);
        let j = &m.jobs()[&jid];
        assert_eq!(j.stages.len(), 2);
        // One task per output, in name order.
        let names: Vec<&str> = j.stages[1]
            .tasks
            .iter()
            .map(|t| t.inputs[0].name.as_str())
            .collect();
        assert_eq!(names, ["seg0.ts", "seg1.ts", "seg2.ts"]);
        // Stage 2: a wave of three on three distinct nodes.
        let s = round(&mut m, &mut d, &[1, 2, 3], 3_100);
        assert_eq!(s.len(), 3);
        for (i, k) in s.iter().enumerate() {
            let out = vec![blob(&format!("seg{i}.ts"), 10 + i as u8)];
            assert_eq!(done_here(&mut m, *k, out, 4_000).count, 1);
        }
        // Stage 3: every output at once; then the job is done with its output.
        let s = round(&mut m, &mut d, &[1, 2, 3], 4_100);
        assert_eq!(s.len(), 1);
        assert_eq!(m.jobs()[&jid].stages[2].tasks[0].inputs.len(), 3);
        done_here(&mut m, s[0], vec![blob("output.mp4", 20)], 5_000);
        let j = &m.jobs()[&jid];
        assert_eq!(j.state, pb::JobState::Succeeded as i32);
        assert_eq!(j.outputs[0].name, "output.mp4");
        // Five tasks ran; five are billed, once each.
        let billed: u64 = m.job_usage().values().map(|t| t.invocations).sum();
        assert_eq!(billed, 5);
        let cpu: u64 = m.job_usage().values().map(|t| t.cpu_ns).sum();
        assert_eq!(cpu, 5_000_000_000);
        // A late report of a finished attempt changes nothing.
        assert_eq!(done_here(&mut m, s[0], vec![], 6_000).count, 0);
        assert!(m.tenant_job_has_blob("acme", &hex::encode([20u8; 32])));
        assert!(!m.tenant_job_has_blob("other", &hex::encode([20u8; 32])));
        // The whole state survives a snapshot.
        let back = StateMachine::from_snapshot(m.to_snapshot()).expect("snapshot");
        assert_eq!(back.digest(), m.digest());
    }

    /// Records each ask and places on nodes 1, 2, 3… (fresh nodes every call).
    #[derive(Default)]
    struct Asks(Vec<(u64, u32)>, u64);
    impl TaskPlacer for Asks {
        fn place_tasks(
            &mut self,
            need: &TaskNeed,
            count: u32,
            _: &[u64],
        ) -> std::result::Result<Vec<u64>, String> {
            self.0.push((need.bytes_in, count));
            let first = self.1;
            self.1 += u64::from(count);
            Ok((first..first + u64::from(count))
                .map(|n| n % 3 + 1)
                .collect())
        }
    }

    #[test]
    fn a_wave_is_one_ask_sized_for_its_largest_task() {
        let mut m = machine();
        let jid = submit(&mut m, true);
        let mut d = JobDriver::default();
        let s = round(&mut m, &mut d, &[1, 2, 3], 1_000);
        // Segments of different sizes: the wave asks once, for the largest.
        let segs: Vec<pb::BlobRef> = (0..5u8)
            .map(|i| pb::BlobRef {
                size: (1 + u64::from(i)) << 20,
                ..blob(&format!("s{i}.ts"), 50 + i)
            })
            .collect();
        done(&mut m, s[0], 1, segs, 2_000);
        let mut asks = Asks::default();
        let r = d.round(&m, &mut asks, 3_000);
        assert_eq!(asks.0, vec![(5 << 20, 5)], "one ask for the whole wave");
        assert_eq!(r.waves.len(), 1);
        assert_eq!(r.waves[0].command.starts.len(), 5);
        assert_eq!(m.jobs()[&jid].stages.len(), 2);
    }

    #[test]
    fn a_silent_attempt_is_lost_only_after_its_deadline_and_its_inputs_fetch() {
        let mut m = machine();
        // A one-stage job with a 1 GiB input and a 10 s timeout.
        let mut st = stage(pb::Fanout::All);
        st.limits.as_mut().expect("limits").timeout_ms = 10_000;
        let spec = pb::JobSpec {
            name: "big".into(),
            inputs: vec![pb::BlobRef {
                size: 1 << 30,
                ..blob("in.mp4", 9)
            }],
            stages: vec![st],
            no_backup_tasks: true,
            ..Default::default()
        };
        submit_spec(&mut m, spec);
        let mut d = JobDriver::default();
        let s = round(&mut m, &mut d, &[1, 2, 3], 1_000);
        assert_eq!(s.len(), 1);
        // The deadline plus the grace, and the time 1 GiB takes at 1 Mbit/s (~2.4 h).
        let fetch = (1u64 << 30) / crate::job_driver::FETCH_FLOOR_BYTES_PER_MS;
        let limit = 1_000 + 10_000 + crate::job_driver::OVERRUN_GRACE_MS + fetch;
        let r = d.round(&m, &mut FirstNodes::of(&m, &[1, 2, 3]), limit - 1_000);
        assert!(
            r.lost.is_empty(),
            "lost while its input could still be arriving"
        );
        let r = d.round(&m, &mut FirstNodes::of(&m, &[1, 2, 3]), limit + 1);
        assert_eq!(r.lost.len(), 1);
        assert_eq!(r.lost[0].1, s[0]);
        let why = &r.lost[0].0.result.as_ref().expect("result").error_message;
        assert!(why.contains("past its deadline"), "{why}");
    }

    #[test]
    fn final_outputs_with_the_same_name_fail_the_job() {
        let mut m = machine();
        // One stage of one task per input: two tasks that both write `out.txt`.
        let spec = pb::JobSpec {
            name: "clash".into(),
            inputs: vec![blob("a.txt", 1), blob("b.txt", 2)],
            stages: vec![stage(pb::Fanout::Each)],
            no_backup_tasks: true,
            ..Default::default()
        };
        let jid = submit_spec(&mut m, spec);
        let mut d = JobDriver::default();
        let s = round(&mut m, &mut d, &[1, 2, 3], 1_000);
        assert_eq!(s.len(), 2);
        done_here(&mut m, s[0], vec![blob("out.txt", 7)], 2_000);
        assert_eq!(m.jobs()[&jid].state, pb::JobState::Running as i32);
        done_here(&mut m, s[1], vec![blob("out.txt", 8)], 2_000);
        let j = &m.jobs()[&jid];
        assert_eq!(j.state, pb::JobState::Failed as i32);
        assert!(j.error.contains("out.txt"), "{}", j.error);
        assert!(j.outputs.is_empty());
        // Both tasks ran: both are billed, and nothing stays reserved.
        let billed: u64 = m.job_usage().values().map(|t| t.invocations).sum();
        assert_eq!(billed, 2);
        assert_eq!(
            m.nodes()
                .values()
                .map(|n| n.task_reserved.cpu_millis)
                .sum::<u32>(),
            0
        );
    }

    #[test]
    fn lost_attempts_retry_elsewhere_and_stragglers_get_a_backup_whose_loser_is_not_billed() {
        let mut m = machine();
        let jid = submit(&mut m, false);
        let mut d = JobDriver::default();
        let s = round(&mut m, &mut d, &[1, 2, 3], 1_000);
        let segs: Vec<pb::BlobRef> = (0..4).map(|i| blob(&format!("s{i}.ts"), 30 + i)).collect();
        done(&mut m, s[0], 1, segs, 2_000);
        // Four segment tasks on three nodes: three start now.
        let s = round(&mut m, &mut d, &[1, 2, 3], 2_000);
        assert_eq!(s.len(), 3);
        // Node 2 goes down: its attempt is lost and retried on a node that is left.
        let on2 = *s
            .iter()
            .find(|k| node_of(&m, **k) == 2)
            .expect("one on node 2");
        apply(
            &mut m,
            pb::command::Kind::NodeTransitions(pb::NodeTransitionsCmd {
                transitions: vec![pb::NodeTransition {
                    node: 2,
                    state: pb::NodeState::Down as i32,
                    gateway: String::new(),
                }],
            }),
        );
        // This round reports it lost (and starts the fourth task); the next retries it.
        let mut again = round(&mut m, &mut d, &[1, 3], 3_000);
        let t = &m.jobs()[&jid].stages[1].tasks[on2.2 as usize];
        assert_eq!(t.attempts[0].state, pb::AttemptState::Lost as i32);
        assert_eq!(t.state, pb::TaskState::Pending as i32);
        again.extend(round(&mut m, &mut d, &[1, 3], 3_250));
        assert!(again.iter().any(|k| k.2 == on2.2 && k.3 == 2), "{again:?}");
        assert_eq!(m.nodes()[&2].task_reserved.cpu_millis, 0);
        // Three of four finish quickly (1 s each); the fourth is still running at 10 s: a
        // straggler once 75% are done. Its backup goes to another node.
        let mut running: Vec<AttemptKey> = m
            .running_attempts()
            .into_iter()
            .filter(|k| k.1 == 1)
            .collect();
        running.sort();
        let slow = running.pop().expect("a running attempt");
        for k in running {
            let started =
                m.jobs()[&jid].stages[1].tasks[k.2 as usize].attempts[k.3 as usize - 1].started_ms;
            done_here(
                &mut m,
                k,
                vec![blob(&format!("o{}.ts", k.2), 40 + k.2 as u8)],
                started + 1_000,
            );
        }
        let pending: Vec<u32> = m.jobs()[&jid].stages[1]
            .tasks
            .iter()
            .filter(|t| t.state == pb::TaskState::Pending as i32)
            .map(|t| t.index)
            .collect();
        // Whatever waits for a node starts; then the straggler's backup.
        let _ = round(&mut m, &mut d, &[1, 3], 4_000);
        for k in m
            .running_attempts()
            .into_iter()
            .filter(|k| k.1 == 1 && pending.contains(&k.2))
        {
            done_here(
                &mut m,
                k,
                vec![blob(&format!("o{}.ts", k.2), 40 + k.2 as u8)],
                5_000,
            );
        }
        let backup = round(&mut m, &mut d, &[1, 3], 60_000);
        let b = *backup
            .iter()
            .find(|k| k.2 == slow.2)
            .expect("a backup of the straggler");
        assert_ne!(node_of(&m, b), node_of(&m, slow));
        assert!(m.jobs()[&jid].stages[1].tasks[slow.2 as usize].attempts[b.3 as usize - 1].backup);
        // No second backup while both run.
        assert!(round(&mut m, &mut d, &[1, 3], 61_000).is_empty());
        // The backup wins: the original is cancelled and its late report not counted.
        let before: u64 = m.job_usage().values().map(|t| t.invocations).sum();
        done_here(&mut m, b, vec![blob("o-slow.ts", 60)], 62_000);
        let t = &m.jobs()[&jid].stages[1].tasks[slow.2 as usize];
        assert_eq!(
            t.attempts[slow.3 as usize - 1].state,
            pb::AttemptState::Cancelled as i32
        );
        assert!(m.watched_task(slow).is_some_and(|w| !w.running));
        assert_eq!(done_here(&mut m, slow, vec![], 63_000).count, 0);
        let after: u64 = m.job_usage().values().map(|t| t.invocations).sum();
        assert_eq!(after, before + 1);
        assert_eq!(m.nodes().values().map(|n| n.task_attempts).sum::<u32>(), 0);
    }

    #[test]
    fn a_program_failure_fails_the_job_and_a_stale_wave_changes_nothing() {
        let mut m = machine();
        let jid = submit(&mut m, true);
        let mut d = JobDriver::default();
        let r = d.round(&m, &mut FirstNodes::of(&m, &[1]), 1_000);
        let wave = r.waves[0].command.clone();
        // The node leaves before the wave is applied: refused whole, nothing held.
        apply(
            &mut m,
            pb::command::Kind::NodeTransitions(pb::NodeTransitionsCmd {
                transitions: vec![pb::NodeTransition {
                    node: 1,
                    state: pb::NodeState::Down as i32,
                    gateway: String::new(),
                }],
            }),
        );
        let jobs_before = m.jobs().clone();
        let (res, _) = apply(&mut m, pb::command::Kind::StartAttempts(wave));
        assert_eq!(res.error_code, crate::error::STALE_PLAN);
        assert_eq!(m.jobs(), &jobs_before);
        assert!(m.nodes().values().all(|n| n.task_attempts == 0));
        d.wave_done(&r.waves[0].tasks);
        let s = round(&mut m, &mut d, &[2], 2_000);
        // The program exits 1: not retried; the job fails, billed for what ran.
        let (res, _) = apply(
            &mut m,
            pb::command::Kind::TaskReports(pb::TaskReportsCmd {
                reports: vec![pb::TaskReport {
                    result: Some(pb::TaskResult {
                        key: Some(task_key(s[0])),
                        exit_code: 1,
                        error_code: "EXIT_CODE".into(),
                        error_message: "exited with status 1".into(),
                        stderr_tail: b"no such file".to_vec(),
                        ..Default::default()
                    }),
                    node: 2,
                    lost: false,
                }],
                unix_ms: 3_000,
            }),
        );
        assert_eq!(res.count, 1);
        let j = &m.jobs()[&jid];
        assert_eq!(j.state, pb::JobState::Failed as i32);
        assert!(j.error.contains("exited with status 1"), "{}", j.error);
        assert_eq!(
            j.stages[0].tasks[0].attempts[0].stderr_tail,
            b"no such file"
        );
        assert!(
            d.round(&m, &mut FirstNodes::of(&m, &[2, 3]), 4_000)
                .waves
                .is_empty()
        );
        // A finished job's name can be used again.
        submit(&mut m, true);
    }
}
