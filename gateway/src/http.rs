//! The HTTP face of the gateway, so `curl` works:
//! `POST /v1/functions/{name}/invoke` with the request body as the function's stdin and its
//! stdout as the response body. Errors are JSON with a stable code:
//! `{"error": {"code": "NO_READY_INSTANCE", "message": "..."}}`. The OpenAPI document
//! (`gateway/api/openapi.json`, served at `GET /openapi.json`) describes it all; the tests
//! below hold it to the routes, the health fields and the lists of stable codes.
//!
//! ```text
//!  curl -H 'authorization: Bearer …' --data-binary @in.txt
//!       http://HOST:8001/v1/functions/wordcount/invoke?near=cn-east/shanghai
//!    │ token ─▶ Callers (the watched token hashes) ─▶ tenant
//!    └─ Router::invoke (here, or forwarded to the gateway holding an instance)
//! ```

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use stellar_proto::v1 as pb;
use tonic::Code;

use stellar_proto::limits::MAX_INVOKE_INPUT;
use stellar_proto::text::shown;
use stellar_proto::tokens::parse_bearer;
use stellar_proto::wire::ERROR_METADATA;

use crate::auth::Callers;
use crate::error::http_status_of;
use crate::router::{CallContext, Router as Invocations};
use crate::session::Session;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    router: Arc<Invocations>,
    callers: Arc<Callers>,
    session: Arc<Session>,
}

impl HttpState {
    /// Handlers over this gateway's router and callers (`session`: for health).
    pub fn new(router: Arc<Invocations>, callers: Arc<Callers>, session: Arc<Session>) -> Self {
        HttpState {
            router,
            callers,
            session,
        }
    }
}

/// Longest request target (path and query) served, bytes; longer gets a JSON 414.
pub const MAX_URI_BYTES: usize = 8 << 10;

/// The invocation route (POST).
pub const ROUTE_INVOKE: &str = "/v1/functions/{name}/invoke";
/// The health route (GET).
pub const ROUTE_HEALTH: &str = "/v1/health";
/// The OpenAPI document's route (GET).
pub const ROUTE_OPENAPI: &str = "/openapi.json";

/// The OpenAPI 3 document of this API, served as is at [`ROUTE_OPENAPI`] so a client can be
/// generated from it.
pub const OPENAPI: &str = include_str!("../api/openapi.json");

/// What `GET /v1/health` answers: whether this gateway can route calls.
#[derive(Debug, Default, serde::Serialize)]
pub struct Health {
    /// Always true: tells a gateway from other servers on the port.
    pub gateway: bool,
    /// Whether its copy of the cluster state is complete (calls are routed only then).
    pub state_loaded: bool,
    /// Whether its session with the control plane's leader is up.
    pub leader_session: bool,
    /// The last committed change it applied.
    pub applied_index: u64,
    /// Workers with a stream to it.
    pub workers_attached: usize,
    /// Functions it knows.
    pub functions: usize,
    /// Instances it knows (every gateway's).
    pub allocations: usize,
    /// Nodes it knows.
    pub nodes: usize,
}

/// The HTTP routes. Every answer that is not a function's own output is the JSON error
/// shape, including the framework's own refusals (unknown route, wrong method, a body over
/// the limit, a path that is not UTF-8, a target too long).
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route(ROUTE_INVOKE, post(invoke))
        .route(ROUTE_HEALTH, get(health))
        .route(ROUTE_OPENAPI, get(openapi))
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
            "no route {}; the API is POST /v1/functions/{{name}}/invoke and GET /v1/health, \
             described by GET /openapi.json",
            shown(uri.path())
        ),
    )
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let allowed = if uri.path() == ROUTE_HEALTH || uri.path() == ROUTE_OPENAPI {
        "GET"
    } else {
        "POST"
    };
    let mut r = error(
        405,
        "METHOD_NOT_ALLOWED",
        &format!(
            "{method} is not allowed on {}; use {allowed}",
            shown(uri.path())
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
    let message = stellar_proto::text::clip_message(message.to_string());
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
    let view = s.router.view();
    let (functions, allocations, nodes) = view.counts();
    let body = Health {
        gateway: true,
        state_loaded: view.complete(),
        leader_session: s.session.connected(),
        applied_index: view.applied(),
        workers_attached: s.router.hub().attached(),
        functions,
        allocations,
        nodes,
    };
    (
        [("content-type", HeaderValue::from_static("application/json"))],
        serde_json::to_string(&body).unwrap_or_default(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [("content-type", HeaderValue::from_static("application/json"))],
        OPENAPI,
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
    let caller = match s.callers.resolve(&token).await {
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
    let ctx = CallContext {
        token,
        forwarded: false,
    };
    match s.router.invoke(tenant, req, &ctx).await {
        Ok(r) => answer(r),
        Err(e) => error(e.http_status(), e.code(), &e.to_string()),
    }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn doc() -> serde_json::Value {
        serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
    }

    fn strings(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_array()
            .expect("an array")
            .iter()
            .map(|s| s.as_str().expect("a string").to_string())
            .collect()
    }

    fn keys(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_object().expect("an object").keys().cloned().collect()
    }

    #[test]
    fn the_openapi_document_names_exactly_the_routes_served() {
        let d = doc();
        assert!(
            d["openapi"].as_str().unwrap().starts_with("3."),
            "{}",
            d["openapi"]
        );
        let paths = &d["paths"];
        assert_eq!(
            keys(paths),
            [ROUTE_INVOKE, ROUTE_HEALTH, ROUTE_OPENAPI]
                .map(String::from)
                .into()
        );
        assert_eq!(keys(&paths[ROUTE_INVOKE]), ["post".to_string()].into());
        assert_eq!(keys(&paths[ROUTE_HEALTH]), ["get".to_string()].into());
        assert_eq!(keys(&paths[ROUTE_OPENAPI]), ["get".to_string()].into());
        let body =
            &paths[ROUTE_INVOKE]["post"]["requestBody"]["content"]["application/octet-stream"];
        assert_eq!(
            body["schema"]["maxLength"].as_u64(),
            Some(MAX_INVOKE_INPUT as u64)
        );
    }

    #[test]
    fn the_openapi_document_lists_every_stable_code_and_its_status() {
        let d = doc();
        let schemas = &d["components"]["schemas"];
        let listed = |l: &[stellar_proto::wire::StableCode]| -> BTreeSet<String> {
            l.iter().map(|c| c.code.to_string()).collect()
        };
        assert_eq!(
            strings(&schemas["ErrorCode"]["enum"]),
            listed(stellar_proto::wire::GATEWAY_ERROR_CODES)
        );
        assert_eq!(
            strings(&schemas["CallErrorCode"]["enum"]),
            listed(stellar_proto::wire::CALL_ERROR_CODES)
        );
        // Each refusal is documented under the HTTP status the gateway answers it with.
        let responses = &d["paths"][ROUTE_INVOKE]["post"]["responses"];
        for c in stellar_proto::wire::GATEWAY_ERROR_CODES {
            let r = &responses[c.http.to_string()];
            let text = r["description"].as_str().unwrap_or_default();
            assert!(
                text.contains(c.code),
                "{} is not under {}: {r}",
                c.code,
                c.http
            );
        }
    }

    #[test]
    fn the_openapi_health_schema_is_what_health_answers() {
        let d = doc();
        let schema = &d["components"]["schemas"]["Health"];
        let fields = keys(&serde_json::to_value(Health::default()).unwrap());
        assert_eq!(keys(&schema["properties"]), fields);
        assert_eq!(strings(&schema["required"]), fields);
    }
}
