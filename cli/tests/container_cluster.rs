//! A container function through a whole cluster of real processes: three `stellar scheduler`
//! replicas, a `stellar gateway` and three `stellar worker`s. `stellar deploy --image`
//! uploads the image's layer to the blob store (two replicas hold it before the deploy is
//! committed; the Raft log carries only its hash), a worker fetches it over its stream,
//! unpacks it and runs calls in the container sandbox; `stellar status`, `invoke`, `logs`
//! and `usage` work as for wasm, and the bill counts the cgroup's cpu time.

#![cfg(target_os = "linux")]
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::cluster;
use stellar_proto::v1 as pb;

struct Worker(std::process::Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker(dir: &Path, gateway: &str, i: usize, containers: bool) -> Worker {
    let on = if containers { "true" } else { "false" };
    let child = common::spawn_worker(dir, gateway, i, 2048, &["--containers", on]);
    Worker(child)
}

fn stellar(args: &[&str], endpoint: &str, token: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args(args)
        .args(["--endpoint", endpoint, "--token", token])
        .output()
        .expect("stellar runs")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits until `n` nodes registered with `runtime`.
async fn nodes_with(client: &stellar_proto::client::ClusterClient, runtime: &str, n: usize) {
    let start = Instant::now();
    loop {
        let nodes = client.nodes().await.unwrap_or_default();
        let with = nodes
            .iter()
            .filter(|n| {
                n.attributes
                    .as_ref()
                    .is_some_and(|a| a.runtimes.iter().any(|r| r == runtime))
            })
            .count();
        if with >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{with} of {n} nodes with runtime {runtime} registered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_function_is_deployed_to_a_3_replica_3_worker_cluster_and_invoked() {
    if let Err(why) = stellar_worker::container::capability() {
        panic!("this machine cannot run containers ({why}); the suite needs root and cgroups");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let image = stellar_load::containerbench::build_busybox_image(dir.path()).expect("image");
    let (cluster, admin, gateway) = common::three_replicas_and_a_gateway(dir.path()).await;
    let _workers: Vec<Worker> = (0..3)
        .map(|i| worker(dir.path(), &gateway.grpc, i, true))
        .collect();
    let client = stellar_proto::client::ClusterClient::new(std::slice::from_ref(&gateway.grpc))
        .expect("gateway address")
        .with_token(&admin);
    nodes_with(&client, "container", 3).await;
    client.create_tenant("acme").await.expect("tenant");

    // A deploy that names layers nobody uploaded is refused before anything is committed.
    let bogus = pb::DeployRequest {
        request_id: b"bogus-image-deploy".to_vec(),
        name: "ghost".into(),
        tenant: "acme".into(),
        replicas: 1,
        limits: Some(pb::FunctionLimits {
            cpu_millis: 100,
            memory_mib: 64,
            timeout_ms: 5000,
            ..Default::default()
        }),
        image: Some(pb::ContainerImage {
            layers: vec![pb::ImageLayer {
                sha256: "ab".repeat(32),
                size: 10,
                gzip: false,
            }],
            cmd: vec!["/bin/true".into()],
            arch: std::env::consts::ARCH.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let refused = client.deploy(bogus).await.expect_err("layers not uploaded");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("upload it first"), "{refused:?}");

    // stellar deploy --image: the layer goes to the blob store, then the deploy commits.
    let script = "read name; if [ \"$1\" = fail ]; then echo \"bad $name\" >&2; exit 3; fi; \
                  echo \"hello $name from $(hostname)\"; echo \"arg=$1 env=$GREETING\"";
    let image_path = image.to_str().expect("utf-8 path");
    let command = format!("/bin/sh -c '{script}' sh");
    let deploy = stellar(
        &[
            "deploy",
            "--image",
            image_path,
            "--name",
            "greeter",
            "--command",
            &command,
            "--memory",
            "64",
            "--cpu",
            "200",
            "--timeout",
            "10000",
            "--pids",
            "16",
            "--tenant",
            "acme",
            "--replicas",
            "2",
        ],
        &gateway.grpc,
        &admin,
    );
    assert!(deploy.status.success(), "{}", text(&deploy));
    assert!(
        String::from_utf8_lossy(&deploy.stdout).contains("deployed container `greeter`"),
        "{}",
        text(&deploy)
    );
    // The layer's bytes are in two replicas' blob stores or more, never in the Raft log.
    let archive = stellar_worker::container::ImageArchive::open(&image, None).expect("image");
    let layer = &archive.layers[0].sha256;
    let holders = (1..=3u64)
        .filter(|id| cluster.data_dir(*id).join("blobs").join(layer).exists())
        .count();
    assert!(holders >= 2, "the layer is stored on {holders} replica(s)");

    // It runs: stdin, args and env reach the program inside the container.
    let start = Instant::now();
    let out = loop {
        let out = stellar(
            &[
                "invoke",
                "greeter",
                "--tenant",
                "acme",
                "-d",
                "Ada",
                "--arg",
                "first",
                "--env",
                "GREETING=hi",
            ],
            &gateway.grpc,
            &admin,
        );
        if out.status.success() || start.elapsed() > Duration::from_secs(60) {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("hello Ada from stellar-"), "{stdout}");
    assert!(stdout.contains("arg=first env=hi"), "{stdout}");

    // The JSON answer carries the container's own usage: cpu time from its cgroup.
    let second = stellar(
        &[
            "invoke", "greeter", "--tenant", "acme", "-d", "x", "-o", "json",
        ],
        &gateway.grpc,
        &admin,
    );
    let v: serde_json::Value = serde_json::from_slice(&second.stdout).expect("json");
    assert_eq!(v["error_code"], "", "{v}");
    assert!(v["usage"]["cpu_ns"].as_u64().unwrap_or(0) > 0, "{v}");

    // A failing call keeps its exit status and typed code; its stderr is in the logs.
    let failed = stellar(
        &[
            "invoke", "greeter", "--tenant", "acme", "-d", "Bob", "--arg", "fail",
        ],
        &gateway.grpc,
        &admin,
    );
    assert_eq!(failed.status.code(), Some(3), "{}", text(&failed));
    assert_eq!(
        String::from_utf8_lossy(&failed.stderr).lines().next(),
        Some("bad Bob")
    );
    let logs = stellar(
        &["logs", "greeter", "--tenant", "acme", "-o", "json"],
        &gateway.grpc,
        &admin,
    );
    let v: serde_json::Value = serde_json::from_slice(&logs.stdout).expect("logs json");
    let entries = v.as_array().cloned().unwrap_or_default();
    assert!(
        entries
            .iter()
            .any(|e| e["error_code"] == "EXIT_CODE" && e["stderr"] == "bad Bob\n"),
        "{v}"
    );

    // status says what it is; usage bills its cpu time.
    let status = stellar(
        &["status", "greeter", "--tenant", "acme"],
        &gateway.grpc,
        &admin,
    );
    let s = String::from_utf8_lossy(&status.stdout);
    assert!(
        s.contains("container image: 1 layer(s)"),
        "{}",
        text(&status)
    );
    let start = Instant::now();
    loop {
        let usage = stellar(
            &["usage", "--tenant", "acme", "-o", "json"],
            &gateway.grpc,
            &admin,
        );
        let v: serde_json::Value = serde_json::from_slice(&usage.stdout).unwrap_or_default();
        let line = v["bill"].as_array().and_then(|b| b.first().cloned());
        if let Some(l) = line.filter(|l| l["invocations"].as_u64() >= Some(3)) {
            assert!(l["cpu_ns"].as_u64().unwrap_or(0) > 0, "{l}");
            assert!(l["cost_micros"].as_u64().unwrap_or(0) > 0, "{l}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            text(&usage)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A replica that lost a layer (a disk replaced, a replica added since) copies it from a
    // peer when a gateway asks it for the layer, then serves it whole.
    let victim = (1..=3u64)
        .find(|id| cluster.data_dir(*id).join("blobs").join(layer).exists())
        .expect("a holder");
    let lost = cluster.data_dir(victim).join("blobs").join(layer);
    std::fs::remove_file(&lost).expect("remove the layer");
    let mut edge = stellar_proto::v1::edge_client::EdgeClient::connect(format!(
        "http://{}",
        cluster.addresses[victim as usize - 1]
    ))
    .await
    .expect("connect to the replica");
    let mut fetch = async |offset: u64| {
        let mut req = tonic::Request::new(pb::FetchBlob {
            sha256: layer.clone(),
            offset,
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {admin}").parse().expect("header"),
        );
        let mut chunks = edge.fetch_blob(req).await.expect("fetch").into_inner();
        let (mut bytes, mut last) = (Vec::new(), false);
        while let Some(c) = chunks.message().await.expect("chunk") {
            assert_eq!(c.offset, offset + bytes.len() as u64);
            bytes.extend_from_slice(&c.data);
            last = c.last;
        }
        assert!(last, "the transfer ended with its last chunk");
        bytes
    };
    let whole = fetch(0).await;
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&whole)),
        *layer
    );
    assert!(lost.exists(), "the replica stored the copy it pulled");
    // A fetch cut short resumes from an offset (what a worker asks after its stream broke).
    let half = whole.len() as u64 / 2;
    assert_eq!(fetch(half).await, whole[half as usize..]);

    // Both replicas run on nodes that registered the container runtime, and a redeploy
    // of the same image uploads nothing (the cluster holds the layer).
    let again = stellar(
        &[
            "deploy",
            "--image",
            image_path,
            "--name",
            "greeter2",
            "--command",
            "/bin/true",
            "--tenant",
            "acme",
            "--replicas",
            "1",
            "-o",
            "json",
        ],
        &gateway.grpc,
        &admin,
    );
    assert!(again.status.success(), "{}", text(&again));
    let v: serde_json::Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!(v["runtime"], "container", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_function_is_not_placed_on_wasm_only_nodes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = stellar_load::containerbench::build_busybox_image(dir.path()).expect("image");
    let cluster = cluster(&dir.path().join("plane"), 1, &["--tick-ms", "20"]);
    cluster.wait_leader(1000).await.expect("leader");
    let admin = common::admin_token(&cluster).await;
    let gateway = common::Gateway::start(dir.path(), &cluster.addresses[0], &admin, "join-secret");
    let _w = worker(dir.path(), &gateway.grpc, 0, false);
    let client = stellar_proto::client::ClusterClient::new(std::slice::from_ref(&gateway.grpc))
        .expect("gateway address")
        .with_token(&admin);
    nodes_with(&client, "wasm", 1).await;
    client.create_tenant("acme").await.expect("tenant");
    let deploy = stellar(
        &[
            "deploy",
            "--image",
            image.to_str().unwrap(),
            "--name",
            "c",
            "--command",
            "/bin/true",
            "--tenant",
            "acme",
        ],
        &gateway.grpc,
        &admin,
    );
    assert!(!deploy.status.success(), "{}", text(&deploy));
    let err = String::from_utf8_lossy(&deploy.stderr);
    assert!(err.contains("cannot place"), "{}", text(&deploy));
    // Nothing was committed: no function `c`.
    let ls = stellar(
        &["ls", "--tenant", "acme", "-o", "json"],
        &gateway.grpc,
        &admin,
    );
    assert!(
        !String::from_utf8_lossy(&ls.stdout).contains("\"c\""),
        "{}",
        text(&ls)
    );
    // In a one-replica cluster one copy of a layer is all there is, and enough.
    let archive = stellar_worker::container::ImageArchive::open(&image, None).expect("image");
    assert!(
        cluster
            .data_dir(1)
            .join("blobs")
            .join(&archive.layers[0].sha256)
            .exists()
    );
}
