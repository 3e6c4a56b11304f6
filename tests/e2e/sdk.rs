//! The browser SDK (`sdk/js/imgate.js`) in headless Chromium, one test per scenario of
//! `tests/browser/sdk.mjs`: normal use, WebSocket blocked, WebSocket and SSE blocked, a
//! buffering proxy, a gateway restart under load, a cluster failover, token refresh,
//! history paging, and a store reset. The script starts its own gateways (this binary),
//! NATS servers and proxies, and prints what it measured.

use std::time::Duration;

use crate::support::within;

async fn scenario(name: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(
        std::path::Path::new(&format!("{root}/tests/node_modules/playwright-core")).exists(),
        "playwright-core is missing: run tests/run (it runs npm ci in tests/)"
    );
    let nats = imgate_harness::binaries::nats_server().expect("the pinned nats-server");
    let out = within(
        Duration::from_secs(150),
        &format!("the SDK scenario {name}"),
        tokio::process::Command::new("node")
            .arg(format!("{root}/tests/browser/sdk.mjs"))
            .arg(name)
            .env("IMGATE_BIN", env!("CARGO_BIN_EXE_imgate"))
            .env("NATS_SERVER", nats)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(&format!("sdk scenario {name} passed")),
        "{name} failed:\n{stdout}\n{stderr}"
    );
    // What it measured, for the record of the run.
    println!("{}", stdout.lines().next().unwrap_or_default());
}

#[tokio::test]
async fn two_users_exchange_messages_over_a_websocket() {
    scenario("normal").await;
}

#[tokio::test]
async fn with_websockets_blocked_it_falls_back_to_sse() {
    scenario("ws-blocked").await;
}

#[tokio::test]
async fn with_websockets_and_sse_blocked_it_falls_back_to_long_polls() {
    scenario("ws-sse-blocked").await;
}

#[tokio::test]
async fn behind_a_proxy_that_buffers_sse_it_moves_on_within_its_bound() {
    scenario("buffering-proxy").await;
}

#[tokio::test]
async fn a_gateway_restart_under_load_delivers_every_send_once_in_order() {
    scenario("restart").await;
}

#[tokio::test]
async fn when_its_gateway_dies_the_page_goes_on_through_the_other_with_no_gap() {
    scenario("failover").await;
}

#[tokio::test]
async fn a_short_token_is_refreshed_through_get_token_and_the_connection_stays() {
    scenario("refresh").await;
}

#[tokio::test]
async fn history_pages_come_newest_first_and_next_chains() {
    scenario("history").await;
}

#[tokio::test]
async fn a_store_reset_fires_the_gap_event() {
    scenario("epoch").await;
}
