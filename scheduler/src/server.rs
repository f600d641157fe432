//! Runs one control-plane replica: opens its storage, starts the replica thread, serves
//! `Control`, `Raft` and `Edge` on one address until `shutdown` resolves. A new cluster's
//! first leader writes the admin token. Workers and HTTP clients are served by gateways.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use stellar_proto::v1::control_server::ControlServer;
use stellar_proto::v1::edge_server::EdgeServer;
use stellar_proto::v1::raft_server::RaftServer;

use crate::auth::TokenCache;
use crate::edge::EdgeService;
use crate::error::{Error, Result};
use crate::replica::{Replica, ReplicaConfig};
use crate::replica_thread::ReplicaThread;
use crate::service::{ControlService, MAX_MESSAGE_BYTES, RaftService};
use crate::transport::GrpcTransport;

/// How a replica process runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The replica itself.
    pub replica: ReplicaConfig,
    /// Where to listen (clients, peers and gateways share it).
    pub listen: SocketAddr,
    /// The address peers and clients use to reach this replica.
    pub advertise: String,
    /// The logical clock's period (raft ticks, liveness rounds).
    pub tick: Duration,
    /// Where blob bytes live (this replica's disk unless an object store is named).
    pub blobs: crate::blob_backend::BlobStoreSpec,
    /// The receipt period's length in ms (one Merkle root each); 0 = 5 minutes.
    pub receipt_period_ms: u64,
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
    // The blob store first: a wrong bucket or endpoint stops the start before anything
    // serves.
    let backend = crate::blob_backend::open(&cfg.blobs, &dir.join("blobs"))
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
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
    let auth = std::sync::Arc::new(TokenCache::new(handle.clone()));
    let blobs = crate::blob_transfer::Blobs::new(backend, handle.clone());
    let (closing, closed) = tokio::sync::watch::channel(false);
    {
        // Blobs no live function refers to any more leave the disk (after a grace period).
        let (blobs, mut closed) = (blobs.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(crate::blob_transfer::SWEEP_EVERY) => {}
                    _ = closed.changed() => return,
                }
                blobs.sweep(crate::blob_transfer::SWEEP_GRACE).await;
            }
        });
    }
    tokio::spawn(crate::auth::bootstrap_admin(
        handle.clone(),
        dir.clone(),
        closed.clone(),
    ));
    // Stop serving when asked, or when the replica thread ends by itself (removed).
    let thread = std::sync::Arc::new(std::sync::Mutex::new(Some(thread)));
    let watched = thread.clone();
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
        // Gateways' watch and session streams never end on their own: end them so the
        // drain can finish.
        closing.send_replace(true);
        let _ = fired.send(());
    };
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            ControlServer::new(ControlService::new(
                handle.clone(),
                auth.clone(),
                blobs.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            RaftServer::new(RaftService::new(handle.clone(), blobs.clone()))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .add_service(
            EdgeServer::new(EdgeService::new(
                handle,
                auth,
                closed,
                blobs,
                cfg.receipt_period_ms,
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        // TCP_NODELAY on every accepted connection (the builder's own setting applies only
        // to listeners it binds): peers' and gateways' streams carry small messages both
        // ways, and Nagle's algorithm would hold one behind the peer's delayed ACK for ~40 ms.
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
    let thread = thread.lock().ok().and_then(|mut g| g.take());
    if let Some(thread) = thread {
        tokio::task::spawn_blocking(move || thread.stop())
            .await
            .map_err(|e| Error::Config(format!("replica stop panicked: {e}")))?;
    }
    tracing::info!(replica = id, "replica stopped cleanly");
    result.map_err(|e| Error::Config(format!("gRPC server: {e}")))
}
