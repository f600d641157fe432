//! The API's size limits and the ranges of a function's limits: one place, so the control
//! plane that refuses, the worker that clamps and the clients that check before sending all
//! agree (and the proto docs can point here).

use crate::v1::FunctionLimits;

/// Largest module, bytes: a home node downloads it over a residential link.
pub const MAX_MODULE_BYTES: usize = 16 << 20;
/// Largest stdin of one invocation, bytes.
pub const MAX_INVOKE_INPUT: usize = 8 << 20;
/// Largest stdout, and largest stderr, one invocation may return, bytes: both travel back in
/// one message on the worker's stream and in the caller's answer, which must stay under
/// [`MAX_MESSAGE_BYTES`]. Workers clamp any larger limit to this.
pub const MAX_OUTPUT_BYTES: u32 = 8 << 20;
/// Largest gRPC message a role accepts: a module upload (or a result with both outputs at
/// their cap) plus its envelope.
pub const MAX_MESSAGE_BYTES: usize = MAX_MODULE_BYTES + (1 << 20);
/// Largest memory limit per instance, MiB.
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;
/// Largest CPU reservation per instance, millicores (64 cores).
pub const MAX_CPU_MILLIS: u32 = 64_000;
/// Longest per-invocation deadline, ms (15 minutes).
pub const MAX_TIMEOUT_MS: u32 = 15 * 60 * 1000;

/// Why a function's limits were refused: the field, its allowed range and the value given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    /// The `FunctionLimits` field at fault.
    pub field: &'static str,
    /// What is allowed, in words.
    pub allowed: String,
    /// What was given.
    pub got: u64,
}

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "limits.{} must be {}, got {}",
            self.field, self.allowed, self.got
        )
    }
}

impl std::error::Error for LimitError {}

/// Checks every field of a deploy's limits against its documented range (0 means "the
/// default" only where the proto says so: fuel and max_output_bytes).
pub fn check_function_limits(l: &FunctionLimits) -> Result<(), LimitError> {
    // (field, value, lowest, highest, unit)
    let checks: [(&'static str, u32, u32, u32, &str); 4] = [
        ("memory_mib", l.memory_mib, 1, MAX_MEMORY_MIB, "MiB"),
        (
            "cpu_millis",
            l.cpu_millis,
            1,
            MAX_CPU_MILLIS,
            "millicores (1000 = one core)",
        ),
        ("timeout_ms", l.timeout_ms, 1, MAX_TIMEOUT_MS, "ms"),
        (
            "max_output_bytes",
            l.max_output_bytes,
            0,
            MAX_OUTPUT_BYTES,
            "bytes (0 = 1 MiB)",
        ),
    ];
    for (field, got, lo, hi, unit) in checks {
        if !(lo..=hi).contains(&got) {
            return Err(LimitError {
                field,
                allowed: format!("{lo}..={hi} {unit}"),
                got: u64::from(got),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> FunctionLimits {
        FunctionLimits {
            cpu_millis: 100,
            memory_mib: 64,
            timeout_ms: 1000,
            ..Default::default()
        }
    }

    #[test]
    fn every_field_is_checked_and_named() {
        assert_eq!(check_function_limits(&ok()), Ok(()));
        type Spoil = fn(&mut FunctionLimits);
        let cases: [(&str, Spoil); 6] = [
            ("memory_mib", |l| l.memory_mib = 65_537),
            ("memory_mib", |l| l.memory_mib = 0),
            ("cpu_millis", |l| l.cpu_millis = 64_001),
            ("cpu_millis", |l| l.cpu_millis = 0),
            ("timeout_ms", |l| l.timeout_ms = 0),
            ("max_output_bytes", |l| l.max_output_bytes = u32::MAX),
        ];
        for (field, spoil) in cases {
            let mut l = ok();
            spoil(&mut l);
            let e = check_function_limits(&l).unwrap_err();
            assert_eq!(e.field, field);
            assert!(
                e.to_string()
                    .starts_with(&format!("limits.{field} must be")),
                "{e}"
            );
        }
    }
}
