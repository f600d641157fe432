//! A cluster of real `stellar scheduler` processes on loopback, for process-level tests.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stellar_proto::v1 as pb;
use stellar_scheduler::client::ClusterClient;

/// Picks `n` free loopback ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Replica processes with their data dirs; killed on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addresses: Vec<String>,
    pub procs: Vec<Option<Child>>,
    pub extra_args: Vec<String>,
}

impl Cluster {
    /// Starts `n` replicas founding a new cluster.
    pub fn start(n: usize, extra_args: &[&str]) -> Cluster {
        let ports = free_ports(n);
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut c = Cluster {
            dir: tempfile::tempdir().expect("temp dir"),
            addresses,
            procs: (0..n).map(|_| None).collect(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        for id in 1..=n as u64 {
            c.spawn(id);
        }
        c
    }

    pub fn peers(&self) -> String {
        self.addresses
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("r{id}"))
    }

    /// Starts (or restarts) replica `id` from its data dir.
    pub fn spawn(&mut self, id: u64) {
        let log =
            std::fs::File::create(self.dir.path().join(format!("r{id}.log"))).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_stellar"))
            .arg("scheduler")
            .arg("--id")
            .arg(id.to_string())
            .arg("--peers")
            .arg(self.peers())
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(&self.extra_args)
            .env("STELLAR_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn stellar scheduler");
        self.procs[(id - 1) as usize] = Some(child);
    }

    /// `kill -9` replica `id`.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs[(id - 1) as usize].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("r{id}.log"))).unwrap_or_default()
    }

    pub fn client(&self) -> ClusterClient {
        ClusterClient::new(&self.addresses).expect("client")
    }

    /// One replica's own view.
    pub async fn status(&self, id: u64) -> Option<pb::ClusterStatusResponse> {
        let c = self.client();
        let mut cl = c.client_for(&self.addresses[(id - 1) as usize]).ok()?;
        cl.cluster_status(pb::ClusterStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Waits (bounded) until some replica reports itself leader; returns its id.
    pub async fn wait_leader(&self, within: Duration) -> Option<u64> {
        let start = Instant::now();
        while start.elapsed() < within {
            for id in 1..=self.addresses.len() as u64 {
                if self.procs[(id - 1) as usize].is_none() {
                    continue;
                }
                if let Some(s) = self.status(id).await
                    && s.role == "leader"
                {
                    return Some(id);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=self.procs.len() as u64 {
            self.kill(id);
        }
    }
}

/// The smallest valid WebAssembly module.
pub const EMPTY_WASM: &[u8] = b"\0asm\x01\0\0\0";

/// A small home node for tests.
pub fn node(id: u64) -> pb::NodeRegistration {
    pb::NodeRegistration {
        id,
        public_key: vec![],
        attributes: Some(pb::NodeAttributes {
            region: "cn-east".into(),
            zone: format!("zone-{}", id % 4),
            arch: "x86_64".into(),
            runtimes: vec!["wasm".into()],
            capacity: Some(pb::Resources {
                cpu_millis: 16_000,
                memory_mib: 32_768,
                disk_mib: 65_536,
            }),
            uplink_kbps: 50_000,
            downlink_kbps: 200_000,
            labels: vec![],
        }),
        reputation: 0.95,
        managed: false,
    }
}

/// A deploy of a small function.
pub fn deploy(tenant: &str, name: &str, request_id: Vec<u8>) -> pb::DeployRequest {
    pb::DeployRequest {
        request_id,
        name: name.into(),
        module: EMPTY_WASM.to_vec(),
        limits: Some(pb::FunctionLimits {
            cpu_millis: 100,
            memory_mib: 64,
            timeout_ms: 1000,
            fuel: 0,
            max_output_bytes: 0,
        }),
        replicas: 1,
        region: String::new(),
        constraints: vec![],
        tenant: tenant.into(),
    }
}
