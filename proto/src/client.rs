//! A client that follows leader hints: it tries the last known leader, then every endpoint,
//! and retries UNAVAILABLE answers (no leader yet, leader changed) with backoff. Every call
//! carries the client's bearer token. `Control` for the CLI, the benchmarks and the tests
//! (pointed at gateways or replicas); `Edge` for gateways talking to the replicas.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::v1 as pb;
use crate::v1::control_client::ControlClient;
use crate::v1::edge_client::EdgeClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::limits::MAX_MESSAGE_BYTES;
use crate::wire::{ERROR_METADATA, LEADER_METADATA};

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A `Control` client on one channel that presents the caller's token.
pub type Control = ControlClient<InterceptedService<Channel, Bearer>>;

/// An `Edge` client (gateway to replica) on one channel that presents the gateway's token.
pub type Edge = EdgeClient<InterceptedService<Channel, Bearer>>;

/// A leader-following client over one or more replica addresses.
#[derive(Debug, Clone)]
pub struct ClusterClient {
    endpoints: Vec<String>,
    channels: Arc<Mutex<Vec<(String, Channel)>>>,
    leader: Arc<Mutex<Option<String>>>,
    /// Where a call without a known leader starts in `endpoints`: past the last one that
    /// failed, shared by every call (a dead first endpoint is not everyone's first try).
    next: Arc<std::sync::atomic::AtomicUsize>,
    token: Arc<Mutex<Option<String>>>,
    /// Replica data dirs to read the bootstrap admin token from until one has it.
    token_dirs: Arc<Vec<PathBuf>>,
    /// How long a call may keep retrying, from its first attempt (wall-clock time).
    pub patience: Duration,
}

fn normalise(a: &str) -> String {
    a.trim_start_matches("http://").to_string()
}

impl ClusterClient {
    /// A client for the given `HOST:PORT` addresses (connections are made lazily).
    pub fn new(endpoints: &[String]) -> Result<ClusterClient, Status> {
        if endpoints.is_empty() {
            return Err(Status::invalid_argument("no control-plane endpoint given"));
        }
        let mut channels = Vec::new();
        for e in endpoints {
            let ch = Endpoint::new(format!("http://{}", normalise(e)))
                .map_err(|err| Status::invalid_argument(format!("bad endpoint `{e}`: {err}")))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .connect_lazy();
            channels.push((normalise(e), ch));
        }
        Ok(ClusterClient {
            endpoints: endpoints.iter().map(|e| normalise(e)).collect(),
            channels: Arc::new(Mutex::new(channels)),
            leader: Arc::new(Mutex::new(None)),
            next: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            token: Arc::new(Mutex::new(None)),
            token_dirs: Arc::new(Vec::new()),
            patience: Duration::from_secs(15),
        })
    }

    /// The same client (sharing its connections) presenting `token` on every call.
    pub fn with_token(&self, token: &str) -> ClusterClient {
        let mut c = self.clone();
        c.token = Arc::new(Mutex::new(Some(token.trim().to_string())));
        c
    }

    /// The same client, presenting the admin token found in any of these replica data dirs
    /// (read when first needed; a new cluster writes it once its first leader is elected).
    pub fn with_admin_token_from(&self, dirs: Vec<PathBuf>) -> ClusterClient {
        let mut c = self.clone();
        c.token = Arc::new(Mutex::new(None));
        c.token_dirs = Arc::new(dirs);
        c
    }

    /// The token this client presents, if it has one yet.
    pub fn token(&self) -> Option<String> {
        let mut g = self.token.lock().ok()?;
        if g.is_none() {
            *g = self
                .token_dirs
                .iter()
                .find_map(|d| crate::tokens::read_admin_token(d));
        }
        g.clone()
    }

    fn bearer(&self) -> Result<Bearer, Status> {
        match self.token() {
            None => Ok(Bearer(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| {
                    Status::invalid_argument("the token has characters a header cannot carry")
                }),
        }
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut chans = self
            .channels
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        if let Some((_, c)) = chans.iter().find(|(a, _)| a == address) {
            return Ok(c.clone());
        }
        let ch = Endpoint::new(format!("http://{address}"))
            .map_err(|e| Status::invalid_argument(format!("bad leader address `{address}`: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        chans.push((address.to_string(), ch.clone()));
        Ok(ch)
    }

    /// A raw client for `address` (e.g. to ask one replica for its status).
    pub fn client_for(&self, address: &str) -> Result<Control, Status> {
        Ok(
            ControlClient::with_interceptor(self.channel(&normalise(address))?, self.bearer()?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// A raw `Edge` client for `address` (a gateway's watch stream to one replica).
    pub fn edge_for(&self, address: &str) -> Result<Edge, Status> {
        Ok(
            EdgeClient::with_interceptor(self.channel(&normalise(address))?, self.bearer()?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// The replica this client last found leading, or that last answered when no leader was
    /// known (None: neither yet).
    pub fn leader(&self) -> Option<String> {
        self.leader.lock().ok().and_then(|g| g.clone())
    }

    /// Creates tenant `name` without an API token (idempotent: the request id derives from
    /// the name, so a retry or a second call is answered, not applied twice).
    pub async fn create_tenant(&self, name: &str) -> Result<(), Status> {
        let request_id = format!("tenant-{name}").into_bytes();
        self.call(|mut c| {
            let req = pb::CreateTenantRequest {
                request_id: request_id.clone(),
                name: name.to_string(),
                token_sha256: vec![],
            };
            async move { c.create_tenant(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Deploys (retries are safe: the request id is applied once).
    pub async fn deploy(&self, req: pb::DeployRequest) -> Result<pb::DeployResponse, Status> {
        self.call(|mut c| {
            let req = req.clone();
            async move { c.deploy(req).await }
        })
        .await
    }

    /// Runs a function once through a gateway. Repeated only when the answer
    /// proves the function did not run (not the leader, refused before routing, the
    /// connection never made): a call that may have run is never run again by the client
    /// (the gateway itself retries an idempotent function once when its worker vanishes).
    pub async fn invoke(&self, req: pb::InvokeRequest) -> Result<pb::InvokeResponse, Status> {
        self.call_with(RetryPolicy::Unrun, |mut c| {
            let req = req.clone();
            async move { c.invoke(req).await }
        })
        .await
    }

    /// Registered nodes (up to 1,000), as the answering replica last applied them.
    pub async fn nodes(&self) -> Result<Vec<pb::NodeInfo>, Status> {
        self.call(|mut c| async move {
            c.list_nodes(pb::ListNodesRequest {
                read: Some(pb::ReadOptions {
                    stale: true,
                    readiness: false,
                }),
                ..Default::default()
            })
            .await
        })
        .await
        .map(|r| r.nodes)
    }

    /// Calls `f` on the leader, following hints and retrying while no leader is known; for
    /// reads and for writes carrying a request id (a retried write is applied once).
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: FnMut(Control) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_with(RetryPolicy::Safe, f).await
    }

    /// Calls `f` on the leader, repeating the failed attempts `policy` allows until
    /// [`ClusterClient::patience`] has passed since the first attempt (wall-clock time, the
    /// attempts' own time included).
    pub async fn call_with<T, F, Fut>(&self, policy: RetryPolicy, f: F) -> Result<T, Status>
    where
        F: FnMut(Control) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_on(policy, ClusterClient::client_for, f).await
    }

    /// [`ClusterClient::call_with`] for the `Edge` service (gateways to the leader).
    pub async fn edge_call<T, F, Fut>(&self, policy: RetryPolicy, f: F) -> Result<T, Status>
    where
        F: FnMut(Edge) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_on(policy, ClusterClient::edge_for, f).await
    }

    async fn call_on<C, T, F, Fut>(
        &self,
        policy: RetryPolicy,
        make: fn(&ClusterClient, &str) -> Result<C, Status>,
        mut f: F,
    ) -> Result<T, Status>
    where
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = crate::clock::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let next = self.next.load(std::sync::atomic::Ordering::Relaxed);
            let target = self
                .leader
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .unwrap_or_else(|| self.endpoints[next % self.endpoints.len()].clone());
            let client = make(self, &target)?;
            let s = match f(client).await {
                Ok(r) => {
                    // Without a known leader, the replica that answered is where the next
                    // call starts (not the first endpoint again, which may be down): a
                    // streamed upload, which cannot be retried, then goes to a live one.
                    if let Ok(mut g) = self.leader.lock()
                        && g.is_none()
                    {
                        *g = Some(target);
                    }
                    return Ok(r.into_inner());
                }
                Err(s) => s,
            };
            let left = self.patience.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(s);
            }
            // A new cluster's admin token is being written: wait for it.
            let again = (s.code() == Code::Unauthenticated && !self.token_dirs.is_empty())
                || match policy {
                    RetryPolicy::Safe => retryable(&s),
                    RetryPolicy::Unrun => did_not_run(&s),
                };
            if !again {
                return Err(s);
            }
            let hint = s
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(normalise);
            let hinted = hint.as_ref().is_some_and(|h| *h != target);
            if let Ok(mut g) = self.leader.lock() {
                *g = if hinted { hint } else { None };
            }
            if !hinted {
                self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(backoff.min(left)).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Which failed attempts a call may repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Reads, and writes carrying a request id: any answer that says "try again".
    Safe,
    /// Calls that must not run twice (invocations): only answers proving it did not run.
    Unrun,
}

/// Whether an answer means "try again, maybe elsewhere": no leader, leader changed (the
/// request id makes the retry safe), or the replica could not be reached.
pub fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) || overloaded(s)
}

fn overloaded(s: &Status) -> bool {
    s.code() == Code::ResourceExhausted && s.message().contains("overloaded")
}

/// Whether an answer proves the call was not run: the replica does not lead (its hint or
/// code says so), the gateway refused it before routing (its stable code says so), the
/// proposal queue was full, or the connection was never made. A worker lost mid-call, a
/// timeout or a connection that broke after the request left may have run it.
pub fn did_not_run(s: &Status) -> bool {
    if s.code() != Code::Unavailable {
        return overloaded(s);
    }
    let code = s
        .metadata()
        .get(ERROR_METADATA)
        .and_then(|v| v.to_str().ok());
    matches!(code, Some("NOT_LEADER" | "UNAVAILABLE"))
        || (code.is_none() && s.metadata().get(LEADER_METADATA).is_some())
        || never_connected(s)
}

/// Whether a transport failure happened before any connection existed (so no request left
/// this process): a refused or unreachable address, or a connect timeout.
pub fn never_connected(s: &Status) -> bool {
    let mut e: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(err) = e {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            )
        {
            return true;
        }
        if err.to_string().contains("tcp connect error") {
            return true;
        }
        e = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A peer that accepts connections, holds each for `hold`, then closes it unanswered:
    /// a request sent on it may or may not have been acted on.
    async fn silent_peer(hold: Duration) -> (String, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    tokio::time::sleep(hold).await;
                    drop(s);
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn an_invocation_that_may_have_run_is_not_repeated() {
        let (addr, accepted) = silent_peer(Duration::from_millis(300)).await;
        let c = ClusterClient::new(&[addr]).unwrap();
        let e = c.invoke(pb::InvokeRequest::default()).await.unwrap_err();
        assert!(!did_not_run(&e), "{e:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "{e:?}");
    }

    #[tokio::test]
    async fn patience_is_wall_clock_time_attempts_included() {
        let (addr, accepted) = silent_peer(Duration::from_millis(700)).await;
        let mut c = ClusterClient::new(&[addr]).unwrap();
        c.patience = Duration::from_secs(2);
        let start = crate::clock::now();
        let e = c
            .call(|mut cl| async move { cl.who_am_i(pb::WhoAmIRequest {}).await })
            .await
            .unwrap_err();
        let elapsed = start.elapsed();
        assert!(retryable(&e), "{e:?}");
        assert!(accepted.load(Ordering::SeqCst) >= 2, "a read is retried");
        // Counting only the pauses between attempts, 2 s of pauses took ~8 attempts of
        // 0.7 s each (7.7 s); the bound is the patience plus the attempt under way.
        assert!(elapsed < Duration::from_millis(4500), "{elapsed:?}");
    }

    #[tokio::test]
    async fn an_invocation_that_never_connected_is_retried_until_patience() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let mut c = ClusterClient::new(&[addr]).unwrap();
        c.patience = Duration::from_millis(600);
        let start = crate::clock::now();
        let e = c.invoke(pb::InvokeRequest::default()).await.unwrap_err();
        assert!(never_connected(&e), "{e:?}");
        assert!(did_not_run(&e));
        assert!(
            start.elapsed() >= Duration::from_millis(500),
            "retried, not given up at once"
        );
    }

    #[test]
    fn only_answers_that_prove_nothing_ran_are_unrun() {
        let marked = |code: &'static str| {
            let mut s = Status::unavailable("x");
            s.metadata_mut()
                .insert(ERROR_METADATA, code.parse().unwrap());
            s
        };
        assert!(did_not_run(&marked("NOT_LEADER")));
        assert!(did_not_run(&marked("UNAVAILABLE")));
        assert!(!did_not_run(&marked("WORKER_LOST")));
        assert!(!did_not_run(&marked("NO_READY_INSTANCE")));
        assert!(!did_not_run(&Status::unavailable("connection reset")));
        let mut hinted = Status::unavailable("not the leader");
        hinted
            .metadata_mut()
            .insert(LEADER_METADATA, "127.0.0.1:7002".parse().unwrap());
        assert!(did_not_run(&hinted));
        assert!(did_not_run(&Status::resource_exhausted(
            "the control plane is overloaded (proposal queue full)"
        )));
        assert!(!did_not_run(&Status::deadline_exceeded("slow")));
    }
}
