//! Session tests against a recording transport: the loop's states and timeouts, run on
//! tokio's paused clock (`start_paused`), so a 90 s idle timeout takes milliseconds and
//! every deadline is checked exactly, not on the wall clock.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use futures::{Sink, Stream};
use imgate_proto::{Encoding, Message, Send};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;
use crate::auth::Identity;
use crate::store::Draft;

/// A transport that hands the session frames from a channel and records each flushed
/// batch of what the session wrote. While `stalled`, it takes no frame: a client that
/// stopped reading.
struct Recorder {
    incoming: mpsc::UnboundedReceiver<ClientFrame>,
    batch: Vec<ServerFrame>,
    flushed: Arc<Mutex<Vec<Vec<ServerFrame>>>>,
    stalled: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl Sink<ToClient> for Recorder {
    type Error = std::io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.stalled.load(Ordering::SeqCst) {
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: ToClient) -> std::io::Result<()> {
        let bytes = item.encode(Encoding::Msgpack);
        let frame = imgate_proto::decode(&bytes, Encoding::Msgpack).unwrap();
        self.get_mut().batch.push(frame);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.batch.is_empty() {
            let batch = std::mem::take(&mut this.batch);
            this.flushed.lock().unwrap().push(batch);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl Stream for Recorder {
    type Item = Result<Incoming, InError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .incoming
            .poll_recv(cx)
            .map(|f| f.map(|f| Ok(Incoming::Frame(Box::new(f)))))
    }
}

/// One session on a memory-store gateway, and the handles a test drives it with.
struct Harness {
    shared: Arc<Shared>,
    to_session: Option<mpsc::UnboundedSender<ClientFrame>>,
    flushed: Arc<Mutex<Vec<Vec<ServerFrame>>>>,
    stalled: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Waker>>>,
    session: JoinHandle<()>,
}

fn alice() -> Preauth {
    Preauth {
        identity: Identity {
            uid: "alice".into(),
            admin: false,
            exp: u64::MAX,
            iat: None,
        },
        device: None,
        resume: None,
        epoch: None,
    }
}

impl Harness {
    /// A session of `start` on a gateway configured by `args` (memory store always: the
    /// default on-disk store would open the user's data directory).
    async fn start(args: &[&str], start: Start) -> Harness {
        let mut all = vec!["--store", "memory"];
        all.extend_from_slice(args);
        let cfg = crate::config::parse_for_test(&all);
        let shared = crate::server::Gateway::new(cfg).await.unwrap().shared();
        Harness::on(shared, start)
    }

    fn on(shared: Arc<Shared>, start: Start) -> Harness {
        let (to_session, incoming) = mpsc::unbounded_channel();
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let stalled = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(Mutex::new(None));
        let recorder = Recorder {
            incoming,
            batch: Vec::new(),
            flushed: flushed.clone(),
            stalled: stalled.clone(),
            waker: waker.clone(),
        };
        let session = tokio::spawn(run(shared.clone(), recorder, Box::new(start), Profile::TCP));
        Harness {
            shared,
            to_session: Some(to_session),
            flushed,
            stalled,
            waker,
            session,
        }
    }

    fn send(&self, f: ClientFrame) {
        self.to_session.as_ref().unwrap().send(f).unwrap();
    }

    fn written(&self) -> Vec<ServerFrame> {
        self.flushed.lock().unwrap().concat()
    }

    /// Waits (on the paused clock) until the session wrote a frame matching `want`.
    async fn wait_for(&self, what: &str, want: impl Fn(&ServerFrame) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !self.written().iter().any(&want) {
            assert!(Instant::now() < deadline, "no {what}: {:?}", self.written());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn unstall(&self) {
        self.stalled.store(false, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }

    /// Waits for the session to end and returns the reason of its last frame, `bye`.
    async fn ended(mut self) -> (ByeReason, Vec<ServerFrame>) {
        (&mut self.session).await.unwrap();
        let written = self.written();
        match written.last() {
            Some(ServerFrame::Bye { reason }) => (*reason, written),
            other => panic!("the last frame is not bye: {other:?} in {written:?}"),
        }
    }
}

/// Stores a message from bob to alice, as another connection's send would.
async fn store_for_alice(shared: &Shared, id: &str) {
    let draft = Draft {
        id: id.into(),
        from: "bob".into(),
        to: Some("alice".into()),
        group: None,
        ts: 0,
        body: json!({"text": id}).into(),
    };
    shared.store.append(draft, &["alice".into()]).await.unwrap();
}

#[tokio::test]
async fn a_sends_answer_and_the_senders_own_copy_leave_in_one_write() {
    let h = Harness::start(&[], Start::Verified(alice())).await;
    h.send(ClientFrame::Send(Send {
        id: Some("m1".into()),
        to: Some("bob".into()),
        group: None,
        body: json!({"text": "hi"}),
    }));
    let deadline = Instant::now() + Duration::from_secs(5);
    let answered = loop {
        let batches = h.flushed.lock().unwrap().clone();
        if let Some(b) = batches
            .into_iter()
            .find(|b| b.iter().any(|f| matches!(f, ServerFrame::Sent { .. })))
        {
            break b;
        }
        assert!(Instant::now() < deadline, "no answer to the send");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        matches!(
            answered.as_slice(),
            [ServerFrame::Sent { id, .. }, ServerFrame::Msg(Message { from, .. })]
                if id == "m1" && from == "alice"
        ),
        "{answered:?}"
    );
    let mut h = h;
    h.to_session = None;
    h.session.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn no_login_within_the_login_timeout_is_bye_login_timeout() {
    let h = Harness::start(
        &["--login-timeout", "10s"],
        Start::AwaitLogin {
            device: None,
            resume: None,
            epoch: None,
        },
    )
    .await;
    let started = Instant::now();
    let (reason, written) = h.ended().await;
    assert_eq!(reason, ByeReason::LoginTimeout);
    assert_eq!(written.len(), 1, "nothing but the bye: {written:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn a_silent_connection_is_bye_idle_at_the_idle_timeout_and_a_ping_keeps_it() {
    let h = Harness::start(&["--idle-timeout", "90s"], Start::Verified(alice())).await;
    let started = Instant::now();
    h.wait_for("welcome", |f| matches!(f, ServerFrame::Welcome { .. }))
        .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    h.send(ClientFrame::Ping);
    h.wait_for("pong", |f| matches!(f, ServerFrame::Pong)).await;
    let (reason, _) = h.ended().await;
    assert_eq!(reason, ByeReason::Idle);
    // The ping at 60 s moved the deadline to 150 s.
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_secs(150) && lived < Duration::from_secs(152),
        "{lived:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_left_unacked_is_bye_ack_timeout_and_an_ack_clears_it() {
    let h = Harness::start(
        &["--ack-timeout", "30s", "--idle-timeout", "600s"],
        Start::Verified(alice()),
    )
    .await;
    h.wait_for("welcome", |f| matches!(f, ServerFrame::Welcome { .. }))
        .await;
    store_for_alice(&h.shared, "m1").await;
    h.wait_for("m1", |f| matches!(f, ServerFrame::Msg(m) if m.id == "m1"))
        .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    h.send(ClientFrame::Ack { seq: 1 });
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!h.session.is_finished(), "acked at 20 s: no ack timeout");
    store_for_alice(&h.shared, "m2").await;
    let sent = Instant::now();
    h.wait_for("m2", |f| matches!(f, ServerFrame::Msg(m) if m.id == "m2"))
        .await;
    let (reason, _) = h.ended().await;
    assert_eq!(reason, ByeReason::AckTimeout);
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(32),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_newer_connection_of_the_same_device_replaces_the_older_one() {
    let first = Harness::start(&[], Start::Verified(alice())).await;
    first
        .wait_for("welcome", |f| matches!(f, ServerFrame::Welcome { .. }))
        .await;
    let second = Harness::on(first.shared.clone(), Start::Verified(alice()));
    second
        .wait_for("welcome", |f| matches!(f, ServerFrame::Welcome { .. }))
        .await;
    let (reason, _) = first.ended().await;
    assert_eq!(reason, ByeReason::Replaced);
    assert!(!second.session.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_bye_slow_consumer_when_its_outbox_fills() {
    let h = Harness::start(
        &[
            "--outbox",
            "4",
            "--ack-timeout",
            "600s",
            "--idle-timeout",
            "600s",
        ],
        Start::Verified(alice()),
    )
    .await;
    h.wait_for("welcome", |f| matches!(f, ServerFrame::Welcome { .. }))
        .await;
    h.stalled.store(true, Ordering::SeqCst);
    for i in 0..8 {
        store_for_alice(&h.shared, &format!("m{i}")).await;
        tokio::task::yield_now().await;
    }
    let slow = &h.shared.hub.stats.slow_consumers;
    let deadline = Instant::now() + Duration::from_secs(5);
    while slow.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the full outbox kicked nobody");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The session is stuck in a write; the kick ends it, and its farewell goes out once
    // the client reads again.
    h.unstall();
    let (reason, _) = h.ended().await;
    assert_eq!(reason, ByeReason::SlowConsumer);
}

#[tokio::test(start_paused = true)]
async fn a_write_that_stalls_past_the_ack_timeout_is_bye_slow_consumer() {
    let h = Harness::start(
        &["--ack-timeout", "30s", "--idle-timeout", "600s"],
        Start::Verified(alice()),
    )
    .await;
    h.wait_for("welcome", |f| matches!(f, ServerFrame::Welcome { .. }))
        .await;
    h.stalled.store(true, Ordering::SeqCst);
    store_for_alice(&h.shared, "m1").await;
    let stalled = Instant::now();
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert!(!h.session.is_finished());
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.unstall();
    let (reason, _) = h.ended().await;
    assert_eq!(reason, ByeReason::SlowConsumer);
    assert!(stalled.elapsed() < Duration::from_secs(32));
}

#[tokio::test(start_paused = true)]
async fn shutdown_says_bye_shutdown() {
    let h = Harness::start(&[], Start::Verified(alice())).await;
    h.wait_for("welcome", |f| matches!(f, ServerFrame::Welcome { .. }))
        .await;
    h.shared.shutdown.cancel();
    h.shared.hub.kick_all(ByeReason::Shutdown);
    let (reason, _) = h.ended().await;
    assert_eq!(reason, ByeReason::Shutdown);
}

/// Log output kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, captured by one global subscriber. A global one,
/// not a thread's default: callsites cache their interest globally, so a per-thread
/// subscriber misses events whose callsite another test thread reached first.
fn captured_logs() -> &'static Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .event_format(crate::logging::WithConn {
                inner: tracing_subscriber::fmt::format().with_ansi(false),
                json: false,
            })
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        logs
    })
}

#[tokio::test(start_paused = true)]
async fn a_connections_log_lines_carry_its_uid_device_and_connection_id() {
    let logs = captured_logs();
    let mut pre = alice();
    pre.device = Some("span-phone".into());
    let h = Harness::start(&[], Start::Verified(pre)).await;
    h.wait_for("welcome", |f| matches!(f, ServerFrame::Welcome { .. }))
        .await;
    h.shared.shutdown.cancel();
    h.shared.hub.kick_all(ByeReason::Shutdown);
    let (reason, _) = h.ended().await;
    assert_eq!(reason, ByeReason::Shutdown);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("connection ends") && l.contains("span-phone"))
        .unwrap_or_else(|| panic!("no end line in {text}"));
    for field in [
        "transport=\"tcp\"",
        "uid=\"alice\"",
        "device=\"span-phone\"",
        "id=",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}
