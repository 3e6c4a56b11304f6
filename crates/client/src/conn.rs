//! One physical connection: TCP with length-prefixed msgpack, or WebSocket with the token in
//! the `Authorization` header. Both are a sink of client frames and a stream of server
//! frames; nothing here knows about acks or reconnects.

use std::pin::Pin;

use futures::{future, Sink, SinkExt, Stream, StreamExt};
use imgate_proto::{decode, encode, ClientFrame, Encoding, FrameCodec, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::codec::Framed;

use crate::{ClientBuilder, Error, ErrorKind};

type FrameSink = Pin<Box<dyn Sink<ClientFrame, Error = Error> + Send>>;
type FrameStream = Pin<Box<dyn Stream<Item = Result<ServerFrame, Error>> + Send>>;

pub(crate) struct Conn {
    pub(crate) sink: FrameSink,
    pub(crate) stream: FrameStream,
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
    ) -> Result<Conn, Error> {
        let url = url::Url::parse(url)
            .map_err(|e| Error::new(ErrorKind::Config, format!("bad url {url}: {e}")))?;
        match url.scheme() {
            "tcp" => {
                let host = url.host_str().unwrap_or("127.0.0.1");
                let port = url.port().unwrap_or(7070);
                let sock = TcpStream::connect((host, port))
                    .await
                    .map_err(|e| Error::new(ErrorKind::Connect, e.to_string()))?;
                let _ = sock.set_nodelay(true);
                let (sink, stream) = Framed::new(sock, FrameCodec::new(b.max_frame)).split();
                let sink = sink.sink_map_err(io_err).with(|f: ClientFrame| {
                    future::ready(encode(&f, Encoding::Msgpack).map_err(proto_err))
                });
                let stream = stream.map(|r| {
                    r.map_err(io_err).and_then(|b| {
                        decode::<ServerFrame>(&b, Encoding::Msgpack).map_err(proto_err)
                    })
                });
                Ok(Conn {
                    sink: Box::pin(sink),
                    stream: Box::pin(stream),
                    login_frame: true,
                })
            }
            "ws" | "wss" => {
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
                    }
                }
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
                    format!("Bearer {}", b.token).parse().map_err(|_| {
                        Error::new(ErrorKind::Config, "token is not a valid header")
                    })?,
                );
                let mut cfg = WebSocketConfig::default();
                cfg.max_message_size = Some(b.max_frame);
                cfg.max_frame_size = Some(b.max_frame);
                let (ws, _resp) =
                    tokio_tungstenite::connect_async_with_config(req, Some(cfg), true)
                        .await
                        .map_err(|e| match e {
                            tokio_tungstenite::tungstenite::Error::Http(resp)
                                if resp.status() == 401 =>
                            {
                                Error::new(
                                    ErrorKind::Server(imgate_proto::ErrorCode::Unauthorized),
                                    "token refused (HTTP 401)",
                                )
                            }
                            e => Error::new(ErrorKind::Connect, e.to_string()),
                        })?;
                let enc = b.encoding;
                let (sink, stream) = ws.split();
                let sink = sink.sink_map_err(io_err).with(move |f: ClientFrame| {
                    future::ready(encode(&f, enc).map_err(proto_err).map(|bytes| match enc {
                        Encoding::Json => WsMessage::Text(
                            bytes.try_into().expect("serde_json always produces UTF-8"),
                        ),
                        Encoding::Msgpack => WsMessage::Binary(bytes),
                    }))
                });
                let stream = stream.filter_map(|r| {
                    future::ready(match r {
                        Ok(WsMessage::Text(t)) => Some(
                            decode::<ServerFrame>(t.as_bytes(), Encoding::Json).map_err(proto_err),
                        ),
                        Ok(WsMessage::Binary(b)) => {
                            Some(decode::<ServerFrame>(&b, Encoding::Msgpack).map_err(proto_err))
                        }
                        Ok(WsMessage::Close(_)) => {
                            Some(Err(Error::new(ErrorKind::Closed, "closed")))
                        }
                        Ok(_) => None,
                        Err(e) => Some(Err(io_err(e))),
                    })
                });
                Ok(Conn {
                    sink: Box::pin(sink),
                    stream: Box::pin(stream),
                    login_frame: false,
                })
            }
            s => Err(Error::new(
                ErrorKind::Config,
                format!("unsupported scheme {s:?}: use tcp:// or ws://"),
            )),
        }
    }
}
