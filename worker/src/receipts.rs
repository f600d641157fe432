//! The node's receipt book: every receipt this node signed, chained (sequence number and
//! previous hash) and appended to files in the data directory before its result leaves, so
//! a restart continues the chain where it ended and the owner can later prove, receipt by
//! receipt, what the ledger credited (`stellar receipts verify`).
//!
//! ```text
//!  finished call ─▶ sign(seq + 1, prev = head) ─▶ append to receipts/<first seq>.log ─▶ send
//!  restart ─▶ last whole record of the newest file = the head (a torn tail is cut off)
//! ```
//!
//! Records are a 4-byte big-endian length and the encoded `Receipt`. A file holds
//! [`SEGMENT_RECEIPTS`] receipts; the newest [`KEPT_SEGMENTS`] files are kept.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use prost::Message as _;
use stellar_proto::receipts::{GENESIS, receipt_hash};
use stellar_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::identity::Identity;

/// Receipts per file.
pub const SEGMENT_RECEIPTS: u64 = 65_536;
/// Files kept (about two million receipts); older ones are removed.
pub const KEPT_SEGMENTS: usize = 32;
/// Largest record read back (a receipt is a few hundred bytes).
const MAX_RECORD: usize = 64 * 1024;

/// The signing end of this node's receipt chain.
pub struct ReceiptBook {
    dir: PathBuf,
    identity: Identity,
    seq: u64,
    head: [u8; 32],
    file: Option<File>,
}

impl ReceiptBook {
    /// Opens the book in `dir` (made if missing), continuing the chain it holds.
    pub fn open(dir: &Path, identity: Identity) -> Result<ReceiptBook> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let mut book = ReceiptBook {
            dir: dir.to_path_buf(),
            identity,
            seq: 0,
            head: GENESIS,
            file: None,
        };
        if let Some((_, path)) = segments(dir)?.pop() {
            let (receipts, whole) = read_segment(&path)?;
            if let Some(last) = receipts.last() {
                book.seq = last.seq;
                book.head = receipt_hash(last);
            }
            let f = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(Error::io(&path))?;
            let len = f.metadata().map_err(Error::io(&path))?.len();
            if whole < len {
                tracing::warn!(path = %path.display(), cut = len - whole, "receipt file ended in a torn record; cut it off");
                f.set_len(whole).map_err(Error::io(&path))?;
            }
            book.file = Some(f);
        }
        Ok(book)
    }

    /// The last receipt's sequence number (0 = none yet).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Where the book is kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Chains, signs and keeps `r` (its `seq`, `prev_hash` and `signature` are set here).
    pub fn sign(&mut self, mut r: pb::Receipt) -> Result<pb::Receipt> {
        r.seq = self.seq + 1;
        r.prev_hash = self.head.to_vec();
        r.signature = self.identity.sign_receipt(&r).to_vec();
        if self.file.is_none() || (r.seq - 1).is_multiple_of(SEGMENT_RECEIPTS) {
            self.file = Some(self.new_segment(r.seq)?);
        }
        let bytes = r.encode_to_vec();
        let mut rec = Vec::with_capacity(4 + bytes.len());
        rec.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        rec.extend_from_slice(&bytes);
        let f = self.file.as_mut().expect("opened above");
        f.write_all(&rec).map_err(Error::io(&self.dir))?;
        self.seq = r.seq;
        self.head = receipt_hash(&r);
        Ok(r)
    }

    fn new_segment(&self, first: u64) -> Result<File> {
        let path = self.dir.join(format!("{first:020}.log"));
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(Error::io(&path))?;
        let mut all = segments(&self.dir)?;
        while all.len() > KEPT_SEGMENTS {
            let (_, old) = all.remove(0);
            let _ = std::fs::remove_file(&old);
        }
        Ok(f)
    }
}

/// The receipts kept in `dir` with sequence numbers in `from..=to`, in order.
pub fn read_range(dir: &Path, from: u64, to: u64) -> Result<Vec<pb::Receipt>> {
    let mut out = Vec::new();
    let all = segments(dir)?;
    for (i, (first, path)) in all.iter().enumerate() {
        let next = all.get(i + 1).map_or(u64::MAX, |(f, _)| *f);
        if next <= from || *first > to {
            continue;
        }
        let (receipts, _) = read_segment(path)?;
        out.extend(
            receipts
                .into_iter()
                .filter(|r| (from..=to).contains(&r.seq)),
        );
    }
    Ok(out)
}

/// What a node's own receipts say about one period, once checked against the ledger's proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodCheck {
    /// The period's leaf, as the ledger committed it and the receipts recompute it.
    pub leaf: pb::PeriodLeaf,
    /// The period's Merkle root.
    pub root: [u8; 32],
    /// Leaves in the period's tree.
    pub tree_size: u64,
}

/// Why a node's receipts and the ledger's proof disagree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofMismatch {
    /// The proof is malformed (no leaf, a root or path hash not 32 bytes).
    #[error("the proof is malformed: {0}")]
    Malformed(String),
    /// The leaf does not hash up to the committed root.
    #[error("the ledger's leaf for this node is not in the period's committed root")]
    NotInRoot,
    /// The book lacks receipts the ledger recorded.
    #[error(
        "this data dir keeps {kept} of the {wanted} receipts {first}..={last} the ledger recorded (another data dir, or removed)"
    )]
    Missing {
        /// Receipts found.
        kept: u64,
        /// Receipts the leaf covers.
        wanted: u64,
        /// Its first sequence number.
        first: u64,
        /// Its last.
        last: u64,
    },
    /// A kept receipt is not signed by this node's key or does not chain to the one before.
    #[error("receipt {seq} in the book is not signed by this node or breaks the chain")]
    Broken {
        /// Its sequence number.
        seq: u64,
    },
    /// The receipts add up to another leaf than the ledger's.
    #[error(
        "the ledger's leaf differs from what the receipts add up to: ledger {ledger:?}, receipts {receipts:?}"
    )]
    Differs {
        /// As committed.
        ledger: Box<pb::PeriodLeaf>,
        /// As the receipts recompute it.
        receipts: Box<pb::PeriodLeaf>,
    },
}

/// Checks the ledger's proof for one period against the receipts kept in `dir`, signed by
/// `public_key`: the leaf is in the committed root, and the kept receipts (every one in
/// the leaf's range, signed and chained) add up to exactly that leaf.
pub fn verify_period(
    dir: &Path,
    public_key: &[u8],
    proof: &pb::GetReceiptProofResponse,
) -> std::result::Result<PeriodCheck, ProofMismatch> {
    use stellar_proto::receipts as r;
    let malformed = |what: &str| ProofMismatch::Malformed(what.to_string());
    let leaf = proof.leaf.clone().ok_or_else(|| malformed("no leaf"))?;
    let root: [u8; 32] = proof
        .root
        .as_slice()
        .try_into()
        .map_err(|_| malformed("root is not 32 bytes"))?;
    let path = proof
        .audit_path
        .iter()
        .map(|h| <[u8; 32]>::try_from(h.as_slice()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| malformed("an audit path hash is not 32 bytes"))?;
    if !stellar_proto::merkle::verify(
        proof.index,
        proof.tree_size,
        &r::leaf_hash(&leaf),
        &path,
        &root,
    ) {
        return Err(ProofMismatch::NotInRoot);
    }
    let (first, last) = (leaf.first_seq, leaf.last_seq);
    let kept = read_range(dir, first, last)
        .map_err(|e| ProofMismatch::Malformed(format!("reading the receipt book: {e}")))?;
    let wanted = last.saturating_sub(first) + 1;
    if kept.len() as u64 != wanted || first == 0 {
        return Err(ProofMismatch::Missing {
            kept: kept.len() as u64,
            wanted,
            first,
            last,
        });
    }
    let mut mine = pb::PeriodLeaf {
        node: leaf.node,
        period: leaf.period,
        ..Default::default()
    };
    for (i, rc) in kept.iter().enumerate() {
        let chained = i == 0 || rc.prev_hash == receipt_hash(&kept[i - 1]).to_vec();
        if !chained || !r::signature_checks(public_key, rc) {
            return Err(ProofMismatch::Broken { seq: rc.seq });
        }
        r::add_to_leaf(&mut mine, &r::usage_record(rc));
    }
    if r::leaf_message(&mine) != r::leaf_message(&leaf) {
        return Err(ProofMismatch::Differs {
            ledger: Box::new(leaf),
            receipts: Box::new(mine),
        });
    }
    Ok(PeriodCheck {
        leaf,
        root,
        tree_size: proof.tree_size,
    })
}

/// Receipt files by their first sequence number, oldest first.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let path = e.map_err(Error::io(dir))?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The whole records of one file and the length they span.
fn read_segment(path: &Path) -> Result<(Vec<pb::Receipt>, u64)> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(Error::io(path))?;
    let (mut out, mut at) = (Vec::new(), 0usize);
    while at + 4 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let Some(rec) = bytes
            .get(at + 4..at + 4 + len)
            .filter(|_| len <= MAX_RECORD)
        else {
            break;
        };
        let Ok(r) = pb::Receipt::decode(rec) else {
            break;
        };
        out.push(r);
        at += 4 + len;
    }
    Ok((out, at as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(fuel: u64) -> pb::Receipt {
        pb::Receipt {
            fuel,
            ..Default::default()
        }
    }

    #[test]
    fn the_chain_survives_a_restart_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::load_or_create(dir.path()).unwrap();
        let book_dir = dir.path().join("receipts");
        let mut book = ReceiptBook::open(&book_dir, id.clone()).unwrap();
        let a = book.sign(receipt(10)).unwrap();
        let b = book.sign(receipt(20)).unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(a.prev_hash, GENESIS.to_vec());
        assert_eq!(b.prev_hash, receipt_hash(&a).to_vec());
        assert!(stellar_proto::receipts::signature_checks(
            &id.public_key(),
            &b
        ));
        drop(book);
        // A crash mid-append leaves half a record: it is cut and the chain goes on from b.
        let file = segments(&book_dir).unwrap().pop().unwrap().1;
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(&[0, 0, 1, 0, 9, 9]).unwrap();
        let mut book = ReceiptBook::open(&book_dir, id).unwrap();
        assert_eq!(book.seq(), 2);
        let c = book.sign(receipt(30)).unwrap();
        assert_eq!((c.seq, c.prev_hash.clone()), (3, receipt_hash(&b).to_vec()));
        let kept = read_range(&book_dir, 2, 3).unwrap();
        assert_eq!(kept, vec![b, c]);
    }
}
