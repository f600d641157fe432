//! The function commands: `deploy`, `invoke`, `ls`, `status`, `rm`, `logs`.

use std::io::{Read, Write};
use std::path::PathBuf;

use stellar_proto::v1 as pb;

use crate::connect::{Endpoint, Progress, human_bytes, node_id};

/// Arguments of `stellar deploy`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
EXAMPLES:
  stellar deploy hello.wasm --name hello --memory 32 --replicas 3
  stellar deploy thumbnail.wasm --name thumbnail --memory 512 --region cn-south --near cn-south/guangzhou
  stellar deploy resize.wasm --name resize --replicas 0     # placed on its first call
  stellar deploy --image ffmpeg.tar --name thumb --memory 256 --cpu 1000 \\
      --command \"ffmpeg -i pipe:0 -frames:v 1 -f image2 -c:v png pipe:1\"

A new deploy of an existing name is a new version: its replicas replace the old ones. A
container image's layers are uploaded only where the cluster lacks them; it is placed only
on workers that run containers (root, user namespaces, cgroups) of the image's arch, and
billed by cpu time.")]
pub struct DeployArgs {
    /// The WebAssembly module (wasm32-wasip1, a command with `_start`); or --image.
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    file: Option<PathBuf>,
    /// A container function instead: an OCI image archive (`oci-layout` tar from skopeo,
    /// buildah or `docker buildx --output type=oci`) or a rootfs tarball with --command.
    /// Its layers are uploaded once to the cluster's blob store.
    #[arg(long, value_name = "IMAGE.tar")]
    image: Option<PathBuf>,
    /// The program and arguments a container runs (shell-style quoting); replaces the
    /// image's ENTRYPOINT and CMD. Needed for a rootfs tarball.
    #[arg(long, requires = "image")]
    command: Option<String>,
    /// The node arch the image runs on (default: the image's, or this machine's for a
    /// rootfs tarball): x86_64, aarch64 or armv7.
    #[arg(long, requires = "image")]
    arch: Option<String>,
    /// Processes and threads a container may run at once (0: 64).
    #[arg(long, default_value_t = 0, requires = "image")]
    pids: u32,
    /// The function's name (default: the file name up to its first dot).
    #[arg(long)]
    name: Option<String>,
    /// Memory per instance, MiB (reserved on the node and the instance's limit).
    #[arg(long, default_value_t = 64)]
    memory: u32,
    /// CPU per instance, millicores (1000 = one core).
    #[arg(long, default_value_t = 100)]
    cpu: u32,
    /// Wall-time limit per invocation, milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout: u32,
    /// Instances to place now (0: one is placed on the first call).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Only nodes in this region.
    #[arg(long)]
    region: Option<String>,
    /// Where the callers are, REGION or REGION/ZONE: placement prefers nodes near it.
    #[arg(long)]
    near: Option<String>,
    /// Safe to run twice: the gateway retries a call once elsewhere if its worker vanishes.
    #[arg(long)]
    idempotent: bool,
    /// Give each invocation a private, empty /scratch directory.
    #[arg(long)]
    scratch: bool,
    /// Act for this tenant (admin tokens only).
    #[arg(long)]
    tenant: Option<String>,
    #[command(flatten)]
    conn: Endpoint,
}

fn split_near(near: Option<&str>) -> (String, String) {
    match near {
        Some(n) => match n.split_once('/') {
            Some((r, z)) => (r.to_string(), z.to_string()),
            None => (n.to_string(), String::new()),
        },
        None => (String::new(), String::new()),
    }
}

fn new_request_id() -> Result<Vec<u8>, String> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| format!("no OS randomness: {e}"))?;
    Ok(id.to_vec())
}

/// Reads a module and checks it as the cluster will (size, a WASI preview 1 command, memory
/// within `memory_mib`), so a module that would be refused is named here, before any upload
/// or run.
pub fn read_module(path: &std::path::Path, memory_mib: u32) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let limit = stellar_proto::limits::MAX_MODULE_BYTES;
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?
        .len();
    if size > limit as u64 {
        return Err(format!(
            "{shown} is {}; a module may be at most {} (strip debug info: `strip = true` in the release profile)",
            human_bytes(size),
            human_bytes(limit as u64)
        ));
    }
    let module = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    stellar_proto::module_check::check_module(&module, memory_mib)
        .map_err(|e| format!("{shown}: {e}"))?;
    Ok(module)
}

/// Uploads and places a function.
pub async fn deploy(a: DeployArgs) -> Result<(), String> {
    let path = a
        .file
        .clone()
        .or_else(|| a.image.clone())
        .unwrap_or_default();
    let (module, image) = match &a.image {
        Some(p) => {
            let (image, archive) = crate::image_upload::describe(
                p,
                a.command
                    .as_deref()
                    .map(crate::run::parse_command)
                    .transpose()?,
                a.arch.as_deref(),
            )?;
            (Vec::new(), Some((image, archive)))
        }
        None => (read_module(&path, a.memory)?, None),
    };
    let name = match a.name.clone() {
        Some(n) => n,
        // `ffmpeg.oci.tar` is `ffmpeg`, `hello.wasm` is `hello`.
        None => path
            .file_name()
            .and_then(|s| s.to_str())
            .and_then(|s| s.split('.').next())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| "pass --name: the file name is not a valid function name".to_string())?,
    };
    let client = a.conn.connect()?;
    let size = match &image {
        Some((image, archive)) => {
            let sent = crate::image_upload::upload_layers(&client, image, archive)
                .await
                .map_err(|s| {
                    a.conn
                        .explain(&format!("uploading the layers of `{name}`"), &s)
                })?;
            tracing::debug!(bytes = sent, "layers uploaded");
            image.layers.iter().map(|l| l.size).sum()
        }
        None => module.len() as u64,
    };
    let (near_region, near_zone) = split_near(a.near.as_deref());
    let req = pb::DeployRequest {
        request_id: new_request_id()?,
        name: name.clone(),
        module: module.clone(),
        limits: Some(pb::FunctionLimits {
            cpu_millis: a.cpu,
            memory_mib: a.memory,
            timeout_ms: a.timeout,
            scratch_dir: a.scratch,
            pids: a.pids,
            ..Default::default()
        }),
        replicas: a.replicas,
        region: a.region.clone().unwrap_or_default(),
        constraints: Vec::new(),
        tenant: a.tenant.clone().unwrap_or_default(),
        idempotent: a.idempotent,
        near_region,
        near_zone,
        image: image.as_ref().map(|(i, _)| i.clone()),
    };
    let progress = Progress::start(format!(
        "uploading {} and placing {} replica(s) of `{name}`",
        human_bytes(if image.is_some() { 0 } else { size }),
        a.replicas
    ));
    let r = client.deploy(req).await;
    drop(progress);
    let r = r.map_err(|s| {
        if s.code() == tonic::Code::FailedPrecondition {
            format!(
                "cannot place {} replica(s) of `{name}` ({} MiB, {}m each{}): {} Try another --region, a smaller --memory or fewer --replicas; `stellar nodes` shows free capacity",
                a.replicas,
                a.memory,
                a.cpu,
                a.region.as_deref().map(|r| format!(", in {r}")).unwrap_or_default(),
                s.message()
            )
        } else {
            a.conn.explain(&format!("deploying `{name}`"), &s)
        }
    })?;
    if a.conn.json() {
        let v = serde_json::json!({
            "name": name, "version": r.version, "module_sha256": r.module_sha256,
            "runtime": if image.is_some() { "container" } else { "wasm" },
            "allocations": r.allocations.iter().map(allocation_json).collect::<Vec<_>>(),
            "placements": r.placements.iter().map(reason_json).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    match &image {
        Some((i, _)) => println!(
            "deployed container `{name}` version {} ({} layer(s), {}, {})",
            r.version,
            i.layers.len(),
            human_bytes(size),
            i.arch
        ),
        None => println!(
            "deployed `{name}` version {} (module sha256 {}…, {})",
            r.version,
            &r.module_sha256[..r.module_sha256.len().min(12)],
            human_bytes(size)
        ),
    }
    if r.allocations.is_empty() {
        println!("no replica placed yet: the first call places one");
    } else {
        print_reasons(&r.placements);
    }
    Ok(())
}

/// Prints the placer's per-stage scores for each replica.
pub fn print_reasons(reasons: &[pb::PlacementReason]) {
    if reasons.is_empty() {
        return;
    }
    println!(
        "{:<18} {:<10} {:<12} {:>6} {:>8} {:>8} {:>6} {:>6} {:>7} {:>6}",
        "NODE", "REGION", "ZONE", "TOTAL", "LATENCY", "REPUTE", "FIT", "SPREAD", "RTT ms", "SCORED"
    );
    for p in reasons {
        let rtt = if p.est_rtt_ms.is_finite() {
            format!("{:.1}", p.est_rtt_ms)
        } else {
            "-".into()
        };
        println!(
            "{:<18} {:<10} {:<12} {:>6.3} {:>8.3} {:>8.3} {:>6.3} {:>6.3} {:>7} {:>6}",
            node_id(p.node),
            p.region,
            p.zone,
            p.total,
            p.latency,
            p.reputation,
            p.fit,
            p.zone_spread,
            rtt,
            p.candidates
        );
    }
}

fn reason_json(p: &pb::PlacementReason) -> serde_json::Value {
    serde_json::json!({
        "node": node_id(p.node), "region": p.region, "zone": p.zone, "total": p.total,
        "latency": p.latency, "reputation": p.reputation, "fit": p.fit,
        "zone_spread": p.zone_spread,
        "est_rtt_ms": if p.est_rtt_ms.is_finite() { Some(p.est_rtt_ms) } else { None },
        "candidates_scored": p.candidates,
    })
}

fn allocation_state(s: i32) -> &'static str {
    match pb::AllocationState::try_from(s) {
        Ok(pb::AllocationState::Pending) => "pending",
        Ok(pb::AllocationState::Running) => "running",
        Ok(pb::AllocationState::Stopped) => "stopped",
        Ok(pb::AllocationState::Lost) => "lost",
        Ok(pb::AllocationState::Failed) => "failed",
        _ => "unknown",
    }
}

fn allocation_json(a: &pb::Allocation) -> serde_json::Value {
    serde_json::json!({
        "id": a.id, "node": node_id(a.node), "version": a.version,
        "state": allocation_state(a.state),
    })
}

/// Arguments of `stellar invoke`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
EXAMPLES:
  stellar invoke hello --data 'world'
  stellar invoke wordcount --data @book.txt --near cn-east/shanghai
  cat frame.yuv | stellar invoke framefilter --data - --arg gray > out.yuv

The function's stdout goes to stdout, its stderr to stderr. The exit status is the
function's own (as with `wasmtime run`): 0, or the status it exited with; 134 when it
trapped, ran out of fuel or time, or went over a limit; 1 when the platform could not run
it (the error on stderr says why). `-o json` prints the output, usage and where it ran as
one JSON object (and exits the same way).")]
pub struct InvokeArgs {
    /// The function's name.
    name: String,
    /// The function's stdin: TEXT, @FILE, or - for this command's stdin.
    #[arg(long, short = 'd')]
    data: Option<String>,
    /// Arguments passed to the function (repeat for more; `--arg --top --arg 5`).
    #[arg(long = "arg", allow_hyphen_values = true)]
    args: Vec<String>,
    /// An environment variable KEY=VALUE for this call (repeat for more).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Where the caller is, REGION or REGION/ZONE: routing prefers instances near it.
    #[arg(long)]
    near: Option<String>,
    /// Act for this tenant (admin tokens only).
    #[arg(long)]
    tenant: Option<String>,
    #[command(flatten)]
    conn: Endpoint,
}

/// A `KEY=VALUE` flag (`--env`), for `stellar invoke` and `stellar run` alike.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// A function's input from TEXT, @FILE or - (this command's stdin).
pub fn read_data(data: Option<&str>) -> Result<Vec<u8>, String> {
    match data {
        None => Ok(Vec::new()),
        Some("-") => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .map_err(|e| format!("reading stdin: {e}"))?;
            Ok(b)
        }
        Some(s) if s.starts_with('@') => {
            std::fs::read(&s[1..]).map_err(|e| format!("cannot read {}: {e}", &s[1..]))
        }
        Some(s) => Ok(s.as_bytes().to_vec()),
    }
}

/// The exit status `stellar invoke` passes on for a function's answer: its own exit
/// status, or 134 (SIGABRT, as `wasmtime run` uses) when it did not exit on its own.
pub fn exit_status(r: &pb::InvokeResponse) -> u8 {
    exit_status_of(&r.error_code, r.usage.as_ref().map_or(-1, |u| u.exit_code))
}

/// The same from an answer's error code and the function's own exit code (`stellar run`
/// ends the same way as `stellar invoke`).
pub fn exit_status_of(error_code: &str, exit_code: i32) -> u8 {
    match (error_code, exit_code) {
        ("", _) => 0,
        ("EXIT_CODE" | "SIGNALLED", c) if (1..=255).contains(&c) => c as u8,
        _ => 134,
    }
}

/// Runs a function once; the exit status to end with.
pub async fn invoke(a: InvokeArgs) -> Result<u8, String> {
    let stdin = read_data(a.data.as_deref())?;
    let (near_region, near_zone) = split_near(a.near.as_deref());
    let req = pb::InvokeRequest {
        tenant: a.tenant.clone().unwrap_or_default(),
        function: a.name.clone(),
        stdin,
        args: a.args.clone(),
        env: a
            .env
            .iter()
            .map(|(key, value)| pb::Label {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        near_region,
        near_zone,
    };
    let client = a.conn.connect()?;
    let progress = Progress::start(format!("waiting for `{}`", a.name));
    let r = client.invoke(req).await;
    drop(progress);
    let r = r.map_err(|s| a.conn.explain(&format!("invoking `{}`", a.name), &s))?;
    let ok = r.error_code.is_empty();
    let status = exit_status(&r);
    if a.conn.json() {
        let u = r.usage.clone().unwrap_or_default();
        let v = serde_json::json!({
            "stdout": String::from_utf8_lossy(&r.stdout), "stderr": String::from_utf8_lossy(&r.stderr),
            "error_code": r.error_code, "error_message": r.error_message,
            "node": node_id(r.node), "allocation": r.allocation,
            "invocation_id": String::from_utf8_lossy(&r.invocation_id),
            "attempts": r.attempts, "scaled_from_zero": r.scaled_from_zero,
            "usage": {"fuel": u.fuel, "cpu_ns": u.cpu_ns, "pids_peak": u.pids_peak,
                      "wall_us": u.wall_us, "peak_memory_bytes": u.peak_memory_bytes,
                      "bytes_in": u.bytes_in, "bytes_out": u.bytes_out, "exit_code": u.exit_code},
        });
        println!("{v}");
        return Ok(status);
    }
    let _ = std::io::stdout().write_all(&r.stdout);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(&r.stderr);
    if !ok {
        eprintln!(
            "error: `{}` failed on node {}: {}: {}",
            a.name,
            node_id(r.node),
            r.error_code,
            r.error_message
        );
    }
    Ok(status)
}

/// Arguments of `stellar ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// Only this tenant's functions (admin tokens; a tenant sees only its own).
    #[arg(long)]
    tenant: Option<String>,
    #[command(flatten)]
    conn: Endpoint,
}

/// Lists functions.
pub async fn ls(a: LsArgs) -> Result<(), String> {
    let client = a.conn.connect()?;
    let tenant = a.tenant.clone().unwrap_or_default();
    let r = client
        .call(|mut c| {
            let req = pb::ListFunctionsRequest {
                tenant: tenant.clone(),
                read: Some(pb::ReadOptions {
                    stale: false,
                    readiness: true,
                }),
            };
            async move { c.list_functions(req).await }
        })
        .await
        .map_err(|s| a.conn.explain("listing functions", &s))?;
    if a.conn.json() {
        let v: Vec<_> = r.functions.iter().map(function_json).collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!(
        "{:<14} {:<20} {:>7} {:>8} {:>7} {:>8} {:<10}",
        "TENANT", "NAME", "VERSION", "REPLICAS", "READY", "MEMORY", "REGION"
    );
    for f in &r.functions {
        println!(
            "{:<14} {:<20} {:>7} {:>8} {:>7} {:>8} {:<10}",
            f.tenant,
            f.name,
            f.version,
            format!("{}/{}", f.allocations.len(), f.replicas),
            f.ready.len(),
            format!("{} MiB", f.limits.map_or(0, |l| l.memory_mib)),
            if f.region.is_empty() { "-" } else { &f.region }
        );
    }
    Ok(())
}

fn function_json(f: &pb::FunctionStatus) -> serde_json::Value {
    let l = f.limits.unwrap_or_default();
    serde_json::json!({
        "tenant": f.tenant, "name": f.name, "version": f.version,
        "module_sha256": f.module_sha256, "replicas": f.replicas, "region": f.region,
        "idempotent": f.idempotent,
        "runtime": if f.image.is_some() { "container" } else { "wasm" },
        "image": f.image.as_ref().map(|i| serde_json::json!({
            "layers": i.layers.iter().map(|l| serde_json::json!({"sha256": l.sha256, "size": l.size})).collect::<Vec<_>>(),
            "entrypoint": i.entrypoint, "cmd": i.cmd, "arch": i.arch,
        })),
        "limits": {"cpu_millis": l.cpu_millis, "memory_mib": l.memory_mib, "timeout_ms": l.timeout_ms},
        "allocations": f.allocations.iter().map(|a| {
            let mut v = allocation_json(a);
            v["ready"] = serde_json::Value::Bool(f.ready.contains(&a.id));
            v
        }).collect::<Vec<_>>(),
        "placements": f.placements.iter().map(reason_json).collect::<Vec<_>>(),
        "load_failures": f.load_failures, "load_error": f.load_error,
    })
}

/// Arguments of commands that name one function.
#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// The function's name.
    name: String,
    /// Act for this tenant (admin tokens only).
    #[arg(long)]
    tenant: Option<String>,
    #[command(flatten)]
    conn: Endpoint,
}

/// Shows one function: its replicas, their nodes and states, and why they are there.
pub async fn status(a: NameArgs) -> Result<(), String> {
    let client = a.conn.connect()?;
    let (tenant, name) = (a.tenant.clone().unwrap_or_default(), a.name.clone());
    let f = client
        .call(|mut c| {
            let req = pb::GetFunctionRequest {
                tenant: tenant.clone(),
                name: name.clone(),
                read: Some(pb::ReadOptions {
                    stale: false,
                    readiness: true,
                }),
            };
            async move { c.get_function(req).await }
        })
        .await
        .map_err(|s| a.conn.explain(&format!("`{}`", a.name), &s))?;
    if a.conn.json() {
        println!("{}", function_json(&f));
        return Ok(());
    }
    let l = f.limits.unwrap_or_default();
    println!(
        "{}/{} version {}: {} of {} replica(s) placed, {} ready; {} MiB, {}m, timeout {} ms{}{}",
        f.tenant,
        f.name,
        f.version,
        f.allocations.len(),
        f.replicas,
        f.ready.len(),
        l.memory_mib,
        l.cpu_millis,
        l.timeout_ms,
        if f.region.is_empty() {
            String::new()
        } else {
            format!(", region {}", f.region)
        },
        if f.idempotent { ", idempotent" } else { "" }
    );
    if let Some(i) = &f.image {
        let bytes: u64 = i.layers.iter().map(|l| l.size).sum();
        println!(
            "container image: {} layer(s), {}, {}; runs {}",
            i.layers.len(),
            human_bytes(bytes),
            i.arch,
            shlex::try_join(i.entrypoint.iter().chain(&i.cmd).map(String::as_str))
                .unwrap_or_default()
        );
    }
    if !f.allocations.is_empty() {
        println!("{:<12} {:<18} {:<8} READY", "ALLOCATION", "NODE", "STATE");
        for al in &f.allocations {
            // Committed state, refined by the leader's view: a pending one that its worker
            // reported ready is running.
            let ready = f.ready.contains(&al.id);
            let state = match allocation_state(al.state) {
                "pending" if ready => "running",
                s => s,
            };
            println!(
                "{:<12} {:<18} {:<8} {}",
                al.id,
                node_id(al.node),
                state,
                if ready { "yes" } else { "no" }
            );
        }
    }
    if f.load_failures > 0 {
        println!(
            "\nthe module failed to load on {} worker(s){}; last reason: {}",
            f.load_failures,
            if f.load_failures >= stellar_scheduler::state::MAX_LOAD_FAILURES {
                " and is not placed again: deploy a fixed version"
            } else {
                ""
            },
            f.load_error
        );
    }
    if !f.placements.is_empty() {
        println!("\nwhy these nodes (the placer's per-stage scores):");
        print_reasons(&f.placements);
    }
    Ok(())
}

/// Deletes a function and stops its replicas.
pub async fn rm(a: NameArgs) -> Result<(), String> {
    let client = a.conn.connect()?;
    let (tenant, name) = (a.tenant.clone().unwrap_or_default(), a.name.clone());
    let request_id = new_request_id()?;
    let r = client
        .call(|mut c| {
            let req = pb::DeleteFunctionRequest {
                request_id: request_id.clone(),
                tenant: tenant.clone(),
                name: name.clone(),
            };
            async move { c.delete_function(req).await }
        })
        .await
        .map_err(|s| a.conn.explain(&format!("removing `{}`", a.name), &s))?;
    if a.conn.json() {
        println!(
            "{}",
            serde_json::json!({"name": a.name, "stopped_allocations": r.stopped_allocations})
        );
    } else {
        println!(
            "removed `{}`; {} replica(s) stopped",
            a.name, r.stopped_allocations
        );
    }
    Ok(())
}

/// Arguments of `stellar logs`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "The leader keeps the last 100 invocations of each function in memory \
(they are not replicated: a new leader starts with none)."
)]
pub struct LogsArgs {
    /// The function's name.
    name: String,
    /// Most invocations to show, newest first.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Act for this tenant (admin tokens only).
    #[arg(long)]
    tenant: Option<String>,
    #[command(flatten)]
    conn: Endpoint,
}

/// Shows recent invocations with their stderr.
pub async fn logs(a: LogsArgs) -> Result<(), String> {
    let client = a.conn.connect()?;
    let (tenant, name, limit) = (
        a.tenant.clone().unwrap_or_default(),
        a.name.clone(),
        a.limit,
    );
    let r = client
        .call(|mut c| {
            let req = pb::GetLogsRequest {
                tenant: tenant.clone(),
                name: name.clone(),
                limit,
            };
            async move { c.get_logs(req).await }
        })
        .await
        .map_err(|s| a.conn.explain(&format!("logs of `{}`", a.name), &s))?;
    if a.conn.json() {
        let v: Vec<_> = r
            .invocations
            .iter()
            .map(|l| {
                serde_json::json!({
                    "invocation_id": String::from_utf8_lossy(&l.invocation_id), "node": node_id(l.node),
                    "allocation": l.allocation, "unix_ms": l.unix_ms, "wall_us": l.wall_us,
                    "fuel": l.fuel, "error_code": l.error_code, "error_message": l.error_message,
                    "stderr": String::from_utf8_lossy(&l.stderr), "stdout_bytes": l.stdout_bytes,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    if r.invocations.is_empty() {
        println!("no invocations of `{}` on this leader yet", a.name);
    }
    for l in &r.invocations {
        let status = if l.error_code.is_empty() {
            "ok".to_string()
        } else {
            format!("{}: {}", l.error_code, l.error_message)
        };
        println!(
            "{} {} node {} {} µs {} fuel {} B out — {}",
            crate::connect::utc(l.unix_ms),
            String::from_utf8_lossy(&l.invocation_id),
            node_id(l.node),
            l.wall_us,
            l.fuel,
            l.stdout_bytes,
            status
        );
        for line in String::from_utf8_lossy(&l.stderr).lines() {
            println!("    stderr | {line}");
        }
    }
    Ok(())
}
