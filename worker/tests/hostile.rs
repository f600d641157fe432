//! The hardening of issue 11, each reproduced as a hostile client or a modified worker would
//! do it, against a real control plane (in-process, real gRPC on loopback) and real workers:
//! forged results, a worker that dies mid-call, a module that cannot load, CPU that ends in
//! a timeout, an output larger than the stream, and bad input of every kind.

#![allow(clippy::disallowed_methods)]

mod common;
mod rogue;

use std::time::{Duration, Instant};

use bytes::BufMut;
use common::{prebuilt, until};
use rogue::{Cluster, Rogue, attach_with, call, deploy_on, function, limits, registration};
use stellar_proto::v1 as pb;
use stellar_proto::v1::agent_client::AgentClient;
use stellar_worker::Identity;
use tokio::sync::mpsc;
use tonic::{Code, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_registration_cannot_be_replayed() {
    let c = Cluster::start().await;
    let me = Identity::load_or_create(&c.dir.path().join("me")).unwrap();
    let other = Identity::load_or_create(&c.dir.path().join("other")).unwrap();
    let mut client = AgentClient::connect(format!("http://{}", c.addr))
        .await
        .unwrap();
    let fresh = || {
        let mut client = client.clone();
        async move {
            client
                .challenge(pb::ChallengeRequest {})
                .await
                .unwrap()
                .into_inner()
                .nonce
        }
    };
    // The genuine registration, answering a fresh nonce, is accepted once.
    let reg = registration(&me, fresh().await);
    assert!(matches!(
        attach_with(&c.addr, reg.clone()).await,
        Ok(pb::control_message::Kind::Registered(_))
    ));
    // Captured and sent again: refused, its nonce is spent.
    let e = attach_with(&c.addr, reg).await.expect_err("a replay");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("nonce"), "{e:?}");
    // No nonce, or one this gateway never issued: refused.
    let e = attach_with(&c.addr, registration(&me, Vec::new()))
        .await
        .expect_err("no nonce");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = attach_with(&c.addr, registration(&me, vec![9; 32]))
        .await
        .expect_err("made up");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // A valid nonce signed by another key for this node's id: refused, and the nonce stays
    // good for the real node (a forger cannot spend it).
    let nonce = fresh().await;
    let mut forged = registration(&other, nonce.clone());
    forged.node = me.node();
    forged.public_key = me.public_key().to_vec();
    let e = attach_with(&c.addr, forged).await.expect_err("forged");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(matches!(
        attach_with(&c.addr, registration(&me, nonce)).await,
        Ok(pb::control_message::Kind::Registered(_))
    ));
    let _ = client.ping(pb::PingRequest::default()).await;
    c.stop().await;
}

fn error_code(s: &Status) -> &str {
    s.metadata()
        .get("x-stellar-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_result_is_refused_and_invocation_ids_are_unguessable() {
    let mut c = Cluster::start().await;
    let honest = c.worker("honest").await;
    let rogue = Rogue::attach(&c.addr, &c.dir.path().join("rogue")).await;
    c.admin
        .deploy(deploy_on("probe", prebuilt("probe"), "tier", limits(2000)))
        .await
        .expect("deploy");
    let first = until("the probe answers", || async {
        c.admin.invoke(call("probe", &["echo"])).await.ok()
    })
    .await;
    assert_eq!(first.node, honest);
    let id = String::from_utf8(first.invocation_id.clone()).unwrap();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    // A slow call is in flight on the honest node; the rogue answers it first with every id
    // it could guess from the one it saw (a per-process prefix and a counter used to be
    // enough).
    let slow = {
        let admin = c.admin.clone();
        tokio::spawn(async move { admin.invoke(call("probe", &["spin"])).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (prefix, counter) = id.split_at(16);
    let counter = u64::from_str_radix(counter, 16).unwrap_or(0);
    for guess in (0..8).map(|k| format!("{prefix}{:016x}", counter + k)) {
        rogue
            .send(pb::worker_message::Kind::Result(pb::InvocationResult {
                invocation_id: guess.into_bytes(),
                stdout: b"forged".to_vec(),
                ..Default::default()
            }))
            .await;
    }
    let answered = slow.await.unwrap().expect("the slow call is answered");
    assert_ne!(answered.stdout, b"forged", "a forged result was accepted");
    assert_eq!(answered.node, honest);
    // It ended as the honest node ran it (its deadline or its fuel, whichever came first).
    assert!(
        matches!(
            answered.error_code.as_str(),
            "DEADLINE_EXCEEDED" | "OUT_OF_FUEL"
        ),
        "{answered:?}"
    );
    // Ids share nothing guessable: another call's id has no common prefix with the first.
    let other = c.admin.invoke(call("probe", &["echo"])).await.unwrap();
    let other = String::from_utf8(other.invocation_id).unwrap();
    assert_ne!(other[..8], id[..8], "{id} then {other}");
    drop(rogue);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_worker_dies_is_run_once_and_not_retried() {
    let c = Cluster::start().await;
    let rogue_dir = c.dir.path().join("crashing");
    let mut rogue = Rogue::attach(&c.addr, &rogue_dir).await;
    c.admin
        .deploy(deploy_on("probe", prebuilt("probe"), "rogue", limits(2000)))
        .await
        .expect("deploy");
    // The worker crashes on every call it receives and comes straight back, as a node
    // whose function takes it down would.
    let (runs_tx, mut runs_rx) = mpsc::unbounded_channel();
    let addr = c.addr.clone();
    let crash_loop = tokio::spawn(async move {
        loop {
            if let Some(inv) = rogue.serve_until_invoked().await {
                let _ = runs_tx.send(inv.invocation_id);
            }
            drop(rogue);
            rogue = Rogue::attach(&addr, &rogue_dir).await;
        }
    });
    let started = Instant::now();
    let answer = c.admin.invoke(call("probe", &["echo"])).await;
    let elapsed = started.elapsed();
    let err = answer.expect_err("the worker died: the caller is told");
    assert_eq!(error_code(&err), "WORKER_LOST", "{err:?}");
    assert!(err.message().contains("may have run"), "{}", err.message());
    // Give a retry, were there one, time to reach the worker again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    crash_loop.abort();
    let mut runs = 0;
    while runs_rx.try_recv().is_ok() {
        runs += 1;
    }
    assert_eq!(
        runs, 1,
        "one call ran {runs} times (answered after {elapsed:?})"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_fails_to_load_is_replaced_elsewhere_then_fails_fast() {
    let mut c = Cluster::start().await;
    c.worker("a").await;
    c.worker("b").await;
    // Valid WebAssembly importing only WASI, but with a signature no WASI host provides:
    // the deploy-time check passes it, every worker's linker refuses it.
    let module = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func (param i64)))
             (memory (export "memory") 1)
             (func (export "_start")))"#,
    )
    .unwrap();
    c.admin
        .deploy(deploy_on("broken", module, "tier", limits(1000)))
        .await
        .expect("deploy");
    let status = until("both workers to fail loading it", || async {
        let f = function(&c.admin, "broken").await?;
        (f.load_failures >= 2).then_some(f)
    })
    .await;
    assert!(
        status.load_error.contains("fd_write"),
        "{}",
        status.load_error
    );
    assert!(status.allocations.is_empty(), "{:?}", status.allocations);
    // No node is left to try: calls fail at once with the typed error, not after a wait.
    let started = Instant::now();
    let err = c
        .admin
        .invoke(call("broken", &[]))
        .await
        .expect_err("a module that cannot load cannot answer");
    assert_eq!(error_code(&err), "MODULE_LOAD_FAILED", "{err:?}");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // `stellar logs` shows why.
    let logs = c
        .admin
        .call(|mut cl| async move {
            cl.get_logs(pb::GetLogsRequest {
                tenant: "acme".into(),
                name: "broken".into(),
                limit: 10,
            })
            .await
        })
        .await
        .unwrap();
    assert_eq!(logs.invocations[0].error_code, "MODULE_LOAD_FAILED");
    assert!(logs.invocations[0].error_message.contains("fd_write"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_that_ends_in_a_timeout_is_billed_and_credited() {
    let mut c = Cluster::start().await;
    let node = c.worker("w").await;
    c.admin
        .deploy(deploy_on("probe", prebuilt("probe"), "tier", limits(500)))
        .await
        .expect("deploy");
    let r = until("the spinning call to end", || async {
        c.admin.invoke(call("probe", &["spin"])).await.ok()
    })
    .await;
    assert_eq!(r.error_code, "DEADLINE_EXCEEDED", "{r:?}");
    let fuel = r.usage.expect("usage").fuel;
    assert!(
        fuel > 10_000_000,
        "half a second of a tight loop metered as {fuel} fuel"
    );
    let usage = until("the ledger to bill it", || async {
        let u = c
            .admin
            .call(|mut cl| async move {
                cl.get_usage(pb::GetUsageRequest {
                    tenant: "acme".into(),
                    ..Default::default()
                })
                .await
            })
            .await
            .ok()?;
        (u.bill
            .iter()
            .any(|l| l.function == "probe" && l.invocations >= 1))
        .then_some(u)
    })
    .await;
    let line = usage.bill.iter().find(|l| l.function == "probe").unwrap();
    assert!(line.fuel >= fuel && line.cost_micros > 0, "{line:?}");
    let credit = usage.credits.iter().find(|n| n.node == node).unwrap();
    assert!(credit.credit_micros > 0, "{credit:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_larger_than_the_stream_fails_only_its_call() {
    let mut c = Cluster::start().await;
    let node = c.worker("w").await;
    // A limit the stream cannot carry is refused at deploy, naming the field.
    let mut huge = limits(5000);
    huge.max_output_bytes = u32::MAX;
    let err = c
        .admin
        .deploy(deploy_on("probe", prebuilt("probe"), "tier", huge))
        .await
        .expect_err("4 GiB of output cannot travel back");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_output_bytes"),
        "{}",
        err.message()
    );
    // At the largest allowed limit, 20 MB of stdout fails that call alone.
    let mut max = limits(5000);
    max.max_output_bytes = stellar_proto::limits::MAX_OUTPUT_BYTES;
    c.admin
        .deploy(deploy_on("probe", prebuilt("probe"), "tier", max))
        .await
        .expect("deploy");
    let r = until("the big output", || async {
        c.admin
            .invoke(call("probe", &["out", "20000000"]))
            .await
            .ok()
    })
    .await;
    assert_eq!(r.error_code, "OUTPUT_TOO_LARGE", "{}", r.error_message);
    // The worker's stream survived: the next call runs on the same node.
    let next = c
        .admin
        .invoke(call("probe", &["echo", "after"]))
        .await
        .unwrap();
    assert_eq!(next.error_code, "", "{}", next.error_message);
    assert_eq!(next.node, node);
    c.stop().await;
}

/// Sends already-encoded request bytes, as a client with a broken encoder would.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug, Clone, Default)]
struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = pb::DeployResponse;
    type Encoder = RawEncoder;
    type Decoder = stellar_proto::codec::Decoder<pb::DeployResponse>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_typed_error_that_names_the_problem() {
    let mut c = Cluster::start().await;
    c.worker("w").await;
    let refused = |req: pb::DeployRequest| {
        let admin = c.admin.clone();
        async move { admin.deploy(req).await.expect_err("refused at deploy") }
    };
    let hello = || prebuilt("hello");
    // Modules that could never run.
    let component = b"\0asm\x0d\0\x01\0".to_vec();
    let truncated = hello()[..100].to_vec();
    let no_start = wat::parse_str(r#"(module (func (export "main")))"#).unwrap();
    let env_import =
        wat::parse_str(r#"(module (import "env" "abort" (func)) (func (export "_start")))"#)
            .unwrap();
    let big_memory = wat::parse_str(r#"(module (memory 2048) (func (export "_start")))"#).unwrap();
    for (module, says) in [
        (component, "component"),
        (truncated, "not valid WebAssembly"),
        (no_start, "_start"),
        (env_import, "env::abort"),
        (big_memory, "128 MiB"),
    ] {
        let e = refused(deploy_on("bad", module, "tier", limits(1000))).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{says}: {e:?}");
        assert!(e.message().contains(says), "{says}: {}", e.message());
    }
    // Limits out of range name the field, before any placement is tried.
    for (spoil, field) in [
        (
            (|l: &mut pb::FunctionLimits| l.memory_mib = 65_537) as fn(&mut _),
            "memory_mib",
        ),
        (
            |l: &mut pb::FunctionLimits| l.cpu_millis = 64_001,
            "cpu_millis",
        ),
        (|l: &mut pb::FunctionLimits| l.cpu_millis = 0, "cpu_millis"),
    ] {
        let mut l = limits(1000);
        spoil(&mut l);
        let e = refused(deploy_on("f", hello(), "tier", l)).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{}", e.message());
    }
    // A 1 MB name: refused with a short message (not echoed into the status header).
    let long = "a".repeat(1 << 20);
    let e = refused(deploy_on(&long, hello(), "tier", limits(1000))).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().len() < 1024, "{} bytes", e.message().len());
    let e = c.admin.invoke(call(&long, &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().len() < 1024);
    let mut long_id = deploy_on("f", hello(), "tier", limits(1000));
    long_id.request_id = vec![7; 65];
    let e = refused(long_id).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A name that is not UTF-8, as only a hand-built client can send.
    let mut bytes = prost::Message::encode_to_vec(&deploy_on("x", hello(), "tier", limits(1000)));
    // DeployRequest.name (field 2) comes first after the request id (empty): rewrite "x".
    let at = bytes
        .windows(3)
        .position(|w| w == [0x12, 0x01, b'x'])
        .unwrap();
    bytes[at + 2] = 0xff;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(bytes);
    let token = stellar_proto::tokens::read_admin_token(&c.dir.path().join("plane")).unwrap();
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let e = grpc
        .unary(
            req,
            tonic::codegen::http::uri::PathAndQuery::from_static("/stellar.v1.Control/Deploy"),
            RawCodec,
        )
        .await
        .expect_err("not UTF-8");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("DeployRequest"), "{}", e.message());
    // An instance that serves calls is committed RUNNING, not PENDING forever.
    c.admin
        .deploy(deploy_on("hello", hello(), "tier", limits(1000)))
        .await
        .unwrap();
    until("hello answers", || async {
        c.admin.invoke(call("hello", &[])).await.ok()
    })
    .await;
    until("the allocation to be committed running", || async {
        let f = function(&c.admin, "hello").await?;
        f.allocations
            .iter()
            .all(|a| a.state == pb::AllocationState::Running as i32)
            .then_some(())
    })
    .await;
    c.stop().await;
}
