//! `transcode-bench`: segment-parallel transcoding on real processes and in the simulator.
//!
//! (a) Real processes of the shipped `stellar` binary on loopback: one control-plane
//! replica, one gateway and N workers of one core each (`--cpu-millis 1000`; each task's
//! cgroup holds it to one core). The same input is transcoded by `stellar transcode` with
//! one worker and with two, and by plain ffmpeg on the whole file pinned to one core with
//! the same encoder settings (one worker's share), in the same run. The image's layers are
//! fetched by every worker before the clock starts (a warm-up function), as on a fleet that
//! ran the job before; the input's upload and the output's download are on the clock.
//!
//! (b) The job simulator (`jobsim.rs`) at fleet sizes: completion against the ideal with no
//! churn and with 20% of nodes leaving, and the tail with and without backup tasks.
//!
//! ```text
//!  build image, make input ─▶ plain ffmpeg (taskset -c 0, same args)        t_plain
//!  for N in 1, 2: replica + gateway + N workers ─▶ warm layers ─▶ stellar transcode  t_N
//!  speedup_2_workers = t_1 / t_2     overhead_vs_plain_ffmpeg = t_1 / t_plain
//! ```

#![allow(clippy::disallowed_methods)] // a benchmark's timers read the clock

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stellar_proto::client::ClusterClient;
use stellar_proto::transcode::{PRESETS, encode_args};

/// What to run.
#[derive(Debug, Clone)]
pub struct TranscodeBenchConfig {
    /// The shipped `stellar` binary.
    pub stellar: PathBuf,
    /// The repository root (for `examples/images/build.sh` and `make-input.sh`).
    pub repo: PathBuf,
    /// Input length, seconds.
    pub seconds: u32,
    /// Input size, WxH.
    pub size: String,
    /// Output preset (480p, 720p, 1080p).
    pub preset: String,
    /// Segment length, seconds.
    pub segment_seconds: u32,
    /// A built transcode image (built into a temp dir when absent).
    pub image: Option<PathBuf>,
    /// Simulated fleet sizes (none: skip the simulator).
    pub sim_nodes: Vec<usize>,
    /// The simulator's seed.
    pub seed: u64,
    /// Skip the real processes (simulator only).
    pub sim_only: bool,
}

/// The simulator's figures at one fleet size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimFigures {
    /// Simulated nodes.
    pub nodes: usize,
    /// Completion ÷ ideal, no churn (backups on).
    pub sim_completion_ratio_no_churn: f64,
    /// Completion ÷ ideal with 20% of nodes leaving mid-job (backups on).
    pub sim_completion_ratio_20pct_churn: f64,
    /// 1 − tail with backups ÷ tail without, under 20% churn.
    pub sim_backup_task_gain: f64,
    /// The same without churn.
    pub sim_backup_task_gain_no_churn: f64,
}

/// What was measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TranscodeBenchReport {
    /// Input seconds and size.
    pub input: String,
    /// Segment tasks of the job (the split and the join are two more).
    pub segment_tasks: u32,
    /// Plain ffmpeg, whole file, one core, same encoder arguments, wall seconds.
    pub plain_ffmpeg_s: f64,
    /// `stellar transcode` with one one-core worker, wall seconds.
    pub job_1_worker_s: f64,
    /// The same with two.
    pub job_2_workers_s: f64,
    /// job_1_worker_s ÷ job_2_workers_s.
    pub speedup_2_workers: f64,
    /// job_1_worker_s ÷ plain_ffmpeg_s.
    pub overhead_vs_plain_ffmpeg: f64,
    /// Frames in the source and in each job's output (ffprobe).
    pub frames: Vec<u64>,
    /// The simulator's figures per fleet size.
    pub sim: Vec<SimFigures>,
}

/// Why the bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeBenchError {
    /// Setting up (binary, image, input, processes) failed.
    #[error("setup: {0}")]
    Setup(String),
    /// The job or the baseline failed.
    #[error("run: {0}")]
    Run(String),
}

fn setup(e: impl std::fmt::Display) -> TranscodeBenchError {
    TranscodeBenchError::Setup(e.to_string())
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<(), TranscodeBenchError> {
    let o = cmd.output().map_err(|e| setup(format!("{what}: {e}")))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(TranscodeBenchError::Run(format!(
            "{what}: {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        )))
    }
}

/// Frames of the first video stream (ffprobe, decoding every frame).
pub fn frames(path: &Path) -> Result<u64, TranscodeBenchError> {
    let o = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .map_err(|e| setup(format!("ffprobe (apt-get install ffmpeg): {e}")))?;
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            TranscodeBenchError::Run(format!("ffprobe could not count {}", path.display()))
        })
}

/// One run of the job on a fresh cluster of `workers` one-core workers; its wall seconds.
fn job_on(
    cfg: &TranscodeBenchConfig,
    dir: &Path,
    workers: usize,
    (image, input, output): (&Path, &Path, &Path),
    log: &mut dyn FnMut(&str),
) -> Result<f64, TranscodeBenchError> {
    let local = crate::procs::LocalCluster::start(
        &cfg.stellar,
        dir,
        &crate::procs::LocalClusterConfig {
            gateways: 1,
            workers,
            worker_args: ["--cpu-millis", "1000", "--memory-mib", "3072"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        },
    )
    .map_err(TranscodeBenchError::Setup)?;
    let gateway = local.gateways[0].clone();
    let admin = local.admin_token().map_err(TranscodeBenchError::Setup)?;
    let rt = tokio::runtime::Runtime::new().map_err(setup)?;
    rt.block_on(async {
        let client = ClusterClient::new(std::slice::from_ref(&gateway))
            .map_err(|e| setup(e.message()))?
            .with_token(&admin);
        let start = Instant::now();
        while client.nodes().await.unwrap_or_default().len() < workers {
            if start.elapsed() > Duration::from_secs(60) {
                return Err(setup(format!("{workers} workers did not register in 60 s")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        client
            .create_tenant("bench")
            .await
            .map_err(|e| setup(e.message()))
    })?;
    // Every worker fetches and unpacks the image's layer first (a function on each node).
    let stellar = |args: &[&str]| {
        let mut c = Command::new(&cfg.stellar);
        c.args(args).args([
            "--endpoint",
            &gateway,
            "--token",
            &admin,
            "--tenant",
            "bench",
        ]);
        c
    };
    let image_s = image.to_string_lossy();
    run_ok(
        &mut stellar(&[
            "deploy",
            "--image",
            &image_s,
            "--name",
            "warm",
            "--command",
            "true",
            "--memory",
            "64",
            "--cpu",
            "100",
            "--timeout",
            "60000",
            "--replicas",
            &workers.to_string(),
        ]),
        "warm-up deploy",
    )?;
    let start = Instant::now();
    loop {
        let o = stellar(&["status", "warm", "-o", "json"])
            .output()
            .map_err(setup)?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let ready = v["allocations"].as_array().map_or(0, |a| {
            a.iter()
                .filter(|x| x["ready"].as_bool() == Some(true))
                .count()
        });
        if ready >= workers {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(setup("workers did not fetch the image within 120 s"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    run_ok(&mut stellar(&["rm", "warm"]), "warm-up rm")?;
    log(&format!(
        "{workers} worker(s) ready, image cached; transcoding"
    ));
    let preset = cfg.preset.clone();
    let seg = cfg.segment_seconds.to_string();
    let t = Instant::now();
    run_ok(
        stellar(&["transcode"])
            .arg(input)
            .args([
                "--preset",
                &preset,
                "--segment-seconds",
                &seg,
                "--name",
                "bench",
            ])
            .arg("--image")
            .arg(image)
            .arg("-o")
            .arg(output),
        "stellar transcode",
    )?;
    let secs = t.elapsed().as_secs_f64();
    drop(local);
    Ok(secs)
}

/// Runs the bench (see the module docs); progress goes to `log`.
pub fn run(
    cfg: &TranscodeBenchConfig,
    log: &mut dyn FnMut(&str),
) -> Result<TranscodeBenchReport, TranscodeBenchError> {
    let mut r = TranscodeBenchReport {
        input: format!("{} s {}", cfg.seconds, cfg.size),
        ..Default::default()
    };
    if !cfg.sim_only {
        real_processes(cfg, &mut r, log)?;
    }
    for f in crate::jobsim::transcode_sim_summary(&cfg.sim_nodes, cfg.seed) {
        log(&format!("simulated {} nodes", f.nodes));
        r.sim.push(SimFigures {
            nodes: f.nodes,
            sim_completion_ratio_no_churn: f.sim_completion_ratio_no_churn,
            sim_completion_ratio_20pct_churn: f.sim_completion_ratio_20pct_churn,
            sim_backup_task_gain: f.sim_backup_task_gain,
            sim_backup_task_gain_no_churn: f.sim_backup_task_gain_no_churn,
        });
    }
    Ok(r)
}

fn real_processes(
    cfg: &TranscodeBenchConfig,
    r: &mut TranscodeBenchReport,
    log: &mut dyn FnMut(&str),
) -> Result<(), TranscodeBenchError> {
    if !cfg.stellar.is_file() {
        return Err(setup(format!(
            "the `stellar` binary is not at {} (build it: cargo build --release -p stellar-cli, or pass --stellar PATH)",
            cfg.stellar.display()
        )));
    }
    let preset = PRESETS
        .iter()
        .find(|p| p.name == cfg.preset)
        .ok_or_else(|| setup(format!("unknown preset {}", cfg.preset)))?;
    let dir = tempfile::tempdir().map_err(setup)?;
    let image = match &cfg.image {
        Some(i) => i.clone(),
        None => {
            log("building the transcode image (examples/images/build.sh transcode)");
            run_ok(
                Command::new("bash")
                    .arg(cfg.repo.join("examples/images/build.sh"))
                    .arg("transcode")
                    .arg(dir.path()),
                "build.sh transcode",
            )?;
            dir.path().join("transcode.tar")
        }
    };
    let input = dir.path().join("input.mp4");
    log(&format!("making a {} s {} input", cfg.seconds, cfg.size));
    run_ok(
        Command::new("bash")
            .arg(cfg.repo.join("examples/transcode/make-input.sh"))
            .arg(&input)
            .arg(cfg.seconds.to_string())
            .arg(&cfg.size),
        "make-input.sh",
    )?;
    r.segment_tasks = cfg.seconds.div_ceil(cfg.segment_seconds.max(1));
    // The baseline: one process, one core (what one worker has), the same encoder args.
    let plain = dir.path().join("plain.mp4");
    let t = Instant::now();
    run_ok(
        Command::new("taskset")
            .args([
                "-c",
                "0",
                "ffmpeg",
                "-nostdin",
                "-hide_banner",
                "-loglevel",
                "error",
            ])
            .args(["-threads", "1", "-i"])
            .arg(&input)
            .args(encode_args(preset))
            .args(["-movflags", "+faststart", "-y"])
            .arg(&plain),
        "plain ffmpeg",
    )?;
    r.plain_ffmpeg_s = t.elapsed().as_secs_f64();
    log(&format!("plain ffmpeg: {:.2} s", r.plain_ffmpeg_s));
    r.frames.push(frames(&input)?);
    let mut times = Vec::new();
    for workers in [1usize, 2] {
        let run_dir = dir.path().join(format!("cluster-{workers}"));
        std::fs::create_dir_all(&run_dir).map_err(setup)?;
        let output = run_dir.join("output.mp4");
        let secs = job_on(cfg, &run_dir, workers, (&image, &input, &output), log)?;
        log(&format!(
            "stellar transcode on {workers} worker(s): {secs:.2} s"
        ));
        r.frames.push(frames(&output)?);
        times.push(secs);
    }
    if r.frames.iter().any(|f| *f != r.frames[0]) {
        return Err(TranscodeBenchError::Run(format!(
            "frame counts differ (source, 1 worker, 2 workers): {:?}",
            r.frames
        )));
    }
    r.job_1_worker_s = times[0];
    r.job_2_workers_s = times[1];
    r.speedup_2_workers = times[0] / times[1];
    r.overhead_vs_plain_ffmpeg = times[0] / r.plain_ffmpeg_s;
    Ok(())
}
