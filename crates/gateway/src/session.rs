//! One session loop for every long-lived transport (TCP, WebSocket).
//!
//! A session is generic over [`Frames`]: one object that is a sink of [`Outgoing`]
//! frames and a stream of [`Incoming`] ones, so the transport only encodes and decodes.
//! States:
//!
//! ```text
//! login ──▶ register in hub ──▶ welcome + backlog replay ──▶ live ──▶ bye / close
//!  │ (token checked,           (outbox drained and dropped    (select: kick (shutdown
//!  │  device chosen)            before each page read; the     too), outbox, finished sends,
//!  └─ refused: error, close     read covers what it dropped)   client frames, timers)
//! ```
//!
//! Gap-free hand-over: the connection is registered *before* the resume point is read, and
//! every stored copy reaches the outbox only after it is readable. So each message is either
//! in a backlog page or in the outbox after the last page; anything at or below the last seq
//! sent is skipped. The session never touches sockets or knows which transport it serves.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures::future::{BoxFuture, OptionFuture};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use imgate_proto::ids::is_valid_id;
use imgate_proto::{encode, ByeReason, ClientFrame, Encoding, ErrorCode, ServerFrame};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, Identity};
use crate::config::Config;
use crate::cursors::{CursorHandle, Cursors};
use crate::hub::{Delivered, Hub, Kick, Outbound, Registration};
use crate::metrics::{Metrics, Transport};
use crate::send::{self, Refused};
use crate::store::nats::NatsStore;
use crate::store::{CursorWrite, Store, StoreError};

/// Messages read from the store per backlog page.
const REPLAY_PAGE: usize = 256;
/// Sends a connection may have waiting for the store at once; beyond it, its frames are
/// not read (backpressure instead of buffering).
const MAX_INFLIGHT_SENDS: usize = 64;
/// Outbox items written before one flush.
const OUT_BATCH: usize = 64;
/// Time allowed for the last frame (`bye` or a refusal) before the connection is dropped.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);
/// Device id used when a login names none.
pub const DEFAULT_DEVICE: &str = "default";
/// Unacked messages sent within this span share one ack-timeout bucket.
const ACK_BUCKET: Duration = Duration::from_secs(1);

/// Everything sessions share: configuration, auth, store, registry, cursors, shutdown.
pub struct Shared {
    pub cfg: Config,
    pub auth: Auth,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub cursors: Arc<Cursors>,
    /// Long-poll waiters kept between a device's polls.
    pub polls: crate::poll::ParkedPolls,
    /// Cancelled when the gateway starts draining.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Connection permits (`--max-connections`), taken before a connection is served.
    pub permits: Arc<Semaphore>,
    pub metrics: Metrics,
    /// Sends per second per uid over `POST /v1/messages` (`--send-rate`, `None` = unlimited).
    pub http_limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// The NATS store in cluster mode (its client and tail counters).
    pub cluster: Option<Arc<NatsStore>>,
}

/// A frame on its way to the client; the transport encodes it.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Frame(ServerFrame),
    Msg(Arc<Delivered>),
    Room(Arc<Delivered>),
}

impl Outgoing {
    /// Encodes for the wire. A stored message is encoded once per encoding and shared.
    pub fn encode(&self, enc: Encoding) -> Bytes {
        match self {
            Outgoing::Frame(f) => encode(f, enc).expect("server frames always encode"),
            Outgoing::Msg(d) | Outgoing::Room(d) => d.encoded(enc),
        }
    }

    /// The JSON encoding as text (a WebSocket text frame), shared like [`Self::encode`].
    pub fn text(&self) -> Utf8Bytes {
        match self {
            Outgoing::Frame(f) => crate::hub::json_text(f),
            Outgoing::Msg(d) | Outgoing::Room(d) => d.text(),
        }
    }
}

/// What a transport read from its client.
#[derive(Debug)]
pub enum Incoming {
    /// Boxed: a decoded frame passes through the live loop's select, whose state every idle
    /// connection keeps as large as the largest value a branch yields.
    Frame(Box<ClientFrame>),
    /// A delimited frame that did not decode; answered with `bad_request`.
    Malformed(String),
    /// Traffic that is not a frame (a WebSocket ping); it keeps the connection alive.
    Activity,
}

/// Why a transport stops reading.
#[derive(Debug)]
pub enum InError {
    /// A frame above `--max-frame`: cannot be delimited, so the connection ends.
    TooLarge,
    /// The peer went away or the socket failed.
    Closed,
}

/// A connection's frames both ways, as one object. Not split into halves: the session
/// never reads and writes at once (a `select!` drops its other branches before a handler
/// writes), and split halves cost a shared lock and two more allocations per connection.
pub trait Frames: Sink<Outgoing> + Stream<Item = Result<Incoming, InError>> + Unpin {}

impl<T> Frames for T where T: Sink<Outgoing> + Stream<Item = Result<Incoming, InError>> + Unpin {}

/// A socket of `S` items as [`Frames`]: `encode` makes the item for each outgoing frame
/// and `decode` the incoming frame from each item read. Unlike `SinkExt::with` it keeps no
/// slot for an item in flight, room every idle connection would carry.
pub struct Coded<S, E, D> {
    pub socket: S,
    pub encode: E,
    pub decode: D,
}

impl<S, E, D, I> Sink<Outgoing> for Coded<S, E, D>
where
    S: Sink<I> + Unpin,
    E: Fn(Outgoing) -> I + Unpin,
    D: Unpin,
{
    type Error = S::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.get_mut().socket.poll_ready_unpin(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Outgoing) -> Result<(), S::Error> {
        let this = self.get_mut();
        this.socket.start_send_unpin((this.encode)(item))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.get_mut().socket.poll_flush_unpin(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.get_mut().socket.poll_close_unpin(cx)
    }
}

impl<S, E, D> Stream for Coded<S, E, D>
where
    S: Stream + Unpin,
    E: Unpin,
    D: FnMut(S::Item) -> Result<Incoming, InError> + Unpin,
{
    type Item = Result<Incoming, InError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.socket
            .poll_next_unpin(cx)
            .map(|item| item.map(&mut this.decode))
    }
}

/// A login already checked by the transport (WebSocket with the token in URL or header).
#[derive(Debug, Clone)]
pub struct Preauth {
    pub identity: Identity,
    pub device: Option<String>,
    pub resume: Option<u64>,
    /// The store epoch `resume` belongs to, when the client named one.
    pub epoch: Option<String>,
}

/// How a session starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// The transport verified the token already: send `welcome` at once.
    Verified(Preauth),
    /// Wait for a `login` frame; `device` and `resume` fill in what it leaves out.
    AwaitLogin {
        device: Option<String>,
        resume: Option<u64>,
        epoch: Option<String>,
    },
}

/// What kind of client a session serves.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// For metrics.
    pub transport: Transport,
    /// Duplex clients (TCP, WebSocket) ack and send frames: ack and idle timeouts apply.
    /// Server-push clients (SSE) cannot: a message counts as acked once written, and the
    /// connection lives until the client goes away.
    pub client_acks: bool,
}

impl Profile {
    pub const TCP: Profile = Profile {
        transport: Transport::Tcp,
        client_acks: true,
    };
    pub const WS: Profile = Profile {
        transport: Transport::Ws,
        client_acks: true,
    };
    pub const SSE: Profile = Profile {
        transport: Transport::Sse,
        client_acks: false,
    };
}

/// How a session ends.
enum End {
    /// Say `bye` with this reason, then close.
    Bye(ByeReason),
    /// Send this (an error) and close. Boxed: an `End` is kept in every parked connection's
    /// state, and a frame is ten times the size of the other variants.
    Refuse(Box<ServerFrame>),
    /// The peer is gone; just close.
    Gone,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> End {
    End::Refuse(Box::new(ServerFrame::error(code, message)))
}

/// Runs one connection to its end.
///
/// `start` is boxed: a future keeps room for its arguments for its whole life, and a
/// connection's future is what each idle connection costs.
pub async fn run<T>(shared: Arc<Shared>, frames: T, start: Box<Start>, profile: Profile)
where
    T: Frames,
{
    let mut io = Io {
        frames,
        kick: Arc::new(Kick::default()),
        shutdown: shared.shutdown.clone(),
        write_stall: shared.cfg.ack_timeout,
        shared: shared.clone(),
        profile,
    };
    // Only the live loop runs inline: a task's future is as large as its largest state for
    // its whole life, and the live state is the one a connection keeps. The phases before and
    // after it are boxed, and the logged-in state is one heap block the loop borrows.
    let end = match Box::pin(begin(&shared, &mut io, start)).await {
        Ok(mut conn) => {
            let end = live_loop(&shared, &mut io, &mut conn.live, &mut conn.reg.rx).await;
            Box::pin(close(&shared, conn)).await;
            shared.metrics.connection(profile.transport).decrement(1.0);
            end
        }
        Err(end) => end,
    };
    Box::pin(io.farewell(end)).await;
}

/// The transport plus what every write races against.
struct Io<T> {
    frames: T,
    kick: Arc<Kick>,
    shutdown: CancellationToken,
    /// A single write blocked this long means the client stopped reading.
    write_stall: Duration,
    /// For counting what is written.
    shared: Arc<Shared>,
    profile: Profile,
}

impl<T> Io<T>
where
    T: Frames,
{
    /// Waits for the `login` frame and checks it.
    async fn login(&mut self, shared: &Shared) -> Result<Preauth, End> {
        let deadline = Instant::now() + shared.cfg.login_timeout;
        loop {
            let next = tokio::select! {
                r = tokio::time::timeout_at(deadline, self.frames.next()) => r,
                _ = self.shutdown.cancelled() => return Err(End::Bye(ByeReason::Shutdown)),
            };
            let login = match next {
                Err(_) => return Err(End::Bye(ByeReason::LoginTimeout)),
                Ok(None) | Ok(Some(Err(InError::Closed))) => return Err(End::Gone),
                Ok(Some(Err(InError::TooLarge))) => return Err(End::Bye(ByeReason::FrameTooLarge)),
                Ok(Some(Ok(Incoming::Activity))) => continue,
                Ok(Some(Ok(Incoming::Malformed(m)))) => {
                    return Err(refuse(ErrorCode::BadRequest, m))
                }
                Ok(Some(Ok(Incoming::Frame(f)))) => match *f {
                    ClientFrame::Login(l) => l,
                    _ => {
                        return Err(refuse(
                            ErrorCode::BadRequest,
                            "the first frame must be login",
                        ))
                    }
                },
            };
            let identity = shared
                .auth
                .verify(&login.token)
                .map_err(|e| refuse(ErrorCode::Unauthorized, e.to_string()))?;
            return Ok(Preauth {
                identity,
                device: login.device,
                resume: login.resume,
                epoch: login.epoch,
            });
        }
    }

    /// Writes one item, racing the write against a kick, shutdown and a stalled reader.
    /// `flush` pushes it (and anything fed before) to the socket.
    async fn write(&mut self, item: Outgoing, flush: bool) -> Result<(), End> {
        self.count(&item);
        let stall = self.write_stall;
        let frames = &mut self.frames;
        let write = async move {
            if flush {
                frames.send(item).await
            } else {
                frames.feed(item).await
            }
        };
        tokio::select! {
            biased;
            r = write => r.map_err(|_| End::Gone),
            reason = self.kick.kicked() => Err(End::Bye(reason)),
            _ = self.shutdown.cancelled() => Err(End::Bye(ByeReason::Shutdown)),
            _ = tokio::time::sleep(stall) => Err(End::Bye(ByeReason::SlowConsumer)),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        let stall = self.write_stall;
        tokio::select! {
            biased;
            r = self.frames.flush() => r.map_err(|_| End::Gone),
            reason = self.kick.kicked() => Err(End::Bye(reason)),
            _ = self.shutdown.cancelled() => Err(End::Bye(ByeReason::Shutdown)),
            _ = tokio::time::sleep(stall) => Err(End::Bye(ByeReason::SlowConsumer)),
        }
    }

    fn count(&self, item: &Outgoing) {
        let m = &self.shared.metrics;
        match item {
            Outgoing::Msg(_) => m.delivered(self.profile.transport).increment(1),
            Outgoing::Frame(ServerFrame::Error { code, .. }) => m.error(*code).increment(1),
            Outgoing::Frame(_) | Outgoing::Room(_) => {}
        }
    }

    /// Sends the last frame, if any, within a short deadline, then closes the sink.
    async fn farewell(&mut self, end: End) {
        let last = match end {
            End::Bye(reason) => Some(ServerFrame::Bye { reason }),
            End::Refuse(frame) => Some(*frame),
            End::Gone => None,
        };
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
            if let Some(frame) = last {
                let item = Outgoing::Frame(frame);
                self.count(&item);
                let _ = self.frames.send(item).await;
            }
            let _ = self.frames.close().await;
        })
        .await;
    }
}

/// The state of a logged-in session.
/// Every idle connection keeps one, so it is kept small: uid and device are read from the
/// cursor handle, and the send limiter is made on the first send.
struct Live {
    /// This connection's id in the hub: it holds the room memberships it joined.
    conn_id: u64,
    /// Rooms this connection joined.
    rooms: Vec<String>,
    /// False for server-push clients: written means acked, and no idle timeout.
    client_acks: bool,
    cursor: CursorHandle,
    /// Highest seq written to this connection; anything at or below it is not sent again.
    last_sent: u64,
    /// `(highest seq, first send time)` per bucket of unacked messages, oldest first.
    unacked: VecDeque<(u64, Instant)>,
    last_activity: Instant,
    limiter: Option<Box<DefaultDirectRateLimiter>>,
    /// Sends waiting for the store, answered in order. Made on the first send: an empty
    /// `FuturesOrdered` already allocates and takes 64 bytes here, and most connections
    /// are idle.
    inflight: Option<Box<FuturesOrdered<BoxFuture<'static, Box<ServerFrame>>>>>,
}

impl Live {
    fn uid(&self) -> &str {
        self.cursor.uid()
    }

    fn device(&self) -> &str {
        self.cursor.device()
    }

    /// Whether a send or publish now is over this connection's quota (`--send-rate`).
    fn over_quota(&mut self, cfg: &Config) -> bool {
        let Some(quota) = send_quota(cfg) else {
            return false;
        };
        self.limiter
            .get_or_insert_with(|| Box::new(RateLimiter::direct(quota)))
            .check()
            .is_err()
    }
}

/// A logged-in connection: its session state and its place in the hub.
struct Conn {
    live: Live,
    reg: Registration,
}

/// Registers a logged-in connection, then sends `welcome` and its backlog.
async fn open<T>(shared: &Arc<Shared>, io: &mut Io<T>, pre: Preauth) -> Result<Conn, End>
where
    T: Frames,
{
    let device = pre.device.unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
    if !is_valid_id(&device) {
        return Err(refuse(
            ErrorCode::BadRequest,
            "device must match ^[A-Za-z0-9_-]{1,64}$",
        ));
    }
    let uid = pre.identity.uid;
    let cfg = &shared.cfg;
    let mut reg = shared
        .hub
        .register(&uid, &device, io.kick.clone(), cfg.outbox, cfg.max_devices);

    let point = Box::pin(resume_point(
        shared,
        &uid,
        &device,
        pre.resume,
        pre.epoch.as_deref(),
    ));
    let ResumePoint {
        resume,
        stored,
        reset,
    } = match point.await {
        Ok(r) => r,
        Err(e) => return Err(refuse(e.code(), e.to_string())),
    };
    let start = if reset { 0 } else { stored.unwrap_or(resume) };
    let mut live = Live {
        conn_id: reg.id,
        rooms: Vec::new(),
        client_acks: io.profile.client_acks,
        cursor: shared.cursors.open(&uid, &device, start, start),
        last_sent: resume,
        unacked: VecDeque::new(),
        last_activity: Instant::now(),
        limiter: None,
        inflight: None,
    };

    if let Err(end) = replay(shared, io, &mut live, &mut reg.rx, &device, resume, reset).await {
        close(shared, Box::new(Conn { live, reg })).await;
        return Err(end);
    }
    Ok(Conn { live, reg })
}

/// Logs in (unless the transport did) and opens the session; a session that opens counts
/// in the connection gauge until [`close`].
async fn begin<T>(shared: &Arc<Shared>, io: &mut Io<T>, start: Box<Start>) -> Result<Box<Conn>, End>
where
    T: Frames,
{
    let pre = match *start {
        Start::Verified(p) => p,
        Start::AwaitLogin {
            device,
            resume,
            epoch,
        } => {
            let mut p = io.login(shared).await?;
            p.device = p.device.or(device);
            if p.resume.is_none() {
                p.resume = resume;
                p.epoch = p.epoch.or(epoch);
            }
            p
        }
    };
    let gauge = shared.metrics.connection(io.profile.transport);
    gauge.increment(1.0);
    let opened = open(shared, io, pre).await.map(Box::new);
    if opened.is_err() {
        gauge.decrement(1.0);
    }
    opened
}

/// Ends a session's place in the hub and writes its cursor.
async fn close(shared: &Shared, conn: Box<Conn>) {
    let Conn { live, reg } = *conn;
    for room in &live.rooms {
        shared
            .hub
            .leave_room(room, live.uid(), live.device(), live.conn_id);
    }
    drop(reg);
    live.cursor.close().await;
}

/// The per-connection (or per-uid, over HTTP) send quota; `None` when unlimited.
pub fn send_quota(cfg: &Config) -> Option<Quota> {
    NonZeroU32::new(cfg.send_rate).map(|rate| {
        let burst = NonZeroU32::new(cfg.send_burst).unwrap_or(rate);
        Quota::per_second(rate).allow_burst(burst)
    })
}

/// Where a login resumes.
pub(crate) struct ResumePoint {
    /// The seq the backlog starts after (0 after a reset).
    pub resume: u64,
    /// The device's stored cursor, if it has one.
    pub stored: Option<u64>,
    /// The resume point belongs to another store (another epoch, or a seq above anything
    /// this store assigned): the device starts over from the retained inbox, told by a gap.
    pub reset: bool,
}

/// Where a login resumes: the explicit seq, else the device's cursor, else the live tail
/// (stored as the cursor at once, so a device seen once resumes from here even if it never
/// acks). A resume from another epoch, or above every seq the store ever assigned, is a
/// reset: it starts from the beginning of the retained inbox.
pub(crate) async fn resume_point(
    shared: &Shared,
    uid: &str,
    device: &str,
    asked: Option<u64>,
    epoch: Option<&str>,
) -> Result<ResumePoint, StoreError> {
    let stored = shared.cursors.load(uid, device).await?;
    let resume = match (asked, stored) {
        (Some(r), _) => r,
        (None, Some(c)) => c,
        (None, None) => shared.store.last_seq(uid).await?,
    };
    let reset = is_reset(shared, uid, resume, asked.and(epoch)).await?;
    let resume = if reset { 0 } else { resume };
    if stored.is_none() {
        shared
            .store
            .save_cursors(&mut [CursorWrite::new(uid, device, resume)])
            .await?;
    }
    Ok(ResumePoint {
        resume,
        stored,
        reset,
    })
}

/// Whether resuming `uid` after `seq` (of `epoch`, when named) means the store was reset
/// or replaced since the client saw that seq.
pub(crate) async fn is_reset(
    shared: &Shared,
    uid: &str,
    seq: u64,
    epoch: Option<&str>,
) -> Result<bool, StoreError> {
    if epoch.is_some_and(|e| *e != *shared.store.epoch()) {
        return Ok(true);
    }
    // The inbox's last seq is the cheap answer; only a resume above it asks the store's
    // highest seq (in cluster mode, a request to the stream).
    Ok(seq > shared.store.last_seq(uid).await? && seq > shared.store.high_seq().await?)
}

/// Sends `welcome` and the backlog after `resume`, page by page.
async fn replay<T>(
    shared: &Shared,
    io: &mut Io<T>,
    live: &mut Live,
    rx: &mut flume::Receiver<Outbound>,
    device: &str,
    resume: u64,
    reset: bool,
) -> Result<(), End>
where
    T: Frames,
{
    let mut welcomed = false;
    loop {
        // Everything queued so far is stored already, so the read below returns it.
        while rx.try_recv().is_ok() {}
        let page = shared
            .store
            .read(live.uid(), live.last_sent, REPLAY_PAGE)
            .await
            .map_err(|e| refuse(e.code(), e.to_string()))?;
        if !welcomed {
            let welcome = ServerFrame::Welcome {
                uid: live.uid().to_owned(),
                device: device.to_owned(),
                resume,
                gap: page.gap || reset,
                epoch: shared.store.epoch().to_string(),
            };
            io.write(Outgoing::Frame(welcome), false).await?;
            welcomed = true;
        }
        let more = page.more;
        let now = Instant::now();
        for m in page.messages {
            let seq = m.seq;
            let d = Delivered::new(Arc::unwrap_or_clone(m));
            io.write(Outgoing::Msg(Arc::new(d)), false).await?;
            live.sent(seq, now);
        }
        io.flush().await?;
        if !more {
            return Ok(());
        }
    }
}

async fn live_loop<T>(
    shared: &Arc<Shared>,
    io: &mut Io<T>,
    live: &mut Live,
    rx: &mut flume::Receiver<Outbound>,
) -> End
where
    T: Frames,
{
    let cfg = &shared.cfg;
    // Shutdown reaches a live connection as a kick (`Hub::kick_all`), one branch fewer in
    // the select every idle connection is parked in. A connection registered after that
    // sweep sees the flag here.
    if shared.shutdown.is_cancelled() {
        return End::Bye(ByeReason::Shutdown);
    }
    let kick = io.kick.clone();
    let mut timer = pin!(tokio::time::sleep_until(live.deadline(cfg)));
    // Connections spend their life parked in this select; the work each branch starts is
    // boxed so the parked state stays small (idle connections are most of them).
    loop {
        let inflight = live.inflight.as_ref().map_or(0, |f| f.len());
        let reading = inflight < MAX_INFLIGHT_SENDS;
        // Every branch is cancel-safe: kicked and sleep are plain waits, `recv` and
        // `next` on a channel receiver or a framed stream lose nothing when dropped.
        let step: Result<(), End> = tokio::select! {
            biased;
            reason = kick.kicked() => Err(End::Bye(reason)),
            Some(Some(frame)) = OptionFuture::from(live.inflight.as_mut().map(|f| f.next())),
                if inflight > 0 => {
                Box::pin(answer(io, live, rx, *frame)).await
            }
            out = rx.recv_async() => match out {
                Ok(first) => Box::pin(deliver_batch(io, live, rx, first)).await,
                // The hub dropped us: a newer connection replaced this one.
                Err(flume::RecvError::Disconnected) => Err(End::Bye(ByeReason::Replaced)),
            },
            inbound = io.frames.next(), if reading => {
                live.last_activity = Instant::now();
                match inbound {
                    None | Some(Err(InError::Closed)) => Err(End::Gone),
                    Some(Err(InError::TooLarge)) => Err(End::Bye(ByeReason::FrameTooLarge)),
                    Some(Ok(Incoming::Activity)) => Ok(()),
                    Some(Ok(Incoming::Malformed(m))) => {
                        let e = ServerFrame::error(ErrorCode::BadRequest, m);
                        Box::pin(io.write(Outgoing::Frame(e), true)).await
                    }
                    Some(Ok(Incoming::Frame(f))) => Box::pin(handle(shared, io, live, *f)).await,
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if live.ack_deadline(cfg).is_some_and(|d| d <= now) {
                    Err(End::Bye(ByeReason::AckTimeout))
                } else if live.idle_deadline(cfg) <= now {
                    Err(End::Bye(ByeReason::Idle))
                } else {
                    timer.as_mut().reset(live.deadline(cfg));
                    Ok(())
                }
            }
        };
        if let Err(end) = step {
            return end;
        }
        // Pull the timer in if a new ack deadline came before it; a later deadline is
        // handled when the timer fires early and re-arms.
        let next = live.deadline(cfg);
        if next < timer.deadline() {
            timer.as_mut().reset(next);
        }
    }
}

/// Writes the answer to a send together with whatever the outbox already holds: a store
/// fans a message out before it answers, so the sender's own copy is usually queued by now
/// and both leave in one write.
async fn answer<T>(
    io: &mut Io<T>,
    live: &mut Live,
    rx: &mut flume::Receiver<Outbound>,
    frame: ServerFrame,
) -> Result<(), End>
where
    T: Frames,
{
    io.write(Outgoing::Frame(frame), false).await?;
    match rx.try_recv() {
        Ok(first) => deliver_batch(io, live, rx, first).await,
        // Empty, or the hub dropped us: the live loop's next `recv` sees which.
        Err(_) => io.flush().await,
    }
}

async fn deliver_batch<T>(
    io: &mut Io<T>,
    live: &mut Live,
    rx: &mut flume::Receiver<Outbound>,
    first: Outbound,
) -> Result<(), End>
where
    T: Frames,
{
    let now = Instant::now();
    let mut next = Some(first);
    let mut n = 0;
    while let Some(out) = next {
        match out {
            Outbound::Msg(d) => {
                let seq = d.seq();
                if seq > live.last_sent {
                    io.write(Outgoing::Msg(d), false).await?;
                    live.sent(seq, now);
                }
            }
            Outbound::Room(d) => io.write(Outgoing::Room(d), false).await?,
        }
        n += 1;
        next = if n < OUT_BATCH {
            rx.try_recv().ok()
        } else {
            None
        };
    }
    io.flush().await
}

async fn handle<T>(
    shared: &Arc<Shared>,
    io: &mut Io<T>,
    live: &mut Live,
    f: ClientFrame,
) -> Result<(), End>
where
    T: Frames,
{
    let answer = match f {
        ClientFrame::Ping => ServerFrame::Pong,
        ClientFrame::Ack { seq } => {
            if seq > live.last_sent {
                ServerFrame::error(
                    ErrorCode::BadRequest,
                    format!("ack {seq} is beyond the last seq sent ({})", live.last_sent),
                )
            } else {
                shared.metrics.acks.increment(1);
                live.acked(seq);
                return Ok(());
            }
        }
        ClientFrame::Send(send) => match accept_send(shared, live, send) {
            Ok(fut) => {
                live.inflight
                    .get_or_insert_with(Default::default)
                    .push_back(fut);
                return Ok(());
            }
            Err(frame) => *frame,
        },
        ClientFrame::Login(_) => ServerFrame::error(ErrorCode::BadRequest, "already logged in"),
        ClientFrame::Join { room } => {
            if !is_valid_id(&room) {
                ServerFrame::error(
                    ErrorCode::BadRequest,
                    "room must match ^[A-Za-z0-9_-]{1,64}$",
                )
            } else if live.rooms.contains(&room) {
                return Ok(());
            } else if live.rooms.len() >= shared.cfg.max_rooms_per_connection {
                ServerFrame::error(
                    ErrorCode::BadRequest,
                    format!(
                        "a connection joins at most {} rooms (--max-rooms-per-connection)",
                        shared.cfg.max_rooms_per_connection
                    ),
                )
            } else {
                shared
                    .hub
                    .join_room(&room, live.uid(), live.device(), live.conn_id, None);
                live.rooms.push(room);
                return Ok(());
            }
        }
        ClientFrame::Leave { room } => {
            if let Some(i) = live.rooms.iter().position(|r| *r == room) {
                live.rooms.swap_remove(i);
                shared
                    .hub
                    .leave_room(&room, live.uid(), live.device(), live.conn_id);
            }
            return Ok(());
        }
        ClientFrame::Publish { room, body } => {
            match crate::rooms::check_publish(shared, &room, &body) {
                Err((code, message)) => ServerFrame::error(code, message),
                Ok(()) if !live.rooms.contains(&room) => ServerFrame::error(
                    ErrorCode::NotMember,
                    format!("join {room:?} before publishing to it"),
                ),
                Ok(()) if live.over_quota(&shared.cfg) => ServerFrame::error(
                    ErrorCode::RateLimited,
                    "send rate limit exceeded; retry later",
                ),
                Ok(()) => match crate::rooms::publish(shared, &room, live.uid(), body).await {
                    Ok(()) => return Ok(()),
                    Err(e) => ServerFrame::error(e.code(), e.to_string()),
                },
            }
        }
    };
    io.write(Outgoing::Frame(answer), true).await
}

/// Checks a `send` and returns the future that stores it and yields the answer frame.
fn accept_send(
    shared: &Arc<Shared>,
    live: &mut Live,
    send: imgate_proto::Send,
) -> Result<BoxFuture<'static, Box<ServerFrame>>, Box<ServerFrame>> {
    let refused = |r: Refused| {
        Box::new(ServerFrame::Error {
            id: r.id,
            code: r.code,
            message: r.message,
        })
    };
    let prepared = send::prepare(&shared.cfg, live.uid(), send).map_err(refused)?;
    if live.over_quota(&shared.cfg) {
        return Err(refused(Refused {
            id: Some(prepared.draft.id),
            code: ErrorCode::RateLimited,
            message: "send rate limit exceeded; retry later".into(),
        }));
    }
    let shared = shared.clone();
    Ok(async move {
        Box::new(match send::commit(&shared, prepared).await {
            Ok(s) => ServerFrame::Sent {
                id: s.id,
                seq: s.seq,
                ts: s.ts,
            },
            Err(r) => ServerFrame::Error {
                id: r.id,
                code: r.code,
                message: r.message,
            },
        })
    }
    .boxed())
}

impl Live {
    fn sent(&mut self, seq: u64, now: Instant) {
        self.last_sent = seq;
        if !self.client_acks {
            self.cursor.ack(seq);
            return;
        }
        match self.unacked.back_mut() {
            Some((last, started)) if now.duration_since(*started) < ACK_BUCKET => *last = seq,
            _ => self.unacked.push_back((seq, now)),
        }
    }

    fn acked(&mut self, seq: u64) {
        self.cursor.ack(seq);
        while self.unacked.front().is_some_and(|(last, _)| *last <= seq) {
            self.unacked.pop_front();
        }
    }

    fn ack_deadline(&self, cfg: &Config) -> Option<Instant> {
        self.unacked.front().map(|(_, t)| *t + cfg.ack_timeout)
    }

    fn idle_deadline(&self, cfg: &Config) -> Instant {
        if self.client_acks {
            self.last_activity + cfg.idle_timeout
        } else {
            // Nothing to wait for: the client never speaks. Far enough to never fire.
            self.last_activity + Duration::from_secs(365 * 24 * 3600)
        }
    }

    fn deadline(&self, cfg: &Config) -> Instant {
        let idle = self.idle_deadline(cfg);
        self.ack_deadline(cfg).map_or(idle, |a| a.min(idle))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use imgate_proto::{Message, Send};
    use serde_json::json;
    use tokio::sync::mpsc;

    use super::*;
    use crate::auth::Identity;

    /// A transport that hands the session frames from a channel and records each flushed
    /// batch of what the session wrote.
    struct Recorder {
        incoming: mpsc::UnboundedReceiver<ClientFrame>,
        batch: Vec<ServerFrame>,
        flushed: Arc<Mutex<Vec<Vec<ServerFrame>>>>,
    }

    impl Sink<Outgoing> for Recorder {
        type Error = std::io::Error;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(self: Pin<&mut Self>, item: Outgoing) -> std::io::Result<()> {
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

    #[tokio::test]
    async fn a_sends_answer_and_the_senders_own_copy_leave_in_one_write() {
        // The memory store: the default on-disk store would open the user's data directory,
        // and a replay of what earlier runs left there races the live copy.
        let cfg = crate::config::parse_for_test(&["--store", "memory"]);
        let shared = crate::server::Gateway::new(cfg).await.unwrap().shared();
        let (to_session, incoming) = mpsc::unbounded_channel();
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder {
            incoming,
            batch: Vec::new(),
            flushed: flushed.clone(),
        };
        let start = Box::new(Start::Verified(Preauth {
            identity: Identity {
                uid: "alice".into(),
                admin: false,
            },
            device: None,
            resume: None,
            epoch: None,
        }));
        let session = tokio::spawn(run(shared, recorder, start, Profile::TCP));
        to_session
            .send(ClientFrame::Send(Send {
                id: Some("m1".into()),
                to: Some("bob".into()),
                group: None,
                body: json!({"text": "hi"}),
            }))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let answered = loop {
            let batches = flushed.lock().unwrap().clone();
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
        drop(to_session);
        session.await.unwrap();
    }
}
