//! A segment-parallel transcoding job through a whole cluster of real processes: three
//! `stellar scheduler` replicas, a `stellar gateway` and three `stellar worker`s, driven by
//! `stellar transcode` with the example image built from this machine's ffmpeg. During the
//! job one worker is killed with `kill -9` while it runs a task, another is slowed to a
//! tenth of its speed (a straggler), and the Raft leader is killed once. The job completes,
//! its output passes ffprobe's checks against the source, and no task is billed twice.

#![cfg(target_os = "linux")]
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use stellar_proto::v1 as pb;

struct Worker {
    child: Option<Child>,
    dir: PathBuf,
}

impl Worker {
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn worker(dir: &Path, gateway: &str, i: usize) -> Worker {
    Worker {
        child: Some(common::spawn_worker(dir, gateway, i, 4096, &[])),
        dir: dir.join(format!("worker-{i}")),
    }
}

/// Makes the worker in `data` a straggler: a thread stops every process of its containers
/// nine tenths of the time (SIGSTOP, SIGCONT, in 500 ms cycles) until dropped. (A cgroup
/// quota on the runs' parent would not do: a run's own cpu limit may not exceed it.)
struct Straggler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn pids_under(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids_under(&e.path(), out);
            }
        }
    }
}

impl Straggler {
    fn new(data: &Path) -> Straggler {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let parent = stellar_worker::container::run::cgroup_parent_for(&data.join("containers"));
        let root = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            Path::new("/sys/fs/cgroup").join(parent)
        } else {
            Path::new("/sys/fs/cgroup/cpu").join(parent)
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let signal_all = |sig: Signal| {
                let mut pids = Vec::new();
                pids_under(&root, &mut pids);
                for p in pids {
                    let _ = kill(Pid::from_raw(p), sig);
                }
            };
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                signal_all(Signal::SIGSTOP);
                std::thread::sleep(Duration::from_millis(450));
                signal_all(Signal::SIGCONT);
                std::thread::sleep(Duration::from_millis(50));
            }
            signal_all(Signal::SIGCONT);
        });
        Straggler {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Straggler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// ffprobe's view of a video: (frames, duration s, width, height, codec, pix_fmt, rate,
/// audio sample rate, audio channels).
#[derive(Debug, PartialEq)]
struct Probe {
    frames: u64,
    duration: f64,
    width: u32,
    height: u32,
    codec: String,
    pix_fmt: String,
    rate: String,
    audio_rate: u32,
    channels: u32,
}

fn probe(path: &Path) -> Probe {
    let field = |args: &[&str]| -> String {
        let o = Command::new("ffprobe")
            .args(["-v", "error"])
            .args(args)
            .args(["-of", "default=noprint_wrappers=1:nokey=1"])
            .arg(path)
            .output()
            .expect("ffprobe runs (apt-get install ffmpeg; scripts/test.sh does)");
        assert!(
            o.status.success(),
            "ffprobe {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let v = |entry: &str| {
        field(&[
            "-select_streams",
            "v:0",
            "-show_entries",
            &format!("stream={entry}"),
        ])
    };
    let a = |entry: &str| {
        field(&[
            "-select_streams",
            "a:0",
            "-show_entries",
            &format!("stream={entry}"),
        ])
    };
    Probe {
        frames: field(&[
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
        ])
        .parse()
        .expect("frames"),
        duration: field(&["-show_entries", "format=duration"])
            .parse()
            .expect("duration"),
        width: v("width").parse().expect("width"),
        height: v("height").parse().expect("height"),
        codec: v("codec_name"),
        pix_fmt: v("pix_fmt"),
        rate: v("r_frame_rate"),
        audio_rate: a("sample_rate").parse().expect("sample rate"),
        channels: a("channels").parse().expect("channels"),
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The example transcode image, built once per machine into the target dir.
fn transcode_image() -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("images");
    let image = out.join("transcode.tar");
    if !image.exists() {
        let o = Command::new("bash")
            .arg(repo().join("examples/images/build.sh"))
            .arg("transcode")
            .arg(&out)
            .output()
            .expect("bash runs");
        assert!(
            o.status.success(),
            "build.sh transcode: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    image
}

async fn job(client: &stellar_proto::client::ClusterClient, name: &str) -> Option<pb::JobStatus> {
    client
        .call(|mut c| {
            let req = pb::GetJobRequest {
                tenant: "acme".into(),
                name: name.into(),
                read: Some(pb::ReadOptions {
                    stale: true,
                    readiness: false,
                }),
            };
            async move { c.get_job(req).await }
        })
        .await
        .ok()
}

/// Running attempts of the job's current stage, by node.
fn running_on(s: &pb::JobStatus) -> Vec<(u32, u64)> {
    let j = s.job.clone().unwrap_or_default();
    let Some(stage) = j.stages.last() else {
        return Vec::new();
    };
    let si = j.stages.len() as u32;
    stage
        .tasks
        .iter()
        .flat_map(|t| t.attempts.iter())
        .filter(|a| a.state == pb::AttemptState::Running as i32)
        .map(|a| (si, a.node))
        .collect()
}

fn node_of(data: &Path) -> u64 {
    stellar_worker::identity::Identity::load_or_create(data)
        .expect("worker identity")
        .node()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transcoding_job_survives_a_killed_worker_a_straggler_and_a_leader_kill() {
    if let Err(why) = stellar_worker::container::capability() {
        panic!("this machine cannot run containers ({why}); the suite needs root and cgroups");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let image = transcode_image();
    // 12 s of 1280x720 at 30 fps with a keyframe every 2 s: six segments.
    let input = dir.path().join("clip.mp4");
    let made = Command::new("bash")
        .arg(repo().join("examples/transcode/make-input.sh"))
        .arg(&input)
        .args(["12", "1280x720"])
        .output()
        .expect("make-input.sh");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let (mut cluster, admin, gateway) = common::three_replicas_and_a_gateway(dir.path()).await;
    let mut workers: Vec<Worker> = (0..3)
        .map(|i| worker(dir.path(), &gateway.grpc, i))
        .collect();
    let client = stellar_proto::client::ClusterClient::new(std::slice::from_ref(&gateway.grpc))
        .expect("gateway address")
        .with_token(&admin);
    common::wait_for_nodes(&client, 3).await;
    client.create_tenant("acme").await.expect("tenant");
    let nodes: Vec<u64> = workers.iter().map(|w| node_of(&w.dir)).collect();
    // Worker 2 is a slow box: its containers get a tenth of the time.
    let _straggler = Straggler::new(&workers[2].dir);

    let output = dir.path().join("clip-720p.mp4");
    let mut cli = common::spawn_stellar(
        [
            "transcode".as_ref(),
            input.as_os_str(),
            "--preset".as_ref(),
            "720p".as_ref(),
            "--segment-seconds".as_ref(),
            "2".as_ref(),
            "--name".as_ref(),
            "clip".as_ref(),
            "--image".as_ref(),
            image.as_os_str(),
            "-o".as_ref(),
            output.as_os_str(),
        ],
        &gateway.grpc,
        &admin,
        &dir.path().join("transcode.log"),
    );

    // Once segment tasks run: kill -9 the first worker holding one (not the slow one), then
    // the Raft leader.
    let mut killed_worker = false;
    let mut killed_leader = false;
    let start = Instant::now();
    loop {
        if let Some(s) = job(&client, "clip").await {
            let j = s.job.clone().unwrap_or_default();
            if j.state != pb::JobState::Running as i32 {
                break;
            }
            let running = running_on(&s);
            if !killed_worker
                && let Some((_, n)) = running
                    .iter()
                    .find(|(stage, n)| *stage == 2 && *n != nodes[2])
            {
                let i = nodes.iter().position(|x| x == n).expect("one of ours");
                workers[i].kill9();
                killed_worker = true;
            } else if killed_worker && !killed_leader {
                let leader = cluster.wait_leader(500).await.expect("leader");
                cluster.kill(leader);
                killed_leader = true;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the job did not end within 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = cli.wait().expect("stellar transcode ends");
    let log = std::fs::read_to_string(dir.path().join("transcode.log")).unwrap_or_default();
    assert!(status.success(), "stellar transcode failed:\n{log}");
    assert!(
        killed_worker && killed_leader,
        "worker killed {killed_worker}, leader killed {killed_leader}"
    );

    // The output is the source at 720p: every frame, the same duration and streams.
    let src = probe(&input);
    let out = probe(&output);
    assert_eq!(out.frames, src.frames, "{out:?} vs {src:?}");
    assert!(
        (out.duration - src.duration).abs() < 0.1,
        "{out:?} vs {src:?}"
    );
    assert_eq!((out.height, out.width % 2), (720, 0), "{out:?}");
    assert_eq!(
        (out.codec.as_str(), out.pix_fmt.as_str()),
        ("h264", "yuv420p")
    );
    assert_eq!(out.rate, src.rate);
    assert_eq!(
        (out.audio_rate, out.channels),
        (src.audio_rate, src.channels)
    );

    // The job's record: one winning attempt per task, and only those billed.
    let s = job(&client, "clip").await.expect("job status");
    let j = s.job.clone().expect("job");
    let tasks: u64 = j.stages.iter().map(|st| st.tasks.len() as u64).sum();
    let attempts: Vec<&pb::TaskAttempt> = j
        .stages
        .iter()
        .flat_map(|st| st.tasks.iter())
        .flat_map(|t| t.attempts.iter())
        .collect();
    let won = attempts
        .iter()
        .filter(|a| a.state == pb::AttemptState::Succeeded as i32)
        .count() as u64;
    assert_eq!(won, tasks, "one winning attempt per task");
    assert!(
        attempts
            .iter()
            .any(|a| a.state == pb::AttemptState::Lost as i32),
        "the killed worker's attempt was lost and retried: {attempts:?}"
    );
    // The slow box's task got a second copy elsewhere once most of its stage was done
    // (≥ 75%: when retries after the kills put two of the six segments on the slow box,
    // the rule rightly waits, and both finish there).
    let on_slow_box = j.stages[1]
        .tasks
        .iter()
        .filter(|t| {
            t.attempts.iter().any(|a| {
                a.node == nodes[2]
                    && a.state == pb::AttemptState::Succeeded as i32
                    && a.finished_ms.saturating_sub(a.started_ms) > 5_000
            })
        })
        .count();
    let stage_tasks = j.stages[1].tasks.len();
    assert!(
        attempts.iter().any(|a| a.backup)
            || ((stage_tasks - on_slow_box) as f64)
                < stellar_scheduler::job_driver::BACKUP_AFTER_DONE * stage_tasks as f64,
        "a backup copy of the straggler's task: {attempts:?}"
    );
    let usage = client
        .call(|mut c| {
            let req = pb::GetUsageRequest {
                tenant: "acme".into(),
                ..Default::default()
            };
            async move { c.get_usage(req).await }
        })
        .await
        .expect("usage");
    let line = usage
        .bill
        .iter()
        .find(|l| l.function == "job/clip")
        .unwrap_or_else(|| panic!("the job is billed: {usage:?}"));
    assert_eq!(line.invocations, tasks, "each task billed once: {line:?}");
    assert!(line.cpu_ns > 0 && line.cost_micros > 0, "{line:?}");
}
