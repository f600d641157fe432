//! The `stellar-load sim` command as a user runs it: one JSON object on stdout, clear errors.

use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stellar-load"))
        .arg("sim")
        .args(args)
        .output()
        .expect("the binary runs")
}

#[test]
fn json_output_is_exactly_one_object_with_every_field() {
    let out = sim(&[
        "--nodes",
        "2000",
        "--requests",
        "600",
        "--seed",
        "7",
        "--clients",
        "200",
        "--warmup-rounds",
        "32",
        "--score-sample",
        "100",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "one line of JSON: {stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    for key in [
        "nodes",
        "requests",
        "seed",
        "bytes_per_node",
        "vivaldi_median_rel_error",
        "algorithms",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["nodes"], 2000);
    assert_eq!(v["seed"], 7);
    let algos = v["algorithms"].as_array().unwrap();
    let names: Vec<&str> = algos.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "stellar",
            "exhaustive",
            "kube-adaptive",
            "nomad-log2",
            "random"
        ]
    );
    for a in algos {
        for key in [
            "placements_per_sec",
            "decision_p50_us",
            "decision_p99_us",
            "score_ratio",
            "mean_rtt_ms",
            "optimal_rtt_ms",
            "max_node_utilisation",
            "failed",
        ] {
            assert!(a[key].is_number(), "{} lacks {key}", a["name"]);
        }
    }
    // The table's heap is counted by the binary's allocator: at least the 64-byte record per
    // node; small tables also pay for their per-class buckets (the 1M-node figure is ~145).
    let bytes = v["bytes_per_node"].as_f64().unwrap();
    assert!(bytes > 64.0 && bytes < 1024.0, "bytes per node {bytes}");
}

#[test]
fn table_output_names_every_algorithm() {
    let out = sim(&[
        "--nodes",
        "500",
        "--requests",
        "100",
        "--clients",
        "50",
        "--warmup-rounds",
        "8",
        "--algorithms",
        "stellar,random",
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("stellar") && stdout.contains("random"),
        "{stdout}"
    );
    assert!(!stdout.contains("nomad-log2"));
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let out = sim(&[
        "--algorithms",
        "fastest",
        "--nodes",
        "10",
        "--requests",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("unknown algorithm `fastest`"), "{stderr}");
    let out = sim(&["--weights", "latency=-1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("non-negative")
    );
    let out = sim(&["--nodes", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Runs `stellar-load ARGS`, which must succeed and print exactly one JSON object.
fn json_of(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_stellar-load"))
        .args(args)
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    serde_json::from_str(stdout.trim()).unwrap()
}

/// `invoke-bench` end to end on real processes (short): one JSON object with the fields the
/// issue names, and every call answered.
#[test]
fn invoke_bench_prints_one_json_object_and_no_errors() {
    let v = json_of(&[
        "invoke-bench",
        "--seconds",
        "1",
        "--concurrency",
        "4",
        "--json",
    ]);
    for k in ["invocations_per_sec", "p50_ms", "p99_ms", "errors"] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert_eq!(v["errors"], 0, "{v}");
    assert!(v["invocations_per_sec"].as_f64().unwrap() > 0.0, "{v}");
}

/// `edge-bench` end to end, small: the shipped `stellar` binary for 3 replicas and 2
/// gateways, 300 simulated workers; every killed worker and every node of the killed gateway
/// is resolved, and nothing is billed that no gateway issued.
#[test]
fn edge_bench_resolves_every_failure_and_bills_nothing_unissued() {
    let v = json_of(&[
        "edge-bench",
        "--workers",
        "300",
        "--gateways",
        "2",
        "--seconds",
        "1",
        "--kill-workers",
        "10",
        "--silence-workers",
        "0",
        "--per-process",
        "150",
        "--json",
    ]);
    assert_eq!(v["workers"], 300, "{v}");
    assert_eq!(v["detect_worker_count"], 10, "{v}");
    assert!(v["gateway_nodes"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["gateway_nodes_unresolved"], 0, "{v}");
    // Simulated workers send no receipts by default (theirs would be forgeries: see
    // worker/tests/receipts.rs for those refused and never billed).
    assert_eq!(v["billed_unissued"], 0, "{v}");
    assert_eq!(v["usage_recorded"], 0, "{v}");
    for k in [
        "leader_cpu_pct",
        "gateway_cpu_pct_per_10k_workers",
        "detect_worker_p99_ms",
        "detect_gateway_p99_ms",
        "committed_node_transitions_per_sec",
    ] {
        assert!(v[k].as_f64().is_some(), "missing {k}: {v}");
    }
}

/// `raft-bench --nodes` starts the shipped `stellar scheduler` (no hidden role of its own)
/// and reads back every node it registered.
#[test]
fn raft_bench_measures_the_shipped_scheduler() {
    let v = json_of(&["raft-bench", "--nodes", "2000", "--json"]);
    assert_eq!(v["nodes"], 2000, "{v}");
    assert!(v["rss_bytes"].as_u64().unwrap() > 0, "{v}");
}

/// `wasm-bench` (short): the sandbox figures, and an idle worker's memory read from a real
/// `stellar worker` that served `hello` through a `stellar gateway`.
#[test]
fn wasm_bench_reads_an_idle_shipped_worker() {
    let v = json_of(&[
        "wasm-bench",
        "--invocations",
        "200",
        "--seconds",
        "0.2",
        "--process-calls",
        "1",
        "--json",
    ]);
    assert!(v["invocations_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["fuel_per_call"].as_u64().unwrap() > 0, "{v}");
    assert!(
        v["worker_idle_rss_bytes"].as_u64().unwrap() > 1 << 20,
        "{v}"
    );
}

/// container-bench times the shipped `stellar run` and crun on the same rootfs, limits and
/// seccomp allow-list, and the host floor, and says what each sample is.
#[cfg(target_os = "linux")]
#[test]
fn container_bench_times_stellar_and_crun_on_equal_terms() {
    let v = json_of(&["container-bench", "--runs", "3", "--threads", "1", "--json"]);
    for field in [
        "cold_start_p50_ms",
        "cold_start_p99_ms",
        "invocations_per_sec",
        "host_exec_p50_ms",
        "crun_p50_ms",
        "crun_p99_ms",
        "sandbox_p50_ms",
    ] {
        let x = v[field].as_f64().unwrap_or(f64::NAN);
        assert!(x > 0.0 && x.is_finite(), "{field}: {v}");
    }
    assert!(
        v["cold_start_p50_ms"].as_f64() > v["host_exec_p50_ms"].as_f64(),
        "a sandbox costs more than a bare exec: {v}"
    );
    assert!(v["crun_unit"].as_str().unwrap().contains("crun run"), "{v}");
    assert!(
        v["sandbox_p50_ms"].as_f64() < v["cold_start_p50_ms"].as_f64(),
        "the sandbox is part of the whole command: {v}"
    );
}

/// Issue 15's adversaries as real processes, through `trust-bench`: one cheater of each kind
/// (the workspace's `stellar` built with the test-only cheat feature, switched on per process)
/// among three honest workers of the same binary. Every cheater is quarantined with evidence
/// against it, no honest node is quarantined or blamed, nothing is billed from forgeries and
/// the ledger's audit balances to the micro-unit.
#[test]
#[cfg_attr(
    not(feature = "cheat"),
    ignore = "needs the cheat build: cargo test -p stellar-load --features cheat"
)]
fn trust_bench_quarantines_every_cheater_and_no_honest_node() {
    let stellar =
        std::path::Path::new(env!("CARGO_BIN_EXE_stellar-load")).with_file_name("stellar");
    let v = json_of(&[
        "trust-bench",
        "--honest",
        "3",
        "--cheaters",
        "5",
        "--seconds",
        "180",
        "--until-caught",
        "--concurrency",
        "4",
        "--cheat-stellar",
        stellar.to_str().unwrap(),
        "--json",
    ]);
    for k in v["kinds"].as_array().unwrap() {
        assert_eq!(k["caught"], k["cheaters"], "{k} in {v}");
    }
    assert_eq!(v["kinds"].as_array().unwrap().len(), 5, "{v}");
    for c in v["cheater_nodes"].as_array().unwrap() {
        assert!(
            c["checks_mismatched"].as_u64().unwrap() > 0
                || c["receipts_refused"].as_u64().unwrap() > 0,
            "quarantined without evidence: {c}"
        );
    }
    assert_eq!(v["false_quarantines"], 0, "{v}");
    assert_eq!(v["honest_blamed"], 0, "{v}");
    assert_eq!(v["billed_from_forgeries_microunits"], 0, "{v}");
    assert_eq!(v["audit_balanced"], true, "{v}");
    assert_eq!(v["unbilled_microunits"], 0, "{v}");
    assert!(v["billed_executions"].as_u64().unwrap() > 0, "{v}");
    assert!(v["check_executions"].as_u64().unwrap() > 0, "{v}");
}

/// A cheat build is required for cheaters, and `--version` tells the builds apart.
#[test]
fn trust_bench_refuses_cheaters_without_a_cheat_build() {
    let out = Command::new(env!("CARGO_BIN_EXE_stellar-load"))
        .args(["trust-bench", "--cheaters", "1", "--json"])
        .env_remove("STELLAR_CHEAT_BIN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cheat-stellar"), "{err}");
    assert!(out.stdout.is_empty());
}
