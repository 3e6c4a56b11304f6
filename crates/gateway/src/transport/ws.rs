//! The WebSocket transport at `GET /v1/ws` (docs/protocol.md, "Frames over WebSocket").
//!
//! Subprotocol `imgate.json` (text frames, the default) or `imgate.msgpack` (binary). A token
//! in `?token=` or `Authorization: Bearer` is checked before the upgrade (401 if bad) and the
//! session starts with `welcome`; otherwise the first frame must be `login`. Text frames are
//! read as JSON and binary frames as msgpack whatever the subprotocol; the server answers in
//! the negotiated one. Buffer and message limits are ours, not the library's defaults. A peer
//! that breaks the WebSocket protocol is closed with code 1002 (1007 for text that is not
//! UTF-8).

use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::{future, Sink, Stream};
use imgate_proto::{decode, ClientFrame, Encoding, ErrorCode};
use serde::Deserialize;

use super::extract::{bearer, ApiQuery};
use crate::delivery::outbox::ToClient;
use crate::refusal::Refusal;
use crate::session::{self, Coded, Frames, InError, Incoming, Preauth, Profile, Start};
use crate::state::Shared;

/// tungstenite's initial read buffer (its default is 128 KiB per connection, allocated up
/// front). It grows to hold a larger frame; small, because most connections are idle, and
/// heaptrack showed a 4 KiB buffer as the largest allocation of an idle WebSocket.
const WS_READ_BUFFER: usize = 256;
/// Bytes tungstenite collects before it writes to the socket; small so frames go out at
/// once and idle connections hold little.
const WS_WRITE_BUFFER: usize = 0;

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    token: Option<String>,
    device: Option<String>,
    resume: Option<u64>,
    epoch: Option<String>,
}

/// The upgrade handler.
pub async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ApiQuery(q): ApiQuery<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let start = Box::new(match q.token.or_else(|| bearer(&headers)) {
        Some(token) => match shared.auth.verify(&token) {
            Ok(identity) => Start::Verified(Preauth {
                identity,
                device: q.device,
                resume: q.resume,
                epoch: q.epoch,
            }),
            Err(e) => return Refusal::new(ErrorCode::Unauthorized, e.to_string()).into_response(),
        },
        None => Start::AwaitLogin {
            device: q.device,
            resume: q.resume,
            epoch: q.epoch,
        },
    });
    let Ok(permit) = shared.admission.permits.clone().try_acquire_owned() else {
        return Refusal::new(ErrorCode::Unavailable, "connection limit reached").into_response();
    };
    let max = shared.cfg.limits.max_frame;
    let ws = ws
        .protocols([
            Encoding::Json.subprotocol(),
            Encoding::Msgpack.subprotocol(),
        ])
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER);
    let enc = ws
        .selected_protocol()
        .and_then(|p| p.to_str().ok())
        .and_then(Encoding::from_subprotocol)
        .unwrap_or(Encoding::Json);
    let tracker = shared.admission.tracker.clone();
    ws.on_upgrade(move |socket| {
        // The socket is wrapped and boxed before the connection's future is made: a future
        // keeps room for what it captured for its whole life.
        let frames = transport(socket, enc);
        // The session is its own task, not the future axum's upgrade task awaits: that task
        // keeps the upgrade's config, protocol and callback (160 bytes) beside it for the
        // connection's life, which took its task cell to the next 128-byte size.
        tracker.spawn(async move {
            session::run(shared, frames, start, Profile::WS).await;
            drop(permit);
        });
        future::ready(())
    })
}

/// The socket, boxed, encoding and decoding frames in `enc`.
fn transport(socket: WebSocket, enc: Encoding) -> impl Frames + std::marker::Send {
    let violation = Arc::new(AtomicU16::new(0));
    let seen = violation.clone();
    Box::pin(Coded {
        socket: Closing { socket, violation },
        encode: move |o: ToClient| match enc {
            // A check of the JSON's UTF-8 per connection (about 10 ns for a 300-byte
            // message frame), the price of the outbox knowing no WebSocket type.
            Encoding::Json => {
                Message::Text(Utf8Bytes::try_from(o.encode(enc)).expect("JSON is UTF-8"))
            }
            Encoding::Msgpack => Message::Binary(o.encode(enc)),
        },
        decode: move |r: Result<Message, axum::Error>| match r {
            Ok(Message::Text(t)) => Ok(frame(decode(t.as_bytes(), Encoding::Json))),
            Ok(Message::Binary(b)) => Ok(frame(decode(&b, Encoding::Msgpack))),
            Ok(Message::Ping(_) | Message::Pong(_)) => Ok(Incoming::Activity),
            Ok(Message::Close(_)) => Err(InError::Closed),
            Err(e) if is_capacity(&e) => Err(InError::TooLarge),
            Err(e) => {
                if let Some(code) = violation_code(&e) {
                    seen.store(code, Ordering::Relaxed);
                }
                Err(InError::Closed)
            }
        },
    })
}

/// The close code for a peer that broke the WebSocket protocol: 1007 for a text message
/// that is not UTF-8, 1002 for any other violation; `None` for a connection that just went.
fn violation_code(e: &axum::Error) -> Option<u16> {
    use tokio_tungstenite::tungstenite::Error;
    match std::error::Error::source(e)?.downcast_ref::<Error>()? {
        Error::Utf8(_) => Some(1007),
        Error::Protocol(_) => Some(1002),
        _ => None,
    }
}

/// The socket, closing with the violation's code (when the peer broke the protocol) instead
/// of a close frame without one.
struct Closing {
    socket: WebSocket,
    /// 0, or the close code to send.
    violation: Arc<AtomicU16>,
}

impl Sink<Message> for Closing {
    type Error = axum::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        Pin::new(&mut self.socket).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let code = self.violation.load(Ordering::Relaxed);
        if code != 0 {
            // Queued once the socket takes it; a socket that fails is closed all the same.
            match Pin::new(&mut self.socket).poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {
                    let reason = if code == 1007 {
                        "text message is not UTF-8"
                    } else {
                        "protocol violation"
                    };
                    let _ =
                        Pin::new(&mut self.socket).start_send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })));
                }
                Poll::Ready(Err(_)) => {}
            }
            self.violation.store(0, Ordering::Relaxed);
        }
        Pin::new(&mut self.socket).poll_close(cx)
    }
}

impl Stream for Closing {
    type Item = Result<Message, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.socket).poll_next(cx)
    }
}

fn frame(r: Result<ClientFrame, imgate_proto::DecodeError>) -> Incoming {
    match r {
        Ok(f) => Incoming::Frame(Box::new(f)),
        Err(e) => Incoming::Malformed(e.to_string()),
    }
}

/// A message or frame above our size limit.
fn is_capacity(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<Error>())
        .is_some_and(|e| matches!(e, Error::Capacity(_)))
}
