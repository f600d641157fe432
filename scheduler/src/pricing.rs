//! The price table: what a tenant pays for metered usage and what a node's owner is
//! credited, in integer micro-units (10⁻⁶ of the billing currency) so that every replica
//! computes the same bill to the unit.
//!
//! | what | price |
//! |---|---|
//! | compute | 1 micro-unit per 100,000 fuel (fuel is deterministic: checkable anywhere) |
//! | container compute | 10,000 micro-units per cpu-second (the same as 10⁹ fuel: a core runs about 10⁹ simple wasm instructions a second) |
//! | memory | 20 micro-units per GiB·s (peak linear memory × wall time) |
//! | transfer | 100 micro-units per GiB in or out |
//! | requests | 200 micro-units per 1,000 invocations |
//!
//! The ledger keeps usage in cells, one per (function, node, hour). Each cell is priced once
//! (rounding down, so splitting usage into more records never costs more) and split into
//! the node owner's credit, 70% rounded down, and the platform's fee, the rest: so the bills
//! are exactly the credits plus the fee, which `stellar usage --audit` checks by repricing
//! every cell.

use crate::state::UsageTotals;

/// Fuel per micro-unit.
pub const FUEL_PER_MICRO: u64 = 100_000;
/// Micro-units per cpu-second of a container (from its cgroup's counter): priced like the
/// fuel a core burns in a second, so a function costs about the same in either runtime.
pub const MICROS_PER_CPU_SECOND: u64 = 10_000;
/// Micro-units per GiB·s of memory.
pub const MICROS_PER_GIB_S: u64 = 20;
/// Micro-units per GiB transferred.
pub const MICROS_PER_GIB: u64 = 100;
/// Micro-units per 1,000 invocations.
pub const MICROS_PER_1000_INVOCATIONS: u64 = 200;
/// The owners' share of what their nodes' usage bills, percent.
pub const OWNER_SHARE_PERCENT: u64 = 70;

/// What `t` costs, in micro-units.
pub fn cost_micros(t: &UsageTotals) -> u64 {
    const GIB: u128 = 1 << 30;
    // MiB·ms to GiB·s: / 1024 / 1000.
    let parts = [
        u128::from(t.fuel) / u128::from(FUEL_PER_MICRO),
        u128::from(t.cpu_ns) * u128::from(MICROS_PER_CPU_SECOND) / 1_000_000_000,
        u128::from(t.memory_mib_ms) * u128::from(MICROS_PER_GIB_S) / (1024 * 1000),
        (u128::from(t.bytes_in) + u128::from(t.bytes_out)) * u128::from(MICROS_PER_GIB) / GIB,
        u128::from(t.invocations) * u128::from(MICROS_PER_1000_INVOCATIONS) / 1000,
    ];
    parts.iter().sum::<u128>().min(u128::from(u64::MAX)) as u64
}

/// What an owner is credited for usage `t` on their node, in micro-units.
pub fn credit_micros(t: &UsageTotals) -> u64 {
    split(cost_micros(t)).0
}

/// A cell's price split into (the owner's credit, the platform's fee); they add up to it.
pub fn split(cost: u64) -> (u64, u64) {
    let credit = (u128::from(cost) * u128::from(OWNER_SHARE_PERCENT) / 100) as u64;
    (credit, cost - credit)
}

/// A cell's (cost, credit, fee), in micro-units.
pub fn price_cell(t: &UsageTotals) -> (u64, u64, u64) {
    let cost = cost_micros(t);
    let (credit, fee) = split(cost);
    (cost, credit, fee)
}

/// Adds `b` into `a`.
pub fn add(a: &mut UsageTotals, b: &UsageTotals) {
    a.invocations = a.invocations.saturating_add(b.invocations);
    a.fuel = a.fuel.saturating_add(b.fuel);
    a.wall_us = a.wall_us.saturating_add(b.wall_us);
    a.bytes_in = a.bytes_in.saturating_add(b.bytes_in);
    a.bytes_out = a.bytes_out.saturating_add(b.bytes_out);
    a.memory_mib_ms = a.memory_mib_ms.saturating_add(b.memory_mib_ms);
    a.cpu_ns = a.cpu_ns.saturating_add(b.cpu_ns);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_follow_the_table() {
        let t = UsageTotals {
            invocations: 1000,
            fuel: 10_000_000,
            wall_us: 0,
            bytes_in: 1 << 30,
            bytes_out: 1 << 30,
            memory_mib_ms: 1024 * 1000 * 3,
            cpu_ns: 1_500_000_000,
        };
        // 100 (fuel) + 15,000 (1.5 cpu-s) + 60 (3 GiB·s) + 200 (2 GiB) + 200 (1,000 calls)
        assert_eq!(cost_micros(&t), 15_560);
        assert_eq!(credit_micros(&t), 10_892);
        assert_eq!(cost_micros(&UsageTotals::default()), 0);
        let huge = UsageTotals {
            fuel: u64::MAX,
            bytes_in: u64::MAX,
            bytes_out: u64::MAX,
            ..Default::default()
        };
        assert!(cost_micros(&huge) > 0, "no overflow panic");
    }

    #[test]
    fn aggregating_first_never_costs_more() {
        let one = UsageTotals {
            invocations: 1,
            fuel: 99_999,
            ..Default::default()
        };
        let mut sum = UsageTotals::default();
        for _ in 0..10 {
            add(&mut sum, &one);
        }
        assert_eq!(cost_micros(&one) * 10, 0);
        assert_eq!(cost_micros(&sum), 9 + 2);
    }
}
