//! The stream of placement requests the simulator replays against every algorithm.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use stellar_placement::{
    Arch, ArchSet, Fit, LabelConstraint, LabelOp, Origin, PlacementRequest, Runtime, WorkloadKind,
};

use crate::world::{CITIES, ISPS, World};

/// What kind of request a stream entry is, for per-kind figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestClass {
    /// One replica of a latency-sensitive function.
    SingleFunction,
    /// Several replicas of a function (anti-affinity).
    ReplicatedFunction,
    /// A batch of transcoding tasks (containers).
    BatchJob,
}

/// One entry of the stream.
#[derive(Clone, Debug)]
pub struct SimRequest {
    /// The request as a client would send it.
    pub request: PlacementRequest,
    /// The caller it comes from (index into `World::clients`).
    pub client: u32,
    /// Its kind.
    pub class: RequestClass,
}

/// Generates `count` requests from callers weighted by population.
pub fn generate(world: &World, count: usize, seed: u64) -> Vec<SimRequest> {
    let mut rng = Pcg64Mcg::seed_from_u64(seed ^ 0x005E_ED0F_5EED);
    let mut out = Vec::with_capacity(count);
    if world.clients.is_empty() {
        return out;
    }
    for _ in 0..count {
        let ci = rng.random_range(0..world.clients.len());
        let client = &world.clients[ci];
        let origin = Origin::Coordinate(client.coord);
        let r: f64 = rng.random();
        let (class, request) = if r < 0.85 {
            let same_isp = rng.random_bool(0.1);
            (
                RequestClass::SingleFunction,
                function(&mut rng, origin, 1, same_isp.then_some(client.isp)),
            )
        } else if r < 0.95 {
            (
                RequestClass::ReplicatedFunction,
                function(&mut rng, origin, 3, None),
            )
        } else {
            let region = rng
                .random_bool(0.5)
                .then(|| CITIES[client.truth.city as usize].region.to_owned());
            (RequestClass::BatchJob, transcode(&mut rng, origin, region))
        };
        out.push(SimRequest {
            request,
            client: ci as u32,
            class,
        });
    }
    out
}

fn function(rng: &mut Pcg64Mcg, origin: Origin, count: u32, isp: Option<u8>) -> PlacementRequest {
    PlacementRequest {
        kind: WorkloadKind::Function,
        runtime: Runtime::Wasm,
        arch: ArchSet::ANY,
        cpu_cores: f64::from(rng.random_range(1..=10u32)) * 0.05,
        memory_mib: f64::from([64u32, 128, 256, 512][rng.random_range(0..4)]),
        count,
        origin,
        labels: isp
            .map(|i| {
                vec![LabelConstraint {
                    key: "isp".into(),
                    op: LabelOp::Equals(ISPS[i as usize].into()),
                }]
            })
            .unwrap_or_default(),
        fit: Fit::Spread,
        ..Default::default()
    }
}

fn transcode(rng: &mut Pcg64Mcg, origin: Origin, region: Option<String>) -> PlacementRequest {
    PlacementRequest {
        kind: WorkloadKind::Batch,
        runtime: Runtime::Container,
        arch: ArchSet::only(Arch::X86_64).with(Arch::Aarch64),
        cpu_cores: f64::from(rng.random_range(2..=4u32)) * 0.5,
        memory_mib: f64::from(rng.random_range(1..=4u32)) * 512.0,
        disk_mib: 2048.0,
        min_uplink_mbps: 10.0,
        count: rng.random_range(4..=32),
        region,
        origin,
        min_reputation: Some(0.8),
        fit: Fit::BinPack,
        ..Default::default()
    }
}
