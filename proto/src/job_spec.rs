//! A batch job's description, checked the same way by the CLI before it uploads anything, by
//! the control plane before it proposes the job and by apply: stages, images, commands, file
//! names and limits. Also how a stage's command becomes one task's argv, so a worker, the
//! watch stream and `stellar job status` show the same command.

use crate::limits::{MAX_CPU_MILLIS, MAX_MEMORY_MIB, check_image, is_sha256_hex};
use crate::v1::{BlobRef, Fanout, JobSpec, JobStage};

/// Most stages a job may have.
pub const MAX_STAGES: usize = 16;
/// Most inputs a job, or tasks a stage, may have.
pub const MAX_TASKS_PER_STAGE: usize = 10_000;
/// Most files one task may write to `/out`.
pub const MAX_OUTPUTS_PER_TASK: usize = 1_000;
/// Attempts per task (first run, retries and backup copies) when the job gives none.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// Most attempts per task a job may ask for.
pub const MAX_ATTEMPTS: u32 = 16;
/// A task's wall-clock limit when its stage gives none, ms (30 minutes): transcoding a
/// segment on a slow set-top box takes minutes, not the seconds a function call gets.
pub const DEFAULT_TASK_TIMEOUT_MS: u32 = 30 * 60 * 1000;
/// Longest task deadline a stage may ask for, ms (6 hours).
pub const MAX_TASK_TIMEOUT_MS: u32 = 6 * 60 * 60 * 1000;
/// Most argv entries of a stage's command.
pub const MAX_ARGS: usize = 1_024;
/// Bytes of a stage's command and env together.
pub const MAX_COMMAND_BYTES: usize = 64 << 10;

/// Whether `name` can be a file under `/in` or `/out`: 1–255 of `[A-Za-z0-9._-]`, not `.`
/// or `..` (no directories, nothing a shell or a path join could misread).
pub fn is_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a job name: 1–63 of `[a-z0-9-]`, starting with a letter or digit (as functions).
pub fn check_job_name(name: &str) -> Result<(), String> {
    crate::text::check_name("job", name)
}

/// Checks blobs by name: valid, distinct file names and content addresses.
pub fn check_blob_refs(what: &str, refs: &[BlobRef]) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for r in refs {
        if !is_file_name(&r.name) {
            return Err(format!(
                "{what} name {} must be 1-255 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
                crate::text::shown(&r.name)
            ));
        }
        if !is_sha256_hex(&r.sha256) {
            return Err(format!(
                "{what} `{}` has no lowercase hex sha256 (got {})",
                r.name,
                crate::text::shown(&r.sha256)
            ));
        }
        if !names.insert(r.name.as_str()) {
            return Err(format!(
                "two {what}s are named `{}`; names must differ",
                r.name
            ));
        }
    }
    Ok(())
}

fn check_stage(i: usize, s: &JobStage) -> Result<(), String> {
    let at = |e: String| format!("stage {} (`{}`): {e}", i + 1, s.name);
    if !s.name.is_empty() {
        crate::text::check_name("stage", &s.name).map_err(at)?;
    }
    let Some(image) = &s.image else {
        return Err(at("no image".into()));
    };
    // A stage's command may stand in for an image without ENTRYPOINT or CMD.
    let mut runnable = image.clone();
    if runnable.cmd.is_empty() && runnable.entrypoint.is_empty() {
        runnable.cmd.clone_from(&s.command);
    }
    check_image(&runnable).map_err(at)?;
    if s.command.len() > MAX_ARGS {
        return Err(at(format!(
            "command has {} arguments; at most {MAX_ARGS}",
            s.command.len()
        )));
    }
    let bytes: usize = s.command.iter().chain(&s.env).map(String::len).sum();
    if bytes > MAX_COMMAND_BYTES {
        return Err(at(format!(
            "command and env are {bytes} bytes; at most {MAX_COMMAND_BYTES}"
        )));
    }
    if let Some(kv) = s
        .env
        .iter()
        .find(|kv| !kv.contains('=') || kv.starts_with('='))
    {
        return Err(at(format!("env entry `{kv}` is not KEY=VALUE")));
    }
    let each = s.fanout == Fanout::Each as i32;
    if !each && s.fanout != Fanout::All as i32 {
        return Err(at(format!("fanout {} is not `each` or `all`", s.fanout)));
    }
    if !each
        && let Some(a) = s
            .command
            .iter()
            .find(|a| a.contains("{input}") || a.contains("{name}") || a.contains("{stem}"))
    {
        return Err(at(format!(
            "`{a}` names one input, but a fanout `all` task has every input (use /in/NAME)"
        )));
    }
    let l = s.limits.unwrap_or_default();
    if l.memory_mib == 0 || l.memory_mib > MAX_MEMORY_MIB {
        return Err(at(format!(
            "memory must be 1..={MAX_MEMORY_MIB} MiB, got {}",
            l.memory_mib
        )));
    }
    if l.cpu_millis == 0 || l.cpu_millis > MAX_CPU_MILLIS {
        return Err(at(format!(
            "cpu must be 1..={MAX_CPU_MILLIS} millicores, got {}",
            l.cpu_millis
        )));
    }
    if l.timeout_ms > MAX_TASK_TIMEOUT_MS {
        return Err(at(format!(
            "timeout must be at most {MAX_TASK_TIMEOUT_MS} ms (0 = {DEFAULT_TASK_TIMEOUT_MS}), got {}",
            l.timeout_ms
        )));
    }
    if l.pids > crate::limits::MAX_PIDS {
        return Err(at(format!(
            "pids must be at most {}, got {}",
            crate::limits::MAX_PIDS,
            l.pids
        )));
    }
    Ok(())
}

/// Checks a whole job description; the error names the stage or input at fault.
pub fn check_job_spec(spec: &JobSpec) -> Result<(), String> {
    check_job_name(&spec.name)?;
    if spec.stages.is_empty() || spec.stages.len() > MAX_STAGES {
        return Err(format!(
            "a job has 1..={MAX_STAGES} stages, got {}",
            spec.stages.len()
        ));
    }
    if spec.inputs.is_empty() || spec.inputs.len() > MAX_TASKS_PER_STAGE {
        return Err(format!(
            "a job has 1..={MAX_TASKS_PER_STAGE} inputs, got {}",
            spec.inputs.len()
        ));
    }
    check_blob_refs("input", &spec.inputs)?;
    if spec.max_attempts > MAX_ATTEMPTS {
        return Err(format!(
            "max_attempts must be at most {MAX_ATTEMPTS} (0 = {DEFAULT_MAX_ATTEMPTS}), got {}",
            spec.max_attempts
        ));
    }
    if let Some(c) = &spec.near {
        let finite = c.vec.iter().all(|v| v.is_finite());
        if c.vec.len() != 3 || !finite || !c.height_ms.is_finite() || c.height_ms < 0.0 {
            return Err(format!(
                "near must be a network coordinate of 3 finite dimensions and a height >= 0 ms, got {:?} + {} ms",
                c.vec, c.height_ms
            ));
        }
    }
    for (i, s) in spec.stages.iter().enumerate() {
        check_stage(i, s)?;
    }
    Ok(())
}

/// Attempts a task of `spec` may use.
pub fn max_attempts(spec: &JobSpec) -> u32 {
    if spec.max_attempts == 0 {
        DEFAULT_MAX_ATTEMPTS
    } else {
        spec.max_attempts
    }
}

/// One task's argv: the stage's command with `{input}`, `{name}` and `{stem}` filled in
/// from its single input (a fanout `each` task; others have no placeholders).
pub fn task_argv(stage: &JobStage, inputs: &[BlobRef]) -> Vec<String> {
    let Some(one) = inputs.first().filter(|_| inputs.len() == 1) else {
        return stage.command.clone();
    };
    let stem = match one.name.rfind('.') {
        Some(i) if i > 0 => &one.name[..i],
        _ => one.name.as_str(),
    };
    stage
        .command
        .iter()
        .map(|a| {
            a.replace("{input}", &format!("/in/{}", one.name))
                .replace("{name}", &one.name)
                .replace("{stem}", stem)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ContainerImage, FunctionLimits, ImageLayer};

    fn blob(name: &str) -> BlobRef {
        BlobRef {
            name: name.into(),
            sha256: "ab".repeat(32),
            size: 10,
        }
    }

    fn stage(fanout: Fanout, command: &[&str]) -> JobStage {
        JobStage {
            name: "s".into(),
            image: Some(ContainerImage {
                layers: vec![ImageLayer {
                    sha256: "cd".repeat(32),
                    size: 1,
                    gzip: true,
                }],
                arch: "x86_64".into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            limits: Some(FunctionLimits {
                cpu_millis: 1000,
                memory_mib: 256,
                ..Default::default()
            }),
            fanout: fanout as i32,
            env: vec![],
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            name: "movie".into(),
            inputs: vec![blob("in.mp4")],
            stages: vec![
                stage(Fanout::All, &["split", "/in/in.mp4"]),
                stage(
                    Fanout::Each,
                    &["enc", "{input}", "/out/{stem}.ts", "{name}"],
                ),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_good_job_passes_and_each_fault_is_named() {
        assert_eq!(check_job_spec(&spec()), Ok(()));
        let mut s = spec();
        s.near = Some(crate::v1::Coordinate {
            vec: vec![1.0, 2.0, 3.0],
            height_ms: 4.0,
            ..Default::default()
        });
        assert_eq!(check_job_spec(&s), Ok(()));
        s.near.as_mut().unwrap().vec = vec![1.0, f32::NAN, 3.0];
        assert!(check_job_spec(&s).unwrap_err().contains("near"));
        s.near.as_mut().unwrap().vec = vec![1.0];
        assert!(check_job_spec(&s).unwrap_err().contains("near"));
        let mut s = spec();
        s.inputs.push(blob("in.mp4"));
        assert!(check_job_spec(&s).unwrap_err().contains("two inputs"));
        let mut s = spec();
        s.inputs[0].name = "../etc/passwd".into();
        assert!(check_job_spec(&s).unwrap_err().contains("input name"));
        let mut s = spec();
        s.stages[0].command = vec!["x".into(), "{input}".into()];
        assert!(check_job_spec(&s).unwrap_err().contains("fanout `all`"));
        let mut s = spec();
        s.stages[1].limits = Some(FunctionLimits::default());
        assert!(check_job_spec(&s).unwrap_err().contains("stage 2"));
        let mut s = spec();
        s.stages.clear();
        assert!(check_job_spec(&s).is_err());
        let mut s = spec();
        s.name = "Movie".into();
        assert!(check_job_spec(&s).unwrap_err().contains("job name"));
    }

    #[test]
    fn placeholders_fill_from_the_single_input() {
        let s = spec();
        assert_eq!(
            task_argv(&s.stages[1], &[blob("seg00001.ts")]),
            ["enc", "/in/seg00001.ts", "/out/seg00001.ts", "seg00001.ts"]
        );
        assert_eq!(
            task_argv(&s.stages[1], &[blob(".hidden")])[2],
            "/out/.hidden.ts"
        );
        assert_eq!(
            task_argv(&s.stages[0], &[blob("a"), blob("b")])[1],
            "/in/in.mp4"
        );
        assert!(is_file_name("seg-00.ts") && !is_file_name("a/b") && !is_file_name(".."));
    }
}
