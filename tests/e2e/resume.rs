//! Offline delivery and resume: from the stored cursor, from an explicit seq, the whole inbox
//! with `resume: 0`, the live tail for a new device, and `gap: true` when retention dropped
//! messages after the resume point.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

both_modes! {
async fn offline_device_gets_everything_from_its_stored_cursor_then_live(env) {
    let gw = env.gateway(&[]).await;
    // Bob's phone is seen once, then goes offline.
    let (bob, mut ev) = connect(&gw, "bob", "phone", Via::Tcp).await;
    welcome(&mut ev).await;
    bob.close().await;
    drop(ev);

    let (alice, _a) = connect(&gw, "alice", "laptop", Via::WsJson).await;
    for i in 0..100 {
        alice
            .send_to("bob", json!({"text": format!("{i}")}))
            .await
            .unwrap();
    }
    let (bob, mut ev) = connect(&gw, "bob", "phone", Via::Tcp).await;
    let got = messages(&mut ev, 100).await;
    let texts: Vec<String> = got.iter().map(|m| text(m).to_owned()).collect();
    assert_eq!(texts, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
    // Then live, with no gap.
    alice.send_to("bob", json!({"text": "live"})).await.unwrap();
    let live = messages(&mut ev, 1).await;
    assert_eq!(text(&live[0]), "live");
    assert!(live[0].seq > got[99].seq);

    // Acked messages are not sent again to the same device (cursor from acks).
    bob.close().await;
    drop(ev);
    let (_bob, mut ev) = connect(&gw, "bob", "phone", Via::WsMsgpack).await;
    no_message(&mut ev, Duration::from_millis(500)).await;

    // `resume: 0` returns the whole retained inbox.
    let (_t, mut all) = within(
        WAIT,
        "resume 0",
        builder(&gw, "bob", "tablet", Via::WsJson)
            .resume(Some(0))
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(messages(&mut all, 101).await.len(), 101);
    no_message(&mut all, Duration::from_millis(300)).await;

    // An explicit resume seq starts right after it.
    let (_t, mut after) = within(
        WAIT,
        "resume n",
        builder(&gw, "bob", "tv", Via::Tcp)
            .resume(Some(got[49].seq))
            .connect(),
    )
    .await
    .unwrap();
    let rest = messages(&mut after, 51).await;
    assert_eq!(text(&rest[0]), "50");
}
}

both_modes! {
async fn a_new_device_starts_at_the_live_tail(env) {
    let gw = env.gateway(&[]).await;
    let (alice, _a) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    alice.send_to("bob", json!({"text": "old"})).await.unwrap();
    let (_bob, mut ev) = connect(&gw, "bob", "brand-new", Via::Tcp).await;
    welcome(&mut ev).await;
    alice.send_to("bob", json!({"text": "new"})).await.unwrap();
    let got = messages(&mut ev, 1).await;
    assert_eq!(text(&got[0]), "new");
}
}

both_modes! {
async fn retention_gap_is_reported_in_welcome(env) {
    let gw = env.gateway(&["--max-inbox", "10"]).await;
    let (bob, mut ev) = connect(&gw, "bob", "phone", Via::Tcp).await;
    let (_, gap) = welcome(&mut ev).await;
    assert!(!gap);
    bob.close().await;
    let (alice, _a) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    for i in 0..25 {
        alice
            .send_to("bob", json!({"text": format!("{i}")}))
            .await
            .unwrap();
    }
    let (_bob, mut ev) = connect(&gw, "bob", "phone", Via::WsJson).await;
    let (_, gap) = welcome(&mut ev).await;
    assert!(
        gap,
        "15 messages after the cursor were dropped: welcome must say so"
    );
    let got = messages(&mut ev, 10).await;
    assert_eq!(text(&got[0]), "15");
    assert_eq!(text(&got[9]), "24");
}
}
