//! A 10-second W1 smoke run in CI, so the load generator cannot rot: two gateways on a real
//! nats-server, 100 users, 200 msg/s. It must deliver everything once.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn w1_smoke_delivers_everything_once() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_imgate-bench"));
    // The gateway binary built by the same `cargo test` run, beside this one.
    let imgate = bench.with_file_name("imgate");
    assert!(
        imgate.exists(),
        "{} is missing: run the whole workspace's tests",
        imgate.display()
    );
    let out = Command::new(&bench)
        .args([
            "w1",
            "--users",
            "100",
            "--rate",
            "200",
            "--duration",
            "10s",
            "--warmup",
            "1s",
            "--json",
        ])
        .arg("--imgate")
        .arg(&imgate)
        .output()
        .expect("running imgate-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON report");
    assert_eq!(r["send_errors"], 0, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicates"], 0, "{r}");
    assert!(r["delivered"].as_u64().unwrap() >= 1_900, "{r}");
    assert_eq!(r["delivered"], r["accepted"], "{r}");
}
