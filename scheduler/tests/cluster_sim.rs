//! Thousands of randomised schedules of a 3-replica cluster under message loss, delay,
//! duplication, reordering, partitions and crash-restarts, each checked for the control
//! plane's invariants (see `harness/mod.rs`).
//!
//! `STELLAR_SIM_SEED=N` replays one seed; `STELLAR_SIM_SCHEDULES=N` sets how many each test
//! function runs (default 500 per function, 4 functions: 2,000 schedules).

mod harness;

use harness::{Sim, SimConfig};

fn schedules() -> u64 {
    std::env::var("STELLAR_SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500)
}

fn run_range(first_seed: u64, cfg: SimConfig) {
    if let Some(seed) = std::env::var("STELLAR_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        if seed / 1_000_000 == first_seed / 1_000_000 {
            let stats = Sim::new(seed, cfg).run();
            eprintln!("seed {seed}: {stats:?}");
        }
        return;
    }
    let mut total = harness::SimStats::default();
    let n = schedules();
    for seed in first_seed..first_seed + n {
        let s = Sim::new(seed, cfg.clone()).run();
        total.acked += s.acked;
        total.crashes += s.crashes;
        total.partitions += s.partitions;
        total.snapshots_sent += s.snapshots_sent;
        total.elections += s.elections;
        total.dropped += s.dropped;
    }
    eprintln!("{n} schedules from seed {first_seed}: {total:?}");
    // The faults must really have happened, or the run proves nothing.
    assert!(
        total.acked > n * 5,
        "too few acknowledged writes: {total:?}"
    );
    assert!(total.crashes > 0 && total.partitions > 0, "{total:?}");
    assert!(total.elections > n, "{total:?}");
}

#[test]
fn lossy_network_three_replicas() {
    run_range(1_000_000, SimConfig::default());
}

#[test]
fn crash_heavy_three_replicas() {
    run_range(
        2_000_000,
        SimConfig {
            crash: 0.02,
            drop: 0.02,
            ..SimConfig::default()
        },
    );
}

#[test]
fn partitions_and_snapshots_five_replicas() {
    run_range(
        3_000_000,
        SimConfig {
            replicas: 5,
            partition: 0.02,
            snapshot_every: 10,
            ..SimConfig::default()
        },
    );
}

#[test]
fn slow_reordering_network() {
    run_range(
        4_000_000,
        SimConfig {
            max_delay: 15,
            duplicate: 0.1,
            ..SimConfig::default()
        },
    );
}
