//! Image layers arriving over the worker's stream: each is written to a file of its own as
//! its chunks come (in order), then handed to the layer cache, which checks its sha256 while
//! it unpacks. A stream that ends keeps what was fetched: the next assignment resumes the
//! layer where it stopped (a home uplink that drops mid-layer does not start over).
//!
//! ```text
//!  start(sha) ─▶ offset (0, or what an earlier stream left) ─▶ FetchBlob(sha, offset)
//!  fetch/<sha> ◀─ chunk… (offset checked) ─ last ─▶ Finished(path) ─▶ unpack
//!                        └ error / out of order ─▶ Failed(why), the file removed
//!  stream ends ─▶ suspend: files kept, resumed by the next start
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use stellar_proto::v1 as pb;

/// How a chunk left its download.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// More to come.
    Partial,
    /// Every byte is in this file (not yet verified: the cache does that).
    Finished(PathBuf),
    /// The fetch failed; the file is gone.
    Failed(String),
}

/// Layers being fetched (see the module docs).
#[derive(Debug)]
pub struct LayerDownloads {
    dir: PathBuf,
    open: HashMap<String, (File, u64)>,
}

impl LayerDownloads {
    /// Downloads into `dir` (created; what an earlier process left there is removed).
    pub fn new(dir: &Path) -> std::io::Result<LayerDownloads> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        Ok(LayerDownloads {
            dir: dir.to_path_buf(),
            open: HashMap::new(),
        })
    }

    /// Starts fetching `sha` (a content address): the offset to ask from (past what an
    /// earlier stream fetched), or None when it is already under way.
    pub fn start(&mut self, sha: &str) -> Result<Option<u64>, String> {
        if !stellar_proto::limits::is_sha256_hex(sha) {
            return Err(format!("layer `{sha}` is not a sha256"));
        }
        if self.open.contains_key(sha) {
            return Ok(None);
        }
        let path = self.dir.join(sha);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let at = f
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        self.open.insert(sha.to_string(), (f, at));
        Ok(Some(at))
    }

    /// Whether `sha` is being fetched.
    pub fn fetching(&self, sha: &str) -> bool {
        self.open.contains_key(sha)
    }

    /// Takes one chunk; what it means for its layer. Chunks of layers not being fetched
    /// are ignored (`Partial`).
    pub fn chunk(&mut self, c: &pb::BlobChunk) -> Progress {
        let Some((file, written)) = self.open.get_mut(&c.sha256) else {
            return Progress::Partial;
        };
        let path = self.dir.join(&c.sha256);
        let failed = if !c.error.is_empty() {
            Some(c.error.clone())
        } else if c.offset != *written {
            Some(format!(
                "chunk at offset {} after {} bytes",
                c.offset, *written
            ))
        } else if let Err(e) = file.write_all(&c.data) {
            Some(format!("{}: {e}", path.display()))
        } else {
            *written += c.data.len() as u64;
            None
        };
        if let Some(why) = failed {
            self.open.remove(&c.sha256);
            let _ = std::fs::remove_file(&path);
            return Progress::Failed(why);
        }
        if c.last {
            self.open.remove(&c.sha256);
            return Progress::Finished(path);
        }
        Progress::Partial
    }

    /// Stops every fetch under way (their stream ended), keeping what arrived: the next
    /// [`LayerDownloads::start`] of a layer resumes it.
    pub fn suspend(&mut self) {
        self.open.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(sha: &str, offset: u64, data: &[u8], last: bool) -> pb::BlobChunk {
        pb::BlobChunk {
            sha256: sha.into(),
            offset,
            data: data.to_vec(),
            last,
            ..Default::default()
        }
    }

    #[test]
    fn chunks_in_order_make_a_file_and_anything_else_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = LayerDownloads::new(&dir.path().join("fetch")).unwrap();
        let (a, b) = ("aa".repeat(32), "bb".repeat(32));
        assert_eq!(d.start(&a), Ok(Some(0)));
        assert_eq!(d.start(&a), Ok(None), "one fetch per layer");
        assert!(d.start("../x").is_err());
        assert_eq!(d.chunk(&chunk(&a, 0, b"hello ", false)), Progress::Partial);
        let Progress::Finished(path) = d.chunk(&chunk(&a, 6, b"world", true)) else {
            panic!("not finished");
        };
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        // Out of order: failed, file removed.
        d.start(&b).unwrap();
        d.chunk(&chunk(&b, 0, b"x", false));
        assert!(matches!(
            d.chunk(&chunk(&b, 5, b"y", true)),
            Progress::Failed(_)
        ));
        assert!(!dir.path().join("fetch").join(&b).exists());
        // A refusal from the gateway fails it too; chunks of unknown layers are ignored.
        d.start(&b).unwrap();
        let refusal = pb::BlobChunk {
            sha256: b.clone(),
            last: true,
            error: "no".into(),
            ..Default::default()
        };
        assert_eq!(d.chunk(&refusal), Progress::Failed("no".into()));
        assert_eq!(
            d.chunk(&chunk(&"cc".repeat(32), 0, b"z", true)),
            Progress::Partial
        );
    }

    #[test]
    fn a_layer_cut_short_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = LayerDownloads::new(&dir.path().join("fetch")).unwrap();
        let a = "aa".repeat(32);
        d.start(&a).unwrap();
        d.chunk(&chunk(&a, 0, b"hello ", false));
        d.suspend(); // the stream ended
        assert!(!d.fetching(&a));
        assert_eq!(d.start(&a), Ok(Some(6)), "asks from where it stopped");
        let Progress::Finished(path) = d.chunk(&chunk(&a, 6, b"world", true)) else {
            panic!("not finished");
        };
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        // A new process starts clean: what an older one left is not trusted to resume.
        d.start(&a).unwrap();
        d.chunk(&chunk(&a, 0, b"x", false));
        let d = LayerDownloads::new(&dir.path().join("fetch")).unwrap();
        drop(d);
        assert!(!dir.path().join("fetch").join(&a).exists());
    }
}
