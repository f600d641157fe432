//! `stellar usage --audit`: checks the ledger adds up, to the micro-unit. Every cell (one
//! per function, node and hour) is repriced with the price table; the bills, the credits
//! and the platform fee the ledger reports must be exactly those sums, the bills must equal
//! the credits plus the fee, and each node's cells must add up to exactly what its recorded
//! receipts do (usage without a receipt, or a receipt without usage, is residue).

use std::collections::BTreeMap;

use crate::pricing;
use crate::state::UsageTotals;
use stellar_proto::v1 as pb;

/// What the audit found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Audit {
    /// Cells repriced.
    pub cells: usize,
    /// The bills' total, as the ledger reports it.
    pub bills_micros: u64,
    /// The credits' total, as reported.
    pub credits_micros: u64,
    /// The platform fee, as reported.
    pub fee_micros: u64,
    /// Nodes whose receipts were compared with their cells.
    pub nodes: usize,
    /// The price of the usage that is in receipts but not in cells, or the other way
    /// round (0 when every receipt is billed once and nothing else is).
    pub unbilled_micros: u64,
    /// Every disagreement, in words.
    pub faults: Vec<String>,
}

impl Audit {
    /// Whether the ledger balances.
    pub fn balanced(&self) -> bool {
        self.faults.is_empty()
    }
}

fn totals(u: &pb::UsageTotal) -> UsageTotals {
    UsageTotals::of(u)
}

/// Audits a whole-ledger answer (`GetUsage` with `cells`, all time, every tenant).
pub fn audit(u: &pb::GetUsageResponse) -> Audit {
    let mut a = Audit {
        cells: u.cells.len(),
        bills_micros: u.bill.iter().map(|l| l.cost_micros).sum(),
        credits_micros: u.credits.iter().map(|c| c.credit_micros).sum(),
        fee_micros: u.platform_fee_micros,
        nodes: u.receipts.len(),
        ..Default::default()
    };
    let mut bills: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut credits: BTreeMap<u64, u64> = BTreeMap::new();
    let mut fee = 0u64;
    // Function usage per node (jobs' tasks carry no receipts yet).
    let mut by_node: BTreeMap<u64, UsageTotals> = BTreeMap::new();
    for c in &u.cells {
        let t = totals(c);
        let (cost, credit, f) = pricing::price_cell(&t);
        *bills.entry((&c.tenant, &c.function)).or_default() += cost;
        *credits.entry(c.node).or_default() += credit;
        fee += f;
        if !c.function.starts_with("job/") {
            pricing::add(by_node.entry(c.node).or_default(), &t);
        }
    }
    for l in &u.bill {
        let want = bills
            .remove(&(l.tenant.as_str(), l.function.as_str()))
            .unwrap_or(0);
        if want != l.cost_micros {
            a.faults.push(format!(
                "bill {}/{}: the ledger says {} micro-units, its cells reprice to {want}",
                l.tenant, l.function, l.cost_micros
            ));
        }
    }
    for ((t, f), m) in bills {
        a.faults.push(format!(
            "cells of {t}/{f} ({m} micro-units) are on no bill line"
        ));
    }
    for c in &u.credits {
        let want = credits.remove(&c.node).unwrap_or(0);
        if want != c.credit_micros {
            a.faults.push(format!(
                "credit of node {:016x}: the ledger says {} micro-units, its cells reprice to {want}",
                c.node, c.credit_micros
            ));
        }
    }
    for (n, m) in credits {
        a.faults.push(format!(
            "cells of node {n:016x} ({m} micro-units) are credited to no one"
        ));
    }
    if fee != u.platform_fee_micros {
        a.faults.push(format!(
            "platform fee: the ledger says {} micro-units, the cells reprice to {fee}",
            u.platform_fee_micros
        ));
    }
    if a.bills_micros != a.credits_micros + a.fee_micros {
        a.faults.push(format!(
            "bills {} ≠ credits {} + fee {}",
            a.bills_micros, a.credits_micros, a.fee_micros
        ));
    }
    let mut receipts: BTreeMap<u64, UsageTotals> =
        u.receipts.iter().map(|r| (r.node, totals(r))).collect();
    let nodes: std::collections::BTreeSet<u64> =
        receipts.keys().chain(by_node.keys()).copied().collect();
    for n in nodes {
        let (got, want) = (
            by_node.remove(&n).unwrap_or_default(),
            receipts.remove(&n).unwrap_or_default(),
        );
        if got != want {
            let diff = |a: u64, b: u64| a.abs_diff(b);
            let residue = UsageTotals {
                invocations: diff(got.invocations, want.invocations),
                fuel: diff(got.fuel, want.fuel),
                wall_us: diff(got.wall_us, want.wall_us),
                bytes_in: diff(got.bytes_in, want.bytes_in),
                bytes_out: diff(got.bytes_out, want.bytes_out),
                memory_mib_ms: diff(got.memory_mib_ms, want.memory_mib_ms),
                cpu_ns: diff(got.cpu_ns, want.cpu_ns),
            };
            a.unbilled_micros += pricing::cost_micros(&residue);
            a.faults.push(format!(
                "node {n:016x}: its cells hold {} invocations / {} fuel, its recorded receipts {} / {}",
                got.invocations, got.fuel, want.invocations, want.fuel
            ));
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(tenant: &str, function: &str, node: u64, hour: u64, fuel: u64) -> pb::UsageTotal {
        pb::UsageTotal {
            tenant: tenant.into(),
            function: function.into(),
            node,
            hour,
            invocations: 1,
            fuel,
            ..Default::default()
        }
    }

    /// A ledger answer as the replica builds it from `cells` and `receipts`.
    fn ledger(cells: Vec<pb::UsageTotal>, receipts: Vec<pb::UsageTotal>) -> pb::GetUsageResponse {
        let mut u = pb::GetUsageResponse::default();
        let mut bill: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut credit: BTreeMap<u64, u64> = BTreeMap::new();
        for c in &cells {
            let (cost, cr, fee) = pricing::price_cell(&UsageTotals::of(c));
            *bill
                .entry((c.tenant.clone(), c.function.clone()))
                .or_default() += cost;
            *credit.entry(c.node).or_default() += cr;
            u.platform_fee_micros += fee;
        }
        u.bill = bill
            .into_iter()
            .map(|((tenant, function), cost_micros)| pb::UsageLine {
                tenant,
                function,
                cost_micros,
                ..Default::default()
            })
            .collect();
        u.credits = credit
            .into_iter()
            .map(|(node, credit_micros)| pb::NodeCredit {
                node,
                credit_micros,
                ..Default::default()
            })
            .collect();
        u.cells = cells;
        u.receipts = receipts;
        u
    }

    fn receipt_totals(node: u64, invocations: u64, fuel: u64) -> pb::UsageTotal {
        pb::UsageTotal {
            node,
            invocations,
            fuel,
            ..Default::default()
        }
    }

    #[test]
    fn a_ledger_that_adds_up_balances_and_every_kind_of_drift_is_named() {
        let cells = vec![
            cell("acme", "f", 1, 10, 123_456_789),
            cell("acme", "f", 2, 10, 7_000_001),
            cell("globex", "g", 1, 11, 99_999_999),
        ];
        let receipts = vec![
            receipt_totals(1, 2, 123_456_789 + 99_999_999),
            receipt_totals(2, 1, 7_000_001),
        ];
        let good = ledger(cells.clone(), receipts.clone());
        let a = audit(&good);
        assert!(a.balanced(), "{a:?}");
        assert_eq!(a.bills_micros, a.credits_micros + a.fee_micros);
        assert_eq!((a.cells, a.nodes, a.unbilled_micros), (3, 2, 0));
        // A bill line off by one micro-unit.
        let mut off = good.clone();
        off.bill[0].cost_micros += 1;
        assert_eq!(
            audit(&off).faults.len(),
            2,
            "the line and the sum: {:?}",
            audit(&off)
        );
        // A credit the cells do not hold.
        let mut credited = good.clone();
        credited.credits.push(pb::NodeCredit {
            node: 9,
            credit_micros: 5,
            ..Default::default()
        });
        assert!(!audit(&credited).balanced());
        // Usage billed without a receipt: residue, priced.
        let mut unreceipted = cells.clone();
        unreceipted.push(cell("acme", "f", 2, 12, 50_000_000));
        let a = audit(&ledger(unreceipted, receipts));
        assert!(!a.balanced());
        assert_eq!(a.unbilled_micros, 500, "{a:?}");
        // Jobs' cells carry no receipts and are not compared with them.
        let mut jobs = cells;
        jobs.push(cell("acme", "job/render", 2, 12, 1_000));
        let a = audit(&ledger(
            jobs,
            vec![
                receipt_totals(1, 2, 223_456_788),
                receipt_totals(2, 1, 7_000_001),
            ],
        ));
        assert!(a.balanced(), "{a:?}");
    }
}
