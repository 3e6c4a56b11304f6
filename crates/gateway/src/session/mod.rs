//! One session loop for every long-lived transport (TCP, WebSocket, SSE).
//!
//! A session is generic over [`Frames`]: one object that is a sink of [`ToClient`]
//! frames and a stream of [`Incoming`] ones, so the transport only encodes and decodes.
//! States:
//!
//! ```text
//! login ──▶ register in hub ──▶ follow ──▶ welcome + backlog replay ──▶ live ──▶ bye / close
//!  │ (token checked,         (the store   (outbox drained before     (select: kick (shutdown
//!  │  device chosen)          hands the    each page read; what it   too), outbox, finished
//!  └─ refused: error, close   inbox over)  held above the last page  sends, client frames,
//!                                          goes out after it)        timers)
//! ```
//!
//! Gap-free hand-over: the connection is registered, and its inbox followed
//! ([`crate::store::Store::follow`]), *before* the resume point is read, and every stored
//! copy reaches the outbox only after it is readable. So each message is either in a
//! backlog page or in the outbox; what the outbox held while the pages were read is sent
//! after the last page if that page did not cover it, and anything at or below the last
//! seq sent is skipped. The session never touches a socket: of its transport it knows only the
//! [`Profile`] (whether the client acks, and the name metrics count it under).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, OptionFuture};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, RateLimiter};
use imgate_proto::ids::is_valid_id;
use imgate_proto::{ByeReason, ClientFrame, ErrorCode, ServerFrame};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::config::{Limits, Timers};
use crate::delivery::cursors::CursorHandle;
use crate::delivery::hub::{Kick, Registration};
use crate::delivery::outbox::{OutboxItem, SharedFrame, ToClient};
use crate::delivery::resume::{resume_point, ResumePoint};
use crate::delivery::send::{self, send_quota};
use crate::delivery::{reads, rooms, DEFAULT_DEVICE};
use crate::logging::Labels;
use crate::metrics::{Metrics, Transport};
use crate::refusal::Refusal;
use crate::state::Shared;
use crate::store::{Following, Page, StoreError};

pub mod frames;

pub use frames::{Coded, Frames, InError, Incoming};

/// Messages read from the store per backlog page.
const REPLAY_PAGE: usize = 256;
/// Answers a connection may have waiting at once (sends waiting for the store, and the
/// answers queued behind them); beyond it, its frames are not read (backpressure instead
/// of buffering).
const MAX_INFLIGHT_SENDS: usize = 64;
/// Outbox items written before one flush.
const OUT_BATCH: usize = 64;
/// Time allowed for the last frame (`bye` or a refusal) before the connection is dropped.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);
/// Unacked messages sent within this span share one ack-timeout bucket.
const ACK_BUCKET: Duration = Duration::from_secs(1);

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
#[derive(Debug)]
enum End {
    /// Say `bye` with this reason, then close.
    Bye(ByeReason),
    /// Send this (an error) and close. Boxed: an `End` is kept in every parked connection's
    /// state, and a frame is ten times the size of the other variants.
    Refuse(Box<ServerFrame>),
    /// The peer is gone; just close.
    Gone,
}

fn refuse(r: Refusal) -> End {
    End::Refuse(Box::new(r.into()))
}

/// Runs one connection to its end.
///
/// `start` is boxed: a future keeps room for its arguments for its whole life, and a
/// connection's future is what each idle connection costs.
///
/// Every line the connection logs says which it is ([`crate::logging`]).
pub fn run<T>(
    shared: Arc<Shared>,
    frames: T,
    start: Box<Start>,
    profile: Profile,
) -> impl Future<Output = ()>
where
    T: Frames,
{
    let labels = Labels::new(profile.transport.as_str());
    labels
        .clone()
        .scope(serve(shared, frames, start, profile, labels))
}

async fn serve<T>(
    shared: Arc<Shared>,
    frames: T,
    start: Box<Start>,
    profile: Profile,
    labels: Labels,
) where
    T: Frames,
{
    let mut io = Io {
        frames,
        kick: Arc::new(Kick::default()),
        shutdown: shared.shutdown.clone(),
        write_stall: shared.cfg.timers.ack_timeout,
        metrics: shared.metrics.clone(),
        profile,
        labels,
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
    tracing::debug!(end = ?end, "connection ends");
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
    metrics: Arc<Metrics>,
    profile: Profile,
    labels: Labels,
}

impl<T> Io<T>
where
    T: Frames,
{
    /// Waits for the `login` frame and checks it.
    async fn login(&mut self, shared: &Shared) -> Result<Preauth, End> {
        let deadline = Instant::now() + shared.cfg.timers.login_timeout;
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
                    return Err(refuse(Refusal::new(ErrorCode::BadRequest, m)))
                }
                Ok(Some(Ok(Incoming::Frame(f)))) => match *f {
                    ClientFrame::Login(l) => l,
                    _ => {
                        return Err(refuse(Refusal::new(
                            ErrorCode::BadRequest,
                            "the first frame must be login",
                        )))
                    }
                },
            };
            let identity = shared
                .auth
                .verify(&login.token)
                .map_err(|e| refuse(Refusal::new(ErrorCode::Unauthorized, e.to_string())))?;
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
    async fn write(&mut self, item: ToClient, flush: bool) -> Result<(), End> {
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

    fn count(&self, item: &ToClient) {
        let m = &self.metrics;
        match item {
            ToClient::Shared(d) if d.seq() > 0 => m.delivered(self.profile.transport).increment(1),
            ToClient::Frame(ServerFrame::Error { code, .. }) => m.error(*code).increment(1),
            ToClient::Frame(_) | ToClient::Shared(_) => {}
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
                let item = ToClient::Frame(frame);
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
    /// The user's read position as last told to this connection (in `welcome` or a `read`
    /// frame): a rise told late, at or below it, is not sent.
    read_told: u64,
    /// `(highest seq, first send time)` per bucket of unacked messages, oldest first.
    unacked: VecDeque<(u64, Instant)>,
    last_activity: Instant,
    /// The token's expiry (Unix seconds) and the instant it passes, with the leeway.
    exp: u64,
    expires: Instant,
    limiter: Option<Box<DefaultDirectRateLimiter>>,
    /// Answers in the order of their frames: sends waiting for the store, and answers
    /// ready at once queued behind them ([`reply`]). Made on the first send: an empty
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
    fn over_quota(&mut self, limits: &Limits) -> bool {
        let Some(quota) = send_quota(limits) else {
            return false;
        };
        self.limiter
            .get_or_insert_with(|| Box::new(RateLimiter::direct(quota)))
            .check()
            .is_err()
    }
}

/// A logged-in connection: its session state, its place in the hub, and the store's
/// promise to hand its inbox's copies to the hub.
struct LoggedIn {
    live: Live,
    reg: Registration,
    _following: Following,
}

/// Registers a logged-in connection, then sends `welcome` and its backlog. (Past 60 lines
/// only by the `Live` it fills, field by field.)
async fn open<T>(shared: &Arc<Shared>, io: &mut Io<T>, pre: Preauth) -> Result<LoggedIn, End>
where
    T: Frames,
{
    let device = pre.device.unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
    if !is_valid_id(&device) {
        return Err(refuse(Refusal::bad_id("device")));
    }
    let uid = pre.identity.uid;
    let cfg = &shared.cfg;
    let mut reg = shared.hub.register(
        &uid,
        &device,
        io.kick.clone(),
        cfg.limits.outbox,
        cfg.limits.max_devices,
    );
    io.labels.set(reg.id, &uid, &device);
    // Registered first, then followed, then read: every copy is in a backlog page or
    // reaches the outbox.
    let following = match shared.store.follow(&uid).await {
        Ok(f) => f,
        Err(e) => return Err(refuse(e.into())),
    };

    let point = Box::pin(resume_point(
        shared.store.as_ref(),
        &shared.cursors,
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
        Err(e) => return Err(refuse(e.into())),
    };
    let start = if reset { 0 } else { stored.unwrap_or(resume) };
    let mut live = Live {
        conn_id: reg.id,
        rooms: Vec::new(),
        client_acks: io.profile.client_acks,
        cursor: shared.cursors.open(&uid, &device, start, start),
        last_sent: resume,
        read_told: 0,
        unacked: VecDeque::new(),
        last_activity: Instant::now(),
        exp: pre.identity.exp,
        expires: expiry(pre.identity.exp),
        limiter: None,
        inflight: None,
    };

    let replayed = replay(shared, io, &mut live, &mut reg.rx, &device, resume, reset).await;
    let conn = LoggedIn {
        live,
        reg,
        _following: following,
    };
    if let Err(end) = replayed {
        close(shared, Box::new(conn)).await;
        return Err(end);
    }
    Ok(conn)
}

/// Logs in (unless the transport did) and opens the session; a session that opens counts
/// in the connection gauge until [`close`].
async fn begin<T>(
    shared: &Arc<Shared>,
    io: &mut Io<T>,
    start: Box<Start>,
) -> Result<Box<LoggedIn>, End>
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
async fn close(shared: &Shared, conn: Box<LoggedIn>) {
    let LoggedIn { live, reg, .. } = *conn;
    for room in &live.rooms {
        shared
            .hub
            .leave_room(room, live.uid(), live.device(), live.conn_id);
    }
    drop(reg);
    live.cursor.close().await;
}

/// Sends `welcome` and the backlog after `resume`, page by page.
async fn replay<T>(
    shared: &Shared,
    io: &mut Io<T>,
    live: &mut Live,
    rx: &mut flume::Receiver<OutboxItem>,
    device: &str,
    resume: u64,
    reset: bool,
) -> Result<(), End>
where
    T: Frames,
{
    let mut welcomed = false;
    // Copies queued while the pages are read. Every one is stored already, so a page read
    // after it normally returns it too; they are kept anyway and the ones above the last
    // page sent go out after it, because a replica answering the read may lag the copy.
    let mut queued: VecDeque<Arc<SharedFrame>> = VecDeque::new();
    // A rise of the read position told while the pages are read; sent after them when
    // above what `welcome` said.
    let mut read_rose = 0;
    loop {
        while let Ok(item) = rx.try_recv() {
            match item {
                OutboxItem::Msg(d) => queued.push_back(d),
                OutboxItem::Read(seq) => read_rose = read_rose.max(seq),
                OutboxItem::Room(_) => {}
            }
        }
        let page = shared
            .store
            .read(live.uid(), live.last_sent, REPLAY_PAGE)
            .await
            .map_err(|e| refuse(e.into()))?;
        if !welcomed {
            welcome(shared, io, live, (device, resume), reset || page.gap, &page).await?;
            welcomed = true;
        }
        let more = page.more;
        let now = Instant::now();
        for m in page.messages {
            let seq = m.seq;
            let d = SharedFrame::new(Arc::unwrap_or_clone(m));
            io.write(ToClient::Shared(Arc::new(d)), false).await?;
            live.sent(seq, now);
        }
        queued.retain(|d| d.seq() > live.last_sent);
        if !more {
            return end_replay(io, live, queued, read_rose).await;
        }
        io.flush().await?;
    }
}

/// Writes `welcome`, with the user's read position and unread count (counted from `page`,
/// the first page of the backlog, where it can).
async fn welcome<T>(
    shared: &Shared,
    io: &mut Io<T>,
    live: &mut Live,
    (device, resume): (&str, u64),
    gap: bool,
    page: &Page,
) -> Result<(), End>
where
    T: Frames,
{
    let (read, unread) = read_and_unread(shared, live.uid(), live.last_sent, page)
        .await
        .map_err(|e| refuse(e.into()))?;
    let welcome = ServerFrame::Welcome {
        uid: live.uid().to_owned(),
        device: device.to_owned(),
        resume,
        gap,
        epoch: shared.store.epoch().to_string(),
        exp: Some(live.exp),
        read,
        unread,
    };
    io.write(ToClient::Frame(welcome), false).await?;
    live.read_told = read;
    Ok(())
}

/// After the last page: the copies queued meanwhile that it did not hold, and a rise of
/// the read position told meanwhile, then one flush.
async fn end_replay<T>(
    io: &mut Io<T>,
    live: &mut Live,
    queued: VecDeque<Arc<SharedFrame>>,
    read_rose: u64,
) -> Result<(), End>
where
    T: Frames,
{
    let now = Instant::now();
    for d in queued {
        let seq = d.seq();
        io.write(ToClient::Shared(d), false).await?;
        live.sent(seq, now);
    }
    if read_rose > live.read_told {
        live.read_told = read_rose;
        let read = ServerFrame::Read { seq: read_rose };
        io.write(ToClient::Frame(read), false).await?;
    }
    io.flush().await
}

/// The user's read position and unread count for `welcome`. The unread messages are
/// counted from the first backlog `page` when it holds all of them (the read position is
/// at or above the resume point, and nothing follows the page); otherwise read again.
async fn read_and_unread(
    shared: &Shared,
    uid: &str,
    resume: u64,
    page: &Page,
) -> Result<(u64, u64), StoreError> {
    let store = shared.store.as_ref();
    let read = store.read_position(uid).await?;
    let unread = if read >= resume && !page.more {
        reads::count(page, uid, read)
    } else {
        reads::unread(store, uid, read).await?
    };
    Ok((read, unread.min(imgate_proto::MAX_UNREAD)))
}

/// Why a connection whose timer fired at `now` must end, if it must: its token expired,
/// a message went unacked for `--ack-timeout`, or it was idle for `--idle-timeout`.
fn timed_out(live: &Live, timers: &Timers, now: Instant) -> Option<ByeReason> {
    if live.expires <= now {
        Some(ByeReason::Expired)
    } else if live.ack_deadline(timers).is_some_and(|d| d <= now) {
        Some(ByeReason::AckTimeout)
    } else if live.idle_deadline(timers) <= now {
        Some(ByeReason::Idle)
    } else {
        None
    }
}

/// The life of a logged-in connection: answers, deliveries, frames in and timers, until
/// one of them ends it. (Past 60 lines: it is one `select!`, whose branches share `io`,
/// `live` and `rx`.)
async fn live_loop<T>(
    shared: &Arc<Shared>,
    io: &mut Io<T>,
    live: &mut Live,
    rx: &mut flume::Receiver<OutboxItem>,
) -> End
where
    T: Frames,
{
    let timers = &shared.cfg.timers;
    // Shutdown reaches a live connection as a kick (`Hub::kick_all`), one branch fewer in
    // the select every idle connection is parked in. A connection registered after that
    // sweep sees the flag here.
    if shared.shutdown.is_cancelled() {
        return End::Bye(ByeReason::Shutdown);
    }
    let kick = io.kick.clone();
    let mut timer = pin!(tokio::time::sleep_until(live.deadline(timers)));
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
                        Box::pin(reply(io, live, e)).await
                    }
                    Some(Ok(Incoming::Frame(f))) => Box::pin(handle(shared, io, live, *f)).await,
                }
            }
            _ = &mut timer => match timed_out(live, timers, Instant::now()) {
                Some(reason) => Err(End::Bye(reason)),
                None => {
                    timer.as_mut().reset(live.deadline(timers));
                    Ok(())
                }
            },
        };
        if let Err(end) = step {
            return end;
        }
        // Pull the timer in if a new ack deadline came before it; a later deadline is
        // handled when the timer fires early and re-arms.
        let next = live.deadline(timers);
        if next < timer.deadline() {
            timer.as_mut().reset(next);
        }
    }
}

/// Writes the answer to a send together with whatever the outbox already holds. A
/// standalone store fans a message out before it answers, so there the sender's own copy
/// is queued by now and both leave in one write; in a cluster the copy comes back through
/// the tail, usually after the answer, and leaves in a write of its own. Either way the
/// copy is delivered: this only decides how many writes it takes.
async fn answer<T>(
    io: &mut Io<T>,
    live: &mut Live,
    rx: &mut flume::Receiver<OutboxItem>,
    frame: ServerFrame,
) -> Result<(), End>
where
    T: Frames,
{
    io.write(ToClient::Frame(frame), false).await?;
    match rx.try_recv() {
        Ok(first) => deliver_batch(io, live, rx, first).await,
        // Empty, or the hub dropped us: the live loop's next `recv` sees which.
        Err(_) => io.flush().await,
    }
}

async fn deliver_batch<T>(
    io: &mut Io<T>,
    live: &mut Live,
    rx: &mut flume::Receiver<OutboxItem>,
    first: OutboxItem,
) -> Result<(), End>
where
    T: Frames,
{
    let now = Instant::now();
    let mut next = Some(first);
    let mut n = 0;
    while let Some(out) = next {
        match out {
            OutboxItem::Msg(d) => {
                let seq = d.seq();
                if seq > live.last_sent {
                    io.write(ToClient::Shared(d), false).await?;
                    live.sent(seq, now);
                }
            }
            OutboxItem::Room(d) => io.write(ToClient::Shared(d), false).await?,
            OutboxItem::Read(seq) if seq > live.read_told => {
                live.read_told = seq;
                let read = ServerFrame::Read { seq };
                io.write(ToClient::Frame(read), false).await?
            }
            OutboxItem::Read(_) => {}
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
        ClientFrame::Ping => Some(ServerFrame::Pong),
        ClientFrame::Ack { seq } if seq > live.last_sent => Some(ServerFrame::error(
            ErrorCode::BadRequest,
            format!("ack {seq} is beyond the last seq sent ({})", live.last_sent),
        )),
        ClientFrame::Ack { seq } => {
            shared.metrics.acks.increment(1);
            live.acked(seq);
            None
        }
        ClientFrame::Read { seq } => on_read(shared, live, seq).await,
        ClientFrame::Send(send) => match accept_send(shared, live, send) {
            Ok(fut) => {
                live.inflight
                    .get_or_insert_with(Default::default)
                    .push_back(fut);
                None
            }
            Err(frame) => Some(*frame),
        },
        ClientFrame::Login(_) => Some(ServerFrame::error(
            ErrorCode::BadRequest,
            "already logged in",
        )),
        ClientFrame::Refresh { token } => Some(on_refresh(shared, live, &token)),
        ClientFrame::Join { room } => on_join(shared, live, room),
        ClientFrame::Leave { room } => {
            if let Some(i) = live.rooms.iter().position(|r| *r == room) {
                live.rooms.swap_remove(i);
                shared
                    .hub
                    .leave_room(&room, live.uid(), live.device(), live.conn_id);
            }
            None
        }
        ClientFrame::Publish { room, body } => on_publish(shared, live, room, body).await,
    };
    match answer {
        Some(answer) => reply(io, live, answer).await,
        None => Ok(()),
    }
}

/// A `read` frame: raises the user's read position; an error frame if refused.
async fn on_read(shared: &Shared, live: &mut Live, seq: u64) -> Option<ServerFrame> {
    // A read is a store write like a send: under the same quota.
    if live.over_quota(&shared.cfg.limits) {
        return Some(Refusal::rate_limited().into());
    }
    let raised = match reads::check(seq, live.last_sent) {
        Ok(()) => shared
            .store
            .set_read(live.uid(), seq, live.conn_id)
            .await
            .map_err(Refusal::from),
        Err(r) => Err(r),
    };
    raised.err().map(Into::into)
}

/// A `refresh` frame: a newer token for the same uid moves the connection's expiry.
fn on_refresh(shared: &Shared, live: &mut Live, token: &str) -> ServerFrame {
    match shared.auth.verify(token) {
        Ok(id) if id.uid == live.uid() => {
            live.exp = id.exp;
            live.expires = expiry(id.exp);
            ServerFrame::Refreshed { exp: id.exp }
        }
        Ok(_) => ServerFrame::error(
            ErrorCode::Unauthorized,
            "a refresh token must be for the uid of the connection",
        ),
        Err(e) => ServerFrame::error(ErrorCode::Unauthorized, e.to_string()),
    }
}

/// A `join` frame; an error frame if refused.
fn on_join(shared: &Shared, live: &mut Live, room: String) -> Option<ServerFrame> {
    if !is_valid_id(&room) {
        return Some(Refusal::bad_id("room").into());
    }
    if live.rooms.contains(&room) {
        return None;
    }
    if live.rooms.len() >= shared.cfg.limits.max_rooms_per_connection {
        return Some(ServerFrame::error(
            ErrorCode::BadRequest,
            format!(
                "a connection joins at most {} rooms (--max-rooms-per-connection)",
                shared.cfg.limits.max_rooms_per_connection
            ),
        ));
    }
    shared
        .hub
        .join_room(&room, live.uid(), live.device(), live.conn_id, None);
    live.rooms.push(room);
    None
}

/// A `publish` frame to a joined room; an error frame if refused.
async fn on_publish(
    shared: &Shared,
    live: &mut Live,
    room: String,
    body: serde_json::Value,
) -> Option<ServerFrame> {
    if let Err(r) = rooms::check_publish(shared.cfg.limits.max_body, &room, &body) {
        return Some(r.into());
    }
    if !live.rooms.contains(&room) {
        return Some(ServerFrame::error(
            ErrorCode::NotMember,
            format!("join {room:?} before publishing to it"),
        ));
    }
    if live.over_quota(&shared.cfg.limits) {
        return Some(Refusal::rate_limited().into());
    }
    let published = rooms::publish(shared.bus.as_ref(), &room, live.uid(), body).await;
    published.err().map(Into::into)
}

/// Answers a client frame at once, unless sends before it still wait for the store: then
/// the answer queues behind theirs, so a connection's answers keep the order of its frames
/// (an error for a send with a bad id has no id to match it by).
async fn reply<T>(io: &mut Io<T>, live: &mut Live, answer: ServerFrame) -> Result<(), End>
where
    T: Frames,
{
    match live.inflight.as_mut() {
        Some(queue) if !queue.is_empty() => {
            queue.push_back(futures::future::ready(Box::new(answer)).boxed());
            Ok(())
        }
        _ => io.write(ToClient::Frame(answer), true).await,
    }
}

/// The instant a token expiring at `exp` (Unix seconds) stops being accepted, with the
/// verification leeway; far in the future for a token that never expires in practice.
fn expiry(exp: u64) -> Instant {
    let left = exp
        .saturating_add(crate::auth::LEEWAY_SECS)
        .saturating_sub(crate::auth::unix_now());
    Instant::now()
        .checked_add(Duration::from_secs(left))
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600))
}

/// Checks a `send` and returns the future that stores it and yields the answer frame.
fn accept_send(
    shared: &Arc<Shared>,
    live: &mut Live,
    send: imgate_proto::Send,
) -> Result<BoxFuture<'static, Box<ServerFrame>>, Box<ServerFrame>> {
    let refused = |r: Refusal| Box::new(ServerFrame::from(r));
    let prepared = send::prepare(shared.cfg.limits.max_body, live.uid(), send).map_err(refused)?;
    if live.over_quota(&shared.cfg.limits) {
        return Err(refused(
            Refusal::rate_limited().for_send(&prepared.draft.id),
        ));
    }
    let shared = shared.clone();
    Ok(async move {
        let notify = shared.notifier.as_ref();
        let stored = send::commit(&shared.store, &shared.metrics, notify, prepared).await;
        Box::new(match stored {
            Ok(s) => ServerFrame::Sent {
                id: s.id,
                seq: s.seq,
                ts: s.ts,
            },
            Err(r) => r.into(),
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

    fn ack_deadline(&self, timers: &Timers) -> Option<Instant> {
        self.unacked.front().map(|(_, t)| *t + timers.ack_timeout)
    }

    fn idle_deadline(&self, timers: &Timers) -> Instant {
        if self.client_acks {
            self.last_activity + timers.idle_timeout
        } else {
            // Nothing to wait for: the client never speaks. Far enough to never fire.
            self.last_activity + Duration::from_secs(365 * 24 * 3600)
        }
    }

    fn deadline(&self, timers: &Timers) -> Instant {
        let idle = self.idle_deadline(timers).min(self.expires);
        self.ack_deadline(timers).map_or(idle, |a| a.min(idle))
    }
}

#[cfg(test)]
mod tests;
