//! What a finished call leaves behind for the ledger: its receipt, signed into the node's
//! chain, and kept until a gateway says it is settled (recorded, or refused for good).
//!
//! ```text
//!  call ends ─▶ Receipt{ticket, output hash, usage} ─▶ book.sign (seq, prev, ed25519)
//!           ─▶ result + receipt to the gateway; receipt kept by seq
//!  every second: receipts unsettled for RESEND_AFTER_TICKS ─▶ UsageReport (in seq order)
//!  UsageAck{seqs} ─▶ forgotten; every receipt up to the first unsettled one is settled:
//!                   that watermark goes to receipts/settled (each tick it moved)
//!  start ─▶ the book's receipts past the watermark are unsettled again (a crash between
//!           signing and settling loses no usage, and leaves no gap in the chain)
//! ```

use sha2::{Digest, Sha256};
use stellar_proto::v1 as pb;

use crate::receipts::ReceiptBook;

/// Usage ticks (one a second) a receipt waits for settlement before it is sent again.
const RESEND_AFTER_TICKS: u32 = 2;
/// Receipts kept for settlement at most; past it the oldest is dropped (it stays in the
/// receipt book, where `stellar receipts verify` finds it).
const MAX_UNSETTLED: usize = 200_000;

/// The file holding the settled watermark, in the book's directory.
const WATERMARK: &str = "settled";

/// The node's receipt book and the receipts not yet settled, by sequence number.
pub(super) struct Settlement {
    pub(super) book: ReceiptBook,
    unsettled: std::collections::BTreeMap<u64, (pb::Receipt, u32)>,
    /// The watermark last written to disk.
    saved: u64,
    /// The last receipt signed (what a cheating test build replays).
    pub(super) last: Option<pb::Receipt>,
}

impl Settlement {
    /// Opens settlement over `book`: the receipts after the saved watermark are unsettled.
    pub(super) fn open(book: ReceiptBook) -> crate::Result<Settlement> {
        let path = book.dir().join(WATERMARK);
        let saved = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
            .min(book.seq());
        let mut s = Settlement {
            unsettled: Default::default(),
            saved,
            book,
            last: None,
        };
        if saved < s.book.seq() {
            let last = s.book.seq().min(saved + MAX_UNSETTLED as u64);
            let pending = crate::receipts::read_range(s.book.dir(), saved + 1, last)?;
            tracing::info!(
                receipts = pending.len(),
                from = saved + 1,
                "receipts signed before the restart are sent again until settled"
            );
            for r in pending {
                s.unsettled.insert(r.seq, (r, 0));
            }
        }
        Ok(s)
    }

    /// Every receipt up to this one is settled.
    fn watermark(&self) -> u64 {
        self.unsettled
            .keys()
            .next()
            .map_or(self.book.seq(), |first| first - 1)
    }

    /// Writes the watermark when it moved (each resend tick): best effort, a stale one only
    /// means receipts sent again after a restart (the ledger answers DUPLICATE).
    pub(super) fn save_watermark(&mut self) {
        let w = self.watermark();
        if w == self.saved {
            return;
        }
        let dir = self.book.dir();
        let tmp = dir.join(format!("{WATERMARK}.tmp"));
        let written = std::fs::write(&tmp, w.to_string())
            .and_then(|()| std::fs::rename(&tmp, dir.join(WATERMARK)));
        match written {
            Ok(()) => self.saved = w,
            Err(e) => tracing::warn!(error = %e, "could not save the receipts' settled watermark"),
        }
    }

    fn keep(&mut self, r: pb::Receipt) {
        if self.unsettled.len() >= MAX_UNSETTLED {
            tracing::warn!(
                kept = MAX_UNSETTLED,
                "receipts are not being settled; dropping the oldest from the resend queue"
            );
            self.unsettled.pop_first();
        }
        self.last = Some(r.clone());
        self.unsettled.insert(r.seq, (r, 0));
    }

    /// Forgets receipts a gateway settled.
    pub(super) fn settled(&mut self, seqs: &[u64]) {
        for s in seqs {
            self.unsettled.remove(s);
        }
    }

    /// Receipts still unsettled.
    pub(super) fn unsettled(&self) -> usize {
        self.unsettled.len()
    }

    /// The receipts to send now (all of them when `all`), in sequence order, ageing the rest.
    pub(super) fn due(&mut self, all: bool) -> Vec<pb::Receipt> {
        let mut out = Vec::new();
        for (r, age) in self.unsettled.values_mut() {
            *age += 1;
            if all || *age > RESEND_AFTER_TICKS {
                out.push(r.clone());
            }
        }
        out
    }
}

/// Whether `ticket` is the one for this call on this node: issued for this invocation id,
/// node, function and input (a worker signs only what it ran).
pub(super) fn ticket_matches(
    ticket: Option<&pb::Ticket>,
    inv: &pb::Invocation,
    node: u64,
    (tenant, function): (&str, &str),
) -> Result<(), String> {
    let Some(t) = ticket else {
        return Err("the invocation carries no ticket".into());
    };
    let input =
        stellar_proto::receipts::input_hash(&inv.stdin, &inv.args, &inv.env, &inv.random_seed);
    if t.invocation_id != inv.invocation_id
        || t.node != node
        || t.tenant != tenant
        || t.function != function
        || t.input_sha256 != input
    {
        return Err("the invocation's ticket is for another call, node or input".into());
    }
    Ok(())
}

/// Hands a finished call's result (both runtimes), with its signed receipt, to `send`. A
/// receipt that cannot be kept (the data directory refused the write) is not sent: the node
/// is paid only for what it can later prove. `send` runs while the receipt book is held, so
/// results leave in the order their receipts were chained (the ledger takes a chain in
/// order; concurrent calls finishing out of order would otherwise arrive as GAPs).
pub(super) fn finished(
    (settlement, cheat): (&std::sync::Mutex<Settlement>, &super::cheats::Cheater),
    ticket: Option<pb::Ticket>,
    invocation_id: Vec<u8>,
    m: &crate::sandbox::Metering,
    result: &Result<(), crate::sandbox::InvokeError>,
    (mut stdout, stderr): (Vec<u8>, Vec<u8>),
    send: impl FnOnce(pb::InvocationResult),
) {
    let mut fuel = m.fuel;
    cheat.tamper(&mut stdout, &mut fuel);
    let (error_code, error_message) = match result {
        Ok(()) => (String::new(), String::new()),
        Err(e) => (e.code().to_string(), e.to_string()),
    };
    let output_sha256 = Sha256::digest(&stdout).to_vec();
    let mut r = pb::InvocationResult {
        invocation_id,
        stdout,
        stderr,
        error_code,
        error_message,
        receipt: None,
    };
    let Some(t) = ticket else {
        send(r);
        return;
    };
    let unsigned = pb::Receipt {
        ticket: Some(t),
        output_sha256,
        fuel,
        wall_us: m.wall_us,
        peak_memory_bytes: m.peak_memory_bytes,
        bytes_in: m.bytes_in,
        bytes_out: m.bytes_out,
        exit_code: m.exit_code,
        cpu_ns: m.cpu_ns,
        pids_peak: m.pids_peak.min(u64::from(u32::MAX)) as u32,
        ..Default::default()
    };
    let Ok(mut s) = settlement.lock() else {
        send(r);
        return;
    };
    match s.book.sign(unsigned) {
        Ok(receipt) => {
            s.keep(receipt.clone());
            r.receipt = Some(receipt);
        }
        Err(e) => {
            tracing::error!(error = %e, "could not keep a receipt; its usage goes unbilled");
        }
    }
    send(r);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `finished` with an honest worker, returning what it sends.
    fn finish(
        s: &std::sync::Mutex<Settlement>,
        ticket: Option<pb::Ticket>,
        stdout: &[u8],
    ) -> pb::InvocationResult {
        let mut sent = None;
        finished(
            (s, &super::super::cheats::Cheater::default()),
            ticket,
            vec![1],
            &crate::sandbox::Metering::default(),
            &Ok(()),
            (stdout.to_vec(), Vec::new()),
            |r| sent = Some(r),
        );
        sent.expect("a result is always sent")
    }

    #[test]
    fn receipts_are_kept_until_settled_and_resent_in_order_when_late() {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::identity::Identity::load_or_create(dir.path()).unwrap();
        let book = ReceiptBook::open(&dir.path().join("receipts"), id.clone()).unwrap();
        let s = std::sync::Mutex::new(Settlement::open(book).unwrap());
        for _ in 0..3 {
            let r = finish(&s, Some(pb::Ticket::default()), b"out");
            assert!(r.receipt.is_some());
        }
        let mut s = s.into_inner().unwrap();
        // Fresh receipts wait for their settlement.
        assert!(s.due(false).is_empty());
        assert!(s.due(false).is_empty());
        // Late: sent again in sequence order, each tick until settled.
        s.settled(&[2]);
        let late: Vec<u64> = s.due(false).iter().map(|r| r.seq).collect();
        assert_eq!(late, vec![1, 3]);
        // A new connection sends everything unsettled at once.
        s.settled(&[1]);
        assert_eq!(s.due(true).len(), 1);
        s.settled(&[3]);
        assert!(s.due(true).is_empty());
        // A call without a ticket leaves no receipt.
        let s = std::sync::Mutex::new(s);
        let r = finish(&s, None, b"");
        assert!(r.receipt.is_none());
        assert_eq!(s.lock().unwrap().book.seq(), 3);
    }

    #[test]
    fn concurrent_calls_send_their_results_in_chain_order() {
        // Calls finish on many threads at once; the stream must carry their receipts in the
        // order they were chained, or the ledger sees GAPs (trust-bench's first run).
        let dir = tempfile::tempdir().unwrap();
        let id = crate::identity::Identity::load_or_create(dir.path()).unwrap();
        let book = ReceiptBook::open(&dir.path().join("receipts"), id).unwrap();
        let s = std::sync::Mutex::new(Settlement::open(book).unwrap());
        let stream = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        finished(
                            (&s, &super::super::cheats::Cheater::default()),
                            Some(pb::Ticket::default()),
                            vec![1],
                            &crate::sandbox::Metering::default(),
                            &Ok(()),
                            (Vec::new(), Vec::new()),
                            |r| {
                                // Whatever runs between the lock and the stream.
                                std::thread::yield_now();
                                stream.lock().unwrap().push(r.receipt.unwrap().seq);
                            },
                        );
                    }
                });
            }
        });
        let sent = stream.into_inner().unwrap();
        assert_eq!(sent, (1..=800).collect::<Vec<u64>>());
    }

    #[test]
    fn receipts_unsettled_at_a_crash_are_sent_again_after_the_restart() {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::identity::Identity::load_or_create(dir.path()).unwrap();
        let open = || {
            let book = ReceiptBook::open(&dir.path().join("receipts"), id.clone()).unwrap();
            std::sync::Mutex::new(Settlement::open(book).unwrap())
        };
        let s = open();
        for _ in 0..4 {
            finish(&s, Some(pb::Ticket::default()), b"");
        }
        {
            let mut s = s.lock().unwrap();
            s.settled(&[1, 2, 4]);
            s.save_watermark();
        }
        drop(s); // a crash: 3 and 4 were never settled as far as the disk knows (4 was, but 3 not)
        let mut s = open().into_inner().unwrap();
        let again: Vec<u64> = s.due(true).iter().map(|r| r.seq).collect();
        assert_eq!(again, vec![3, 4]);
        s.settled(&[3, 4]);
        s.save_watermark();
        let mut s = open().into_inner().unwrap();
        assert!(s.due(true).is_empty());
        assert_eq!(s.book.seq(), 4);
    }
}
