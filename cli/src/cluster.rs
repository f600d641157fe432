//! `stellar cluster`: membership and status of the control plane.

use crate::connect::Endpoint;
use stellar_proto::v1 as pb;

/// Subcommands of `stellar cluster`.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Show each replica's view: role, term, leader, commit and applied index.
    Status(Endpoint),
    /// Add a replica (started with `stellar scheduler --join`).
    Add {
        /// The new replica's id.
        #[arg(long)]
        id: u64,
        /// Its HOST:PORT.
        #[arg(long)]
        address: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Remove a replica (its process stops by itself).
    Remove {
        /// The replica's id.
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

/// Runs a `stellar cluster` subcommand.
pub async fn run(cmd: ClusterCommand) -> Result<(), String> {
    match cmd {
        ClusterCommand::Status(ep) => status(ep).await,
        ClusterCommand::Add {
            id,
            address,
            endpoint,
        } => {
            let c = endpoint.connect()?;
            let r = c
                .call(|mut cl| {
                    let address = address.clone();
                    async move { cl.add_replica(pb::AddReplicaRequest { id, address }).await }
                })
                .await
                .map_err(|s| format!("adding replica {id}: {}", s.message()))?;
            print_members(&r.replicas, &endpoint.output);
            Ok(())
        }
        ClusterCommand::Remove { id, endpoint } => {
            let c = endpoint.connect()?;
            let r = c
                .call(|mut cl| async move { cl.remove_replica(pb::RemoveReplicaRequest { id }).await })
                .await
                .map_err(|s| format!("removing replica {id}: {}", s.message()))?;
            print_members(&r.replicas, &endpoint.output);
            Ok(())
        }
    }
}

fn print_members(replicas: &[pb::ReplicaInfo], output: &str) {
    if output == "json" {
        let v: Vec<_> = replicas
            .iter()
            .map(|r| serde_json::json!({"id": r.id, "address": r.address, "voter": r.voter}))
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return;
    }
    println!("{:<4} {:<24} VOTER", "ID", "ADDRESS");
    for r in replicas {
        println!("{:<4} {:<24} {}", r.id, r.address, r.voter);
    }
}

async fn status(ep: Endpoint) -> Result<(), String> {
    let c = ep.connect()?;
    let mut rows = Vec::new();
    for e in c.endpoints() {
        let mut cl = c.client_for(e).map_err(|s| s.message().to_string())?;
        match cl.cluster_status(pb::ClusterStatusRequest {}).await {
            Ok(r) => rows.push((e.clone(), Ok(r.into_inner()))),
            Err(s) => rows.push((e.clone(), Err(s.message().to_string()))),
        }
    }
    if ep.output == "json" {
        let v: Vec<_> = rows
            .iter()
            .map(|(e, r)| match r {
                Ok(s) => serde_json::json!({
                    "endpoint": e, "id": s.id, "role": s.role, "term": s.term, "leader": s.leader,
                    "commit_index": s.commit_index, "applied_index": s.applied_index,
                    "snapshot_index": s.snapshot_index, "nodes": s.nodes,
                    "allocations": s.allocations, "functions": s.functions,
                }),
                Err(m) => serde_json::json!({"endpoint": e, "error": m}),
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!(
        "{:<22} {:<4} {:<10} {:>6} {:>6} {:>10} {:>10} {:>10}",
        "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "SNAPSHOT"
    );
    for (e, r) in rows {
        match r {
            Ok(s) => println!(
                "{:<22} {:<4} {:<10} {:>6} {:>6} {:>10} {:>10} {:>10}",
                e,
                s.id,
                s.role,
                s.term,
                s.leader,
                s.commit_index,
                s.applied_index,
                s.snapshot_index
            ),
            Err(m) => println!("{e:<22} unreachable: {m}"),
        }
    }
    Ok(())
}
