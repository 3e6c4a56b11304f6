//! Groups, admin messages and live rooms, in both modes (three gateways in cluster mode).

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use imgate_client::{ErrorKind, Event, Events};
use imgate_proto::{ClientFrame, ErrorCode, Send};
use serde_json::{json, Value};

use crate::support::*;

/// Publishes probes until every viewer got one: joins travel asynchronously.
async fn wait_until_joined(
    host: &imgate_client::Client,
    room: &str,
    viewers: &mut [(imgate_client::Client, Events)],
) {
    let mut seen = vec![false; viewers.len()];
    within(WAIT, "every viewer joined", async {
        while seen.iter().any(|s| !s) {
            host.frame(ClientFrame::Publish {
                room: room.into(),
                body: json!({"probe": true}),
            })
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            for (i, (_, ev)) in viewers.iter_mut().enumerate() {
                while let Ok(e) = ev.try_recv() {
                    if matches!(e, Event::Room { .. }) {
                        seen[i] = true;
                    }
                }
            }
        }
    })
    .await;
    // Let probes still in flight arrive, then forget them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (_, ev) in viewers.iter_mut() {
        while ev.try_recv().is_ok() {}
    }
}

/// The `n` numbers of the next `count` numbered room messages.
async fn room_numbers(ev: &mut Events, count: usize) -> Vec<u64> {
    let mut got = Vec::new();
    within(Duration::from_secs(30), "room messages", async {
        while got.len() < count {
            match ev.recv().await {
                Some(Event::Room { body, .. }) => {
                    if let Some(n) = body.get("n").and_then(Value::as_u64) {
                        got.push(n);
                    }
                }
                Some(_) => {}
                None => panic!("viewer ended"),
            }
        }
    })
    .await;
    got
}

fn group_send(id: String, group: &str, body: Value) -> Send {
    Send {
        id: Some(id),
        to: None,
        group: Some(group.into()),
        body,
    }
}

both_modes! {
/// 50 members over three gateways, ten of them with two devices; 200 messages from 5
/// senders: every device of every member gets every message once, in seq order.
async fn group_messages_reach_every_device_of_every_member_once(env) {
    let gws = env.gateways(3, &[]).await;
    let members: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    create_group(&gws[0], "m0", "team", &members[1..]).await;
    let mut devices: Vec<(String, Events)> = Vec::new();
    let mut keep = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let ndev = if i % 5 == 0 { 2 } else { 1 };
        for d in 0..ndev {
            let via = if (i + d) % 2 == 0 { Via::Tcp } else { Via::WsJson };
            let (c, ev) = connect(&gws[(i + d) % gws.len()], m, &format!("d{d}"), via).await;
            keep.push(c);
            devices.push((m.clone(), ev));
        }
    }
    let (_o, mut outsider) = connect(&gws[0], "outsider", "x", Via::Tcp).await;
    let mut clients = Vec::new();
    for s in [1usize, 7, 13, 29, 41].iter() {
        clients.push(connect(&gws[s % gws.len()], &members[*s], "sender", Via::Tcp).await);
    }
    let sends = clients.iter().enumerate().map(|(k, (c, _))| async move {
        for j in 0..40 {
            c.send(group_send(format!("g-{k}-{j}"), "team", json!({"text": j}))).await.unwrap();
        }
    });
    join_all(sends).await;
    for (who, ev) in devices.iter_mut() {
        let got = messages(ev, 200).await;
        let ids: HashSet<_> = got.iter().map(|m| m.id.clone()).collect();
        assert_eq!(ids.len(), 200, "{who} got every message once");
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "{who} in seq order");
        assert!(got.iter().all(|m| m.group.as_deref() == Some("team") && m.to.is_none()));
        no_message(ev, Duration::from_millis(100)).await;
    }
    no_message(&mut outsider, Duration::from_millis(300)).await;
}

/// Removal stops deliveries everywhere within a second; the removed member cannot send; a
/// member added later gets what is sent after the add.
async fn membership_changes_take_effect_on_every_gateway(env) {
    let gws = env.gateways(3, &[]).await;
    let g = |i: usize| &gws[i % gws.len()];
    create_group(g(0), "ann", "crew", &["bob".into(), "cat".into()]).await;
    let (bob, mut bob_ev) = connect(g(1), "bob", "p", Via::Tcp).await;
    let (cat, mut cat_ev) = connect(g(2), "cat", "p", Via::WsJson).await;
    let (_d, mut dan_ev) = connect(g(0), "dan", "p", Via::Tcp).await;
    bob.send(group_send("c1".into(), "crew", json!({"text": "all three"}))).await.unwrap();
    assert_eq!(text(&messages(&mut cat_ev, 1).await[0]), "all three");

    // Only the owner removes others.
    let r = post_json(g(1), "/v1/groups/crew/members", &auth("bob"), json!({"remove": ["cat"]})).await;
    assert_eq!((r.status, r.json()["code"].clone()), (403, json!("not_member")));
    let r = post_json(g(0), "/v1/groups/crew/members", &auth("ann"), json!({"remove": ["cat"], "add": ["dan"]})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["members"], json!(["ann", "bob", "dan"]));
    // A second for the change to reach every gateway, one more for the test's own probes
    // (a curl process per gateway and try) on a loaded machine.
    let changed = std::time::Instant::now();
    within(WAIT, "the change on every gateway", async {
        for i in 0..3 {
            while curl(&["-H", &auth("bob"), &url(g(i), "/v1/groups/crew")]).await.json()["members"]
                != json!(["ann", "bob", "dan"])
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await;
    assert!(changed.elapsed() < Duration::from_secs(2), "seen everywhere after {:?}", changed.elapsed());

    bob.send(group_send("c2".into(), "crew", json!({"text": "without cat"}))).await.unwrap();
    assert_eq!(text(&messages(&mut dan_ev, 1).await[0]), "without cat");
    let own: Vec<_> = messages(&mut bob_ev, 2).await;
    assert_eq!(text(&own[1]), "without cat");
    no_message(&mut cat_ev, Duration::from_millis(500)).await;
    let err = cat.send(group_send("c3".into(), "crew", json!({}))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server(ErrorCode::NotMember), "{err}");

    // A member may leave; the group is visible to members only.
    let r = post_json(g(2), "/v1/groups/crew/members", &auth("dan"), json!({"remove": ["dan"]})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = curl(&["-H", &auth("bob"), &url(g(1), "/v1/groups/crew")]).await;
    assert_eq!(r.json(), json!({"id": "crew", "owner": "ann", "members": ["ann", "bob"]}));
    assert_eq!(curl(&["-H", &auth("cat"), &url(g(1), "/v1/groups/crew")]).await.status, 403);
    assert_eq!(curl(&["-H", &auth("cat"), &url(g(1), "/v1/groups/nope")]).await.status, 404);
}

/// Admin messages need an admin token and come from "system".
async fn admin_messages(env) {
    let gw = env.gateway(&[]).await;
    let (_b, mut bob) = connect(&gw, "bob", "p", Via::Tcp).await;
    create_group(&gw, "ann", "ops", &["bob".into()]).await;
    let r = post_json(&gw, "/v1/admin/messages", &auth("ann"), json!({"to": "bob", "body": {"text": "x"}})).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let admin = format!("Authorization: Bearer {}", admin_token("root"));
    let r = post_json(&gw, "/v1/admin/messages", &admin, json!({"to": "bob", "body": {"text": "maintenance at 2"}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post_json(&gw, "/v1/admin/messages", &admin, json!({"group": "ops", "body": {"text": "to the group"}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = messages(&mut bob, 2).await;
    assert_eq!((got[0].from.as_str(), text(&got[0])), ("system", "maintenance at 2"));
    assert_eq!((got[1].from.as_str(), got[1].group.as_deref()), ("system", Some("ops")));
}

/// Bad group and room input gets clear errors.
async fn bad_group_and_room_input(env) {
    let gw = env.gateway(&[]).await;
    let many: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
    let r = post_json(&gw, "/v1/groups", &auth("ann"), json!({"id": "big", "members": many})).await;
    assert_eq!((r.status, r.json()["code"].clone()), (400, json!("bad_request")), "1,001 with the owner");
    let r = post_json(&gw, "/v1/groups", &auth("ann"), json!({"id": "big", "members": many[..999]})).await;
    assert_eq!(r.status, 201, "1,000 is allowed");
    let r = post_json(&gw, "/v1/groups", &auth("ann"), json!({"id": "big", "members": []})).await;
    assert_eq!(r.status, 409, "exists");
    for body in [json!({"id": "bad id", "members": []}), json!({"id": "ok", "members": ["no.dots"]}), json!({"members": []})] {
        let r = post_json(&gw, "/v1/groups", &auth("ann"), body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    let (c, _ev) = connect(&gw, "zed", "p", Via::Tcp).await;
    let err = c.send(group_send("z1".into(), "big", json!({}))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server(ErrorCode::NotMember));
    let err = c.send(group_send("z2".into(), "nosuch", json!({}))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server(ErrorCode::NotFound));
    // Rooms: a 33rd join, a bad room id, publishing without joining.
    let mut raw = RawTcp::connect(&gw).await;
    raw.login(&token("zed"), "raw").await;
    for i in 0..32 {
        raw.send(json!({"type": "join", "room": format!("r{i}")})).await;
    }
    raw.send(json!({"type": "join", "room": "r32"})).await;
    let e = raw.recv_type("error").await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("32"), "{e}");
    raw.send(json!({"type": "join", "room": "no spaces"})).await;
    assert_eq!(raw.recv_type("error").await["code"], "bad_request");
    raw.send(json!({"type": "publish", "room": "elsewhere", "body": 1})).await;
    assert_eq!(raw.recv_type("error").await["code"], "not_member");
}

/// A room across gateways: every joined connection gets every message, and a leaver stops
/// getting them.
async fn rooms_reach_every_joined_connection(env) {
    const N: usize = 300;
    const M: u64 = 50;
    let gws = env.gateways(3, &[]).await;
    let mut viewers = Vec::new();
    for i in 0..N {
        let via = if i % 2 == 0 { Via::Tcp } else { Via::WsMsgpack };
        let (c, ev) = connect(&gws[i % gws.len()], &format!("v{i}"), "p", via).await;
        c.frame(ClientFrame::Join { room: "live".into() }).await.unwrap();
        viewers.push((c, ev));
    }
    let (host, _h) = connect(&gws[gws.len() - 1], "host", "p", Via::Tcp).await;
    host.frame(ClientFrame::Join { room: "live".into() }).await.unwrap();
    wait_until_joined(&host, "live", &mut viewers).await;

    for i in 0..M {
        host.frame(ClientFrame::Publish { room: "live".into(), body: json!({"n": i}) }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let counts = join_all(viewers.iter_mut().map(|(_, ev)| room_numbers(ev, M as usize))).await;
    for got in &counts {
        assert_eq!(got, &(0..M).collect::<Vec<u64>>(), "every message, in order");
    }

    // Leavers stop getting room messages.
    for (c, _) in viewers.iter().take(50) {
        c.frame(ClientFrame::Leave { room: "live".into() }).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.frame(ClientFrame::Publish { room: "live".into(), body: json!({"after": "leave"}) }).await.unwrap();
    for (i, (_, ev)) in viewers.iter_mut().enumerate() {
        let mut got_it = false;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(if i < 50 { 300 } else { 5000 });
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, ev.recv()).await {
            if let Event::Room { body, .. } = e {
                if body.get("after").is_some() {
                    got_it = true;
                    break;
                }
            }
        }
        assert_eq!(got_it, i >= 50, "viewer {i}");
    }
}

/// A reader that stops reading loses room messages (counted in /metrics) without slowing
/// the others, and never loses a stored message.
async fn a_stalled_room_reader_loses_room_messages_not_stored_ones(env) {
    const M: u64 = 1_500;
    // Outboxes of 256: a reader that keeps up never has 192 room messages queued, one that
    // stopped reading soon does.
    let gws = env.gateways(2, &["--outbox", "256"]).await;
    let mut viewers = Vec::new();
    for i in 0..5 {
        let (c, ev) = connect(&gws[i % gws.len()], &format!("f{i}"), "p", Via::Tcp).await;
        c.frame(ClientFrame::Join { room: "flood".into() }).await.unwrap();
        viewers.push((c, ev));
    }
    // A small receive buffer, so the kernel holds little for it once it stops reading.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stalled = RawTcp::from_stream(sock.connect(gws[0].tcp).await.unwrap());
    stalled.login(&token("stalled"), "p").await;
    stalled.send(json!({"type": "join", "room": "flood"})).await;
    let (host, _h) = connect(&gws[gws.len() - 1], "host", "p", Via::Tcp).await;
    host.frame(ClientFrame::Join { room: "flood".into() }).await.unwrap();
    wait_until_joined(&host, "flood", &mut viewers).await;

    let pad = "x".repeat(8 * 1024);
    for i in 0..M {
        host.frame(ClientFrame::Publish { room: "flood".into(), body: json!({"n": i, "pad": pad}) }).await.unwrap();
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let counts = join_all(viewers.iter_mut().map(|(_, ev)| room_numbers(ev, M as usize))).await;
    for got in &counts {
        assert_eq!(got, &(0..M).collect::<Vec<u64>>(), "the others got every message");
    }
    let dropped: u64 = join_all(gws.iter().map(|g| async move {
        let m = curl(&[&url(g, "/metrics")]).await.body;
        m.lines()
            .find_map(|l| l.strip_prefix("imgate_room_dropped_total ")?.parse::<u64>().ok())
            .unwrap_or(0)
    }))
    .await
    .into_iter()
    .sum();
    assert!(dropped > 0, "the stalled reader lost room messages, counted in /metrics");

    // A stored message for the stalled reader is not lost: it is in the stream it reads
    // once it reads again, or (closed as a slow consumer) it resumes and gets it.
    host.send_to("stalled", json!({"text": "stored"})).await.unwrap();
    let mut found = false;
    while let Some(f) = stalled.recv().await {
        if f["type"] == "msg" && f["body"]["text"] == "stored" {
            found = true;
            break;
        }
    }
    if !found {
        let (_s, mut ev) = connect(&gws[0], "stalled", "p", Via::Tcp).await;
        assert_eq!(text(&messages(&mut ev, 1).await[0]), "stored");
    }
}

/// SSE and long-poll devices take part in rooms over HTTP.
async fn rooms_over_http_for_sse_and_long_poll(env) {
    let gw = env.gateway(&[]).await;
    let bob = auth("bob");
    let r = post_json(&gw, "/v1/rooms/hall/join?device=tab", &bob, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post_json(&gw, "/v1/rooms/hall/join?device=lp", &bob, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sse_url = url(&gw, "/v1/events?device=tab");
    let h = bob.clone();
    let sse = tokio::spawn(async move { curl(&["-N", "--max-time", "2", "-H", &h, &sse_url]).await });
    let lp_url = url(&gw, "/v1/messages?device=lp&wait=10");
    let h = bob.clone();
    let lp = tokio::spawn(async move { curl(&["-H", &h, &lp_url]).await });
    until_metric(&gw, r#"imgate_connections{transport="sse"}"#, 1).await;
    until_metric(&gw, "imgate_long_polls_waiting", 1).await;
    // A publisher joins first, as a connection must.
    let r = post_json(&gw, "/v1/rooms/hall/publish", &auth("ann"), json!({"body": {"text": "too early"}})).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post_json(&gw, "/v1/rooms/hall/join", &auth("ann"), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post_json(&gw, "/v1/rooms/hall/publish", &auth("ann"), json!({"body": {"text": "hello hall"}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let page = lp.await.unwrap().json();
    assert_eq!(page["messages"], json!([]));
    assert_eq!(page["rooms"][0]["type"], "room");
    assert_eq!(page["rooms"][0]["body"]["text"], "hello hall");
    let sse = sse.await.unwrap().body;
    assert!(sse.contains("event: room") && sse.contains("hello hall"), "{sse}");
    let r = post_json(&gw, "/v1/rooms/hall/leave?device=tab", &bob, json!({})).await;
    assert_eq!(r.status, 200);
    let r = post_json(&gw, "/v1/rooms/bad.room/join", &bob, json!({})).await;
    assert_eq!(r.status, 400);
}
}
