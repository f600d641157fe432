//! Bridges raft-rs's `slog` records into `tracing`, so one subscriber shows every log line
//! (with the replica id) and the harness can silence them.

use slog::{Drain, Level, OwnedKVList, Record};

/// A `slog` drain that re-emits each record as a `tracing` event at the same level.
#[derive(Debug, Clone, Copy)]
pub struct TracingDrain {
    replica: u64,
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, _values: &OwnedKVList) -> Result<(), slog::Never> {
        let msg = record.msg();
        let replica = self.replica;
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", replica, "{msg}"),
            Level::Warning => tracing::warn!(target: "raft", replica, "{msg}"),
            Level::Info => tracing::info!(target: "raft", replica, "{msg}"),
            Level::Debug => tracing::debug!(target: "raft", replica, "{msg}"),
            Level::Trace => tracing::trace!(target: "raft", replica, "{msg}"),
        }
        Ok(())
    }
}

/// The logger handed to raft-rs for replica `replica`.
pub fn raft_logger(replica: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain { replica }.fuse(), slog::o!())
}
