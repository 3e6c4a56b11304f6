//! Clients this project did not write: Python `websockets` over /v1/ws and Python `msgpack`
//! over raw TCP, each logging in, sending and receiving against our own client.
//!
//! The interpreter comes from `IMGATE_PYTHON` (set by `tests/run`, which creates a venv with
//! both packages), else `python3`. Missing packages fail the test with a way to fix it.

use std::process::Stdio;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::*;

fn script(name: &str) -> String {
    format!("{}/tests/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

async fn exchange(gw: &Gateway, script_name: &str, addr: String) {
    let (rust, ev) = connect(gw, "rustuser", "r", Via::Tcp).await;
    exchange_with(rust, ev, script_name, &[addr]).await;
}

/// The python client `script_name` (run with `args`: its address, then anything after the
/// token and peer) chats with `rust`, a connected client of uid `rustuser`.
pub(crate) async fn exchange_with(
    rust: imgate_client::Client,
    mut ev: imgate_client::Events,
    script_name: &str,
    args: &[String],
) {
    welcome(&mut ev).await;
    // The python side logs in, then sends to us.
    let (mut out, mut child) = python_child(script_name, args).await;
    let got = messages(&mut ev, 1).await;
    assert_eq!(got[0].from, "pyuser");
    assert_eq!(*got[0].body, json!({"text": "hello from python"}));
    rust.send_to("pyuser", json!({"text": "hello from rust"}))
        .await
        .unwrap();
    let line = within(WAIT, "python to print what it received", out.next_line())
        .await
        .unwrap()
        .expect("python printed its received message");
    let msg: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(msg["type"], "msg");
    assert_eq!(msg["from"], "rustuser");
    assert_eq!(msg["body"]["text"], "hello from rust");
    let status = within(WAIT, "python to exit", child.wait()).await.unwrap();
    assert!(status.success(), "python exited with {status:?}");
}

async fn python_child(
    script_name: &str,
    args: &[String],
) -> (
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    tokio::process::Child,
) {
    let mut child = Command::new(python())
        .arg(script(script_name))
        .arg(&args[0])
        .args([&token("pyuser"), "rustuser"])
        .args(&args[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("running python (set IMGATE_PYTHON or run tests/run)");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within(WAIT, "python client to log in", out.next_line())
        .await
        .unwrap();
    let Some(first) = first else {
        panic!(
            "python client ended before logging in (see its stderr above). If a module is \
             missing, run tests/run, which makes a venv with websockets and msgpack."
        );
    };
    let v: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["type"], "welcome", "{v}");
    (out, child)
}

both_modes! {
async fn python_websockets_client_chats_over_ws(env) {
    let gw = env.gateway(&[]).await;
    exchange(&gw, "ws_client.py", gw.ws_url()).await;
}
}

both_modes! {
async fn python_msgpack_client_chats_over_raw_tcp(env) {
    let gw = env.gateway(&[]).await;
    exchange(&gw, "tcp_msgpack_client.py", gw.tcp.to_string()).await;
}
}
