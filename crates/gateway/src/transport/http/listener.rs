//! The HTTP listener's accept loop: plain or TLS sockets served by hyper with the router,
//! WebSocket upgrades included, each connection in its own task.
//!
//! A connection must send each request's header within `--header-timeout`, and the same
//! clock runs while a keep-alive connection waits for its next request (hyper times both
//! as one wait), so a client that trickles its header or holds an idle socket is closed. A
//! TLS handshake has the login timeout. At shutdown the loop stops accepting, open
//! connections finish their requests (long polls answer, SSE streams say bye), and it
//! returns when the last has ended. Nothing here knows a route.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::per_ip::Refuse;
use crate::state::Shared;
use crate::tls::Tls;

/// The most a request's header may hold: hyper answers 431 beyond it.
const MAX_HEADER: usize = 64 * 1024;

/// Pause after a failed accept (for example, out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `listener` with `app` (over TLS when `tls` is given) until shutdown, then waits
/// for its connections to end.
pub async fn serve(listener: TcpListener, app: Router, shared: Arc<Shared>, tls: Option<Arc<Tls>>) {
    let stop = shared.shutdown.clone();
    let conns = TaskTracker::new();
    loop {
        let sock = tokio::select! {
            r = accept(&listener) => match r {
                Ok(sock) => sock,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        // A clone of the router is an Arc; it is served as it is, never rebuilt per
        // connection (axum's `with_state` per connection was once heaptrack's largest
        // per-connection allocation).
        let refuse = match tls {
            None => Refuse::Http,
            Some(_) => Refuse::Silently,
        };
        let Some(slot) = shared.admission.per_ip.admit(&sock, refuse) else {
            continue;
        };
        let (app, stop) = (app.clone(), stop.clone());
        let (header_timeout, login_timeout) = (
            shared.cfg.timers.header_timeout,
            shared.cfg.timers.login_timeout,
        );
        match tls.clone() {
            None => conns.spawn(async move {
                connection(sock, app, header_timeout, stop).await;
                drop(slot);
            }),
            Some(tls) => conns.spawn(async move {
                tls_connection(sock, tls, login_timeout, app, header_timeout, stop).await;
                drop(slot);
            }),
        };
    }
    conns.close();
    conns.wait().await;
}

/// The next socket, with TCP_NODELAY as on the TCP listener: with Nagle's algorithm a frame
/// written while an earlier one is unacknowledged waits for the peer's delayed ACK (up to
/// 40 ms on Linux), which W1 over WebSocket showed as a 40 ms p99.
async fn accept(listener: &TcpListener) -> std::io::Result<TcpStream> {
    let (sock, _) = listener.accept().await?;
    if let Err(e) = sock.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    Ok(sock)
}

async fn tls_connection(
    sock: TcpStream,
    tls: Arc<Tls>,
    handshake_timeout: Duration,
    app: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) {
    if let Some(stream) = tls.accept(sock, handshake_timeout).await {
        connection(stream, app, header_timeout, stop).await;
    }
}

/// One connection's requests, until the client leaves, a header is late, or shutdown lets
/// the request in progress finish.
async fn connection<S>(io: S, app: Router, header_timeout: Duration, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // HTTP/1.1 only, also without TLS (no h2c): HTTP/2 would need header and idle limits
    // of its own, and no client of this gateway speaks h2c (browsers use HTTP/2 only over
    // TLS, whose ALPN here offers HTTP/1.1 alone). hyper's HTTP/1 server, not hyper-util's
    // auto builder, which answers an HTTP/2 preface even when told HTTP/1 only.
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(MAX_HEADER)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            tracing::debug!(error = %e, "http connection ended");
        },
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http_connections_are_accepted_without_nagle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let sock = accept(&listener).await.unwrap();
        assert!(sock.nodelay().unwrap());
    }
}
