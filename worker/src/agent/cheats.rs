//! A worker that cheats, for the adversary tests (issue 15): compiled in only with the
//! `cheat` feature, which no shipped build enables, and switched on by
//! `STELLAR_WORKER_CHEAT=KIND[:RATE]`. Each kind is one way a modified home node could try
//! to be paid for more than it did; the tests assert each is refused or quarantined.
//!
//! | kind | what it does |
//! |---|---|
//! | `inflate-fuel[:R]` | signs 10% more fuel than it metered, on a share R of calls (default 1) |
//! | `wrong-output[:R]` | returns made-up output (its receipt hashes it) on a share R (default 0.05) |
//! | `replay[:R]` | after a share R of calls (default 0.05), bills that call again as the next link of its chain |
//! | `other-tenant[:R]` | after a share R, reports that call again as another tenant's function |
//! | `other-node[:R]` | after a share R, reports that call again signed by another node's key |
//!
//! A forged report leaves right after the call's result, as a usage report of its own.
//!
//! Without the feature, [`Cheater`] is a no-op with the same API.

use stellar_proto::v1 as pb;

/// The cheats this worker plays (none unless built with `cheat` and asked to).
#[derive(Debug, Default)]
pub(super) struct Cheater {
    #[cfg(feature = "cheat")]
    kind: Option<(Kind, f64)>,
    #[cfg(feature = "cheat")]
    calls: std::sync::atomic::AtomicU64,
}

#[cfg(feature = "cheat")]
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    InflateFuel,
    WrongOutput,
    Replay,
    OtherTenant,
    OtherNode,
}

impl Cheater {
    /// The cheats `STELLAR_WORKER_CHEAT` asks for (always none without the feature).
    pub(super) fn from_env() -> Cheater {
        #[cfg(feature = "cheat")]
        {
            let Ok(v) = std::env::var("STELLAR_WORKER_CHEAT") else {
                return Cheater::default();
            };
            let (name, rate) = v.split_once(':').unwrap_or((v.as_str(), ""));
            let (kind, default_rate) = match name {
                "inflate-fuel" => (Kind::InflateFuel, 1.0),
                "wrong-output" => (Kind::WrongOutput, 0.05),
                "replay" => (Kind::Replay, 0.05),
                "other-tenant" => (Kind::OtherTenant, 0.05),
                "other-node" => (Kind::OtherNode, 0.05),
                other => {
                    tracing::error!(cheat = other, "unknown STELLAR_WORKER_CHEAT; playing fair");
                    return Cheater::default();
                }
            };
            let rate = rate.parse().unwrap_or(default_rate);
            tracing::warn!(cheat = name, rate, "this worker CHEATS (test build)");
            Cheater {
                kind: Some((kind, rate)),
                calls: Default::default(),
            }
        }
        #[cfg(not(feature = "cheat"))]
        Cheater::default()
    }

    /// Whether this call is one the cheat picks (every 1/rate-th call).
    #[cfg(feature = "cheat")]
    fn picks(&self, want: Kind) -> bool {
        let Some((kind, rate)) = self.kind else {
            return false;
        };
        if kind != want || rate <= 0.0 {
            return false;
        }
        let n = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let every = (1.0 / rate.min(1.0)).round().max(1.0) as u64;
        n % every == every - 1
    }

    /// Tampers with a finished call's output and fuel before its receipt is signed.
    pub(super) fn tamper(&self, stdout: &mut Vec<u8>, fuel: &mut u64) {
        #[cfg(feature = "cheat")]
        {
            if self.picks(Kind::InflateFuel) {
                *fuel += *fuel / 10;
            } else if self.picks(Kind::WrongOutput) {
                *stdout = b"made up by a cheating worker".to_vec();
            }
        }
        let _ = (stdout, fuel);
    }

    /// A forged usage report to send after this call's result, made from its receipt, when
    /// the cheat picks this call.
    pub(super) fn forged(
        &self,
        settlement: &std::sync::Mutex<super::settlement::Settlement>,
    ) -> Option<pb::WorkerMessage> {
        #[cfg(feature = "cheat")]
        {
            use ed25519_dalek::Signer;
            let (kind, _) = self.kind?;
            if !matches!(kind, Kind::Replay | Kind::OtherTenant | Kind::OtherNode)
                || !self.picks(kind)
            {
                return None;
            }
            let mut s = settlement.lock().ok()?;
            let mut r = s.last.clone()?;
            let forged = match kind {
                Kind::Replay => {
                    // The same ticket billed again, properly chained and signed.
                    r.signature.clear();
                    s.book.sign(r).ok()?
                }
                Kind::OtherTenant => {
                    if let Some(t) = r.ticket.as_mut() {
                        t.tenant = "victim".into();
                        t.function = "theirs".into();
                    }
                    r.signature.clear();
                    s.book.sign(r).ok()?
                }
                Kind::OtherNode => {
                    let other = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
                    r.signature = other
                        .sign(&stellar_proto::receipts::receipt_message(&r))
                        .to_bytes()
                        .to_vec();
                    r
                }
                Kind::InflateFuel | Kind::WrongOutput => return None,
            };
            Some(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Usage(pb::UsageReport {
                    receipts: vec![forged],
                })),
            })
        }
        #[cfg(not(feature = "cheat"))]
        {
            let _ = settlement;
            None
        }
    }
}
