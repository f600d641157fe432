//! Merkle trees as Certificate Transparency builds them (RFC 6962 §2.1, RFC 9162 §2.1): the
//! ledger commits one root per period over its nodes' period leaves, and a node owner checks
//! their leaf against that root with an audit path of log₂(n) hashes, without seeing anyone
//! else's leaf.
//!
//! ```text
//!  leaf  = SHA-256(0x00 ‖ leaf bytes)        node = SHA-256(0x01 ‖ left ‖ right)
//!  n leaves split at the largest power of two below n (left side full), recursively
//! ```

use sha2::{Digest, Sha256};

/// A leaf's hash (domain-separated from inner nodes, so a leaf cannot pose as a subtree).
pub fn leaf_hash(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The root over `leaves` (leaf hashes, in order); the hash of nothing for none.
pub fn root(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path of leaf `index` (the sibling hashes from the leaf up).
pub fn audit_path(index: usize, leaves: &[[u8; 32]]) -> Vec<[u8; 32]> {
    let n = leaves.len();
    if n <= 1 || index >= n {
        return Vec::new();
    }
    let k = split(n);
    if index < k {
        let mut p = audit_path(index, &leaves[..k]);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = audit_path(index - k, &leaves[k..]);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Whether `leaf` (a leaf hash) is at `index` of a tree of `size` leaves whose root is
/// `root`, by `path` (RFC 9162 §2.1.3.2).
pub fn verify(index: u64, size: u64, leaf: &[u8; 32], path: &[[u8; 32]], root: &[u8; 32]) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| leaf_hash(&(i as u64).to_be_bytes()))
            .collect()
    }

    #[test]
    fn every_leaf_of_every_tree_size_proves_and_nothing_else_does() {
        for n in 1..=33 {
            let l = leaves(n);
            let r = root(&l);
            for i in 0..n {
                let p = audit_path(i, &l);
                assert!(p.len() <= 6, "n={n} i={i}");
                assert!(verify(i as u64, n as u64, &l[i], &p, &r), "n={n} i={i}");
                // Another leaf, index, size or root does not.
                let other = leaf_hash(b"not a leaf");
                assert!(!verify(i as u64, n as u64, &other, &p, &r));
                if n > 1 {
                    assert!(
                        !verify(((i + 1) % n) as u64, n as u64, &l[i], &p, &r),
                        "n={n} i={i}"
                    );
                }
                assert!(!verify(i as u64, n as u64, &l[i], &p, &leaf_hash(b"x")));
            }
        }
    }

    #[test]
    fn the_root_matches_rfc_6962_by_hand() {
        let l = leaves(3);
        let expected = node_hash(&node_hash(&l[0], &l[1]), &l[2]);
        assert_eq!(root(&l), expected);
        assert_eq!(root(&l[..1]), l[0]);
        assert_eq!(root(&[]), <[u8; 32]>::from(Sha256::digest([])));
    }
}
