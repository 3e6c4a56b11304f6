//! HTTP delivery with `curl` as the client: short poll, long poll, SSE, `POST /v1/messages`,
//! HTTP error codes, metrics and CORS; and the chat page in headless Chromium.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

both_modes! {
async fn short_poll_answers_at_once_empty_then_with_messages(env) {
    let gw = env.gateway(&[]).await;
    let bob = auth("bob");
    let started = Instant::now();
    let r = curl(&["-H", &bob, &url(&gw, "/v1/messages?device=web")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(1));
    let empty = r.json();
    assert_eq!(empty["messages"], json!([]));
    let cursor = empty["cursor"].as_u64().unwrap();

    let (alice, _a) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    alice.send_to("bob", json!({"text": "one"})).await.unwrap();
    alice.send_to("bob", json!({"text": "two"})).await.unwrap();
    // Without `after`, the device's stored cursor; the token may also come in the query.
    let page = curl(&[&url(
        &gw,
        &format!("/v1/messages?device=web&token={}", token("bob")),
    )])
    .await
    .json();
    let texts: Vec<_> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"]["text"].clone())
        .collect();
    assert_eq!(texts, [json!("one"), json!("two")]);
    assert_eq!(page["messages"][0]["type"], "msg");
    let last = page["messages"][1]["seq"].as_u64().unwrap();
    assert_eq!(page["cursor"].as_u64().unwrap(), last);
    assert!(last > cursor);
    // `after=N` acks up to N: the device's cursor moves, and the next poll is empty.
    let r = curl(&[
        "-H",
        &bob,
        &url(&gw, &format!("/v1/messages?device=web&after={last}")),
    ])
    .await
    .json();
    assert_eq!(r["messages"], json!([]));
    let r = curl(&["-H", &bob, &url(&gw, "/v1/messages?device=web")])
        .await
        .json();
    assert_eq!(
        r["messages"],
        json!([]),
        "the cursor was stored by the previous poll"
    );
    assert_eq!(r["cursor"].as_u64().unwrap(), last);
    // limit
    let r = curl(&[
        "-H",
        &bob,
        &url(&gw, "/v1/messages?device=other&after=0&limit=1"),
    ])
    .await
    .json();
    assert_eq!(r["messages"].as_array().unwrap().len(), 1);
}
}

both_modes! {
async fn long_poll_with_nothing_pending_returns_empty_after_wait(env) {
    let gw = env.gateway(&[]).await;
    let started = Instant::now();
    let r = curl(&[
        "-H",
        &auth("bob"),
        &url(&gw, "/v1/messages?device=web&after=0&wait=1"),
    ])
    .await;
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["messages"], json!([]));
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "{took:?}"
    );
}
}

both_modes! {
/// A long poll after a seq this store never assigned (its store was reset) is answered at
/// once with a gap and the retained inbox, not held while newer, lower seqs go by.
async fn a_long_poll_after_a_seq_the_store_never_assigned_is_answered_at_once_with_a_gap(env) {
    let gw = env.gateway(&[]).await;
    let (alice, _a) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    alice
        .send_to("bob", json!({"text": "seq far below 1000"}))
        .await
        .unwrap();
    let started = Instant::now();
    let r = curl(&[
        "-H",
        &auth("bob"),
        &url(&gw, "/v1/messages?device=web&after=1000&wait=5"),
    ])
    .await
    .json();
    assert!(started.elapsed() < Duration::from_secs(3), "not held");
    assert_eq!(r["gap"], json!(true), "{r}");
    assert_eq!(r["messages"][0]["body"]["text"], "seq far below 1000", "{r}");
    assert!(r["epoch"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
}
}

both_modes! {
async fn long_polls_are_answered_by_a_tcp_send_within_a_second(env) {
    let gw = env.gateway(&[]).await;
    // Two devices of bob wait at once.
    let polls: Vec<_> = ["phone", "web"]
        .into_iter()
        .map(|device| {
            let u = url(
                &gw,
                &format!("/v1/messages?device={device}&after=0&wait=30"),
            );
            let h = auth("bob");
            tokio::spawn(async move { (curl(&["-H", &h, &u]).await, Instant::now()) })
        })
        .collect();
    // Let both polls reach the gateway and start waiting.
    until_metric(&gw, "imgate_long_polls_waiting", 2).await;
    let (alice, _a) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    let sent_at = Instant::now();
    alice
        .send_to("bob", json!({"text": "wake up"}))
        .await
        .unwrap();
    for p in polls {
        let (r, answered_at) = p.await.unwrap();
        assert_eq!(r.status, 200);
        let page = r.json();
        assert_eq!(page["messages"][0]["body"]["text"], "wake up", "{page}");
        let took = answered_at.duration_since(sent_at);
        assert!(
            took < Duration::from_secs(1),
            "answered {took:?} after the send"
        );
    }
}
}

/// Parses `curl -N` SSE output into `(event, id, data)` triples.
fn sse_events(text: &str) -> Vec<(String, Option<u64>, serde_json::Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut id = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("id: ") {
                    // `<epoch>:<seq>`
                    id = v.rsplit_once(':').and_then(|(_, seq)| seq.parse().ok());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v).ok();
                }
            }
            Some((event?, id, data?))
        })
        .collect()
}

both_modes! {
async fn sse_resumes_from_last_event_id_with_no_gap_and_no_duplicate(env) {
    let gw = env.gateway(&[]).await;
    let (alice, _a) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    for i in 0..5 {
        alice.send_to("bob", json!({"text": i})).await.unwrap();
    }
    let all = curl(&[
        "-H",
        &auth("bob"),
        &url(&gw, "/v1/messages?device=audit&after=0"),
    ])
    .await
    .json();
    let seqs: Vec<u64> = all["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len(), 5);

    // An EventSource that saw up to the 2nd message reconnects with Last-Event-ID.
    let u = url(&gw, "/v1/events?device=browser");
    let h = auth("bob");
    let last = format!("Last-Event-ID: {}", seqs[1]);
    let stream =
        tokio::spawn(
            async move { curl(&["-N", "--max-time", "2", "-H", &h, "-H", &last, &u]).await },
        );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Live messages arrive on the same stream after the backlog.
    alice.send_to("bob", json!({"text": 5})).await.unwrap();
    alice.send_to("bob", json!({"text": 6})).await.unwrap();
    let out = stream.await.unwrap();
    let events = sse_events(&out.body);
    assert_eq!(events[0].0, "welcome");
    assert_eq!(events[0].2["resume"].as_u64().unwrap(), seqs[1]);
    let msgs: Vec<_> = events.iter().filter(|e| e.0 == "msg").collect();
    let texts: Vec<u64> = msgs
        .iter()
        .map(|e| e.2["body"]["text"].as_u64().unwrap())
        .collect();
    assert_eq!(texts, [2, 3, 4, 5, 6], "no gap, no duplicate");
    let epoch = all["epoch"].as_str().unwrap();
    for (_, id, data) in &msgs {
        assert_eq!(*id, data["seq"].as_u64(), "id: is <epoch>:<seq>");
        let line = format!("id: {epoch}:{}\n", data["seq"]);
        assert!(out.body.contains(&line), "{line:?} in {}", out.body);
    }
    // `?after=` works the same way, with the epoch the ids carry.
    let u = url(&gw, &format!("/v1/events?device=b2&after={epoch}:{}", seqs[3]));
    let out = curl(&["-N", "--max-time", "1", "-H", &auth("bob"), &u]).await;
    let texts: Vec<u64> = sse_events(&out.body)
        .iter()
        .filter(|e| e.0 == "msg")
        .map(|e| e.2["body"]["text"].as_u64().unwrap())
        .collect();
    assert_eq!(texts, [4, 5, 6]);
}
}

both_modes! {
async fn an_idle_sse_stream_gets_keepalive_comments(env) {
    let gw = env.gateway(&["--sse-keepalive", "200ms"]).await;
    let out = curl(&[
        "-N",
        "--max-time",
        "1",
        "-H",
        &auth("bob"),
        &url(&gw, "/v1/events?device=idle"),
    ])
    .await;
    let comments = out.body.lines().filter(|l| l.starts_with(':')).count();
    assert!(
        comments >= 3,
        "expected a comment every 200 ms over 1 s:\n{}",
        out.body
    );
}
}

both_modes! {
async fn a_post_reaches_tcp_websocket_sse_and_long_poll_alike(env) {
    let gw = env.gateway(&[]).await;
    let (_t, mut tcp_ev) = connect(&gw, "bob", "tcp", Via::Tcp).await;
    let (_w, mut ws_ev) = connect(&gw, "bob", "ws", Via::WsJson).await;
    let sse_url = url(&gw, "/v1/events?device=sse");
    let h = auth("bob");
    let sse =
        tokio::spawn(async move { curl(&["-N", "--max-time", "2", "-H", &h, &sse_url]).await });
    welcome(&mut tcp_ev).await;
    let tail = curl(&["-H", &auth("bob"), &url(&gw, "/v1/messages?device=lp")])
        .await
        .json()["cursor"]
        .as_u64()
        .unwrap();
    let lp_url = url(&gw, &format!("/v1/messages?device=lp&after={tail}&wait=10"));
    let h = auth("bob");
    let lp = tokio::spawn(async move { curl(&["-H", &h, &lp_url]).await });
    tokio::time::sleep(Duration::from_millis(400)).await;

    let r = curl(&[
        "-X",
        "POST",
        "-H",
        &auth("alice"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"to":"bob","id":"http-1","body":{"text":"via POST"}}"#,
        &url(&gw, "/v1/messages"),
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sent = r.json();
    assert_eq!(sent["id"], "http-1");
    assert!(sent["seq"].as_u64().unwrap() > 0 && sent["ts"].as_u64().unwrap() > 0);

    assert_eq!(text(&messages(&mut tcp_ev, 1).await[0]), "via POST");
    assert_eq!(text(&messages(&mut ws_ev, 1).await[0]), "via POST");
    let lp = lp.await.unwrap().json();
    assert_eq!(lp["messages"][0]["body"]["text"], "via POST");
    let sse = sse.await.unwrap();
    let got: Vec<_> = sse_events(&sse.body)
        .into_iter()
        .filter(|e| e.0 == "msg")
        .collect();
    assert_eq!(got.len(), 1, "{}", sse.body);
    assert_eq!(got[0].2["body"]["text"], "via POST");

    // The same id again: the same seq, nothing new stored.
    let again = curl(&[
        "-X",
        "POST",
        "-H",
        &auth("alice"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"to":"bob","id":"http-1","body":{"text":"via POST"}}"#,
        &url(&gw, "/v1/messages"),
    ])
    .await
    .json();
    assert_eq!(again["seq"], sent["seq"]);
}
}

both_modes! {
async fn http_errors_carry_the_documented_codes(env) {
    let gw = env.gateway(&[
        "--max-body",
        "100",
        "--max-frame",
        "1024",
        "--send-rate",
        "2",
        "--send-burst",
        "2",
    ])
    .await;
    let post = |token_header: String, body: String| {
        let u = url(&gw, "/v1/messages");
        async move {
            curl(&[
                "-X",
                "POST",
                "-H",
                &token_header,
                "-H",
                "Content-Type: application/json",
                "-d",
                &body,
                &u,
            ])
            .await
        }
    };
    let check = |r: Curl, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", r.body);
        let j = r.json();
        assert_eq!(j["code"], code, "{j}");
        assert!(!j["message"].as_str().unwrap().is_empty());
    };
    check(
        post("Authorization: Bearer nope".into(), "{}".into()).await,
        401,
        "unauthorized",
    );
    check(
        curl(&[&url(&gw, "/v1/messages")]).await,
        401,
        "unauthorized",
    );
    check(curl(&[&url(&gw, "/v1/events")]).await, 401, "unauthorized");
    check(
        post(auth("alice"), "{not json".into()).await,
        400,
        "bad_request",
    );
    check(
        post(auth("alice"), r#"{"to":"b b","body":1}"#.into()).await,
        400,
        "bad_request",
    );
    check(
        post(
            auth("alice"),
            format!(r#"{{"to":"bob","body":"{}"}}"#, "x".repeat(200)),
        )
        .await,
        413,
        "too_large",
    );
    check(
        post(
            auth("alice"),
            format!(r#"{{"to":"bob","body":"{}"}}"#, "x".repeat(5000)),
        )
        .await,
        413,
        "too_large",
    );
    check(
        curl(&["-H", &auth("bob"), &url(&gw, "/v1/messages?device=a.b")]).await,
        400,
        "bad_request",
    );
    let mut limited = 0;
    for i in 0..6 {
        let r = post(
            auth("carol"),
            format!(r#"{{"to":"bob","id":"r{i}","body":1}}"#),
        )
        .await;
        if r.status == 429 {
            check(r, 429, "rate_limited");
            limited += 1;
        }
    }
    assert!(
        limited > 0,
        "a burst of 6 above a burst allowance of 2 is limited"
    );
    let m = curl(&[&url(&gw, "/metrics")]).await.body;
    assert!(
        m.contains(r#"imgate_errors_total{code="unauthorized"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"imgate_errors_total{code="too_large"} 2"#),
        "{m}"
    );
}
}

both_modes! {
async fn metrics_count_connections_deliveries_and_the_local_filter(env) {
    let gw = env.gateway(&[]).await;
    let (_b, mut bob_ev) = connect(&gw, "bob", "phone", Via::WsJson).await;
    let (alice, _a) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    alice
        .send_to("bob", json!({"text": "counted"}))
        .await
        .unwrap();
    alice
        .send_to("nobody-here", json!({"text": "dropped"}))
        .await
        .unwrap();
    messages(&mut bob_ev, 1).await;
    let m = curl(&[&url(&gw, "/metrics")]).await;
    assert_eq!(m.status, 200);
    for line in [
        r#"imgate_connections{transport="tcp"} 1"#,
        r#"imgate_connections{transport="ws"} 1"#,
        "imgate_messages_stored_total 2",
        // Nobody's copy reaches an interest-routed gateway at all.
        if env.nats.is_some() && interest_fanout() {
            "imgate_fanout_dropped_not_local_total 0"
        } else {
            "imgate_fanout_dropped_not_local_total 1"
        },
    ] {
        assert!(m.body.contains(line), "missing {line:?} in\n{}", m.body);
    }
    // Bob's copy over ws; alice's own two copies over tcp.
    assert!(
        m.body
            .contains(r#"imgate_delivered_total{transport="ws"} 1"#),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains(r#"imgate_delivered_total{transport="tcp"} 2"#),
        "{}",
        m.body
    );
    assert_eq!(curl(&[&url(&gw, "/healthz")]).await.status, 200);
    assert_eq!(curl(&[&url(&gw, "/readyz")]).await.status, 200);
}
}

both_modes! {
async fn cors_is_off_by_default_and_follows_cors_origin(env) {
    let plain = env.gateway(&[]).await;
    let preflight = |gw: &Gateway| {
        let u = url(gw, "/v1/messages");
        async move {
            let out = tokio::process::Command::new("curl")
                .args([
                    "-sS",
                    "-i",
                    "-X",
                    "OPTIONS",
                    "-H",
                    "Origin: http://app.example",
                    "-H",
                    "Access-Control-Request-Method: POST",
                    &u,
                ])
                .output()
                .await
                .unwrap();
            String::from_utf8(out.stdout).unwrap().to_ascii_lowercase()
        }
    };
    assert!(!preflight(&plain)
        .await
        .contains("access-control-allow-origin"));
    let open = env.gateway(&["--cors-origin", "http://app.example"]).await;
    assert!(preflight(&open)
        .await
        .contains("access-control-allow-origin: http://app.example"));
}
}

/// In headless Chromium (`--features external`).
#[cfg(feature = "external")]
mod browser {
    use super::*;

    both_modes! {
    /// The chat page in headless Chromium: two users exchange messages over each transport.
    async fn chat_page_works_over_every_transport_in_a_browser(env) {
        let gw = env.gateway(&[]).await;
        let root = env!("CARGO_MANIFEST_DIR");
        let shot = std::env::var("IMGATE_SCREENSHOT")
            .unwrap_or_else(|_| format!("{root}/docs/chat.png"));
        let base = format!("http://{}", gw.http);
        let limit = Duration::from_secs(120);
        browser_script("chat.mjs", &[&base, &shot], &[], limit, "browser test passed").await;
    }
    }
}

both_modes! {
/// Presence counts a user's connections; bad uids are refused.
async fn presence_counts_connections(env) {
    let gw = env.gateway(&[]).await;
    let (_a, _ea) = connect(&gw, "bob", "phone", Via::Tcp).await;
    let (_b, _eb) = connect(&gw, "bob", "web", Via::WsJson).await;
    let r = curl(&["-H", &auth("alice"), &url(&gw, "/v1/presence?uid=bob,carol")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json();
    assert_eq!(p["presence"]["bob"], json!({"online": true, "connections": 2}));
    assert_eq!(p["presence"]["carol"], json!({"online": false, "connections": 0}));
    let bad = curl(&["-H", &auth("alice"), &url(&gw, "/v1/presence?uid=bob,no.dots")]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(curl(&[&url(&gw, "/v1/presence?uid=bob")]).await.status, 401);
}
}

both_modes! {
async fn sigterm_ends_an_sse_stream_with_bye_shutdown(env) {
    let mut gw = env.gateway(&["--drain-timeout", "3s"]).await;
    let u = url(&gw, "/v1/events?device=sse");
    let h = auth("bob");
    let started = std::time::Instant::now();
    let stream =
        tokio::spawn(async move { curl(&["-N", "--max-time", "20", "-H", &h, &u]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.signal("TERM").unwrap();
    let out = stream.await.unwrap();
    let events = sse_events(&out.body);
    assert_eq!(events.first().map(|e| e.0.as_str()), Some("welcome"), "{}", out.body);
    let last = events.last().expect("events");
    assert_eq!(last.0, "bye", "{}", out.body);
    assert_eq!(last.2["reason"], "shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the stream ended at shutdown, not at curl's --max-time"
    );
    assert!(gw.wait(Duration::from_secs(5)).await.unwrap().success());
}
}

/// `--metrics-listen` moves `/metrics` to a listener of its own: the public one answers 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_to_their_own_listener() {
    let gw = Gateway::start(&["--metrics-listen", "127.0.0.1:0"])
        .await
        .unwrap();
    let private = gw.metrics.expect("the gateway printed its metrics address");
    let public = curl(&[&format!("http://{}/metrics", gw.http)]).await;
    assert_eq!(public.status, 404);
    let scraped = curl(&[&format!("http://{private}/metrics")]).await;
    assert_eq!(scraped.status, 200);
    assert!(
        scraped.body.contains("imgate_connections"),
        "{}",
        scraped.body
    );
    let only = curl(&[&format!("http://{private}/v1/messages")]).await;
    assert_eq!(only.status, 404, "the metrics listener serves nothing else");
}
