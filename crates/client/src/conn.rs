//! One physical connection: TCP with length-prefixed msgpack, or WebSocket with the token in
//! the `Authorization` header, each plain or inside TLS. Both are one object that is a sink of client frames and a
//! stream of server frames; nothing here knows about acks or reconnects.

use std::pin::Pin;

use futures::{future, Sink, SinkExt, Stream, StreamExt};
use imgate_proto::{decode, encode, ClientFrame, Encoding, FrameCodec, ServerFrame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::codec::Framed;

use crate::{ClientBuilder, Error, ErrorKind};

/// Bytes a WebSocket read asks the socket for at most (tungstenite's `read_buffer_size`).
const WS_READ_BUFFER: usize = 8 * 1024;

/// A connection's frames both ways, as one object. Not split into halves: the actor never
/// reads and writes at once (its `select!` drops the read before a handler writes), and
/// split halves cost a shared lock on every read and write.
pub(crate) trait Frames:
    Sink<ClientFrame, Error = Error> + Stream<Item = Result<ServerFrame, Error>> + Send
{
}

impl<T> Frames for T where
    T: Sink<ClientFrame, Error = Error> + Stream<Item = Result<ServerFrame, Error>> + Send
{
}

pub(crate) struct Conn {
    pub(crate) frames: Pin<Box<dyn Frames>>,
    login_frame: bool,
}

fn io_err(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Closed, e.to_string())
}

fn proto_err(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Protocol, e.to_string())
}

impl Conn {
    pub(crate) fn needs_login_frame(&self) -> bool {
        self.login_frame
    }

    pub(crate) async fn open(
        b: &ClientBuilder,
        url: &str,
        resume: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<Conn, Error> {
        let url = url::Url::parse(url)
            .map_err(|e| Error::new(ErrorKind::Config, format!("bad url {url}: {e}")))?;
        let tls = matches!(url.scheme(), "tls" | "wss");
        let host = url.host_str().unwrap_or("127.0.0.1");
        match url.scheme() {
            "tcp" | "tls" => {
                let sock = open_socket(b, host, url.port().unwrap_or(7070)).await?;
                let frames = if tls {
                    tcp_frames(b.tls.connect(host, sock).await?, b.max_frame)
                } else {
                    tcp_frames(sock, b.max_frame)
                };
                Ok(Conn {
                    frames,
                    login_frame: true,
                })
            }
            "ws" | "wss" => {
                let url = ws_url(&url, b, resume, epoch);
                let req = ws_request(&url, b)?;
                let port = url.port_or_known_default().unwrap_or(80);
                let sock = open_socket(b, host, port).await?;
                let frames = if tls {
                    let sock = b.tls.connect(host, sock).await?;
                    ws_frames(req, sock, b).await?
                } else {
                    ws_frames(req, sock, b).await?
                };
                Ok(Conn {
                    frames,
                    login_frame: false,
                })
            }
            s => Err(Error::new(
                ErrorKind::Config,
                format!("unsupported scheme {s:?}: use tcp://, tls://, ws:// or wss://"),
            )),
        }
    }
}

/// The WebSocket address: `/v1/ws` if `url` names no path; device, resume and epoch in the query.
fn ws_url(url: &url::Url, b: &ClientBuilder, resume: Option<u64>, epoch: Option<&str>) -> url::Url {
    let mut url = url.clone();
    if url.path().is_empty() || url.path() == "/" {
        url.set_path("/v1/ws");
    }
    {
        let mut q = url.query_pairs_mut();
        if let Some(d) = &b.device {
            q.append_pair("device", d);
        }
        if let Some(r) = resume {
            q.append_pair("resume", &r.to_string());
            if let Some(e) = epoch {
                q.append_pair("epoch", e);
            }
        }
    }
    url
}

/// The handshake request: the builder's encoding as subprotocol, its token as `Authorization`.
fn ws_request(url: &url::Url, b: &ClientBuilder) -> Result<Request, Error> {
    let mut req = url.as_str().into_client_request().map_err(proto_err)?;
    let h = req.headers_mut();
    h.insert(
        "Sec-WebSocket-Protocol",
        b.encoding
            .subprotocol()
            .parse()
            .expect("static header value"),
    );
    h.insert(
        "Authorization",
        format!("Bearer {}", b.token)
            .parse()
            .map_err(|_| Error::new(ErrorKind::Config, "token is not a valid header"))?,
    );
    Ok(req)
}

/// Length-prefixed msgpack over a socket (plain or TLS).
fn tcp_frames<S>(sock: S, max_frame: usize) -> Pin<Box<dyn Frames>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let frames = Framed::new(sock, FrameCodec::new(max_frame))
        .sink_map_err(io_err)
        .with(|f: ClientFrame| future::ready(encode(&f, Encoding::Msgpack).map_err(proto_err)))
        .map(|r| {
            r.map_err(io_err)
                .and_then(|b| decode::<ServerFrame>(&b, Encoding::Msgpack).map_err(proto_err))
        });
    Box::pin(frames)
}

/// The WebSocket handshake over a socket (plain or TLS), and the frames in the builder's
/// encoding after it.
async fn ws_frames<S>(
    req: Request,
    sock: S,
    b: &ClientBuilder,
) -> Result<Pin<Box<dyn Frames>>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut cfg = WebSocketConfig::default();
    // tungstenite zero-fills its read buffer up to this size before every read; at its
    // default (128 KiB) that memset was most of a busy client's CPU. A larger frame still
    // grows the buffer as it needs.
    cfg.read_buffer_size = WS_READ_BUFFER;
    cfg.max_message_size = Some(b.max_frame);
    cfg.max_frame_size = Some(b.max_frame);
    let connected = tokio_tungstenite::client_async_with_config(req, sock, Some(cfg)).await;
    let (ws, _resp) = connected.map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) if resp.status() == 401 => Error::new(
            ErrorKind::Server(imgate_proto::ErrorCode::Unauthorized),
            "token refused (HTTP 401)",
        ),
        e => Error::new(ErrorKind::Connect, e.to_string()),
    })?;
    let enc = b.encoding;
    let frames = ws
        .sink_map_err(io_err)
        .with(move |f: ClientFrame| {
            future::ready(encode(&f, enc).map_err(proto_err).map(|bytes| match enc {
                Encoding::Json => {
                    WsMessage::Text(bytes.try_into().expect("serde_json always produces UTF-8"))
                }
                Encoding::Msgpack => WsMessage::Binary(bytes),
            }))
        })
        .filter_map(|r| {
            future::ready(match r {
                Ok(WsMessage::Text(t)) => {
                    Some(decode::<ServerFrame>(t.as_bytes(), Encoding::Json).map_err(proto_err))
                }
                Ok(WsMessage::Binary(b)) => {
                    Some(decode::<ServerFrame>(&b, Encoding::Msgpack).map_err(proto_err))
                }
                Ok(WsMessage::Close(_)) => Some(Err(Error::new(ErrorKind::Closed, "closed"))),
                Ok(_) => None,
                Err(e) => Some(Err(io_err(e))),
            })
        });
    Ok(Box::pin(frames))
}

/// A TCP connection to `host:port` with Nagle's algorithm off; failing is a `Connect` error.
async fn open_socket(b: &ClientBuilder, host: &str, port: u16) -> Result<TcpStream, Error> {
    let sock = tcp_connect(b, host, port)
        .await
        .map_err(|e| Error::new(ErrorKind::Connect, e.to_string()))?;
    let _ = sock.set_nodelay(true);
    Ok(sock)
}

/// A TCP connection to `host:port`, from the builder's local address when it names one.
async fn tcp_connect(b: &ClientBuilder, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let Some(ip) = b.local_addr else {
        return TcpStream::connect((host, port)).await;
    };
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4() == ip.is_ipv4())
        .ok_or_else(|| std::io::Error::other(format!("{host} has no address like {ip}")))?;
    let sock = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.bind(std::net::SocketAddr::new(ip, 0))?;
    sock.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_from_the_local_address_it_is_given() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let from: std::net::IpAddr = "127.0.0.7".parse().unwrap();
        for url in [
            format!("tcp://127.0.0.1:{port}"),
            format!("ws://127.0.0.1:{port}"),
        ] {
            let b = ClientBuilder::new(url.clone(), "t").local_addr(from);
            let opening =
                tokio::spawn(async move { Conn::open(&b, &url, None, None).await.is_ok() });
            let (sock, peer) = listener.accept().await.unwrap();
            assert_eq!(peer.ip(), from);
            drop(sock);
            opening.await.unwrap();
        }
    }
}
