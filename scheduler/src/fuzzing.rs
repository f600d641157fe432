//! The bodies of the control plane's fuzz targets in `fuzz/`, kept here so the workspace's
//! tests replay the committed corpus through the same code: arbitrary commands applied to
//! the state machine, and arbitrary bytes sent to the HTTP gateway of a real replica.

use std::io::{Read, Write};
use std::sync::OnceLock;
use std::time::Duration;

use prost::Message;
use stellar_proto::v1 as pb;

use crate::state::{Effects, StateMachine};

/// A ready, managed node in cn-east with 2 cores and 2 GiB (the fuzzer's commands and the
/// state machine's unit tests place on such nodes).
pub fn node(id: u64) -> pb::NodeRecord {
    pb::NodeRecord {
        id,
        attributes: Some(pb::NodeAttributes {
            region: "cn-east".into(),
            zone: format!("z{}", id % 2),
            arch: "x86_64".into(),
            runtimes: vec!["wasm".into()],
            capacity: Some(pb::Resources {
                cpu_millis: 2000,
                memory_mib: 2048,
                disk_mib: 0,
            }),
            ..Default::default()
        }),
        state: pb::NodeState::Ready as i32,
        reputation: 1.0,
        managed: true,
        ..Default::default()
    }
}

/// Two tenants and four ready nodes: the state the fuzzer's commands meet.
pub fn seeded_state() -> StateMachine {
    let mut m = StateMachine::new();
    let mut fx = Effects::default();
    let setup = [
        pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
            name: "acme".into(),
            token_sha256: vec![],
        }),
        pb::command::Kind::CreateTenant(pb::CreateTenantCmd {
            name: "globex".into(),
            token_sha256: vec![],
        }),
        pb::command::Kind::RegisterNodes(pb::RegisterNodesCmd {
            nodes: (1..=4).map(node).collect(),
        }),
    ];
    for (i, kind) in setup.into_iter().enumerate() {
        let r = m.apply(
            i as u64 + 1,
            pb::Command {
                request_id: vec![],
                kind: Some(kind),
            },
            &mut fx,
        );
        assert!(r.error_code.is_empty(), "{r:?}");
    }
    m
}

/// Decodes `data` as a batch of commands and applies each: whatever they say, apply must
/// answer without panicking, keep every invariant the cluster tests check, and leave a
/// state whose snapshot restores to the same digest.
pub fn apply_commands(data: &[u8]) {
    let Ok(batch) = pb::CommandBatch::decode(data) else {
        return;
    };
    let mut m = seeded_state();
    for (i, cmd) in batch.commands.into_iter().enumerate() {
        let mut fx = Effects::default();
        let again = cmd.clone();
        let first = m.apply(100 + i as u64, cmd, &mut fx);
        // A command with a request id is answered the same way when retried.
        if !again.request_id.is_empty() && first.error_code != crate::error::STALE_PLAN {
            let retried = m.apply(100 + i as u64, again, &mut Effects::default());
            assert_eq!(retried, first, "a retried request id got another answer");
        }
    }
    for check in [
        StateMachine::check_load_accounting,
        StateMachine::check_capacity,
        StateMachine::check_distinct_replicas,
    ] {
        if let Err(e) = check(&m) {
            panic!("invariant broken: {e}");
        }
    }
    let restored = StateMachine::from_snapshot(m.to_snapshot()).expect("own snapshot restores");
    assert_eq!(
        restored.digest(),
        m.digest(),
        "snapshot round trip changed the state"
    );
}

/// A replica serving HTTP on loopback, started once per process.
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
        let (grpc, http) = (free(), free());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let cfg = crate::server::ServerConfig {
            replica: crate::ReplicaConfig::new(1, dir.clone(), vec![(1, grpc.to_string())]),
            listen: grpc,
            advertise: grpc.to_string(),
            tick: Duration::from_millis(20),
            join_token: None,
            http_listen: Some(http),
        };
        runtime.spawn(crate::server::serve(cfg, std::future::pending()));
        // Serving once the admin token exists (a leader was elected and wrote it).
        let mut token = None;
        for _ in 0..400 {
            token = crate::auth::read_admin_token(&dir);
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

/// Sends `data` as the bytes of an HTTP/1.1 request to a real replica's gateway (with a
/// valid token prepended as the first header when the input starts with a request line,
/// so the fuzzer reaches the handlers): the server answers with an HTTP response or closes,
/// never panics, and every JSON answer is the documented error shape or a health report.
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
                || v.get("replica").is_some(),
            "an answer of neither documented shape: {v}"
        );
    }
}
