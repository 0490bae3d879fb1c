//! Did every user get exactly what was published to them, in order?
//!
//! Users are fresh (namespaced by `--prefix`), so a user's seqs after its
//! first welcome's `last_seq` all come from this run. A client checks on the
//! fly that each frame is `last + 1` (counting duplicates and skipped seqs);
//! here its final `last` is compared with the publishes the server
//! acknowledged for its user.

use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

use crate::fleet::Report;

/// Acknowledged notifications per client (user), by global index.
pub struct Expected(Vec<AtomicU32>);

impl Expected {
    pub fn new(clients: usize) -> Expected {
        Expected((0..clients).map(|_| AtomicU32::new(0)).collect())
    }

    pub fn add(&self, j: u32) {
        self.0[j as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, j: usize) -> u64 {
        self.0[j].load(Ordering::Relaxed) as u64
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|a| a.load(Ordering::Relaxed) as u64).sum()
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Verification {
    /// Clients that were compared (connected at least once).
    pub users: u64,
    pub never_connected: u64,
    /// Notifications the server acknowledged to those users.
    pub expected: u64,
    /// Distinct seqs that reached them.
    pub received: u64,
    /// Acknowledged but never received.
    pub lost: u64,
    /// Received more than acknowledged (only possible when a publish failed
    /// on the client side after the server committed it).
    pub unacknowledged: u64,
    /// Frames repeating a seq already received.
    pub duplicates: u64,
    /// Seqs skipped over (out of order or missing in the middle).
    pub gaps: u64,
    pub ok: bool,
}

/// Compares the workers' per-client seqs with what was acknowledged.
/// `publish_errors`: publishes whose outcome is unknown (they may have committed).
pub fn verify(reports: &[Report], expected: &Expected, publish_errors: u64) -> Verification {
    let mut v = Verification::default();
    for r in reports {
        v.duplicates += r.stats.duplicates;
        v.gaps += r.stats.gaps;
        for ((&j, &start), &last) in r.clients.iter().zip(&r.start).zip(&r.last) {
            if start < 0 {
                v.never_connected += 1;
                continue;
            }
            v.users += 1;
            let want = expected.get(j as usize);
            let got = (last - start).max(0) as u64;
            v.expected += want;
            v.received += got;
            v.lost += want.saturating_sub(got);
            v.unacknowledged += got.saturating_sub(want);
        }
    }
    v.ok = v.lost == 0 && v.duplicates == 0 && v.gaps == 0 && (v.unacknowledged == 0 || publish_errors > 0);
    v
}

impl Verification {
    /// The summary's paragraph: passed or FAILED, and [`Verification::line`].
    pub fn paragraph(&self) -> String {
        format!("**Delivery check: {}** — {}\n\n", if self.ok { "passed" } else { "FAILED" }, self.line())
    }

    /// One line for the summary and the console.
    pub fn line(&self) -> String {
        format!(
            "{} users: {} notifications expected, {} received, {} lost, {} duplicates, {} gaps, {} unacknowledged{}",
            self.users,
            self.expected,
            self.received,
            self.lost,
            self.duplicates,
            self.gaps,
            self.unacknowledged,
            if self.never_connected > 0 {
                format!(" ({} clients never connected)", self.never_connected)
            } else {
                String::new()
            }
        )
    }

    /// Says it loudly when something was lost or repeated.
    pub fn shout(&self) {
        if self.ok {
            eprintln!("verified: {}", self.line());
        } else {
            eprintln!("\n!!!!!!!! DELIVERY CHECK FAILED !!!!!!!!\n!!! {}\n", self.line());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(clients: Vec<u32>, start: Vec<i64>, last: Vec<i64>) -> Report {
        Report { clients, start, last, ..Report::default() }
    }

    #[test]
    fn compares_each_users_seqs_with_the_acknowledged_publishes() {
        let expected = Expected::new(3);
        for j in [0, 0, 1] {
            expected.add(j);
        }
        let ok =
            verify(&[report(vec![0, 1], vec![0, 5], vec![2, 6]), report(vec![2], vec![-1], vec![-1])], &expected, 0);
        assert!(ok.ok, "{ok:?}");
        assert_eq!((ok.users, ok.expected, ok.received, ok.never_connected), (2, 3, 3, 1));
        let lost = verify(&[report(vec![0, 1], vec![0, 5], vec![1, 6])], &expected, 0);
        assert!(!lost.ok);
        assert_eq!(lost.lost, 1);
    }
}
