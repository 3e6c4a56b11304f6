//! The browser SDK (`sdk/js/imgate.js`) in headless Chromium, one test per scenario of
//! `tests/browser/sdk.mjs`: normal use, WebSocket blocked, WebSocket and SSE blocked, a
//! buffering proxy, a gateway restart under load, a cluster failover, token refresh,
//! history paging, a store reset, and read positions across two tabs. The script starts its own gateways (this binary),
//! NATS servers and proxies, and prints what it measured.

use std::time::Duration;

use crate::support::browser_script;

async fn scenario(name: &str) {
    let nats = imgate_harness::binaries::nats_server().expect("the pinned nats-server");
    let env = [
        ("IMGATE_BIN", env!("CARGO_BIN_EXE_imgate")),
        ("NATS_SERVER", &nats),
    ];
    let passed = format!("sdk scenario {name} passed");
    let out = browser_script("sdk.mjs", &[name], &env, Duration::from_secs(150), &passed).await;
    // What it measured, for the record of the run.
    println!("{}", out.lines().next().unwrap_or_default());
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

#[tokio::test]
async fn reading_in_one_tab_clears_the_unread_count_in_the_other() {
    scenario("read").await;
}
