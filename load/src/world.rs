//! A synthetic but realistic population of home nodes and callers, with a ground-truth
//! network that Vivaldi has to learn.
//!
//! Geography: 36 Chinese cities in 7 regions, weighted by urban population. Nodes and callers
//! sit around their city centre. The true RTT between two points is the fibre path between
//! them (great-circle-ish distance, 200 km/ms, 1.6x route inflation, 0.5 ms of switching) plus
//! the access-link delay of each end (fibre, cable, DSL or mobile), which is what Vivaldi's
//! height models.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use stellar_placement::{
    Arch, Bandwidth, Coordinate, NodeId, NodeSpec, NodeState, Resources, RuntimeSet, VivaldiConfig,
    VivaldiNode,
};

/// A city: one zone of the simulated network.
#[derive(Clone, Copy, Debug)]
pub struct City {
    /// Region the city belongs to.
    pub region: &'static str,
    /// Zone name.
    pub name: &'static str,
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
    /// Urban population in millions (weights nodes and callers).
    pub population_m: f64,
}

const fn city(
    region: &'static str,
    name: &'static str,
    lat: f64,
    lon: f64,
    population_m: f64,
) -> City {
    City {
        region,
        name,
        lat,
        lon,
        population_m,
    }
}

/// The simulated cities.
pub const CITIES: [City; 36] = [
    city("cn-north", "beijing", 39.90, 116.40, 21.9),
    city("cn-north", "tianjin", 39.13, 117.20, 13.9),
    city("cn-north", "shijiazhuang", 38.04, 114.51, 11.2),
    city("cn-north", "taiyuan", 37.87, 112.55, 5.3),
    city("cn-north", "hohhot", 40.84, 111.75, 3.4),
    city("cn-northeast", "shenyang", 41.80, 123.43, 9.1),
    city("cn-northeast", "dalian", 38.91, 121.61, 7.5),
    city("cn-northeast", "changchun", 43.82, 125.32, 9.1),
    city("cn-northeast", "harbin", 45.80, 126.53, 10.0),
    city("cn-east", "shanghai", 31.23, 121.47, 24.9),
    city("cn-east", "hangzhou", 30.27, 120.15, 12.2),
    city("cn-east", "nanjing", 32.06, 118.80, 9.3),
    city("cn-east", "suzhou", 31.30, 120.62, 12.7),
    city("cn-east", "hefei", 31.82, 117.23, 9.4),
    city("cn-east", "jinan", 36.65, 117.12, 9.2),
    city("cn-east", "qingdao", 36.07, 120.38, 10.1),
    city("cn-east", "fuzhou", 26.07, 119.30, 8.3),
    city("cn-east", "xiamen", 24.48, 118.09, 5.2),
    city("cn-south", "guangzhou", 23.13, 113.26, 18.7),
    city("cn-south", "shenzhen", 22.54, 114.06, 17.6),
    city("cn-south", "dongguan", 23.02, 113.75, 10.5),
    city("cn-south", "nanning", 22.82, 108.32, 8.7),
    city("cn-south", "haikou", 20.04, 110.20, 2.9),
    city("cn-central", "wuhan", 30.59, 114.31, 12.3),
    city("cn-central", "changsha", 28.23, 112.94, 10.0),
    city("cn-central", "zhengzhou", 34.75, 113.63, 12.6),
    city("cn-central", "nanchang", 28.68, 115.86, 6.3),
    city("cn-southwest", "chengdu", 30.57, 104.07, 20.9),
    city("cn-southwest", "chongqing", 29.56, 106.55, 32.1),
    city("cn-southwest", "kunming", 25.04, 102.71, 8.5),
    city("cn-southwest", "guiyang", 26.65, 106.63, 6.0),
    city("cn-northwest", "xian", 34.34, 108.94, 12.9),
    city("cn-northwest", "lanzhou", 36.06, 103.83, 4.4),
    city("cn-northwest", "urumqi", 43.83, 87.62, 4.1),
    city("cn-northwest", "yinchuan", 38.49, 106.23, 2.9),
    city("cn-northwest", "xining", 36.62, 101.78, 2.5),
];

/// Internet service providers; Chinese home networks are split between three.
pub const ISPS: [&str; 3] = ["telecom", "unicom", "mobile"];

/// Where a node or caller really is: planar position (km) and access delay (ms of RTT).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Truth {
    /// East-west position in km.
    pub x_km: f32,
    /// North-south position in km.
    pub y_km: f32,
    /// Round-trip delay the access link adds to every path.
    pub access_ms: f32,
    /// Index into [`CITIES`].
    pub city: u16,
}

impl Truth {
    /// Ground-truth round-trip time between two points.
    #[inline]
    pub fn rtt_ms(&self, other: &Truth) -> f32 {
        let dx = self.x_km - other.x_km;
        let dy = self.y_km - other.y_km;
        let km = (dx * dx + dy * dy).sqrt();
        0.5 + km * 1.6 / 100.0 + self.access_ms + other.access_ms
    }
}

/// A caller of functions: a ground-truth position and the coordinate the gateway learned.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    /// Where the caller really is.
    pub truth: Truth,
    /// The caller's Vivaldi coordinate after warm-up.
    pub coord: Coordinate,
    /// The caller's ISP (index into [`ISPS`]).
    pub isp: u8,
}

/// The generated population.
pub struct World {
    /// Node declarations, with warmed-up coordinates, in join order.
    pub specs: Vec<NodeSpec>,
    /// Ground truth per node, same order as `specs`.
    pub truth: Vec<Truth>,
    /// Callers, weighted by city population.
    pub clients: Vec<Client>,
    /// Median relative error of Vivaldi estimates over random node pairs.
    pub vivaldi_median_rel_error: f64,
    /// The same over random pairs inside one city.
    pub vivaldi_median_rel_error_same_city: f64,
}

/// Knobs of the generator.
#[derive(Clone, Copy, Debug)]
pub struct WorldConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Number of callers.
    pub clients: usize,
    /// Vivaldi warm-up rounds (one RTT sample per node per round).
    pub warmup_rounds: usize,
    /// Seed of every random choice.
    pub seed: u64,
}

/// Builds a [`CITIES`] sampler weighted by population.
fn city_weights() -> Vec<f64> {
    let total: f64 = CITIES.iter().map(|c| c.population_m).sum();
    let mut acc = 0.0;
    CITIES
        .iter()
        .map(|c| {
            acc += c.population_m / total;
            acc
        })
        .collect()
}

fn pick_city(cdf: &[f64], rng: &mut Pcg64Mcg) -> usize {
    let r: f64 = rng.random();
    cdf.iter().position(|c| r < *c).unwrap_or(cdf.len() - 1)
}

/// Equirectangular projection around 33°N: good enough at this scale, and fast.
fn project(lat: f64, lon: f64) -> (f64, f64) {
    const R_KM: f64 = 6371.0;
    let lat0 = 33f64.to_radians();
    (
        R_KM * lon.to_radians() * lat0.cos(),
        R_KM * lat.to_radians(),
    )
}

fn gauss(rng: &mut Pcg64Mcg) -> f64 {
    // Box-Muller; one value is enough here.
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A kind of home access link.
struct AccessKind {
    /// Share of homes on it.
    share: f64,
    /// Range of the round-trip delay it adds, in ms.
    delay_ms: (f32, f32),
    /// Range of its uplink, in Mbit/s.
    uplink_mbps: (f32, f32),
}

const fn kind(share: f64, delay_ms: (f32, f32), uplink_mbps: (f32, f32)) -> AccessKind {
    AccessKind {
        share,
        delay_ms,
        uplink_mbps,
    }
}

/// FTTH, cable, DSL, 4G/5G home router.
const ACCESS: [AccessKind; 4] = [
    kind(0.55, (0.5, 3.0), (20.0, 200.0)),
    kind(0.15, (3.0, 8.0), (5.0, 50.0)),
    kind(0.20, (6.0, 20.0), (1.0, 20.0)),
    kind(0.10, (15.0, 45.0), (5.0, 50.0)),
];

/// Draws an access delay and an uplink (Mbit/s, log-uniform within the kind's range).
fn access(rng: &mut Pcg64Mcg) -> (f32, f32) {
    let mut r: f64 = rng.random();
    for kind in &ACCESS {
        if r < kind.share {
            let delay = rng.random_range(kind.delay_ms.0..kind.delay_ms.1);
            let (lo, hi) = (kind.uplink_mbps.0.ln(), kind.uplink_mbps.1.ln());
            let up = (lo + rng.random::<f32>() * (hi - lo)).exp();
            return (delay, up);
        }
        r -= kind.share;
    }
    (30.0, 10.0)
}

fn place_point(cdf: &[f64], rng: &mut Pcg64Mcg) -> (Truth, f32) {
    let ci = pick_city(cdf, rng);
    let c = &CITIES[ci];
    let (x, y) = project(c.lat, c.lon);
    let (access_ms, up) = access(rng);
    (
        Truth {
            x_km: (x + 20.0 * gauss(rng)) as f32,
            y_km: (y + 20.0 * gauss(rng)) as f32,
            access_ms,
            city: ci as u16,
        },
        up,
    )
}

fn pick<T: Copy>(rng: &mut Pcg64Mcg, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// One home device's hardware, drawn from the mix of boxes on residential lines.
fn hardware(rng: &mut Pcg64Mcg) -> (Arch, u32, u32, u32) {
    const GIB: u32 = 1024;
    let r: f64 = rng.random();
    if r < 0.20 {
        // Old 32-bit set-top box.
        (
            Arch::Armv7,
            pick(rng, &[1, 2, 4]),
            pick(rng, &[512, GIB, 2 * GIB]),
            pick(rng, &[8, 16]) * GIB,
        )
    } else if r < 0.45 {
        // Modern set-top box / OneThing-style mining box.
        (
            Arch::Aarch64,
            pick(rng, &[2, 4]),
            pick(rng, &[GIB, 2 * GIB, 4 * GIB]),
            pick(rng, &[32, 64]) * GIB,
        )
    } else if r < 0.60 {
        // NAS.
        (
            Arch::Aarch64,
            pick(rng, &[4, 8]),
            pick(rng, &[2 * GIB, 4 * GIB, 8 * GIB]),
            pick(rng, &[1024, 4096]) * GIB,
        )
    } else {
        // Old PC or mini-PC.
        (
            Arch::X86_64,
            pick(rng, &[2, 4, 6, 8, 12, 16]),
            pick(rng, &[4 * GIB, 8 * GIB, 16 * GIB, 32 * GIB]),
            pick(rng, &[128, 256, 512, 2048]) * GIB,
        )
    }
}

fn reputation(rng: &mut Pcg64Mcg) -> f32 {
    let r: f64 = rng.random();
    if r < 0.80 {
        rng.random_range(0.9..=1.0)
    } else if r < 0.92 {
        rng.random_range(0.7..0.9)
    } else if r < 0.97 {
        rng.random_range(0.4..0.7)
    } else {
        rng.random_range(0.0..0.4)
    }
}

fn state(rng: &mut Pcg64Mcg) -> NodeState {
    let r: f64 = rng.random();
    if r < 0.965 {
        NodeState::Ready
    } else if r < 0.975 {
        NodeState::Draining
    } else if r < 0.995 {
        NodeState::Down
    } else {
        NodeState::Quarantined
    }
}

fn node_spec(i: usize, truth: &Truth, up_mbps: f32, isp: u8, rng: &mut Pcg64Mcg) -> NodeSpec {
    let (arch, cores, mem, disk) = hardware(rng);
    let container = arch != Arch::Armv7 && mem >= 2048 && rng.random_bool(0.7);
    let capacity = Resources::new(cores * 1000, mem, disk);
    // The owner keeps using the box: 0-60% of CPU and memory are theirs at any time.
    let free = Resources::new(
        (capacity.cpu_millis as f32 * rng.random_range(0.4..=1.0)) as u32,
        (capacity.memory_mib as f32 * rng.random_range(0.4..=1.0)) as u32,
        (capacity.disk_mib as f32 * rng.random_range(0.3..=0.9)) as u32,
    );
    let city = &CITIES[truth.city as usize];
    let up_kbps = (up_mbps * 1000.0) as u32;
    NodeSpec {
        // Spread ids over the u64 space like hashes of public keys would be.
        id: NodeId((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        region: city.region.to_owned(),
        zone: city.name.to_owned(),
        arch,
        runtimes: if container {
            RuntimeSet::WASM_AND_CONTAINER
        } else {
            RuntimeSet::WASM
        },
        capacity,
        free,
        bandwidth: Bandwidth {
            uplink_kbps: up_kbps,
            downlink_kbps: up_kbps.saturating_mul(rng.random_range(4..=10)),
        },
        reputation: reputation(rng),
        labels: vec![("isp".to_owned(), ISPS[isp as usize].to_owned())],
        coordinate: Coordinate::ORIGIN,
        state: state(rng),
    }
}

fn isp(rng: &mut Pcg64Mcg) -> u8 {
    let r: f64 = rng.random();
    if r < 0.5 {
        0
    } else if r < 0.8 {
        1
    } else {
        2
    }
}

/// A measured RTT: the truth plus queueing jitter (always positive, mean ~4%).
fn measure(a: &Truth, b: &Truth, rng: &mut Pcg64Mcg) -> f64 {
    f64::from(a.rtt_ms(b)) * (1.0 + 0.05 * gauss(rng).abs())
}

impl World {
    /// Generates nodes and callers, then warms Vivaldi up on RTT samples between them.
    pub fn generate(cfg: &WorldConfig) -> World {
        let mut rng = Pcg64Mcg::seed_from_u64(cfg.seed);
        let cdf = city_weights();
        let mut specs = Vec::with_capacity(cfg.nodes);
        let mut truth = Vec::with_capacity(cfg.nodes);
        for i in 0..cfg.nodes {
            let (t, up) = place_point(&cdf, &mut rng);
            let isp = isp(&mut rng);
            specs.push(node_spec(i, &t, up, isp, &mut rng));
            truth.push(t);
        }
        let mut client_truth = Vec::with_capacity(cfg.clients);
        let mut client_isp = Vec::with_capacity(cfg.clients);
        for _ in 0..cfg.clients {
            client_truth.push(place_point(&cdf, &mut rng).0);
            client_isp.push(isp(&mut rng));
        }

        let (node_coords, client_coords) = warm_up(&truth, &client_truth, cfg, &mut rng);
        for (s, c) in specs.iter_mut().zip(&node_coords) {
            s.coordinate = c.coordinate();
        }
        let clients = client_truth
            .iter()
            .zip(&client_coords)
            .zip(&client_isp)
            .map(|((t, c), isp)| Client {
                truth: *t,
                coord: c.coordinate(),
                isp: *isp,
            })
            .collect();

        let (global, local) = vivaldi_errors(&truth, &node_coords, &mut rng);
        World {
            specs,
            truth,
            clients,
            vivaldi_median_rel_error: global,
            vivaldi_median_rel_error_same_city: local,
        }
    }
}

/// Nodes that bootstrap the coordinate system before the others join.
const CORE_NODES: usize = 4000;
/// Rounds among the bootstrap nodes (cheap: they are few).
const CORE_ROUNDS: usize = 1000;

/// Picks a Vivaldi peer among `core` for a point in `city`: half the time one in the same
/// city (short paths teach heights), otherwise any.
fn core_peer(city: u16, core: &[u32], core_by_city: &[Vec<u32>], rng: &mut Pcg64Mcg) -> usize {
    let local = &core_by_city[city as usize];
    if local.len() > 1 && rng.random_bool(0.5) {
        local[rng.random_range(0..local.len())] as usize
    } else {
        core[rng.random_range(0..core.len())] as usize
    }
}

/// Runs Vivaldi the way a live system grows: a bootstrap set of nodes converges among itself,
/// then every other node (and every caller) joins by taking `warmup_rounds` RTT samples to
/// bootstrap nodes. Joiners are independent of each other, so they run on all cores; each
/// has its own RNG stream, so the result does not depend on the number of threads.
fn warm_up(
    nodes: &[Truth],
    clients: &[Truth],
    cfg: &WorldConfig,
    rng: &mut Pcg64Mcg,
) -> (Vec<VivaldiNode>, Vec<VivaldiNode>) {
    let vc = VivaldiConfig::default();
    let mut coords = vec![VivaldiNode::new(&vc); nodes.len()];
    let mut client_coords = vec![VivaldiNode::new(&vc); clients.len()];
    if nodes.len() < 2 {
        return (coords, client_coords);
    }
    let core_len = nodes.len().min(CORE_NODES);
    let core: Vec<u32> = (0..core_len as u32).collect();
    let mut core_by_city: Vec<Vec<u32>> = vec![Vec::new(); CITIES.len()];
    for i in 0..core_len {
        core_by_city[nodes[i].city as usize].push(i as u32);
    }
    for _ in 0..CORE_ROUNDS {
        for i in 0..core_len {
            let j = core_peer(nodes[i].city, &core, &core_by_city, rng);
            if j != i {
                let peer = coords[j];
                let rtt = measure(&nodes[i], &nodes[j], rng);
                // Samples are finite and positive by construction; a refusal would be a bug.
                let _ = coords[i].observe(&vc, &peer.coordinate(), peer.error(), rtt, rng);
            }
        }
    }

    let (core_coords, joiners) = coords.split_at_mut(core_len);
    let core_coords: &[VivaldiNode] = core_coords;
    let join = |me: &Truth, c: &mut VivaldiNode, stream: u64| {
        let mut rng =
            Pcg64Mcg::seed_from_u64(cfg.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for _ in 0..cfg.warmup_rounds {
            let j = core_peer(me.city, &core, &core_by_city, &mut rng);
            let peer = core_coords[j];
            let rtt = measure(me, &nodes[j], &mut rng);
            let _ = c.observe(&vc, &peer.coordinate(), peer.error(), rtt, &mut rng);
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = joiners.len().div_ceil(threads).max(1);
    let client_chunk = client_coords.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (n, part) in joiners.chunks_mut(chunk).enumerate() {
            let join = &join;
            scope.spawn(move || {
                for (k, c) in part.iter_mut().enumerate() {
                    let i = core_len + n * chunk + k;
                    join(&nodes[i], c, i as u64);
                }
            });
        }
        for (n, part) in client_coords.chunks_mut(client_chunk).enumerate() {
            let join = &join;
            scope.spawn(move || {
                for (k, c) in part.iter_mut().enumerate() {
                    let i = n * client_chunk + k;
                    join(&clients[i], c, (1 << 40) + i as u64);
                }
            });
        }
    });
    (coords, client_coords)
}

/// Median relative error |estimate - truth| / truth over random pairs: (global, same city).
fn vivaldi_errors(truth: &[Truth], coords: &[VivaldiNode], rng: &mut Pcg64Mcg) -> (f64, f64) {
    if truth.len() < 2 {
        return (0.0, 0.0);
    }
    let rel = |i: usize, j: usize| {
        let est = f64::from(coords[i].coordinate().distance_ms(&coords[j].coordinate()));
        let t = f64::from(truth[i].rtt_ms(&truth[j]));
        (est - t).abs() / t
    };
    let median = |mut v: Vec<f64>| {
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let pairs = 100_000.min(truth.len() * 10);
    let mut global = Vec::with_capacity(pairs);
    let mut local = Vec::with_capacity(pairs);
    let mut tries = 0;
    while global.len() < pairs && tries < pairs * 4 {
        tries += 1;
        let i = rng.random_range(0..truth.len());
        let j = rng.random_range(0..truth.len());
        if i == j {
            continue;
        }
        global.push(rel(i, j));
    }
    tries = 0;
    while local.len() < pairs / 4 && tries < pairs * 4 {
        tries += 1;
        let i = rng.random_range(0..truth.len());
        let j = rng.random_range(0..truth.len());
        if i != j && truth[i].city == truth[j].city {
            local.push(rel(i, j));
        }
    }
    (median(global), median(local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_reproducible_and_realistic() {
        let cfg = WorldConfig {
            nodes: 3000,
            clients: 200,
            warmup_rounds: 40,
            seed: 11,
        };
        let a = World::generate(&cfg);
        let b = World::generate(&cfg);
        assert_eq!(a.specs, b.specs);
        assert_eq!(a.specs.len(), 3000);
        let slow_uplinks = a
            .specs
            .iter()
            .filter(|s| (10_000..=100_000).contains(&s.bandwidth.uplink_kbps))
            .count();
        assert!(
            slow_uplinks * 2 > a.specs.len(),
            "most uplinks are 10-100 Mbit/s"
        );
        let arm = a.specs.iter().filter(|s| s.arch != Arch::X86_64).count();
        assert!(arm * 3 > a.specs.len(), "ARM boxes are common");
        let trusted = a.specs.iter().filter(|s| s.reputation >= 0.9).count();
        assert!(
            trusted * 10 > a.specs.len() * 7,
            "reputation is mostly high"
        );
        assert!(
            a.specs.iter().any(|s| s.reputation < 0.4),
            "with a bad tail"
        );
        assert!(
            a.vivaldi_median_rel_error < 0.2,
            "vivaldi error {}",
            a.vivaldi_median_rel_error
        );
    }

    #[test]
    fn rtt_grows_with_distance_and_access_delay() {
        let at = |x_km, city| Truth {
            x_km,
            y_km: 0.0,
            access_ms: 1.0,
            city,
        };
        let (a, near, far) = (at(0.0, 0), at(10.0, 0), at(2000.0, 1));
        let slow = Truth {
            access_ms: 30.0,
            ..near
        };
        assert!(a.rtt_ms(&near) < a.rtt_ms(&far));
        assert!(a.rtt_ms(&near) < a.rtt_ms(&slow));
        assert!((a.rtt_ms(&far) - 34.5).abs() < 0.01);
    }
}
