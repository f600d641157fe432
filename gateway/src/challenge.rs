//! Registration nonces: `Agent.Challenge` hands a worker 32 fresh random bytes, which it
//! signs into the `Register` it sends on this gateway. A nonce is taken once and lives a
//! minute, so a registration captured on the wire (or in a log) cannot be replayed.
//!
//! ```text
//!  worker ─Challenge──▶ issue(): nonce ─▶ outstanding {nonce → issued at}
//!  worker ─Register(nonce, signature over key, token hash, nonce)─▶ signature checked
//!         ─▶ redeem(nonce): issued here, under a minute old, not taken before? ─▶ taken
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a nonce may wait for its registration.
pub const NONCE_TTL: Duration = Duration::from_secs(60);
/// Most nonces waiting at once: past it, Challenge is refused until some expire (an
/// unauthenticated caller cannot grow the map without bound).
pub const MAX_OUTSTANDING: usize = 100_000;

/// Why a nonce was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    /// Never issued here, already taken, or expired.
    #[error(
        "the registration's nonce was not issued by this gateway, was used already or is over a minute old; ask for a fresh one (Agent.Challenge) and sign it"
    )]
    Unknown,
    /// Too many nonces are waiting (see [`MAX_OUTSTANDING`]).
    #[error("too many registrations are under way on this gateway; retry in a few seconds")]
    Busy,
}

/// The nonces this gateway issued and not yet taken (see the module docs).
#[derive(Debug)]
pub struct Nonces {
    ttl: Duration,
    outstanding: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Default for Nonces {
    fn default() -> Self {
        Nonces::new(NONCE_TTL)
    }
}

impl Nonces {
    /// Nonces that live `ttl`.
    pub fn new(ttl: Duration) -> Nonces {
        Nonces {
            ttl,
            outstanding: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh nonce, remembered until taken or expired.
    pub fn issue(&self) -> Result<[u8; 32], NonceError> {
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).map_err(|_| NonceError::Busy)?;
        let now = stellar_proto::clock::now();
        let mut out = self.outstanding.lock().map_err(|_| NonceError::Busy)?;
        if out.len() >= MAX_OUTSTANDING {
            out.retain(|_, at| now.duration_since(*at) < self.ttl);
            if out.len() >= MAX_OUTSTANDING {
                return Err(NonceError::Busy);
            }
        }
        out.insert(nonce, now);
        Ok(nonce)
    }

    /// Takes `nonce`: Ok once for a nonce issued here within the time to live.
    pub fn redeem(&self, nonce: &[u8]) -> Result<(), NonceError> {
        let key: [u8; 32] = nonce.try_into().map_err(|_| NonceError::Unknown)?;
        let mut out = self.outstanding.lock().map_err(|_| NonceError::Busy)?;
        match out.remove(&key) {
            Some(at) if stellar_proto::clock::now().duration_since(at) < self.ttl => Ok(()),
            _ => Err(NonceError::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_taken_once_within_its_time_to_live() {
        let n = Nonces::new(Duration::from_millis(50));
        let a = n.issue().unwrap();
        let b = n.issue().unwrap();
        assert_ne!(a, b, "fresh each time");
        assert_eq!(n.redeem(&a), Ok(()));
        assert_eq!(n.redeem(&a), Err(NonceError::Unknown), "a replay");
        assert_eq!(
            n.redeem(&[7u8; 32]),
            Err(NonceError::Unknown),
            "never issued"
        );
        assert_eq!(n.redeem(b"short"), Err(NonceError::Unknown));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(n.redeem(&b), Err(NonceError::Unknown), "expired");
    }
}
