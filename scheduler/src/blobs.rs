//! The replica's blob store: image layers (and later job data) by sha256, on disk beside the
//! Raft log but never in it. A blob is written to a temporary file while it is hashed, then
//! fsync'd and renamed into place, so a blob that exists under its name is whole and
//! verified; a crash leaves only a temporary file, removed at the next open.
//!
//! ```text
//!  writer(sha, size) ─▶ blobs/.tmp-<sha>-<rand> ◀─ write(chunk)… (hashed, size-bounded)
//!  finish() ─ sha256 == name? ─▶ fsync ─▶ rename blobs/<sha> ─▶ fsync dir
//!  open(sha, offset) ─▶ a reader for fetches; remove(sha) when no function refers to it
//! ```

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The name is not a lowercase hex sha256.
    #[error("`{0}` is not a lowercase hex sha256")]
    BadName(String),
    /// The bytes received do not hash to the blob's name.
    #[error("blob {name}: the bytes received hash to {actual}; upload it again")]
    Corrupt {
        /// The name given.
        name: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// More or fewer bytes than announced.
    #[error("blob {name}: {got} bytes received, {expected} announced")]
    Size {
        /// The name given.
        name: String,
        /// Announced.
        expected: u64,
        /// Received.
        got: u64,
    },
    /// Over the per-blob limit, or more than the disk can take.
    #[error("{0}")]
    TooLarge(String),
    /// Not stored here.
    #[error("blob {0} is not stored on this replica")]
    Missing(String),
    /// The object store refused or did not answer (retry; the operator checks the store).
    #[error("blob store {0}")]
    Store(String),
    /// The blob store is configured wrongly (at start: the replica does not serve).
    #[error("{0}")]
    Config(String),
    /// The disk refused.
    #[error("blob store {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A `Result` with [`BlobError`].
pub type Result<T, E = BlobError> = std::result::Result<T, E>;

/// Largest blob the store takes (an image layer; the whole image is bounded separately).
pub const MAX_BLOB_BYTES: u64 = stellar_proto::limits::MAX_IMAGE_BYTES;
/// Free space a write must leave on the disk: the Raft log shares it.
pub const DISK_RESERVE_BYTES: u64 = 1 << 30;

/// The on-disk store (see the module docs).
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses a name that is not a content address (before it becomes a path or a key).
pub(crate) fn check_name(sha: &str) -> Result<()> {
    if stellar_proto::limits::is_sha256_hex(sha) {
        Ok(())
    } else {
        Err(BlobError::BadName(sha.chars().take(80).collect()))
    }
}

impl BlobStore {
    /// The store in `dir` (created if missing); temporary files a crash left are removed.
    pub fn open(dir: &Path) -> Result<BlobStore> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(BlobStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory the blobs are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(sha)
    }

    /// The size of a stored blob, None when it is not here.
    pub fn size(&self, sha: &str) -> Option<u64> {
        check_name(sha).ok()?;
        std::fs::metadata(self.path(sha)).ok().map(|m| m.len())
    }

    /// A writer for blob `sha` of `size` bytes; refused when it cannot fit.
    pub fn writer(&self, sha: &str, size: u64) -> Result<BlobWriter> {
        check_name(sha)?;
        if size > MAX_BLOB_BYTES {
            return Err(BlobError::TooLarge(format!(
                "blob {sha} is {size} bytes; the limit is {MAX_BLOB_BYTES}"
            )));
        }
        let free = nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(u64::MAX);
        if size.saturating_add(DISK_RESERVE_BYTES) > free {
            return Err(BlobError::TooLarge(format!(
                "blob {sha} is {size} bytes and the replica's disk has {free} free (it keeps {DISK_RESERVE_BYTES} for its log): ask the operator for space"
            )));
        }
        let mut salt = [0u8; 6];
        getrandom::fill(&mut salt).map_err(|e| BlobError::Io {
            path: self.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let tmp = self.dir.join(format!(".tmp-{sha}-{}", hex::encode(salt)));
        let file = File::create(&tmp).map_err(io(&tmp))?;
        Ok(BlobWriter {
            file,
            tmp,
            dir: self.dir.clone(),
            check: BlobCheck::new(sha, size),
            done: false,
        })
    }

    /// Blob `sha` opened at `offset`, with its size.
    pub fn open_at(&self, sha: &str, offset: u64) -> Result<(File, u64)> {
        check_name(sha)?;
        let path = self.path(sha);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::Missing(sha.to_string()));
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let size = f.metadata().map_err(io(&path))?.len();
        f.seek(SeekFrom::Start(offset.min(size)))
            .map_err(io(&path))?;
        Ok((f, size))
    }

    /// Every stored blob with its size and when it was stored.
    pub fn list(&self) -> Vec<(String, u64, std::time::SystemTime)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                check_name(&name).ok()?;
                let m = e.metadata().ok()?;
                Some((name, m.len(), m.modified().ok()?))
            })
            .collect()
    }

    /// Marks blob `sha` as wanted now (a client or a peer asked for it): the sweep spares
    /// blobs touched within its grace period, so one checked before a deploy stays.
    pub fn touch(&self, sha: &str) {
        let now = std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(stellar_proto::clock::unix_ms());
        if check_name(sha).is_ok()
            && let Ok(f) = File::options().append(true).open(self.path(sha))
        {
            let _ = f.set_modified(now);
        }
    }

    /// Removes blob `sha` (nothing when absent).
    pub fn remove(&self, sha: &str) -> Result<()> {
        check_name(sha)?;
        match std::fs::remove_file(self.path(sha)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&self.dir)(e)),
            _ => Ok(()),
        }
    }
}

/// The running check of a blob's bytes against its name and announced size, shared by every
/// backend's sink: nothing is stored under a name its bytes do not hash to.
#[derive(Debug)]
pub struct BlobCheck {
    sha: String,
    size: u64,
    written: u64,
    hasher: Sha256,
}

impl BlobCheck {
    /// A check for blob `sha` of `size` bytes.
    pub fn new(sha: &str, size: u64) -> BlobCheck {
        BlobCheck {
            sha: sha.to_string(),
            size,
            written: 0,
            hasher: Sha256::new(),
        }
    }

    /// Refuses `data` when it would pass the announced size; counts and hashes it otherwise
    /// (call before storing the bytes).
    pub fn feed(&mut self, data: &[u8]) -> Result<()> {
        let got = self.written.saturating_add(data.len() as u64);
        if got > self.size {
            return Err(BlobError::Size {
                name: self.sha.clone(),
                expected: self.size,
                got,
            });
        }
        self.hasher.update(data);
        self.written = got;
        Ok(())
    }

    /// Bytes fed so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The blob's name.
    pub fn sha(&self) -> &str {
        &self.sha
    }

    /// Ok with the size when every announced byte came and they hash to the name.
    pub fn verify(&mut self) -> Result<u64> {
        if self.written != self.size {
            return Err(BlobError::Size {
                name: self.sha.clone(),
                expected: self.size,
                got: self.written,
            });
        }
        let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if actual != self.sha {
            return Err(BlobError::Corrupt {
                name: self.sha.clone(),
                actual,
            });
        }
        Ok(self.written)
    }
}

/// A blob being written (see [`BlobStore::writer`]); dropped unfinished, it leaves nothing.
#[derive(Debug)]
pub struct BlobWriter {
    file: File,
    tmp: PathBuf,
    dir: PathBuf,
    check: BlobCheck,
    done: bool,
}

impl BlobWriter {
    /// Appends `data`; refused past the announced size.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.check.feed(data)?;
        self.file.write_all(data).map_err(io(&self.tmp))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.check.written()
    }

    /// Verifies the bytes against the name and size, makes them durable and puts the blob
    /// in place. Blocking (fsync): call it off the async threads.
    pub fn finish(mut self) -> Result<u64> {
        let written = self.check.verify()?;
        self.file.sync_all().map_err(io(&self.tmp))?;
        let target = self.dir.join(self.check.sha());
        std::fs::rename(&self.tmp, &target).map_err(io(&target))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.done = true;
        Ok(written)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn a_blob_is_stored_only_whole_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"layer bytes".repeat(1000);
        let name = sha(&data);
        let mut w = store.writer(&name, data.len() as u64).unwrap();
        w.write(&data[..5000]).unwrap();
        assert_eq!(store.size(&name), None, "not visible until finished");
        w.write(&data[5000..]).unwrap();
        assert_eq!(w.finish().unwrap(), data.len() as u64);
        assert_eq!(store.size(&name), Some(data.len() as u64));
        let (mut f, size) = store.open_at(&name, 5000).unwrap();
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut rest).unwrap();
        assert_eq!((size, rest.as_slice()), (data.len() as u64, &data[5000..]));

        // Wrong bytes under a name: refused, nothing left behind.
        let mut w = store.writer(&sha(b"other"), 5).unwrap();
        w.write(b"wrong").unwrap();
        assert!(matches!(w.finish(), Err(BlobError::Corrupt { .. })));
        // More bytes than announced, and an unfinished writer: nothing left either.
        let mut w = store.writer(&sha(b"abc"), 2).unwrap();
        assert!(matches!(w.write(b"abc"), Err(BlobError::Size { .. })));
        drop(w);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![name.clone()]);
        // Names that are not content addresses never reach the disk.
        assert!(matches!(
            store.writer("../../etc/passwd", 1),
            Err(BlobError::BadName(_))
        ));
        assert!(matches!(
            store.open_at(&sha(b"absent"), 0),
            Err(BlobError::Missing(_))
        ));
        store.remove(&name).unwrap();
        assert_eq!(store.size(&name), None);
    }

    #[test]
    fn a_crash_mid_write_leaves_nothing_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let w = store.writer(&sha(b"x"), 1).unwrap();
        std::mem::forget(w); // as if the process died here
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        BlobStore::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
