//! A full disk: writes fail cleanly with a storage error, nothing acknowledged is lost, a
//! refused write never shows up later, and the replica resumes once space is back. The data
//! directory is a small tmpfs mounted by the test (needs root, as on CI).

use std::path::Path;
use std::process::Command;

use stellar_scheduler::{Error, Reply};

mod single;

use single::{Driver, managed_node, register};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(dir: &'a Path, size: &str) -> Option<Tmpfs<'a>> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }

    fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.0)
            .status()
            .expect("run mount");
        assert!(st.success(), "remount {} to {size}", self.0.display());
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn a_full_disk_refuses_writes_cleanly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(dir.path(), "6m") else {
        assert!(
            !is_root(),
            "root could not mount a tmpfs for the disk-full test"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let data = dir.path().join("r1");
    let mut d = Driver::open(&data, |cfg| cfg.snapshot_every = u64::MAX / 2);
    // Register nodes 500 at a time, one batch per round, until the disk refuses.
    let mut acked: Vec<u64> = Vec::new();
    let mut refused: Vec<u64> = Vec::new();
    let mut batches: Vec<(u64, Vec<u64>)> = Vec::new();
    let mut next_id = 1u64;
    let mut token = 1_000_000u64;
    let mut round = 0;
    while refused.is_empty() {
        round += 1;
        assert!(round < 2_000, "6 MiB never filled up");
        let ids: Vec<u64> = (next_id..next_id + 500).collect();
        next_id += 500;
        token += 1;
        d.r.submit(
            token,
            register(ids.iter().copied().map(managed_node).collect()),
        );
        batches.push((token, ids));
        for (t, res) in d.step() {
            let (_, ids) = batches
                .iter()
                .find(|(bt, _)| *bt == t)
                .expect("known token");
            match res {
                Ok(Reply::Applied(_)) => acked.extend(ids),
                Err(Error::Storage(msg)) => {
                    assert!(!msg.is_empty());
                    refused.extend(ids);
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
    }
    assert!(!acked.is_empty(), "some writes fit before the disk filled");
    let status = d.r.status();
    assert!(
        !status.storage_error.is_empty(),
        "the replica reports why it pauses"
    );
    // Space comes back: the paused Ready resumes and new writes succeed.
    // New writes are refused fast while paused; the paused Ready retries on the next round.
    fs.resize("64m");
    for _ in 0..5 {
        d.step();
    }
    assert!(
        d.r.status().storage_error.is_empty(),
        "the paused write went through once space came back"
    );
    let after: Vec<u64> = (next_id..next_id + 10).collect();
    match d.try_write(register(after.iter().copied().map(managed_node).collect())) {
        Ok(Reply::Applied(_)) => acked.extend(&after),
        other => panic!("write after space came back: {other:?}"),
    }
    let before: Vec<u64> = d.r.state().nodes().keys().copied().collect();
    drop(d);
    // After a restart everything acknowledged is there and nothing refused is.
    let d = Driver::open(&data, |cfg| cfg.snapshot_every = u64::MAX / 2);
    let st = d.r.state();
    let after_restart: Vec<u64> = st.nodes().keys().copied().collect();
    assert_eq!(
        after_restart, before,
        "the restart replays to the same nodes"
    );
    for id in &acked {
        assert!(st.nodes().contains_key(id), "acknowledged node {id} lost");
    }
    for id in &refused {
        assert!(
            !st.nodes().contains_key(id),
            "node {id} was refused but applied later"
        );
    }
}
