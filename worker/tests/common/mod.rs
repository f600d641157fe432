//! What the worker's integration tests share: a control plane served in-process (one
//! replica and one gateway, real gRPC on loopback) and a worker configuration for it.
#![allow(dead_code)] // each test crate uses its own part
#![allow(clippy::disallowed_methods)]

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use stellar_proto::v1 as pb;
use stellar_scheduler::ReplicaConfig;
use stellar_scheduler::server::{ServerConfig, serve};
use stellar_worker::{AgentConfig, SandboxConfig};
use tokio::sync::oneshot;

/// The join token every test plane accepts.
pub const TOKEN: &str = "test-join-token";

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A one-replica control plane and its gateway running in this process.
pub struct Plane {
    stop: Option<oneshot::Sender<()>>,
    stop_gateway: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<stellar_scheduler::Result<()>>,
    gateway: tokio::task::JoinHandle<Result<(), stellar_gateway::Error>>,
}

impl Plane {
    /// Serves replica 1 from `dir` and a gateway on `addr` (what workers and clients use;
    /// HTTP on `http`, when given).
    pub fn start_with_http(dir: &Path, addr: &str, http: Option<&str>) -> Plane {
        Self::start_balanced(dir, addr, http, stellar_gateway::balance::DEFAULT_SLACK)
    }

    /// The same, with the gateway's balance slack (0: it sheds even a handful of workers).
    pub fn start_balanced(dir: &Path, addr: &str, http: Option<&str>, slack: usize) -> Plane {
        // The replica's own port: `dir` keeps it, so a restarted plane finds its peer list.
        let port_file = dir.with_extension("port");
        let replica = match std::fs::read_to_string(&port_file) {
            Ok(p) => format!("127.0.0.1:{}", p.trim()),
            Err(_) => {
                let p = free_port();
                std::fs::create_dir_all(dir.parent().expect("a parent")).expect("parent dir");
                std::fs::write(&port_file, p.to_string()).expect("port file");
                format!("127.0.0.1:{p}")
            }
        };
        let cfg = ServerConfig {
            replica: ReplicaConfig::new(1, dir.to_path_buf(), vec![(1, replica.clone())]),
            listen: replica.parse().expect("address"),
            advertise: replica.clone(),
            tick: Duration::from_millis(20),
            blobs: Default::default(),
            // Short receipt periods, so a test sees one close (and its root committed).
            receipt_period_ms: 2_000,
        };
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(cfg, async move {
            let _ = rx.await;
        }));
        let control = stellar_proto::client::ClusterClient::new(&[replica])
            .expect("replica address")
            .with_admin_token_from(vec![dir.to_path_buf()]);
        let gw = stellar_gateway::GatewayConfig {
            control,
            listen: addr.parse().expect("address"),
            advertise: addr.to_string(),
            http_listen: http.map(|h| h.parse().expect("HTTP address")),
            join_token: Some(TOKEN.into()),
            heartbeat: Duration::from_secs(1),
            balance_slack: slack,
            checks: Default::default(),
        };
        let (stop_gateway, grx) = oneshot::channel::<()>();
        let gateway = tokio::spawn(stellar_gateway::serve(gw, async move {
            let _ = grx.await;
        }));
        Plane {
            stop: Some(stop),
            stop_gateway: Some(stop_gateway),
            task,
            gateway,
        }
    }

    /// Serves replica 1 from `dir` on `addr`, without HTTP.
    pub fn start(dir: &Path, addr: &str) -> Plane {
        Self::start_with_http(dir, addr, None)
    }

    /// Stops it (bounded wait).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop_gateway.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.gateway).await;
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// The client address of the replica a plane serves from `dir`.
pub fn replica_of(dir: &Path) -> String {
    let port = std::fs::read_to_string(dir.with_extension("port")).expect("the plane's port file");
    format!("127.0.0.1:{}", port.trim())
}

/// A worker in cn-east/shanghai labelled `tier=home`, with 8 slots of 128 MiB.
pub fn worker_config(dir: &Path, addr: &str, token: &str) -> AgentConfig {
    AgentConfig {
        join: vec![addr.to_string()],
        token: token.to_string(),
        data_dir: dir.to_path_buf(),
        region: "cn-east".into(),
        zone: "shanghai".into(),
        labels: vec![("tier".into(), "home".into())],
        capacity: Some(pb::Resources {
            cpu_millis: 4000,
            memory_mib: 4096,
            disk_mib: 0,
        }),
        sandbox: SandboxConfig {
            slots: 8,
            max_memory_bytes: 128 << 20,
            ..Default::default()
        },
        drain_timeout: Duration::from_secs(5),
        containers: false,
    }
}

/// Polls `f` until it gives a value (30 s at most).
pub async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The committed build of example `name`.
pub fn prebuilt(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../examples/wasm/prebuilt/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("example module")
}
