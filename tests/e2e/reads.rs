//! Read positions: a `read` frame or `POST /v1/read` raises the user's read position, and
//! every other connection of that user hears it, on every transport (TCP, WebSocket, SSE,
//! a long poll) and on every gateway; `welcome` and `GET /v1/read` carry it with the
//! unread count; it never goes down, is refused beyond what the reader can have seen, and
//! survives a restart of a standalone gateway.

use std::time::Duration;

use imgate_client::{Event, Events};
use imgate_proto::{ClientFrame, ErrorCode};
use serde_json::{json, Value};

use crate::support::*;

/// Waits for the next `Read` event, skipping others.
async fn read_event(events: &mut Events) -> u64 {
    within(WAIT, "a read event", async {
        loop {
            match events.recv().await {
                Some(Event::Read { seq }) => return seq,
                Some(_) => {}
                None => panic!("client ended before a read event"),
            }
        }
    })
    .await
}

/// Waits for the first `Welcome` event and returns its read position and unread count.
async fn welcome_read(events: &mut Events) -> (u64, u64) {
    match welcome_event(events).await {
        Event::Welcome { read, unread, .. } => (read, unread),
        _ => unreachable!("welcome_event returns a welcome"),
    }
}

/// Asserts that no `Read` event arrives within `d`.
async fn no_read_event(events: &mut Events, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, events.recv()).await {
        assert!(!matches!(e, Event::Read { .. }), "unexpected {e:?}");
    }
}

async fn get_read(gw: &Gateway, uid: &str) -> Value {
    let r = curl(&["-H", &auth(uid), &url(gw, "/v1/read")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

both_modes! {
/// Bob has a phone (TCP) and a laptop (WebSocket), a browser tab on SSE and a device on
/// long polls, spread over two gateways in cluster mode. The phone reads: everything else
/// of bob's hears it, the phone itself does not; then a read over HTTP reaches the phone.
async fn a_read_reaches_the_users_other_connections_on_every_transport_and_gateway(env) {
    let gws = env.gateways(2, &[]).await;
    let (first, last) = (&gws[0], gws.last().unwrap());
    let (alice, _a) = connect(first, "alice", "desk", Via::Tcp).await;
    let (phone, mut phone_ev) = connect(first, "bob", "phone", Via::Tcp).await;
    let (_laptop, mut laptop_ev) = connect(last, "bob", "laptop", Via::WsJson).await;
    assert_eq!(welcome_read(&mut phone_ev).await, (0, 0));
    for i in 0..3 {
        alice.send_to("bob", json!({"text": i})).await.unwrap();
    }
    let got = messages(&mut phone_ev, 3).await;
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    messages(&mut laptop_ev, 3).await;
    assert_eq!(
        get_read(first, "bob").await,
        json!({"read": 0, "unread": 3})
    );

    // An SSE tab and a long poll waiting past the newest message, both on the last gateway.
    let (h, u) = (auth("bob"), url(last, "/v1/events?device=tab"));
    let sse = tokio::spawn(async move { curl(&["-N", "--max-time", "3", "-H", &h, &u]).await });
    let (h, u) = (
        auth("bob"),
        url(last, &format!("/v1/messages?device=lp&after={}&wait=20", seqs[2])),
    );
    let lp = tokio::spawn(async move { curl(&["-H", &h, &u]).await });
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The phone has read the first two.
    phone.read(seqs[1]).await.unwrap();
    assert_eq!(read_event(&mut laptop_ev).await, seqs[1]);
    let page = within(WAIT, "the long poll's answer", lp).await.unwrap().json();
    assert_eq!(page["read"], seqs[1], "{page}");
    assert_eq!(page["messages"], json!([]));
    let sse = sse.await.unwrap().body;
    let read_frame = format!("event: read\ndata: {{\"type\":\"read\",\"seq\":{}}}", seqs[1]);
    assert!(sse.contains(&read_frame), "{sse}");
    no_read_event(&mut phone_ev, Duration::from_millis(500)).await;
    for gw in &gws {
        assert_eq!(get_read(gw, "bob").await, json!({"read": seqs[1], "unread": 1}));
    }

    // The rest, over HTTP: every connection hears it, the phone too.
    let r = post_json(last, "/v1/read", &auth("bob"), json!({"seq": seqs[2]})).await;
    assert_eq!((r.status, r.json()), (200, json!({"read": seqs[2]})));
    assert_eq!(read_event(&mut phone_ev).await, seqs[2]);
    assert_eq!(read_event(&mut laptop_ev).await, seqs[2]);

    // A lower position changes nothing, and nobody hears of it.
    let r = post_json(first, "/v1/read", &auth("bob"), json!({"seq": seqs[0]})).await;
    assert_eq!((r.status, r.json()), (200, json!({"read": seqs[2]})));
    phone.read(seqs[0]).await.unwrap();
    no_read_event(&mut laptop_ev, Duration::from_millis(500)).await;

    // A new device is welcomed with the position and what is unread above it; bob's own
    // sends never count.
    phone.send_to("alice", json!({"text": "mine"})).await.unwrap();
    alice.send_to("bob", json!({"text": "new"})).await.unwrap();
    let (_tablet, mut tablet_ev) = connect(last, "bob", "tablet", Via::WsMsgpack).await;
    assert_eq!(welcome_read(&mut tablet_ev).await, (seqs[2], 1));
    assert_eq!(get_read(last, "bob").await, json!({"read": seqs[2], "unread": 1}));
}

/// Beyond what the reader can have seen is refused, with a clear error, and stores nothing.
async fn a_read_beyond_what_was_seen_is_refused(env) {
    let gw = env.gateway(&[]).await;
    let (alice, _a) = connect(&gw, "alice", "desk", Via::Tcp).await;
    let (phone, mut phone_ev) = connect(&gw, "bob", "phone", Via::Tcp).await;
    alice.send_to("bob", json!({"text": "hi"})).await.unwrap();
    let seq = messages(&mut phone_ev, 1).await[0].seq;
    phone.frame(ClientFrame::Read { seq: seq + 1 }).await.unwrap();
    let refused = within(WAIT, "the refusal", async {
        loop {
            if let Some(Event::Error { code, message }) = phone_ev.recv().await {
                return (code, message);
            }
        }
    })
    .await;
    assert_eq!(refused.0, ErrorCode::BadRequest, "{}", refused.1);
    assert!(refused.1.contains("beyond"), "{}", refused.1);
    let r = post_json(&gw, "/v1/read", &auth("bob"), json!({"seq": 1_000_000})).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("bad_request")), "{}", r.body);
    let r = post_json(&gw, "/v1/read", &auth("bob"), json!({"seq": "x"})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = curl(&["-X", "POST", "-d", r#"{"seq":1}"#, &url(&gw, "/v1/read")]).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(get_read(&gw, "bob").await, json!({"read": 0, "unread": 1}));
}
}

/// A standalone gateway keeps read positions in its data directory.
#[tokio::test]
async fn a_restart_keeps_the_read_position() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--data-dir", dir.path().to_str().unwrap()];
    let mut gw = Gateway::start(&args).await.unwrap();
    let (alice, _a) = connect(&gw, "alice", "desk", Via::Tcp).await;
    let mut seqs = Vec::new();
    for i in 0..2 {
        seqs.push(alice.send_to("bob", json!({"text": i})).await.unwrap().seq);
    }
    let r = post_json(&gw, "/v1/read", &auth("bob"), json!({"seq": seqs[0]})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    drop(alice);
    gw.signal("TERM").unwrap();
    assert!(gw.wait(WAIT).await.unwrap().success());
    let gw = Gateway::start(&args).await.unwrap();
    assert_eq!(
        get_read(&gw, "bob").await,
        json!({"read": seqs[0], "unread": 1})
    );
}
