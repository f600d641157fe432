//! WASI `poll_oneoff` bounded by the invocation's deadline. A guest blocked in a host call
//! (`sleep`, a timed poll) runs no wasm, so the epoch deadline cannot interrupt it: a one-second
//! function could hold its slot for an hour. This shadows preview 1's `poll_oneoff` with a
//! wrapper that shortens every relative clock subscription to the time the call has left and
//! then runs WASI's own implementation (its public `poll_oneoff`, on the guest's memory and
//! WASI context, as the generated glue does). A guest whose wait was cut short wakes at its
//! deadline and the call ends there with the epoch deadline's own trap (DEADLINE_EXCEEDED).
//!
//! ```text
//!  guest poll_oneoff(subs, events, n, out) ─▶ for each clock subscription without ABSTIME:
//!      timeout = min(timeout, deadline - now) (in guest memory) ─▶ WASI poll_oneoff
//!      ─▶ a timeout was cut: trap as the deadline does; otherwise WASI's answer
//! ```
//!
//! Absolute-time clock subscriptions are left as they are (Rust's and C's `sleep` are
//! relative).

use std::time::{Duration, Instant};

use wasmtime::{Caller, Extern, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;

/// A preview-1 `subscription` is 48 bytes: userdata u64, tag u8 at 8 (0 = clock), and for a
/// clock: id u32 at 16, timeout u64 (ns) at 24, precision u64 at 32, flags u16 at 40.
const SUBSCRIPTION: usize = 48;
const TAG: usize = 8;
const TIMEOUT: usize = 24;
const FLAGS: usize = 40;
const TAG_CLOCK: u8 = 0;
const ABSTIME: u16 = 1;
const MODULE: &str = "wasi_snapshot_preview1";

/// What the wrapper needs from the store's data.
pub(crate) trait Deadline {
    /// When the invocation must end.
    fn deadline(&self) -> Instant;
    /// The invocation's WASI context.
    fn wasi(&mut self) -> &mut WasiP1Ctx;
}

/// Shortens the relative clock timeouts of `n` subscriptions at `subs` in `memory` to at most
/// `left`; whether any was cut. Out-of-bounds subscriptions are left for WASI to refuse
/// (EFAULT).
fn cap(memory: &mut [u8], subs: u32, n: u32, left: Duration) -> bool {
    let left_ns = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX);
    let start = subs as usize;
    let Some(end) = (n as usize)
        .checked_mul(SUBSCRIPTION)
        .and_then(|len| start.checked_add(len))
        .filter(|&end| end <= memory.len())
    else {
        return false;
    };
    let mut cut = false;
    for s in memory[start..end].chunks_exact_mut(SUBSCRIPTION) {
        let flags = u16::from_le_bytes([s[FLAGS], s[FLAGS + 1]]);
        if s[TAG] != TAG_CLOCK || flags & ABSTIME != 0 {
            continue;
        }
        let t = &mut s[TIMEOUT..TIMEOUT + 8];
        let timeout = u64::from_le_bytes(t.try_into().expect("8 bytes"));
        if timeout > left_ns {
            t.copy_from_slice(&left_ns.to_le_bytes());
            cut = true;
        }
    }
    cut
}

/// Replaces `poll_oneoff` in `linker` (which must already hold WASI preview 1) with the
/// deadline-bounded wrapper.
pub(crate) fn add<T: Deadline + Send + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(
        MODULE,
        "poll_oneoff",
        |mut caller: Caller<'_, T>,
         subs: i32,
         events: i32,
         n: i32,
         out: i32|
         -> wasmtime::Result<i32> {
            let left = caller
                .data()
                .deadline()
                .saturating_duration_since(crate::clock::now());
            let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
                wasmtime::bail!("missing required memory export");
            };
            let (bytes, data) = memory.data_and_store_mut(&mut caller);
            let cut = cap(bytes, subs as u32, n as u32, left);
            let mut guest = wiggle::GuestMemory::Unshared(bytes);
            let answer = wasmtime_wasi::runtime::in_tokio(
                wasmtime_wasi::p1::wasi_snapshot_preview1::poll_oneoff(
                    data.wasi(),
                    &mut guest,
                    subs,
                    events,
                    n,
                    out,
                ),
            )?;
            if cut {
                // It asked to wait past its deadline: the call ends now, as the epoch
                // deadline would have ended it had wasm been running.
                return Err(wasmtime::Trap::Interrupt.into());
            }
            Ok(answer)
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(tag: u8, timeout: u64, flags: u16) -> [u8; SUBSCRIPTION] {
        let mut s = [0u8; SUBSCRIPTION];
        s[TAG] = tag;
        s[TIMEOUT..TIMEOUT + 8].copy_from_slice(&timeout.to_le_bytes());
        s[FLAGS..FLAGS + 2].copy_from_slice(&flags.to_le_bytes());
        s
    }

    fn timeout_at(m: &[u8], i: usize) -> u64 {
        let o = 8 + i * SUBSCRIPTION + TIMEOUT;
        u64::from_le_bytes(m[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn only_relative_clock_timeouts_past_the_deadline_are_shortened() {
        let mut m = vec![0u8; 8];
        m.extend(sub(TAG_CLOCK, 60_000_000_000, 0)); // a minute: capped
        m.extend(sub(TAG_CLOCK, 1_000, 0)); // shorter than what is left: kept
        m.extend(sub(TAG_CLOCK, 60_000_000_000, ABSTIME)); // absolute: kept
        m.extend(sub(1, 60_000_000_000, 0)); // an fd subscription: kept
        assert!(cap(&mut m, 8, 4, Duration::from_millis(5)));
        assert_eq!(timeout_at(&m, 0), 5_000_000);
        assert_eq!(timeout_at(&m, 1), 1_000);
        assert_eq!(timeout_at(&m, 2), 60_000_000_000);
        assert_eq!(timeout_at(&m, 3), 60_000_000_000);
        // Past the end of memory: nothing is touched.
        let before = m.clone();
        assert!(!cap(&mut m, 8, 5, Duration::ZERO));
        assert_eq!(m, before);
        assert!(!cap(&mut m, u32::MAX, 1, Duration::ZERO));
        assert_eq!(m, before);
    }
}
