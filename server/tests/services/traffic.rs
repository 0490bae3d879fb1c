//! Traffic in the background: [`Reader`] reads a session, [`PublishLoop`]
//! publishes and records every answer.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_client::{Connect, Published, Publisher, Seq, ServerFrame, Session};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Node;

/// How long a publish may take before the test calls it a hang.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// What a [`Reader`] saw.
#[derive(Debug)]
pub struct Received {
    /// Every notification's seq, in arrival order (across reconnects).
    pub seqs: Vec<Seq>,
    /// How the last session ended, when it did (`None`: still open).
    pub ended: Option<herald_client::Error>,
    /// Sessions reopened after a 1013 close.
    pub reconnects: usize,
}

impl Received {
    /// Panics unless the seqs are exactly `1..=last`, once each, in order.
    pub fn assert_exactly(&self, who: &str, last: Seq) {
        match &self.ended {
            Some(e) => assert_exactly_once(&format!("{who} (the session ended: {e})"), &self.seqs, 1, last),
            None => assert_exactly_once(who, &self.seqs, 1, last),
        }
    }
}

/// Panics unless `seqs` is exactly `first..=last`, naming the first problem.
pub fn assert_exactly_once(who: &str, seqs: &[Seq], first: Seq, last: Seq) {
    let mut expected = first;
    for (i, seq) in seqs.iter().enumerate() {
        if *seq != expected {
            let around = &seqs[i.saturating_sub(3)..(i + 4).min(seqs.len())];
            let kind = if *seq < expected { "a duplicate or out-of-order seq" } else { "a gap" };
            panic!(
                "{who}: {kind} at position {i}: expected seq {expected}, got {seq} (around: {around:?}); \
                 received {} notifications, wanted {first}..={last}",
                seqs.len()
            );
        }
        expected += 1;
    }
    assert_eq!(
        expected - 1,
        last,
        "{who}: received {first}..={} ({} notifications), wanted up to {last}",
        expected - 1,
        seqs.len()
    );
}

/// Reads one session's notifications in a task of its own.
pub struct Reader {
    target: watch::Sender<Option<(Seq, tokio::time::Instant)>>,
    last: Arc<AtomicI64>,
    task: JoinHandle<Received>,
}

/// How long a reader keeps listening, after the last expected seq, for
/// notifications that should not come.
pub const QUIET: Duration = Duration::from_millis(1500);

impl Reader {
    /// Reads `session`. With `resume` (`ws` base and token), a session the
    /// server closes with 1013 is reopened with `since` (as a client should).
    pub fn spawn(session: Session, resume: Option<(String, String)>) -> Reader {
        let (target, rx) = watch::channel(None);
        let last = Arc::new(AtomicI64::new(0));
        let task = tokio::spawn(read_loop(session, resume, rx, last.clone()));
        Reader { target, last, task }
    }

    /// A reader that reopens on 1013 against `node`.
    pub fn on(node: &Node, user: &str, session: Session) -> Reader {
        Reader::spawn(session, Some((node.ws(), node.token(user))))
    }

    /// The newest seq received so far.
    pub fn last_seen(&self) -> Seq {
        self.last.load(Ordering::SeqCst)
    }

    /// Waits until `last` has arrived (at most `within`), then listens
    /// [`QUIET`] longer for anything extra, and returns what arrived.
    pub async fn until(self, last: Seq, within: Duration) -> Received {
        let _ = self.target.send(Some((last, tokio::time::Instant::now() + within)));
        match tokio::time::timeout(within + QUIET + Duration::from_secs(5), self.task).await {
            Ok(received) => received.expect("the reader panicked"),
            Err(_) => panic!("the reader did not finish"),
        }
    }

    /// Waits (at most `within`) for the session to end on its own.
    pub async fn ended(self, within: Duration) -> Received {
        match tokio::time::timeout(within, self.task).await {
            Ok(received) => received.expect("the reader panicked"),
            Err(_) => panic!("the session did not end within {within:?}"),
        }
    }
}

/// [`Reader::until`] for several readers at once (their quiet periods overlap).
pub async fn all_until(readers: Vec<(String, Reader)>, last: Seq, within: Duration) -> Vec<(String, Received)> {
    let waits = readers.into_iter().map(|(name, reader)| async move { (name, reader.until(last, within).await) });
    futures_util::future::join_all(waits).await
}

async fn read_loop(
    mut session: Session,
    resume: Option<(String, String)>,
    target: watch::Receiver<Option<(Seq, tokio::time::Instant)>>,
    last: Arc<AtomicI64>,
) -> Received {
    let mut received = Received { seqs: Vec::new(), ended: None, reconnects: 0 };
    loop {
        let goal = *target.borrow();
        if let Some((want, deadline)) = goal {
            let newest = received.seqs.last().copied().unwrap_or(0);
            if newest >= want || tokio::time::Instant::now() >= deadline {
                // Anything more is a duplicate or a notification nobody published.
                while let Ok(Some(frame)) = session.next_frame_within(QUIET).await {
                    if let ServerFrame::Notification(n) = frame {
                        received.seqs.push(n.seq);
                    }
                }
                return received;
            }
        }
        match session.next_frame_within(Duration::from_millis(200)).await {
            Ok(Some(ServerFrame::Notification(n))) => {
                last.store(n.seq, Ordering::SeqCst);
                received.seqs.push(n.seq);
            }
            Ok(_) => {}
            Err(herald_client::Error::Closed { code: 1013, .. }) if resume.is_some() => {
                let (ws, token) = resume.clone().unwrap();
                let since = received.seqs.last().copied().unwrap_or(0);
                match Connect::new(ws, token).since(since).connect().await {
                    Ok(s) => {
                        session = s;
                        received.reconnects += 1;
                    }
                    Err(e) => {
                        received.ended = Some(e);
                        return received;
                    }
                }
            }
            Err(e) => {
                received.ended = Some(e);
                return received;
            }
        }
    }
}

/// One publish with a deadline: what was stored, or why it failed (a hang
/// is an error too).
pub async fn publish_within(
    publisher: &Publisher,
    user: &str,
    payload: serde_json::Value,
) -> Result<Published, String> {
    match tokio::time::timeout(PUBLISH_TIMEOUT, publisher.publish_one(user, "cluster", payload)).await {
        Ok(Ok(published)) => Ok(published),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PUBLISH_TIMEOUT:?}")),
    }
}

/// Publishes to one user, one at a time, until stopped; records every answer.
pub struct PublishLoop {
    stop: watch::Sender<bool>,
    progress: Arc<Progress>,
    task: JoinHandle<Vec<Result<Published, String>>>,
}

/// What a [`PublishLoop`] has done so far.
#[derive(Default)]
struct Progress {
    acked: AtomicI64,
    last_seq: AtomicI64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl PublishLoop {
    /// Publishes `{"n": i}` through `publisher`, pausing `pause` between.
    pub fn spawn(publisher: Publisher, user: &str, pause: Duration) -> PublishLoop {
        let (stop, rx) = watch::channel(false);
        let progress = Arc::new(Progress::default());
        let user = user.to_string();
        let shared = progress.clone();
        let task = tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0u64;
            while !*rx.borrow() {
                i += 1;
                let answer = publish_within(&publisher, &user, serde_json::json!({ "n": i })).await;
                match &answer {
                    Ok(published) => {
                        shared.last_seq.store(published.seq, Ordering::SeqCst);
                        shared.acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => *shared.last_error.lock().unwrap() = Some(e.clone()),
                }
                answers.push(answer);
                tokio::time::sleep(pause).await;
            }
            answers
        });
        PublishLoop { stop, progress, task }
    }

    /// How many publishes were acknowledged so far.
    pub fn acked(&self) -> i64 {
        self.progress.acked.load(Ordering::SeqCst)
    }

    /// The seq of the newest acknowledged publish.
    pub fn last_seq(&self) -> Seq {
        self.progress.last_seq.load(Ordering::SeqCst)
    }

    /// Waits until `n` publishes were acknowledged (at most `within`).
    pub async fn wait_acked(&self, n: i64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.acked() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} publishes acknowledged within {within:?}; the last error: {:?}",
                self.acked(),
                self.progress.last_error.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops after the publish in flight; every answer, in order.
    pub async fn stop(self) -> Vec<Result<Published, String>> {
        let _ = self.stop.send(true);
        self.task.await.expect("the publish loop panicked")
    }
}
