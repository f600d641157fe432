//! A job's status as clients see it: the committed record plus per-stage counts (tasks
//! pending, running, done, failed; retries, backups; bytes moved) that the CLI's progress
//! bars draw.

use stellar_proto::v1 as pb;

/// The client view of a job record.
pub fn status_of(j: &pb::JobRecord) -> pb::JobStatus {
    let spec = j.spec.clone().unwrap_or_default();
    let stages = spec
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut p = pb::StageProgress {
                name: if s.name.is_empty() {
                    format!("stage-{}", i + 1)
                } else {
                    s.name.clone()
                },
                ..Default::default()
            };
            let Some(rec) = j.stages.get(i) else {
                return p;
            };
            p.tasks = rec.tasks.len() as u32;
            for t in &rec.tasks {
                match pb::TaskState::try_from(t.state) {
                    Ok(pb::TaskState::Pending) => p.pending += 1,
                    Ok(pb::TaskState::Running) => p.running += 1,
                    Ok(pb::TaskState::Succeeded) => {
                        p.succeeded += 1;
                        p.bytes_in += t.inputs.iter().map(|b| b.size).sum::<u64>();
                        p.bytes_out += t.outputs.iter().map(|b| b.size).sum::<u64>();
                    }
                    Ok(pb::TaskState::Failed) => p.failed += 1,
                    _ => {}
                }
                let backups = t.attempts.iter().filter(|a| a.backup).count() as u32;
                p.backups += backups;
                p.retries += (t.attempts.len() as u32)
                    .saturating_sub(1)
                    .saturating_sub(backups);
            }
            p
        })
        .collect();
    pb::JobStatus {
        job: Some(j.clone()),
        stages,
        applied_index: 0,
    }
}
