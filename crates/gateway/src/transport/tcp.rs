//! The TCP transport: length-prefixed msgpack frames on a socket, or inside TLS when the
//! gateway has a certificate (docs/protocol.md, "Frames over TCP" and "TLS and slow
//! clients").
//!
//! It accepts (a connection permit first, backing off on accept errors), shakes hands
//! (TLS, within the login timeout, in the connection's own task), frames with
//! [`imgate_proto::FrameCodec`], decodes and encodes msgpack, and hands the framed socket to
//! [`crate::session::run`]. It holds no session state of its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use imgate_proto::{decode, ClientFrame, Encoding, FrameCodec, FrameError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

use crate::delivery::outbox::ToClient;
use crate::per_ip::Refuse;
use crate::session::{self, Coded, Frames, InError, Incoming, Profile, Start};
use crate::state::Shared;

/// Initial read and write buffer of a TCP connection. Small, because most connections are
/// idle most of the time; buffers grow when a frame needs it.
const TCP_BUFFER: usize = 128;
/// Longest pause after repeated accept errors (for example, out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts until shutdown; each connection runs as a task on `tracker`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let (permits, tracker) = (&shared.admission.permits, &shared.admission.tracker);
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shared.shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shared.shutdown.cancelled() => return,
        };
        let sock = match accepted {
            Ok((sock, _peer)) => {
                backoff = Duration::from_millis(5);
                sock
            }
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        let refuse = match shared.admission.tls {
            None => Refuse::Tcp,
            Some(_) => Refuse::Silently,
        };
        let Some(slot) = shared.admission.per_ip.admit(&sock, refuse) else {
            continue;
        };
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        let Some(tls) = shared.admission.tls.clone() else {
            // The socket is framed and boxed before the connection's future is made: a
            // future keeps room for what it captured for its whole life (what each idle
            // connection costs).
            let frames = transport(sock, &shared);
            tracker.spawn(async move {
                session::run(shared, frames, start(), Profile::TCP).await;
                drop((permit, slot));
            });
            continue;
        };
        tracker.spawn(async move {
            if let Some(stream) = tls.accept(sock, shared.cfg.timers.login_timeout).await {
                let frames = transport(stream, &shared);
                session::run(shared, frames, start(), Profile::TCP).await;
            }
            drop((permit, slot));
        });
    }
}

fn start() -> Box<Start> {
    Box::new(Start::AwaitLogin {
        device: None,
        resume: None,
        epoch: None,
    })
}

/// The most a TCP frame may hold before login (the first frame must be the login): what a
/// client that has not shown a token can make the gateway buffer.
const MAX_LOGIN_FRAME: usize = 16 * 1024;

/// The socket (plain or TLS), boxed, framing and decoding msgpack.
fn transport<S>(sock: S, shared: &Shared) -> impl Frames + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let codec = FrameCodec::with_first(MAX_LOGIN_FRAME, shared.cfg.limits.max_frame);
    Box::pin(Coded {
        socket: Framed::with_capacity(sock, codec, TCP_BUFFER),
        encode: |o: ToClient| o.encode(Encoding::Msgpack),
        decode: |r: Result<BytesMut, FrameError>| match r {
            Ok(bytes) => Ok(match decode::<ClientFrame>(&bytes, Encoding::Msgpack) {
                Ok(f) => Incoming::Frame(Box::new(f)),
                Err(e) => Incoming::Malformed(e.to_string()),
            }),
            Err(FrameError::TooLarge { .. }) => Err(InError::TooLarge),
            Err(FrameError::Io(_)) => Err(InError::Closed),
        },
    })
}
