//! `stellar receipts verify`: a node's owner checks, from the receipts their worker kept,
//! what the ledger credited in one period: the node's leaf is in the period's Merkle root
//! committed in Raft (an audit path, Certificate-Transparency style), and every receipt in
//! the leaf's range is in the worker's book, signed by the node and chained, adding up to
//! exactly that leaf.

use std::path::PathBuf;

use stellar_proto::v1 as pb;
use stellar_worker::Identity;

use crate::connect::{Endpoint, utc};

/// `stellar receipts ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ReceiptsCommand {
    /// Check a node's receipts for one period against the ledger's committed Merkle root.
    Verify(VerifyArgs),
}

/// Arguments of `stellar receipts verify`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The request is signed with the node's own key from --data-dir, so no token is needed (an
admin token works too). Periods are 5 minutes by default (`stellar scheduler
--receipt-period-ms`); a period's root is committed with the first usage recorded after it
ends. Exit status: 0 verified, 1 the receipts and the ledger disagree (the reason is
printed), 2 no proof could be fetched.")]
pub struct VerifyArgs {
    /// The worker's data directory: its identity key and its receipt book (`receipts/`).
    #[arg(long)]
    data_dir: PathBuf,
    /// The period (unix ms / period length) [default: the node's latest closed one].
    #[arg(long)]
    period: Option<u64>,
    #[command(flatten)]
    endpoint: Endpoint,
}

/// Runs a `stellar receipts` command; its exit status.
pub async fn run(cmd: ReceiptsCommand) -> Result<u8, String> {
    let ReceiptsCommand::Verify(args) = cmd;
    let identity = Identity::load(&args.data_dir).map_err(|e| e.to_string())?;
    let node = identity.node();
    let period = args.period.unwrap_or(0);
    let client = args.endpoint.connect()?;
    let unix_ms = stellar_proto::clock::unix_ms();
    let signature = identity.sign_proof_request(period, unix_ms).to_vec();
    let proof = client
        .call(|mut c| {
            let req = pb::GetReceiptProofRequest {
                node,
                period,
                unix_ms,
                signature: signature.clone(),
                read: None,
            };
            async move { c.get_receipt_proof(req).await }
        })
        .await;
    let proof = match proof {
        Ok(p) => p,
        Err(s) => {
            eprintln!(
                "{}",
                args.endpoint.explain("fetching the receipt proof", &s)
            );
            return Ok(2);
        }
    };
    let checked = stellar_worker::receipts::verify_period(
        &args.data_dir.join("receipts"),
        &identity.public_key(),
        &proof,
    );
    let json = args.endpoint.json();
    match checked {
        Ok(c) => {
            let l = &c.leaf;
            if json {
                let out = serde_json::json!({
                    "verified": true, "node": format!("{node:016x}"), "period": l.period,
                    "period_start_ms": l.period * proof.period_ms, "period_ms": proof.period_ms,
                    "receipts": l.receipts, "first_seq": l.first_seq, "last_seq": l.last_seq,
                    "fuel": l.fuel, "wall_us": l.wall_us, "bytes_in": l.bytes_in,
                    "bytes_out": l.bytes_out, "cpu_ns": l.cpu_ns,
                    "root": hex::encode(c.root), "leaf_index": proof.index, "tree_size": c.tree_size,
                });
                println!("{out}");
            } else {
                println!(
                    "verified: node {node:016x}, period {} (from {}, {} s)",
                    l.period,
                    utc(l.period * proof.period_ms),
                    proof.period_ms / 1000
                );
                println!(
                    "  {} receipts (seq {}..={}), fuel {}, wall {} µs, cpu {} ns, bytes in {} out {}",
                    l.receipts,
                    l.first_seq,
                    l.last_seq,
                    l.fuel,
                    l.wall_us,
                    l.cpu_ns,
                    l.bytes_in,
                    l.bytes_out
                );
                println!(
                    "  leaf {} of {} under the committed root {} ({} audit hashes)",
                    proof.index + 1,
                    c.tree_size,
                    hex::encode(c.root),
                    proof.audit_path.len()
                );
            }
            Ok(0)
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"verified": false, "reason": e.to_string()})
                );
            } else {
                eprintln!(
                    "NOT verified: node {node:016x}, period {}: {e}",
                    proof.period
                );
            }
            Ok(1)
        }
    }
}
