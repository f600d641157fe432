//! Which gateway a worker should use. Gateways count the ready nodes each holds from the
//! committed view (no extra protocol) and learn of peers that hold none yet (just started, or
//! back after a crash) from the leader's acknowledgements. A gateway well above the mean
//! sends a registering worker to the least loaded peer instead, and every few seconds sends
//! a few of its idle workers there too (shedding), so a gateway that comes back fills up
//! again without waiting for workers to churn.
//!
//! ```text
//!  Register ─▶ loads ─▶ mine ≥ mean × 1.2 + slack and a peer < mean × 0.9 ─▶ Redirect(to)
//!                                                                otherwise ─▶ register here
//!  every 10 s ─▶ the same test ─▶ Redirect to ≤ 2% of the attached workers that have no call
//!                in flight (no longer routed to), until the loads are within bounds
//! ```

use std::sync::Arc;
use std::time::Duration;

use stellar_proto::v1 as pb;

use crate::agent::Edge;
use crate::hub::control;

/// A gateway this far above the mean sheds new registrations.
const OVER: f64 = 1.2;
/// Only a gateway this far below the mean takes them.
const UNDER: f64 = 0.9;
/// The default slack in nodes above the mean, so small fleets never bounce workers around.
pub const DEFAULT_SLACK: usize = 50;
/// How often a gateway checks whether to shed attached workers.
const SHED_EVERY: Duration = Duration::from_secs(10);
/// The most of its attached workers a gateway sheds in one round (the rest follow in the
/// next rounds, once the moves are committed and the loads re-read).
const SHED_FRACTION: usize = 50;

/// Every gateway a worker may go to, with the ready nodes it holds: the committed counts,
/// plus `live` peers that hold none yet; besides `me`, only peers that `answer` probes (a
/// dead one still holds its nodes in the view until they re-attach or go down).
pub fn loads(
    committed: Vec<(Arc<str>, usize)>,
    live: &[Arc<str>],
    me: &str,
    answers: impl Fn(&str) -> bool,
) -> Vec<(Arc<str>, usize)> {
    let mut all = committed;
    for g in live {
        if !all.iter().any(|(a, _)| a == g) {
            all.push((g.clone(), 0));
        }
    }
    all.retain(|(g, _)| &**g == me || answers(g));
    all
}

/// The peer to send workers to and how many `me` holds above the bounds (None: balanced
/// enough), given the ready nodes each gateway holds.
fn excess(
    loads: &[(Arc<str>, usize)],
    me: &str,
    slack: usize,
) -> Option<(Arc<str>, usize, String)> {
    let mine = loads
        .iter()
        .find(|(g, _)| &**g == me)
        .map_or(0, |(_, n)| *n);
    let others: Vec<&(Arc<str>, usize)> = loads.iter().filter(|(g, _)| &**g != me).collect();
    if others.is_empty() {
        return None;
    }
    let total: usize = mine + others.iter().map(|(_, n)| n).sum::<usize>();
    let mean = total as f64 / (others.len() + 1) as f64;
    if (mine as f64) < mean * OVER + slack as f64 {
        return None;
    }
    let (to, n) = others.iter().min_by_key(|(_, n)| *n)?;
    if (*n as f64) >= mean * UNDER {
        return None;
    }
    // Move at most half the gap to the peer (more would only swap the roles, and small
    // fleets would bounce workers to and fro) and no more than brings `me` to the mean.
    let over = (mine.saturating_sub(*n) / 2).min((mine as f64 - mean).floor() as usize);
    if over == 0 {
        return None;
    }
    let why = format!("this gateway holds {mine} nodes, {to} holds {n} (mean {mean:.0})");
    Some((to.clone(), over, why))
}

/// Where a worker registering at `me` should go instead, and why (None: stay).
pub fn redirect_for(
    loads: &[(Arc<str>, usize)],
    me: &str,
    slack: usize,
) -> Option<(String, String)> {
    excess(loads, me, slack).map(|(to, _, why)| (to.to_string(), why))
}

/// How many of its `attached` workers `me` should send where this round, and why (None:
/// none): at most the excess, and at most 1/[`SHED_FRACTION`] of them (at least one).
pub fn shed_plan(
    loads: &[(Arc<str>, usize)],
    me: &str,
    slack: usize,
    attached: usize,
) -> Option<(String, usize, String)> {
    let (to, over, why) = excess(loads, me, slack)?;
    let n = over.min((attached / SHED_FRACTION).max(1)).min(attached);
    (n > 0).then(|| (to.to_string(), n, why))
}

/// Sheds idle workers to less loaded peers every [`SHED_EVERY`] while this gateway is well
/// above the mean, until `closed`.
pub async fn shed_excess(edge: Edge, mut closed: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SHED_EVERY) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        // Judge only from a complete view and while the leader hears this gateway.
        if !edge.view.complete() || !edge.session.connected() {
            continue;
        }
        let loads = edge.loads();
        let Some((to, n, why)) = shed_plan(
            &loads,
            &edge.advertise,
            edge.balance_slack,
            edge.hub.attached(),
        ) else {
            continue;
        };
        let sent = edge.hub.shed(
            n,
            &control(pb::control_message::Kind::Redirect(pb::Redirect {
                gateway: to.clone(),
                reason: why.clone(),
            })),
        );
        if sent > 0 {
            tracing::info!(to = %to, workers = sent, reason = %why, "shedding idle workers to a less loaded gateway");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(v: &[(&str, usize)]) -> Vec<(Arc<str>, usize)> {
        v.iter().map(|(g, n)| (Arc::from(*g), *n)).collect()
    }

    #[test]
    fn only_a_clearly_busier_gateway_redirects_and_only_to_the_least_loaded() {
        // Balanced: stay.
        assert_eq!(
            redirect_for(&loads(&[("a", 100), ("b", 100)]), "a", DEFAULT_SLACK),
            None
        );
        // Small fleets never bounce (the slack).
        assert_eq!(
            redirect_for(&loads(&[("a", 40), ("b", 0)]), "a", DEFAULT_SLACK),
            None
        );
        // Alone: stay.
        assert_eq!(
            redirect_for(&loads(&[("a", 10_000)]), "a", DEFAULT_SLACK),
            None
        );
        // A dead gateway's workers piled onto `a`: new ones go to the least loaded, `c`.
        let (to, why) = redirect_for(
            &loads(&[("a", 50_000), ("b", 25_000), ("c", 20_000)]),
            "a",
            DEFAULT_SLACK,
        )
        .unwrap();
        assert_eq!(to, "c");
        assert!(why.contains("50000"), "{why}");
        // A gateway not in the loads yet (no nodes) is busy only if the others are empty.
        assert_eq!(
            redirect_for(&loads(&[("b", 500), ("c", 500)]), "a", DEFAULT_SLACK),
            None
        );
        // The least loaded is above 0.9 × mean: nobody takes them.
        assert_eq!(
            redirect_for(
                &loads(&[("a", 1_300), ("b", 1_000), ("c", 1_000)]),
                "a",
                DEFAULT_SLACK
            ),
            None
        );
    }

    #[test]
    fn a_peer_that_holds_no_node_yet_is_a_target_once_it_answers() {
        let committed = loads(&[("a", 300), ("b", 300)]);
        let live: Vec<Arc<str>> = ["a", "b", "c"].iter().map(|g| Arc::from(*g)).collect();
        // `c` just came back: in no node's committed record, but live at the leader.
        let all = super::loads(committed.clone(), &live, "a", |g| g != "c");
        assert_eq!(all.len(), 2, "not probed yet: not offered");
        let all = super::loads(committed, &live, "a", |_| true);
        assert!(all.iter().any(|(g, n)| &**g == "c" && *n == 0), "{all:?}");
        // With `c` empty, a (at 300 vs a mean of 200) sheds: some, never all at once.
        let (to, n, _) = shed_plan(&all, "a", DEFAULT_SLACK, 300).unwrap();
        assert_eq!(to, "c");
        assert_eq!(n, 300 / SHED_FRACTION, "one round moves a bounded share");
        // Balanced (or within the slack): nothing to shed.
        assert_eq!(
            shed_plan(
                &loads(&[("a", 210), ("b", 200), ("c", 190)]),
                "a",
                DEFAULT_SLACK,
                210
            ),
            None
        );
        // Never more than the excess: 3 above a mean of 2 with a peer at 1.
        let (_, n, _) = shed_plan(&loads(&[("a", 5), ("b", 1), ("c", 0)]), "a", 0, 5).unwrap();
        assert!(n <= 2, "{n}");
        // A slack of zero (tests, tiny fleets) balances a handful, and never moves a
        // worker that would only make the other gateway the busier one.
        assert!(redirect_for(&loads(&[("a", 3), ("b", 0)]), "a", 0).is_some());
        assert!(redirect_for(&loads(&[("a", 2), ("b", 1)]), "a", 0).is_none());
        assert!(redirect_for(&loads(&[("a", 1), ("b", 1)]), "a", 0).is_none());
    }
}
