//! Cluster administration: `nodes`, `tenant create`, `token create|revoke`.

use stellar_proto::tokens::{new_token, token_hash};
use stellar_proto::v1 as pb;

use crate::connect::{Endpoint, node_id};

/// Arguments of `stellar nodes`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Reputation is a beta reputation with decay (scheduler/src/state/reputation.rs): a new node
starts at 0.80; recorded receipts and matching re-execution checks raise it; a mismatching
check, a refused receipt (forged, replayed, forked, badly signed, wrong output), timeouts and
streams lost mid-call lower it; evidence fades by 2% per receipt period. Placement scores by
it and skips nodes below 0.5; below 0.3 a node is quarantined (its instances re-placed) until
an admin returns it.")]
pub struct NodesArgs {
    /// Only nodes in this region.
    #[arg(long)]
    region: Option<String>,
    /// Only nodes in this state.
    #[arg(long, value_parser = ["ready", "draining", "down", "quarantined"])]
    state: Option<String>,
    /// Most nodes listed.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// Show each node's reputation and what it is made of: receipts recorded and refused
    /// (by reason), re-execution checks matched and mismatched, timeouts, lost streams.
    #[arg(long)]
    reputation: bool,
    #[command(flatten)]
    conn: Endpoint,
}

/// The refusal reasons counted in `refused` (by `ReceiptVerdict` number), as "REASON×N".
fn refusals(refused: &[u64]) -> String {
    let parts: Vec<String> = refused
        .iter()
        .enumerate()
        .filter(|&(v, &n)| n > 0 && v != pb::ReceiptVerdict::Duplicate as usize)
        .map(|(v, n)| {
            let name = pb::ReceiptVerdict::try_from(v as i32)
                .map(|v| {
                    v.as_str_name()
                        .trim_start_matches("RECEIPT_VERDICT_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| v.to_string());
            format!("{name}×{n}")
        })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

fn print_reputations(r: &pb::ListNodesResponse, json: bool) {
    if json {
        let v: Vec<_> = r
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "id": node_id(n.id), "state": state_name(n.state), "reputation": n.reputation,
                    "receipts_recorded": n.receipts_recorded, "receipt_seq": n.receipt_seq,
                    "receipts_refused": refusals(&n.receipts_refused),
                    "checks_matched": n.checks_matched, "checks_mismatched": n.checks_mismatched,
                    "timeouts": n.timeouts, "lost_streams": n.lost_streams,
                })
            })
            .collect();
        println!("{}", serde_json::json!({"nodes": v, "total": r.total}));
        return;
    }
    println!(
        "{:<18} {:<11} {:>6} {:>9} {:>8} {:>8} {:>8} {:>6}  REFUSED",
        "NODE", "STATE", "REPUTE", "RECEIPTS", "CHECK OK", "CHECK X", "TIMEOUTS", "LOST"
    );
    for n in &r.nodes {
        println!(
            "{:<18} {:<11} {:>6.2} {:>9} {:>8} {:>8} {:>8} {:>6}  {}",
            node_id(n.id),
            state_name(n.state),
            n.reputation,
            n.receipts_recorded,
            n.checks_matched,
            n.checks_mismatched,
            n.timeouts,
            n.lost_streams,
            refusals(&n.receipts_refused)
        );
    }
}

fn state_name(s: i32) -> &'static str {
    match pb::NodeState::try_from(s) {
        Ok(pb::NodeState::Ready) => "ready",
        Ok(pb::NodeState::Draining) => "draining",
        Ok(pb::NodeState::Down) => "down",
        Ok(pb::NodeState::Quarantined) => "quarantined",
        _ => "unknown",
    }
}

/// Lists nodes (admin).
pub async fn nodes(a: NodesArgs) -> Result<(), String> {
    let client = a.conn.connect()?;
    let state = match a.state.as_deref() {
        Some("ready") => pb::NodeState::Ready,
        Some("draining") => pb::NodeState::Draining,
        Some("down") => pb::NodeState::Down,
        Some("quarantined") => pb::NodeState::Quarantined,
        _ => pb::NodeState::Unspecified,
    } as i32;
    let region = a.region.clone().unwrap_or_default();
    let limit = a.limit;
    let r = client
        .call(|mut c| {
            let req = pb::ListNodesRequest {
                region: region.clone(),
                state,
                limit,
                read: None,
            };
            async move { c.list_nodes(req).await }
        })
        .await
        .map_err(|s| a.conn.explain("listing nodes", &s))?;
    if a.reputation {
        print_reputations(&r, a.conn.json());
        return Ok(());
    }
    if a.conn.json() {
        let v: Vec<_> = r
            .nodes
            .iter()
            .map(|n| {
                let at = n.attributes.clone().unwrap_or_default();
                let cap = at.capacity.unwrap_or_default();
                let used = n.allocated.unwrap_or_default();
                serde_json::json!({
                    "id": node_id(n.id), "region": at.region, "zone": at.zone, "arch": at.arch,
                    "state": state_name(n.state), "reputation": n.reputation,
                    "capacity": {"cpu_millis": cap.cpu_millis, "memory_mib": cap.memory_mib},
                    "allocated": {"cpu_millis": used.cpu_millis, "memory_mib": used.memory_mib},
                    "allocations": n.allocations, "gateway": n.gateway,
                })
            })
            .collect();
        println!("{}", serde_json::json!({"nodes": v, "total": r.total}));
        return Ok(());
    }
    println!(
        "{:<18} {:<10} {:<12} {:<8} {:<11} {:>6} {:>13} {:>15} {:>6}  GATEWAY",
        "NODE", "REGION", "ZONE", "ARCH", "STATE", "REPUTE", "CPU FREE", "MEMORY FREE", "ALLOCS"
    );
    for n in &r.nodes {
        let at = n.attributes.clone().unwrap_or_default();
        let cap = at.capacity.unwrap_or_default();
        let used = n.allocated.unwrap_or_default();
        println!(
            "{:<18} {:<10} {:<12} {:<8} {:<11} {:>6.2} {:>13} {:>15} {:>6}  {}",
            node_id(n.id),
            at.region,
            at.zone,
            at.arch,
            state_name(n.state),
            n.reputation,
            format!(
                "{}/{}m",
                cap.cpu_millis.saturating_sub(used.cpu_millis),
                cap.cpu_millis
            ),
            format!(
                "{}/{} MiB",
                cap.memory_mib.saturating_sub(used.memory_mib),
                cap.memory_mib
            ),
            n.allocations,
            if n.gateway.is_empty() {
                "-"
            } else {
                &n.gateway
            }
        );
    }
    if r.total as usize > r.nodes.len() {
        println!(
            "({} of {} nodes shown; --limit for more)",
            r.nodes.len(),
            r.total
        );
    }
    Ok(())
}

/// Subcommands of `stellar tenant`.
#[derive(Debug, clap::Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and its first API token (printed once; the cluster keeps only a hash).
    Create {
        /// The tenant's name (letters, digits, `-`, `_`).
        name: String,
        #[command(flatten)]
        conn: Endpoint,
    },
}

/// Subcommands of `stellar token`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create another API token for a tenant, or an admin token (printed once).
    Create {
        /// The tenant the token acts for.
        #[arg(long, required_unless_present = "admin")]
        tenant: Option<String>,
        /// An admin token instead (may act for any tenant and change the cluster).
        #[arg(long, conflicts_with = "tenant")]
        admin: bool,
        #[command(flatten)]
        conn: Endpoint,
    },
    /// Revoke a token: calls carrying it are refused from then on.
    Revoke {
        /// The token itself, or its sha256 in hex (as `token create -o json` printed).
        token: String,
        #[command(flatten)]
        conn: Endpoint,
    },
}

fn request_id(parts: &[&[u8]]) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()[..16].to_vec()
}

fn print_token(conn: &Endpoint, tenant: &str, admin: bool, token: &str) {
    let sha = hex::encode(token_hash(token));
    if conn.json() {
        println!(
            "{}",
            serde_json::json!({"tenant": tenant, "admin": admin, "token": token, "token_sha256": sha})
        );
    } else {
        println!("{token}");
        eprintln!(
            "this token is shown once (the cluster stores only its sha256 {}…); use it with --token or STELLAR_TOKEN",
            &sha[..12]
        );
    }
}

/// Runs `stellar tenant …`.
pub async fn tenant(cmd: TenantCommand) -> Result<(), String> {
    let TenantCommand::Create { name, conn } = cmd;
    let client = conn.connect()?;
    let token = new_token().map_err(|e| e.to_string())?;
    let sha = token_hash(&token).to_vec();
    let rid = request_id(&[b"tenant", name.as_bytes(), &sha]);
    client
        .call(|mut c| {
            let req = pb::CreateTenantRequest {
                request_id: rid.clone(),
                name: name.clone(),
                token_sha256: sha.clone(),
            };
            async move { c.create_tenant(req).await }
        })
        .await
        .map_err(|s| conn.explain(&format!("creating tenant `{name}`"), &s))?;
    print_token(&conn, &name, false, &token);
    Ok(())
}

/// Runs `stellar token …`.
pub async fn token(cmd: TokenCommand) -> Result<(), String> {
    match cmd {
        TokenCommand::Create {
            tenant,
            admin,
            conn,
        } => {
            let client = conn.connect()?;
            let token = new_token().map_err(|e| e.to_string())?;
            let sha = token_hash(&token).to_vec();
            let tenant = tenant.unwrap_or_default();
            let rid = request_id(&[b"token", &sha]);
            client
                .call(|mut c| {
                    let req = pb::CreateTokenRequest {
                        request_id: rid.clone(),
                        tenant: tenant.clone(),
                        token_sha256: sha.clone(),
                        admin,
                    };
                    async move { c.create_token(req).await }
                })
                .await
                .map_err(|s| conn.explain("creating a token", &s))?;
            print_token(&conn, &tenant, admin, &token);
            Ok(())
        }
        TokenCommand::Revoke { token, conn } => {
            let sha = match hex::decode(&token) {
                Ok(b) if b.len() == 32 => b,
                _ => token_hash(&token).to_vec(),
            };
            let client = conn.connect()?;
            let rid = request_id(&[b"revoke", &sha]);
            client
                .call(|mut c| {
                    let req = pb::RevokeTokenRequest {
                        request_id: rid.clone(),
                        token_sha256: sha.clone(),
                    };
                    async move { c.revoke_token(req).await }
                })
                .await
                .map_err(|s| conn.explain("revoking the token", &s))?;
            if conn.json() {
                println!("{}", serde_json::json!({"revoked": hex::encode(&sha)}));
            } else {
                println!("revoked token {}…", &hex::encode(&sha)[..12]);
            }
            Ok(())
        }
    }
}
