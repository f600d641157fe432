//! `stellar demo`: the whole system in one command. It starts the embedded default cluster
//! (one control-plane replica, three workers in three regions) in a temporary directory,
//! deploys the example functions (their committed wasm32-wasip1 builds are inside this
//! binary), shows where each replica went and why, invokes them over gRPC and HTTP, places a
//! scaled-to-zero function on its first call, shows tenant isolation and prints the bill.

use std::time::Duration;

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::connect::node_id;
use crate::dev::{DEV_TENANT, DevCluster, DevOptions};

/// The example functions, as committed in `examples/wasm/prebuilt` (reproducible builds of
/// `examples/wasm/*`; `scripts/build-examples.sh` checks they match their sources).
const HELLO: &[u8] = include_bytes!("../../examples/wasm/prebuilt/hello.wasm");
const WORDCOUNT: &[u8] = include_bytes!("../../examples/wasm/prebuilt/wordcount.wasm");
const FRAMEFILTER: &[u8] = include_bytes!("../../examples/wasm/prebuilt/framefilter.wasm");

const TEXT: &str = "the quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs \
and the home nodes of a city count the words of the text near the people who asked";

/// Arguments of `stellar demo`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Needs nothing but this binary: free loopback ports, a temporary \
directory (removed afterwards, or kept with --keep), and a few seconds."
)]
pub struct DemoArgs {
    /// Keep the demo's data directory instead of removing it.
    #[arg(long)]
    keep: bool,
}

fn free_addr() -> Result<std::net::SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free loopback port: {e}"))
}

fn step(n: u32, what: &str) {
    println!("\n[{n}/7] {what}");
}

/// Runs the demo; Ok once every step worked.
pub async fn run(a: DemoArgs) -> Result<(), String> {
    let started = stellar_proto::clock::now();
    let dir = std::env::temp_dir().join(format!("stellar-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = DevOptions {
        data_dir: dir.clone(),
        workers: 3,
        listen: free_addr()?,
        http_listen: free_addr()?,
        replica_listen: free_addr()?,
        slots: 16,
    };
    step(
        1,
        "starting the embedded default: 1 control-plane replica + 3 workers",
    );
    let c = DevCluster::start(&o).await?;
    println!(
        "      control plane {} (HTTP {}), workers in cn-east/shanghai, cn-south/guangzhou, cn-north/beijing",
        c.endpoint, c.http
    );
    let result = scenario(&c).await;
    let stopped = c.stop().await;
    if !a.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("data kept in {}", dir.display());
    }
    result?;
    stopped?;
    println!(
        "\ndemo finished in {:.1} s: every step worked.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn deploy(
    client: &ClusterClient,
    name: &str,
    module: &[u8],
    memory: u32,
    replicas: u32,
    near: Option<(&str, &str)>,
) -> Result<pb::DeployResponse, String> {
    let req = pb::DeployRequest {
        request_id: format!("demo-{name}").into_bytes(),
        name: name.into(),
        module: module.to_vec(),
        limits: Some(pb::FunctionLimits {
            cpu_millis: 100,
            memory_mib: memory,
            timeout_ms: 5000,
            ..Default::default()
        }),
        replicas,
        idempotent: true,
        near_region: near.map(|n| n.0.to_string()).unwrap_or_default(),
        near_zone: near.map(|n| n.1.to_string()).unwrap_or_default(),
        ..Default::default()
    };
    client
        .deploy(req)
        .await
        .map_err(|s| format!("deploying `{name}`: {}", s.message()))
}

async fn invoke(
    client: &ClusterClient,
    name: &str,
    stdin: &[u8],
    args: &[&str],
    near: &str,
) -> Result<pb::InvokeResponse, String> {
    let (region, zone) = near.split_once('/').unwrap_or((near, ""));
    let r = client
        .invoke(pb::InvokeRequest {
            function: name.into(),
            stdin: stdin.to_vec(),
            args: args.iter().map(|s| s.to_string()).collect(),
            near_region: region.into(),
            near_zone: zone.into(),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("invoking `{name}`: {}", s.message()))?;
    if !r.error_code.is_empty() {
        return Err(format!(
            "`{name}` failed: {} {}",
            r.error_code, r.error_message
        ));
    }
    Ok(r)
}

fn ran(r: &pb::InvokeResponse) -> String {
    let u = r.usage.clone().unwrap_or_default();
    format!(
        "node {} · {} fuel · {} µs{}",
        node_id(r.node),
        u.fuel,
        u.wall_us,
        if r.scaled_from_zero {
            " · placed by this call"
        } else {
            ""
        }
    )
}

async fn scenario(c: &DevCluster) -> Result<(), String> {
    let client = c.tenant_client()?;
    let admin = c.admin_client()?;

    step(
        2,
        "deploying the example functions as tenant `dev` (why each node: per-stage scores)",
    );
    for (name, module, memory, replicas, near) in [
        ("hello", HELLO, 16, 2, Some(("cn-east", "shanghai"))),
        ("wordcount", WORDCOUNT, 32, 3, None),
        (
            "framefilter",
            FRAMEFILTER,
            64,
            1,
            Some(("cn-south", "guangzhou")),
        ),
    ] {
        let r = deploy(&client, name, module, memory, replicas, near).await?;
        println!(
            "      `{name}` v{}: {} replica(s), {} MiB each{}",
            r.version,
            r.allocations.len(),
            memory,
            near.map(|n| format!(", callers near {}/{}", n.0, n.1))
                .unwrap_or_default()
        );
        crate::functions::print_reasons(&r.placements);
    }
    println!(
        "      (all three workers are on loopback here, so every estimated RTT is ~0 ms and the\n       latency stage ties; on real networks the workers' Vivaldi coordinates separate them)"
    );
    let cold = deploy(&client, "greeter", HELLO, 16, 0, None).await?;
    println!(
        "      `greeter` v{}: {} replicas (scaled to zero: placed on its first call)",
        cold.version,
        cold.allocations.len()
    );

    step(
        3,
        "invoking over gRPC (routed by latency to the caller and outstanding calls)",
    );
    let mut expected_calls = 0u64;
    let r = invoke(&client, "hello", b"StellarCloud", &[], "cn-east/shanghai").await?;
    expected_calls += 1;
    println!(
        "      hello        → {:?}  [{}]",
        String::from_utf8_lossy(&r.stdout).trim(),
        ran(&r)
    );
    let r = invoke(
        &client,
        "wordcount",
        TEXT.as_bytes(),
        &["--top", "3"],
        "cn-north",
    )
    .await?;
    expected_calls += 1;
    let top: Vec<String> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(|l| l.replace('\t', "×"))
        .collect();
    println!(
        "      wordcount    → top 3 {}  [{}]",
        top.join(", "),
        ran(&r)
    );
    let (w, h) = (64usize, 48usize);
    let frame: Vec<u8> = (0..w * h * 3 / 2).map(|i| (i % 251) as u8).collect();
    let r = invoke(
        &client,
        "framefilter",
        &frame,
        &["64", "48", "half"],
        "cn-south/guangzhou",
    )
    .await?;
    expected_calls += 1;
    if r.stdout.len() != (w / 2) * (h / 2) * 3 / 2 {
        return Err(format!(
            "framefilter returned {} bytes, expected a {}x{} frame",
            r.stdout.len(),
            w / 2,
            h / 2
        ));
    }
    println!(
        "      framefilter  → {w}x{h} yuv420p frame halved to {}x{} ({} bytes)  [{}]",
        w / 2,
        h / 2,
        r.stdout.len(),
        ran(&r)
    );
    let r = invoke(&client, "greeter", b"first caller", &[], "cn-east").await?;
    expected_calls += 1;
    if !r.scaled_from_zero {
        return Err("`greeter` had an instance before its first call".into());
    }
    println!(
        "      greeter      → {:?}  [{}]",
        String::from_utf8_lossy(&r.stdout).trim(),
        ran(&r)
    );

    step(4, "invoking over HTTP, as curl would");
    let (status, body) = http_post(
        &c.http,
        "/v1/functions/hello/invoke?near=cn-east/shanghai",
        &c.tenant_token,
        b"curl",
    )
    .await?;
    expected_calls += 1;
    println!(
        "      curl -H 'authorization: Bearer …' --data curl {}/v1/functions/hello/invoke",
        c.http
    );
    println!(
        "      → HTTP {status}: {:?}",
        String::from_utf8_lossy(&body).trim()
    );
    if status != 200 {
        return Err(format!("the HTTP gateway answered {status}"));
    }
    let (status, body) =
        http_post(&c.http, "/v1/functions/nope/invoke", &c.tenant_token, b"").await?;
    println!(
        "      → unknown function: HTTP {status} {}",
        String::from_utf8_lossy(&body)
    );

    step(
        5,
        "tenant isolation: tenant `globex` cannot see `dev`'s functions",
    );
    let globex = stellar_proto::tokens::new_token().map_err(|e| e.to_string())?;
    let sha = stellar_proto::tokens::token_hash(&globex).to_vec();
    admin
        .call(|mut cl| {
            let req = pb::CreateTenantRequest {
                request_id: b"demo-globex".to_vec(),
                name: "globex".into(),
                token_sha256: sha.clone(),
            };
            async move { cl.create_tenant(req).await }
        })
        .await
        .map_err(|s| format!("creating tenant globex: {}", s.message()))?;
    let other = client.with_token(&globex);
    match other
        .invoke(pb::InvokeRequest {
            function: "hello".into(),
            ..Default::default()
        })
        .await
    {
        Err(s) if s.code() == tonic::Code::NotFound => {
            println!("      globex → invoke hello: NOT_FOUND ({})", s.message())
        }
        other => return Err(format!("globex reached dev's function: {other:?}")),
    }

    step(6, "where everything runs now");
    let fs = client
        .call(|mut cl| async move {
            cl.list_functions(pb::ListFunctionsRequest {
                tenant: String::new(),
                read: Some(pb::ReadOptions {
                    stale: false,
                    readiness: true,
                }),
            })
            .await
        })
        .await
        .map_err(|s| format!("listing functions: {}", s.message()))?;
    for f in &fs.functions {
        let nodes: Vec<String> = f.allocations.iter().map(|a| node_id(a.node)).collect();
        println!(
            "      {:<12} v{} {}/{} ready on {}",
            f.name,
            f.version,
            f.ready.len(),
            f.allocations.len(),
            nodes.join(", ")
        );
    }

    step(
        7,
        "the usage bill (integer micro-units; the price table is in scheduler/src/pricing.rs)",
    );
    let mut usage = pb::GetUsageResponse::default();
    for _ in 0..100 {
        usage = admin
            .call(|mut cl| async move {
                cl.get_usage(pb::GetUsageRequest {
                    tenant: DEV_TENANT.into(),
                    ..Default::default()
                })
                .await
            })
            .await
            .map_err(|s| format!("reading usage: {}", s.message()))?;
        let counted: u64 = usage.bill.iter().map(|l| l.invocations).sum();
        if counted >= expected_calls {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counted: u64 = usage.bill.iter().map(|l| l.invocations).sum();
    if counted != expected_calls {
        return Err(format!(
            "the ledger counted {counted} invocations, {expected_calls} were made"
        ));
    }
    crate::usage::print_usage(&usage, false);
    Ok(())
}

/// A minimal HTTP/1.1 POST over loopback (the demo needs no HTTP client library).
async fn http_post(
    base: &str,
    path: &str,
    token: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let host = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| format!("connecting to {host}: {e}"))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(body).await.map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut resp))
        .await
        .map_err(|_| "the HTTP gateway did not answer within 30 s".to_string())?
        .map_err(|e| e.to_string())?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let status: u16 = std::str::from_utf8(&resp[..split])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("malformed HTTP status line")?;
    Ok((status, resp[split + 4..].to_vec()))
}
