//! Blobs in an S3-compatible object store: moto's server from PyPI (scripts/test.sh installs
//! it) stands in for S3. First the object backend on its own (only verified bytes become an
//! object; an upload refused leaves no parts behind), then a whole cluster of real processes
//! started with `--blob-store s3://…`: a two-stage job whose inputs, intermediate files and
//! outputs all travel through the bucket, with the Raft leader killed mid-job; the replicas'
//! disks hold no blob. A failing program then fails its job, and the CLI says so (exit 1).

#![cfg(target_os = "linux")]
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use stellar_load::procs::S3Server;
use stellar_scheduler::blob_backend::{self, BlobStoreSpec};
use stellar_scheduler::blobs::BlobError;

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn s3(dir: &Path) -> S3Server {
    S3Server::start(&dir.join("s3"), "stellar")
        .expect("moto's S3 server (scripts/test.sh installs it)")
}

fn spec(server: &S3Server, url: &str) -> BlobStoreSpec {
    BlobStoreSpec {
        url: Some(url.to_string()),
        options: server.options(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_backend_keeps_only_verified_blobs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = s3(dir.path());
    let store = blob_backend::open(&spec(&server, "s3://stellar/unit/"), dir.path())
        .await
        .expect("the store opens");
    assert!(store.shared());

    // 12 MiB: two parts of a multipart upload, visible only once finished.
    let data: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
    let name = sha(&data);
    let mut w = store
        .writer(&name, data.len() as u64)
        .await
        .expect("writer");
    for piece in data.chunks(1 << 20) {
        w.write(bytes::Bytes::copy_from_slice(piece))
            .await
            .expect("write");
    }
    assert_eq!(
        store.size(&name).await.expect("head"),
        None,
        "not visible before finish"
    );
    assert_eq!(w.finish().await.expect("finish"), data.len() as u64);
    assert_eq!(
        store.size(&name).await.expect("head"),
        Some(data.len() as u64)
    );
    let rest = blob_backend::read_all(store.read(&name, 5 << 20).await.expect("read"))
        .await
        .expect("bytes");
    assert_eq!(rest, &data[5 << 20..]);
    assert_eq!(
        server.keys("unit/").expect("list"),
        vec![format!("unit/{name}")]
    );
    let listed = store.list().await.expect("list");
    assert_eq!(
        listed
            .iter()
            .map(|(n, s, _)| (n.as_str(), *s))
            .collect::<Vec<_>>(),
        vec![(name.as_str(), data.len() as u64)]
    );

    // Bytes that do not hash to the name, and too few bytes: refused, no object, and the
    // multipart upload aborted (no parts kept).
    let other = sha(b"something else");
    let mut w = store.writer(&other, 9 << 20).await.expect("writer");
    w.write(bytes::Bytes::from(vec![7u8; 9 << 20]))
        .await
        .expect("write");
    assert!(matches!(w.finish().await, Err(BlobError::Corrupt { .. })));
    let mut w = store.writer(&other, 10).await.expect("writer");
    w.write(bytes::Bytes::from_static(b"short"))
        .await
        .expect("write");
    assert!(matches!(w.finish().await, Err(BlobError::Size { .. })));
    let mut w = store.writer(&other, 3).await.expect("writer");
    assert!(matches!(
        w.write(bytes::Bytes::from_static(b"four")).await,
        Err(BlobError::Size { .. })
    ));
    drop(w); // dropped unfinished: aborted in the background
    assert_eq!(store.size(&other).await.expect("head"), None);
    let start = Instant::now();
    while !server.open_uploads().expect("uploads").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "multipart uploads left open: {:?}",
            server.open_uploads()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Names that are not content addresses never reach the store.
    assert!(matches!(
        store.writer("../../etc/passwd", 1).await,
        Err(BlobError::BadName(_))
    ));
    assert!(matches!(
        store.read(&other, 0).await,
        Err(BlobError::Missing(_))
    ));
    store.remove(&name).await.expect("remove");
    assert_eq!(store.size(&name).await.expect("head"), None);
    assert!(server.keys("unit/").expect("list").is_empty());

    // A bucket that does not exist stops the start with what to check.
    let err = blob_backend::open(&spec(&server, "s3://no-such-bucket/x"), dir.path())
        .await
        .expect_err("a missing bucket is refused");
    assert!(
        matches!(&err, BlobError::Config(m) if m.contains("bucket")),
        "{err}"
    );
}

/// Stored blobs under a replica's data dir (none when an object store holds them).
fn blobs_on_disk(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data.join("blobs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_with_its_blobs_in_an_s3_store_across_a_leader_kill() {
    if let Err(why) = stellar_worker::container::capability() {
        panic!("this machine cannot run containers ({why}); the suite needs root and cgroups");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let server = s3(dir.path());
    let image = stellar_load::containerbench::build_busybox_image(&dir.path().join("image"))
        .expect("the busybox image");

    // Three inputs, one of 9 MiB (a multipart upload of two parts).
    let job_dir = dir.path().join("job");
    std::fs::create_dir_all(&job_dir).expect("job dir");
    let big: String = "lorem ipsum dolor sit amet\n".repeat((9 << 20) / 27);
    let inputs = [
        ("a.txt", "alpha\n".to_string()),
        ("b.txt", "beta\n".to_string()),
        ("c.txt", big),
    ];
    for (name, text) in &inputs {
        std::fs::write(job_dir.join(name), text).expect("input");
    }
    std::fs::write(
        job_dir.join("job.toml"),
        format!(
            r#"
name = "shout"
inputs = [{{ path = "a.txt" }}, {{ path = "b.txt" }}, {{ path = "c.txt" }}]

[[stages]]
name = "upper"
image = "{image}"
fanout = "each"
command = ["sh", "-c", "sleep 1; tr a-z A-Z < {{input}} > /out/{{stem}}.up"]
cpu = 500
memory = 64

[[stages]]
name = "join"
image = "{image}"
fanout = "all"
command = ["sh", "-c", "cat /in/a.up /in/b.up /in/c.up > /out/all.txt"]
cpu = 500
memory = 64
"#,
            image = image.display()
        ),
    )
    .expect("job file");

    let mut extra = vec!["--tick-ms".to_string(), "20".to_string()];
    extra.extend(server.scheduler_args("jobs"));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut cluster = common::cluster(&dir.path().join("plane"), 3, &extra);
    cluster.wait_leader(1000).await.expect("leader");
    let admin = common::admin_token(&cluster).await;
    let gateway = common::Gateway::start(
        dir.path(),
        &cluster.addresses.join(","),
        &admin,
        "join-secret",
    );
    let mut workers: Vec<Child> = (0..2)
        .map(|i| common::spawn_worker(dir.path(), &gateway.grpc, i, 2048, &[]))
        .collect();
    let client = stellar_proto::client::ClusterClient::new(std::slice::from_ref(&gateway.grpc))
        .expect("gateway address")
        .with_token(&admin);
    common::wait_for_nodes(&client, 2).await;
    client.create_tenant("acme").await.expect("tenant");

    let out = dir.path().join("out");
    let mut cli = common::spawn_stellar(
        [
            "job".as_ref(),
            "run".as_ref(),
            job_dir.join("job.toml").as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ],
        &gateway.grpc,
        &admin,
        &dir.path().join("job.log"),
    );

    // Once the first stage runs, kill the leader: the next one reads the job's blobs from
    // the bucket as well.
    let mut killed = false;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = cli.try_wait().expect("wait") {
            break s;
        }
        if !killed
            && let Ok(jobs) = client
                .call(|mut c| async move {
                    c.list_jobs(stellar_proto::v1::ListJobsRequest {
                        tenant: "acme".into(),
                        ..Default::default()
                    })
                    .await
                })
                .await
            && jobs
                .jobs
                .iter()
                .any(|j| j.stages.first().is_some_and(|st| st.running > 0))
        {
            let leader = cluster.wait_leader(500).await.expect("leader");
            cluster.kill(leader);
            killed = true;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "the job did not end in 4 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = std::fs::read_to_string(dir.path().join("job.log")).unwrap_or_default();
    assert!(status.success(), "stellar job run failed:\n{log}");
    assert!(
        killed,
        "the leader was never killed: the job ran too fast to see"
    );

    let expected: String = inputs.iter().map(|(_, t)| t.to_uppercase()).collect();
    let got = std::fs::read_to_string(out.join("all.txt")).expect("the job's output");
    assert!(
        got == expected,
        "all.txt is {} bytes, {} expected",
        got.len(),
        expected.len()
    );

    // The gateway that took the job marked it as entering there (its tasks were placed near).
    let status = client
        .call(|mut c| async move {
            c.get_job(stellar_proto::v1::GetJobRequest {
                tenant: "acme".into(),
                name: "shout".into(),
                read: None,
            })
            .await
        })
        .await
        .expect("job status");
    let spec = status.job.and_then(|j| j.spec).expect("the job's spec");
    assert!(spec.near.is_some(), "the gateway did not fill in `near`");

    // Every input, intermediate file and the output is an object under the prefix; no
    // replica kept one on its disk.
    let keys = server.keys("jobs/").expect("list");
    let mut wanted: Vec<String> = inputs.iter().map(|(_, t)| sha(t.as_bytes())).collect();
    wanted.extend(inputs.iter().map(|(_, t)| sha(t.to_uppercase().as_bytes())));
    wanted.push(sha(expected.as_bytes()));
    for w in &wanted {
        assert!(keys.contains(&format!("jobs/{w}")), "{w} not in {keys:?}");
    }
    for id in 1..=3 {
        let on_disk = blobs_on_disk(&cluster.data_dir(id));
        assert!(
            on_disk.is_empty(),
            "replica {id} keeps blobs on disk: {on_disk:?}"
        );
    }

    // A program that fails fails its job: `job run` and `job status --watch` exit 1, and
    // `job logs` shows the program's stderr.
    std::fs::write(
        job_dir.join("fails.toml"),
        format!(
            r#"
name = "doomed"
inputs = [{{ path = "a.txt" }}]

[[stages]]
image = "{image}"
command = ["sh", "-c", "echo the tape is blank >&2; exit 3"]
cpu = 500
memory = 64
"#,
            image = image.display()
        ),
    )
    .expect("job file");
    let stellar = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_stellar"))
            .args(args)
            .args([
                "--endpoint",
                &gateway.grpc,
                "--token",
                &admin,
                "--tenant",
                "acme",
            ])
            .output()
            .expect("stellar runs")
    };
    let fails = job_dir.join("fails.toml");
    let run = stellar(&[
        "job",
        "run",
        &fails.to_string_lossy(),
        "-o",
        &out.to_string_lossy(),
    ]);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let watch = stellar(&["job", "status", "doomed", "--watch"]);
    assert_eq!(watch.status.code(), Some(1), "{watch:?}");
    let logs = stellar(&["job", "logs", "doomed"]);
    assert!(logs.status.success(), "{logs:?}");
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("the tape is blank"), "{text}");
    let ok = stellar(&["job", "status", "shout", "--watch"]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
}
