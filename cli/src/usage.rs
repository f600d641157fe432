//! `stellar usage`: the priced usage ledger, a bill per function and a credit per node.

use stellar_proto::v1 as pb;
use stellar_scheduler::client::ClusterClient;

use crate::cluster::Endpoint;

/// Arguments of `stellar usage`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Prices are integer micro-units (10^-6 of the billing currency); the price table is in
scheduler/src/pricing.rs: 1 per 100,000 fuel, 20 per GiB-s of memory, 100 per GiB
transferred, 200 per 1,000 invocations. Owners are credited 70% of their nodes' usage.")]
pub struct UsageArgs {
    /// Only this tenant's functions (default: every tenant).
    #[arg(long)]
    tenant: Option<String>,
    #[command(flatten)]
    endpoint: Endpoint,
}

/// Prints the bill and the credits.
pub async fn run(args: UsageArgs) -> Result<(), String> {
    let client =
        ClusterClient::new(&args.endpoint.endpoint).map_err(|s| s.message().to_string())?;
    let tenant = args.tenant.unwrap_or_default();
    let u = client
        .call(|mut c| {
            let req = pb::GetUsageRequest {
                tenant: tenant.clone(),
                read: None,
            };
            async move { c.get_usage(req).await }
        })
        .await
        .map_err(|s| {
            format!(
                "{} (is the control plane at {} up?)",
                s.message(),
                args.endpoint.endpoint.join(",")
            )
        })?;
    if args.endpoint.output == "json" {
        let bill: Vec<serde_json::Value> = u
            .bill
            .iter()
            .map(|l| {
                serde_json::json!({
                    "tenant": l.tenant, "function": l.function, "invocations": l.invocations,
                    "fuel": l.fuel, "wall_us": l.wall_us, "memory_mib_ms": l.memory_mib_ms,
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
                    "fuel": c.fuel, "credit_micros": c.credit_micros,
                })
            })
            .collect();
        let out =
            serde_json::json!({"bill": bill, "credits": credits, "total_micros": u.total_micros});
        println!("{out}");
        return Ok(());
    }
    println!(
        "{:<16} {:<20} {:>11} {:>14} {:>12} {:>12}",
        "TENANT", "FUNCTION", "INVOCATIONS", "FUEL", "BYTES", "COST µ"
    );
    for l in &u.bill {
        println!(
            "{:<16} {:<20} {:>11} {:>14} {:>12} {:>12}",
            l.tenant,
            l.function,
            l.invocations,
            l.fuel,
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
    Ok(())
}
