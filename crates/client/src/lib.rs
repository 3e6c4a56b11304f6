//! Async Rust client for imgate over TCP (msgpack) or WebSocket (JSON or msgpack).
//!
//! A cloneable [`Client`] handle sends [`Command`]s to one connection task (the actor),
//! which logs in, hands messages to an [`Events`] receiver, acks them automatically,
//! deduplicates by seq, and on a lost connection reconnects and resumes after the last seq
//! it saw, re-sending unanswered sends with their original ids (the server dedupes them).
//! Given a [`ClientBuilder::token_source`], it also fetches a new token before the one in
//! use expires, hands it to the gateway with `refresh`, and logs in with it after an expiry.
//!
//! ```no_run
//! # async fn demo() -> Result<(), imgate_client::Error> {
//! let (client, mut events) = imgate_client::ClientBuilder::new("tcp://127.0.0.1:7070", "<jwt>")
//!     .device("laptop")
//!     .connect()
//!     .await?;
//! let sent = client.send_to("bob", serde_json::json!({"text": "hi"})).await?;
//! while let Some(ev) = events.recv().await {
//!     if let imgate_client::Event::Msg(m) = ev { println!("{} from {}", m.seq, m.from); }
//! }
//! # let _ = sent; Ok(()) }
//! ```

mod conn;
mod error;
mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use imgate_proto::{ClientFrame, Login, Message, Send, ServerFrame};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use error::{Error, ErrorKind};
pub use imgate_proto::{ByeReason, Encoding, ErrorCode};

use conn::Conn;

/// Messages received before an ack is sent without waiting for the ack interval.
const ACK_EVERY: u64 = 64;
/// Longest time a received message stays unacked.
const ACK_INTERVAL: Duration = Duration::from_millis(200);
/// First and longest pause between reconnect attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Longest wait for the server to confirm the last ack when closing.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// With a token source, a new token is fetched once this share of the time the current
/// one had left (at login or at its refresh) has passed.
const REFRESH_AT: f64 = 0.8;
/// Pause before asking a token source again after it failed.
const TOKEN_RETRY: Duration = Duration::from_secs(1);

/// Fetches a fresh token for the same uid (for example from the application's backend).
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + std::marker::Send>>;

/// A token callback, cheap to clone; see [`ClientBuilder::token_source`].
#[derive(Clone)]
struct TokenSource(Arc<dyn Fn() -> TokenFuture + std::marker::Send + Sync>);

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource")
    }
}

/// What the client reports to its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Logged in (again); `gap` means messages after the resume point are gone (retention),
    /// or the store was reset (a new `epoch`): the inbox starts over from what it retains.
    Welcome {
        resume: u64,
        gap: bool,
        epoch: String,
        /// Expiry of the token in force (Unix seconds).
        exp: u64,
        /// The user's read position, and the messages above it the user did not send.
        read: u64,
        unread: u64,
    },
    /// A stored message, in seq order, never twice.
    Msg(Message),
    /// The user's read position rose (set on another device, or over HTTP).
    Read { seq: u64 },
    /// A room message.
    Room {
        room: String,
        from: String,
        body: Value,
    },
    /// An error that answers no send (for example a bad ack).
    Error { code: ErrorCode, message: String },
    /// The connection closed; the client reconnects unless reconnecting is off.
    Disconnected { reason: Option<ByeReason> },
    /// The gateway accepted a newer token ([`Client::refresh`], or one from the token
    /// source): the connection lasts until `exp` (Unix seconds).
    Refreshed { exp: u64 },
}

/// The answer to a send: the message is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub id: String,
    pub seq: u64,
    pub ts: u64,
}

/// Receives [`Event`]s. Unbounded: the actor never waits on the owner, so a caller that
/// sends without reading its events cannot deadlock the client.
pub type Events = mpsc::UnboundedReceiver<Event>;

/// Builds a [`Client`]. Every default is set in [`ClientBuilder::new`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    /// Gateways to try, in turn: the first, then the fallbacks.
    urls: Vec<String>,
    token: String,
    device: Option<String>,
    resume: Option<u64>,
    epoch: Option<String>,
    encoding: Encoding,
    reconnect: bool,
    max_frame: usize,
    timeout: Duration,
    local_addr: Option<std::net::IpAddr>,
    /// Roots for `tls://` and `wss://`: the system's, or a private CA's.
    tls: tls::Roots,
    token_source: Option<TokenSource>,
}

impl ClientBuilder {
    /// `url` is `tcp://host:port` or `ws://host:port[/v1/ws]`, or with TLS
    /// `tls://host:port` or `wss://host:port[/v1/ws]`.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientBuilder {
            urls: vec![url.into()],
            token: token.into(),
            device: None,
            resume: None,
            epoch: None,
            encoding: Encoding::Json,
            reconnect: true,
            max_frame: imgate_proto::DEFAULT_MAX_FRAME,
            timeout: Duration::from_secs(10),
            local_addr: None,
            tls: tls::Roots::default(),
            token_source: None,
        }
    }

    /// Where a new token comes from when the one in use nears its expiry (80% of the time
    /// it had left has passed) or has expired: the client then refreshes the connection
    /// with it, or logs in with it after `bye expired` or a refused login. Without one, the
    /// owner calls [`Client::refresh`] itself.
    pub fn token_source<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn() -> Fut + std::marker::Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + std::marker::Send + 'static,
    {
        self.token_source = Some(TokenSource(Arc::new(move || Box::pin(f()))));
        self
    }

    /// Trust only the CA certificates of this PEM file for `tls://` and `wss://` (default:
    /// the system's roots).
    pub fn ca(mut self, pem: impl Into<std::path::PathBuf>) -> Self {
        self.tls = tls::Roots::from_file(pem.into());
        self
    }

    /// Another gateway of the same cluster to reconnect to when the current one fails;
    /// the client rotates through all of them.
    pub fn fallback(mut self, url: impl Into<String>) -> Self {
        self.urls.push(url.into());
        self
    }

    pub fn device(mut self, device: impl Into<String>) -> Self {
        self.device = Some(device.into());
        self
    }

    /// Resume after this seq on the first login (`Some(0)`: the whole retained inbox).
    pub fn resume(mut self, seq: Option<u64>) -> Self {
        self.resume = seq;
        self
    }

    /// The store epoch the `resume` seq belongs to (from an earlier [`Event::Welcome`]): a
    /// store reset since then is then told by the welcome's gap, never missed.
    pub fn epoch(mut self, epoch: Option<String>) -> Self {
        self.epoch = epoch;
        self
    }

    /// WebSocket encoding (TCP is always msgpack).
    pub fn encoding(mut self, enc: Encoding) -> Self {
        self.encoding = enc;
        self
    }

    /// Reconnect and resume on a lost connection (default on).
    pub fn reconnect(mut self, on: bool) -> Self {
        self.reconnect = on;
        self
    }

    /// The local address to connect from (default: the system's choice). A load generator
    /// spreads connections over several loopback addresses so that one source address's
    /// ephemeral ports do not run out.
    pub fn local_addr(mut self, ip: std::net::IpAddr) -> Self {
        self.local_addr = Some(ip);
        self
    }

    /// Time allowed to connect and log in.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Connects and logs in; fails if the first login fails.
    pub async fn connect(self) -> Result<(Client, Events), Error> {
        let (conn, welcome) = self
            .login(&self.urls[0], self.resume, self.epoch.as_deref())
            .await?;
        let (epoch, exp) = match &welcome {
            Event::Welcome { epoch, exp, .. } => (Some(epoch.clone()), Some(*exp)),
            _ => (None, None),
        };
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let _ = ev_tx.send(welcome);
        let actor = Actor {
            builder: self,
            events: ev_tx,
            commands: cmd_rx,
            last_seq: None,
            epoch,
            acked: 0,
            pending: HashMap::new(),
            order: 0,
            url: 0,
            refresh_due: exp.map(refresh_time),
        };
        tokio::spawn(actor.run(conn));
        Ok((Client { tx: cmd_tx }, ev_rx))
    }

    async fn login(
        &self,
        url: &str,
        resume: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<(Conn, Event), Error> {
        tokio::time::timeout(self.timeout, async {
            let mut conn = Conn::open(self, url, resume, epoch).await?;
            if conn.needs_login_frame() {
                let login = ClientFrame::Login(Login {
                    token: self.token.clone(),
                    device: self.device.clone(),
                    resume,
                    epoch: resume.and(epoch).map(str::to_owned),
                });
                conn.frames.send(login).await?;
            }
            match conn.frames.next().await {
                Some(Ok(ServerFrame::Welcome {
                    resume,
                    gap,
                    epoch,
                    exp,
                    read,
                    unread,
                    ..
                })) => Ok((
                    conn,
                    Event::Welcome {
                        resume,
                        gap,
                        epoch,
                        exp: exp.unwrap_or(0),
                        read,
                        unread,
                    },
                )),
                Some(Ok(ServerFrame::Error { code, message, .. })) => {
                    Err(Error::new(ErrorKind::Server(code), message))
                }
                Some(Ok(other)) => Err(Error::new(
                    ErrorKind::Protocol,
                    format!("expected welcome, got {other:?}"),
                )),
                Some(Err(e)) => Err(e),
                None => Err(Error::new(ErrorKind::Closed, "closed before welcome")),
            }
        })
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, "login timed out"))?
    }
}

/// A handle to one logical connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
}

/// What the handle asks of the actor.
#[derive(Debug)]
enum Command {
    Send(Send, oneshot::Sender<Result<Sent, Error>>),
    Frame(ClientFrame),
    Refresh(String),
    Reconnect,
    Close(oneshot::Sender<()>),
}

impl Client {
    /// Sends a direct message with a fresh id; resolves once it is durable.
    pub async fn send_to(&self, to: &str, body: Value) -> Result<Sent, Error> {
        self.send(Send {
            id: None,
            to: Some(to.to_owned()),
            group: None,
            body,
        })
        .await
    }

    /// Sends any `send` frame. Without an id one is made here, so a resend after a
    /// reconnect is deduplicated by the server.
    pub async fn send(&self, mut send: Send) -> Result<Sent, Error> {
        if send.id.is_none() {
            send.id = Some(format!("c-{:016x}", rand::random::<u64>()));
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Send(send, reply))
            .await
            .map_err(|_| Error::closed())?;
        rx.await.map_err(|_| Error::closed())?
    }

    /// Tells the gateway the user has read everything up to `seq` (a seq this connection
    /// received). The user's other connections get [`Event::Read`]; a lower `seq` than the
    /// stored position changes nothing.
    pub async fn read(&self, seq: u64) -> Result<(), Error> {
        self.frame(ClientFrame::Read { seq }).await
    }

    /// Sends a raw frame (join, leave, publish, ping, a manual ack).
    pub async fn frame(&self, frame: ClientFrame) -> Result<(), Error> {
        self.tx
            .send(Command::Frame(frame))
            .await
            .map_err(|_| Error::closed())
    }

    /// Hands the gateway a newer token for the same uid before the current one expires
    /// (answered by [`Event::Refreshed`], or [`Event::Error`] `unauthorized`); later
    /// reconnects log in with it.
    pub async fn refresh(&self, token: impl Into<String>) -> Result<(), Error> {
        self.tx
            .send(Command::Refresh(token.into()))
            .await
            .map_err(|_| Error::closed())
    }

    /// Drops the connection and reconnects with resume (tests use this to cut connections).
    pub async fn reconnect(&self) -> Result<(), Error> {
        self.tx
            .send(Command::Reconnect)
            .await
            .map_err(|_| Error::closed())
    }

    /// Acks what was received, then closes.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Actor {
    builder: ClientBuilder,
    events: mpsc::UnboundedSender<Event>,
    commands: mpsc::Receiver<Command>,
    /// Highest seq handed to the owner; anything at or below it is a duplicate.
    last_seq: Option<u64>,
    /// The store epoch `last_seq` belongs to.
    epoch: Option<String>,
    acked: u64,
    /// Sends waiting for `sent`, by id.
    pending: HashMap<String, Pending>,
    order: u64,
    /// Index in `builder.urls` of the gateway in use.
    url: usize,
    /// When to fetch a new token from the token source (none without one).
    refresh_due: Option<tokio::time::Instant>,
}

/// When to ask for the token after one that expires at `exp` (Unix seconds).
fn refresh_time(exp: u64) -> tokio::time::Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_secs(exp).saturating_sub(now);
    tokio::time::Instant::now() + left.mul_f64(REFRESH_AT)
}

/// Asks `source` for a token, in a task of its own so the connection goes on meanwhile.
fn fetch(source: &TokenSource) -> tokio::task::JoinHandle<Result<String, String>> {
    tokio::spawn((source.0)())
}

/// A send waiting for its answer: its order (for re-sending), the frame, the caller.
type Pending = (u64, Send, oneshot::Sender<Result<Sent, Error>>);

/// Why a connected loop ended.
enum Exit {
    Reconnect(Option<ByeReason>),
    Close,
}

impl Actor {
    async fn run(mut self, mut conn: Conn) {
        loop {
            let reason = match self.connected(&mut conn).await {
                Exit::Close => {
                    let _ = conn.frames.close().await;
                    return;
                }
                Exit::Reconnect(reason) => {
                    let _ = self.events.send(Event::Disconnected { reason });
                    if !self.builder.reconnect {
                        self.fail_pending(Error::closed());
                        return;
                    }
                    reason
                }
            };
            match self.reconnect(reason).await {
                Some(c) => conn = c,
                None => return,
            }
        }
    }

    /// A command from the handle; `Some` when the connection must end.
    async fn on_command(&mut self, conn: &mut Conn, cmd: Option<Command>) -> Option<Exit> {
        let sent = match cmd {
            None => return Some(Exit::Close),
            Some(Command::Close(done)) => {
                self.close_gracefully(conn).await;
                let _ = done.send(());
                return Some(Exit::Close);
            }
            Some(Command::Reconnect) => return Some(Exit::Reconnect(None)),
            Some(Command::Frame(f)) => conn.frames.send(f).await,
            Some(Command::Refresh(token)) => {
                self.builder.token = token.clone();
                conn.frames.send(ClientFrame::Refresh { token }).await
            }
            Some(Command::Send(send, reply)) => {
                let id = send.id.clone().expect("the handle sets an id");
                self.order += 1;
                let frame = ClientFrame::Send(send.clone());
                self.pending.insert(id, (self.order, send, reply));
                conn.frames.send(frame).await
            }
        };
        sent.is_err().then_some(Exit::Reconnect(None))
    }

    /// The token source's answer: a new token is sent as a `refresh`; a failure asks again
    /// after [`TOKEN_RETRY`] (the connection loop moves its timer). `Some` when the
    /// connection must end.
    async fn on_token(&mut self, conn: &mut Conn, fetched: Result<String, String>) -> Option<Exit> {
        match fetched {
            Ok(token) => {
                self.builder.token = token.clone();
                let sent = conn.frames.send(ClientFrame::Refresh { token }).await;
                sent.is_err().then_some(Exit::Reconnect(None))
            }
            Err(e) => {
                tracing::warn!(error = %e, "the token source failed; asking again");
                self.refresh_due = Some(tokio::time::Instant::now() + TOKEN_RETRY);
                None
            }
        }
    }

    /// Serves one connection until it ends.
    async fn connected(&mut self, conn: &mut Conn) -> Exit {
        // Armed only while something received is unacked, so an idle client (or one that
        // only sees room messages) never wakes for it.
        let ack_due = tokio::time::sleep(ACK_INTERVAL);
        tokio::pin!(ack_due);
        let mut armed = false;
        // The token source's answer, while one is being fetched.
        let mut fetching: Option<tokio::task::JoinHandle<Result<String, String>>> = None;
        let refresh_due = tokio::time::sleep_until(
            self.refresh_due
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365)),
        );
        tokio::pin!(refresh_due);
        loop {
            armed = self.arm_ack_timer(ack_due.as_mut(), armed);
            tokio::select! {
                cmd = self.commands.recv() => {
                    if let Some(exit) = self.on_command(conn, cmd).await {
                        return exit;
                    }
                }
                frame = conn.frames.next() => match frame {
                    Some(Ok(f)) => {
                        if let Some(exit) = self.on_frame(conn, f).await {
                            return exit;
                        }
                    }
                    Some(Err(_)) | None => return Exit::Reconnect(None),
                },
                () = &mut ack_due, if armed => {
                    if self.ack(conn).await.is_err() {
                        return Exit::Reconnect(None);
                    }
                }
                () = &mut refresh_due, if self.refresh_due.is_some() && fetching.is_none() => {
                    if let Some(source) = &self.builder.token_source {
                        fetching = Some(fetch(source));
                    }
                }
                fetched = async { fetching.as_mut().expect("guarded").await }, if fetching.is_some() => {
                    fetching = None;
                    let fetched = fetched.unwrap_or_else(|e| Err(e.to_string()));
                    if let Some(exit) = self.on_token(conn, fetched).await {
                        return exit;
                    }
                }
            }
            self.move_refresh_timer(refresh_due.as_mut());
        }
    }

    /// Starts the ack timer if something is unacked and it is not running; whether it runs.
    fn arm_ack_timer(&self, ack_due: Pin<&mut tokio::time::Sleep>, armed: bool) -> bool {
        match (self.unacked(), armed) {
            (true, false) => {
                ack_due.reset(tokio::time::Instant::now() + ACK_INTERVAL);
                true
            }
            (false, true) => false,
            _ => armed,
        }
    }

    /// Moves the token refresh timer to `self.refresh_due` when that changed.
    fn move_refresh_timer(&self, refresh_timer: Pin<&mut tokio::time::Sleep>) {
        if let Some(due) = self.refresh_due {
            if due != refresh_timer.deadline() {
                refresh_timer.reset(due);
            }
        }
    }

    async fn on_frame(&mut self, conn: &mut Conn, f: ServerFrame) -> Option<Exit> {
        match f {
            ServerFrame::Msg(m) => return self.on_msg(conn, m).await,
            ServerFrame::Sent { id, seq, ts } => {
                if let Some((_, _, reply)) = self.pending.remove(&id) {
                    let _ = reply.send(Ok(Sent { id, seq, ts }));
                }
            }
            ServerFrame::Error {
                id: Some(id),
                code,
                message,
            } if self.pending.contains_key(&id) => {
                let (_, _, reply) = self.pending.remove(&id).expect("checked");
                let _ = reply.send(Err(Error::new(ErrorKind::Server(code), message)));
            }
            ServerFrame::Error { code, message, .. } => {
                let _ = self.events.send(Event::Error { code, message });
            }
            ServerFrame::Welcome {
                resume,
                gap,
                epoch,
                exp,
                read,
                unread,
                ..
            } => {
                let exp = exp.unwrap_or(0);
                let _ = self.events.send(Event::Welcome {
                    resume,
                    gap,
                    epoch,
                    exp,
                    read,
                    unread,
                });
            }
            ServerFrame::Read { seq } => {
                let _ = self.events.send(Event::Read { seq });
            }
            ServerFrame::Room {
                room, from, body, ..
            } => {
                let _ = self.events.send(Event::Room { room, from, body });
            }
            ServerFrame::Pong => {}
            ServerFrame::Refreshed { exp } => {
                if self.builder.token_source.is_some() {
                    self.refresh_due = Some(refresh_time(exp));
                }
                let _ = self.events.send(Event::Refreshed { exp });
            }
            ServerFrame::Bye { reason } => return Some(Exit::Reconnect(Some(reason))),
        }
        None
    }

    /// A stored message: to the owner unless a duplicate; acked once [`ACK_EVERY`] seqs are new.
    async fn on_msg(&mut self, conn: &mut Conn, m: Message) -> Option<Exit> {
        if self.last_seq.is_some_and(|last| m.seq <= last) {
            return None;
        }
        self.last_seq = Some(m.seq);
        let _ = self.events.send(Event::Msg(m));
        if self.last_seq.unwrap_or(0) >= self.acked + ACK_EVERY && self.ack(conn).await.is_err() {
            return Some(Exit::Reconnect(None));
        }
        None
    }

    /// Acks what was received and waits for a pong: the server handles frames in order, so
    /// the pong means the ack was taken before the connection closes.
    async fn close_gracefully(&mut self, conn: &mut Conn) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            self.ack(conn).await?;
            conn.frames.send(ClientFrame::Ping).await?;
            while let Some(f) = conn.frames.next().await {
                if matches!(f?, ServerFrame::Pong) {
                    break;
                }
            }
            Ok::<_, Error>(())
        })
        .await;
    }

    fn unacked(&self) -> bool {
        self.last_seq.is_some_and(|seq| seq > self.acked)
    }

    /// Acks everything received, if anything is new.
    async fn ack(&mut self, conn: &mut Conn) -> Result<(), Error> {
        match self.last_seq {
            Some(seq) if seq > self.acked => {
                conn.frames.send(ClientFrame::Ack { seq }).await?;
                self.acked = seq;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Reconnects with backoff, resuming after the last seq seen, and re-sends unanswered
    /// sends in their original order. `None` when the owner is gone or login is refused.
    async fn reconnect(&mut self, reason: Option<ByeReason>) -> Option<Conn> {
        let mut pause = RECONNECT_MIN;
        // After an expiry the token in hand is no good: ask for another first.
        let mut need_token = reason == Some(ByeReason::Expired);
        loop {
            if need_token && self.renew_token().await {
                need_token = false;
            }
            if self.events.is_closed() && self.commands.is_closed() {
                return None;
            }
            let (resume, epoch) = self.resume_point();
            let url = &self.builder.urls[self.url];
            match self.builder.login(url, resume, epoch.as_deref()).await {
                Ok((mut conn, welcome)) => {
                    self.take_welcome(welcome);
                    // Acks sent on the old connection may have been lost: ack again.
                    self.acked = 0;
                    self.resend_pending(&mut conn).await;
                    return Some(conn);
                }
                Err(e) if e.kind() == ErrorKind::Server(ErrorCode::Unauthorized) => {
                    // With a token source a refused token may just be old: one more try
                    // with a fresh one.
                    if self.builder.token_source.is_some() && !need_token && pause == RECONNECT_MIN
                    {
                        need_token = true;
                        pause *= 2;
                        continue;
                    }
                    tracing::warn!(error = %e, "login refused; not reconnecting");
                    self.fail_pending(e);
                    return None;
                }
                Err(e) => {
                    tracing::debug!(error = %e, url, "reconnect failed; trying the next gateway");
                    self.url = (self.url + 1) % self.builder.urls.len();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RECONNECT_MAX);
                }
            }
        }
    }

    /// Asks the token source, [`TOKEN_RETRY`] apart, until it gives a token; `false` without one.
    async fn renew_token(&mut self) -> bool {
        let Some(source) = &self.builder.token_source else {
            return false;
        };
        loop {
            match fetch(source).await.unwrap_or_else(|e| Err(e.to_string())) {
                Ok(token) => {
                    self.builder.token = token;
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the token source failed; asking again");
                    tokio::time::sleep(TOKEN_RETRY).await;
                }
            }
        }
    }

    /// Where a login resumes: after the last seq seen, or before any, where the builder says.
    fn resume_point(&self) -> (Option<u64>, Option<String>) {
        match self.last_seq {
            Some(seq) => (Some(seq), self.epoch.clone()),
            None => (self.builder.resume, self.builder.epoch.clone()),
        }
    }

    /// Takes in a reconnect's welcome (its epoch and token expiry) and hands it to the owner.
    fn take_welcome(&mut self, welcome: Event) {
        if let Event::Welcome {
            epoch, resume, exp, ..
        } = &welcome
        {
            // Another store: its seqs start over, so the dedupe by seq does too.
            if self.epoch.as_ref() != Some(epoch) {
                self.last_seq = (*resume > 0).then_some(*resume);
                self.epoch = Some(epoch.clone());
            }
            if self.builder.token_source.is_some() {
                self.refresh_due = Some(refresh_time(*exp));
            }
        }
        let _ = self.events.send(welcome);
    }

    /// Re-sends the sends still unanswered, in their original order, until one fails.
    async fn resend_pending(&mut self, conn: &mut Conn) {
        let mut unanswered: Vec<_> = self
            .pending
            .values()
            .map(|(o, s, _)| (*o, s.clone()))
            .collect();
        unanswered.sort_by_key(|(o, _)| *o);
        for (_, s) in unanswered {
            if conn.frames.send(ClientFrame::Send(s)).await.is_err() {
                break;
            }
        }
    }

    fn fail_pending(&mut self, e: Error) {
        for (_, (_, _, reply)) in self.pending.drain() {
            let _ = reply.send(Err(e.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgate_proto::{decode, encode, FrameCodec};
    use tokio_util::codec::Framed;

    type Server = Framed<tokio::net::TcpStream, FrameCodec>;

    async fn to_client(s: &mut Server, f: ServerFrame) {
        s.send(encode(&f, Encoding::Msgpack).unwrap())
            .await
            .unwrap();
    }

    /// The next frame from the client, or `None` if none comes within `wait`.
    async fn from_client(s: &mut Server, wait: Duration) -> Option<ClientFrame> {
        let read = tokio::time::timeout(wait, s.next()).await.ok()?;
        Some(decode(&read.expect("open").unwrap(), Encoding::Msgpack).unwrap())
    }

    fn msg(seq: u64) -> ServerFrame {
        ServerFrame::Msg(Message {
            seq,
            id: format!("m{seq}"),
            from: "bob".into(),
            to: Some("alice".into()),
            group: None,
            ts: 1,
            body: serde_json::json!({"n": seq}).into(),
        })
    }

    #[tokio::test]
    async fn a_lone_message_is_acked_after_the_interval_and_an_idle_client_sends_nothing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("tcp://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let mut s = Framed::new(sock, FrameCodec::new(imgate_proto::DEFAULT_MAX_FRAME));
            let login = from_client(&mut s, Duration::from_secs(5)).await;
            assert!(matches!(login, Some(ClientFrame::Login(_))), "{login:?}");
            let welcome = ServerFrame::Welcome {
                uid: "alice".into(),
                device: "d".into(),
                resume: 0,
                gap: false,
                epoch: "e1".into(),
                exp: None,
                read: 0,
                unread: 0,
            };
            to_client(&mut s, welcome).await;
            s
        });
        let (client, mut events) = ClientBuilder::new(url, "t").connect().await.unwrap();
        let mut s = server.await.unwrap();
        assert!(matches!(events.recv().await, Some(Event::Welcome { .. })));

        // Nothing received: nothing to ack, so nothing is sent.
        assert_eq!(from_client(&mut s, ACK_INTERVAL * 3).await, None);
        for seq in [7, 8] {
            let sent_at = tokio::time::Instant::now();
            to_client(&mut s, msg(seq)).await;
            let ack = from_client(&mut s, ACK_INTERVAL * 5).await;
            assert_eq!(ack, Some(ClientFrame::Ack { seq }));
            assert!(
                sent_at.elapsed() >= ACK_INTERVAL,
                "acked before the interval"
            );
            assert!(matches!(events.recv().await, Some(Event::Msg(m)) if m.seq == seq));
            // Acked once, not again while nothing new arrives.
            assert_eq!(from_client(&mut s, ACK_INTERVAL * 3).await, None);
        }
        drop(client);
    }
}
