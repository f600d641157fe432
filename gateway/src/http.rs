//! The HTTP face of the gateway, so `curl` works:
//! `POST /v1/functions/{name}/invoke` with the request body as the function's stdin and its
//! stdout as the response body. Errors are JSON with a stable code:
//! `{"error": {"code": "NO_READY_INSTANCE", "message": "..."}}`.
//!
//! ```text
//!  curl -H 'authorization: Bearer …' --data-binary @in.txt
//!       http://HOST:8001/v1/functions/wordcount/invoke?near=cn-east/shanghai
//!    │ token ─▶ TokenCache ─▶ tenant
//!    ├─ leader: Gateway::invoke
//!    └─ follower: forwarded over gRPC Control.Invoke to the leader
//! ```

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use stellar_proto::v1 as pb;
use tonic::Code;

use crate::auth::{TokenCache, parse_bearer};
use crate::client::ClusterClient;
use crate::gateway::{ERROR_METADATA, Gateway, GatewayError, http_status_of};
use crate::node::ReplicaHandle;
use crate::service::MAX_INVOKE_INPUT;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    replica: ReplicaHandle,
    gateway: Arc<Gateway>,
    auth: Arc<TokenCache>,
    /// A client for the leader, kept while the leader stays the same.
    forward: Arc<Mutex<Option<(String, ClusterClient)>>>,
}

impl HttpState {
    /// Handlers over this replica, its gateway and its token cache.
    pub fn new(replica: ReplicaHandle, gateway: Arc<Gateway>, auth: Arc<TokenCache>) -> Self {
        HttpState {
            replica,
            gateway,
            auth,
            forward: Arc::default(),
        }
    }
}

/// Longest request target (path and query) served, bytes; longer gets a JSON 414.
pub const MAX_URI_BYTES: usize = 8 << 10;

/// The HTTP routes. Every answer that is not a function's own output is the JSON error
/// shape, including the framework's own refusals (unknown route, wrong method, a body over
/// the limit, a path that is not UTF-8, a target too long).
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/functions/{name}/invoke", post(invoke))
        .route("/v1/health", get(health))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_INVOKE_INPUT))
        .layer(axum::middleware::from_fn(refuse_long_uris))
        .with_state(state)
}

async fn unknown_route(uri: axum::http::Uri) -> Response {
    error(
        404,
        "NOT_FOUND",
        &format!(
            "no route {}; the API is POST /v1/functions/{{name}}/invoke and GET /v1/health",
            crate::state::shown(uri.path())
        ),
    )
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let allowed = if uri.path() == "/v1/health" {
        "GET"
    } else {
        "POST"
    };
    let mut r = error(
        405,
        "METHOD_NOT_ALLOWED",
        &format!(
            "{method} is not allowed on {}; use {allowed}",
            crate::state::shown(uri.path())
        ),
    );
    r.headers_mut()
        .insert("allow", HeaderValue::from_static(allowed));
    r
}

async fn refuse_long_uris(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if len > MAX_URI_BYTES {
        return error(
            414,
            "URI_TOO_LONG",
            &format!("the request target is {len} bytes; at most {MAX_URI_BYTES}"),
        );
    }
    next.run(req).await
}

/// The JSON error for a request the framework could not take apart.
fn rejection(status: StatusCode, what: &str, detail: &str) -> Response {
    let (code, message) = match status.as_u16() {
        413 => (
            "PAYLOAD_TOO_LARGE",
            format!("the body (the function's stdin) is over the {MAX_INVOKE_INPUT}-byte limit"),
        ),
        _ => ("INVALID_ARGUMENT", format!("bad {what}: {detail}")),
    };
    error(status.as_u16(), code, &message)
}

/// Query parameters of an invocation.
#[derive(Debug, Default, serde::Deserialize)]
pub struct InvokeParams {
    /// The caller's location, `REGION` or `REGION/ZONE`.
    near: Option<String>,
    /// Admin tokens name the tenant whose function to call.
    tenant: Option<String>,
}

fn error(status: u16, code: &str, message: &str) -> Response {
    let message = crate::error::clip_message(message.to_string());
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [("content-type", HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}

/// An HTTP error for a gRPC status (auth refusals, forwarded calls).
fn status_error(s: &tonic::Status) -> Response {
    if let Some(code) = s
        .metadata()
        .get(ERROR_METADATA)
        .and_then(|v| v.to_str().ok())
    {
        return error(http_status_of(code), code, s.message());
    }
    let (http, code) = match s.code() {
        Code::Unauthenticated => (401, "UNAUTHENTICATED"),
        Code::PermissionDenied => (403, "PERMISSION_DENIED"),
        Code::NotFound => (404, "NOT_FOUND"),
        Code::InvalidArgument => (400, "INVALID_ARGUMENT"),
        Code::DeadlineExceeded => (504, "DEADLINE_EXCEEDED"),
        Code::FailedPrecondition => (503, "NO_CAPACITY"),
        Code::Unavailable | Code::ResourceExhausted => (503, "UNAVAILABLE"),
        _ => (500, "INTERNAL"),
    };
    error(http, code, s.message())
}

async fn health(State(s): State<HttpState>) -> Response {
    let info = s.replica.info();
    let body = serde_json::json!({
        "replica": s.replica.id(),
        "leader": info.is_leader,
        "leader_address": info.leader_address,
        "applied_index": info.applied,
        "workers_attached": s.gateway.hub().attached(),
    });
    (
        [("content-type", HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}

async fn invoke(
    State(s): State<HttpState>,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<InvokeParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let name = match name {
        Ok(Path(n)) => n,
        Err(e) => return rejection(e.status(), "function name in the path", &e.body_text()),
    };
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return rejection(e.status(), "query", &e.body_text()),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return rejection(e.status(), "body", &e.body_text()),
    };
    let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return error(
            401,
            "UNAUTHENTICATED",
            "no token: send `authorization: Bearer TOKEN`",
        );
    };
    let token = match parse_bearer(auth) {
        Ok(t) => t.to_string(),
        Err(st) => return status_error(&st),
    };
    let caller = match s.auth.resolve(&token).await {
        Ok(c) => c,
        Err(st) => return status_error(&st),
    };
    let tenant = match caller.tenant_for(q.tenant.as_deref().unwrap_or("")) {
        Ok(t) => t,
        Err(st) => return status_error(&st),
    };
    let (near_region, near_zone) = match q
        .near
        .as_deref()
        .map(|n| n.split_once('/').unwrap_or((n, "")))
    {
        Some((r, z)) => (r.to_string(), z.to_string()),
        None => (String::new(), String::new()),
    };
    let req = pb::InvokeRequest {
        tenant: tenant.clone(),
        function: name,
        stdin: body.to_vec(),
        args: Vec::new(),
        env: Vec::new(),
        near_region,
        near_zone,
    };
    let res = match s.gateway.invoke(tenant, req.clone()).await {
        Ok(r) => r,
        Err(GatewayError::NotLeader {
            address: Some(leader),
        }) => match forward(&s, &leader, &token, req).await {
            Ok(r) => r,
            Err(st) => return status_error(&st),
        },
        Err(e) => return error(e.http_status(), e.code(), &e.to_string()),
    };
    answer(res)
}

/// Forwards a call to the leader's gRPC gateway with the caller's own token.
async fn forward(
    s: &HttpState,
    leader: &str,
    token: &str,
    req: pb::InvokeRequest,
) -> Result<pb::InvokeResponse, tonic::Status> {
    let client = {
        let mut g = s
            .forward
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        match g.as_ref() {
            Some((a, c)) if a == leader => c.clone(),
            _ => {
                let c = ClusterClient::new(&[leader.to_string()])?;
                *g = Some((leader.to_string(), c.clone()));
                c
            }
        }
    };
    client.with_token(token).invoke(req).await
}

fn answer(res: pb::InvokeResponse) -> Response {
    let mut headers = HeaderMap::new();
    let mut put = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.insert(k, v);
        }
    };
    put("x-stellar-node", format!("{:016x}", res.node));
    put("x-stellar-allocation", res.allocation.to_string());
    put(
        "x-stellar-invocation-id",
        String::from_utf8_lossy(&res.invocation_id).into_owned(),
    );
    put("x-stellar-attempts", res.attempts.to_string());
    if let Some(u) = &res.usage {
        put("x-stellar-fuel", u.fuel.to_string());
        put("x-stellar-wall-us", u.wall_us.to_string());
    }
    if !res.error_code.is_empty() {
        // The function ran and failed: 500 with its own code (TRAP, OUT_OF_FUEL, EXIT_CODE, ...).
        let body = serde_json::json!({"error": {
            "code": res.error_code,
            "message": res.error_message,
            "stderr": String::from_utf8_lossy(&res.stderr),
        }});
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        return (StatusCode::INTERNAL_SERVER_ERROR, headers, body.to_string()).into_response();
    }
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    (StatusCode::OK, headers, res.stdout).into_response()
}
