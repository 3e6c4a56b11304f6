//! A load-generator user over HTTP, the way a browser without WebSocket is one: it sends
//! with `POST /v1/messages` on a keep-alive connection and receives over Server-Sent Events
//! (`GET /v1/events`) or long polls (`GET /v1/messages?wait=`). A minimal HTTP/1.1 client
//! on hyper's connection API; it hands received `msg` frames to a callback and knows nothing
//! about what is measured.

use std::net::SocketAddr;

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use imgate_proto::{Message, Send as SendFrame, ServerFrame};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// How a user receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Receive {
    Sse,
    LongPoll,
}

async fn connect<B>(addr: SocketAddr) -> anyhow::Result<SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

fn get(path: &str, token: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "bench")
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::new())
        .expect("static request parts are valid")
}

/// Sends with `POST /v1/messages`, one request at a time on one keep-alive connection.
pub(crate) struct HttpSender {
    conn: Mutex<SendRequest<Full<Bytes>>>,
    token: String,
}

impl HttpSender {
    pub(crate) async fn connect(addr: SocketAddr, token: String) -> anyhow::Result<HttpSender> {
        Ok(HttpSender {
            conn: Mutex::new(connect(addr).await?),
            token,
        })
    }

    /// Resolves when the gateway answered 201 (`sent`).
    pub(crate) async fn send(&self, s: SendFrame) -> anyhow::Result<()> {
        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/messages")
            .header("host", "bench")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&s)?)))?;
        let mut conn = self.conn.lock().await;
        conn.ready().await?;
        let resp = conn.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        ensure!(status.is_success(), "POST /v1/messages answered {status}");
        Ok(())
    }
}

/// Starts receiving `uid`'s messages over `how`; resolves once the gateway has registered
/// the receiver (SSE: its `welcome` event; long poll: the first, immediate poll), then runs
/// in a task calling `on_msg` for every `msg` until the connection ends.
pub(crate) async fn receive(
    how: Receive,
    addr: SocketAddr,
    token: String,
    on_msg: impl FnMut(Message) + Send + 'static,
) -> anyhow::Result<()> {
    match how {
        Receive::Sse => sse(addr, token, on_msg).await,
        Receive::LongPoll => long_poll(addr, token, on_msg).await,
    }
}

async fn sse(
    addr: SocketAddr,
    token: String,
    mut on_msg: impl FnMut(Message) + Send + 'static,
) -> anyhow::Result<()> {
    let mut conn = connect(addr).await?;
    let resp = conn
        .send_request(get("/v1/events?device=bench", &token))
        .await?;
    ensure!(resp.status().is_success(), "SSE answered {}", resp.status());
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    match next_event(&mut body, &mut buf).await? {
        Some((name, _)) if name == "welcome" => {}
        other => bail!("SSE began with {other:?}, not welcome"),
    }
    tokio::spawn(async move {
        let _conn = conn;
        while let Ok(Some((name, data))) = next_event(&mut body, &mut buf).await {
            if name == "msg" {
                if let Ok(ServerFrame::Msg(m)) = serde_json::from_str(&data) {
                    on_msg(m);
                }
            }
        }
    });
    Ok(())
}

/// The next event's name and data; None when the stream ends. Events are separated by a
/// blank line; `data:` holds the frame's JSON.
async fn next_event(
    body: &mut hyper::body::Incoming,
    buf: &mut Vec<u8>,
) -> anyhow::Result<Option<(String, String)>> {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8(event)?;
            let (mut name, mut data) = (String::new(), String::new());
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            return Ok(Some((name, data)));
        }
        match body.frame().await {
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            None => return Ok(None),
        }
    }
}

async fn long_poll(
    addr: SocketAddr,
    token: String,
    mut on_msg: impl FnMut(Message) + Send + 'static,
) -> anyhow::Result<()> {
    let mut conn = connect(addr).await?;
    // A short poll first: it registers the device at the live tail and names the cursor.
    let mut cursor = poll(&mut conn, &token, "/v1/messages?device=bench", &mut on_msg)
        .await
        .context("first poll")?;
    tokio::spawn(async move {
        loop {
            let path = format!("/v1/messages?device=bench&after={cursor}&wait=30");
            match poll(&mut conn, &token, &path, &mut on_msg).await {
                Ok(c) => cursor = c,
                Err(_) => return,
            }
        }
    });
    Ok(())
}

/// One poll: hands its messages to `on_msg` and returns the new cursor.
async fn poll(
    conn: &mut SendRequest<Empty<Bytes>>,
    token: &str,
    path: &str,
    on_msg: &mut impl FnMut(Message),
) -> anyhow::Result<u64> {
    conn.ready().await?;
    let resp = conn.send_request(get(path, token)).await?;
    ensure!(
        resp.status().is_success(),
        "poll answered {}",
        resp.status()
    );
    let body = resp.into_body().collect().await?.to_bytes();
    let page: Value = serde_json::from_slice(&body)?;
    for m in page["messages"].as_array().into_iter().flatten() {
        if let Ok(ServerFrame::Msg(m)) = serde_json::from_value(m.clone()) {
            on_msg(m);
        }
    }
    page["cursor"]
        .as_u64()
        .context("a poll answer has a cursor")
}
