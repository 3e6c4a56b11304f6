//! Smoke runs in CI, so the load generator cannot rot: a 10-second W1 (two gateways on a real
//! nats-server, 100 users, 200 msg/s, TCP), a 5-second standalone W1 over WebSocket msgpack
//! on a one-thread gateway, and 3-second standalone runs whose users send with POST and
//! receive over SSE or long polls. Each must deliver everything once. And a W2 run whose
//! 301 connections are held by two child processes, one per gateway, and a small run of
//! `bench/store_memory.py` (standard-library Python).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn w1_smoke_delivers_everything_once() {
    let r = run_w1(&["--duration", "10s"]);
    assert!(r["delivered"].as_u64().unwrap() >= 1_900, "{r}");
}

#[test]
fn standalone_websocket_smoke_delivers_everything_once() {
    let r = run_w1(&[
        "--duration",
        "5s",
        "--standalone",
        "--transport",
        "ws-msgpack",
        "--gateway-threads",
        "1",
    ]);
    assert_eq!(r["standalone"], true, "{r}");
    assert_eq!(r["transport"], "WsMsgpack", "{r}");
    assert!(r["delivered"].as_u64().unwrap() >= 900, "{r}");
}

#[test]
fn http_transports_smoke_deliver_everything_once() {
    for transport in ["sse", "long-poll"] {
        let r = run_w1(&["--duration", "3s", "--standalone", "--transport", transport]);
        assert_eq!(
            r["transport"],
            if transport == "sse" {
                "Sse"
            } else {
                "LongPoll"
            }
        );
        assert!(r["delivered"].as_u64().unwrap() >= 500, "{r}");
    }
}

#[test]
fn w7_smoke_drains_every_device_with_no_jetstream_api_request_per_login() {
    let r = run_bench(&["w7", "--devices", "200", "--waiting", "5"]);
    assert_eq!(r["drained"], 200, "{r}");
    assert_eq!(r["not_drained"], 0, "{r}");
    assert_eq!(r["duplicates"], 0, "{r}");
    assert_eq!(r["per_login"]["api_requests"], 0, "{r}");
}

#[test]
fn w2_smoke_holds_every_connection_from_child_processes() {
    let r = run_bench(&["w2", "--connections", "301", "--gateways", "2"]);
    assert_eq!(r["connections"], 301, "{r}");
    assert_eq!(
        r["holding_process_peak_rss_kib"].as_array().map(Vec::len),
        Some(2),
        "{r}"
    );
    let grew = |k: usize| r["rss_after_kib"][k].as_u64() > r["rss_before_kib"][k].as_u64();
    assert!(grew(0) && grew(1), "both gateways hold connections: {r}");
}

#[test]
fn store_memory_smoke_stores_every_group_message() {
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/store_memory.py"))
        .args(["--members", "20", "--messages", "30", "--binary"])
        .arg(imgate());
    let r = report(cmd);
    assert_eq!(
        (r["members"].as_u64(), r["messages"].as_u64()),
        (Some(20), Some(30)),
        "{r}"
    );
    assert!(r["rss_after_kib"].as_u64() > Some(0), "{r}");
}

/// Runs `imgate-bench w1` with 100 users at 200 msg/s plus `extra`, checks that nothing was
/// lost or duplicated, and returns the report.
fn run_w1(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["w1", "--users", "100", "--rate", "200", "--warmup", "1s"];
    args.extend_from_slice(extra);
    let r = run_bench(&args);
    assert_eq!(r["send_errors"], 0, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicates"], 0, "{r}");
    assert_eq!(r["delivered"], r["accepted"], "{r}");
    r
}

/// Runs `imgate-bench <args> --json` against the gateway binary built by the same `cargo
/// test` run, checks that it succeeded, and returns its one JSON report.
fn run_bench(args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgate-bench"));
    cmd.args(args).arg("--json").arg("--imgate").arg(imgate());
    report(cmd)
}

/// The gateway binary built by the same `cargo test` run.
fn imgate() -> PathBuf {
    let imgate = PathBuf::from(env!("CARGO_BIN_EXE_imgate-bench")).with_file_name("imgate");
    assert!(
        imgate.exists(),
        "{} is missing: run the whole workspace's tests",
        imgate.display()
    );
    imgate
}

/// Runs `cmd`, checks that it succeeded, and returns the JSON report on its last line.
fn report(mut cmd: Command) -> serde_json::Value {
    let out = cmd.output().expect("running the measurement");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a JSON report");
    serde_json::from_str(last).expect("one JSON report")
}
