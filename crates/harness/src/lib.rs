//! Real processes for the end-to-end tests and the benchmarks: `nats-server` and
//! `imgate serve` on free loopback ports, each killed when its handle drops, and what a
//! benchmark reads about them from `/proc` and their HTTP endpoints.
//!
//! - [`binaries`]: where the `imgate` and `nats-server` binaries are, found one way for
//!   every caller.
//! - [`nats`]: a `nats-server` (or a cluster of them) that can be stopped, killed and
//!   restarted on the same port and store, with its monitoring counters.
//! - [`gateway`]: an `imgate serve` process and the addresses it printed.
//! - [`usage`]: CPU seconds and resident memory of a process.
//!
//! It knows nothing of the protocol: clients live with the tests and the load generator.
//! Every wait here has a deadline, and every failure is an error that says what to do.

pub mod binaries;
pub mod gateway;
pub mod nats;
pub mod usage;

pub use gateway::Gateway;
pub use nats::{NatsCounts, NatsServer};
pub use usage::Usage;

use std::net::{SocketAddr, TcpListener};

/// A loopback port free now. Another process (or an outgoing connection of a parallel test,
/// whose source ports come from the same range) can take it before the server binds it, so
/// the starts here pick new ports and try again when that happens.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The body of the HTTP/1.0 answer to `GET path`.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: harness\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    let body = answer.split_once("\r\n\r\n").context("an HTTP answer")?.1;
    Ok(body.to_owned())
}
