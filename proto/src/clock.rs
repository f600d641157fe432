//! The control plane's wall clock, outside the state machine: the gateway stamps invocation
//! logs and usage commands with it (apply never reads it; the time travels in the command).

/// Milliseconds since the Unix epoch (0 if the clock is before it).
#[allow(clippy::disallowed_methods)]
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A monotonic instant, for measuring how long a gateway call waited.
#[allow(clippy::disallowed_methods)]
pub fn now() -> std::time::Instant {
    std::time::Instant::now()
}
