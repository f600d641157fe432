//! The event loop: placement waves through the real placer, attempts and their phases,
//! departures found by heartbeat timeout, retries, and LATE-style backup tasks.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use stellar_placement::{
    Arch, ArchSet, Fit, LabelConstraint, LabelOp, NodeId, NodeState, NodeTable, Origin,
    PlacementError, PlacementRequest, Placer, PlacerConfig, Resources, Runtime, Slot, Transfer,
    WorkloadKind,
};

use super::fleet::{
    Fleet, PERF_LABEL, TASK_CPU_MILLIS, TASK_DISK_MIB, TASK_MEMORY_MIB, link_bound_capacity,
};
use super::{JobSimConfig, JobSimReport};

/// Delay from a freed slot to the placement pass that refills it: the plan queue batches
/// the decisions of ~50 ms into one Raft entry.
const PLAN_DELAY_S: f64 = 0.05;
/// How often the control plane looks for stragglers (progress arrives with heartbeats).
const CHECK_PERIOD_S: f64 = 1.0;
/// An attempt younger than this has reported too little progress to judge.
const MIN_ELAPSED_S: f64 = 2.0;
/// A straggler is an attempt expected to need longer than this many times the median
/// attempt on a fast node: a backup there would then very likely finish first.
const BACKUP_MARGIN: f64 = 1.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// The attempt's transcode finished (its upload may start).
    ComputeDone(u32),
    /// The attempt's upload got the uplink: its slot is free for the next task.
    UploadStart(u32),
    /// The attempt's output is in the store: the task is done.
    UploadDone(u32),
    /// The heartbeat timeout of a departed node expired.
    Detect(u32),
    /// A placement pass over the pending tasks.
    Plan,
    /// The periodic straggler check.
    Check,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    Won,
    Cancelled,
    Lost,
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    task: u32,
    node: u32,
    start: f64,
    /// When the download started and ended (it may wait behind others on the downlink).
    download: (f64, f64),
    /// When the transcode ends.
    compute_end: f64,
    /// When the upload starts (`INFINITY` until the transcode is done) and how long it takes.
    upload: (f64, f64),
    state: State,
    backup: bool,
    /// Whether the attempt still holds its node's slot (it gives it back when its upload
    /// starts: the worker uploads in the background while the core takes the next task).
    holds_slot: bool,
}

impl Attempt {
    /// The progress a worker reports at `t`: the share of its download, transcode and
    /// upload work done (bytes and frames), so time spent waiting for a link counts none.
    fn progress(&self, t: f64) -> f64 {
        let span = |from: f64, to: f64| (t.min(to) - from).max(0.0);
        let (d0, d1) = self.download;
        let (u0, us) = self.upload;
        let total = (d1 - d0) + (self.compute_end - d1) + us;
        let done = span(d0, d1) + span(d1, self.compute_end) + span(u0, u0 + us);
        if total > 0.0 { done / total } else { 1.0 }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Task {
    /// Live attempts (an original and at most one backup).
    live: [u32; 2],
    n_live: u8,
    attempts: u8,
    backed: bool,
    done: bool,
}

impl Task {
    fn remove_live(&mut self, aid: u32) {
        if let Some(i) = self.live[..self.n_live as usize]
            .iter()
            .position(|a| *a == aid)
        {
            self.live[i] = self.live[self.n_live as usize - 1];
            self.n_live -= 1;
        }
    }
}

/// What the control plane and the node's links know of one node during the run.
#[derive(Clone, Debug)]
struct NodeRun {
    id: NodeId,
    free: u32,
    down_free: f64,
    up_free: f64,
    running: Vec<u32>,
    /// Declared gone (after the heartbeat timeout).
    gone: bool,
}

struct Sim<'a> {
    cfg: &'a JobSimConfig,
    fleet: &'a Fleet,
    nodes: Vec<NodeRun>,
    tasks: Vec<Task>,
    attempts: Vec<Attempt>,
    table: NodeTable,
    placer: Placer,
    ask: Resources,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    now: f64,
    pending: VecDeque<u32>,
    plan_queued: bool,
    /// Nodes not declared gone with a free slot: the size of the next wave.
    free_nodes: usize,
    /// Those of them labelled fast.
    free_fast: usize,
    done: usize,
    failed: usize,
    finished: bool,
    t90: Option<f64>,
    won_s: Vec<f64>,
    won_fast_s: Vec<f64>,
    backups_running: u64,
    r: JobSimReport,
}

/// Runs the job on `fleet` and fills in the report.
pub(super) fn run(cfg: &JobSimConfig, fleet: Fleet) -> JobSimReport {
    let fleet_slots: u64 = fleet.nodes.iter().map(|n| u64::from(n.slots)).sum();
    let total_work: f64 = fleet.segments.iter().map(|s| s.work_ref_s).sum();
    let ideal = total_work / fleet.capacity_ref_cores + fleet.median_transfer_s;
    let r = JobSimReport {
        nodes: cfg.nodes,
        fleet_nodes: fleet.nodes.iter().filter(|n| n.slots > 0).count(),
        fleet_slots,
        fleet_capacity_ref_cores: fleet.capacity_ref_cores,
        speed_p10_p50_p90: fleet.speed_percentiles,
        videos: fleet.videos,
        tasks: fleet.segments.len(),
        segment: cfg.segment,
        churn: cfg.churn,
        departed_nodes: fleet
            .nodes
            .iter()
            .filter(|n| n.leaves_at.is_finite())
            .count(),
        backup_tasks: cfg.backup_tasks,
        total_work_ref_s: total_work,
        median_transfer_s: fleet.median_transfer_s,
        ideal_s: ideal,
        link_bound_ideal_s: total_work
            / fleet
                .nodes
                .iter()
                .map(|n| link_bound_capacity(n, cfg))
                .sum::<f64>()
            + fleet.median_transfer_s,
        fleet_job_slots: fleet.nodes.iter().map(|n| u64::from(n.job_slots)).sum(),
        ratio: f64::NAN,
        ..JobSimReport::default()
    };
    if fleet_slots == 0 || fleet.segments.is_empty() {
        return r;
    }
    let mut table = NodeTable::with_capacity(fleet.world.specs.len());
    let mut nodes = Vec::with_capacity(fleet.world.specs.len());
    for (i, spec) in fleet.world.specs.iter().enumerate() {
        let mut spec = spec.clone();
        let job_slots = fleet.nodes[i].job_slots;
        if job_slots < fleet.nodes[i].slots {
            // The node advertises to this job only the cores its links can feed.
            spec.free.cpu_millis = job_slots * TASK_CPU_MILLIS;
        }
        if fleet.fast[i] {
            spec.labels.push((PERF_LABEL.0.into(), PERF_LABEL.1.into()));
        }
        let id = spec.id;
        // Invariant: the World's ids are distinct and its specs valid, so joins succeed, and
        // a fresh table hands out slots 0, 1, 2, ... in join order.
        let slot = table.join(spec).expect("World nodes join a fresh table");
        debug_assert_eq!(slot, Slot(i as u32));
        nodes.push(NodeRun {
            id,
            free: job_slots,
            down_free: 0.0,
            up_free: 0.0,
            running: Vec::new(),
            gone: false,
        });
    }
    table.refresh_zone_order();
    // Invariant: the default configuration is valid.
    let placer = Placer::new(PlacerConfig::default(), cfg.seed ^ 0x0B5E_55ED)
        .expect("the default placer configuration is valid");
    let mut sim = Sim {
        cfg,
        fleet: &fleet,
        free_nodes: nodes.iter().filter(|n| n.free > 0).count(),
        free_fast: (0..nodes.len())
            .filter(|i| nodes[*i].free > 0 && fleet.fast[*i])
            .count(),
        nodes,
        tasks: vec![Task::default(); fleet.segments.len()],
        attempts: Vec::with_capacity(fleet.segments.len() * 5 / 4),
        table,
        placer,
        ask: Resources::new(TASK_CPU_MILLIS, TASK_MEMORY_MIB, TASK_DISK_MIB),
        events: BinaryHeap::new(),
        seq: 0,
        now: 0.0,
        pending: (0..fleet.segments.len() as u32).collect(),
        plan_queued: false,
        done: 0,
        failed: 0,
        finished: false,
        t90: None,
        won_s: Vec::with_capacity(fleet.segments.len()),
        won_fast_s: Vec::new(),
        backups_running: 0,
        r,
    };
    sim.main_loop(ideal);
    let mut r = sim.r;
    r.tasks_completed = sim.done;
    r.tasks_failed = sim.failed;
    r.attempts = sim.attempts.len() as u64;
    r.completion_s = sim.now;
    r.ratio = sim.now / ideal;
    r.t90_s = sim.t90.unwrap_or(sim.now);
    r.tail_s = r.completion_s - r.t90_s;
    r.median_attempt_s = median(&mut sim.won_s);
    r
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mid = v.len() / 2;
    *v.select_nth_unstable_by(mid, f64::total_cmp).1
}

impl Sim<'_> {
    fn at(&mut self, t: f64, e: Event) {
        self.seq += 1;
        let key = (t.max(0.0) * 1e6).round() as u64;
        self.events.push(Reverse((key, self.seq, e)));
    }

    fn main_loop(&mut self, ideal: f64) {
        // A job the fleet cannot finish (everyone left) stops here instead of looping.
        let give_up = 20.0 * ideal + 600.0;
        self.at(0.0, Event::Plan);
        self.at(CHECK_PERIOD_S, Event::Check);
        for (i, n) in self.fleet.nodes.iter().enumerate() {
            if n.leaves_at.is_finite() {
                self.at(
                    n.leaves_at + self.cfg.heartbeat_timeout_s,
                    Event::Detect(i as u32),
                );
            }
        }
        while let Some(Reverse((key, _, e))) = self.events.pop() {
            self.now = key as f64 / 1e6;
            match e {
                Event::ComputeDone(a) => self.compute_done(a),
                Event::UploadStart(a) => {
                    if self.alive(a) {
                        self.release_slot(a);
                        self.queue_plan();
                    }
                }
                Event::UploadDone(a) => self.upload_done(a),
                Event::Detect(n) => self.detect(n as usize),
                Event::Plan => self.plan(),
                Event::Check => {
                    if self.cfg.backup_tasks
                        && self.done as f64 >= self.cfg.backup_after * self.tasks.len() as f64
                        && self.pending.is_empty()
                    {
                        self.launch_backups();
                    }
                    if self.now < give_up {
                        self.at(self.now + CHECK_PERIOD_S, Event::Check);
                    } else {
                        break;
                    }
                }
            }
            if self.finished {
                break;
            }
        }
    }

    fn queue_plan(&mut self) {
        if !self.plan_queued && !self.pending.is_empty() {
            self.plan_queued = true;
            self.at(self.now + PLAN_DELAY_S, Event::Plan);
        }
    }

    /// One batch placement of `count` tasks; on an all-or-nothing refusal, once more at
    /// the size the search found. With `fast_only`, only nodes labelled fast other than
    /// `avoid` (backups, and the last tasks).
    fn wave(&mut self, count: usize, fast_only: bool, avoid: Vec<NodeId>) -> Vec<Slot> {
        let seg = &self.cfg.segment;
        let mut req = PlacementRequest {
            kind: WorkloadKind::Batch,
            runtime: Runtime::Container,
            arch: ArchSet::only(Arch::X86_64).with(Arch::Aarch64),
            cpu_cores: f64::from(TASK_CPU_MILLIS) / 1000.0,
            memory_mib: f64::from(TASK_MEMORY_MIB),
            disk_mib: f64::from(TASK_DISK_MIB),
            count: count.min(self.table.len()) as u32,
            origin: Origin::Anywhere,
            fit: Fit::Spread,
            transfer: Some(Transfer {
                bytes_in: seg.bytes_in,
                bytes_out: seg.bytes_out,
            }),
            ..Default::default()
        };
        if fast_only {
            req.labels = vec![LabelConstraint {
                key: PERF_LABEL.0.into(),
                op: LabelOp::Equals(PERF_LABEL.1.into()),
            }];
        }
        req.existing = avoid;
        if req.count == 0 {
            return Vec::new();
        }
        for _ in 0..2 {
            self.r.placement_waves += 1;
            match self.placer.place(&mut self.table, &req) {
                Ok(out) => return out.into_iter().map(|p| p.slot).collect(),
                Err(PlacementError::NotEnoughNodes { found, .. }) if found > 0 => {
                    self.r.placement_refusals += 1;
                    req.count = found;
                }
                Err(_) => {
                    self.r.placement_refusals += 1;
                    break;
                }
            }
        }
        Vec::new()
    }

    /// Places pending tasks, wave after wave, until they or the free slots run out. In the
    /// end game (past `backup_after`, and few enough tasks left for the free fast nodes) the
    /// last tasks go to fast nodes only: one started on a slow box would set the finish.
    fn plan(&mut self) {
        self.plan_queued = false;
        while !self.pending.is_empty() && self.free_nodes > 0 {
            let end_game = self.done as f64 >= self.cfg.backup_after * self.tasks.len() as f64
                && self.pending.len() <= self.free_fast;
            let want = if end_game {
                self.pending.len()
            } else {
                self.pending.len().min(self.free_nodes)
            };
            let slots = self.wave(want, end_game, Vec::new());
            if slots.is_empty() {
                break;
            }
            for slot in slots {
                if let Some(task) = self.pending.pop_front() {
                    self.start(task, slot.0, false);
                }
            }
        }
    }

    /// Starts an attempt of `task` on the node in `slot` (already reserved by the placer).
    fn start(&mut self, task: u32, slot: u32, backup: bool) {
        let n = &self.fleet.nodes[slot as usize];
        let seg = &self.fleet.segments[task as usize];
        let run = &mut self.nodes[slot as usize];
        let download_start = self.now.max(run.down_free);
        let download_end = download_start + n.download_s(seg.bytes_in);
        run.down_free = download_end;
        let compute_end = download_end + seg.work_ref_s / n.speed;
        let aid = self.attempts.len() as u32;
        self.attempts.push(Attempt {
            task,
            node: slot,
            start: self.now,
            download: (download_start, download_end),
            compute_end,
            upload: (f64::INFINITY, n.upload_s(seg.bytes_out)),
            state: State::Running,
            backup,
            holds_slot: true,
        });
        run.running.push(aid);
        run.free -= 1;
        if run.free == 0 {
            self.free_nodes -= 1;
            if self.fleet.fast[slot as usize] {
                self.free_fast -= 1;
            }
        }
        let t = &mut self.tasks[task as usize];
        t.live[t.n_live as usize] = aid;
        t.n_live += 1;
        t.attempts += 1;
        self.at(compute_end, Event::ComputeDone(aid));
    }

    /// Whether the attempt still runs on a node that is still there.
    fn alive(&self, aid: u32) -> bool {
        let a = &self.attempts[aid as usize];
        a.state == State::Running && self.fleet.nodes[a.node as usize].leaves_at > self.now
    }

    fn compute_done(&mut self, aid: u32) {
        if !self.alive(aid) {
            return;
        }
        let a = &mut self.attempts[aid as usize];
        let run = &mut self.nodes[a.node as usize];
        a.upload.0 = self.now.max(run.up_free);
        run.up_free = a.upload.0 + a.upload.1;
        let (start, end) = (a.upload.0, run.up_free);
        self.at(end, Event::UploadDone(aid));
        // The worker takes its next task once this output is on the wire, not before: a
        // queue of outputs behind a slow uplink would only grow.
        self.at(start, Event::UploadStart(aid));
    }

    fn upload_done(&mut self, aid: u32) {
        if !self.alive(aid) {
            return;
        }
        let a = self.attempts[aid as usize];
        self.attempts[aid as usize].state = State::Won;
        self.end_attempt(aid);
        let task = &mut self.tasks[a.task as usize];
        if task.done {
            self.r.duplicate_results += 1;
            return;
        }
        task.done = true;
        task.remove_live(aid);
        let losers: Vec<u32> = task.live[..task.n_live as usize].to_vec();
        for other in losers {
            self.attempts[other as usize].state = State::Cancelled;
            self.tasks[a.task as usize].remove_live(other);
            self.end_attempt(other);
        }
        self.done += 1;
        let took = self.now - a.start;
        self.won_s.push(took);
        if self.fleet.fast[a.node as usize] {
            self.won_fast_s.push(took);
        }
        if a.backup {
            self.r.backups_won += 1;
        }
        if self.t90.is_none() && self.done * 10 >= self.tasks.len() * 9 {
            self.t90 = Some(self.now);
        }
        self.check_finished();
        self.queue_plan();
    }

    fn check_finished(&mut self) {
        if self.done + self.failed >= self.tasks.len() {
            self.finished = true;
        }
    }

    /// Ends a won or cancelled attempt: off its node's list, and its slot back if it held
    /// one (the cancel reaches a dead node too: the control plane does not know it is dead
    /// yet, and may place there again until the timeout).
    fn end_attempt(&mut self, aid: u32) {
        let a = self.attempts[aid as usize];
        if a.backup {
            self.backups_running -= 1;
        }
        let run = &mut self.nodes[a.node as usize];
        if let Some(i) = run.running.iter().position(|x| *x == aid) {
            run.running.swap_remove(i);
        }
        self.release_slot(aid);
    }

    /// Gives the attempt's slot back to the node and the table, once.
    fn release_slot(&mut self, aid: u32) {
        let a = &mut self.attempts[aid as usize];
        if !a.holds_slot {
            return;
        }
        a.holds_slot = false;
        let fast = self.fleet.fast[a.node as usize];
        let run = &mut self.nodes[a.node as usize];
        run.free += 1;
        if run.free == 1 && !run.gone && fast {
            self.free_fast += 1;
        }
        if run.free == 1 && !run.gone {
            self.free_nodes += 1;
        }
        let id = run.id;
        // Invariant: simulated nodes never leave the table (gone ones are set Down).
        let _ = self.table.release(id, &self.ask);
    }

    /// The heartbeat timeout of node `n` expired: it is down, its attempts are lost, and
    /// tasks left without a live attempt go back to the front of the queue.
    fn detect(&mut self, n: usize) {
        let run = &mut self.nodes[n];
        run.gone = true;
        if run.free > 0 {
            self.free_nodes -= 1;
            if self.fleet.fast[n] {
                self.free_fast -= 1;
            }
        }
        let lost = std::mem::take(&mut run.running);
        let id = run.id;
        let _ = self.table.set_state(id, NodeState::Down);
        for aid in lost {
            let a = self.attempts[aid as usize];
            self.attempts[aid as usize].state = State::Lost;
            self.r.attempts_lost += 1;
            if a.backup {
                self.backups_running -= 1;
            }
            let task = &mut self.tasks[a.task as usize];
            task.remove_live(aid);
            if task.done || task.n_live > 0 {
                continue;
            }
            if u32::from(task.attempts) < self.cfg.max_attempts {
                self.pending.push_front(a.task);
            } else {
                self.failed += 1;
            }
        }
        self.check_finished();
        self.queue_plan();
    }

    /// LATE: estimates each running attempt's time left from its progress reports
    /// (`elapsed * (1 - p) / p`; a dead node's progress stops, so its estimate grows), and
    /// backs up the furthest behind on fast nodes, within the cap.
    fn launch_backups(&mut self) {
        let cap = (self.cfg.backup_cap * self.r.fleet_slots as f64).ceil() as u64;
        if self.backups_running >= cap || self.free_fast == 0 {
            return;
        }
        let typical = if self.won_fast_s.is_empty() {
            median(&mut self.won_s)
        } else {
            median(&mut self.won_fast_s)
        };
        if !typical.is_finite() {
            return;
        }
        let mut behind: Vec<(f64, u32, u32)> = Vec::new();
        for run in &self.nodes {
            for &aid in &run.running {
                let a = &self.attempts[aid as usize];
                let task = &self.tasks[a.task as usize];
                let elapsed = self.now - a.start;
                if task.backed || task.n_live != 1 || elapsed < MIN_ELAPSED_S {
                    continue;
                }
                let seen = self.now.min(self.fleet.nodes[a.node as usize].leaves_at);
                let p = a.progress(seen);
                let left = if p > 0.0 {
                    elapsed * (1.0 - p) / p
                } else {
                    f64::INFINITY
                };
                if left > BACKUP_MARGIN * typical {
                    behind.push((left, a.task, a.node));
                }
            }
        }
        if behind.is_empty() {
            return;
        }
        behind.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        behind.truncate((cap - self.backups_running) as usize);
        behind.truncate(self.free_fast);
        let avoid: Vec<NodeId> = behind.iter().map(|b| self.nodes[b.2 as usize].id).collect();
        let slots = self.wave(behind.len(), true, avoid);
        for (slot, (_, task, _)) in slots.into_iter().zip(behind) {
            self.tasks[task as usize].backed = true;
            self.r.backups += 1;
            self.backups_running += 1;
            self.start(task, slot.0, true);
        }
    }
}
