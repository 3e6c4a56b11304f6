//! The `conn` span that every log line of a connection carries: its transport from the
//! start, and the hub's connection id, uid and device once the login succeeds.
//!
//! The span is made afresh each time the connection's future is polled and closed when the
//! poll returns, instead of living as long as the connection: a span held open costs the
//! log subscriber about 1.1 KiB (its registry slot and formatted fields; W2 measured 3.47
//! KiB per idle TCP connection without it and 4.59 with it), and an idle connection is
//! never polled. What the span says lives here, in one small block per connection.
//! Nothing here decides anything about the connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

/// Who a connection is, once it logged in.
struct Ids {
    id: u64,
    uid: String,
    device: String,
}

/// The labels of one connection's span, set once at login.
#[derive(Clone, Default)]
pub(super) struct Labels(Arc<OnceLock<Ids>>);

impl Labels {
    /// Names the connection: in the span of the current poll, and in every later one.
    pub(super) fn set(&self, id: u64, uid: &str, device: &str) {
        let span = tracing::Span::current();
        span.record("id", id);
        span.record("uid", uid);
        span.record("device", device);
        let _ = self.0.set(Ids {
            id,
            uid: uid.to_owned(),
            device: device.to_owned(),
        });
    }
}

pin_project_lite::pin_project! {
    /// `inner`, polled inside a fresh `conn` span.
    pub(super) struct InSpan<F> {
        #[pin]
        inner: F,
        transport: &'static str,
        labels: Labels,
    }
}

impl<F> InSpan<F> {
    pub(super) fn new(inner: F, transport: &'static str, labels: Labels) -> Self {
        InSpan {
            inner,
            transport,
            labels,
        }
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // At the error level, so it is enabled whenever any line of the connection is.
        let span = match this.labels.0.get() {
            Some(ids) => tracing::error_span!(
                "conn",
                transport = *this.transport,
                id = ids.id,
                uid = ids.uid.as_str(),
                device = ids.device.as_str(),
            ),
            None => tracing::error_span!(
                "conn",
                transport = *this.transport,
                id = tracing::field::Empty,
                uid = tracing::field::Empty,
                device = tracing::field::Empty,
            ),
        };
        let _entered = span.enter();
        this.inner.poll(cx)
    }
}
