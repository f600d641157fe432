//! `stellar usage`: the priced usage ledger, a bill per function and a credit per node.

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;

use crate::connect::{Endpoint, parse_since, utc};

/// Arguments of `stellar usage`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Prices are integer micro-units (10^-6 of the billing currency); the price table is in
scheduler/src/pricing.rs: 1 per 100,000 fuel (wasm), 10,000 per cpu-second (containers),
20 per GiB-s of memory, 100 per GiB transferred, 200 per 1,000 invocations. Owners are credited 70% of their nodes' usage.")]
pub struct UsageArgs {
    /// Only this tenant's functions (admin tokens; default: every tenant). A tenant's token
    /// sees only its own bill.
    #[arg(long)]
    tenant: Option<String>,
    /// Only usage recorded since then: a duration back from now (`2h`, `7d`) or Unix ms.
    /// Usage is kept by the hour, so this counts from the start of that hour.
    #[arg(long, value_parser = parse_since)]
    since: Option<u64>,
    #[command(flatten)]
    endpoint: Endpoint,
}

/// Prints the bill and the credits.
pub async fn run(args: UsageArgs) -> Result<(), String> {
    let client: ClusterClient = args.endpoint.connect()?;
    let tenant = args.tenant.clone().unwrap_or_default();
    let since = args.since.unwrap_or(0);
    let u = client
        .call(|mut c| {
            let req = pb::GetUsageRequest {
                tenant: tenant.clone(),
                read: None,
                since_unix_ms: since,
            };
            async move { c.get_usage(req).await }
        })
        .await
        .map_err(|s| args.endpoint.explain("reading usage", &s))?;
    if since > 0 && args.endpoint.output != "json" {
        println!("usage since {}", utc(since / 3_600_000 * 3_600_000));
    }
    print_usage(&u, args.endpoint.json());
    Ok(())
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
