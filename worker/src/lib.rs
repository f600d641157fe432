//! `stellar-worker`: the home-node agent. It dials out to the control plane, runs
//! WebAssembly functions in wasmtime with per-invocation limits, and meters what each
//! invocation used. See the crate README for the flow.

pub mod agent;
pub mod cache;
#[cfg(target_os = "linux")]
pub mod container;
pub mod error;
pub mod identity;
pub mod receipts;
pub mod sandbox;
mod sleep_deadline;

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub use agent::{AgentConfig, run};

/// Whether this build's workers can cheat (the test-only `cheat` feature, switched on per
/// process by `STELLAR_WORKER_CHEAT`): `stellar --version` says so, so a benchmark can tell a
/// test build from a shipped one.
pub const CAN_CHEAT: bool = cfg!(feature = "cheat");
pub use error::{Error, Result};
pub use identity::Identity;
pub use sandbox::{
    Function, InvocationInput, InvocationLimits, InvokeError, Metering, Outcome, Preopen, Sandbox,
    SandboxConfig,
};

/// A 32-byte secret kept in `path` (mode 0600), made on first use.
pub(crate) fn secret_file(path: &Path) -> Result<[u8; 32]> {
    let refuse = |reason: String| Error::Identity {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::File::open(path) {
        Ok(mut f) => {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map_err(Error::io(path))?;
            let secret: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| refuse(format!("{} bytes, expected 32", bytes.len())))?;
            let mode = f.metadata().map_err(Error::io(path))?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "secret readable by others; setting mode 0600");
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(Error::io(path))?;
            }
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
            }
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| refuse(format!("no randomness: {e}")))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(Error::io(path))?;
            f.write_all(&secret).map_err(Error::io(path))?;
            f.sync_all().map_err(Error::io(path))?;
            Ok(secret)
        }
        Err(e) => Err(Error::io(path)(e)),
    }
}

/// The worker's one real clock: wall time is metered (and deadlines enforced) against it.
pub mod clock {
    /// Now, for measuring how long an invocation ran.
    #[allow(clippy::disallowed_methods)]
    pub fn now() -> std::time::Instant {
        std::time::Instant::now()
    }
}
