//! `stellar job run|status|ls|cancel|logs|download`: batch jobs described in a TOML file
//! (stages of container tasks over files), their inputs and images uploaded to the blob
//! store, followed with a progress bar per stage, their outputs downloaded and checked.
//!
//! ```text
//!  JOB.toml ─▶ images described, inputs hashed ─▶ upload (skips what the cluster holds)
//!  ─▶ SubmitJob ─▶ follow: GetJob every 250 ms ─▶ bars per stage (done/running/failed, bytes)
//!  ─▶ SUCCEEDED: outputs ─▶ GetBlob ─▶ OUT_DIR/NAME (sha256 checked)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;

use crate::connect::{Endpoint, human_bytes, node_id, utc};

/// How long a job just submitted may be unknown to the replica a stale read reaches.
const NOT_FOUND_GRACE: Duration = Duration::from_secs(5);

/// How often a followed job is read (a stale read on any replica: cheap).
const POLL: Duration = Duration::from_millis(250);

/// Connection flags of the job commands (no `-o` here: it names an output path).
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// Control-plane or gateway addresses, comma-separated [default: from the config file,
    /// else 127.0.0.1:7001].
    #[arg(long, env = "STELLAR_ENDPOINT", value_delimiter = ',')]
    pub endpoint: Vec<String>,
    /// The bearer token (a tenant's, or the admin token with --tenant) [default: from the
    /// config file].
    #[arg(long, env = "STELLAR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Act for this tenant (admin tokens only).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Conn {
    /// The shared endpoint settings.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            endpoint: self.endpoint.clone(),
            token: self.token.clone(),
            output: if self.json { "json" } else { "table" }.into(),
        }
    }

    fn tenant(&self) -> String {
        self.tenant.clone().unwrap_or_default()
    }
}

/// `stellar job …`.
#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// Upload a job's inputs and images, start it, follow it and download its outputs.
    Run(RunArgs),
    /// Show a job's stages and tasks (--watch: follow it until it ends).
    Status(StatusArgs),
    /// List jobs.
    Ls(ConnArgs),
    /// Stop a running job: its running attempts are cancelled and not billed.
    Cancel(NameArgs),
    /// Show each task attempt of a job: node, state, time, error and stderr's tail.
    Logs(NameArgs),
    /// Download a finished job's outputs.
    Download(DownloadArgs),
}

/// Arguments of `stellar job run`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
JOB FILE (TOML):
  name = \"trailer-720p\"                # optional: the file's stem and a random suffix
  [[inputs]]
  path = \"input.mp4\"                   # uploaded; tasks see it as /in/input.mp4
  [[stages]]
  name = \"split\"
  image = \"transcode.tar\"              # an image archive, relative to the TOML file
  fanout = \"all\"                       # all: one task with every input; each: one per input
  command = [\"ffmpeg\", \"-i\", \"/in/input.mp4\", \"...\", \"/out/seg%05d.ts\"]
  cpu = 1000                           # millicores per task (default 1000)
  memory = 512                         # MiB per task (default 512)
  timeout_ms = 600000                  # per attempt (default 30 minutes)
  [[stages]]
  fanout = \"each\"
  command = [\"ffmpeg\", \"-i\", \"{input}\", \"...\", \"/out/{name}\"]   # {input} {name} {stem}

Each task writes its results as files in /out; a stage's outputs (task order, then name)
are the next stage's inputs, and the last stage's are the job's. A task whose node is lost
or too slow is retried elsewhere (max_attempts, default 4); once 75% of a stage is done,
stragglers get a backup copy (backup_tasks = false turns that off): the first result wins
and only it is billed.")]
pub struct RunArgs {
    /// The job file.
    file: PathBuf,
    /// Where the outputs go (a directory; created) [default: ./JOB-NAME].
    #[arg(short = 'o', long = "out")]
    out: Option<PathBuf>,
    /// Start the job and return (follow it with `stellar job status NAME --watch`).
    #[arg(long)]
    detach: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Arguments of commands that name a job.
#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// The job's name.
    name: String,
    #[command(flatten)]
    conn: Conn,
}

/// Arguments of `stellar job status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The job's name.
    name: String,
    /// Follow it with a progress bar per stage until it ends.
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Arguments of `stellar job download`.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// The job's name.
    name: String,
    /// Where the outputs go (a directory; created) [default: ./JOB-NAME].
    #[arg(short = 'o', long = "out")]
    out: Option<PathBuf>,
    #[command(flatten)]
    conn: Conn,
}

/// Arguments with only the connection.
#[derive(Debug, clap::Args)]
pub struct ConnArgs {
    #[command(flatten)]
    conn: Conn,
}

/// The job file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    name: Option<String>,
    #[serde(default)]
    inputs: Vec<InputFile>,
    stages: Vec<StageFile>,
    #[serde(default)]
    max_attempts: u32,
    backup_tasks: Option<bool>,
    #[serde(default)]
    region: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFile {
    path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    #[serde(default)]
    name: String,
    image: PathBuf,
    command: Vec<String>,
    #[serde(default = "each")]
    fanout: String,
    #[serde(default = "default_cpu")]
    cpu: u32,
    #[serde(default = "default_memory")]
    memory: u32,
    #[serde(default)]
    timeout_ms: u32,
    #[serde(default)]
    pids: u32,
    #[serde(default)]
    env: Vec<String>,
}

fn each() -> String {
    "each".into()
}
fn default_cpu() -> u32 {
    1000
}
fn default_memory() -> u32 {
    512
}

/// A job ready to submit: its spec and the local files it needs uploaded.
pub struct PreparedJob {
    /// The spec (inputs and images named by content address).
    pub spec: pb::JobSpec,
    /// Local input files and what they are.
    pub inputs: Vec<(PathBuf, pb::BlobRef)>,
    /// Image archives and their descriptions.
    pub images: Vec<(pb::ContainerImage, stellar_worker::container::ImageArchive)>,
}

fn random_suffix() -> String {
    let mut b = [0u8; 3];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// A default job name from a file stem: lowercase, `[a-z0-9-]`, with a random suffix.
pub fn job_name_from(stem: &str) -> String {
    let mut s: String = stem
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches('-').chars().take(48).collect();
    if s.is_empty() {
        s = "job".into();
    }
    format!("{s}-{}", random_suffix())
}

impl JobFile {
    /// Reads and checks a job file; paths in it are relative to its directory.
    pub fn read(path: &Path) -> Result<JobFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Describes images, hashes inputs and builds the spec (nothing is sent yet).
    pub async fn prepare(self, base: &Path, default_name: &str) -> Result<PreparedJob, String> {
        let at = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let mut inputs = Vec::new();
        for i in &self.inputs {
            let p = at(&i.path);
            inputs.push((p.clone(), crate::job_files::input_ref(&p).await?));
        }
        let mut images: Vec<(pb::ContainerImage, stellar_worker::container::ImageArchive)> =
            Vec::new();
        let mut described: BTreeMap<PathBuf, pb::ContainerImage> = BTreeMap::new();
        let mut stages = Vec::new();
        for (i, s) in self.stages.into_iter().enumerate() {
            let p = at(&s.image);
            let image = match described.get(&p) {
                Some(img) => img.clone(),
                None => {
                    // A rootfs tarball has no command of its own: the stage's is it.
                    let (img, archive) = crate::image_upload::describe(&p, None, None)
                        .or_else(|_| {
                            crate::image_upload::describe(&p, Some(s.command.clone()), None)
                        })
                        .map_err(|e| format!("stage {}: {e}", i + 1))?;
                    described.insert(p.clone(), img.clone());
                    images.push((img.clone(), archive));
                    img
                }
            };
            let fanout = match s.fanout.as_str() {
                "each" => pb::Fanout::Each,
                "all" => pb::Fanout::All,
                other => {
                    return Err(format!(
                        "stage {}: fanout `{other}` is not `each` or `all`",
                        i + 1
                    ));
                }
            };
            stages.push(pb::JobStage {
                name: s.name,
                image: Some(image),
                command: s.command,
                limits: Some(pb::FunctionLimits {
                    cpu_millis: s.cpu,
                    memory_mib: s.memory,
                    timeout_ms: s.timeout_ms,
                    pids: s.pids,
                    ..Default::default()
                }),
                fanout: fanout as i32,
                env: s.env,
            });
        }
        let spec = pb::JobSpec {
            name: self.name.unwrap_or_else(|| job_name_from(default_name)),
            inputs: inputs.iter().map(|(_, b)| b.clone()).collect(),
            stages,
            max_attempts: self.max_attempts,
            no_backup_tasks: self.backup_tasks == Some(false),
            region: self.region,
            // Filled in by the gateway that takes the job: its data enters there.
            near: None,
        };
        stellar_proto::job_spec::check_job_spec(&spec)?;
        Ok(PreparedJob {
            spec,
            inputs,
            images,
        })
    }
}

/// Uploads, submits and (unless `detach`) follows a prepared job, then downloads its
/// outputs into `out`; the job's final status.
pub async fn submit_and_follow(
    job: PreparedJob,
    conn: &Conn,
    detach: bool,
    out: Option<&Path>,
) -> Result<pb::JobStatus, String> {
    let ep = conn.endpoint();
    let client = ep.connect()?;
    for (image, archive) in &job.images {
        crate::image_upload::upload_layers(&client, image, archive)
            .await
            .map_err(|s| ep.explain("uploading an image", &s))?;
    }
    let sent = crate::job_files::upload(&client, &job.inputs)
        .await
        .map_err(|s| ep.explain("uploading inputs", &s))?;
    tracing::debug!(bytes = sent, "inputs uploaded");
    let mut request_id = [0u8; 16];
    getrandom::fill(&mut request_id).map_err(|e| e.to_string())?;
    let req = pb::SubmitJobRequest {
        request_id: request_id.to_vec(),
        spec: Some(job.spec.clone()),
        tenant: conn.tenant(),
    };
    let status = client
        .call(|mut c| {
            let req = req.clone();
            async move { c.submit_job(req).await }
        })
        .await
        .map_err(|s| ep.explain("starting the job", &s))?;
    let name = job.spec.name.clone();
    if detach {
        if !conn.json {
            eprintln!("job `{name}` started; follow it with `stellar job status {name} --watch`");
        }
        return Ok(status);
    }
    let status = follow(&client, conn, &name).await?;
    let job_state = status.job.as_ref().map_or(0, |j| j.state);
    if job_state == pb::JobState::Succeeded as i32 {
        let dir = out
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&name));
        download_outputs(&client, conn, &status, &dir).await?;
    }
    Ok(status)
}

/// Polls a job until it ends, drawing a bar per stage on a terminal (a line per change
/// otherwise).
async fn follow(client: &ClusterClient, conn: &Conn, name: &str) -> Result<pb::JobStatus, String> {
    use std::io::IsTerminal;
    let ep = conn.endpoint();
    let term = std::io::stderr().is_terminal() && !conn.json;
    let multi = indicatif::MultiProgress::new();
    let mut bars: Vec<indicatif::ProgressBar> = Vec::new();
    let mut last_line = String::new();
    let started = stellar_proto::clock::now();
    loop {
        let req = pb::GetJobRequest {
            tenant: conn.tenant(),
            name: name.to_string(),
            read: Some(pb::ReadOptions {
                stale: true,
                readiness: false,
            }),
        };
        let status = match client
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_job(req).await }
            })
            .await
        {
            Ok(s) => s,
            // A leader election or a replica restart: keep following.
            // A leader election, a replica restart, or a replica that has not applied the
            // submission yet (reads are stale): keep following a while.
            Err(s)
                if stellar_proto::client::retryable(&s)
                    || (s.code() == tonic::Code::NotFound
                        && started.elapsed() < NOT_FOUND_GRACE) =>
            {
                tokio::time::sleep(POLL).await;
                continue;
            }
            Err(s) => return Err(ep.explain("following the job", &s)),
        };
        let job = status.job.clone().unwrap_or_default();
        if term {
            while bars.len() < status.stages.len() {
                let b = multi.add(indicatif::ProgressBar::new(0));
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix:>12} {bar:30} {pos}/{len} {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bars.push(b);
            }
            for (b, s) in bars.iter().zip(&status.stages) {
                b.set_prefix(s.name.clone());
                b.set_length(u64::from(s.tasks));
                b.set_position(u64::from(s.succeeded));
                b.set_message(stage_line(s));
            }
        } else if !conn.json {
            let line = status
                .stages
                .iter()
                .map(|s| format!("{} {}/{}", s.name, s.succeeded, s.tasks))
                .collect::<Vec<_>>()
                .join("  ");
            if line != last_line {
                eprintln!("{name}: {line}");
                last_line = line;
            }
        }
        if job.state != pb::JobState::Running as i32 {
            for b in &bars {
                b.finish();
            }
            return Ok(status);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn stage_line(s: &pb::StageProgress) -> String {
    let mut parts = vec![
        format!("{} running", s.running),
        format!("{} pending", s.pending),
    ];
    if s.failed > 0 {
        parts.push(format!("{} failed", s.failed));
    }
    if s.retries > 0 {
        parts.push(format!("{} retried", s.retries));
    }
    if s.backups > 0 {
        parts.push(format!("{} backups", s.backups));
    }
    parts.push(format!(
        "{} in / {} out",
        human_bytes(s.bytes_in),
        human_bytes(s.bytes_out)
    ));
    parts.join(", ")
}

/// Downloads a succeeded job's outputs into `dir`.
async fn download_outputs(
    client: &ClusterClient,
    conn: &Conn,
    status: &pb::JobStatus,
    dir: &Path,
) -> Result<Vec<PathBuf>, String> {
    let job = status.job.clone().unwrap_or_default();
    if job.state != pb::JobState::Succeeded as i32 {
        return Err(format!(
            "job `{}` has no outputs: it is {}",
            job.spec.map(|s| s.name).unwrap_or_default(),
            state_name(job.state)
        ));
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let total = job.outputs.iter().map(|b| b.size).sum();
    let bar = crate::image_upload::bytes_bar(total, "downloading outputs");
    let mut paths = Vec::new();
    for b in &job.outputs {
        let to = dir.join(&b.name);
        crate::job_files::download(client, &conn.tenant(), b, &to, &bar).await?;
        paths.push(to);
    }
    bar.finish_and_clear();
    if !conn.json {
        for p in &paths {
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(paths)
}

fn state_name(s: i32) -> String {
    pb::JobState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn attempt_state(s: i32) -> String {
    pb::AttemptState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ATTEMPT_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn print_status(s: &pb::JobStatus) {
    let j = s.job.clone().unwrap_or_default();
    let name = j.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
    let took = if j.finished_ms > 0 {
        format!(
            " in {:.1} s",
            (j.finished_ms.saturating_sub(j.submitted_ms)) as f64 / 1000.0
        )
    } else {
        String::new()
    };
    println!(
        "job {name}: {}{took} (submitted {})",
        state_name(j.state),
        utc(j.submitted_ms)
    );
    if !j.error.is_empty() {
        println!("  error: {}", j.error);
    }
    for p in &s.stages {
        println!(
            "  {:<12} {:>4}/{:<4} done  {}",
            p.name,
            p.succeeded,
            p.tasks,
            stage_line(p)
        );
    }
    for o in &j.outputs {
        println!(
            "  output {} ({}, sha256 {})",
            o.name,
            human_bytes(o.size),
            o.sha256
        );
    }
}

async fn get(conn: &Conn, name: &str) -> Result<(ClusterClient, pb::JobStatus), String> {
    let ep = conn.endpoint();
    let client = ep.connect()?;
    let req = pb::GetJobRequest {
        tenant: conn.tenant(),
        name: name.to_string(),
        read: None,
    };
    let s = client
        .call(|mut c| {
            let req = req.clone();
            async move { c.get_job(req).await }
        })
        .await
        .map_err(|s| ep.explain("reading the job", &s))?;
    Ok((client, s))
}

fn json<T: serde::Serialize>(v: &T) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// The JSON form of a job's status (what `--json` prints).
pub fn status_json(s: &pb::JobStatus) -> serde_json::Value {
    let j = s.job.clone().unwrap_or_default();
    serde_json::json!({
        "name": j.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
        "id": j.id,
        "tenant": j.tenant,
        "state": state_name(j.state),
        "error": j.error,
        "submitted_ms": j.submitted_ms,
        "finished_ms": j.finished_ms,
        "stages": s.stages.iter().map(|p| serde_json::json!({
            "name": p.name, "tasks": p.tasks, "pending": p.pending, "running": p.running,
            "succeeded": p.succeeded, "failed": p.failed, "retries": p.retries,
            "backups": p.backups, "bytes_in": p.bytes_in, "bytes_out": p.bytes_out,
        })).collect::<Vec<_>>(),
        "outputs": j.outputs.iter().map(|o| serde_json::json!({
            "name": o.name, "sha256": o.sha256, "size": o.size,
        })).collect::<Vec<_>>(),
        "attempts": j.stages.iter().enumerate().flat_map(|(si, st)| {
            st.tasks.iter().flat_map(move |t| t.attempts.iter().map(move |a| serde_json::json!({
                "stage": si + 1, "task": t.index, "attempt": a.number,
                "node": node_id(a.node), "state": attempt_state(a.state), "backup": a.backup,
                "started_ms": a.started_ms, "finished_ms": a.finished_ms, "error": a.error,
                "cpu_ns": a.usage.as_ref().map_or(0, |u| u.cpu_ns),
                "billed": a.usage.is_some(),
            })))
        }).collect::<Vec<_>>(),
    })
}

/// Runs a `stellar job` command; the exit status (1 when a followed job did not succeed).
pub async fn run(cmd: JobCommand) -> Result<u8, String> {
    match cmd {
        JobCommand::Run(a) => {
            let file = JobFile::read(&a.file)?;
            let base = a.file.parent().unwrap_or(Path::new(".")).to_path_buf();
            let stem = a
                .file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "job".into());
            let job = file.prepare(&base, &stem).await?;
            let status = submit_and_follow(job, &a.conn, a.detach, a.out.as_deref()).await?;
            finish(&status, &a.conn, a.detach)
        }
        JobCommand::Status(a) => {
            let (client, s) = get(&a.conn, &a.name).await?;
            let s = if a.watch {
                follow(&client, &a.conn, &a.name).await?
            } else {
                s
            };
            if a.conn.json {
                json(&status_json(&s))?;
            } else {
                print_status(&s);
            }
            // Followed to its end: the exit status says how it ended.
            let failed = s
                .job
                .as_ref()
                .is_some_and(|j| j.state != pb::JobState::Succeeded as i32);
            Ok(u8::from(a.watch && failed))
        }
        JobCommand::Ls(a) => {
            let ep = a.conn.endpoint();
            let client = ep.connect()?;
            let req = pb::ListJobsRequest {
                tenant: a.conn.tenant(),
                read: None,
            };
            let r = client
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.list_jobs(req).await }
                })
                .await
                .map_err(|s| ep.explain("listing jobs", &s))?;
            if a.conn.json {
                return json(&r.jobs.iter().map(status_json).collect::<Vec<_>>()).map(|()| 0);
            }
            println!(
                "{:<32} {:<10} {:<12} {:>8}  SUBMITTED",
                "NAME", "STATE", "TENANT", "TASKS"
            );
            for s in &r.jobs {
                let j = s.job.clone().unwrap_or_default();
                let done: u32 = s.stages.iter().map(|p| p.succeeded).sum();
                let all: u32 = s.stages.iter().map(|p| p.tasks).sum();
                println!(
                    "{:<32} {:<10} {:<12} {:>8}  {}",
                    j.spec.map(|s| s.name).unwrap_or_default(),
                    state_name(j.state),
                    j.tenant,
                    format!("{done}/{all}"),
                    utc(j.submitted_ms)
                );
            }
            Ok(0)
        }
        JobCommand::Cancel(a) => {
            let ep = a.conn.endpoint();
            let client = ep.connect()?;
            let mut request_id = [0u8; 16];
            getrandom::fill(&mut request_id).map_err(|e| e.to_string())?;
            let req = pb::CancelJobRequest {
                request_id: request_id.to_vec(),
                tenant: a.conn.tenant(),
                name: a.name.clone(),
            };
            let s = client
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.cancel_job(req).await }
                })
                .await
                .map_err(|s| ep.explain("cancelling the job", &s))?;
            if a.conn.json {
                json(&status_json(&s))?;
            } else {
                print_status(&s);
            }
            Ok(0)
        }
        JobCommand::Logs(a) => {
            let (_, s) = get(&a.conn, &a.name).await?;
            if a.conn.json {
                return json(&status_json(&s)).map(|()| 0);
            }
            let j = s.job.clone().unwrap_or_default();
            for (si, st) in j.stages.iter().enumerate() {
                for t in &st.tasks {
                    for at in &t.attempts {
                        let took = at.finished_ms.saturating_sub(at.started_ms);
                        println!(
                            "stage {} task {} attempt {}{} on {}: {} after {:.1} s{}",
                            si + 1,
                            t.index,
                            at.number,
                            if at.backup { " (backup)" } else { "" },
                            node_id(at.node),
                            attempt_state(at.state),
                            took as f64 / 1000.0,
                            if at.error.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", at.error)
                            }
                        );
                        let tail = String::from_utf8_lossy(&at.stderr_tail);
                        for line in tail.lines().filter(|l| !l.trim().is_empty()) {
                            println!("    | {line}");
                        }
                    }
                }
            }
            Ok(0)
        }
        JobCommand::Download(a) => {
            let (client, s) = get(&a.conn, &a.name).await?;
            let dir = a.out.unwrap_or_else(|| PathBuf::from(&a.name));
            download_outputs(&client, &a.conn, &s, &dir).await?;
            Ok(0)
        }
    }
}

/// Prints a followed job's end and picks the exit status.
pub fn finish(status: &pb::JobStatus, conn: &Conn, detach: bool) -> Result<u8, String> {
    if conn.json {
        json(&status_json(status))?;
    } else if !detach {
        print_status(status);
    }
    let state = status.job.as_ref().map_or(0, |j| j.state);
    Ok(if detach || state == pb::JobState::Succeeded as i32 {
        0
    } else {
        1
    })
}
