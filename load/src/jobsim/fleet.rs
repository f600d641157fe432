//! The job's world: the simulated fleet (World nodes plus a CPU speed each), the catalogue
//! cut into segment tasks, the departures, and the ideal completion the job is measured by.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use stellar_placement::{Arch, NodeState, Runtime};

use super::JobSimConfig;
use crate::world::{CITIES, Truth, World, WorldConfig};

/// Free resources one transcoding task takes: one core (ffmpeg `-threads 1`, so a box's
/// cores are its slots), 1 GiB and 2 GiB of scratch disk.
pub(super) const TASK_CPU_MILLIS: u32 = 1000;
/// Memory per task, MiB.
pub(super) const TASK_MEMORY_MIB: u32 = 1024;
/// Scratch disk per task, MiB.
pub(super) const TASK_DISK_MIB: u32 = 2048;
/// Label that marks a node as fast enough to take backup copies.
pub(super) const PERF_LABEL: (&str, &str) = ("perf", "fast");

/// One simulated node as the job sees it (index = its slot in the table).
#[derive(Clone, Debug)]
pub(super) struct Node {
    /// Relative CPU speed (reference core = 1).
    pub speed: f64,
    /// Link speeds, kbit/s.
    pub downlink_kbps: u32,
    /// Uplink, kbit/s.
    pub uplink_kbps: u32,
    /// Round trip to the segment store, seconds.
    pub rtt_s: f64,
    /// Task slots at the start by CPU (free cores, memory and disk permitting); 0 for nodes
    /// that cannot run the job. The ideal counts these.
    pub slots: u32,
    /// Slots the scheduler fills: `slots`, but no more tasks than the node's links can feed
    /// (a DSL uplink uploading one output at a time holds the others' slots idle).
    pub job_slots: u32,
    /// When the node leaves for good (`INFINITY` if it stays).
    pub leaves_at: f64,
}

impl Node {
    /// Seconds to fetch `bytes` from the store: one round trip, then the downlink.
    pub fn download_s(&self, bytes: u64) -> f64 {
        self.rtt_s + link_s(bytes, self.downlink_kbps)
    }

    /// Seconds to send `bytes` to the store over the uplink.
    pub fn upload_s(&self, bytes: u64) -> f64 {
        link_s(bytes, self.uplink_kbps)
    }
}

fn link_s(bytes: u64, kbps: u32) -> f64 {
    if kbps == 0 {
        f64::INFINITY
    } else {
        bytes as f64 * 8.0 / (f64::from(kbps) * 1000.0)
    }
}

/// One segment task's own size and work (segments differ with scene complexity).
#[derive(Clone, Copy, Debug)]
pub(super) struct Segment {
    /// Input bytes.
    pub bytes_in: u64,
    /// Output bytes.
    pub bytes_out: u64,
    /// Reference CPU-seconds.
    pub work_ref_s: f64,
}

/// Everything the engine starts from.
pub(super) struct Fleet {
    /// The World's nodes, in join order; the engine labels and joins them.
    pub world: World,
    /// Per node, same order.
    pub nodes: Vec<Node>,
    /// The segment tasks.
    pub segments: Vec<Segment>,
    /// Videos the segments came from.
    pub videos: usize,
    /// Sum of speed x slots over the fleet.
    pub capacity_ref_cores: f64,
    /// Median (slot-weighted) transfer time of a mean segment.
    pub median_transfer_s: f64,
    /// Speeds of the fleet at the 10th, 50th and 90th percentile.
    pub speed_percentiles: [f64; 3],
    /// Nodes whose expected task time is at most the fleet's median: the backup targets.
    pub fast: Vec<bool>,
}

/// Standard normal by Box-Muller.
fn gauss(rng: &mut Pcg64Mcg) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// CPU speed of one box relative to the reference core, for an x264 transcode: a median per
/// architecture (a Cortex-A7 set-top box ~0.12, Cortex-A53/A55 set-top boxes and NAS ~0.3,
/// an old PC's core ~0.7) times a lognormal spread (sigma 0.45: clock, generation and
/// thermal throttling), so the fleet has a long tail of slow boxes and a few fast PCs.
fn speed(arch: Arch, rng: &mut Pcg64Mcg) -> f64 {
    let median = match arch {
        Arch::Armv7 => 0.12,
        Arch::Aarch64 => 0.3,
        Arch::X86_64 => 0.7,
    };
    (median * (0.45 * gauss(rng)).exp()).clamp(0.03, 3.0)
}

/// Where the segment store is: a data centre in Shanghai (the job's store; its RTT is a
/// small part of a download, so one site is enough).
fn store() -> Truth {
    let shanghai = CITIES
        .iter()
        .position(|c| c.name == "shanghai")
        .unwrap_or(0);
    let c = &CITIES[shanghai];
    let lat0 = 33f64.to_radians();
    Truth {
        x_km: (6371.0 * c.lon.to_radians() * lat0.cos()) as f32,
        y_km: (6371.0 * c.lat.to_radians()) as f32,
        access_ms: 0.5,
        city: shanghai as u16,
    }
}

impl Fleet {
    /// Generates the World, speeds, slots, catalogue and departures for `cfg`.
    pub fn generate(cfg: &JobSimConfig) -> Fleet {
        let world = World::generate(&WorldConfig {
            nodes: cfg.nodes,
            clients: 1,
            warmup_rounds: 8,
            seed: cfg.seed,
        });
        let mut rng = Pcg64Mcg::seed_from_u64(cfg.seed ^ 0x7A5C_0DE5);
        let store = store();
        let mut nodes: Vec<Node> = world
            .specs
            .iter()
            .zip(&world.truth)
            .map(|(spec, truth)| {
                let speed = speed(spec.arch, &mut rng);
                let runs_job = spec.runtimes.contains(Runtime::Container)
                    && spec.arch != Arch::Armv7
                    && spec.state == NodeState::Ready
                    && spec.reputation >= 0.5;
                let slots = if runs_job {
                    (spec.free.cpu_millis / TASK_CPU_MILLIS)
                        .min(spec.free.memory_mib / TASK_MEMORY_MIB)
                        .min(spec.free.disk_mib / TASK_DISK_MIB)
                } else {
                    0
                };
                let mut node = Node {
                    speed,
                    downlink_kbps: spec.bandwidth.downlink_kbps,
                    uplink_kbps: spec.bandwidth.uplink_kbps,
                    rtt_s: f64::from(truth.rtt_ms(&store)) / 1000.0,
                    slots,
                    job_slots: slots,
                    leaves_at: f64::INFINITY,
                };
                node.job_slots = link_slots(&node, cfg).min(slots);
                node
            })
            .collect();

        let (segments, videos) = catalogue(cfg, &mut rng);
        let seg = &cfg.segment;
        let capacity: f64 = nodes.iter().map(|n| n.speed * f64::from(n.slots)).sum();
        let mut transfers: Vec<(f64, u32)> = nodes
            .iter()
            .filter(|n| n.slots > 0)
            .map(|n| {
                (
                    n.download_s(seg.bytes_in) + n.upload_s(seg.bytes_out),
                    n.slots,
                )
            })
            .collect();
        let median_transfer_s = weighted_median(&mut transfers);
        let mut task_times: Vec<(f64, u32)> = nodes
            .iter()
            .filter(|n| n.slots > 0)
            .map(|n| (expected_task_s(n, cfg), n.slots))
            .collect();
        let median_task_s = weighted_median(&mut task_times);
        let fast = nodes
            .iter()
            .map(|n| n.slots > 0 && expected_task_s(n, cfg) <= median_task_s)
            .collect();
        let mut speeds: Vec<(f64, u32)> = nodes
            .iter()
            .filter(|n| n.slots > 0)
            .map(|n| (n.speed, 1))
            .collect();
        speeds.sort_by(|a, b| a.0.total_cmp(&b.0));
        let pct = |q: f64| {
            speeds
                .get(((speeds.len() as f64 - 1.0) * q).round() as usize)
                .map_or(f64::NAN, |s| s.0)
        };
        let speed_percentiles = [pct(0.1), pct(0.5), pct(0.9)];

        // Departures: `churn` of the job's fleet, uniform over the ideal span.
        let total_work: f64 = segments.iter().map(|s| s.work_ref_s).sum();
        let ideal = if capacity > 0.0 {
            total_work / capacity + median_transfer_s
        } else {
            0.0
        };
        let mut members: Vec<usize> = (0..nodes.len()).filter(|i| nodes[*i].slots > 0).collect();
        let leaving = (cfg.churn.clamp(0.0, 1.0) * members.len() as f64).round() as usize;
        let mut churn_rng = Pcg64Mcg::seed_from_u64(cfg.seed ^ 0xC4_0A11);
        for k in 0..leaving {
            let j = churn_rng.random_range(k..members.len());
            members.swap(k, j);
            nodes[members[k]].leaves_at = churn_rng.random::<f64>() * ideal;
        }
        Fleet {
            world,
            nodes,
            segments,
            videos,
            capacity_ref_cores: capacity,
            median_transfer_s,
            speed_percentiles,
            fast,
        }
    }
}

/// Tasks a node's links can keep going: a slot cycles through download and transcode (the
/// upload runs in the background), so the uplink can serve `cycle / upload` slots and the
/// downlink `cycle / download`.
fn link_slots(n: &Node, cfg: &JobSimConfig) -> u32 {
    let s = &cfg.segment;
    let cycle = n.download_s(s.bytes_in) + s.work_ref_s / n.speed;
    let up = n.upload_s(s.bytes_out);
    let down = n.download_s(s.bytes_in) - n.rtt_s;
    let fits = |link_s: f64| {
        if link_s > 0.0 {
            (cycle / link_s).floor().max(1.0)
        } else {
            f64::from(u32::MAX)
        }
    };
    fits(up).min(fits(down)) as u32
}

/// What a node can deliver at most in reference cores: its CPU, or what its links carry.
pub(super) fn link_bound_capacity(n: &Node, cfg: &JobSimConfig) -> f64 {
    let s = &cfg.segment;
    let link_s = n
        .upload_s(s.bytes_out)
        .max(n.download_s(s.bytes_in) - n.rtt_s);
    let by_link = if link_s > 0.0 {
        s.work_ref_s / link_s
    } else {
        f64::INFINITY
    };
    (n.speed * f64::from(n.slots)).min(by_link)
}

/// A node's time for a mean segment: download, transcode, upload.
fn expected_task_s(n: &Node, cfg: &JobSimConfig) -> f64 {
    let s = &cfg.segment;
    n.download_s(s.bytes_in) + s.work_ref_s / n.speed + n.upload_s(s.bytes_out)
}

/// The value below which half the weight lies.
fn weighted_median(items: &mut [(f64, u32)]) -> f64 {
    items.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = items.iter().map(|i| u64::from(i.1)).sum();
    let mut acc = 0;
    for (v, w) in items.iter() {
        acc += u64::from(*w);
        if acc * 2 >= total {
            return *v;
        }
    }
    f64::NAN
}

/// Videos of 2 to 90 minutes (log-uniform: many clips, some films), each with a complexity
/// (cartoons cheap, sport dear: lognormal sigma 0.25) and per-segment noise (sigma 0.15), cut
/// into 4 s segments until there are `tasks_per_node` x nodes of them.
fn catalogue(cfg: &JobSimConfig, rng: &mut Pcg64Mcg) -> (Vec<Segment>, usize) {
    let want = (cfg.tasks_per_node.max(0.0) * cfg.nodes as f64).ceil() as usize;
    let seg = &cfg.segment;
    // E[exp(sigma * N)] = exp(sigma^2 / 2): divide it out so the means are the spec's.
    let norm = |sigma: f64| (-(sigma * sigma) / 2.0).exp();
    let mut out = Vec::with_capacity(want);
    let mut videos = 0;
    while out.len() < want {
        videos += 1;
        let minutes = (2f64.ln() + rng.random::<f64>() * (45f64).ln()).exp();
        let segments = ((minutes * 60.0 / 4.0).ceil() as usize).min(want - out.len());
        let complexity = (0.25 * gauss(rng)).exp() * norm(0.25);
        let bitrate = rng.random_range(0.8..1.2);
        for _ in 0..segments {
            let noise = (0.15 * gauss(rng)).exp() * norm(0.15);
            out.push(Segment {
                bytes_in: (seg.bytes_in as f64 * bitrate * noise) as u64,
                bytes_out: (seg.bytes_out as f64 * bitrate * noise) as u64,
                work_ref_s: seg.work_ref_s * complexity * noise,
            });
        }
    }
    (out, videos)
}
