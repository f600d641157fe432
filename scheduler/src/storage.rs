//! Durable Raft storage: the log and HardState in tikv's `raft-engine` (an append-only,
//! checksummed, fsync'd log store made for raft-rs), plus the latest state-machine snapshot in
//! one checksummed file written atomically (temp file, fsync, rename, fsync of the directory).
//!
//! Why raft-engine: it is what TiKV runs raft-rs on, it batches many writes into one fdatasync,
//! it detects a torn tail record by checksum and truncates it on recovery
//! (`RecoveryMode::TolerateTailCorruption`), and compaction is a logged command.
//!
//! A tail cache of recent entries serves the leader's appends and `term()` lookups without
//! reading files.

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command, Config, Engine, LogBatch, MessageExt, ReadableSize, RecoveryMode};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The one Raft group this control plane runs.
const GROUP: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_BOOTSTRAP: &[u8] = b"bootstrap_conf_state";
const KEY_MEMBERS: &[u8] = b"members";
const SNAPSHOT_FILE: &str = "snapshot.bin";
const SNAPSHOT_MAGIC: &[u8; 8] = b"STLRSNP1";
/// Bytes of recent entries kept in memory for the leader's appends.
const TAIL_CACHE_BYTES: usize = 64 << 20;

struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// raft-rs `Storage` over raft-engine and a snapshot file; owned by the replica's `RawNode`.
pub struct DiskStorage {
    engine: Engine,
    dir: PathBuf,
    hard_state: HardState,
    /// The latest snapshot's metadata (index 0 when there is none).
    snapshot_meta: SnapshotMetadata,
    bootstrap: ConfState,
    tail: VecDeque<Entry>,
    tail_bytes: usize,
    /// Set when a peer needs a snapshot newer than the stored one.
    snapshot_wanted: std::cell::Cell<u64>,
    /// Whether any write has been made since the last fsync.
    dirty: bool,
}

impl std::fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStorage")
            .field("dir", &self.dir)
            .field("hard_state", &self.hard_state)
            .field("snapshot_index", &self.snapshot_meta.index)
            .finish()
    }
}

fn storage_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl DiskStorage {
    /// Opens (or creates) the storage under `dir`; a torn tail of the log is truncated.
    pub fn open(dir: &Path) -> Result<DiskStorage> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::Config(format!("cannot create data dir {}: {e}", dir.display())))?;
        let cfg = Config {
            dir: dir.join("raft-log").to_string_lossy().into_owned(),
            recovery_mode: RecoveryMode::TolerateTailCorruption,
            target_file_size: ReadableSize::mb(64),
            purge_threshold: ReadableSize::gb(2),
            // Entries are small protobuf batches; compressing them costs more CPU than the
            // fsync it saves.
            batch_compression_threshold: ReadableSize(0),
            ..Default::default()
        };
        let engine = Engine::open(cfg).map_err(|e| {
            Error::Storage(format!(
                "cannot open the raft log in {}: {e}",
                dir.join("raft-log").display()
            ))
        })?;
        let hard_state = engine
            .get_message::<HardState>(GROUP, KEY_HARD_STATE)?
            .unwrap_or_default();
        let bootstrap = engine
            .get_message::<ConfState>(GROUP, KEY_BOOTSTRAP)?
            .unwrap_or_default();
        let mut s = DiskStorage {
            engine,
            dir: dir.to_path_buf(),
            hard_state,
            snapshot_meta: SnapshotMetadata::default(),
            bootstrap,
            tail: VecDeque::new(),
            tail_bytes: 0,
            snapshot_wanted: std::cell::Cell::new(0),
            dirty: false,
        };
        if let Some((meta, _)) = s.read_snapshot_file()? {
            s.snapshot_meta = meta;
        }
        s.reconcile_after_crash()?;
        Ok(s)
    }

    /// Makes the log consistent with the snapshot after a crash between writing a received
    /// snapshot and cleaning the log it replaced.
    fn reconcile_after_crash(&mut self) -> Result<()> {
        let snap = self.snapshot_meta.index;
        if snap == 0 {
            return Ok(());
        }
        let last = self.engine.last_index(GROUP).unwrap_or(0);
        let first = self.engine.first_index(GROUP).unwrap_or(0);
        let mut batch = LogBatch::default();
        if last <= snap || first > snap + 1 {
            if last != 0 {
                batch.add_command(GROUP, Command::Clean);
            }
        } else if first <= snap {
            batch.add_command(GROUP, Command::Compact { index: snap + 1 });
        }
        if self.hard_state.commit < snap {
            self.hard_state.commit = snap;
            batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &self.hard_state)?;
        }
        if !batch.is_empty() {
            self.engine.write(&mut batch, true)?;
        }
        Ok(())
    }

    /// Whether nothing was ever stored (a brand-new replica).
    pub fn is_fresh(&self) -> bool {
        self.hard_state == HardState::default()
            && self.bootstrap.voters.is_empty()
            && self.snapshot_meta.index == 0
            && self.engine.last_index(GROUP).is_none()
    }

    /// Founds a new cluster from its static peer list: a snapshot at index 1, term 1, holding
    /// the empty state and the voters. Every founding replica writes the same one, and a
    /// replica added later (whose log is empty) is brought up by the leader sending it, so
    /// the founding membership is never missing from anyone's history.
    pub fn bootstrap(&mut self, voters: &[u64]) -> Result<()> {
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = voters.to_vec();
        self.apply_snapshot(&snap)
    }

    /// Membership as last recorded by apply: `id=address` pairs (for the startup check).
    pub fn members(&self) -> Vec<(u64, String)> {
        self.engine
            .get(GROUP, KEY_MEMBERS)
            .and_then(|v| String::from_utf8(v).ok())
            .map(|s| {
                s.split(',')
                    .filter_map(|p| {
                        let (id, addr) = p.split_once('=')?;
                        Some((id.parse().ok()?, addr.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records the membership after a conf change was applied (made durable with the next
    /// fsync'd write).
    pub fn set_members(&mut self, members: &[(u64, String)]) -> Result<()> {
        let v: Vec<String> = members.iter().map(|(id, a)| format!("{id}={a}")).collect();
        let mut batch = LogBatch::default();
        batch.put(GROUP, KEY_MEMBERS.to_vec(), v.join(",").into_bytes())?;
        self.engine.write(&mut batch, false)?;
        self.dirty = true;
        Ok(())
    }

    /// The persisted HardState.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The latest snapshot's metadata.
    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        &self.snapshot_meta
    }

    /// Appends entries (replacing any conflicting suffix) and the HardState, then fsyncs when
    /// `sync`: the Ready protocol's "persist before sending persisted messages".
    pub fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>, sync: bool) -> Result<()> {
        let mut batch = LogBatch::with_capacity(entries.len());
        if !entries.is_empty() {
            batch.add_entries::<EntryExt>(GROUP, entries)?;
        }
        if let Some(hs) = hs {
            batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), hs)?;
        }
        let sync = sync || self.dirty && !batch.is_empty();
        self.engine.write(&mut batch, sync)?;
        if sync {
            self.dirty = false;
        }
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        if let Some(first) = entries.first() {
            self.cache_append(first.index, entries);
        }
        Ok(())
    }

    fn cache_append(&mut self, first: u64, entries: &[Entry]) {
        // Drop the conflicting suffix, or everything if the new run does not join the cache.
        while let Some(back) = self.tail.back() {
            if back.index >= first {
                let e = self.tail.pop_back().expect("non-empty");
                self.tail_bytes -= e.compute_size() as usize;
            } else {
                break;
            }
        }
        if self.tail.back().is_some_and(|b| b.index + 1 != first) {
            self.tail.clear();
            self.tail_bytes = 0;
        }
        for e in entries {
            self.tail_bytes += e.compute_size() as usize;
            self.tail.push_back(e.clone());
        }
        while self.tail_bytes > TAIL_CACHE_BYTES && self.tail.len() > 1 {
            let e = self.tail.pop_front().expect("non-empty");
            self.tail_bytes -= e.compute_size() as usize;
        }
    }

    /// Records a new commit index (durable with the next fsync'd write; raft recovers it).
    pub fn set_commit(&mut self, commit: u64) -> Result<()> {
        if commit <= self.hard_state.commit {
            return Ok(());
        }
        self.hard_state.commit = commit;
        let mut batch = LogBatch::default();
        batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &self.hard_state)?;
        self.engine.write(&mut batch, false)?;
        self.dirty = true;
        Ok(())
    }

    /// Installs a snapshot received from the leader: writes it durably, then drops the log it
    /// replaces.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<()> {
        let meta = snap.get_metadata();
        self.write_snapshot_file(meta, &snap.data)?;
        self.snapshot_meta = meta.clone();
        let mut batch = LogBatch::default();
        batch.add_command(GROUP, Command::Clean);
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &self.hard_state)?;
        self.engine.write(&mut batch, true)?;
        self.dirty = false;
        self.tail.clear();
        self.tail_bytes = 0;
        Ok(())
    }

    /// Saves a snapshot of the local state machine at `index` and compacts the log before it,
    /// keeping `keep` entries for followers that are only a little behind.
    pub fn save_snapshot(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: &[u8],
        keep: u64,
    ) -> Result<()> {
        let term = self.term_of(index)?;
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(conf_state);
        self.write_snapshot_file(&meta, data)?;
        self.snapshot_meta = meta;
        let compact_to = (index + 1).saturating_sub(keep);
        if compact_to > self.engine.first_index(GROUP).unwrap_or(0) {
            self.engine.compact_to(GROUP, compact_to);
            self.engine.purge_expired_files()?;
        }
        if self.snapshot_wanted.get() <= index {
            self.snapshot_wanted.set(0);
        }
        Ok(())
    }

    fn term_of(&self, index: u64) -> Result<u64> {
        raft::Storage::term(self, index)
            .map_err(|e| Error::Storage(format!("term of {index}: {e}")))
    }

    /// A peer asked for a snapshot newer than the stored one: the index it needs, or 0.
    pub fn snapshot_wanted(&self) -> u64 {
        self.snapshot_wanted.get()
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_FILE)
    }

    fn write_snapshot_file(&self, meta: &SnapshotMetadata, data: &[u8]) -> Result<()> {
        let meta_bytes = meta
            .write_to_bytes()
            .map_err(|e| Error::Storage(format!("encode snapshot metadata: {e}")))?;
        let mut hasher = Sha256::new();
        let tmp = self.dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        {
            let mut f = std::io::BufWriter::new(fs::File::create(&tmp)?);
            let mut put = |b: &[u8]| -> std::io::Result<()> {
                hasher.update(b);
                f.write_all(b)
            };
            put(SNAPSHOT_MAGIC)?;
            put(&(meta_bytes.len() as u64).to_le_bytes())?;
            put(&meta_bytes)?;
            put(&(data.len() as u64).to_le_bytes())?;
            put(data)?;
            let digest = hasher.finalize();
            f.write_all(&digest)?;
            let f = f.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.snapshot_path())?;
        fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Reads and verifies the snapshot file: `None` when there is none.
    pub fn read_snapshot_file(&self) -> Result<Option<(SnapshotMetadata, Bytes)>> {
        let path = self.snapshot_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let corrupt = |what: &str| {
            Error::Storage(format!(
                "snapshot file {} is corrupt ({what}); restore the data dir from another replica \
                 (remove it and re-add this replica to the cluster)",
                path.display()
            ))
        };
        if bytes.len() < 8 + 8 + 8 + 32 || &bytes[..8] != SNAPSHOT_MAGIC {
            return Err(corrupt("bad header"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(corrupt("checksum mismatch"));
        }
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?))
        };
        let meta_len = u64_at(8).ok_or_else(|| corrupt("truncated"))? as usize;
        let meta_end = 16usize
            .checked_add(meta_len)
            .ok_or_else(|| corrupt("length"))?;
        let meta_bytes = body.get(16..meta_end).ok_or_else(|| corrupt("truncated"))?;
        let meta =
            SnapshotMetadata::parse_from_bytes(meta_bytes).map_err(|_| corrupt("metadata"))?;
        let data_len = u64_at(meta_end).ok_or_else(|| corrupt("truncated"))? as usize;
        let data_start = meta_end + 8;
        if body.len() != data_start + data_len {
            return Err(corrupt("length mismatch"));
        }
        let data = Bytes::copy_from_slice(&body[data_start..]);
        Ok(Some((meta, data)))
    }

    /// The conf state a restarted replica starts from: the snapshot's, else the bootstrap one.
    fn initial_conf_state(&self) -> ConfState {
        if self.snapshot_meta.index > 0 || self.bootstrap.voters.is_empty() {
            self.snapshot_meta.get_conf_state().clone()
        } else {
            self.bootstrap.clone()
        }
    }

    fn first(&self) -> u64 {
        self.engine
            .first_index(GROUP)
            .unwrap_or(self.snapshot_meta.index + 1)
    }

    fn last(&self) -> u64 {
        self.engine
            .last_index(GROUP)
            .unwrap_or(self.snapshot_meta.index)
    }

    /// Bytes the raft log occupies on disk.
    pub fn log_bytes(&self) -> usize {
        self.engine.get_used_size()
    }

    /// Flushes any unsynced metadata writes to disk.
    pub fn sync(&mut self) -> Result<()> {
        if self.dirty {
            self.engine.sync()?;
            self.dirty = false;
        }
        Ok(())
    }
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.initial_conf_state(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        if let Some(front) = self.tail.front()
            && front.index <= low
        {
            let skip = (low - front.index) as usize;
            let mut size = 0u64;
            for e in self.tail.iter().skip(skip).take((high - low) as usize) {
                size += e.compute_size() as u64;
                if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                    break;
                }
                out.push(e.clone());
            }
            return Ok(out);
        }
        self.engine
            .fetch_entries_to::<EntryExt>(GROUP, low, high, max_size.map(|m| m as usize), &mut out)
            .map_err(storage_err)?;
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_meta.index {
            return Ok(self.snapshot_meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if let Some(front) = self.tail.front()
            && front.index <= idx
            && let Some(e) = self.tail.get((idx - front.index) as usize)
        {
            return Ok(e.term);
        }
        match self
            .engine
            .get_entry::<EntryExt>(GROUP, idx)
            .map_err(storage_err)?
        {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // A replica added after the stored snapshot is not in its ConfState and would refuse
        // it (raft-rs ignores a snapshot that does not list the receiver), so ask for a newer
        // one, taken after the conf change that added it was applied.
        let cs = self.snapshot_meta.get_conf_state();
        let lists_receiver = [
            &cs.voters,
            &cs.learners,
            &cs.voters_outgoing,
            &cs.learners_next,
        ]
        .iter()
        .any(|ids| ids.contains(&to));
        if self.snapshot_meta.index < request_index || self.snapshot_meta.index == 0 {
            self.snapshot_wanted.set(request_index.max(1));
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        if !lists_receiver {
            self.snapshot_wanted.set(self.snapshot_meta.index + 1);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let (meta, data) = self
            .read_snapshot_file()
            .map_err(storage_err)?
            .ok_or_else(|| raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))?;
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        snap.data = data;
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: Bytes::copy_from_slice(data),
            ..Default::default()
        }
    }

    #[test]
    fn entries_and_hard_state_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path()).unwrap();
            assert!(s.is_fresh());
            s.bootstrap(&[1, 2, 3]).unwrap();
            assert_eq!(
                s.first_index().unwrap(),
                2,
                "the founding snapshot is index 1"
            );
            let hs = HardState {
                term: 2,
                vote: 1,
                commit: 3,
                ..Default::default()
            };
            let ents: Vec<Entry> = (2..=4).map(|i| entry(i, 2, b"x")).collect();
            s.persist(&ents, Some(&hs), true).unwrap();
            // A conflicting suffix replaces entries 4.. .
            s.persist(&[entry(4, 3, b"y"), entry(5, 3, b"z")], None, true)
                .unwrap();
        }
        let s = DiskStorage::open(dir.path()).unwrap();
        assert!(!s.is_fresh());
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state.term, 2);
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(s.last_index().unwrap(), 5);
        assert_eq!(s.term(4).unwrap(), 3);
        assert_eq!(s.term(1).unwrap(), 1, "the founding snapshot's term");
        let got = s
            .entries(2, 6, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(&got[3].data[..], b"z");
    }

    #[test]
    fn snapshot_compacts_and_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path()).unwrap();
        s.bootstrap(&[1]).unwrap();
        let ents: Vec<Entry> = (2..=100).map(|i| entry(i, 1, b"e")).collect();
        s.persist(&ents, None, true).unwrap();
        let cs = ConfState {
            voters: vec![1, 2],
            ..Default::default()
        };
        assert!(
            s.snapshot(50, 2).is_err(),
            "only the founding snapshot so far"
        );
        assert_eq!(s.snapshot_wanted(), 50);
        s.save_snapshot(80, cs, b"state-at-80", 10).unwrap();
        assert_eq!(s.snapshot_wanted(), 0);
        assert_eq!(s.first_index().unwrap(), 71);
        assert!(matches!(
            s.entries(10, 20, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let snap = s.snapshot(60, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 80);
        assert_eq!(&snap.data[..], b"state-at-80");
        assert!(
            s.snapshot(0, 3).is_err(),
            "replica 3 is not in the snapshot's ConfState and would ignore it"
        );
        assert_eq!(s.snapshot_wanted(), 81, "a newer snapshot is asked for");
        drop(s);
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(s.snapshot_metadata().index, 80);
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2]);
        assert_eq!(s.last_index().unwrap(), 100);
    }

    #[test]
    fn received_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path()).unwrap();
        s.persist(&[entry(1, 1, b"a"), entry(2, 1, b"b")], None, true)
            .unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 500;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snap.data = Bytes::from_static(b"leader-state");
        s.apply_snapshot(&snap).unwrap();
        assert_eq!(s.first_index().unwrap(), 501);
        assert_eq!(s.last_index().unwrap(), 500);
        assert_eq!(s.term(500).unwrap(), 4);
        drop(s);
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(s.hard_state().commit, 500);
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn a_torn_tail_is_truncated_on_restart_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path()).unwrap();
            for i in 1..=3 {
                s.persist(&[entry(i, 1, &[i as u8; 100])], None, true)
                    .unwrap();
            }
        }
        // Cut the last write in half, as a crash in the middle of it would.
        let log_dir = dir.path().join("raft-log");
        let file = fs::read_dir(&log_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
            .max()
            .expect("a log file");
        let len = fs::metadata(&file).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(len - 60).unwrap();
        drop(f);
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(s.last_index().unwrap(), 2, "the torn entry is gone");
        let got = s
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(&got[1].data[..], &[2u8; 100][..], "earlier entries intact");
    }

    #[test]
    fn a_corrupt_snapshot_file_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path()).unwrap();
        s.persist(&[entry(1, 1, b"a")], None, true).unwrap();
        s.save_snapshot(1, ConfState::default(), b"data", 0)
            .unwrap();
        drop(s);
        let path = dir.path().join(SNAPSHOT_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 40] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = DiskStorage::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
