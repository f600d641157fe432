//! Issue 15, usage only from issued work, tried as a modified worker would: against a real
//! control plane (in-process, real gRPC on loopback), a rogue node with a real identity
//! answers the call it was issued with a genuine signed receipt, then reports inflated
//! fuel, another tenant's function, a made-up ticket, a replay, and a receipt signed by
//! another key. Only the genuine receipt is billed; each forgery is refused with its verdict
//! and counted against the rogue in the replicated ledger.

#![allow(clippy::disallowed_methods)]

mod common;
mod rogue;

use common::{prebuilt, until};
use rogue::{Cluster, Rogue, call, deploy_on, limits};
use sha2::{Digest, Sha256};
use stellar_proto::receipts::{GENESIS, receipt_hash, seal_ticket};
use stellar_proto::v1 as pb;
use stellar_proto::v1::ReceiptVerdict as V;
use stellar_worker::Identity;

/// The rogue's own receipt chain, signed with a real node key.
struct Chain {
    id: Identity,
    seq: u64,
    head: [u8; 32],
}

impl Chain {
    fn sign(&mut self, mut r: pb::Receipt) -> pb::Receipt {
        self.seq += 1;
        r.seq = self.seq;
        r.prev_hash = self.head.to_vec();
        r.signature = self.id.sign_receipt(&r).to_vec();
        self.head = receipt_hash(&r);
        r
    }
}

/// `node` as `ListNodes` shows it.
async fn node_info(c: &Cluster, node: u64) -> Option<pb::NodeInfo> {
    c.admin
        .nodes()
        .await
        .ok()?
        .into_iter()
        .find(|n| n.id == node)
}

async fn bill(c: &Cluster, tenant: &str) -> Vec<pb::UsageLine> {
    let tenant = tenant.to_string();
    c.admin
        .call(|mut cl| {
            let tenant = tenant.clone();
            async move {
                cl.get_usage(pb::GetUsageRequest {
                    tenant,
                    ..Default::default()
                })
                .await
            }
        })
        .await
        .map(|u| u.bill)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_receipt_of_issued_work_is_billed_and_forgeries_count_against_the_node() {
    let c = Cluster::start().await;
    c.admin.create_tenant("globex").await.expect("tenant");
    let dir = c.dir.path().join("rogue");
    let mut rogue = Rogue::attach(&c.addr, &dir).await;
    let id = Identity::load_or_create(&dir).unwrap();
    let node = id.node();
    c.admin
        .deploy(deploy_on("probe", prebuilt("probe"), "rogue", limits(5000)))
        .await
        .expect("deploy");
    let caller = {
        let admin = c.admin.clone();
        tokio::spawn(async move {
            until("the call to be answered", || async {
                admin.invoke(call("probe", &["echo"])).await.ok()
            })
            .await
        })
    };
    let inv = rogue.serve_until_invoked().await.expect("an invocation");
    let ticket = inv.ticket.clone().expect("every call carries a ticket");
    assert_eq!(
        (
            ticket.node,
            ticket.tenant.as_str(),
            ticket.function.as_str()
        ),
        (node, "acme", "probe")
    );
    assert_eq!(ticket.invocation_id, inv.invocation_id);
    assert_eq!(ticket.mac.len(), 32, "{ticket:?}");

    // The genuine answer: billed as signed.
    let mut chain = Chain {
        id: Identity::load_or_create(&dir).unwrap(),
        seq: 0,
        head: GENESIS,
    };
    let stdout = b"hello".to_vec();
    let genuine = chain.sign(pb::Receipt {
        ticket: Some(ticket.clone()),
        output_sha256: Sha256::digest(&stdout).to_vec(),
        fuel: 1_000_000,
        wall_us: 900,
        ..Default::default()
    });
    rogue
        .send(pb::worker_message::Kind::Result(pb::InvocationResult {
            invocation_id: inv.invocation_id.clone(),
            stdout: stdout.clone(),
            receipt: Some(genuine.clone()),
            ..Default::default()
        }))
        .await;
    let answered = caller.await.unwrap();
    assert_eq!(answered.stdout, stdout);
    assert_eq!(answered.usage.as_ref().map(|u| u.fuel), Some(1_000_000));
    until("the genuine receipt to be billed", || async {
        bill(&c, "acme")
            .await
            .iter()
            .any(|l| l.function == "probe" && l.invocations == 1)
            .then_some(())
    })
    .await;

    // Forgeries, each as a modified worker would send it.
    let mut inflated = genuine.clone();
    inflated.fuel += 100_000; // 10% more after signing
    let mut other_tenant = genuine.clone();
    if let Some(t) = other_tenant.ticket.as_mut() {
        (t.tenant, t.function) = ("globex".into(), "other".into());
        t.invocation_id = b"00000000000000000000000000000001".to_vec();
    }
    other_tenant.signature = id.sign_receipt(&other_tenant).to_vec();
    let mut made_up = pb::Ticket {
        invocation_id: b"00000000000000000000000000000002".to_vec(),
        tenant: "acme".into(),
        function: "probe".into(),
        node,
        ..Default::default()
    };
    seal_ticket(&[0x42; 32], &mut made_up); // a key it guessed
    let mut guessed = genuine.clone();
    guessed.ticket = Some(made_up);
    guessed.signature = id.sign_receipt(&guessed).to_vec();
    let duplicate = genuine.clone();
    // The same call billed again as the next link of the chain.
    let replay = chain.sign(pb::Receipt {
        ticket: Some(ticket.clone()),
        output_sha256: genuine.output_sha256.clone(),
        fuel: 1_000_000,
        ..Default::default()
    });
    let other_key = Identity::load_or_create(&c.dir.path().join("someone-else")).unwrap();
    let mut borrowed = genuine.clone();
    borrowed.signature = other_key.sign_receipt(&borrowed).to_vec();
    rogue
        .send(pb::worker_message::Kind::Usage(pb::UsageReport {
            receipts: vec![inflated, other_tenant, guessed, duplicate, replay, borrowed],
        }))
        .await;

    let info = until("the forgeries to be counted", || async {
        let n = node_info(&c, node).await?;
        (n.receipts_refused.iter().sum::<u64>() >= 5).then_some(n)
    })
    .await;
    let refused = |v: V| info.receipts_refused.get(v as usize).copied().unwrap_or(0);
    assert_eq!(refused(V::BadSignature), 2, "{info:?}");
    assert_eq!(refused(V::ForgedTicket), 2, "{info:?}");
    assert_eq!(refused(V::Replay), 1, "{info:?}");
    assert_eq!(
        refused(V::Duplicate),
        0,
        "an exact duplicate is no fault: {info:?}"
    );
    assert_eq!(
        (info.receipts_recorded, info.receipt_seq),
        (1, 1),
        "{info:?}"
    );
    // Nothing but the genuine receipt was billed, to anyone.
    let acme = bill(&c, "acme").await;
    let probe = acme.iter().find(|l| l.function == "probe").unwrap();
    assert_eq!((probe.invocations, probe.fuel), (1, 1_000_000), "{acme:?}");
    assert!(bill(&c, "globex").await.is_empty());
    drop(rogue);
    c.stop().await;
}

/// A receipt proof for `node`, asked as its owner would: no token, signed by the node key.
async fn proof_signed_by(
    addr: &str,
    id: &Identity,
    node: u64,
    period: u64,
) -> Result<pb::GetReceiptProofResponse, tonic::Status> {
    let unix_ms = stellar_proto::clock::unix_ms();
    let req = pb::GetReceiptProofRequest {
        node,
        period,
        unix_ms,
        signature: id.sign_proof_request(period, unix_ms).to_vec(),
        read: None,
    };
    stellar_proto::client::ClusterClient::new(&[addr.to_string()])
        .unwrap()
        .call(|mut c| {
            let req = req.clone();
            async move { c.get_receipt_proof(req).await }
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_proves_from_the_kept_receipts_what_a_closed_period_credited() {
    let mut c = Cluster::start().await;
    let node = c.worker("honest").await;
    let dir = c.dir.path().join("honest");
    c.admin
        .deploy(deploy_on("probe", prebuilt("probe"), "tier", limits(2000)))
        .await
        .expect("deploy");
    let mut fuel = 0;
    for _ in 0..5 {
        let r = until("the probe answers", || async {
            c.admin.invoke(call("probe", &["echo"])).await.ok()
        })
        .await;
        fuel += r.usage.expect("usage from the receipt").fuel;
    }
    // The test plane's periods are 2 s: wait for a later one, and record usage in it
    // (that closes the period the calls were recorded in).
    let owner = Identity::load(&dir).unwrap();
    let proof = until("a closed period with this node's receipts", || async {
        let _ = c.admin.invoke(call("probe", &["echo"])).await;
        proof_signed_by(&c.addr, &owner, node, 0).await.ok()
    })
    .await;
    let check =
        stellar_worker::receipts::verify_period(&dir.join("receipts"), &owner.public_key(), &proof)
            .expect("the kept receipts match the committed leaf");
    assert_eq!(check.leaf.node, node);
    assert!(
        check.leaf.receipts >= 1 && check.leaf.fuel > 0,
        "{:?}",
        check.leaf
    );
    // Every call was billed from its receipt (the probe's echo costs the same each time).
    assert!(
        fuel > 0 && check.leaf.fuel.is_multiple_of(fuel / 5),
        "{:?} vs {fuel}",
        check.leaf
    );

    // Someone else's key cannot ask for this node's proof.
    let stranger = Identity::load_or_create(&c.dir.path().join("stranger")).unwrap();
    let denied = proof_signed_by(&c.addr, &stranger, node, proof.period)
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unauthenticated, "{denied:?}");
    // A ledger that claimed more than the receipts say is caught, and so is a root that
    // does not hold the leaf.
    let mut inflated = proof.clone();
    if let Some(l) = inflated.leaf.as_mut() {
        l.fuel += 1;
    }
    let err = stellar_worker::receipts::verify_period(
        &dir.join("receipts"),
        &owner.public_key(),
        &inflated,
    )
    .unwrap_err();
    assert_eq!(err, stellar_worker::receipts::ProofMismatch::NotInRoot);
    // A book missing receipts the ledger recorded cannot prove them.
    let empty = c.dir.path().join("empty-book");
    std::fs::create_dir_all(&empty).unwrap();
    let err =
        stellar_worker::receipts::verify_period(&empty, &owner.public_key(), &proof).unwrap_err();
    assert!(
        matches!(
            err,
            stellar_worker::receipts::ProofMismatch::Missing { kept: 0, .. }
        ),
        "{err:?}"
    );
    c.stop().await;
}

/// Serves every call the rogue gets with a wrong output and a receipt that is otherwise
/// genuine (signed, chained, its output hash that of the wrong output): only re-execution
/// elsewhere can tell.
async fn serve_wrong_outputs(mut rogue: Rogue, mut chain: Chain) {
    use pb::control_message::Kind;
    while let Some(k) = rogue.next().await {
        match k {
            Kind::Assignment(a) if a.start => {
                rogue
                    .send(pb::worker_message::Kind::Allocation(pb::AllocationUpdate {
                        allocation: a.allocation,
                        state: pb::AllocationState::Running as i32,
                        message: String::new(),
                    }))
                    .await;
            }
            Kind::Invocation(inv) => {
                let stdout = b"not what the function says".to_vec();
                let receipt = chain.sign(pb::Receipt {
                    ticket: inv.ticket.clone(),
                    output_sha256: Sha256::digest(&stdout).to_vec(),
                    fuel: 4_242,
                    ..Default::default()
                });
                rogue
                    .send(pb::worker_message::Kind::Result(pb::InvocationResult {
                        invocation_id: inv.invocation_id,
                        stdout,
                        receipt: Some(receipt),
                        ..Default::default()
                    }))
                    .await;
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_returning_wrong_outputs_is_caught_by_re_execution_and_quarantined() {
    let mut c = Cluster::start().await;
    let honest = [c.worker("honest-1").await, c.worker("honest-2").await];
    let dir = c.dir.path().join("rogue");
    let rogue = Rogue::attach(&c.addr, &dir).await;
    let id = Identity::load_or_create(&dir).unwrap();
    let node = id.node();
    tokio::spawn(serve_wrong_outputs(
        rogue,
        Chain {
            id,
            seq: 0,
            head: GENESIS,
        },
    ));
    c.admin
        .deploy(pb::DeployRequest {
            name: "probe".into(),
            module: prebuilt("probe"),
            limits: Some(limits(5000)),
            replicas: 3,
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("deploy");
    // A few calls per poll (a third go to the rogue; every call is checked while the nodes
    // are on probation); a shared CI machine may be slow, so up to two minutes.
    let start = std::time::Instant::now();
    let caught = loop {
        for _ in 0..5 {
            let _ = c.admin.invoke(call("probe", &["echo"])).await;
        }
        if let Some(n) = node_info(&c, node)
            .await
            .filter(|n| n.state == pb::NodeState::Quarantined as i32)
        {
            break n;
        }
        let nodes = c.admin.nodes().await.unwrap_or_default();
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "the rogue was not quarantined: {nodes:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(caught.checks_mismatched >= 1, "{caught:?}");
    assert!(caught.reputation < 0.3, "{caught:?}");
    // The honest nodes are in good standing, and their checks agreed.
    let nodes = c.admin.nodes().await.unwrap();
    for h in honest {
        let n = nodes.iter().find(|n| n.id == h).unwrap();
        assert_eq!(n.state, pb::NodeState::Ready as i32, "{n:?}");
        assert_eq!(n.checks_mismatched, 0, "{n:?}");
    }
    // The re-runs are the platform's cost: a `checks` line with no tenant.
    let platform = bill(&c, "").await;
    let checks = platform
        .iter()
        .find(|l| l.tenant.is_empty() && l.function == "checks");
    assert!(checks.is_some_and(|l| l.invocations >= 1), "{platform:?}");
    // Once quarantined, no call goes to the rogue again.
    for _ in 0..10 {
        if let Ok(r) = c.admin.invoke(call("probe", &["echo"])).await {
            assert_ne!(r.node, node, "a call went to the quarantined node");
        }
    }
    c.stop().await;
}
