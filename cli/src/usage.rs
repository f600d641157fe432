//! `stellar usage`: the priced usage ledger, a bill per function and a credit per node.

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;

use crate::connect::{Endpoint, parse_since, utc};

/// Arguments of `stellar usage`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Prices are integer micro-units (10^-6 of the billing currency); the price table is in
scheduler/src/pricing.rs: 1 per 100,000 fuel (wasm), 10,000 per cpu-second (containers),
20 per GiB-s of memory, 100 per GiB transferred, 200 per 1,000 invocations. Each (function,
node, hour) cell is priced once; owners are credited 70% of it, the platform keeps the rest.

--audit (admin) reprices every cell and checks, to the micro-unit: each bill line, each
node's credit, the platform fee, bills = credits + fee, and that each node's cells hold
exactly what its recorded receipts add up to. Exit status 1 names each disagreement.")]
pub struct UsageArgs {
    /// Only this tenant's functions (admin tokens; default: every tenant). A tenant's token
    /// sees only its own bill.
    #[arg(long)]
    tenant: Option<String>,
    /// Only usage recorded since then: a duration back from now (`2h`, `7d`) or Unix ms.
    /// Usage is kept by the hour, so this counts from the start of that hour.
    #[arg(long, value_parser = parse_since)]
    since: Option<u64>,
    /// Check that the whole ledger adds up instead of printing it (admin; all tenants, all
    /// time).
    #[arg(long, conflicts_with_all = ["since", "tenant"])]
    audit: bool,
    #[command(flatten)]
    endpoint: Endpoint,
}

/// Prints the bill and the credits (or audits them); the exit status.
pub async fn run(args: UsageArgs) -> Result<u8, String> {
    let client: ClusterClient = args.endpoint.connect()?;
    let tenant = args.tenant.clone().unwrap_or_default();
    let since = args.since.unwrap_or(0);
    let u = client
        .call(|mut c| {
            let req = pb::GetUsageRequest {
                tenant: tenant.clone(),
                read: None,
                since_unix_ms: since,
                cells: args.audit,
            };
            async move { c.get_usage(req).await }
        })
        .await
        .map_err(|s| args.endpoint.explain("reading usage", &s))?;
    if args.audit {
        let a = stellar_scheduler::usage_audit::audit(&u);
        print_audit(&a, args.endpoint.json());
        return Ok(if a.balanced() { 0 } else { 1 });
    }
    if since > 0 && args.endpoint.output != "json" {
        println!("usage since {}", utc(since / 3_600_000 * 3_600_000));
    }
    print_usage(&u, args.endpoint.json());
    Ok(0)
}

fn print_audit(a: &stellar_scheduler::usage_audit::Audit, json: bool) {
    if json {
        let out = serde_json::json!({
            "balanced": a.balanced(), "cells": a.cells, "nodes": a.nodes,
            "bills_micros": a.bills_micros, "credits_micros": a.credits_micros,
            "platform_fee_micros": a.fee_micros, "unbilled_micros": a.unbilled_micros,
            "faults": a.faults,
        });
        println!("{out}");
        return;
    }
    println!(
        "audit of {} ledger cells and {} nodes' receipts (micro-units)",
        a.cells, a.nodes
    );
    println!("  bills    {:>16}", a.bills_micros);
    println!("  credits  {:>16}", a.credits_micros);
    println!("  fee      {:>16}", a.fee_micros);
    println!(
        "  unbilled {:>16}   (receipts and cells that differ, priced)",
        a.unbilled_micros
    );
    if a.balanced() {
        println!(
            "balanced: every cell repriced to its line, bills = credits + fee, every node's cells = its receipts"
        );
    } else {
        for f in &a.faults {
            println!("  FAULT: {f}");
        }
        println!("NOT balanced: {} faults", a.faults.len());
    }
}

/// Prints a priced ledger as a table or one JSON object.
pub fn print_usage(u: &pb::GetUsageResponse, json: bool) {
    if json {
        let bill: Vec<serde_json::Value> = u
            .bill
            .iter()
            .map(|l| {
                serde_json::json!({
                    "tenant": l.tenant, "function": l.function, "invocations": l.invocations,
                    "fuel": l.fuel, "cpu_ns": l.cpu_ns, "wall_us": l.wall_us, "memory_mib_ms": l.memory_mib_ms,
                    "bytes_in": l.bytes_in, "bytes_out": l.bytes_out, "cost_micros": l.cost_micros,
                })
            })
            .collect();
        let credits: Vec<serde_json::Value> = u
            .credits
            .iter()
            .map(|c| {
                serde_json::json!({
                    "node": format!("{:016x}", c.node), "invocations": c.invocations,
                    "fuel": c.fuel, "cpu_ns": c.cpu_ns, "credit_micros": c.credit_micros,
                })
            })
            .collect();
        let out =
            serde_json::json!({"bill": bill, "credits": credits, "total_micros": u.total_micros});
        println!("{out}");
        return;
    }
    println!(
        "{:<16} {:<20} {:>11} {:>14} {:>10} {:>12} {:>12}",
        "TENANT", "FUNCTION", "INVOCATIONS", "FUEL", "CPU S", "BYTES", "COST µ"
    );
    for l in &u.bill {
        println!(
            "{:<16} {:<20} {:>11} {:>14} {:>10.3} {:>12} {:>12}",
            l.tenant,
            l.function,
            l.invocations,
            l.fuel,
            l.cpu_ns as f64 / 1e9,
            l.bytes_in + l.bytes_out,
            l.cost_micros
        );
    }
    println!("total {} micro-units", u.total_micros);
    if !u.credits.is_empty() {
        println!();
        println!(
            "{:<18} {:>11} {:>14} {:>12}",
            "NODE", "INVOCATIONS", "FUEL", "CREDIT µ"
        );
        for c in &u.credits {
            println!(
                "{:<18} {:>11} {:>14} {:>12}",
                format!("{:016x}", c.node),
                c.invocations,
                c.fuel,
                c.credit_micros
            );
        }
    }
}
