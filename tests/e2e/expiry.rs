//! Tokens expire on open connections (docs/protocol.md, "Ids and tokens"): at `exp` plus the
//! 5 s leeway a TCP or WebSocket connection gets `bye expired` and an SSE stream ends with
//! `event: bye`, unless a `refresh` with a newer token for the same uid came first.

use std::time::Duration;

use imgate_client::{ClientBuilder, Event};
use imgate_gateway::auth::Auth;
use imgate_proto::ByeReason;
use serde_json::json;

use crate::support::*;

/// A development-mode token for `uid` that expires in `secs` seconds.
fn token_for(uid: &str, secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    remember(Auth::new(None).mint_with_exp(uid, now + secs, false))
}

/// Long enough for a 3 s token plus the leeway to pass.
const PAST_EXPIRY: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_end_at_expiry_unless_refreshed_by_the_same_uid() {
    let gw = Gateway::start(&["--idle-timeout", "1h"]).await.unwrap();

    let tcp_expires = async {
        let mut raw = RawTcp::connect(&gw).await;
        let w = raw.login(&token_for("alice", 3), "d").await;
        assert!(w["exp"].as_u64().is_some(), "welcome carries exp: {w}");
        let bye = within(PAST_EXPIRY, "bye expired", raw.recv_type("bye")).await;
        assert_eq!(bye["reason"], "expired");
    };
    let tcp_refreshed = async {
        let mut raw = RawTcp::connect(&gw).await;
        raw.login(&token_for("bob", 3), "d").await;
        raw.send(json!({"type":"refresh","token":token_for("bob", 3600)}))
            .await;
        let r = raw.recv_type("refreshed").await;
        assert!(r["exp"].as_u64().unwrap() > 3000, "{r}");
        // Past the first token's expiry and its leeway, the connection still answers.
        tokio::time::sleep(Duration::from_secs(10)).await;
        raw.send(json!({"type":"ping"})).await;
        assert_eq!(raw.recv().await.expect("still open")["type"], "pong");
    };
    let someone_elses = async {
        let mut raw = RawTcp::connect(&gw).await;
        raw.login(&token_for("carol", 3), "d").await;
        raw.send(json!({"type":"refresh","token":token_for("mallory", 3600)}))
            .await;
        let e = raw.recv_type("error").await;
        assert_eq!(e["code"], "unauthorized");
        raw.send(json!({"type":"refresh","token":"forged"})).await;
        assert_eq!(raw.recv_type("error").await["code"], "unauthorized");
        // The old expiry still holds.
        let bye = within(PAST_EXPIRY, "bye expired", raw.recv_type("bye")).await;
        assert_eq!(bye["reason"], "expired");
    };
    let ws_expires = async {
        let (_c, mut events) = within(
            WAIT,
            "ws connect",
            ClientBuilder::new(gw.ws_url(), token_for("dave", 3))
                .device("w")
                .reconnect(false)
                .connect(),
        )
        .await
        .unwrap();
        within(PAST_EXPIRY, "ws bye expired", async {
            loop {
                match events.recv().await {
                    Some(Event::Disconnected { reason }) => {
                        assert_eq!(reason, Some(ByeReason::Expired));
                        return;
                    }
                    Some(_) => {}
                    None => panic!("events ended without a disconnect"),
                }
            }
        })
        .await;
    };
    let sse_expires = async {
        let url = format!(
            "http://{}/v1/events?token={}",
            gw.http,
            token_for("erin", 3)
        );
        let r = curl(&["-N", "--max-time", "20", &url]).await;
        assert!(r.body.contains("event: bye"), "{}", r.body);
        assert!(r.body.contains("expired"), "{}", r.body);
    };
    tokio::join!(
        tcp_expires,
        tcp_refreshed,
        someone_elses,
        ws_expires,
        sse_expires
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_refreshes_and_reconnects_with_the_new_token() {
    let gw = Gateway::start(&["--idle-timeout", "1h"]).await.unwrap();
    let (client, mut events) = within(
        WAIT,
        "connect",
        ClientBuilder::new(gw.tcp_url(), token_for("frank", 3))
            .device("d")
            .connect(),
    )
    .await
    .unwrap();
    welcome(&mut events).await;
    client.refresh(token_for("frank", 3600)).await.unwrap();
    within(WAIT, "refreshed", async {
        loop {
            if let Some(Event::Refreshed { exp }) = events.recv().await {
                assert!(exp > 3000);
                return;
            }
        }
    })
    .await;
    // A reconnect after the first token expired logs in with the refreshed one.
    tokio::time::sleep(Duration::from_secs(9)).await;
    client.reconnect().await.unwrap();
    let (_, gap) = welcome(&mut events).await;
    assert!(!gap);
    let (alice, _a) = connect(&gw, "alice", "a", Via::Tcp).await;
    alice
        .send_to("frank", json!({"text": "still here"}))
        .await
        .unwrap();
    assert_eq!(text(&messages(&mut events, 1).await[0]), "still here");
}

/// The client crate with a token source refreshes on its own: a connection opened with a
/// 3 s token, whose source hands out 3 s tokens, is still the same connection 15 s later.
/// One whose source fails until after the expiry gets `bye expired`, then logs in again
/// with the next token the source gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_refreshes_from_its_token_source_and_logs_in_again_after_an_expiry() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let gw = Gateway::start(&["--idle-timeout", "1h"]).await.unwrap();

    let refreshed = async {
        let (client, mut events) = ClientBuilder::new(gw.tcp_url(), token_for("dana", 3))
            .device("d")
            .token_source(|| async { Ok(token_for("dana", 3)) })
            .connect()
            .await
            .unwrap();
        let mut refreshes = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while let Ok(ev) = tokio::time::timeout_at(deadline, events.recv()).await {
            match ev.expect("the client is alive") {
                Event::Refreshed { .. } => refreshes += 1,
                Event::Disconnected { reason } => panic!("disconnected: {reason:?}"),
                _ => {}
            }
        }
        assert!(refreshes >= 3, "refreshed {refreshes} times in 15 s");
        client
            .send_to("dana", json!({"text": "still here"}))
            .await
            .unwrap();
    };

    let relogged = async {
        let calls = Arc::new(AtomicUsize::new(0));
        let source = {
            let calls = calls.clone();
            move || {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                async move {
                    match n {
                        // Fails for about the first 9 s: past the expiry and its leeway.
                        0..=7 => Err("the backend is down".to_owned()),
                        _ => Ok(token_for("erin", 3600)),
                    }
                }
            }
        };
        let (client, mut events) = ClientBuilder::new(gw.tcp_url(), token_for("erin", 3))
            .device("d")
            .token_source(source)
            .connect()
            .await
            .unwrap();
        welcome(&mut events).await;
        within(PAST_EXPIRY, "bye expired, then a new login", async {
            loop {
                match events.recv().await.expect("the client is alive") {
                    Event::Disconnected { reason } => {
                        assert_eq!(reason, Some(ByeReason::Expired))
                    }
                    Event::Welcome { exp, .. } => {
                        let now = imgate_gateway::auth::unix_now();
                        assert!(exp > now + 600, "logged in with the new token");
                        return;
                    }
                    _ => {}
                }
            }
        })
        .await;
        client
            .send_to("erin", json!({"text": "back"}))
            .await
            .unwrap();
        assert!(calls.load(Ordering::Relaxed) >= 9);
    };
    tokio::join!(refreshed, relogged);
}
