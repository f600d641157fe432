//! Containers on home nodes: OCI images run as hostile guests in namespaces, a cgroup and a
//! seccomp allow-list, metered from the cgroup's counters (Linux only).
//!
//! ```text
//! image.rs   IMAGE.tar ─▶ config + layer blobs (offsets)       (OCI layout or rootfs tar)
//! layers.rs  blob ─▶ verified, unpacked once per node, owned by the sandbox uid
//! run.rs     layers + private upper ─▶ cgroup ─▶ init ─▶ output streamed ─▶ Metering
//! init.rs    `stellar __container-init`: namespaces, overlay, pivot_root, no caps, seccomp
//! cgroup.rs  limits and counters (v1 or v2, cgroups-rs)       seccomp.rs  the allow-list
//! downloads.rs  a worker's layers arriving over its stream ─▶ layers.rs
//! invocation.rs a deployed function's call: assignment + invocation ─▶ run.rs
//! ```

pub mod cgroup;
pub mod downloads;
pub mod image;
pub mod init;
pub mod invocation;
pub mod layer_copy;
pub mod layers;
mod loopback;
pub mod run;
pub mod seccomp;
pub mod spec;

pub use image::{ImageArchive, ImageConfig, ImageError};
pub use run::{
    ContainerCall, ContainerLimits, ContainerOutcome, ContainerRuntime, DEFAULT_HOST_ID,
    OutputStream,
};

/// Whether this device can run containers, and if not why: checked once at worker start
/// (root, user namespaces, and a cgroup that takes every limit; without overlayfs the
/// layers are copied into each run instead, see [`layer_copy`]).
pub fn capability() -> Result<(), String> {
    preconditions()?;
    cgroup::available()
}

/// The cheap part of [`capability`] (no cgroup made): what a one-off `stellar run` checks
/// before it starts, so it can say what is missing; its own cgroup then proves the rest.
pub fn preconditions() -> Result<(), String> {
    let max_userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if max_userns == Some(0) {
        return Err("user namespaces are disabled (user.max_user_namespaces = 0)".into());
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not root: mounting images and creating cgroups need it".into());
    }
    Ok(())
}

/// Whether runs copy the image's layers instead of mounting an overlay: when the kernel has
/// no overlayfs, or `STELLAR_CONTAINER_ROOTFS=copy` says so (`overlay` forces the mount).
pub fn copies_layers() -> bool {
    match std::env::var("STELLAR_CONTAINER_ROOTFS").as_deref() {
        Ok("copy") => true,
        Ok("overlay") => false,
        _ => !std::fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .lines()
            .any(|l| l.trim_end().ends_with("overlay")),
    }
}
