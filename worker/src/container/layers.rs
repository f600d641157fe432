//! The node's layer cache: each layer unpacked once, keyed by the sha256 of its blob, shared
//! read-only by every container that uses it (the lower layers of their overlays).
//!
//! ```text
//! blob bytes ─▶ sha256 while read ─▶ gunzip? ─▶ tar entries ─▶ layers/.tmp-<hex>-<n>/
//!    whiteouts (.wh.NAME → 0:0 char device, .wh..wh..opq → trusted.overlay.opaque)
//!    every entry owned by the sandbox uid (root inside the container)
//!  all bytes read and the hash matches ─▶ rename to layers/<hex> (atomic: a crash leaves
//!  only a .tmp the next start removes)
//! ```

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::lchown;
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use sha2::{Digest, Sha256};

use super::image::{ImageError, LayerBlob};

/// Unpacked layers under one directory.
#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
    uid: u32,
    gid: u32,
}

/// Reads through to a hasher.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

impl LayerCache {
    /// The cache in `dir` (created), unpacking as owned by `uid`/`gid`; half-unpacked layers
    /// a crash left (an hour ago or more) are removed.
    pub fn open(dir: PathBuf, uid: u32, gid: u32) -> std::io::Result<LayerCache> {
        std::fs::create_dir_all(&dir)?;
        // A half-unpacked layer an hour old was left by a crash; a younger one may be
        // another process's unpacking right now.
        for e in std::fs::read_dir(&dir)?.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600));
            if old && e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(LayerCache { dir, uid, gid })
    }

    /// Where the layer with this blob sha256 is (or would be) unpacked.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Whether the layer is already unpacked here.
    pub fn has(&self, sha256: &str) -> bool {
        self.path_of(sha256).is_dir()
    }

    /// The layers unpacked here (hex sha256s).
    pub fn list(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.len() == 64)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The unpacked layers no one in `used` needs, least recently unpacked first: what a
    /// node short of disk gives back first.
    pub fn unused_oldest_first(&self, used: &std::collections::HashSet<String>) -> Vec<String> {
        let mut unused: Vec<(std::time::SystemTime, String)> = self
            .list()
            .into_iter()
            .filter(|sha| !used.contains(sha))
            .filter_map(|sha| {
                let at = std::fs::metadata(self.path_of(&sha))
                    .ok()?
                    .modified()
                    .ok()?;
                Some((at, sha))
            })
            .collect();
        unused.sort();
        unused.into_iter().map(|(_, sha)| sha).collect()
    }

    /// Removes an unpacked layer: first renamed out of its name (so it is gone at once for
    /// `has`), then deleted.
    pub fn remove(&self, sha256: &str) -> std::io::Result<()> {
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
        let doomed = self
            .dir
            .join(format!(".tmp-gone-{sha256}-{}", hex::encode(nonce)));
        std::fs::rename(self.path_of(sha256), &doomed)?;
        std::fs::remove_dir_all(&doomed)
    }

    /// Unpacks `layer` from `archive` unless it is here already; its path.
    pub fn ensure(&self, archive: &Path, layer: &LayerBlob) -> Result<PathBuf, ImageError> {
        let dest = self.path_of(&layer.sha256);
        if dest.is_dir() {
            return Ok(dest);
        }
        let read = |source| ImageError::Read {
            path: archive.to_path_buf(),
            source,
        };
        let mut f = File::open(archive).map_err(read)?;
        f.seek(SeekFrom::Start(layer.offset)).map_err(read)?;
        self.unpack(f.take(layer.size), &layer.sha256, layer.gzip)
    }

    /// Unpacks a layer's blob bytes from `blob`, checking they hash to `sha256`.
    pub fn unpack(&self, blob: impl Read, sha256: &str, gzip: bool) -> Result<PathBuf, ImageError> {
        let dest = self.path_of(sha256);
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce)
            .map_err(|e| ImageError::Invalid(format!("no randomness: {e}")))?;
        let tmp = self
            .dir
            .join(format!(".tmp-{sha256}-{}", hex::encode(nonce)));
        let result = self.unpack_into(blob, &tmp, sha256, gzip);
        match result {
            Ok(()) => match std::fs::rename(&tmp, &dest) {
                Ok(()) => Ok(dest),
                // Another run unpacked the same layer meanwhile: theirs is as good.
                Err(_) if dest.is_dir() => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    Ok(dest)
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    Err(ImageError::Read {
                        path: dest,
                        source: e,
                    })
                }
            },
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    fn unpack_into(
        &self,
        blob: impl Read,
        tmp: &Path,
        sha256: &str,
        gzip: bool,
    ) -> Result<(), ImageError> {
        let bad = |e: std::io::Error| ImageError::Invalid(format!("layer sha256:{sha256}: {e}"));
        std::fs::create_dir_all(tmp).map_err(bad)?;
        let mut hashing = HashingReader {
            inner: blob,
            hash: Sha256::new(),
        };
        {
            let tar_bytes: Box<dyn Read + '_> = if gzip {
                Box::new(flate2::read::GzDecoder::new(&mut hashing))
            } else {
                Box::new(&mut hashing)
            };
            let mut archive = tar::Archive::new(tar_bytes);
            archive.set_preserve_permissions(true);
            archive.set_preserve_mtime(true);
            archive.set_unpack_xattrs(false);
            archive.set_overwrite(true);
            for entry in archive.entries().map_err(bad)? {
                let mut entry = entry.map_err(bad)?;
                self.unpack_entry(&mut entry, tmp).map_err(bad)?;
            }
        }
        // The hash covers every byte of the blob, past the tar's end-of-archive blocks too.
        std::io::copy(&mut hashing, &mut std::io::sink()).map_err(bad)?;
        let actual = hex::encode(hashing.hash.finalize());
        if actual != sha256 {
            return Err(ImageError::DigestMismatch {
                digest: format!("sha256:{sha256}"),
                actual,
            });
        }
        lchown(tmp, Some(self.uid), Some(self.gid)).map_err(bad)?;
        Ok(())
    }

    fn unpack_entry<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        root: &Path,
    ) -> std::io::Result<()> {
        use tar::EntryType::*;
        let path = entry.path()?.into_owned();
        let kind = entry.header().entry_type();
        if !matches!(kind, Regular | Directory | Symlink | Link | Continuous) {
            return Ok(()); // devices and fifos: a container gets its /dev from the sandbox
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name.as_deref().filter(|n| n.starts_with(".wh.")) {
            // Its directory must be inside the layer, reached through no symlink.
            let marker = safe_join(root, &path)?;
            let dir = marker.parent().unwrap_or(root).to_path_buf();
            std::fs::create_dir_all(&dir)?;
            if name == ".wh..wh..opq" {
                xattr::set(&dir, "trusted.overlay.opaque", b"y")?;
            } else {
                let target = dir.join(&name[4..]);
                mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
                    .map_err(std::io::Error::from)?;
                lchown(&target, Some(self.uid), Some(self.gid))?;
            }
            return Ok(());
        }
        if !entry.unpack_in(root)? {
            return Ok(()); // a path that would escape the layer: skipped, as tar does
        }
        let target = safe_join(root, &path)?;
        lchown(&target, Some(self.uid), Some(self.gid))
    }
}

/// `root/rel` for a relative path with no `..` or root component and no symlink on the way
/// (an earlier entry's symlink must not carry a whiteout outside the layer).
fn safe_join(root: &Path, rel: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component::*;
    let mut out = root.to_path_buf();
    let mut components = rel.components().peekable();
    while let Some(c) = components.next() {
        match c {
            Normal(p) => {
                out.push(p);
                let last = components.peek().is_none();
                if !last
                    && std::fs::symlink_metadata(&out).is_ok_and(|m| m.file_type().is_symlink())
                {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} goes through a symlink", rel.display()),
                    ));
                }
            }
            CurDir => {}
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} leaves the layer", rel.display()),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            // `append_data` would refuse the hostile paths these tests need.
            h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn cache() -> (tempfile::TempDir, LayerCache) {
        let dir = tempfile::tempdir().unwrap();
        let c = LayerCache::open(dir.path().join("layers"), 0, 0).unwrap();
        (dir, c)
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn a_layer_is_unpacked_once_under_its_digest_and_a_wrong_digest_is_refused() {
        let (_d, c) = cache();
        let t = tar_of(&[("etc/motd", tar::EntryType::Regular, b"hi", None)]);
        let p = c.unpack(t.as_slice(), &sha(&t), false).unwrap();
        assert_eq!(std::fs::read(p.join("etc/motd")).unwrap(), b"hi");
        assert!(c.has(&sha(&t)));
        let wrong = "0".repeat(64);
        let e = c.unpack(t.as_slice(), &wrong, false).unwrap_err();
        assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
        assert!(!c.has(&wrong));
        assert_eq!(c.list(), vec![sha(&t)], "no half-unpacked layer is kept");
    }

    #[test]
    fn nothing_is_written_outside_the_layer() {
        let (d, c) = cache();
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let target = outside.to_str().unwrap();
        // `..` in a path, then a symlink out followed by a file and a whiteout through it.
        for entries in [
            vec![("../escaped", tar::EntryType::Regular, &b"x"[..], None)],
            vec![
                ("link", tar::EntryType::Symlink, &b""[..], Some(target)),
                ("link/escaped", tar::EntryType::Regular, &b"x"[..], None),
            ],
            vec![
                ("link", tar::EntryType::Symlink, &b""[..], Some(target)),
                ("link/.wh.escaped", tar::EntryType::Regular, &b""[..], None),
            ],
        ] {
            let t = tar_of(&entries);
            let _ = c.unpack(t.as_slice(), &sha(&t), false);
            assert_eq!(
                std::fs::read_dir(&outside).unwrap().count(),
                0,
                "{entries:?}"
            );
            assert!(!d.path().join("escaped").exists());
        }
    }

    #[test]
    fn unused_layers_go_oldest_first_and_at_once() {
        let (_d, c) = cache();
        let mut shas = Vec::new();
        for (i, body) in [b"one".as_slice(), b"two", b"three"].iter().enumerate() {
            let t = tar_of(&[("f", tar::EntryType::Regular, body, None)]);
            let p = c.unpack(t.as_slice(), &sha(&t), false).unwrap();
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            File::open(&p).unwrap().set_modified(at).unwrap();
            shas.push(sha(&t));
        }
        let used = [shas[0].clone()].into_iter().collect();
        assert_eq!(
            c.unused_oldest_first(&used),
            vec![shas[1].clone(), shas[2].clone()]
        );
        c.remove(&shas[1]).unwrap();
        assert!(!c.has(&shas[1]));
        assert_eq!(c.list().len(), 2);
        assert!(c.remove(&shas[1]).is_err(), "already gone");
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let (_d, c) = cache();
        let t = tar_of(&[
            ("data/.wh.gone", tar::EntryType::Regular, b"", None),
            ("opq/.wh..wh..opq", tar::EntryType::Regular, b"", None),
        ]);
        let p = c.unpack(t.as_slice(), &sha(&t), false).unwrap();
        use std::os::unix::fs::FileTypeExt;
        let m = std::fs::symlink_metadata(p.join("data/gone")).unwrap();
        assert!(m.file_type().is_char_device(), "a 0:0 character device");
        assert_eq!(
            xattr::get(p.join("opq"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
        assert!(!p.join("data/.wh.gone").exists());
    }
}
