//! What the worker hands the container init (on fd 4, JSON) and what the init answers when
//! the sandbox could not be built (on fd 3): the one contract between the two processes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The child fd the init reads its [`InitSpec`] from (then closes).
pub const SPEC_FD: i32 = 4;
/// The child fd the init reports on: an [`InitFailure`] before the program runs, or how
/// the program ended (one JSON line each).
pub const STATUS_FD: i32 = 3;
/// The writable layer, overlayfs' work dir and the root, inside [`InitSpec::run_dir`].
pub const UPPER: &str = "upper";
/// See [`UPPER`].
pub const WORK: &str = "work";
/// See [`UPPER`].
pub const ROOTFS: &str = "rootfs";
/// The hidden first argument that turns `stellar` into the container init.
pub const INIT_ARG: &str = "__container-init";

/// One container's sandbox, fully resolved by the worker: the init decides nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitSpec {
    /// The root of the layer cache and run directories; every path below is relative to it,
    /// so the unprivileged sandbox uid never has to traverse the worker's own directories.
    pub base: PathBuf,
    /// Read-only layers, topmost first (relative to `base`).
    pub lower: Vec<PathBuf>,
    /// This run's directory (relative to `base`): the init mounts a tmpfs on it (in its own
    /// mount namespace) holding the private writable layer, overlayfs' work dir and the
    /// root's mount point, so the run's writes are memory, charged to its cgroup, and gone
    /// with its last process.
    pub run_dir: PathBuf,
    /// Size of that tmpfs (the most the program can write outside /tmp), MiB.
    pub scratch_mib: u32,
    /// The host uid and gid the container's root is mapped to (unprivileged on the host).
    pub host_uid: u32,
    /// See `host_uid`.
    pub host_gid: u32,
    /// The container's hostname.
    pub hostname: String,
    /// The program and its arguments (`argv[0]` is looked up on the image's `PATH`).
    pub argv: Vec<String>,
    /// `KEY=VALUE` pairs, the whole environment.
    pub env: Vec<String>,
    /// The working directory inside the container.
    pub cwd: String,
    /// Host directories bound into the container (read-write).
    pub binds: Vec<Bind>,
    /// Size of the private `/tmp`, MiB.
    pub tmp_mib: u32,
    /// Copy the layers into the run's tmpfs instead of mounting an overlay (kernels without
    /// overlayfs).
    #[serde(default)]
    pub copy_layers: bool,
}

/// A host directory made visible inside the container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bind {
    /// The absolute host path.
    pub host: PathBuf,
    /// The absolute path inside the container.
    pub guest: String,
}

/// Why the sandbox could not be built; sent before the function's program runs, never after.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitFailure {
    /// True when the image is at fault (no such program, bad working dir), false when this
    /// node could not build the sandbox (a worker fault, not the caller's).
    pub image: bool,
    /// What failed, for the caller or the node owner.
    pub message: String,
}
