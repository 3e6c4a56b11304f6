//! Server-Sent Events at `GET /v1/events` (docs/protocol.md, "`GET /v1/events`: Server-Sent
//! Events").
//!
//! An SSE stream is a session like TCP and WebSocket ones, run by the same loop with the
//! server-push profile: the session writes into a channel that feeds the response body,
//! `event: msg` / `id: <epoch>:<seq>` / `data: <msg JSON>`. It resumes after `Last-Event-ID`
//! (what a browser's EventSource sends when it reconnects, epoch included) or `?after=`,
//! either `<epoch>:<seq>` or a bare seq of the current epoch; without either, from the
//! device's cursor. A comment line every `--sse-keepalive` (15 s) keeps proxies from closing
//! an idle stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Sink, SinkExt, Stream, StreamExt};
use imgate_proto::{Encoding, ErrorCode, ServerFrame};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;

use super::extract::{ApiQuery, Caller};
use crate::delivery::outbox::ToClient;
use crate::refusal::Refusal;
use crate::session::{self, InError, Incoming, Preauth, Profile, Start};
use crate::state::Shared;

/// Events buffered between the session and the HTTP body.
const BUFFER: usize = 64;

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    after: Option<String>,
    device: Option<String>,
}

/// `<epoch>:<seq>` or a bare `<seq>`.
pub(crate) fn event_id(s: &str) -> Option<(Option<String>, u64)> {
    let s = s.trim();
    match s.rsplit_once(':') {
        Some((epoch, seq)) if imgate_proto::ids::is_valid_id(epoch) => {
            Some((Some(epoch.to_owned()), seq.parse().ok()?))
        }
        Some(_) => None,
        None => Some((None, s.parse().ok()?)),
    }
}

/// Where a stream resumes: `Last-Event-ID` (a reconnecting `EventSource`), else `?after=`,
/// each `<epoch>:<seq>` or a bare seq; neither, the device's cursor.
fn resume_from(
    headers: &HeaderMap,
    after: Option<&str>,
) -> Result<(Option<String>, Option<u64>), Refusal> {
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(v.to_str().ok().and_then(event_id).ok_or_else(|| {
            Refusal::new(
                ErrorCode::BadRequest,
                "Last-Event-ID must be <epoch>:<seq> or a seq",
            )
        })?),
        None => None,
    };
    let after = match after {
        Some(a) => Some(event_id(a).ok_or_else(|| {
            Refusal::new(
                ErrorCode::BadRequest,
                "after must be <epoch>:<seq> or a seq",
            )
        })?),
        None => None,
    };
    Ok(match last_event_id.or(after) {
        Some((epoch, seq)) => (epoch, Some(seq)),
        None => (None, None),
    })
}

/// `GET /v1/events`.
pub async fn events(
    State(shared): State<Arc<Shared>>,
    Caller(identity): Caller,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Response, Refusal> {
    // Refused here, as an HTTP error, not after the stream has started.
    if q.device
        .as_deref()
        .is_some_and(|d| !imgate_proto::ids::is_valid_id(d))
    {
        return Err(Refusal::bad_id("device"));
    }
    let (epoch, resume) = resume_from(&headers, q.after.as_deref())?;
    let Ok(permit) = shared.admission.permits.clone().try_acquire_owned() else {
        return Err(Refusal::new(
            ErrorCode::Unavailable,
            "connection limit reached",
        ));
    };
    let (tx, rx) = mpsc::channel::<ToClient>(BUFFER);
    let gone = tx.clone();
    // The body is dropped when the client goes away; that ends the session.
    let client_gone = futures::stream::once(async move {
        gone.closed().await;
        Err::<Incoming, _>(InError::Closed)
    });
    let sink = PollSender::new(tx);
    let start = Box::new(Start::Verified(Preauth {
        identity,
        device: q.device,
        resume,
        epoch,
    }));
    let frames = Joined {
        sink: Box::pin(sink),
        gone: Box::pin(client_gone),
    };
    let session = session::run(shared.clone(), frames, start, Profile::SSE);
    shared.admission.tracker.spawn(async move {
        session.await;
        drop(permit);
    });
    let epoch = shared.store.epoch();
    let body = ReceiverStream::new(rx).map(move |o| Ok::<_, Infallible>(to_event(&epoch, o)));
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(shared.cfg.timers.sse_keepalive))
        .into_response())
}

/// The session's transport over SSE: frames go out through `sink` (into the response
/// body); `gone` yields `Closed` once the client went away, and nothing else.
struct Joined<Si, St> {
    sink: Si,
    gone: St,
}

impl<Si: Sink<ToClient> + Unpin, St: Unpin> Sink<ToClient> for Joined<Si, St> {
    type Error = Si::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Si::Error>> {
        self.get_mut().sink.poll_ready_unpin(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: ToClient) -> Result<(), Si::Error> {
        self.get_mut().sink.start_send_unpin(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Si::Error>> {
        self.get_mut().sink.poll_flush_unpin(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Si::Error>> {
        self.get_mut().sink.poll_close_unpin(cx)
    }
}

impl<Si: Unpin, St: Stream + Unpin> Stream for Joined<Si, St> {
    type Item = St::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<St::Item>> {
        self.get_mut().gone.poll_next_unpin(cx)
    }
}

fn to_event(epoch: &str, o: ToClient) -> Event {
    let event = Event::default().event(frame_type(o.frame()));
    let event = match o.frame() {
        ServerFrame::Msg(m) => event.id(format!("{epoch}:{}", m.seq)),
        _ => event,
    };
    let json = o.encode(Encoding::Json);
    event.data(std::str::from_utf8(&json).expect("JSON is UTF-8"))
}

/// The `type` of a server frame, used as the SSE event name (`welcome`, `bye`, `room`, …).
fn frame_type(f: &ServerFrame) -> &'static str {
    match f {
        ServerFrame::Welcome { .. } => "welcome",
        ServerFrame::Msg(_) => "msg",
        ServerFrame::Sent { .. } => "sent",
        ServerFrame::Room { .. } => "room",
        // Not `error`: EventSource reserves that name for its own connection errors.
        ServerFrame::Error { .. } => "problem",
        ServerFrame::Pong => "pong",
        ServerFrame::Refreshed { .. } => "refreshed",
        ServerFrame::Read { .. } => "read",
        ServerFrame::Bye { .. } => "bye",
    }
}
