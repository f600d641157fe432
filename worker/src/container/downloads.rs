//! Image layers arriving over the worker's stream: each is written to a file of its own as
//! its chunks come (in order, from offset 0), then handed to the layer cache, which checks
//! its sha256 while it unpacks. A stream that ends drops what was half fetched; the next
//! assignment fetches it again.
//!
//! ```text
//!  start(sha) ─▶ fetch/<sha> ◀─ chunk… (offset checked) ─ last ─▶ Finished(path) ─▶ unpack
//!                                      └ error / out of order ─▶ Failed(why)
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

    /// Starts fetching `sha` (a content address); false when it is already under way.
    pub fn start(&mut self, sha: &str) -> Result<bool, String> {
        if !stellar_proto::limits::is_sha256_hex(sha) {
            return Err(format!("layer `{sha}` is not a sha256"));
        }
        if self.open.contains_key(sha) {
            return Ok(false);
        }
        let path = self.dir.join(sha);
        let f = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.open.insert(sha.to_string(), (f, 0));
        Ok(true)
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

    /// Forgets every fetch under way (their stream ended).
    pub fn clear(&mut self) {
        for sha in self.open.drain().map(|(k, _)| k) {
            let _ = std::fs::remove_file(self.dir.join(sha));
        }
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
        assert_eq!(d.start(&a), Ok(true));
        assert_eq!(d.start(&a), Ok(false), "one fetch per layer");
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
        d.start(&b).unwrap();
        d.clear();
        assert!(!d.fetching(&b));
    }
}
