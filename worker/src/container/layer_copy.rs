//! The root filesystem without overlayfs: the image's cached layers copied, bottom first,
//! into the run's private tmpfs, applying the layers' whiteouts as overlayfs would (a 0:0
//! character device deletes what lower layers put there; an opaque directory hides their
//! contents). Slower than a mount and charged to the run's memory, but it runs images on
//! kernels without overlayfs; the worker picks it only then (or when told to).
//!
//! ```text
//!  layers/<bottom> ─copy─▶ run/rootfs ◀─copy─ layers/<next> … (whiteout: delete, opaque: clear)
//! ```

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, lchown};
use std::path::{Path, PathBuf};

/// Copies `layers` (bottom first) into `root`, which exists and is empty.
pub fn copy_layers(layers: &[PathBuf], root: &Path) -> io::Result<()> {
    for layer in layers {
        copy_dir(layer, root)?;
    }
    Ok(())
}

fn remove_any(p: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn is_opaque(dir: &Path) -> bool {
    matches!(xattr::get(dir, "trusted.overlay.opaque"), Ok(Some(v)) if v == b"y")
}

fn copy_dir(src: &Path, dst: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let m = std::fs::symlink_metadata(&from)?;
        let kind = m.file_type();
        if kind.is_char_device() && m.rdev() == 0 {
            remove_any(&to)?; // a whiteout: what lower layers had here is gone
            continue;
        }
        if kind.is_dir() {
            // A lower layer's directory stays unless this one is opaque; anything else
            // of that name (a file, a symlink) is replaced.
            let keep =
                std::fs::symlink_metadata(&to).is_ok_and(|t| t.is_dir()) && !is_opaque(&from);
            if !keep {
                remove_any(&to)?;
            }
            if !to.exists() {
                std::fs::create_dir(&to)?;
            }
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
            lchown(&to, Some(m.uid()), Some(m.gid()))?;
            copy_dir(&from, &to)?;
            continue;
        }
        remove_any(&to)?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if kind.is_file() {
            std::fs::copy(&from, &to)?;
        } else {
            continue; // devices and fifos: the sandbox makes /dev itself
        }
        lchown(&to, Some(m.uid()), Some(m.gid()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};

    #[test]
    fn upper_layers_override_delete_and_hide_as_overlayfs_does() {
        let d = tempfile::tempdir().unwrap();
        let (bottom, top, root) = (d.path().join("b"), d.path().join("t"), d.path().join("r"));
        for p in ["etc", "data/keep", "opq"] {
            std::fs::create_dir_all(bottom.join(p)).unwrap();
        }
        std::fs::write(bottom.join("etc/conf"), "old").unwrap();
        std::fs::write(bottom.join("data/gone"), "x").unwrap();
        std::fs::write(bottom.join("data/keep/k"), "k").unwrap();
        std::fs::write(bottom.join("opq/hidden"), "h").unwrap();
        std::os::unix::fs::symlink("conf", bottom.join("etc/link")).unwrap();
        for p in ["etc", "data", "opq"] {
            std::fs::create_dir_all(top.join(p)).unwrap();
        }
        std::fs::write(top.join("etc/conf"), "new").unwrap();
        mknod(
            &top.join("data/gone"),
            SFlag::S_IFCHR,
            Mode::empty(),
            makedev(0, 0),
        )
        .unwrap();
        xattr::set(top.join("opq"), "trusted.overlay.opaque", b"y").unwrap();
        std::fs::write(top.join("opq/shown"), "s").unwrap();
        std::fs::create_dir(&root).unwrap();
        copy_layers(&[bottom, top], &root).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("etc/conf"), "new");
        assert_eq!(read("etc/link"), "new", "symlinks kept");
        assert_eq!(read("data/keep/k"), "k");
        assert!(!root.join("data/gone").exists(), "whiteout applied");
        assert!(
            !root.join("opq/hidden").exists(),
            "opaque dir hides the lower"
        );
        assert_eq!(read("opq/shown"), "s");
    }
}
