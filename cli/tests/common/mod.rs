//! Helpers for process-level tests: a cluster of real `stellar scheduler` processes on
//! loopback (stellar-load's process harness driving this crate's binary).

#![allow(dead_code)]

use stellar_load::procs::ReplicaProcesses;

/// Starts `n` `stellar scheduler` replicas founding a new cluster under `dir`.
pub fn cluster(dir: &std::path::Path, n: usize, extra: &[&str]) -> ReplicaProcesses {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    ReplicaProcesses::start(
        dir,
        std::path::Path::new(env!("CARGO_BIN_EXE_stellar")),
        &["scheduler"],
        n,
        &extra,
    )
    .expect("start stellar scheduler processes")
}

#[allow(unused_imports)] // not every test crate deploys
pub use stellar_load::raftbench::deploy_request as deploy;

/// The cluster's bootstrap admin token, once its first leader has written it (bounded wait).
pub async fn admin_token(cluster: &ReplicaProcesses) -> String {
    let client = cluster.client();
    for _ in 0..300 {
        if let Some(t) = client.token() {
            return t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no admin token was written within 15 s");
}

/// A `stellar gateway` process in front of `control` (its replicas' addresses).
pub struct Gateway {
    /// Its gRPC address (workers and clients).
    pub grpc: String,
    /// Its HTTP address.
    pub http: String,
    log: std::path::PathBuf,
    args: Vec<String>,
    child: Option<std::process::Child>,
}

impl Gateway {
    /// Starts a gateway on free ports, following `control` with `admin_token`, accepting
    /// workers that present `join`; keepalives every 500 ms (workers down within ~2 s of
    /// going silent).
    pub fn start(dir: &std::path::Path, control: &str, admin_token: &str, join: &str) -> Gateway {
        let port = |_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port")
        };
        let (g, h) = (port(0), port(1));
        let grpc = format!("127.0.0.1:{g}");
        let http = format!("127.0.0.1:{h}");
        let args = vec![
            "gateway".into(),
            "--control".into(),
            control.into(),
            "--listen".into(),
            grpc.clone(),
            "--http-listen".into(),
            http.clone(),
            "--token".into(),
            admin_token.into(),
            "--join-token".into(),
            join.into(),
            "--heartbeat-ms".into(),
            "500".into(),
        ];
        let mut gw = Gateway {
            log: dir.join(format!("gateway-{g}.log")),
            grpc,
            http,
            args,
            child: None,
        };
        gw.spawn();
        gw
    }

    /// (Re)starts the process with the same addresses.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("gateway log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_stellar"))
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn stellar gateway");
        self.child = Some(child);
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Three replicas (20 ms ticks) and a gateway in front of them, under `dir`: the cluster the
/// process-level container tests use. Its admin token comes with it.
pub async fn three_replicas_and_a_gateway(
    dir: &std::path::Path,
) -> (ReplicaProcesses, String, Gateway) {
    let c = cluster(&dir.join("plane"), 3, &["--tick-ms", "20"]);
    c.wait_leader(1000).await.expect("leader");
    let admin = admin_token(&c).await;
    let gateway = Gateway::start(dir, &c.addresses.join(","), &admin, "join-secret");
    (c, admin, gateway)
}

/// Starts `stellar worker` number `i` joining `gateway` (data and log under `dir`), with 2
/// cores and `memory_mib` to offer, in zone `z{i}` of cn-east, plus `extra` flags.
pub fn spawn_worker(
    dir: &std::path::Path,
    gateway: &str,
    i: usize,
    memory_mib: u32,
    extra: &[&str],
) -> std::process::Child {
    let log = std::fs::File::create(dir.join(format!("worker-{i}.log"))).expect("worker log");
    std::process::Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args(["worker", "--join", gateway, "--token", "join-secret"])
        .args(["--region", "cn-east", "--zone", &format!("z{i}")])
        .args([
            "--cpu-millis",
            "2000",
            "--memory-mib",
            &memory_mib.to_string(),
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.join(format!("worker-{i}")))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn stellar worker")
}

/// Waits (up to a minute) until `n` workers have registered through `client`.
pub async fn wait_for_nodes(client: &stellar_proto::client::ClusterClient, n: usize) {
    let start = std::time::Instant::now();
    while client.nodes().await.unwrap_or_default().len() < n {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "{n} workers did not register within a minute"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Starts `stellar ARGS…` against `gateway` as tenant acme with `admin`'s token, its output
/// in `log`.
pub fn spawn_stellar<I, S>(
    args: I,
    gateway: &str,
    admin: &str,
    log: &std::path::Path,
) -> std::process::Child
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let log = std::fs::File::create(log).expect("log");
    std::process::Command::new(env!("CARGO_BIN_EXE_stellar"))
        .args(args)
        .args(["--endpoint", gateway, "--token", admin, "--tenant", "acme"])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn stellar")
}
