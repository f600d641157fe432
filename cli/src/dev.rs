//! `stellar dev`: the embedded default cluster in one process: a single-replica control
//! plane, one gateway, and N local workers with different regions and capacities, all over
//! real gRPC on loopback. `stellar demo` runs its scenario against the same thing.
//!
//! ```text
//!  stellar dev ─┬─ control plane (replica 1, data-dir/replica) ◀─ gRPC 7201 (Control, Edge)
//!               ├─ gateway ◀─ clients: gRPC 7001, HTTP 8001 ── Edge ──▶ replica
//!               ├─ worker w0 cn-east/shanghai   ─┐
//!               ├─ worker w1 cn-south/guangzhou ─┼─ dial out to the gateway (join token)
//!               └─ worker w2 cn-north/beijing   ─┘
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use stellar_gateway::GatewayConfig;
use stellar_proto::client::ClusterClient;
use stellar_proto::tokens::{new_token, read_admin_token, token_hash, write_secret};
use stellar_proto::v1 as pb;
use stellar_scheduler::ReplicaConfig;
use stellar_scheduler::server::{ServerConfig, serve};
use stellar_worker::{AgentConfig, SandboxConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The tenant `stellar dev` creates for its user.
pub const DEV_TENANT: &str = "dev";

/// Where the dev workers say they are, and what they offer (cycled for more workers).
const WORKER_SHAPES: [(&str, &str, u32, u32); 4] = [
    ("cn-east", "shanghai", 4000, 2048),
    ("cn-south", "guangzhou", 2000, 1024),
    ("cn-north", "beijing", 1000, 512),
    ("cn-west", "chengdu", 2000, 1024),
];

/// Arguments of `stellar dev`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
EXAMPLES:
  stellar dev                         # then, in another shell, the commands it prints
  stellar dev --workers 5 --data-dir /tmp/sc

Data (the Raft log, snapshots, worker identities and module caches) stays in --data-dir, so a
restart keeps deployed functions and usage. Ctrl-C drains the workers and stops cleanly.")]
pub struct DevArgs {
    /// Where the control plane and the workers keep their data.
    #[arg(long, default_value = ".stellar-dev")]
    data_dir: PathBuf,
    /// Local workers to run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// The gateway's gRPC address (what clients and workers use).
    #[arg(long, default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// The gateway's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8001")]
    http_listen: SocketAddr,
    /// The control-plane replica's gRPC address (the gateway's upstream).
    #[arg(long, default_value = "127.0.0.1:7201")]
    replica_listen: SocketAddr,
}

/// What a dev cluster is made of.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Data root.
    pub data_dir: PathBuf,
    /// Workers to run.
    pub workers: u32,
    /// The gateway's gRPC address.
    pub listen: SocketAddr,
    /// The gateway's HTTP address.
    pub http_listen: SocketAddr,
    /// The replica's gRPC address.
    pub replica_listen: SocketAddr,
    /// Sandbox slots per worker.
    pub slots: u32,
}

/// A running dev cluster.
pub struct DevCluster {
    /// The gRPC endpoint (the gateway).
    pub endpoint: String,
    /// The control-plane replica's address.
    pub replica: String,
    /// The HTTP gateway's base URL.
    pub http: String,
    /// The admin token (from the replica's data dir).
    pub admin_token: String,
    /// The dev tenant's token.
    pub tenant_token: String,
    stop_workers: watch::Sender<bool>,
    stop_plane: watch::Sender<bool>,
    workers: Vec<JoinHandle<stellar_worker::Result<()>>>,
    gateway: JoinHandle<Result<(), stellar_gateway::Error>>,
    plane: JoinHandle<stellar_scheduler::Result<()>>,
}

/// A secret kept in `path` (mode 0600), made on first use, so restarts reuse it.
fn kept_secret(path: &Path) -> Result<String, String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let t = new_token().map_err(|e| e.to_string())?;
    write_secret(path, &t).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(t)
}

impl DevCluster {
    /// Starts the control plane, the gateway and the workers, and waits until every worker
    /// is ready.
    pub async fn start(o: &DevOptions) -> Result<DevCluster, String> {
        std::fs::create_dir_all(&o.data_dir)
            .map_err(|e| format!("cannot create {}: {e}", o.data_dir.display()))?;
        let join_token = kept_secret(&o.data_dir.join("join.token"))?;
        let endpoint = o.listen.to_string();
        let replica = o.replica_listen.to_string();
        let replica_dir = o.data_dir.join("replica");
        let mut rc = ReplicaConfig::new(1, replica_dir.clone(), vec![(1, replica.clone())]);
        // One gateway in the same process: after a restart it is back within the second.
        rc.node_grace_ticks = 250;
        let cfg = ServerConfig {
            replica: rc,
            listen: o.replica_listen,
            advertise: replica.clone(),
            tick: Duration::from_millis(20),
            blobs: Default::default(),
            receipt_period_ms: 0,
        };
        let (stop_plane, mut plane_rx) = watch::channel(false);
        let plane = tokio::spawn(serve(cfg, async move {
            let _ = plane_rx.wait_for(|s| *s).await;
        }));
        // The first leader writes the admin token; wait for it (or for the plane to fail).
        let mut admin_token = None;
        for _ in 0..300 {
            if plane.is_finished() {
                let err = match plane.await {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "stopped".into(),
                    Err(e) => e.to_string(),
                };
                return Err(format!("the control plane did not start: {err}"));
            }
            if let Some(t) = read_admin_token(&replica_dir) {
                admin_token = Some(t);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let admin_token =
            admin_token.ok_or("the control plane wrote no admin token within 15 s")?;
        let gateway_cfg = GatewayConfig {
            control: ClusterClient::new(std::slice::from_ref(&replica))
                .map_err(|s| s.message().to_string())?
                .with_token(&admin_token),
            listen: o.listen,
            advertise: endpoint.clone(),
            http_listen: Some(o.http_listen),
            join_token: Some(join_token.clone()),
            heartbeat: Duration::from_secs(1),
            balance_slack: stellar_gateway::balance::DEFAULT_SLACK,
            checks: Default::default(),
        };
        let mut gateway_rx = stop_plane.subscribe();
        let gateway = tokio::spawn(stellar_gateway::serve(gateway_cfg, async move {
            let _ = gateway_rx.wait_for(|s| *s).await;
        }));
        let admin = ClusterClient::new(std::slice::from_ref(&endpoint))
            .map_err(|s| s.message().to_string())?
            .with_token(&admin_token);
        let tenant_token = kept_secret(&o.data_dir.join("dev-tenant.token"))?;
        create_tenant(&admin, DEV_TENANT, &tenant_token).await?;

        let (stop_workers, workers_rx) = watch::channel(false);
        let mut workers = Vec::new();
        for i in 0..o.workers {
            let (region, zone, cpu, mem) = WORKER_SHAPES[i as usize % WORKER_SHAPES.len()];
            let cfg = AgentConfig {
                join: vec![endpoint.clone()],
                token: join_token.clone(),
                data_dir: o.data_dir.join("workers").join(format!("w{i}")),
                region: region.into(),
                zone: zone.into(),
                labels: vec![("dev".into(), "true".into())],
                capacity: Some(pb::Resources {
                    cpu_millis: cpu,
                    memory_mib: mem,
                    disk_mib: 0,
                }),
                sandbox: SandboxConfig {
                    slots: o.slots,
                    max_memory_bytes: 256 << 20,
                    ..Default::default()
                },
                drain_timeout: Duration::from_secs(5),
                // Where the machine allows (root, cgroups): container functions run too.
                containers: true,
            };
            let mut rx = workers_rx.clone();
            workers.push(tokio::spawn(stellar_worker::run(cfg, async move {
                let _ = rx.wait_for(|s| *s).await;
            })));
        }
        let cluster = DevCluster {
            http: format!("http://{}", o.http_listen),
            endpoint,
            replica,
            admin_token,
            tenant_token,
            stop_workers,
            stop_plane,
            workers,
            gateway,
            plane,
        };
        cluster.wait_ready(&admin, o.workers as usize).await?;
        Ok(cluster)
    }

    async fn wait_ready(&self, admin: &ClusterClient, n: usize) -> Result<(), String> {
        let mut last = 0;
        for _ in 0..600 {
            if self.workers.iter().any(JoinHandle::is_finished) {
                return Err(
                    "a worker stopped while starting; run with STELLAR_LOG=debug for why".into(),
                );
            }
            if self.gateway.is_finished() {
                return Err(
                    "the gateway stopped while starting (is --listen's port free?); run with STELLAR_LOG=debug for why"
                        .into(),
                );
            }
            let nodes = admin.nodes().await.map_or(0, |ns| {
                ns.iter()
                    .filter(|n| n.state == pb::NodeState::Ready as i32)
                    .count()
            });
            last = nodes;
            if nodes >= n {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "only {last} of {n} workers became ready within 30 s"
        ))
    }

    /// A client for the dev tenant.
    pub fn tenant_client(&self) -> Result<ClusterClient, String> {
        Ok(ClusterClient::new(std::slice::from_ref(&self.endpoint))
            .map_err(|s| s.message().to_string())?
            .with_token(&self.tenant_token))
    }

    /// An admin client.
    pub fn admin_client(&self) -> Result<ClusterClient, String> {
        Ok(ClusterClient::new(std::slice::from_ref(&self.endpoint))
            .map_err(|s| s.message().to_string())?
            .with_token(&self.admin_token))
    }

    /// Drains the workers, then stops the gateway and the control plane.
    pub async fn stop(self) -> Result<(), String> {
        let _ = self.stop_workers.send(true);
        let mut err = None;
        for w in self.workers {
            match tokio::time::timeout(Duration::from_secs(15), w).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => err = Some(format!("a worker stopped with: {e}")),
                Ok(Err(e)) => err = Some(format!("a worker panicked: {e}")),
                Err(_) => err = Some("a worker did not drain within 15 s".into()),
            }
        }
        let _ = self.stop_plane.send(true);
        match tokio::time::timeout(Duration::from_secs(15), self.gateway).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => err = Some(format!("the gateway stopped with: {e}")),
            Ok(Err(e)) => err = Some(format!("the gateway panicked: {e}")),
            Err(_) => err = Some("the gateway did not stop within 15 s".into()),
        }
        match tokio::time::timeout(Duration::from_secs(15), self.plane).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => err = Some(format!("the control plane stopped with: {e}")),
            Ok(Err(e)) => err = Some(format!("the control plane panicked: {e}")),
            Err(_) => err = Some("the control plane did not stop within 15 s".into()),
        }
        err.map_or(Ok(()), Err)
    }
}

/// Creates `name` with `token` unless it exists (a dev restart keeps it).
async fn create_tenant(admin: &ClusterClient, name: &str, token: &str) -> Result<(), String> {
    let sha = token_hash(token).to_vec();
    let r = admin
        .call(|mut c| {
            let req = pb::CreateTenantRequest {
                request_id: format!("dev-tenant-{name}").into_bytes(),
                name: name.to_string(),
                token_sha256: sha.clone(),
            };
            async move { c.create_tenant(req).await }
        })
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(s) => Err(format!("creating tenant `{name}`: {}", s.message())),
    }
}

/// Runs `stellar dev` until Ctrl-C.
pub async fn run(a: DevArgs) -> Result<(), String> {
    let o = DevOptions {
        data_dir: a.data_dir.clone(),
        workers: a.workers,
        listen: a.listen,
        http_listen: a.http_listen,
        replica_listen: a.replica_listen,
        slots: 32,
    };
    let c = DevCluster::start(&o).await?;
    println!(
        "StellarCloud dev cluster: 1 control-plane replica, 1 gateway, {} workers ({})",
        a.workers,
        WORKER_SHAPES
            .iter()
            .cycle()
            .take(a.workers as usize)
            .map(|s| format!("{}/{}", s.0, s.1))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  gRPC endpoint  {} (gateway)", c.endpoint);
    println!("  HTTP endpoint  {}", c.http);
    println!("  replica        {} (control plane)", c.replica);
    println!("  admin token    {}", c.admin_token);
    println!("  tenant `{DEV_TENANT}`   {}", c.tenant_token);
    println!("  data           {}", a.data_dir.display());
    println!();
    println!("try, in another shell:");
    println!(
        "  export STELLAR_ENDPOINT={} STELLAR_TOKEN={}",
        c.endpoint, c.tenant_token
    );
    println!("  stellar deploy examples/wasm/prebuilt/hello.wasm --name hello --replicas 2");
    println!("  stellar invoke hello --data Ada");
    println!(
        "  curl -H \"authorization: Bearer $STELLAR_TOKEN\" --data Ada {}/v1/functions/hello/invoke",
        c.http
    );
    println!("Ctrl-C stops everything.");
    crate::shutdown_signal().await;
    c.stop().await
}
