//! `stellar-load transcode-bench`, part (b): one segment-parallel transcoding job on a
//! simulated home fleet, scheduled by the real placer, as a deterministic discrete-event
//! simulation (seeded `rand_pcg`, no clock, no I/O).
//!
//! ```text
//!  World::generate (nodes, links, places)        catalogue of videos -> 4 s segments
//!    + CPU speed per node, slots from free cores         | one task per segment
//!        v                                               v
//!   NodeTable <-- waves: Placer::place(Batch, transfer) -- pending (lost tasks first)
//!        |           (plan pass 50 ms after a slot frees)
//!        v
//!   attempt: download (FIFO on the downlink) -> transcode (work / speed)
//!            -> upload (FIFO on the uplink; the slot is freed once it starts)
//!            -> done: first result wins, the other is cancelled
//!   churn:   node leaves silently -> heartbeat timeout -> its attempts lost -> requeued
//!            (at most `max_attempts` per task)
//!   backups: every second once 75% are done: LATE estimate from progress reports;
//!            far-behind attempts get one copy on a fast node
//!        v
//!   report: completion / ideal (work / capacity + median transfer), tail after 90%
//! ```
//!
//! The fleet and the scheduling rules live in `jobsim/fleet.rs` and `jobsim/engine.rs`; this
//! file holds the knobs, the figures and the summary the benchmark prints.

mod engine;
mod fleet;

use serde::Serialize;

/// One segment of the catalogue, on average: what a task downloads, computes and uploads.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SegmentSpec {
    /// Mean input bytes: 4 s of 1080p H.264 at ~5 Mbit/s is ~2.5 MB.
    pub bytes_in: u64,
    /// Mean output bytes: the same 4 s at 720p, ~2.4 Mbit/s, is ~1.2 MB.
    pub bytes_out: u64,
    /// Mean CPU-seconds on the reference core (one core of a recent desktop x86, speed 1.0):
    /// decoding 1080p and encoding 720p x264 `veryfast` runs at ~40 fps there, so ~3 s.
    pub work_ref_s: f64,
}

impl Default for SegmentSpec {
    fn default() -> Self {
        SegmentSpec {
            bytes_in: 2_500_000,
            bytes_out: 1_200_000,
            work_ref_s: 3.0,
        }
    }
}

/// What to simulate; `Default` is the benchmark's setting at 1,000 nodes without churn.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSimConfig {
    /// Simulated home nodes (all of the World's; only those that can run the job count).
    pub nodes: usize,
    /// Seed of everything random: fleet, catalogue, departures and the placer.
    pub seed: u64,
    /// Share of the job's fleet that leaves for good at uniform times within the ideal span
    /// (0.2 = 20%); clamped to [0, 1].
    pub churn: f64,
    /// Whether stragglers get backup copies (MapReduce backup tasks, LATE's estimate).
    pub backup_tasks: bool,
    /// Segment tasks per simulated node (9: enough that every slot runs several tasks).
    pub tasks_per_node: f64,
    /// Mean segment sizes and work.
    pub segment: SegmentSpec,
    /// Silence after which a node is declared gone and its attempts lost (10 s).
    pub heartbeat_timeout_s: f64,
    /// Attempts per task, backups included, before the task is given up (4).
    pub max_attempts: u32,
    /// Share of tasks done before backups start (0.75).
    pub backup_after: f64,
    /// Most backups running at once, as a share of the fleet's slots (0.1, LATE's cap).
    pub backup_cap: f64,
}

impl Default for JobSimConfig {
    fn default() -> Self {
        JobSimConfig {
            nodes: 1000,
            seed: 1,
            churn: 0.0,
            backup_tasks: true,
            tasks_per_node: 9.0,
            segment: SegmentSpec::default(),
            heartbeat_timeout_s: 10.0,
            max_attempts: 4,
            backup_after: 0.75,
            backup_cap: 0.1,
        }
    }
}

/// The figures of one simulated job (the benchmark's JSON); times are simulated seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct JobSimReport {
    /// Simulated nodes.
    pub nodes: usize,
    /// Nodes that could run the job at the start (container runtime, x86-64 or ARM64,
    /// ready, reputation floor, at least one free core and 1 GiB).
    pub fleet_nodes: usize,
    /// Task slots of those nodes (one per free core, memory and disk permitting).
    pub fleet_slots: u64,
    /// Their capacity in reference cores: sum of speed x slots.
    pub fleet_capacity_ref_cores: f64,
    /// Slots the scheduler fills: fewer than `fleet_slots` where a slow link could not feed
    /// them all.
    pub fleet_job_slots: u64,
    /// 10th, 50th and 90th percentile of the fleet's CPU speeds (reference core = 1).
    pub speed_p10_p50_p90: [f64; 3],
    /// Videos in the catalogue.
    pub videos: usize,
    /// Segment tasks.
    pub tasks: usize,
    /// Mean input, output and reference CPU-seconds per segment.
    pub segment: SegmentSpec,
    /// Churn asked for.
    pub churn: f64,
    /// Nodes that left during the job.
    pub departed_nodes: usize,
    /// Whether backup tasks were on.
    pub backup_tasks: bool,
    /// Tasks that finished.
    pub tasks_completed: usize,
    /// Tasks given up after `max_attempts` (0 in a healthy run).
    pub tasks_failed: usize,
    /// Results that arrived for a task already done (must be 0: the loser is cancelled).
    pub duplicate_results: u64,
    /// Attempts started, backups included.
    pub attempts: u64,
    /// Attempts lost with a departed node.
    pub attempts_lost: u64,
    /// Backup attempts started.
    pub backups: u64,
    /// Tasks whose backup finished first.
    pub backups_won: u64,
    /// Placement calls (waves), and those refused because fewer nodes were free.
    pub placement_waves: u64,
    /// Waves refused (all-or-nothing), then retried at the size found.
    pub placement_refusals: u64,
    /// Total work in reference CPU-seconds.
    pub total_work_ref_s: f64,
    /// Median transfer time of one task over the fleet's links (slot-weighted).
    pub median_transfer_s: f64,
    /// Ideal completion: total work / fleet capacity + the median transfer.
    pub ideal_s: f64,
    /// For comparison only: the ideal if each node's capacity were capped by what its links
    /// carry (a slow uplink can ship fewer outputs than its cores transcode).
    pub link_bound_ideal_s: f64,
    /// When the last task finished (or the simulation gave up).
    pub completion_s: f64,
    /// `completion_s / ideal_s`.
    pub ratio: f64,
    /// When 90% of the tasks were done.
    pub t90_s: f64,
    /// `completion_s - t90_s`: the tail backups are meant to cut.
    pub tail_s: f64,
    /// Median duration of the attempts that won.
    pub median_attempt_s: f64,
}

/// Simulates one job; deterministic for a given config. A fleet that cannot run the job at
/// all (too few nodes) yields a report with no tasks completed and `ratio` NaN.
pub fn simulate(cfg: &JobSimConfig) -> JobSimReport {
    let fleet = fleet::Fleet::generate(cfg);
    engine::run(cfg, fleet)
}

/// The three benchmark figures at one fleet size, and the runs behind them.
#[derive(Clone, Debug, Serialize)]
pub struct TranscodeSimFigures {
    /// Simulated nodes.
    pub nodes: usize,
    /// Completion / ideal with backups and no churn.
    pub sim_completion_ratio_no_churn: f64,
    /// Completion / ideal with backups while 20% of the fleet leaves (target <= 1.2).
    pub sim_completion_ratio_20pct_churn: f64,
    /// `1 - tail with backups / tail without`, both under 20% churn (target >= 0.3).
    pub sim_backup_task_gain: f64,
    /// The same gain without churn (stragglers are then only slow nodes).
    pub sim_backup_task_gain_no_churn: f64,
    /// The four runs: no churn with and without backups, 20% churn with and without.
    pub runs: Vec<JobSimReport>,
}

/// Runs the benchmark's four jobs per fleet size (no churn and 20% churn, each with and
/// without backups) on the same fleet and catalogue, and derives the figures.
pub fn transcode_sim_summary(nodes: &[usize], seed: u64) -> Vec<TranscodeSimFigures> {
    nodes
        .iter()
        .map(|&n| {
            let run = |churn, backup_tasks| {
                simulate(&JobSimConfig {
                    nodes: n,
                    seed,
                    churn,
                    backup_tasks,
                    ..JobSimConfig::default()
                })
            };
            let calm = run(0.0, true);
            let calm_plain = run(0.0, false);
            let churn = run(0.2, true);
            let churn_plain = run(0.2, false);
            let gain = |with: &JobSimReport, without: &JobSimReport| {
                if without.tail_s > 0.0 {
                    1.0 - with.tail_s / without.tail_s
                } else {
                    0.0
                }
            };
            TranscodeSimFigures {
                nodes: n,
                sim_completion_ratio_no_churn: calm.ratio,
                sim_completion_ratio_20pct_churn: churn.ratio,
                sim_backup_task_gain: gain(&churn, &churn_plain),
                sim_backup_task_gain_no_churn: gain(&calm, &calm_plain),
                runs: vec![calm, calm_plain, churn, churn_plain],
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(churn: f64, backup_tasks: bool) -> JobSimReport {
        simulate(&JobSimConfig {
            nodes: 500,
            seed: 7,
            churn,
            backup_tasks,
            ..JobSimConfig::default()
        })
    }

    #[test]
    fn every_task_completes_once_and_the_ratio_is_sane() {
        for (churn, backups) in [(0.0, true), (0.2, false), (0.2, true)] {
            let r = small(churn, backups);
            assert!(r.tasks >= 4000, "{r:?}");
            assert_eq!(r.tasks_completed, r.tasks, "{r:?}");
            assert_eq!(r.tasks_failed, 0);
            assert_eq!(r.duplicate_results, 0, "a task completed twice");
            assert!(r.ratio.is_finite() && r.ratio >= 1.0, "{r:?}");
            assert!(r.t90_s <= r.completion_s && r.tail_s >= 0.0);
            assert!(r.attempts >= r.tasks as u64);
            if churn > 0.0 {
                assert!(r.departed_nodes > 0 && r.attempts_lost > 0, "{r:?}");
            }
            if !backups {
                assert_eq!(r.backups, 0);
            }
        }
    }

    #[test]
    fn backups_do_not_lengthen_the_tail() {
        let (with, without) = (small(0.2, true), small(0.2, false));
        assert!(with.backups > 0, "{with:?}");
        assert!(
            with.tail_s <= without.tail_s,
            "tail with backups {} > without {}",
            with.tail_s,
            without.tail_s
        );
        // Same fleet, catalogue and departures in both runs: only the rules differ.
        assert_eq!(with.ideal_s, without.ideal_s);
        assert_eq!(with.departed_nodes, without.departed_nodes);
    }

    #[test]
    fn same_seed_same_report() {
        assert_eq!(small(0.2, true), small(0.2, true));
    }

    #[test]
    fn a_fleet_too_small_reports_instead_of_panicking() {
        let r = simulate(&JobSimConfig {
            nodes: 1,
            ..JobSimConfig::default()
        });
        assert!(r.tasks_completed <= r.tasks);
    }

    /// Prints the figures at `JOBSIM_NODES` nodes (default 1,000):
    /// `cargo nextest run -p stellar-load --run-ignored only --no-capture -E 'test(figures)'`.
    #[test]
    #[ignore]
    fn print_figures() {
        let nodes = std::env::var("JOBSIM_NODES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        #[allow(clippy::disallowed_methods)] // the test's own stopwatch
        let started = std::time::Instant::now();
        let figures = transcode_sim_summary(&[nodes], 1);
        eprintln!(
            "{}\nfour runs at {nodes} nodes took {:?}",
            serde_json::to_string_pretty(&figures).unwrap_or_default(),
            started.elapsed()
        );
    }

    /// Times the 100,000-node job: `cargo test --release -p stellar-load jobsim -- --ignored`.
    #[test]
    #[ignore]
    fn hundred_thousand_nodes_in_tens_of_seconds() {
        #[allow(clippy::disallowed_methods)] // the test's own stopwatch
        let started = std::time::Instant::now();
        let figures = transcode_sim_summary(&[100_000], 1);
        let took = started.elapsed();
        eprintln!(
            "{}",
            serde_json::to_string_pretty(&figures).unwrap_or_default()
        );
        eprintln!("four runs at 100,000 nodes took {took:?}");
        assert!(figures[0].runs.iter().all(|r| r.tasks_completed == r.tasks));
    }
}
