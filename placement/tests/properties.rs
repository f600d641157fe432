//! Property tests of the placement engine against a brute-force oracle over random tables.

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use stellar_placement::*;

const ZONES: [(&str, &str, f32, f32); 5] = [
    ("east", "shanghai", 0.0, 0.0),
    ("east", "hangzhou", 3.0, -2.0),
    ("south", "guangzhou", -5.0, -25.0),
    ("south", "shenzhen", -4.0, -27.0),
    ("west", "chengdu", -40.0, -5.0),
];

fn random_table(n: usize, seed: u64) -> NodeTable {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let mut t = NodeTable::new();
    for i in 0..n {
        let (region, zone, x, y) = ZONES[rng.random_range(0..ZONES.len())];
        let arch = Arch::ALL[rng.random_range(0..3)];
        let cap = Resources::new(
            rng.random_range(1..=8) * 1000,
            rng.random_range(1..=16) * 512,
            rng.random_range(1..=100) * 1024,
        );
        let free = Resources::new(
            rng.random_range(0..=cap.cpu_millis),
            rng.random_range(0..=cap.memory_mib),
            rng.random_range(0..=cap.disk_mib),
        );
        let state = match rng.random_range(0..20) {
            0 => NodeState::Down,
            1 => NodeState::Draining,
            2 => NodeState::Quarantined,
            _ => NodeState::Ready,
        };
        let spec = NodeSpec {
            id: NodeId(i as u64 * 7 + 1),
            region: region.into(),
            zone: zone.into(),
            arch,
            runtimes: if rng.random_bool(0.5) {
                RuntimeSet::WASM_AND_CONTAINER
            } else {
                RuntimeSet::WASM
            },
            capacity: cap,
            free,
            bandwidth: Bandwidth {
                uplink_kbps: rng.random_range(1_000..100_000),
                downlink_kbps: rng.random_range(10_000..500_000),
            },
            reputation: rng.random_range(0.0..=1.0),
            labels: vec![(
                "isp".into(),
                ["telecom", "unicom", "mobile"][rng.random_range(0..3)].into(),
            )],
            coordinate: Coordinate {
                vec: [
                    x + rng.random_range(-1.0..1.0),
                    y + rng.random_range(-1.0..1.0),
                    0.0,
                ],
                height_ms: rng.random_range(0.5..50.0),
            },
            state,
        };
        t.join(spec).unwrap();
    }
    t
}

fn request_strategy() -> impl Strategy<Value = PlacementRequest> {
    (
        prop_oneof![Just(WorkloadKind::Function), Just(WorkloadKind::Batch)],
        prop_oneof![Just(Runtime::Wasm), Just(Runtime::Container)],
        0u32..4000,
        0u32..6000,
        1u32..6,
        0usize..ZONES.len() + 1,
        prop::option::of(0.0f32..1.0),
        any::<bool>(),
        any::<bool>(),
        prop::option::of((0u64..20_000_000, 0u64..20_000_000)),
    )
        .prop_map(
            |(kind, runtime, cpu, mem, count, origin, floor, binpack, telecom, transfer)| {
                PlacementRequest {
                    kind,
                    runtime,
                    arch: if runtime == Runtime::Container {
                        ArchSet::only(Arch::X86_64).with(Arch::Aarch64)
                    } else {
                        ArchSet::ANY
                    },
                    cpu_cores: f64::from(cpu) / 1000.0,
                    memory_mib: f64::from(mem),
                    count,
                    origin: match ZONES.get(origin) {
                        Some((region, zone, _, _)) => Origin::Zone {
                            region: (*region).into(),
                            zone: (*zone).into(),
                        },
                        None => Origin::Anywhere,
                    },
                    min_reputation: floor,
                    labels: if telecom {
                        vec![LabelConstraint {
                            key: "isp".into(),
                            op: LabelOp::Equals("telecom".into()),
                        }]
                    } else {
                        Vec::new()
                    },
                    fit: if binpack { Fit::BinPack } else { Fit::Spread },
                    transfer: transfer.map(|(bytes_in, bytes_out)| Transfer {
                        bytes_in,
                        bytes_out,
                    }),
                    ..Default::default()
                }
            },
        )
}

/// Free capacity of every slot, to compare tables before and after.
fn free_of(t: &NodeTable) -> Vec<Option<Resources>> {
    (0..t.slot_bound())
        .map(|s| t.node(Slot(s)).map(|v| v.free))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Every placement lands on a node the filters accept on the state it was decided on;
    /// no node ever gives out more than it had free; replicas and tasks take distinct nodes;
    /// a refusal is exact (no node was feasible) and leaves the table unchanged.
    #[test]
    fn placements_are_feasible_distinct_and_never_overcommit(
        n in 1usize..400,
        seed in any::<u64>(),
        reqs in prop::collection::vec(request_strategy(), 1..40),
    ) {
        let mut table = random_table(n, seed);
        table.refresh_zone_order();
        let initial = free_of(&table);
        let mut taken = vec![Resources::default(); table.slot_bound() as usize];
        let mut placer = Placer::new(PlacerConfig::default(), seed).unwrap();
        for req in &reqs {
            let before = table.clone();
            let resolved = match placer.resolve(&before, req) {
                Ok(r) => r,
                Err(e) => {
                    // A request naming a zone this small table lacks: refused, nothing changes.
                    prop_assert_eq!(placer.place(&mut table, req), Err(PlacementError::Invalid(e)));
                    prop_assert_eq!(free_of(&table), free_of(&before));
                    continue;
                }
            };
            let mut scanned = Vec::new();
            resolved.for_each_feasible(&before, |slot, _| scanned.push(slot));
            scanned.sort();
            let brute: Vec<Slot> = (0..before.slot_bound())
                .map(Slot)
                .filter(|s| resolved.refusal(&before, *s).is_none())
                .collect();
            prop_assert_eq!(&scanned, &brute, "the full scan disagrees with the filters");
            match placer.place(&mut table, req) {
                Ok(out) => {
                    prop_assert_eq!(out.len(), req.count as usize);
                    let mut nodes: Vec<_> = out.iter().map(|p| p.node).collect();
                    nodes.sort();
                    nodes.dedup();
                    prop_assert_eq!(nodes.len(), out.len(), "distinct nodes");
                    for p in &out {
                        prop_assert_eq!(resolved.refusal(&before, p.slot), None, "infeasible node chosen");
                        for part in [p.score.total, p.score.bandwidth, p.score.fit, p.score.reputation] {
                            prop_assert!((0.0..=1.0).contains(&part), "score part out of [0, 1]: {:?}", p.score);
                        }
                        prop_assert_eq!(p.score.est_transfer_s.is_nan(), req.transfer.is_none_or(|t| t.bytes_in == 0 && t.bytes_out == 0));
                        let t = &mut taken[p.slot.0 as usize];
                        let ask = resolved.ask();
                        *t = Resources::new(t.cpu_millis + ask.cpu_millis, t.memory_mib + ask.memory_mib, t.disk_mib + ask.disk_mib);
                        let init = initial[p.slot.0 as usize].unwrap();
                        prop_assert!(t.fits_in(&init), "node overcommitted: {:?} of {:?}", t, init);
                    }
                }
                Err(PlacementError::NoFeasibleNode(d)) => {
                    prop_assert_eq!(free_of(&table), free_of(&before), "refusal changed the table");
                    let feasible = brute.len();

                    prop_assert_eq!(feasible, 0, "refused although a node was feasible");
                    prop_assert_eq!(d.removed_total(), before.len() as u64);
                }
                Err(PlacementError::NotEnoughNodes { wanted, found, .. }) => {
                    prop_assert_eq!(free_of(&table), free_of(&before), "refusal changed the table");
                    let feasible = brute.len();
                    prop_assert!(feasible < wanted as usize, "{} feasible for {}", feasible, wanted);
                    prop_assert!(found as usize <= feasible);
                }
                Err(PlacementError::Invalid(RequestError::CountExceedsNodes { count, nodes })) => {
                    prop_assert!(count as usize > nodes);
                    prop_assert_eq!(free_of(&table), free_of(&before), "refusal changed the table");
                }
                Err(other) => prop_assert!(false, "unexpected error {}", other),
            }
            table.check_invariants().map_err(TestCaseError::fail)?;
        }
    }

    /// The same seed, table and requests give the same placements.
    #[test]
    fn same_seed_same_placements(
        n in 1usize..300,
        seed in any::<u64>(),
        reqs in prop::collection::vec(request_strategy(), 1..20),
    ) {
        let run = || {
            let mut table = random_table(n, seed);
            let mut placer = Placer::new(PlacerConfig::default(), seed).unwrap();
            reqs.iter()
                .map(|r| placer.place(&mut table, r).map(|v| v.iter().map(|p| p.node).collect::<Vec<_>>()).ok())
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(run(), run());
    }

    /// A function's new replicas avoid the nodes of its existing replicas.
    #[test]
    fn anti_affinity_with_existing_replicas(n in 10usize..300, seed in any::<u64>(), count in 1u32..5) {
        let mut table = random_table(n, seed);
        let mut placer = Placer::new(PlacerConfig::default(), seed).unwrap();
        let base = PlacementRequest { min_reputation: Some(0.0), cpu_cores: 0.0, memory_mib: 0.0, ..Default::default() };
        if let Ok(first) = placer.place(&mut table, &base) {
            let req = PlacementRequest { count, existing: vec![first[0].node], ..base };
            if let Ok(more) = placer.place(&mut table, &req) {
                for p in &more {
                    prop_assert_ne!(p.node, first[0].node);
                }
            }
        }
    }

    /// Join, leave, coordinate and capacity updates in any order keep the indexes consistent.
    #[test]
    fn table_updates_keep_indexes_consistent(
        n in 1usize..200,
        seed in any::<u64>(),
        ops in prop::collection::vec((0u8..4, any::<u64>(), 0.0f32..60.0), 0..200),
    ) {
        let mut table = random_table(n, seed);
        let mut ids: Vec<NodeId> = (0..table.slot_bound()).filter_map(|s| table.id_of(Slot(s))).collect();
        for (op, pick, h) in ops {
            if ids.is_empty() { break; }
            let id = ids[(pick % ids.len() as u64) as usize];
            match op {
                0 => {
                    table.leave(id).unwrap();
                    ids.retain(|x| *x != id);
                }
                1 => table.set_coordinate(id, Coordinate { vec: [h, -h, 0.0], height_ms: h }).unwrap(),
                2 => table.set_free(id, Resources::default()).unwrap(),
                _ => table.set_state(id, NodeState::Draining).unwrap(),
            }
            table.check_invariants().map_err(TestCaseError::fail)?;
        }
    }
}
