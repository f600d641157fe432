//! Runs one gateway: follows the control plane's watch, keeps a session with its leader,
//! serves `Agent` (workers) and `Control` (clients) on one address and HTTP on another, until
//! `shutdown` resolves. Stateless: a restarted gateway rebuilds everything from the watch,
//! and its workers re-attach (here or to another gateway).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use stellar_proto::client::ClusterClient;
use stellar_proto::limits::MAX_MESSAGE_BYTES;
use stellar_proto::v1::agent_server::AgentServer;
use stellar_proto::v1::control_server::ControlServer;

use crate::agent::{AgentService, Edge};
use crate::allocation_states::AllocationStateWriter;
use crate::auth::Callers;
use crate::control::GatewayControl;
use crate::error::Error;
use crate::hub::WorkerHub;
use crate::modules::Modules;
use crate::router::Router;
use crate::session::Session;
use crate::usage::UsageWriter;
use crate::view::View;

/// How a gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The control plane, with the gateway's own admin token (`with_token` or
    /// `with_admin_token_from`).
    pub control: ClusterClient,
    /// Where workers and clients connect (gRPC).
    pub listen: SocketAddr,
    /// The address other gateways and the control plane know this one by (its identity).
    pub advertise: String,
    /// Where HTTP clients connect (none: no HTTP).
    pub http_listen: Option<SocketAddr>,
    /// The secret workers present to join (none: workers are refused).
    pub join_token: Option<String>,
    /// How often workers send a keepalive; three missed and their stream is closed.
    pub heartbeat: Duration,
    /// Ready nodes above the gateways' mean this one holds before it sends registering and
    /// idle workers to a less loaded peer (`balance::DEFAULT_SLACK`; 0 balances even tiny
    /// fleets).
    pub balance_slack: usize,
    /// How often successful WebAssembly calls are re-executed elsewhere to check them.
    pub checks: crate::checks::CheckPolicy,
}

/// The HTTP default for a gRPC address: the same host, port + 1000.
pub fn default_http_listen(grpc: SocketAddr) -> Option<SocketAddr> {
    grpc.port()
        .checked_add(1000)
        .map(|p| SocketAddr::new(grpc.ip(), p))
}

/// How long a shutdown waits for open calls before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Missed keepalives before a worker's stream is closed.
const MISSED_HEARTBEATS: u32 = 3;

/// Serves until `shutdown` resolves.
pub async fn serve(
    cfg: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    if cfg.control.endpoints().is_empty() {
        return Err(Error::Config(
            "--control needs at least one replica address".into(),
        ));
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| {
            Error::Config(format!(
                "cannot listen on {}: {e} (is another gateway using this port?)",
                cfg.listen
            ))
        })?;
    let client = cfg.control.clone();
    let hub = WorkerHub::new();
    let view = View::new();
    let session = Session::new(cfg.advertise.clone());
    let usage = UsageWriter::spawn(client.clone(), hub.clone());
    let coordinates = crate::coordinates::Coordinates::new();
    let edge = Edge {
        hub: hub.clone(),
        view: view.clone(),
        session: session.clone(),
        usage: usage.clone(),
        states: AllocationStateWriter::spawn(client.clone()),
        modules: Modules::new(client.clone()),
        client: client.clone(),
        coordinates: coordinates.clone(),
        advertise: cfg.advertise.clone(),
        balance_slack: cfg.balance_slack,
    };
    let router = Arc::new(Router::new(
        hub.clone(),
        view.clone(),
        usage,
        client.clone(),
        cfg.advertise.clone(),
        coordinates.clone(),
        Arc::new(crate::checks::Checks::new(cfg.checks)),
    ));
    let known = {
        let (view, session) = (view.clone(), session.clone());
        move || {
            let mut g = view.gateways();
            g.extend(session.gateways());
            g
        }
    };
    tokio::spawn(coordinates.probe_peers(known, cfg.advertise.clone(), hub.closed()));
    tokio::spawn(crate::balance::shed_excess(edge.clone(), hub.closed()));
    let callers = Arc::new(Callers::new(view.clone(), client.clone()));
    tokio::spawn(crate::watcher::follow(
        client.clone(),
        view.clone(),
        hub.clone(),
        hub.closed(),
    ));
    tokio::spawn(
        session
            .clone()
            .run(client.clone(), hub.clone(), hub.closed()),
    );
    tokio::spawn(close_silent(
        hub.clone(),
        session.clone(),
        cfg.heartbeat * MISSED_HEARTBEATS,
    ));
    tracing::info!(
        listen = %cfg.listen,
        advertise = %cfg.advertise,
        control = ?client.endpoints(),
        "gateway serving: workers (Agent) and clients (Control)"
    );
    let http = match cfg.http_listen {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Error::Config(format!(
                    "cannot listen for HTTP on {addr}: {e} (pass --http-listen with a free port)"
                ))
            })?;
            tracing::info!(listen = %addr, "HTTP serving: POST /v1/functions/{{name}}/invoke");
            let app = crate::http::router(crate::http::HttpState::new(
                router.clone(),
                callers.clone(),
                session.clone(),
            ));
            let mut closed = hub.closed();
            Some(tokio::spawn(async move {
                use axum::serve::ListenerExt;
                let l = l.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                let r = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = closed.wait_for(|c| *c).await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "HTTP stopped");
                }
            }))
        }
    };
    let closing = hub.clone();
    let (fired, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        // Workers' streams never end on their own: end them so the drain can finish.
        closing.close();
        let _ = fired.send(());
    };
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            ControlServer::new(GatewayControl::new(router, callers, client))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AgentServer::new(AgentService::new(
                edge,
                cfg.heartbeat.as_millis() as u32,
                cfg.join_token,
                hub.closed(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        // TCP_NODELAY on every accepted connection: a worker's stream carries small
        // messages both ways, and Nagle's algorithm would hold one behind the peer's
        // delayed ACK for ~40 ms.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = fired_rx.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "calls still open after the shutdown grace period; closing them");
            Ok(())
        }
    };
    if let Some(h) = http {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, h).await;
    }
    tracing::info!(advertise = %cfg.advertise, "gateway stopped");
    result.map_err(|e| Error::Config(format!("gRPC server: {e}")))
}

/// Closes the streams of workers whose keepalives stopped, once a second: a device that
/// vanished without closing its connection is detected here, not by the control plane.
async fn close_silent(hub: Arc<WorkerHub>, session: Arc<Session>, silent: Duration) {
    let mut closed = hub.closed();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        for node in hub.close_silent(silent) {
            tracing::info!(
                node = format!("{node:016x}"),
                silent_ms = silent.as_millis() as u64,
                "worker silent; stream closed"
            );
            session.gone(&hub, node);
        }
    }
}
