//! Compiled artefacts on disk, keyed by (module sha256, engine compatibility hash).
//!
//! Deserialising a compiled artefact runs its machine code, so a worker must only ever load
//! artefacts it compiled itself: each file carries an HMAC-SHA256 under a key that never
//! leaves this worker's data directory (mode 0600), and a file whose tag does not verify is
//! deleted and recompiled, never loaded.

use std::fs;
use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

const TAG_LEN: usize = 32;
const KEY_FILE: &str = "artefact.key";

/// The on-disk cache of compiled modules.
pub struct ArtefactCache {
    dir: PathBuf,
    key: [u8; 32],
    engine_hash: String,
}

impl ArtefactCache {
    /// Opens (creating) the cache in `dir` for artefacts of `engine`.
    pub fn open(dir: &Path, engine: &wasmtime::Engine) -> Result<ArtefactCache> {
        fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let key = crate::secret_file(&dir.join(KEY_FILE))?;
        Ok(ArtefactCache {
            dir: dir.to_path_buf(),
            key,
            engine_hash: engine_hash(engine),
        })
    }

    /// The engine's compatibility hash (hex): artefacts of other engines are never tried.
    pub fn engine_hash(&self) -> &str {
        &self.engine_hash
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{sha256}-{}.cwasm", self.engine_hash))
    }

    fn tag(&self, artefact: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(artefact);
        mac.finalize().into_bytes().into()
    }

    /// The artefact for `sha256` if this worker wrote it and it is intact.
    pub fn load(&self, sha256: &str) -> Option<Vec<u8>> {
        let path = self.path(sha256);
        let mut bytes = fs::read(&path).ok()?;
        if bytes.len() < TAG_LEN {
            let _ = fs::remove_file(&path);
            return None;
        }
        let artefact = bytes.split_off(TAG_LEN);
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&artefact);
        if mac.verify_slice(&bytes).is_err() {
            tracing::warn!(
                path = %path.display(),
                "compiled artefact is not one this worker wrote (or is damaged); deleting it"
            );
            let _ = fs::remove_file(&path);
            return None;
        }
        Some(artefact)
    }

    /// Stores an artefact this worker just compiled (tag + bytes, temp file then rename).
    pub fn store(&self, sha256: &str, artefact: &[u8]) -> Result<()> {
        let path = self.path(sha256);
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&self.tag(artefact))?;
            f.write_all(artefact)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(Error::io(&path))
    }
}

/// A stable hex digest of wasmtime's precompile compatibility hash (sha256 rather than
/// `DefaultHasher`, whose output may change between Rust releases).
/// Names the local patches of the code generator (worker/vendor/README.md): code an
/// unpatched build compiled is never reused by a patched one.
pub const ENGINE_PATCH: &str = "stellar-fuel-saved-at-epoch-check/1";

fn engine_hash(engine: &wasmtime::Engine) -> String {
    struct ShaHasher(Sha256);
    impl Hasher for ShaHasher {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut h = ShaHasher(Sha256::new());
    h.write(ENGINE_PATCH.as_bytes());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
    hex::encode(&h.0.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_artefacts_with_this_workers_tag_load() {
        let dir = tempfile::tempdir().unwrap();
        let engine = wasmtime::Engine::default();
        let cache = ArtefactCache::open(dir.path(), &engine).unwrap();
        cache.store("ab", b"compiled bytes").unwrap();
        assert_eq!(cache.load("ab").as_deref(), Some(&b"compiled bytes"[..]));
        // A file dropped in by someone else (no valid tag) is refused and removed.
        let forged = cache.path("cd");
        fs::write(&forged, [vec![0u8; TAG_LEN], b"evil".to_vec()].concat()).unwrap();
        assert!(cache.load("cd").is_none());
        assert!(!forged.exists());
        // Another worker's cache (another key) cannot vouch for this one's files.
        let other_dir = tempfile::tempdir().unwrap();
        let other = ArtefactCache::open(other_dir.path(), &engine).unwrap();
        other.store("ef", b"theirs").unwrap();
        fs::copy(other.path("ef"), cache.path("ef")).unwrap();
        assert!(cache.load("ef").is_none());
        // The key survives a reopen.
        let again = ArtefactCache::open(dir.path(), &engine).unwrap();
        assert_eq!(again.load("ab").as_deref(), Some(&b"compiled bytes"[..]));
    }
}
