//! Helpers for process-level tests: a cluster of real `stellar scheduler` processes on
//! loopback (stellar-load's process harness driving this crate's binary).

#![allow(dead_code)]

use stellar_load::procs::ReplicaProcesses;

/// Starts `n` `stellar scheduler` replicas founding a new cluster under `dir`.
pub fn cluster(dir: &std::path::Path, n: usize, extra: &[&str]) -> ReplicaProcesses {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    ReplicaProcesses::start(
        dir,
        std::path::Path::new(env!("CARGO_BIN_EXE_stellar")),
        &["scheduler"],
        n,
        &extra,
    )
    .expect("start stellar scheduler processes")
}

#[allow(unused_imports)] // not every test crate deploys
pub use stellar_load::raftbench::deploy_request as deploy;

/// The cluster's bootstrap admin token, once its first leader has written it (bounded wait).
pub async fn admin_token(cluster: &ReplicaProcesses) -> String {
    let client = cluster.client();
    for _ in 0..300 {
        if let Some(t) = client.token() {
            return t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no admin token was written within 15 s");
}
