//! Which gateway a registering worker should use: gateways count the ready nodes each holds
//! from the committed view (no extra protocol), and a gateway well above the mean sends a new
//! worker to the least loaded one instead of registering it. After a gateway dies its
//! workers pile onto the next one in their lists; this spreads them over the others.
//!
//! ```text
//!  Register ─▶ loads (view) ─▶ mine ≥ mean × 1.2 + 50 and someone < mean × 0.9 ─▶ Redirect(to)
//!                                                                     otherwise ─▶ register here
//! ```

use std::sync::Arc;

/// A gateway this far above the mean sheds new registrations.
const OVER: f64 = 1.2;
/// Slack in nodes, so small fleets never bounce workers around.
const SLACK: f64 = 50.0;
/// Only a gateway this far below the mean takes them.
const UNDER: f64 = 0.9;

/// Where a worker registering at `me` should go instead, and why (None: stay), given the
/// ready nodes each gateway holds.
pub fn redirect_for(loads: &[(Arc<str>, usize)], me: &str) -> Option<(String, String)> {
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
    if (mine as f64) < mean * OVER + SLACK {
        return None;
    }
    let (to, n) = others.iter().min_by_key(|(_, n)| *n)?;
    ((*n as f64) < mean * UNDER).then(|| {
        (
            to.to_string(),
            format!("this gateway holds {mine} nodes, {to} holds {n} (mean {mean:.0})"),
        )
    })
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
        assert_eq!(redirect_for(&loads(&[("a", 100), ("b", 100)]), "a"), None);
        // Small fleets never bounce (the slack).
        assert_eq!(redirect_for(&loads(&[("a", 40), ("b", 0)]), "a"), None);
        // Alone: stay.
        assert_eq!(redirect_for(&loads(&[("a", 10_000)]), "a"), None);
        // A dead gateway's workers piled onto `a`: new ones go to the least loaded, `c`.
        let (to, why) =
            redirect_for(&loads(&[("a", 50_000), ("b", 25_000), ("c", 20_000)]), "a").unwrap();
        assert_eq!(to, "c");
        assert!(why.contains("50000"), "{why}");
        // A gateway not in the loads yet (no nodes) is busy only if the others are empty.
        assert_eq!(redirect_for(&loads(&[("b", 500), ("c", 500)]), "a"), None);
        // The least loaded is above 0.9 × mean: nobody takes them.
        assert_eq!(
            redirect_for(&loads(&[("a", 1_300), ("b", 1_000), ("c", 1_000)]), "a"),
            None
        );
    }
}
