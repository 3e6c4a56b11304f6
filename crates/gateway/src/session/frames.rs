//! The contract between a transport and the session loop: a transport is one object that
//! is a sink of [`ToClient`] frames and a stream of [`Incoming`] ones ([`Frames`]), so it
//! only encodes and decodes. [`Coded`] makes one from any socket and two closures.
//!
//! Nothing here knows a wire format; the transports choose theirs.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Sink, SinkExt, Stream, StreamExt};
use imgate_proto::ClientFrame;

use crate::delivery::outbox::ToClient;

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
pub trait Frames: Sink<ToClient> + Stream<Item = Result<Incoming, InError>> + Unpin {}

impl<T> Frames for T where T: Sink<ToClient> + Stream<Item = Result<Incoming, InError>> + Unpin {}

/// A socket of `S` items as [`Frames`]: `encode` makes the item for each outgoing frame
/// and `decode` the incoming frame from each item read. Unlike `SinkExt::with` it keeps no
/// slot for an item in flight, room every idle connection would carry.
pub struct Coded<S, E, D> {
    pub socket: S,
    pub encode: E,
    pub decode: D,
}

impl<S, E, D, I> Sink<ToClient> for Coded<S, E, D>
where
    S: Sink<I> + Unpin,
    E: Fn(ToClient) -> I + Unpin,
    D: Unpin,
{
    type Error = S::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.get_mut().socket.poll_ready_unpin(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: ToClient) -> Result<(), S::Error> {
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
