//! The segment-parallel transcoding job (what `stellar transcode` submits and
//! `stellar-load transcode-bench` measures): three stages in the `transcode` image (ffmpeg,
//! ffprobe and a shell; `examples/images/build.sh transcode`). The input is split at
//! keyframes with ffmpeg's segment muxer (no re-encoding), each segment is transcoded by a
//! task of its own, and the pieces are joined with the concat demuxer.
//!
//! ```text
//!  INPUT ─▶ split (1 task, -c copy, segment muxer) ─▶ seg00000.mp4 … + audio.mp4
//!        ─▶ transcode (1 task per file: scale + libx264, or aac) ─▶ same names
//!        ─▶ join (1 task, concat demuxer + the audio, -c copy) ─▶ output.mp4
//! ```

use crate::v1 as pb;

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

/// The encoder arguments of a segment task (and of plain ffmpeg on a whole file, the
/// benchmark's baseline): scale to the preset's height, x264 on one thread (a task holds one
/// core), every frame kept with its timestamp, AAC audio.
pub fn encode_args(preset: &Preset) -> Vec<String> {
    [
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
        "-fps_mode",
        "passthrough",
        "-threads",
        "1",
        "-c:a",
        "aac",
        "-b:a",
        preset.audio,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The three stages' commands for `preset` (inputs at /in, outputs to /out).
///
/// - split: the video stream-copied into segments at keyframes, each an mp4 starting at time
///   0, and the audio (if any) stream-copied whole into `audio.mp4`;
/// - transcode: each file alone (a segment has only video, `audio.mp4` only audio);
/// - join: the segments in name order through the concat demuxer, plus the audio, copied.
///
/// Segments carry no audio because AAC's priming samples would add ~21 ms per segment;
/// timestamps restart per segment and the concat demuxer lays them end to end, so the
/// frame count and duration come out equal to the source's.
pub fn stage_commands(input_name: &str, preset: &Preset, segment_seconds: u32) -> [Vec<String>; 3] {
    let input = format!("/in/{input_name}");
    // Input names are plain file names (`job_spec::is_file_name`): safe in a shell word.
    let split = format!(
        "ffmpeg -nostdin -hide_banner -loglevel error -i {input} -map 0:v:0 -c copy \
         -f segment -segment_time {segment_seconds} -reset_timestamps 1 /out/seg%05d.mp4 && \
         if ffprobe -v error -select_streams a:0 -show_entries stream=index -of csv=p=0 {input} | grep -q .; then \
         exec ffmpeg -nostdin -hide_banner -loglevel error -i {input} -map 0:a:0 -c copy /out/audio.mp4; fi"
    );
    let mut transcode: Vec<String> = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    transcode.extend(["-threads".into(), "1".into(), "-i".into(), "{input}".into()]);
    transcode.extend(encode_args(preset));
    transcode.push("/out/{name}".into());
    let join = "for f in /in/seg*.mp4; do echo \"file $f\"; done >/tmp/concat.txt && \
         if [ -f /in/audio.mp4 ]; then \
         exec ffmpeg -nostdin -hide_banner -loglevel error -f concat -safe 0 -i /tmp/concat.txt \
         -i /in/audio.mp4 -map 0:v:0 -map 1:a:0 -c copy -movflags +faststart /out/output.mp4; \
         else exec ffmpeg -nostdin -hide_banner -loglevel error -f concat -safe 0 -i /tmp/concat.txt \
         -map 0:v:0 -c copy -movflags +faststart /out/output.mp4; fi";
    let sh = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
    [sh(&split), transcode, sh(join)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job_spec::{check_job_spec, task_argv};

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
        assert_eq!(check_job_spec(&spec), Ok(()));
        assert_eq!(spec.stages.len(), 3);
        assert!(spec.stages[0].command[2].contains("/in/movie.mp4"));
        assert!(spec.stages[1].command.contains(&"scale=-2:720".to_string()));
        assert!(spec.stages[2].command[2].contains("-f concat"));
        let argv = task_argv(
            &spec.stages[1],
            &[pb::BlobRef {
                name: "seg00003.mp4".into(),
                ..Default::default()
            }],
        );
        assert!(argv.contains(&"/in/seg00003.mp4".to_string()));
        assert!(argv.contains(&"/out/seg00003.mp4".to_string()));
    }
}
