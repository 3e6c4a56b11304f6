//! Bad input gets a clear `error` (or `bye`), the gateway keeps serving everyone else, and
//! no stored message is lost.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use imgate_client::{ErrorKind, Event};
use imgate_gateway::auth::Auth;
use imgate_gateway::config::Secret;
use imgate_proto::{ErrorCode, Send};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::support::*;

/// Logs in over raw TCP, sends `frame`, and expects an `error` of `code` that leaves the
/// connection usable (a ping still gets its pong).
async fn expect_error_then_still_served(raw: &mut RawTcp, frame: Value, code: &str) -> Value {
    raw.send(frame).await;
    let err = raw.recv_type("error").await;
    assert_eq!(err["code"], code, "{err}");
    assert!(
        !err["message"].as_str().unwrap_or("").is_empty(),
        "error says why: {err}"
    );
    raw.send(json!({"type":"ping"})).await;
    raw.recv_type("pong").await;
    err
}

both_modes! {
async fn first_tcp_frame_must_be_login(env) {
    let gw = env.gateway(&[]).await;
    let mut raw = RawTcp::connect(&gw).await;
    raw.send(json!({"type":"ping"})).await;
    let err = raw.recv().await.unwrap();
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "bad_request");
    raw.expect_closed().await;
}
}

both_modes! {
async fn login_timeout_says_bye_and_closes(env) {
    let gw = env.gateway(&["--login-timeout", "300ms"]).await;
    let mut raw = RawTcp::connect(&gw).await;
    let bye = raw.recv().await.unwrap();
    assert_eq!(bye, json!({"type":"bye","reason":"login_timeout"}));
    raw.expect_closed().await;
}
}

both_modes! {
async fn refused_logins_get_unauthorized_then_close(env) {
    let gw = env.gateway(&[]).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cases = [
        (
            "bad signature",
            remember(Auth::new(Some(&Secret("not-the-secret".into()))).mint(
                "bob",
                Duration::from_secs(60),
                false,
            )),
            "signature",
        ),
        (
            "expired",
            remember(Auth::new(None).mint_with_exp("bob", now - 3600, false)),
            "expired",
        ),
        (
            "invalid uid",
            remember(Auth::new(None).mint("bob.smith", Duration::from_secs(60), false)),
            "uid",
        ),
        ("garbage", "not.a.jwt".to_owned(), "invalid"),
    ];
    for (what, token, says) in cases {
        let mut raw = RawTcp::connect(&gw).await;
        raw.send(json!({"type":"login","token":token,"device":"d"}))
            .await;
        let err = raw
            .recv()
            .await
            .unwrap_or_else(|| panic!("{what}: closed without error"));
        assert_eq!(err["code"], "unauthorized", "{what}: {err}");
        assert!(
            err["message"].as_str().unwrap().contains(says),
            "{what}: {err}"
        );
        raw.expect_closed().await;
    }
    // Over WebSocket the token is checked before the upgrade: HTTP 401.
    let bad = remember(Auth::new(Some(&Secret("nope".into()))).mint(
        "bob",
        Duration::from_secs(60),
        false,
    ));
    let err = imgate_client::ClientBuilder::new(gw.ws_url(), bad)
        .connect()
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Server(ErrorCode::Unauthorized),
        "{err}"
    );
    // A bad device id in an otherwise good login.
    let mut raw = RawTcp::connect(&gw).await;
    raw.send(json!({"type":"login","token":token("bob"),"device":"no spaces"}))
        .await;
    assert_eq!(raw.recv().await.unwrap()["code"], "bad_request");
    raw.expect_closed().await;
}
}

both_modes! {
async fn malformed_frames_get_errors_and_the_connection_stays(env) {
    let gw = env.gateway(&["--max-body", "1024"]).await;
    let mut raw = RawTcp::connect(&gw).await;
    raw.login(&token("alice"), "raw").await;
    // msgpack of the wrong shape, an unknown type, a map without type, bytes that are not
    // msgpack at all.
    expect_error_then_still_served(&mut raw, json!({"type":"ack","seq":"seven"}), "bad_request")
        .await;
    let err =
        expect_error_then_still_served(&mut raw, json!({"type":"teleport"}), "bad_request").await;
    assert!(
        err["message"].as_str().unwrap().contains("unknown variant"),
        "{err}"
    );
    expect_error_then_still_served(&mut raw, json!({"seq": 1}), "bad_request").await;
    raw.send_raw(&[0xc1, 0xc1, 0xc1]).await;
    assert_eq!(raw.recv_type("error").await["code"], "bad_request");
    // Semantically bad sends answer with the send's id.
    let err = expect_error_then_still_served(
        &mut raw,
        json!({"type":"send","id":"s1","to":"bad uid!","body":{}}),
        "bad_request",
    )
    .await;
    assert_eq!(err["id"], "s1");
    expect_error_then_still_served(
        &mut raw,
        json!({"type":"send","id":"s2","body":{}}),
        "bad_request",
    )
    .await;
    expect_error_then_still_served(
        &mut raw,
        json!({"type":"send","id":"s3","to":"bob","group":"g","body":{}}),
        "bad_request",
    )
    .await;
    let err = expect_error_then_still_served(
        &mut raw,
        json!({"type":"send","id":"big","to":"bob","body":{"text":"x".repeat(2000)}}),
        "too_large",
    )
    .await;
    assert_eq!(err["id"], "big");
    expect_error_then_still_served(&mut raw, json!({"type":"ack","seq":999_999}), "bad_request")
        .await;
    expect_error_then_still_served(&mut raw, json!({"type":"login","token":"t"}), "bad_request")
        .await;
    // And a good send still works on the same connection.
    raw.send(json!({"type":"send","id":"ok","to":"bob","body":{"text":"fine"}}))
        .await;
    let sent = raw.recv_type("sent").await;
    assert_eq!(sent["id"], "ok");
}
}

both_modes! {
async fn malformed_websocket_json_gets_an_error(env) {
    let gw = env.gateway(&[]).await;
    let url = format!("{}?token={}", gw.ws_url(), token("alice"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let welcome: Value = match ws.next().await.unwrap().unwrap() {
        WsMessage::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(welcome["type"], "welcome");
    ws.send(WsMessage::Text("{not json".into())).await.unwrap();
    let err: Value = match ws.next().await.unwrap().unwrap() {
        WsMessage::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(err["code"], "bad_request");
    assert!(err["message"].as_str().unwrap().contains("JSON"), "{err}");
    ws.send(WsMessage::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    match ws.next().await.unwrap().unwrap() {
        WsMessage::Text(t) => assert_eq!(t.as_str(), r#"{"type":"pong"}"#),
        other => panic!("{other:?}"),
    }
}
}

both_modes! {
async fn frames_above_max_frame_end_the_connection_with_bye(env) {
    let gw = env.gateway(&["--max-frame", "4096", "--max-body", "1024"]).await;
    // TCP: a length prefix far above the limit (nothing else needs to follow).
    let mut raw = RawTcp::connect(&gw).await;
    raw.login(&token("alice"), "raw").await;
    raw.write(&[0xff, 0xff, 0xff, 0xff]).await;
    let bye = raw.recv_type("bye").await;
    assert_eq!(bye["reason"], "frame_too_large");
    raw.expect_closed().await;
    // WebSocket: one message above the limit.
    let url = format!("{}?token={}", gw.ws_url(), token("alice"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let _welcome = ws.next().await.unwrap().unwrap();
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(10_000));
    let _ = ws.send(WsMessage::Text(big.into())).await;
    let mut saw_bye = false;
    while let Some(Ok(m)) = within(WAIT, "ws close", ws.next()).await {
        if let WsMessage::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "bye" {
                assert_eq!(v["reason"], "frame_too_large");
                saw_bye = true;
            }
        }
    }
    assert!(
        saw_bye,
        "the WebSocket got bye frame_too_large before closing"
    );
    // The gateway still serves others.
    let (alice, _a) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    let (_bob, mut bob_ev) = connect(&gw, "bob", "phone", Via::Tcp).await;
    alice
        .send_to("bob", json!({"text": "still here"}))
        .await
        .unwrap();
    assert_eq!(text(&messages(&mut bob_ev, 1).await[0]), "still here");
}
}

both_modes! {
/// A device that stops reading is closed once its outbox fills; everyone else keeps being
/// served, and when the device comes back it gets every stored message.
async fn a_client_that_stops_reading_is_closed_and_loses_nothing(env) {
    let gw = env.gateway(&["--outbox", "32"]).await;
    let mut stalled = RawTcp::connect(&gw).await;
    stalled.login(&token("bob"), "phone").await;
    let (alice, _a) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    let (carol, _c) = connect(&gw, "carol", "c", Via::WsJson).await;
    let (_dave, mut dave_ev) = connect(&gw, "dave", "d", Via::Tcp).await;
    let body = "y".repeat(16 * 1024);
    let n = 800; // ~13 MB: far more than the socket buffers and the outbox hold.
    for i in 0..n {
        alice
            .send_to("bob", json!({"text": i.to_string(), "pad": body}))
            .await
            .unwrap();
        if i % 100 == 0 {
            // Others are served while bob is stuck.
            carol
                .send_to("dave", json!({"text": format!("c{i}")}))
                .await
                .unwrap();
            let m = messages(&mut dave_ev, 1).await;
            assert_eq!(text(&m[0]), format!("c{i}"));
        }
    }
    // The stalled connection is closed by the gateway (we read what is buffered to see it).
    stalled.drain_until_closed().await;
    // Bob's device comes back: every message, in order, none missing.
    let (_bob, mut bob_ev) = connect(&gw, "bob", "phone", Via::Tcp).await;
    let got = messages(&mut bob_ev, n).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(text(m), i.to_string());
    }
}
}

both_modes! {
async fn send_rate_limit_answers_rate_limited_without_disconnecting(env) {
    let gw = env.gateway(&["--send-rate", "5", "--send-burst", "5"]).await;
    let (alice, mut ev) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    let mut limited = 0;
    let mut ok = 0;
    for i in 0..20 {
        match alice
            .send(Send {
                id: Some(format!("r{i}")),
                to: Some("bob".into()),
                group: None,
                body: json!({}),
            })
            .await
        {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Server(ErrorCode::RateLimited), "{e}");
                limited += 1;
            }
        }
    }
    assert!(ok >= 5 && limited > 0, "ok={ok} limited={limited}");
    // Still connected: no Disconnected event, and a send works after the bucket refills.
    tokio::time::sleep(Duration::from_millis(400)).await;
    alice
        .send_to("bob", json!({"text": "later"}))
        .await
        .unwrap();
    while let Ok(ev) = ev.try_recv() {
        assert!(
            !matches!(ev, Event::Disconnected { .. }),
            "rate limiting never disconnects"
        );
    }
}
}

/// Reads from `s` until the server closes it; everything it sent.
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Slow clients (DESIGN section 7): a header sent a byte at a time is cut off at
/// `--header-timeout`, and so is a keep-alive connection that stays idle after an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_header_and_an_idle_keep_alive_connection_are_closed() {
    use tokio::io::AsyncWriteExt;
    let gw = Gateway::start(&["--header-timeout", "2s"]).await.unwrap();

    let slow = async {
        let (mut r, mut w) = tokio::net::TcpStream::connect(gw.http)
            .await
            .unwrap()
            .into_split();
        let started = std::time::Instant::now();
        let header = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(60)
        );
        let trickle = async move {
            for b in header.bytes() {
                if w.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let read = async {
            let mut all = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut all).await;
            String::from_utf8_lossy(&all).into_owned()
        };
        let (answer, ()) = within(WAIT, "the slow client to be cut off", async {
            tokio::select! {
                a = read => (a, ()),
                () = trickle => panic!("the whole header went out before the server closed"),
            }
        })
        .await;
        let took = started.elapsed();
        assert!(
            !answer.contains("200 OK"),
            "a trickled request was served: {answer}"
        );
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
            "{took:?}"
        );
    };

    let idle = async {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let answer = within(
            WAIT,
            "the idle connection to be closed",
            read_until_closed(&mut s),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
            "{took:?}"
        );
    };
    tokio::join!(slow, idle);

    // A client that sends its header at once is served as before.
    let ok = curl(&[&format!("http://{}/healthz", gw.http)]).await;
    assert_eq!(ok.status, 200);
}

/// A socket to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// One address holds at most `--max-connections-per-ip` connections, TCP and HTTP
/// together: the next 1,000 from it are refused at once (a `rate_limited` error frame over
/// TCP, 429 over HTTP) while another address is served, and a closed connection gives its
/// place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_over_its_connection_limit_is_refused_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LIMIT: usize = 100;
    let limit = LIMIT.to_string();
    let args = [
        "--max-connections-per-ip",
        &limit,
        "--header-timeout",
        "60s",
    ];
    let gw = Gateway::start(&args).await.unwrap();
    let crowd = "127.0.0.2";

    // The limit's worth from one address: logged-in TCP sessions and served HTTP
    // keep-alive connections, half each.
    let mut held = Vec::new();
    for i in 0..LIMIT {
        if i % 2 == 0 {
            let mut raw = RawTcp::from_stream(connect_from(crowd, gw.tcp).await);
            raw.login(&token(&format!("u{i}")), "d").await;
            held.push(raw);
        } else {
            let mut s = connect_from(crowd, gw.http).await;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head).await.unwrap();
            assert_eq!(&head, b"HTTP/1.1 200");
            held.push(RawTcp::from_stream(s));
        }
    }
    // 1,000 more from the same address, each refused and closed.
    within(Duration::from_secs(60), "1,000 refusals", async {
        for i in 0..1000 {
            if i % 2 == 0 {
                let mut raw = RawTcp::from_stream(connect_from(crowd, gw.tcp).await);
                let refusal = raw.recv().await.expect("a refusal before the close");
                assert_eq!(
                    (&refusal["type"], &refusal["code"]),
                    (&json!("error"), &json!("rate_limited")),
                    "{refusal}"
                );
                assert!(raw.recv().await.is_none(), "then closed");
            } else {
                let mut s = connect_from(crowd, gw.http).await;
                let answer = read_until_closed(&mut s).await;
                assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
                assert!(answer.contains("rate_limited"), "{answer}");
            }
        }
    })
    .await;
    // Another address is served meanwhile.
    let mut other = RawTcp::connect(&gw).await;
    other.login(&token("someone"), "d").await;

    // A closed connection gives its place back.
    drop(held.pop());
    within(WAIT, "a place freed", async {
        loop {
            let mut s = connect_from(crowd, gw.http).await;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            if read_until_closed(&mut s).await.starts_with("HTTP/1.1 200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}
