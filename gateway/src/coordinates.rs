//! The gateway's place in the network: its own Vivaldi coordinate, learned from RTT samples
//! that its workers and the other gateways measure to it and that it measures to the other
//! gateways (each filtered by a per-peer moving median), and the last coordinate each peer
//! gateway reported. Callers reach their nearest gateway, so this coordinate is where a
//! gateway's callers are: scale from zero places near it, routing estimates from it.
//!
//! ```text
//!  worker heartbeat(coord, its filtered rtt to me) ─┐
//!  Ping from a worker or a gateway (same) ──────────┼─▶ Vivaldi(me) ─▶ HeartbeatAck / PingReply
//!  every 2 s: Ping a peer gateway ─▶ filter(peer) ──┘   peers[gw] = its coordinate
//!                                                       (forwarding picks the nearest)
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use stellar_placement::{
    Coordinate, LATENCY_FILTER_WINDOW, LatencyFilter, VivaldiConfig, VivaldiNode,
};
use stellar_proto::v1 as pb;

/// Error assumed for a peer that sent none.
const UNKNOWN_ERROR: f64 = 0.5;
/// Peer gateways whose probe samples are filtered at once; the least recent is forgotten
/// past it. (Workers and other probers filter their own samples before sending them.)
const FILTERED_PEERS: usize = 256;
/// How often the gateway probes one of its peer gateways.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A probe that takes longer than this is a fault, not a sample.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

struct Inner {
    me: VivaldiNode,
    filter: LatencyFilter<String>,
    peers: HashMap<String, Coordinate>,
    rng: rand_pcg::Pcg64Mcg,
}

/// The gateway's coordinate and its peers' (see the module docs).
pub struct Coordinates {
    config: VivaldiConfig,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Coordinates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinates").finish_non_exhaustive()
    }
}

/// A wire coordinate with its error.
pub fn to_wire(c: &Coordinate, error: f64) -> pb::Coordinate {
    pb::Coordinate {
        vec: c.vec.to_vec(),
        height_ms: c.height_ms,
        error: error as f32,
    }
}

/// A coordinate from the wire (None: malformed or not finite).
pub fn from_wire(c: &pb::Coordinate) -> Option<(Coordinate, f64)> {
    let coord = Coordinate::from_parts(&c.vec, c.height_ms)?;
    let error = if c.error.is_finite() && c.error > 0.0 {
        f64::from(c.error)
    } else {
        UNKNOWN_ERROR
    };
    Some((coord, error))
}

impl Coordinates {
    /// A gateway at the origin that trusts nothing it knows yet.
    pub fn new() -> Arc<Coordinates> {
        let config = VivaldiConfig::default();
        Arc::new(Coordinates {
            inner: Mutex::new(Inner {
                me: VivaldiNode::new(&config),
                filter: LatencyFilter::new(LATENCY_FILTER_WINDOW, FILTERED_PEERS),
                peers: HashMap::new(),
                rng: rand_pcg::Pcg64Mcg::seed_from_u64(0x5eed),
            }),
            config,
        })
    }

    /// This gateway's coordinate and its error.
    pub fn me(&self) -> (Coordinate, f64) {
        self.inner
            .lock()
            .map(|i| (i.me.coordinate(), i.me.error()))
            .unwrap_or((Coordinate::ORIGIN, 1.5))
    }

    /// This gateway's coordinate on the wire.
    pub fn me_wire(&self) -> pb::Coordinate {
        let (c, e) = self.me();
        to_wire(&c, e)
    }

    /// Folds an RTT sample that its sender already filtered (a worker's heartbeat, a
    /// prober's ping) between this gateway and a peer at `coordinate` into this gateway's
    /// coordinate.
    pub fn observe(&self, coordinate: &pb::Coordinate, rtt_ms: f64) {
        let Some((c, error)) = from_wire(coordinate) else {
            return;
        };
        if !(rtt_ms.is_finite() && rtt_ms > 0.0) {
            return;
        }
        let Ok(mut i) = self.inner.lock() else { return };
        let Inner { me, rng, .. } = &mut *i;
        let _ = me.observe(&self.config, &c, error, rtt_ms, rng);
    }

    /// Records a peer gateway's coordinate (from its ping reply).
    pub fn set_peer(&self, address: &str, coordinate: &pb::Coordinate) {
        if let (Some((c, _)), Ok(mut i)) = (from_wire(coordinate), self.inner.lock()) {
            i.peers.insert(address.to_string(), c);
        }
    }

    /// Whether the peer gateway at `address` answered its last probe (only such a gateway is
    /// worth sending a worker to).
    pub fn answers(&self, address: &str) -> bool {
        self.inner
            .lock()
            .is_ok_and(|i| i.peers.contains_key(address))
    }

    /// Estimated RTT from this gateway to the peer gateway at `address`, ms (None: unknown).
    pub fn to_peer_ms(&self, address: &str) -> Option<f32> {
        let i = self.inner.lock().ok()?;
        let peer = i.peers.get(address)?;
        Some(i.me.coordinate().distance_ms(peer))
    }

    /// Estimated RTT from this gateway to a worker at `coordinate`, ms.
    pub fn to_worker_ms(&self, coordinate: &pb::Coordinate) -> Option<f32> {
        let (c, _) = from_wire(coordinate)?;
        Some(self.me().0.distance_ms(&c))
    }

    /// Probes the other gateways `known` names, one every [`PROBE_EVERY`], until `closed`.
    pub async fn probe_peers(
        self: Arc<Self>,
        known: impl Fn() -> Vec<Arc<str>> + Send + 'static,
        advertise: String,
        mut closed: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut next = 0usize;
        let mut channels: HashMap<String, tonic::transport::Channel> = HashMap::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                _ = closed.wait_for(|c| *c) => return,
            }
            let mut peers: Vec<String> = known()
                .into_iter()
                .filter(|g| **g != *advertise)
                .map(|g| g.to_string())
                .collect();
            peers.sort_unstable();
            peers.dedup();
            if peers.is_empty() {
                continue;
            }
            let peer = peers[next % peers.len()].clone();
            next = next.wrapping_add(1);
            let channel = match channels.get(&peer) {
                Some(c) => c.clone(),
                None => {
                    let Ok(e) = tonic::transport::Endpoint::from_shared(format!("http://{peer}"))
                    else {
                        continue;
                    };
                    let c = e
                        .tcp_nodelay(true)
                        .connect_timeout(PROBE_TIMEOUT)
                        .connect_lazy();
                    channels.insert(peer.clone(), c.clone());
                    c
                }
            };
            let mut client = pb::agent_client::AgentClient::new(channel);
            let rtt = {
                let filter_rtt = self
                    .inner
                    .lock()
                    .ok()
                    .and_then(|i| i.filter.median(&peer))
                    .unwrap_or(0.0);
                let req = pb::PingRequest {
                    coordinate: Some(self.me_wire()),
                    rtt_ms: filter_rtt as f32,
                };
                let t = stellar_proto::clock::now();
                match tokio::time::timeout(PROBE_TIMEOUT, client.ping(req)).await {
                    Ok(Ok(r)) => Some((t.elapsed().as_secs_f64() * 1000.0, r.into_inner())),
                    _ => None,
                }
            };
            match rtt {
                Some((ms, reply)) => {
                    let filtered = self
                        .inner
                        .lock()
                        .ok()
                        .and_then(|mut i| i.filter.sample(peer.clone(), ms));
                    if let (Some(c), Some(ms)) = (reply.coordinate, filtered) {
                        self.set_peer(&peer, &c);
                        self.observe(&c, ms);
                    }
                }
                None => {
                    tracing::debug!(peer = %peer, "peer gateway did not answer a ping");
                    channels.remove(&peer);
                    if let Ok(mut i) = self.inner.lock() {
                        i.peers.remove(&peer);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_move_the_gateway_and_bad_ones_are_ignored() {
        let c = Coordinates::new();
        let far = pb::Coordinate {
            vec: vec![40.0, 0.0, 0.0],
            height_ms: 1.0,
            error: 0.1,
        };
        for _ in 0..50 {
            c.observe(&far, 41.0);
        }
        // Confident samples 41 ms away from a peer at 40: this gateway now sits near the
        // origin side of it, its estimate close to the measured RTT.
        let est = c.to_worker_ms(&far).expect("valid");
        assert!((est - 41.0).abs() < 8.0, "estimated {est} ms");
        let before = c.me();
        c.observe(&pb::Coordinate::default(), 10.0); // malformed: no vec
        c.observe(
            &pb::Coordinate {
                vec: vec![f32::NAN, 0.0, 0.0],
                ..Default::default()
            },
            10.0,
        );
        c.observe(&far, f64::INFINITY);
        assert_eq!(c.me().0, before.0);
        c.set_peer("gw:2", &far);
        assert!(c.to_peer_ms("gw:2").is_some());
        assert!(c.to_peer_ms("gw:3").is_none());
    }
}
