//! One placement decision (single-replica function) at 10k, 100k and 1M nodes.
//!
//! Run with `cargo bench -p stellar-load --bench decision`. Each iteration places one request
//! from the simulator's stream (timed) and releases it again (not timed), so the table's
//! state stays the same.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_main};
use stellar_load::workload::{self, RequestClass};
use stellar_load::world::{World, WorldConfig};
use stellar_placement::{NodeTable, Placer, PlacerConfig};

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    group.sample_size(50);
    // STELLAR_BENCH_NODES=1000000 limits the run to some sizes (generating worlds takes time).
    let sizes: Vec<usize> = std::env::var("STELLAR_BENCH_NODES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000]);
    for nodes in sizes {
        let world = World::generate(&WorldConfig {
            nodes,
            clients: 5_000,
            warmup_rounds: 64,
            seed: 1,
        });
        let mut table = NodeTable::new();
        for spec in &world.specs {
            table.join(spec.clone()).expect("generated nodes are valid");
        }
        table.refresh_zone_order();
        let requests: Vec<_> = workload::generate(&world, 20_000, 1)
            .into_iter()
            .filter(|r| r.class == RequestClass::SingleFunction)
            .map(|r| r.request)
            .collect();
        let mut placer = Placer::new(PlacerConfig::default(), 1).expect("default config is valid");
        let asks: Vec<_> = requests
            .iter()
            .map(|r| {
                placer
                    .resolve(&table, r)
                    .map(|r| r.ask())
                    .unwrap_or_default()
            })
            .collect();
        let mut i = 0;
        group.bench_with_input(BenchmarkId::from_parameter(nodes), &nodes, |b, _| {
            // Only the decision is timed; giving the capacity back happens off the clock.
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let k = i % requests.len();
                    i += 1;
                    #[allow(clippy::disallowed_methods)] // the benchmark's own timer
                    let started = Instant::now();
                    let out = placer.place(&mut table, black_box(&requests[k]));
                    timed += started.elapsed();
                    if let Ok(out) = out {
                        for p in out {
                            let _ = table.release(p.node, &asks[k]);
                        }
                    }
                }
                timed
            })
        });
    }
    group.finish();
}

/// The generated group function has no doc comment of its own.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::decision);
}
criterion_main!(group::benches);
