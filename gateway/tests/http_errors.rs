//! A gateway's HTTP face answers every refusal with the documented JSON error, the
//! framework's own included (unknown route, wrong method, a body over the limit, a path that
//! is not UTF-8, a target too long): a replica and a gateway served in-process, spoken to in
//! raw HTTP/1.1 as a hostile or careless client would.

#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::time::Duration;

use stellar_scheduler::ReplicaConfig;
use stellar_scheduler::server::{ServerConfig, serve};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Sends `head` (request line and headers, without the blank line) and `body`; the status
/// and the body of the answer.
fn raw(addr: &str, head: &[u8], body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head).unwrap();
    write!(
        s,
        "\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    // The server may answer (and close) before the whole body is sent.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&resp)));
    let status = std::str::from_utf8(&resp[..split])
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (status, resp[split + 4..].to_vec())
}

/// The `error.code` of a JSON error body (panics on anything else).
fn code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    let code = v["error"]["code"].as_str().unwrap().to_string();
    assert!(
        stellar_proto::wire::gateway_error(&code).is_some(),
        "{code} is not in the one list of stable codes (GATEWAY_ERROR_CODES)"
    );
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_a_json_error_with_a_stable_code() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let gateway = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let cfg = ServerConfig {
        replica: ReplicaConfig::new(1, dir.path().to_path_buf(), vec![(1, addr.clone())]),
        listen: addr.parse().unwrap(),
        advertise: addr.clone(),
        tick: Duration::from_millis(20),
        blobs: Default::default(),
        receipt_period_ms: 0,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(cfg, async move {
        let _ = stopped.await;
    }));
    let gw = stellar_gateway::GatewayConfig {
        control: stellar_proto::client::ClusterClient::new(std::slice::from_ref(&addr))
            .unwrap()
            .with_admin_token_from(vec![dir.path().to_path_buf()]),
        listen: gateway.parse().unwrap(),
        advertise: gateway.clone(),
        http_listen: Some(http.parse().unwrap()),
        join_token: None,
        heartbeat: Duration::from_secs(1),
        balance_slack: stellar_gateway::balance::DEFAULT_SLACK,
        checks: Default::default(),
    };
    let (stop_gw, gw_stopped) = tokio::sync::oneshot::channel::<()>();
    let gw_task = tokio::spawn(stellar_gateway::serve(gw, async move {
        let _ = gw_stopped.await;
    }));
    let token = {
        let mut t = None;
        for _ in 0..300 {
            t = stellar_proto::tokens::read_admin_token(dir.path());
            if t.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        t.expect("the admin token")
    };
    let h = http.clone();
    tokio::task::spawn_blocking(move || {
        let auth = format!("authorization: Bearer {token}");
        let post = |path: &[u8], body: &[u8]| {
            let mut head = b"POST ".to_vec();
            head.extend_from_slice(path);
            head.extend_from_slice(b" HTTP/1.1\r\n");
            head.extend_from_slice(auth.as_bytes());
            raw(&h, &head, body)
        };
        // Unknown route.
        let (status, body) = raw(&h, b"GET /v2/anything HTTP/1.1", b"");
        assert_eq!((status, code(&body).as_str()), (404, "NOT_FOUND"));
        // Wrong method on a known route.
        let (status, body) = raw(&h, b"GET /v1/functions/hello/invoke HTTP/1.1", b"");
        assert_eq!((status, code(&body).as_str()), (405, "METHOD_NOT_ALLOWED"));
        // A body over the 8 MiB stdin limit.
        let big = vec![b'x'; stellar_proto::limits::MAX_INVOKE_INPUT + 1];
        let (status, body) = post(b"/v1/functions/hello/invoke", &big);
        assert_eq!((status, code(&body).as_str()), (413, "PAYLOAD_TOO_LARGE"));
        // A function name that is not UTF-8 once percent-decoded.
        let (status, body) = post(b"/v1/functions/%FF%FE/invoke", b"");
        assert_eq!((status, code(&body).as_str()), (400, "INVALID_ARGUMENT"));
        // A request target over 8 KiB.
        let long = format!("/v1/functions/{}/invoke", "a".repeat(10_000));
        let (status, body) = post(long.as_bytes(), b"");
        assert_eq!((status, code(&body).as_str()), (414, "URI_TOO_LONG"));
        // A name too long for a function, under the target limit: a short error.
        let named = format!("/v1/functions/{}/invoke?tenant=acme", "a".repeat(4_000));
        let (status, body) = post(named.as_bytes(), b"");
        assert_eq!((status, code(&body).as_str()), (404, "NOT_FOUND"));
        assert!(body.len() < 1024, "{} bytes", body.len());
        // No token.
        let (status, body) = raw(&h, b"POST /v1/functions/hello/invoke HTTP/1.1", b"");
        assert_eq!((status, code(&body).as_str()), (401, "UNAUTHENTICATED"));
        // The API's own description, for anyone, exactly the document the tests check.
        let (status, body) = raw(&h, b"GET /openapi.json HTTP/1.1", b"");
        assert_eq!(status, 200);
        let served: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let doc: serde_json::Value = serde_json::from_str(stellar_gateway::http::OPENAPI).unwrap();
        assert_eq!(served, doc);
        let (status, body) = raw(&h, b"POST /openapi.json HTTP/1.1", b"");
        assert_eq!((status, code(&body).as_str()), (405, "METHOD_NOT_ALLOWED"));
    })
    .await
    .unwrap();
    let _ = stop_gw.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), gw_task).await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}
