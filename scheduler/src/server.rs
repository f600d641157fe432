//! Runs one control-plane replica: opens its storage, starts the replica thread, serves
//! `Control`, `Raft` and `Agent` on one address and the HTTP gateway on another, until
//! `shutdown` resolves. A new cluster's first leader writes the admin token.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use stellar_proto::v1::agent_server::AgentServer;
use stellar_proto::v1::control_server::ControlServer;
use stellar_proto::v1::raft_server::RaftServer;

use crate::auth::TokenCache;
use crate::error::{Error, Result};
use crate::gateway::Gateway;
use crate::node::ReplicaThread;
use crate::replica::{Replica, ReplicaConfig};
use crate::service::{ControlService, MAX_MESSAGE_BYTES, RaftService};
use crate::transport::GrpcTransport;
use crate::usage::UsageWriter;
use crate::workers::{AgentService, WorkerHub};

/// How a replica process runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The replica itself.
    pub replica: ReplicaConfig,
    /// Where to listen (clients, peers and workers share it).
    pub listen: SocketAddr,
    /// The address peers and clients use to reach this replica.
    pub advertise: String,
    /// The logical clock's period (raft ticks, liveness).
    pub tick: Duration,
    /// The secret workers present to join (none: workers are refused).
    pub join_token: Option<String>,
    /// Where the HTTP gateway listens (none: no HTTP).
    pub http_listen: Option<SocketAddr>,
}

/// The HTTP gateway's default address for a gRPC address: the same host, port + 1000.
pub fn default_http_listen(grpc: SocketAddr) -> Option<SocketAddr> {
    grpc.port()
        .checked_add(1000)
        .map(|p| SocketAddr::new(grpc.ip(), p))
}

/// How long a shutdown waits for open calls before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves until `shutdown` resolves, then stops the replica after flushing its storage.
pub async fn serve(
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let id = cfg.replica.id;
    let dir = cfg.replica.data_dir.clone();
    let replica = tokio::task::spawn_blocking(move || Replica::open(cfg.replica))
        .await
        .map_err(|e| Error::Config(format!("replica open panicked: {e}")))??;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| {
            Error::Config(format!(
                "cannot listen on {}: {e} (is another replica using this port?)",
                cfg.listen
            ))
        })?;
    tracing::info!(
        replica = id,
        listen = %cfg.listen,
        data_dir = %dir.display(),
        "control-plane replica serving"
    );
    let transport =
        GrpcTransport::new(id, cfg.advertise.clone(), tokio::runtime::Handle::current());
    let thread = ReplicaThread::start(replica, cfg.tick, transport.clone());
    let handle = thread.handle();
    transport.attach(handle.clone());
    let heartbeat_ms = (cfg.tick.as_millis() as u32).saturating_mul(20).max(100);
    let hub = WorkerHub::new();
    let usage = UsageWriter::spawn(handle.clone(), hub.clone());
    let gateway = std::sync::Arc::new(Gateway::new(handle.clone(), hub.clone(), usage.clone()));
    let auth = std::sync::Arc::new(TokenCache::new(handle.clone()));
    tokio::spawn(crate::auth::bootstrap_admin(
        handle.clone(),
        dir.clone(),
        hub.closed(),
    ));
    let http = match cfg.http_listen {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Error::Config(format!(
                    "cannot listen for HTTP on {addr}: {e} (pass --http-listen with a free port)"
                ))
            })?;
            tracing::info!(replica = id, listen = %addr, "HTTP gateway serving: POST /v1/functions/{{name}}/invoke");
            let router = crate::http::router(crate::http::HttpState::new(
                handle.clone(),
                gateway.clone(),
                auth.clone(),
            ));
            let mut closed = hub.closed();
            Some(tokio::spawn(async move {
                use axum::serve::ListenerExt;
                let l = l.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                let r = axum::serve(l, router)
                    .with_graceful_shutdown(async move {
                        let _ = closed.wait_for(|c| *c).await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "HTTP gateway stopped");
                }
            }))
        }
    };
    // Stop serving when asked, or when the replica thread ends by itself (removed).
    let thread = std::sync::Arc::new(std::sync::Mutex::new(Some(thread)));
    let watched = thread.clone();
    let closing = hub.clone();
    let (fired, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let done = watched
                        .lock()
                        .map(|g| g.as_ref().is_none_or(ReplicaThread::is_finished))
                        .unwrap_or(true);
                    if done {
                        break;
                    }
                }
            } => {}
        }
        // Workers' streams never end on their own: end them so the drain can finish.
        closing.close();
        let _ = fired.send(());
    };
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            ControlServer::new(ControlService::new(handle.clone(), gateway, auth))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            RaftServer::new(RaftService::new(handle.clone()))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .add_service(
            AgentServer::new(AgentService::new(
                handle,
                hub,
                usage,
                heartbeat_ms,
                cfg.join_token,
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        // TCP_NODELAY on every accepted connection (the builder's own setting applies only
        // to listeners it binds): a worker's stream carries small messages both ways, and
        // Nagle's algorithm would hold one behind the peer's delayed ACK for ~40 ms.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    tokio::pin!(server);
    // A graceful shutdown waits for open calls, but not forever.
    let result = tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = fired_rx.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(replica = id, grace_s = SHUTDOWN_GRACE.as_secs(), "calls still open after the shutdown grace period; closing them");
            Ok(())
        }
    };
    if let Some(h) = http {
        // It stops with the hub; open requests get the same grace as gRPC calls.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, h).await;
    }
    let thread = thread.lock().ok().and_then(|mut g| g.take());
    if let Some(thread) = thread {
        tokio::task::spawn_blocking(move || thread.stop())
            .await
            .map_err(|e| Error::Config(format!("replica stop panicked: {e}")))?;
    }
    tracing::info!(replica = id, "replica stopped cleanly");
    result.map_err(|e| Error::Config(format!("gRPC server: {e}")))
}
