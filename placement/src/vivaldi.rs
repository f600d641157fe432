//! Vivaldi network coordinates with height (Dabek et al., SIGCOMM 2004), in the form Serf's
//! `coordinate` package uses: adaptive timestep weighted by confidence, a height for the access
//! link, and a weak gravity toward the origin so coordinates do not drift.
//!
//! Workers feed [`VivaldiNode::observe`] with RTT samples to peers; the table stores the
//! resulting [`Coordinate`] and placement estimates latency as `distance_ms`.

use rand::Rng;

/// Euclidean dimensions of a coordinate; heights model the access link on top of them.
pub const DIMENSIONS: usize = 3;

/// Compact coordinate as stored in the node table and carried in heartbeats (milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Coordinate {
    /// Position in the Euclidean part of the space.
    pub vec: [f32; DIMENSIONS],
    /// Access-link delay that every path to this node pays.
    pub height_ms: f32,
}

impl Coordinate {
    /// The starting point of every new node.
    pub const ORIGIN: Coordinate = Coordinate {
        vec: [0.0; DIMENSIONS],
        height_ms: 0.0,
    };

    /// Estimated round-trip time to `other`: Euclidean distance plus both heights.
    #[inline]
    pub fn distance_ms(&self, other: &Coordinate) -> f32 {
        euclidean(&self.vec, &other.vec) + self.height_ms + other.height_ms
    }

    /// Euclidean part of the distance only (used for zone centroids, which have no height).
    #[inline]
    pub fn vec_distance_ms(&self, other: &[f32; DIMENSIONS]) -> f32 {
        euclidean(&self.vec, other)
    }

    /// A coordinate from its parts as they travel (a slice of [`DIMENSIONS`] values and a
    /// height); None when the shape is wrong or a value is not usable.
    pub fn from_parts(vec: &[f32], height_ms: f32) -> Option<Coordinate> {
        let c = Coordinate {
            vec: vec.try_into().ok()?,
            height_ms,
        };
        c.is_valid().then_some(c)
    }

    /// Whether every component is finite and the height non-negative; others are refused.
    pub fn is_valid(&self) -> bool {
        self.vec.iter().all(|v| v.is_finite())
            && self.height_ms.is_finite()
            && self.height_ms >= 0.0
    }
}

#[inline]
fn euclidean(a: &[f32; DIMENSIONS], b: &[f32; DIMENSIONS]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..DIMENSIONS {
        let d = a[i] - b[i];
        sum += d * d;
    }
    sum.sqrt()
}

/// Tuning constants; the defaults are Serf's, converted from seconds to milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VivaldiConfig {
    /// How fast the error estimate follows new samples (`ce` in the paper).
    pub error_gain: f64,
    /// How far one sample moves the coordinate (`cc` in the paper).
    pub move_gain: f64,
    /// Ceiling of the error estimate; also the error of a brand-new node.
    pub error_max: f64,
    /// Smallest height, so heights never collapse to zero.
    pub height_min_ms: f64,
    /// Gravity radius: the larger, the weaker the pull toward the origin.
    pub gravity_rho_ms: f64,
    /// Largest RTT accepted as a sample; larger ones are measurement faults.
    pub rtt_max_ms: f64,
}

impl Default for VivaldiConfig {
    fn default() -> Self {
        VivaldiConfig {
            error_gain: 0.25,
            move_gain: 0.25,
            error_max: 1.5,
            height_min_ms: 0.01,
            gravity_rho_ms: 150_000.0,
            rtt_max_ms: 10_000.0,
        }
    }
}

/// A sample that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum VivaldiError {
    /// The RTT was negative, NaN or larger than `rtt_max_ms`.
    #[error("rtt sample {0} ms is not a usable round-trip time")]
    InvalidRtt(f64),
    /// The peer's coordinate or error has non-finite components.
    #[error("peer coordinate is not finite")]
    InvalidPeer,
    /// A gain, bound or radius of the configuration is not a positive finite number.
    #[error("vivaldi configuration has a non-positive or non-finite constant: {0:?}")]
    InvalidConfig(VivaldiConfig),
}

impl VivaldiConfig {
    /// Whether every constant is a positive finite number (gains at most 1).
    pub fn is_valid(&self) -> bool {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        positive(self.error_gain)
            && self.error_gain <= 1.0
            && positive(self.move_gain)
            && self.move_gain <= 1.0
            && positive(self.error_max)
            && positive(self.height_min_ms)
            && positive(self.gravity_rho_ms)
            && positive(self.rtt_max_ms)
    }
}

const ZERO_THRESHOLD: f64 = 1.0e-6;

/// One node's Vivaldi state at full precision, kept by the worker that owns it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VivaldiNode {
    vec: [f64; DIMENSIONS],
    height: f64,
    error: f64,
}

impl VivaldiNode {
    /// A node at the origin with maximal error (it trusts nothing it knows yet).
    pub fn new(config: &VivaldiConfig) -> Self {
        VivaldiNode {
            vec: [0.0; DIMENSIONS],
            height: config.height_min_ms,
            error: config.error_max,
        }
    }

    /// The compact coordinate to publish in heartbeats and store in the node table.
    pub fn coordinate(&self) -> Coordinate {
        let mut vec = [0.0f32; DIMENSIONS];
        for (out, v) in vec.iter_mut().zip(self.vec) {
            *out = v as f32;
        }
        Coordinate {
            vec,
            height_ms: self.height as f32,
        }
    }

    /// Confidence in the coordinate: the running relative error (lower is better).
    pub fn error(&self) -> f64 {
        self.error
    }

    /// Folds one RTT sample to a peer into the coordinate; a bad sample changes nothing.
    pub fn observe<R: Rng + ?Sized>(
        &mut self,
        config: &VivaldiConfig,
        peer: &Coordinate,
        peer_error: f64,
        rtt_ms: f64,
        rng: &mut R,
    ) -> Result<(), VivaldiError> {
        if !config.is_valid() {
            return Err(VivaldiError::InvalidConfig(*config));
        }
        if !(rtt_ms.is_finite() && rtt_ms >= 0.0 && rtt_ms <= config.rtt_max_ms) {
            return Err(VivaldiError::InvalidRtt(rtt_ms));
        }
        if !peer.is_valid() || !peer_error.is_finite() {
            return Err(VivaldiError::InvalidPeer);
        }
        let peer_vec = peer.vec.map(f64::from);
        let peer_height = f64::from(peer.height_ms);
        let rtt = rtt_ms.max(ZERO_THRESHOLD);
        let dist = self.distance_to(&peer_vec, peer_height);

        let wrongness = (dist - rtt).abs() / rtt;
        let total_error = (self.error + peer_error.max(0.0)).max(ZERO_THRESHOLD);
        let weight = self.error / total_error;
        self.error = (config.error_gain * weight * wrongness
            + self.error * (1.0 - config.error_gain * weight))
            .min(config.error_max);

        let force = config.move_gain * weight * (rtt - dist);
        self.apply_force(config, force, &peer_vec, peer_height, rng);

        // Gravity: a small pull toward the origin keeps the whole system from drifting.
        let origin = [0.0; DIMENSIONS];
        let from_origin = self.distance_to(&origin, 0.0);
        let gravity = -(from_origin / config.gravity_rho_ms).powi(2);
        self.apply_force(config, gravity, &origin, 0.0, rng);
        Ok(())
    }

    fn distance_to(&self, vec: &[f64; DIMENSIONS], height: f64) -> f64 {
        let mut sum = 0.0;
        for (a, b) in self.vec.iter().zip(vec) {
            sum += (a - b) * (a - b);
        }
        sum.sqrt() + self.height + height
    }

    /// Moves the coordinate by `force` along the height vector from `other` to `self`.
    ///
    /// The direction is the paper's height-vector unit, `[x_i - x_j, h_i + h_j]` divided by
    /// its norm `|x_i - x_j| + h_i + h_j`. (Serf divides by `|x_i - x_j|` alone, which blows
    /// heights up between nodes whose Euclidean parts nearly coincide, e.g. two homes in one
    /// city; the simulator's same-city error halves with the paper's form.)
    fn apply_force<R: Rng + ?Sized>(
        &mut self,
        config: &VivaldiConfig,
        force: f64,
        other: &[f64; DIMENSIONS],
        other_height: f64,
        rng: &mut R,
    ) {
        let mut unit = [0.0; DIMENSIONS];
        let mut mag = 0.0;
        for i in 0..DIMENSIONS {
            unit[i] = self.vec[i] - other[i];
            mag += unit[i] * unit[i];
        }
        mag = mag.sqrt();
        if mag <= ZERO_THRESHOLD {
            // Two nodes at the same spot: push apart in a random direction.
            mag = 0.0;
            let mut norm = 0.0;
            for u in &mut unit {
                *u = rng.random::<f64>() - 0.5;
                norm += *u * *u;
            }
            let norm = norm.sqrt().max(ZERO_THRESHOLD);
            for u in &mut unit {
                *u /= norm;
            }
        } else {
            for u in &mut unit {
                *u /= mag;
            }
        }
        let heights = self.height + other_height;
        let norm = (mag + heights).max(ZERO_THRESHOLD);
        let planar = if mag > 0.0 { mag / norm } else { 1.0 };
        for (v, u) in self.vec.iter_mut().zip(unit) {
            *v += u * force * planar;
        }
        self.height = (self.height + force * heights / norm).max(config.height_min_ms);
    }
}

/// Samples kept per peer by [`LatencyFilter`] (Serf keeps 3).
pub const LATENCY_FILTER_WINDOW: usize = 3;

/// A per-peer moving median of RTT samples, as Serf filters them before Vivaldi sees them:
/// one slow sample (a busy peer, a queued packet, a GC pause) does not throw a coordinate
/// off. Peers are evicted oldest-first past `max_peers`, so memory stays bounded.
#[derive(Clone, Debug)]
pub struct LatencyFilter<K> {
    window: usize,
    max_peers: usize,
    peers: std::collections::HashMap<K, (u64, std::collections::VecDeque<f64>)>,
    clock: u64,
}

impl<K: std::hash::Hash + Eq + Clone> LatencyFilter<K> {
    /// A filter keeping the last `window` samples (at least 1) of at most `max_peers` peers.
    pub fn new(window: usize, max_peers: usize) -> Self {
        LatencyFilter {
            window: window.max(1),
            max_peers: max_peers.max(1),
            peers: std::collections::HashMap::new(),
            clock: 0,
        }
    }

    /// Adds a sample for `peer` and returns the median of its kept samples (this one
    /// included); a non-finite or negative sample is refused with `None` and not kept.
    pub fn sample(&mut self, peer: K, rtt_ms: f64) -> Option<f64> {
        if !(rtt_ms.is_finite() && rtt_ms >= 0.0) {
            return None;
        }
        self.clock += 1;
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.peers.remove(&k);
            }
        }
        let clock = self.clock;
        let entry = self.peers.entry(peer).or_default();
        entry.0 = clock;
        if entry.1.len() == self.window {
            entry.1.pop_front();
        }
        entry.1.push_back(rtt_ms);
        let mut sorted: Vec<f64> = entry.1.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        Some(sorted[sorted.len() / 2])
    }

    /// The current median for `peer`, if it has samples.
    pub fn median(&self, peer: &K) -> Option<f64> {
        let (_, samples) = self.peers.get(peer)?;
        let mut sorted: Vec<f64> = samples.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied()
    }

    /// Forgets `peer` (it left).
    pub fn forget(&mut self, peer: &K) {
        self.peers.remove(peer);
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    #[test]
    fn one_slow_sample_does_not_move_the_median_and_peers_are_bounded() {
        let mut f = LatencyFilter::new(LATENCY_FILTER_WINDOW, 2);
        assert_eq!(f.sample("a", 10.0), Some(10.0));
        assert_eq!(f.sample("a", 12.0), Some(12.0));
        // A 500 ms outlier: the median of [10, 12, 500] is 12.
        assert_eq!(f.sample("a", 500.0), Some(12.0));
        // The window slides: [12, 500, 11] -> 12; [500, 11, 13] -> 13.
        assert_eq!(f.sample("a", 11.0), Some(12.0));
        assert_eq!(f.sample("a", 13.0), Some(13.0));
        assert_eq!(f.sample("a", f64::NAN), None);
        assert_eq!(f.sample("a", -1.0), None);
        assert_eq!(f.median(&"a"), Some(13.0));
        // Peers are kept apart, and the least recently sampled is evicted past the bound.
        assert_eq!(f.sample("b", 40.0), Some(40.0));
        assert_eq!(f.sample("c", 70.0), Some(70.0));
        assert_eq!(f.median(&"a"), None);
        assert_eq!(f.median(&"b"), Some(40.0));
        f.forget(&"b");
        assert_eq!(f.median(&"b"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_pcg::Pcg64Mcg;

    /// A synthetic metric space: points on a plane (1 unit = 1 ms) plus access heights.
    struct Space {
        pos: Vec<(f64, f64)>,
        access: Vec<f64>,
    }

    impl Space {
        fn rtt(&self, a: usize, b: usize) -> f64 {
            let (dx, dy) = (self.pos[a].0 - self.pos[b].0, self.pos[a].1 - self.pos[b].1);
            (dx * dx + dy * dy).sqrt() + self.access[a] + self.access[b]
        }
    }

    fn converge(n: usize, rounds: usize, seed: u64) -> f64 {
        let mut rng = Pcg64Mcg::seed_from_u64(seed);
        let space = Space {
            pos: (0..n)
                .map(|_| (rng.random_range(0.0..80.0), rng.random_range(0.0..50.0)))
                .collect(),
            access: (0..n).map(|_| rng.random_range(1.0..20.0)).collect(),
        };
        let cfg = VivaldiConfig::default();
        let mut nodes = vec![VivaldiNode::new(&cfg); n];
        for _ in 0..rounds {
            for i in 0..n {
                let j = (i + rng.random_range(1..n)) % n;
                let peer = nodes[j];
                nodes[i]
                    .observe(
                        &cfg,
                        &peer.coordinate(),
                        peer.error(),
                        space.rtt(i, j),
                        &mut rng,
                    )
                    .unwrap();
            }
        }
        let mut errs = Vec::new();
        for i in 0..n {
            for j in (i + 1)..n {
                let est = f64::from(nodes[i].coordinate().distance_ms(&nodes[j].coordinate()));
                let truth = space.rtt(i, j);
                errs.push((est - truth).abs() / truth);
            }
        }
        errs.sort_by(f64::total_cmp);
        errs[errs.len() / 2]
    }

    #[test]
    fn converges_on_a_synthetic_metric_space() {
        let median = converge(200, 200, 7);
        assert!(median < 0.10, "median relative error {median}");
    }

    #[test]
    fn a_fresh_node_is_far_from_converged() {
        // Guards the test above: without samples the error is large, so convergence is real.
        let median = converge(200, 0, 7);
        assert!(median > 0.5, "median relative error {median}");
    }

    #[test]
    fn bad_samples_change_nothing() {
        let cfg = VivaldiConfig::default();
        let mut rng = Pcg64Mcg::seed_from_u64(1);
        let mut node = VivaldiNode::new(&cfg);
        let before = node;
        let peer = Coordinate::ORIGIN;
        for rtt in [f64::NAN, -1.0, f64::INFINITY, 1e9] {
            assert!(matches!(
                node.observe(&cfg, &peer, 1.0, rtt, &mut rng),
                Err(VivaldiError::InvalidRtt(_))
            ));
        }
        let bad_peer = Coordinate {
            vec: [f32::NAN, 0.0, 0.0],
            height_ms: 0.0,
        };
        assert_eq!(
            node.observe(&cfg, &bad_peer, 1.0, 10.0, &mut rng),
            Err(VivaldiError::InvalidPeer)
        );
        assert_eq!(node, before);
    }

    #[test]
    fn an_invalid_config_is_refused() {
        let mut rng = Pcg64Mcg::seed_from_u64(1);
        let cfg = VivaldiConfig {
            gravity_rho_ms: 0.0,
            ..VivaldiConfig::default()
        };
        let mut node = VivaldiNode::new(&VivaldiConfig::default());
        let before = node;
        assert!(matches!(
            node.observe(&cfg, &Coordinate::ORIGIN, 1.0, 10.0, &mut rng),
            Err(VivaldiError::InvalidConfig(_))
        ));
        assert_eq!(node, before);
    }

    #[test]
    fn coincident_nodes_separate_and_heights_stay_positive() {
        let cfg = VivaldiConfig::default();
        let mut rng = Pcg64Mcg::seed_from_u64(3);
        let mut a = VivaldiNode::new(&cfg);
        let b = VivaldiNode::new(&cfg);
        a.observe(&cfg, &b.coordinate(), b.error(), 30.0, &mut rng)
            .unwrap();
        let moved = a.coordinate().vec_distance_ms(&b.coordinate().vec);
        assert!(moved > 1.0, "moved {moved}");
        assert!(a.coordinate().height_ms > 0.0);
    }
}
