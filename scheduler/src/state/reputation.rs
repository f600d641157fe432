//! Reputation: a beta reputation with decay (Jøsang and Ismail, 2002), kept per node in the
//! replicated state and fed only by committed evidence, which arrives in batches with the
//! usage commands: receipts recorded (a little good), re-execution checks (matched: good;
//! mismatched: very bad), refused receipts (very bad), calls not answered in time and streams
//! lost mid-call (a little bad). Evidence fades by [`DECAY_PER_PERIOD`] each receipt period,
//! applied lazily when the node next has evidence (never a sweep over all nodes).
//!
//! ```text
//!  score = (good + 4) / (good + bad + 5)       a new node: 0.8
//!  evidence                  good    bad
//!  receipt recorded          0.05
//!  check matched             1
//!  check mismatched                  300     (one quarantines a node of < 125 matches)
//!  receipt refused (fault)           1000    (forged, replayed, forked, signature, output:
//!                                            signed proof of cheating, whatever the record)
//!  timeout                           0.25
//!  stream lost mid-call              0.5
//!  score < 0.3 ─▶ QUARANTINED (its allocations re-placed; an admin returns it)
//! ```
//!
//! Placement scores nodes by it and floors it (`PlacerConfig::min_reputation`, 0.5). The
//! score the placement table and the watchers see moves only in steps of [`PUBLISH_STEP`]
//! (or across the quarantine line), so a busy node does not change the watch on every batch.

/// Good evidence a new node starts with (the prior).
pub const PRIOR_GOOD: f64 = 4.0;
/// Bad evidence a new node starts with.
pub const PRIOR_BAD: f64 = 1.0;
/// Below this score a node is quarantined.
pub const QUARANTINE_BELOW: f32 = 0.3;
/// Evidence kept per receipt period (a half-life of about 34 periods, ~3 h at 5 minutes).
pub const DECAY_PER_PERIOD: f64 = 0.98;
/// The smallest change of score published to the node's record.
pub const PUBLISH_STEP: f32 = 0.02;

/// What one piece of evidence weighs: (good, bad).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Evidence {
    /// A receipt the ledger recorded.
    Receipt,
    /// A re-execution elsewhere agreed.
    CheckMatch,
    /// A re-execution elsewhere disagreed (output or fuel).
    CheckMismatch,
    /// A receipt refused for the node's fault.
    Refused,
    /// A call not answered in time.
    Timeout,
    /// The stream ended with a call on it.
    LostStream,
}

impl Evidence {
    fn weight(self) -> (f64, f64) {
        match self {
            Evidence::Receipt => (0.05, 0.0),
            Evidence::CheckMatch => (1.0, 0.0),
            Evidence::CheckMismatch => (0.0, 300.0),
            Evidence::Refused => (0.0, 1_000.0),
            Evidence::Timeout => (0.0, 0.25),
            Evidence::LostStream => (0.0, 0.5),
        }
    }
}

/// One node's standing: its evidence and what it is made of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Standing {
    /// Good evidence, decayed to `as_of_period`.
    pub good: f64,
    /// Bad evidence, decayed to `as_of_period`.
    pub bad: f64,
    /// The receipt period the evidence is decayed to.
    pub as_of_period: u64,
    /// Re-execution checks that agreed.
    pub checks_matched: u64,
    /// Re-execution checks that disagreed.
    pub checks_mismatched: u64,
    /// Calls not answered in time.
    pub timeouts: u64,
    /// Streams lost with a call on them.
    pub lost_streams: u64,
}

impl Standing {
    /// Adds one piece of evidence seen in `period`.
    pub fn add(&mut self, e: Evidence, period: u64) {
        if period > self.as_of_period {
            let f = DECAY_PER_PERIOD.powi((period - self.as_of_period).min(10_000) as i32);
            self.good *= f;
            self.bad *= f;
            self.as_of_period = period;
        }
        let (g, b) = e.weight();
        self.good += g;
        self.bad += b;
        match e {
            Evidence::CheckMatch => self.checks_matched += 1,
            Evidence::CheckMismatch => self.checks_mismatched += 1,
            Evidence::Timeout => self.timeouts += 1,
            Evidence::LostStream => self.lost_streams += 1,
            Evidence::Receipt | Evidence::Refused => {}
        }
    }

    /// The score in [0, 1].
    pub fn score(&self) -> f32 {
        ((self.good + PRIOR_GOOD) / (self.good + self.bad + PRIOR_GOOD + PRIOR_BAD)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honest_work_keeps_a_node_in_standing_and_cheating_does_not() {
        let new = Standing::default();
        assert!((new.score() - 0.8).abs() < 1e-6);
        // An honest node on a flaky line: 1,000 calls, 5% of them timed out, 100 checked.
        let mut honest = Standing::default();
        for i in 0..1000u64 {
            honest.add(Evidence::Receipt, i / 100);
            if i % 20 == 0 {
                honest.add(Evidence::Timeout, i / 100);
            }
            if i % 10 == 0 {
                honest.add(Evidence::CheckMatch, i / 100);
            }
        }
        assert!(honest.score() > 0.9, "{honest:?}");
        // One mismatch quarantines a new node, and even a well-established one drops far.
        let mut caught = Standing::default();
        caught.add(Evidence::CheckMismatch, 0);
        assert!(caught.score() < QUARANTINE_BELOW, "{caught:?}");
        let mut est = honest.clone();
        est.add(Evidence::CheckMismatch, 10);
        assert!(est.score() < 0.75, "{est:?}");
        est.add(Evidence::CheckMismatch, 10);
        assert!(est.score() < QUARANTINE_BELOW + 0.25, "{est:?}");
        // A forged receipt does it too; a node that only times out sinks below the line.
        let mut forger = Standing::default();
        forger.add(Evidence::Refused, 0);
        assert!(forger.score() < QUARANTINE_BELOW);
        let mut dead = Standing::default();
        for _ in 0..60 {
            dead.add(Evidence::Timeout, 0);
        }
        assert!(dead.score() < QUARANTINE_BELOW, "{dead:?}");
        // Evidence fades: a bad hour long ago weighs little.
        let mut old = Standing::default();
        old.add(Evidence::Refused, 0);
        old.add(Evidence::Receipt, 500);
        assert!(old.score() > 0.75, "{old:?}");
    }
}
