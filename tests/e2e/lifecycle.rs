//! Connection lifecycle: `bye` for shutdown, replacement, ack timeout and idleness, and a
//! clean exit on SIGTERM.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

both_modes! {
async fn sigterm_says_bye_shutdown_and_exits(env) {
    let mut gw = env.gateway(&["--drain-timeout", "3s"]).await;
    let mut raw = RawTcp::connect(&gw).await;
    raw.login(&token("bob"), "phone").await;
    let (_alice, mut alice_ev) = connect(&gw, "alice", "web", Via::WsJson).await;
    welcome(&mut alice_ev).await;
    gw.signal("TERM").unwrap();
    let bye = raw.recv_type("bye").await;
    assert_eq!(bye["reason"], "shutdown");
    raw.expect_closed().await;
    let reason = within(WAIT, "ws client disconnect", async {
        loop {
            if let Some(imgate_client::Event::Disconnected { reason }) = alice_ev.recv().await {
                return reason;
            }
        }
    })
    .await;
    assert_eq!(reason, Some(imgate_proto::ByeReason::Shutdown));
    let status = gw.wait(Duration::from_secs(5)).await.unwrap();
    assert!(status.success(), "exit status {status:?}");
}
}

both_modes! {
async fn a_second_connection_of_the_same_device_replaces_the_first(env) {
    let gw = env.gateway(&[]).await;
    let mut first = RawTcp::connect(&gw).await;
    first.login(&token("bob"), "phone").await;
    let mut second = RawTcp::connect(&gw).await;
    second.login(&token("bob"), "phone").await;
    let bye = first.recv_type("bye").await;
    assert_eq!(bye["reason"], "replaced");
    first.expect_closed().await;
    // The new one is served.
    let (alice, _a) = connect(&gw, "alice", "a", Via::Tcp).await;
    alice
        .send_to("bob", json!({"text": "to the new one"}))
        .await
        .unwrap();
    let m = second.recv_type("msg").await;
    assert_eq!(m["body"]["text"], "to the new one");
}
}

both_modes! {
async fn max_devices_replaces_the_oldest_connection(env) {
    let gw = env.gateway(&["--max-devices", "2"]).await;
    let mut a = RawTcp::connect(&gw).await;
    a.login(&token("bob"), "a").await;
    let mut b = RawTcp::connect(&gw).await;
    b.login(&token("bob"), "b").await;
    let mut c = RawTcp::connect(&gw).await;
    c.login(&token("bob"), "c").await;
    assert_eq!(a.recv_type("bye").await["reason"], "replaced");
}
}

both_modes! {
async fn unacked_messages_close_the_connection_and_come_back(env) {
    let gw = env.gateway(&["--ack-timeout", "500ms"]).await;
    let mut raw = RawTcp::connect(&gw).await;
    raw.login(&token("bob"), "phone").await;
    let (alice, _a) = connect(&gw, "alice", "a", Via::Tcp).await;
    alice
        .send_to("bob", json!({"text": "ack me"}))
        .await
        .unwrap();
    let m = raw.recv_type("msg").await;
    let bye = raw.recv_type("bye").await;
    assert_eq!(bye["reason"], "ack_timeout");
    raw.expect_closed().await;
    // The unacked message comes again on resume; acked, it does not.
    let mut raw = RawTcp::connect(&gw).await;
    raw.login(&token("bob"), "phone").await;
    let again = raw.recv_type("msg").await;
    assert_eq!(again["seq"], m["seq"]);
    raw.send(json!({"type":"ack","seq":again["seq"]})).await;
    raw.send(json!({"type":"ping"})).await;
    raw.recv_type("pong").await;
    // The pong came after the ack was taken, so even a replacing connection that arrives
    // before the gateway notices this one closing resumes after the ack.
    drop(raw);
    let (_bob, mut ev) = connect(&gw, "bob", "phone", Via::Tcp).await;
    no_message(&mut ev, Duration::from_millis(700)).await;
}
}

both_modes! {
async fn an_idle_connection_gets_bye_idle_and_pings_keep_it_alive(env) {
    let gw = env.gateway(&["--idle-timeout", "600ms"]).await;
    let mut busy = RawTcp::connect(&gw).await;
    busy.login(&token("bob"), "busy").await;
    let mut idle = RawTcp::connect(&gw).await;
    idle.login(&token("bob"), "idle").await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        busy.send(json!({"type":"ping"})).await;
        busy.recv_type("pong").await;
    }
    assert_eq!(idle.recv_type("bye").await["reason"], "idle");
    idle.expect_closed().await;
    busy.send(json!({"type":"ping"})).await;
    busy.recv_type("pong").await;
}
}

/// For a person at a terminal: a listener that cannot bind names its flag and address, a
/// development gateway refuses a public metrics address, a short HS256 secret is refused
/// with how to make one, and logs into a pipe carry no colour codes.
#[tokio::test]
async fn start_errors_name_what_is_wrong_and_piped_logs_have_no_colour() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = crate::support::serve_fails(&["--metrics-listen", &addr]).await;
    assert!(
        err.contains(&format!("cannot listen on {addr} (--metrics-listen)")),
        "{err}"
    );

    // A gateway logging into a file, as under a service manager.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("imgate.log");
    let mut gw = tokio::process::Command::new(imgate_harness::binaries::imgate().unwrap())
        .args([
            "serve",
            "--store",
            "memory",
            "--http",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let logged = within(WAIT, "the gateway to log", async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("DEVELOPMENT MODE") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    gw.kill().await.unwrap();
    assert!(
        !logged.contains('\u{1b}'),
        "no colour codes in a log file: {logged:?}"
    );

    let err = crate::support::serve_fails(&["--metrics-listen", "0.0.0.0:0"]).await;
    assert!(
        err.contains("refusing to listen on non-loopback address 0.0.0.0:0"),
        "{err}"
    );

    let err = crate::support::serve_fails(&["--jwt-secret", "short"]).await;
    assert!(err.contains("is 5 bytes; it must be at least 32"), "{err}");
}
