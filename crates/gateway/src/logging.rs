//! Log lines that say which connection they come from: every line logged while a
//! connection's task runs carries its transport, and its hub connection id, uid and device
//! once the login succeeded.
//!
//! The labels live in a task-local ([`Labels::scope`]) and the log formatter
//! ([`WithConn`]) adds them to each line, instead of a `tracing` span held open for the
//! connection's life: W2 measured such a span at 1.1 KiB per idle connection (3.47 KiB
//! per TCP connection without it, 4.59 with it), and a span made afresh on every poll
//! instead cost W1 10% more gateway CPU per message (159.9 µs against 144.9). With the
//! task-local, W2 measured 3.67 KiB against 3.68 before any of it, and W1 256 µs against
//! 259 (bench-history.md). This module decides nothing about connections.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio::task::futures::TaskLocalFuture;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

tokio::task_local! {
    static CONN: Labels;
}

/// What the log lines of one connection say about it.
#[derive(Clone)]
pub struct Labels(Arc<Inner>);

struct Inner {
    transport: &'static str,
    ids: OnceLock<Ids>,
}

/// Who a connection is, once it logged in.
struct Ids {
    id: u64,
    uid: String,
    device: String,
}

impl Labels {
    pub fn new(transport: &'static str) -> Labels {
        Labels(Arc::new(Inner {
            transport,
            ids: OnceLock::new(),
        }))
    }

    /// Names the connection for every line it logs from now on (once; a second call is
    /// ignored).
    pub fn set(&self, id: u64, uid: &str, device: &str) {
        let _ = self.0.ids.set(Ids {
            id,
            uid: uid.to_owned(),
            device: device.to_owned(),
        });
    }

    /// `f`, with these labels on every line it logs. A plain function, not an `async fn`:
    /// an `async fn` wrapper would keep room for `f` twice (before and after the move into
    /// the scope), which W2 measured at about 0.9 KiB per idle connection.
    pub fn scope<F: Future>(self, f: F) -> TaskLocalFuture<Labels, F> {
        CONN.scope(self, f)
    }

    /// ` transport="tcp" id=7 uid="alice" device="phone"`, as `tracing` writes fields.
    fn write_text(&self, w: &mut Writer<'_>) -> fmt::Result {
        write!(w, "conn{{transport={:?}", self.0.transport)?;
        if let Some(ids) = self.0.ids.get() {
            write!(
                w,
                " id={} uid={:?} device={:?}",
                ids.id, ids.uid, ids.device
            )?;
        }
        w.write_str("} ")
    }

    fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "transport": self.0.transport });
        if let Some(ids) = self.0.ids.get() {
            v["id"] = ids.id.into();
            v["uid"] = ids.uid.as_str().into();
            v["device"] = ids.device.as_str().into();
        }
        v
    }
}

/// A log line format with the connection's labels: for text, `conn{…}` before the line;
/// for JSON (`json: true`), a `"conn"` object in it. Lines outside a connection are `F`'s
/// own.
pub struct WithConn<F> {
    pub inner: F,
    pub json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithConn<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Ok(labels) = CONN.try_with(Labels::clone) else {
            return self.inner.format_event(ctx, writer, event);
        };
        if !self.json {
            labels.write_text(&mut writer)?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let object = line.trim_end();
        match object.strip_suffix('}') {
            Some(open) if object.starts_with('{') => {
                writeln!(writer, "{open},\"conn\":{}}}", labels.json())
            }
            _ => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_get_a_conn_object() {
        let labels = Labels::new("ws");
        labels.set(7, "alice", "phone");
        assert_eq!(
            labels.json(),
            serde_json::json!({"transport": "ws", "id": 7, "uid": "alice", "device": "phone"})
        );
        assert_eq!(
            Labels::new("sse").json(),
            serde_json::json!({"transport": "sse"})
        );
    }
}
