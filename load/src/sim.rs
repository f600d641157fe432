//! `stellar-load sim`: the same nodes and the same requests through every algorithm.
//!
//! ```text
//!  World::generate (nodes, callers, Vivaldi warm-up)      workload::generate (requests)
//!        |                                                       |
//!   NodeTable (bytes counted) --clone per algorithm--> replay requests in order
//!        |                                               |  releases after a window W
//!        |                                               |  sampled requests: oracle scan
//!        v                                               v
//!   report: placements/s, decision p50/p99, score ratio, RTT vs optimal, utilisation
//! ```
//!
//! Algorithms that scan the table (`exhaustive`, `kube-adaptive`) decide only the sampled
//! requests when the full stream would cost more than `FULL_REPLAY_NODE_VISITS`; the others
//! are placed by StellarCloud's placer off the clock, so the cluster is as busy as in a full
//! replay. The report says so in `requests_run` and `sampled`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;
use stellar_placement::{NodeId, NodeTable, Placer, PlacerConfig, Resources, Slot};

use crate::alloc;
use crate::baselines::{Algorithm, Baseline, Rule, Stellar};
use crate::workload::{self, RequestClass, SimRequest};
use crate::world::{World, WorldConfig};

/// Node visits above which the scanning baselines replay only the sampled requests.
pub const FULL_REPLAY_NODE_VISITS: u64 = 2_000_000_000;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of home nodes.
    pub nodes: usize,
    /// Number of placement requests.
    pub requests: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// Single-replica requests on which score ratio and RTT are measured.
    pub score_sample: usize,
    /// Number of callers.
    pub clients: usize,
    /// Vivaldi warm-up rounds.
    pub warmup_rounds: usize,
    /// Algorithms to run, by name.
    pub algorithms: Vec<String>,
    /// Placer configuration for `stellar` (the baselines share its weights).
    pub placer: PlacerConfig,
}

/// Every algorithm name the simulator knows, ours first.
pub const ALGORITHMS: [&str; 5] = [
    "stellar",
    "exhaustive",
    "kube-adaptive",
    "nomad-log2",
    "random",
];

/// Figures for one algorithm.
#[derive(Clone, Debug, Serialize)]
pub struct AlgorithmReport {
    /// Algorithm name.
    pub name: String,
    /// Replicas and tasks placed per second of decision time.
    pub placements_per_sec: f64,
    /// Median decision (one request) time.
    pub decision_p50_us: f64,
    /// 99th percentile decision time.
    pub decision_p99_us: f64,
    /// Mean of chosen score / best feasible score over the score sample.
    pub score_ratio: f64,
    /// Mean ground-truth RTT from caller to chosen node over the score sample.
    pub mean_rtt_ms: f64,
    /// Mean lowest ground-truth RTT among feasible nodes over the same requests.
    pub optimal_rtt_ms: f64,
    /// Highest share of any node's CPU or memory in use at the end (owner's use included).
    pub max_node_utilisation: f64,
    /// Requests refused.
    pub failed: u64,
    /// Requests replayed (all, or the score sample for scanning baselines on large runs).
    pub requests_run: usize,
    /// Whether only the score sample was replayed.
    pub sampled: bool,
    /// Placements per second counting single-replica function requests only.
    pub single_placements_per_sec: f64,
    /// Median decision time of single-replica function requests.
    pub single_decision_p50_us: f64,
    /// 99th percentile decision time of single-replica function requests.
    pub single_decision_p99_us: f64,
}

/// The whole simulation's figures (the `--json` object).
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    /// Number of nodes.
    pub nodes: usize,
    /// Number of requests in the stream.
    pub requests: usize,
    /// Seed.
    pub seed: u64,
    /// Heap bytes of the node table per node, indexes and slack included.
    pub bytes_per_node: f64,
    /// Median relative error of Vivaldi RTT estimates over random node pairs.
    pub vivaldi_median_rel_error: f64,
    /// The same over pairs in one city.
    pub vivaldi_median_rel_error_same_city: f64,
    /// Number of requests in the score sample.
    pub score_sample: usize,
    /// Requests alive at once (older placements are released).
    pub live_window: usize,
    /// One entry per algorithm.
    pub algorithms: Vec<AlgorithmReport>,
}

/// A refusal to run: an unknown algorithm name or an empty simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The algorithm name is not one of [`ALGORITHMS`].
    #[error(
        "unknown algorithm `{0}`; known: stellar, exhaustive, kube-adaptive, nomad-log2, random"
    )]
    UnknownAlgorithm(String),
    /// Zero nodes, requests or callers.
    #[error("--nodes, --requests and --clients must all be at least 1")]
    Empty,
    /// A generated node was refused by the table (a generator bug).
    #[error("node table refused a generated node: {0}")]
    Table(#[from] stellar_placement::TableError),
    /// The placer configuration (weights, scale, limits) is invalid.
    #[error("invalid placer configuration: {0}")]
    Config(#[from] stellar_placement::ConfigError),
}

fn make_algorithm(name: &str, cfg: &SimConfig) -> Result<Box<dyn Algorithm>, SimError> {
    let seed = cfg.seed ^ 0xA160;
    Ok(match name {
        "stellar" => Box::new(Stellar(Placer::new(cfg.placer, seed)?)),
        "exhaustive" => Box::new(Baseline::new(Rule::Exhaustive, cfg.placer, seed)?),
        "kube-adaptive" => Box::new(Baseline::new(Rule::KubeAdaptive, cfg.placer, seed)?),
        "nomad-log2" => Box::new(Baseline::new(Rule::NomadLog2, cfg.placer, seed)?),
        "random" => Box::new(Baseline::new(Rule::Random, cfg.placer, seed)?),
        other => return Err(SimError::UnknownAlgorithm(other.to_owned())),
    })
}

/// Runs the simulation; progress goes to stderr through `log`.
pub fn run(cfg: &SimConfig, log: &mut dyn FnMut(&str)) -> Result<SimReport, SimError> {
    if cfg.nodes == 0 || cfg.requests == 0 || cfg.clients == 0 {
        return Err(SimError::Empty);
    }
    let mut algorithms = Vec::new();
    for name in &cfg.algorithms {
        algorithms.push(make_algorithm(name, cfg)?);
    }

    log(&format!(
        "generating {} nodes and {} callers, {} Vivaldi rounds",
        cfg.nodes, cfg.clients, cfg.warmup_rounds
    ));
    let world = World::generate(&WorldConfig {
        nodes: cfg.nodes,
        clients: cfg.clients,
        warmup_rounds: cfg.warmup_rounds,
        seed: cfg.seed,
    });
    log(&format!(
        "vivaldi median relative error {:.3} (same city {:.3})",
        world.vivaldi_median_rel_error, world.vivaldi_median_rel_error_same_city
    ));

    let before = alloc::live_bytes();
    let mut table = NodeTable::new();
    for spec in &world.specs {
        table.join(spec.clone())?;
    }
    table.refresh_zone_order();
    let bytes_per_node = alloc::live_bytes().saturating_sub(before) as f64 / cfg.nodes as f64;
    log(&format!(
        "table: {} nodes, {} zones, {} classes, {bytes_per_node:.0} bytes/node",
        table.len(),
        table.zone_count(),
        table.class_count()
    ));

    let requests = workload::generate(&world, cfg.requests, cfg.seed);
    let singles: Vec<usize> = (0..requests.len())
        .filter(|i| requests[*i].class == RequestClass::SingleFunction)
        .collect();
    let stride = (singles.len() / cfg.score_sample.max(1)).max(1);
    let sample: Vec<usize> = singles
        .iter()
        .step_by(stride)
        .take(cfg.score_sample)
        .copied()
        .collect();
    let mut in_sample = vec![false; requests.len()];
    for i in &sample {
        in_sample[*i] = true;
    }
    let window = live_window(&table, &requests);
    log(&format!(
        "{} requests, score sample {}, {} alive at once",
        requests.len(),
        sample.len(),
        window
    ));

    let mut reports = Vec::new();
    for mut algorithm in algorithms {
        let scans = matches!(algorithm.name(), "exhaustive" | "kube-adaptive");
        let full = !scans
            || (cfg.nodes as u64).saturating_mul(cfg.requests as u64) <= FULL_REPLAY_NODE_VISITS;
        log(&format!(
            "running {} on {} requests{}",
            algorithm.name(),
            if full { requests.len() } else { sample.len() },
            if full {
                ""
            } else {
                " (stellar places the others, off the clock, as load)"
            }
        ));
        let replay = Replay {
            world: &world,
            requests: &requests,
            in_sample: &in_sample,
            window,
            resolver: Placer::new(cfg.placer, 0)?,
            filler: if full {
                None
            } else {
                Some(Placer::new(cfg.placer, cfg.seed ^ 0xF111)?)
            },
        };
        let mut report = replay.run(algorithm.as_mut(), table.clone());
        report.sampled = !full;
        if let Some(line) = algorithm.summary() {
            log(&format!("{}: {line}", algorithm.name()));
        }
        reports.push(report);
    }
    Ok(SimReport {
        nodes: cfg.nodes,
        requests: cfg.requests,
        seed: cfg.seed,
        bytes_per_node,
        vivaldi_median_rel_error: world.vivaldi_median_rel_error,
        vivaldi_median_rel_error_same_city: world.vivaldi_median_rel_error_same_city,
        score_sample: sample.len(),
        live_window: window,
        algorithms: reports,
    })
}

/// Requests alive at once so that live demand is a quarter of the free CPU of ready nodes.
fn live_window(table: &NodeTable, requests: &[SimRequest]) -> usize {
    let free_cpu: f64 = (0..table.slot_bound())
        .filter_map(|s| table.node(Slot(s)))
        .map(|v| f64::from(v.free.cpu_millis) / 1000.0)
        .sum();
    let demand: f64 = requests
        .iter()
        .map(|r| r.request.cpu_cores * f64::from(r.request.count))
        .sum::<f64>()
        / requests.len() as f64;
    ((0.25 * free_cpu / demand.max(1e-9)) as usize).max(1)
}

struct Replay<'a> {
    world: &'a World,
    requests: &'a [SimRequest],
    in_sample: &'a [bool],
    window: usize,
    resolver: Placer,
    /// In a sampled replay, places the requests outside the sample (untimed), so the
    /// algorithm decides the sampled ones on a cluster as busy as in a full replay.
    filler: Option<Placer>,
}

#[derive(Default)]
struct Tally {
    times: Vec<Duration>,
    single_times: Vec<Duration>,
    placements: u64,
    single_placements: u64,
    failed: u64,
    ratio_sum: f64,
    rtt_sum: f64,
    optimal_sum: f64,
    measured: u64,
}

impl Replay<'_> {
    fn run(mut self, algorithm: &mut dyn Algorithm, mut table: NodeTable) -> AlgorithmReport {
        let mut t = Tally::default();
        let mut run = 0;
        let mut feasible = Vec::new();
        let mut live: VecDeque<(usize, Vec<NodeId>, Resources)> = VecDeque::new();
        for i in 0..self.requests.len() {
            while live.front().is_some_and(|(j, _, _)| j + self.window <= i) {
                if let Some((_, nodes, ask)) = live.pop_front() {
                    for n in nodes {
                        let _ = table.release(n, &ask);
                    }
                }
            }
            let sim = &self.requests[i];
            let ask = self
                .resolver
                .resolve(&table, &sim.request)
                .map(|r| r.ask())
                .unwrap_or_default();
            if let Some(filler) = self.filler.as_mut().filter(|_| !self.in_sample[i]) {
                if let Ok(out) = filler.place(&mut table, &sim.request) {
                    live.push_back((i, out.iter().map(|p| p.node).collect(), ask));
                }
                continue;
            }
            run += 1;
            let oracle = self.in_sample[i].then(|| self.oracle(&table, sim, &mut feasible));
            #[allow(clippy::disallowed_methods)] // the benchmark's own timer
            let started = Instant::now();
            let result = algorithm.place(&mut table, &sim.request);
            let took = started.elapsed();
            t.times.push(took);
            let single = sim.class == RequestClass::SingleFunction;
            if single {
                t.single_times.push(took);
            }
            match result {
                Ok(out) => {
                    t.placements += out.len() as u64;
                    if single {
                        t.single_placements += out.len() as u64;
                    }
                    if let (Some(Some((best, optimal))), Some(p)) = (oracle, out.first()) {
                        // Score the chosen node on the state it was chosen on.
                        let _ = table.release(p.node, &ask);
                        let chosen = self
                            .resolver
                            .resolve(&table, &sim.request)
                            .ok()
                            .and_then(|r| r.score(&table, p.slot))
                            .map_or(0.0, |s| f64::from(s.total));
                        let _ = table.reserve(p.node, &ask);
                        t.ratio_sum += if best > 0.0 { chosen / best } else { 1.0 };
                        t.rtt_sum += f64::from(self.rtt(sim, p.slot));
                        t.optimal_sum += optimal;
                        t.measured += 1;
                    }
                    live.push_back((i, out.iter().map(|p| p.node).collect(), ask));
                }
                Err(_) => t.failed += 1,
            }
        }
        let m = t.measured.max(1) as f64;
        AlgorithmReport {
            name: algorithm.name().to_owned(),
            placements_per_sec: per_sec(t.placements, &t.times),
            decision_p50_us: percentile_us(&mut t.times, 0.50),
            decision_p99_us: percentile_us(&mut t.times, 0.99),
            score_ratio: t.ratio_sum / m,
            mean_rtt_ms: t.rtt_sum / m,
            optimal_rtt_ms: t.optimal_sum / m,
            max_node_utilisation: max_utilisation(&table),
            failed: t.failed,
            requests_run: run,
            sampled: false,
            single_placements_per_sec: per_sec(t.single_placements, &t.single_times),
            single_decision_p50_us: percentile_us(&mut t.single_times, 0.50),
            single_decision_p99_us: percentile_us(&mut t.single_times, 0.99),
        }
    }

    fn rtt(&self, sim: &SimRequest, slot: Slot) -> f32 {
        // Nodes joined in generation order and never left, so slot i is node i.
        let client = &self.world.clients[sim.client as usize].truth;
        client.rtt_ms(&self.world.truth[slot.0 as usize])
    }

    /// Best shared score and lowest true RTT over all feasible nodes, by a full scan.
    ///
    /// Two sequential passes: the table's records in storage order mark feasible slots in a
    /// bit set (small enough for L2), then the ground truth is read in slot order. Reading
    /// the truth in storage order instead would miss the cache once per node.
    fn oracle(
        &self,
        table: &NodeTable,
        sim: &SimRequest,
        feasible: &mut Vec<u64>,
    ) -> Option<(f64, f64)> {
        let rr = self.resolver.resolve(table, &sim.request).ok()?;
        feasible.clear();
        feasible.resize((table.slot_bound() as usize).div_ceil(64), 0);
        let mut best_score: Option<f64> = None;
        rr.for_each_feasible(table, |slot, score| {
            feasible[slot.0 as usize / 64] |= 1 << (slot.0 % 64);
            let score = f64::from(score.total);
            best_score = Some(best_score.map_or(score, |b| b.max(score)));
        });
        let mut best_rtt = f64::INFINITY;
        for (word_index, word) in feasible.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let slot = word_index as u32 * 64 + bits.trailing_zeros();
                bits &= bits - 1;
                best_rtt = best_rtt.min(f64::from(self.rtt(sim, Slot(slot))));
            }
        }
        best_score.map(|s| (s, best_rtt))
    }
}

fn per_sec(placements: u64, times: &[Duration]) -> f64 {
    let total: f64 = times.iter().map(Duration::as_secs_f64).sum();
    if total > 0.0 {
        placements as f64 / total
    } else {
        0.0
    }
}

fn percentile_us(times: &mut [Duration], q: f64) -> f64 {
    if times.is_empty() {
        return 0.0;
    }
    times.sort_unstable();
    let idx = ((times.len() as f64 - 1.0) * q).round() as usize;
    times[idx].as_secs_f64() * 1e6
}

fn max_utilisation(table: &NodeTable) -> f64 {
    (0..table.slot_bound())
        .filter_map(|s| table.node(Slot(s)))
        .map(|v| {
            let used = |free: u32, cap: u32| {
                if cap == 0 {
                    0.0
                } else {
                    1.0 - f64::from(free) / f64::from(cap)
                }
            };
            used(v.free.cpu_millis, v.capacity.cpu_millis)
                .max(used(v.free.memory_mib, v.capacity.memory_mib))
        })
        .fold(0.0, f64::max)
}

/// Formats the report as a table for people.
pub fn render_table(r: &SimReport) -> String {
    let mut s = format!(
        "nodes {}  requests {}  seed {}  bytes/node {:.0}  vivaldi median rel. error {:.3} (same city {:.3})\n\
         score sample {} single-replica requests; {} requests alive at once\n\n",
        r.nodes,
        r.requests,
        r.seed,
        r.bytes_per_node,
        r.vivaldi_median_rel_error,
        r.vivaldi_median_rel_error_same_city,
        r.score_sample,
        r.live_window
    );
    s.push_str(&format!(
        "{:<14} {:>12} {:>12} {:>9} {:>9} {:>7} {:>8} {:>8} {:>6} {:>7} {:>10}\n",
        "algorithm",
        "placements/s",
        "single pl/s",
        "p50 µs",
        "p99 µs",
        "score",
        "rtt ms",
        "opt ms",
        "util",
        "failed",
        "requests"
    ));
    for a in &r.algorithms {
        s.push_str(&format!(
            "{:<14} {:>12.0} {:>12.0} {:>9.1} {:>9.1} {:>7.3} {:>8.2} {:>8.2} {:>6.2} {:>7} {:>10}\n",
            a.name,
            a.placements_per_sec,
            a.single_placements_per_sec,
            a.decision_p50_us,
            a.decision_p99_us,
            a.score_ratio,
            a.mean_rtt_ms,
            a.optimal_rtt_ms,
            a.max_node_utilisation,
            a.failed,
            format!("{}{}", a.requests_run, if a.sampled { "*" } else { "" })
        ));
    }
    if r.algorithms.iter().any(|a| a.sampled) {
        s.push_str(
            "* decided only the score sample (a full replay would scan too many nodes); \
             stellar placed the other requests off the clock as load\n",
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(nodes: usize, requests: usize) -> SimConfig {
        SimConfig {
            nodes,
            requests,
            seed: 3,
            score_sample: 200,
            clients: 300,
            warmup_rounds: 20,
            algorithms: ALGORITHMS.iter().map(|s| s.to_string()).collect(),
            placer: PlacerConfig::default(),
        }
    }

    #[test]
    fn small_simulation_reports_every_algorithm() {
        let r = run(&config(3000, 1500), &mut |_| {}).unwrap();
        assert_eq!(r.algorithms.len(), 5);
        let by = |n: &str| r.algorithms.iter().find(|a| a.name == n).unwrap();
        let exhaustive = by("exhaustive");
        // The exhaustive baseline is the optimum of the shared score.
        assert!(
            (exhaustive.score_ratio - 1.0).abs() < 1e-6,
            "{}",
            exhaustive.score_ratio
        );
        for a in &r.algorithms {
            assert!(
                a.score_ratio > 0.0 && a.score_ratio <= 1.0 + 1e-6,
                "{}: {}",
                a.name,
                a.score_ratio
            );
            assert!(a.mean_rtt_ms >= a.optimal_rtt_ms - 1e-9, "{}", a.name);
            assert!(a.max_node_utilisation <= 1.0, "{} overcommitted", a.name);
            assert!(a.placements_per_sec > 0.0);
        }
        // Latency-aware placement beats a random choice by a wide margin.
        assert!(by("stellar").mean_rtt_ms < by("random").mean_rtt_ms * 0.7);
        assert!(r.bytes_per_node >= 0.0);
    }

    #[test]
    fn same_seed_same_report_figures() {
        let a = run(&config(500, 300), &mut |_| {}).unwrap();
        let b = run(&config(500, 300), &mut |_| {}).unwrap();
        for (x, y) in a.algorithms.iter().zip(&b.algorithms) {
            assert_eq!(x.failed, y.failed);
            assert_eq!(x.score_ratio, y.score_ratio);
            assert_eq!(x.mean_rtt_ms, y.mean_rtt_ms);
        }
    }

    #[test]
    fn bad_configuration_is_refused() {
        let mut c = config(10, 10);
        c.algorithms = vec!["fastest".into()];
        assert!(matches!(
            run(&c, &mut |_| {}),
            Err(SimError::UnknownAlgorithm(_))
        ));
        assert!(matches!(
            run(&config(0, 10), &mut |_| {}),
            Err(SimError::Empty)
        ));
    }
}
