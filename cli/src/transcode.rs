//! `stellar transcode INPUT --preset 720p`: the transcoding job of
//! `stellar_proto::transcode` for a local file, its input and image uploaded, followed, and
//! its one output downloaded to `-o`.

use std::path::{Path, PathBuf};

use stellar_proto::v1 as pb;

use stellar_proto::transcode::{PRESETS, job_spec};

use crate::jobs::{Conn, PreparedJob, finish, job_name_from, submit_and_follow};

/// Arguments of `stellar transcode`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
EXAMPLES:
  examples/images/build.sh transcode examples/images/out     # the image, once
  stellar transcode movie.mp4 --preset 720p -o movie-720p.mp4
  stellar transcode movie.mp4 --preset 480p --segment-seconds 4 --detach

The input is uploaded once; each segment is transcoded by a node of its own (retried
elsewhere if the node is lost, with a backup copy for stragglers), and the joined result is
downloaded to -o (checked against its sha256). `stellar job status NAME` follows it,
`stellar usage` shows its cost (billed by the tasks' cpu time).")]
pub struct TranscodeArgs {
    /// The video to transcode.
    input: PathBuf,
    /// Output format: 480p, 720p or 1080p.
    #[arg(long, default_value = "720p", value_parser = ["480p", "720p", "1080p"])]
    preset: String,
    /// Target length of a segment, seconds (cut at the next keyframe).
    #[arg(long, default_value_t = 4)]
    segment_seconds: u32,
    /// Where the result goes [default: INPUT's stem + `-PRESET.mp4`].
    #[arg(short = 'o', long = "out")]
    out: Option<PathBuf>,
    /// The transcode image archive [default: $STELLAR_TRANSCODE_IMAGE, else
    /// examples/images/out/transcode.tar].
    #[arg(long, env = "STELLAR_TRANSCODE_IMAGE")]
    image: Option<PathBuf>,
    /// Millicores per segment task.
    #[arg(long, default_value_t = 1000)]
    cpu: u32,
    /// MiB per task.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Job name [default: the input's stem and a random suffix].
    #[arg(long)]
    name: Option<String>,
    /// Never start a second copy of a slow segment.
    #[arg(long)]
    no_backup_tasks: bool,
    /// Start the job and return.
    #[arg(long)]
    detach: bool,
    #[command(flatten)]
    conn: Conn,
}

fn default_image() -> Option<PathBuf> {
    let p = PathBuf::from("examples/images/out/transcode.tar");
    p.exists().then_some(p)
}

/// Runs `stellar transcode`; the exit status.
pub async fn run(a: TranscodeArgs) -> Result<u8, String> {
    let preset = *PRESETS
        .iter()
        .find(|p| p.name == a.preset)
        .ok_or_else(|| format!("unknown preset `{}`", a.preset))?;
    if a.segment_seconds == 0 {
        return Err("--segment-seconds must be at least 1".into());
    }
    let image_path = a.image.clone().or_else(default_image).ok_or_else(|| {
        "no transcode image: build it with `examples/images/build.sh transcode examples/images/out` and pass --image examples/images/out/transcode.tar (or set STELLAR_TRANSCODE_IMAGE)".to_string()
    })?;
    let (image, archive) = crate::image_upload::describe(&image_path, None, None)?;
    let input = crate::job_files::input_ref(&a.input).await?;
    let stem = a
        .input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "video".into());
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| job_name_from(&format!("{stem}-{}", preset.name)));
    let mut spec = job_spec(
        name.clone(),
        input.clone(),
        image.clone(),
        &preset,
        a.segment_seconds,
        (a.cpu, a.memory),
    );
    spec.no_backup_tasks = a.no_backup_tasks;
    stellar_proto::job_spec::check_job_spec(&spec)?;
    let job = PreparedJob {
        spec,
        inputs: vec![(a.input.clone(), input)],
        images: vec![(image, archive)],
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{stem}-{}.mp4", preset.name)));
    // The job's one output lands in a scratch dir next to OUTPUT, then takes its name.
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scratch = parent.join(format!(".{name}.out"));
    let status = submit_and_follow(job, &a.conn, a.detach, Some(&scratch)).await?;
    let succeeded = status
        .job
        .as_ref()
        .is_some_and(|j| j.state == pb::JobState::Succeeded as i32);
    if succeeded && !a.detach {
        let from = scratch.join("output.mp4");
        std::fs::rename(&from, &out)
            .map_err(|e| format!("{} -> {}: {e}", from.display(), out.display()))?;
        let _ = std::fs::remove_dir_all(&scratch);
        if !a.conn.json {
            eprintln!("wrote {}", out.display());
        }
    }
    finish(&status, &a.conn, a.detach)
}
