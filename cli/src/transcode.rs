//! `stellar transcode INPUT --preset 720p`: the segment-parallel transcoding job built for
//! you. Three stages run in the `transcode` image (ffmpeg, ffprobe and a shell): the input
//! is split at keyframes with ffmpeg's segment muxer (no re-encoding), each segment is
//! transcoded on a node of its own, and the segments are joined with the concat demuxer.
//!
//! ```text
//!  INPUT ─▶ split (1 task, -c copy, segment muxer) ─▶ seg00000.ts … segNNNNN.ts
//!        ─▶ transcode (1 task per segment: scale, libx264, aac) ─▶ same names
//!        ─▶ join (1 task, concat demuxer, -c copy) ─▶ output.mp4 ─▶ -o OUTPUT
//! ```

use std::path::{Path, PathBuf};

use stellar_proto::v1 as pb;

use crate::jobs::{Conn, PreparedJob, finish, job_name_from, submit_and_follow};

/// One output format: its height and encoder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// The name on the command line.
    pub name: &'static str,
    /// Output height (the width follows the aspect ratio, kept even).
    pub height: u32,
    /// x264's constant rate factor.
    pub crf: u32,
    /// AAC bitrate.
    pub audio: &'static str,
}

/// The presets `--preset` takes.
pub const PRESETS: [Preset; 3] = [
    Preset {
        name: "480p",
        height: 480,
        crf: 24,
        audio: "96k",
    },
    Preset {
        name: "720p",
        height: 720,
        crf: 23,
        audio: "128k",
    },
    Preset {
        name: "1080p",
        height: 1080,
        crf: 22,
        audio: "160k",
    },
];

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

/// The three stages' commands for `preset` (inputs at /in, outputs to /out).
pub fn stage_commands(input_name: &str, preset: &Preset, segment_seconds: u32) -> [Vec<String>; 3] {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let split = v(&[
        "ffmpeg",
        "-nostdin",
        "-loglevel",
        "error",
        "-i",
        &format!("/in/{input_name}"),
        "-map",
        "0:v:0",
        "-map",
        "0:a?",
        "-c",
        "copy",
        "-f",
        "segment",
        "-segment_time",
        &segment_seconds.to_string(),
        "-segment_format",
        "mpegts",
        "-reset_timestamps",
        "0",
        "/out/seg%05d.ts",
    ]);
    let transcode = v(&[
        "ffmpeg",
        "-nostdin",
        "-loglevel",
        "error",
        "-copyts",
        "-i",
        "{input}",
        "-map",
        "0:v:0",
        "-map",
        "0:a?",
        "-vf",
        &format!("scale=-2:{}", preset.height),
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-crf",
        &preset.crf.to_string(),
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-b:a",
        preset.audio,
        "-muxdelay",
        "0",
        "-f",
        "mpegts",
        "/out/{name}",
    ]);
    let join = v(&[
        "sh",
        "-c",
        "set -e; for f in /in/*.ts; do echo \"file '$f'\"; done > /tmp/list.txt; \
         ffmpeg -nostdin -loglevel error -f concat -safe 0 -i /tmp/list.txt -map 0 -c copy \
         -movflags +faststart /out/output.mp4",
    ]);
    [split, transcode, join]
}

/// The transcoding job for `input` (already hashed) in `image`.
pub fn job_spec(
    name: String,
    input: pb::BlobRef,
    image: pb::ContainerImage,
    preset: &Preset,
    segment_seconds: u32,
    (cpu, memory): (u32, u32),
) -> pb::JobSpec {
    let [split, transcode, join] = stage_commands(&input.name, preset, segment_seconds);
    let stage = |name: &str, command: Vec<String>, fanout: pb::Fanout| pb::JobStage {
        name: name.into(),
        image: Some(image.clone()),
        command,
        limits: Some(pb::FunctionLimits {
            cpu_millis: cpu,
            memory_mib: memory,
            // ffmpeg's threads: one per core and a few more.
            pids: 256,
            ..Default::default()
        }),
        fanout: fanout as i32,
        env: Vec::new(),
    };
    pb::JobSpec {
        name,
        inputs: vec![input],
        stages: vec![
            stage("split", split, pb::Fanout::All),
            stage("transcode", transcode, pb::Fanout::Each),
            stage("join", join, pb::Fanout::All),
        ],
        ..Default::default()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transcoding_job_is_a_valid_three_stage_job() {
        let input = pb::BlobRef {
            name: "movie.mp4".into(),
            sha256: "ab".repeat(32),
            size: 1,
        };
        let image = pb::ContainerImage {
            layers: vec![pb::ImageLayer {
                sha256: "cd".repeat(32),
                size: 1,
                gzip: true,
            }],
            cmd: vec!["sh".into()],
            arch: "x86_64".into(),
            ..Default::default()
        };
        let spec = job_spec("m".into(), input, image, &PRESETS[1], 4, (1000, 512));
        assert_eq!(stellar_proto::job_spec::check_job_spec(&spec), Ok(()));
        assert_eq!(spec.stages.len(), 3);
        assert!(
            spec.stages[0]
                .command
                .contains(&"/in/movie.mp4".to_string())
        );
        assert!(spec.stages[1].command.contains(&"scale=-2:720".to_string()));
        let argv = stellar_proto::job_spec::task_argv(
            &spec.stages[1],
            &[pb::BlobRef {
                name: "seg00003.ts".into(),
                ..Default::default()
            }],
        );
        assert!(argv.contains(&"/in/seg00003.ts".to_string()));
        assert!(argv.contains(&"/out/seg00003.ts".to_string()));
    }
}
