//! The body of the gateway's `http_request` fuzz target in `fuzz/`, kept here so the
//! workspace's tests replay the committed corpus through the same code: arbitrary bytes sent
//! to the HTTP face of a real gateway in front of a real replica. Needs the `harness`
//! feature (it starts a replica, so it depends on stellar-scheduler; nothing else does).

use std::io::{Read, Write};
use std::sync::OnceLock;
use std::time::Duration;

/// A replica and a gateway serving HTTP on loopback, started once per process.
struct HttpTarget {
    addr: String,
    token: String,
    _runtime: tokio::runtime::Runtime,
    _dir: std::path::PathBuf,
}

fn http_target() -> &'static HttpTarget {
    static TARGET: OnceLock<HttpTarget> = OnceLock::new();
    TARGET.get_or_init(|| {
        // A panic in a handler runs on a server task, where it would only drop the
        // connection: make it fatal, so the fuzzer sees it.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            std::process::abort();
        }));
        // One data dir per process; those of processes that have exited are removed.
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("stellar-fuzz-http-")
                    && !std::path::Path::new("/proc").join(pid).exists()
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("stellar-fuzz-http-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        };
        let (grpc, gateway, http) = (free(), free(), free());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let cfg = stellar_scheduler::server::ServerConfig {
            replica: stellar_scheduler::ReplicaConfig::new(
                1,
                dir.clone(),
                vec![(1, grpc.to_string())],
            ),
            listen: grpc,
            advertise: grpc.to_string(),
            tick: Duration::from_millis(20),
            blobs: Default::default(),
            receipt_period_ms: 0,
        };
        runtime.spawn(stellar_scheduler::server::serve(
            cfg,
            std::future::pending(),
        ));
        {
            // Clients connect lazily on the runtime they were made in.
            let _enter = runtime.enter();
            let control = stellar_proto::client::ClusterClient::new(&[grpc.to_string()])
                .expect("a replica address")
                .with_admin_token_from(vec![dir.clone()]);
            let gw = crate::GatewayConfig {
                control,
                listen: gateway,
                advertise: gateway.to_string(),
                http_listen: Some(http),
                join_token: None,
                heartbeat: Duration::from_secs(5),
                balance_slack: crate::balance::DEFAULT_SLACK,
                checks: Default::default(),
            };
            runtime.spawn(crate::serve(gw, std::future::pending()));
        }
        // Serving once the admin token exists (a leader was elected and wrote it).
        let mut token = None;
        for _ in 0..400 {
            token = stellar_proto::tokens::read_admin_token(&dir);
            if token.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        HttpTarget {
            addr: http.to_string(),
            token: token.expect("the replica wrote its admin token"),
            _runtime: runtime,
            _dir: dir,
        }
    })
}

/// Sends `data` as the bytes of an HTTP/1.1 request to a real gateway in front of a real
/// replica (with a valid token prepended as the first header when the input starts with a
/// request line, so the fuzzer reaches the handlers): the server answers with an HTTP
/// response or closes, never panics, and every JSON answer is the documented error shape or
/// a health report.
pub fn http_request(data: &[u8]) {
    let target = http_target();
    let Ok(mut s) = std::net::TcpStream::connect(&target.addr) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut request = data.to_vec();
    if let Some(eol) = data.windows(2).position(|w| w == b"\r\n")
        && !data.starts_with(b"\r\n")
    {
        let auth = format!("authorization: Bearer {}\r\n", target.token);
        request.splice(eol + 2..eol + 2, auth.into_bytes());
    }
    let _ = s.write_all(&request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    if resp.is_empty() {
        return;
    }
    assert!(resp.starts_with(b"HTTP/1."), "not an HTTP answer: {resp:?}");
    let Some(split) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return;
    };
    let head = String::from_utf8_lossy(&resp[..split]).to_ascii_lowercase();
    // The first answer only: the input may hold several pipelined requests.
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok());
    let rest = &resp[split + 4..];
    let body = &rest[..length.unwrap_or(rest.len()).min(rest.len())];
    if head.contains("content-type: application/json") && length.is_some() {
        let v: serde_json::Value =
            serde_json::from_slice(body).expect("a JSON answer that is not JSON");
        assert!(
            v.get("error")
                .is_some_and(|e| e["code"].is_string() && e["message"].is_string())
                || v.get("gateway").is_some(),
            "an answer of neither documented shape: {v}"
        );
    }
}
