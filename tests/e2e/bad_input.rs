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

/// Slow clients (docs/protocol.md, "TLS and slow clients"): a header sent a byte at a time
/// is cut off at `--header-timeout`, and so is a keep-alive connection that stays idle after
/// an answer.
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

/// Answers to one connection's frames leave in the order of the frames: pipelined sends,
/// valid ones between ones refused at once (a bad recipient, a bad message id), are
/// answered send by send, on TCP and on WebSocket JSON.
#[tokio::test]
async fn pipelined_sends_are_answered_in_the_order_they_were_sent() {
    let gw = Gateway::start(&[] as &[&str]).await.unwrap();
    let frames: Vec<Value> = (0..9)
        .map(|i| match i % 3 {
            0 => json!({"type":"send","id":format!("ok{i}"),"to":"bob","body":{"i":i}}),
            1 => json!({"type":"send","id":format!("bad{i}"),"to":"b.d","body":{"i":i}}),
            _ => json!({"type":"send","id":"has space","to":"bob","body":{"i":i}}),
        })
        .collect();
    let expected: Vec<(&str, Value)> = (0..9)
        .map(|i| match i % 3 {
            0 => ("sent", json!(format!("ok{i}"))),
            1 => ("error", json!(format!("bad{i}"))),
            _ => ("error", Value::Null),
        })
        .collect();
    let check = |got: Vec<Value>, via: &str| {
        let got: Vec<(String, Value)> = got
            .iter()
            .map(|f| (f["type"].as_str().unwrap().to_owned(), f["id"].clone()))
            .collect();
        let want: Vec<(String, Value)> = expected
            .iter()
            .map(|(t, id)| (t.to_string(), id.clone()))
            .collect();
        assert_eq!(got, want, "{via}");
    };
    for trial in 0..5 {
        let mut raw = RawTcp::connect(&gw).await;
        raw.login(&token("alice"), &format!("tcp{trial}")).await;
        let mut all = Vec::new();
        for f in &frames {
            let payload = rmp_serde::to_vec_named(f).unwrap();
            all.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            all.extend_from_slice(&payload);
        }
        raw.write(&all).await;
        let mut answers = Vec::new();
        while answers.len() < frames.len() {
            let f = raw.recv().await.expect("an answer");
            if f["type"] != "msg" {
                answers.push(f);
            }
        }
        check(answers, "tcp");
    }
    let url = format!("{}?token={}&device=ws", gw.ws_url(), token("alice"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    for f in &frames {
        ws.feed(WsMessage::Text(f.to_string().into()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    let mut answers = Vec::new();
    while answers.len() < frames.len() {
        let f: Value = match ws.next().await.unwrap().unwrap() {
            WsMessage::Text(t) => serde_json::from_str(&t).unwrap(),
            other => panic!("{other:?}"),
        };
        if !["msg", "welcome"].contains(&f["type"].as_str().unwrap()) {
            answers.push(f);
        }
    }
    check(answers, "ws");
}

/// A msgpack body holding a number JSON cannot carry is refused, never turned into `null`;
/// bytes after a msgpack frame's map are refused, not ignored; `system` receives nothing.
#[tokio::test]
async fn nan_bodies_trailing_bytes_and_sends_to_system_are_refused() {
    let gw = Gateway::start(&[] as &[&str]).await.unwrap();
    let mut raw = RawTcp::connect(&gw).await;
    raw.login(&token("alice"), "raw").await;
    for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        // {"type":"send","id":"n","to":"bob","body":{"x": x}} with a real float64.
        // Written by hand: a JSON value cannot hold NaN. 0x8N is a map of N, 0xa0|len a short
        // string, 0xcb a float64.
        let s = |t: &str| [&[0xa0 | t.len() as u8][..], t.as_bytes()].concat();
        let mut payload = vec![0x84];
        for (k, v) in [("type", "send"), ("id", "n"), ("to", "bob")] {
            payload.extend(s(k));
            payload.extend(s(v));
        }
        payload.extend(s("body"));
        payload.push(0x81);
        payload.extend(s("x"));
        payload.push(0xcb);
        payload.extend(x.to_be_bytes());
        raw.send_raw(&payload).await;
        let err = raw.recv_type("error").await;
        assert_eq!(err["code"], "bad_request", "{x}: {err}");
        assert!(err["message"].as_str().unwrap().contains("JSON"), "{err}");
    }
    // A float JSON can carry is delivered as it was sent.
    let fine = json!({"type":"send","id":"f","to":"alice","body":{"x":1.5}});
    raw.send(fine).await;
    let m = raw.recv_type("msg").await;
    assert_eq!(m["body"], json!({"x": 1.5}));

    let mut payload = rmp_serde::to_vec_named(&json!({"type":"ping"})).unwrap();
    payload.extend_from_slice(&[0x01, 0x02]);
    raw.send_raw(&payload).await;
    let err = raw.recv_type("error").await;
    assert_eq!(err["code"], "bad_request");
    assert!(err["message"].as_str().unwrap().contains("after"), "{err}");

    let err = expect_error_then_still_served(
        &mut raw,
        json!({"type":"send","id":"s","to":"system","body":{}}),
        "bad_request",
    )
    .await;
    assert!(err["message"].as_str().unwrap().contains("system"), "{err}");
    let r = post_json(
        &gw,
        "/v1/messages",
        &auth("alice"),
        json!({"to":"system","body":{}}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
}

/// Before login a TCP frame is at most 16 KiB: a bigger one gets `bye` at once, and the
/// gateway never buffers it.
#[tokio::test]
async fn a_tcp_frame_above_16_kib_before_login_is_refused() {
    let gw = Gateway::start(&[] as &[&str]).await.unwrap();
    let mut raw = RawTcp::connect(&gw).await;
    // Only the length prefix of a 200 KB frame: the answer must not wait for the rest.
    raw.write(&(200_000u32).to_be_bytes()).await;
    let bye = raw.recv().await.expect("bye");
    assert_eq!(bye, json!({"type":"bye","reason":"frame_too_large"}));
    raw.expect_closed().await;
    // A login of ordinary size still works, and after it the usual --max-frame applies.
    let mut raw = RawTcp::connect(&gw).await;
    raw.login(&token("alice"), "raw").await;
    raw.send(json!({"type":"send","id":"big","to":"bob","body":{"t":"x".repeat(40_000)}}))
        .await;
    assert_eq!(raw.recv_type("sent").await["id"], "big");
}

/// Request headers are at most 64 KiB (431 beyond), and HTTP/2 without TLS (h2c) is not
/// spoken: its preface is refused at once instead of holding a connection past the header
/// timeout.
#[tokio::test]
async fn large_headers_get_431_and_an_http2_preface_is_refused() {
    use tokio::io::AsyncWriteExt;
    let gw = Gateway::start(&["--header-timeout", "30s"]).await.unwrap();
    let big = format!("X-Big: {}", "a".repeat(70 * 1024));
    let r = curl(&["-H", &big, &format!("http://{}/healthz", gw.http)]).await;
    assert_eq!(r.status, 431, "{}", r.body);
    let ok = format!("X-Ok: {}", "a".repeat(30 * 1024));
    let r = curl(&["-H", &ok, &format!("http://{}/healthz", gw.http)]).await;
    assert_eq!(r.status, 200);

    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    // The HTTP/2 connection preface and an empty SETTINGS frame.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    within(
        Duration::from_secs(10),
        "the h2c connection to be closed",
        read_until_closed(&mut s),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A WebSocket peer that breaks the protocol is closed with a close code that says so:
/// 1007 for a text message that is not UTF-8, 1002 for a frame with reserved bits set.
#[tokio::test]
async fn websocket_protocol_violations_close_with_1002_or_1007() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start(&[] as &[&str]).await.unwrap();
    // (frame header byte, payload): a masked text frame of invalid UTF-8, and a text frame
    // with RSV1 set (no extension was negotiated).
    for (first, payload, code) in [
        (0x81u8, vec![0xff, 0xfe, 0xfd], 1007u16),
        (0xC1u8, b"{}".to_vec(), 1002u16),
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        let req = format!(
            "GET /v1/ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
            token("alice")
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.unwrap());
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        // The welcome (a text frame) comes first.
        let mut frame = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend(&payload); // a zero mask leaves the payload as it is
        s.write_all(&frame).await.unwrap();
        let mut bytes = Vec::new();
        within(WAIT, "the close frame", s.read_to_end(&mut bytes))
            .await
            .ok();
        // Scan the server's frames for the close (opcode 8) and read its code.
        let mut i = 0;
        let mut close = None;
        while i + 2 <= bytes.len() {
            let (op, len) = (bytes[i] & 0x0f, (bytes[i + 1] & 0x7f) as usize);
            let (start, len) = match len {
                126 => (
                    i + 4,
                    u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize,
                ),
                n => (i + 2, n),
            };
            if op == 8 && len >= 2 {
                close = Some(u16::from_be_bytes([bytes[start], bytes[start + 1]]));
            }
            i = start + len;
        }
        assert_eq!(close, Some(code), "{bytes:?}");
    }
}
