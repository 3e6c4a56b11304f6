//! TLS on both listeners (`--tls-cert`, `--tls-key`): clients this project did not write
//! (Python `ssl` + `msgpack` on TCP, Python `websockets` over WSS, `curl` over HTTPS), our
//! client and `imgate send` over `tls://` and `wss://`; a renewed certificate served after
//! SIGHUP while older connections stay up; bad certificate files ending the start.

use std::time::Duration;

use imgate_client::ClientBuilder;
use serde_json::json;
use tokio::process::Command;

#[cfg(feature = "external")]
use crate::python::exchange_with;
use crate::support::*;

/// A CA, a certificate it signed, and a standalone gateway serving it.
struct Tls {
    dir: tempfile::TempDir,
    ca: TestCa,
    cert: String,
    key: String,
    gw: Gateway,
}

impl Tls {
    async fn start() -> Tls {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path(), "gw");
        let (cert, key) = ca.issue("first");
        let gw = Gateway::start(&["--tls-cert", &cert, "--tls-key", &key])
            .await
            .expect("gateway starts with TLS");
        Tls {
            dir,
            ca,
            cert,
            key,
            gw,
        }
    }

    fn ca(&self) -> String {
        self.ca.path.display().to_string()
    }

    fn wss(&self) -> String {
        format!("wss://{}/v1/ws", self.gw.http)
    }

    fn tls(&self) -> String {
        format!("tls://{}", self.gw.tcp)
    }

    async fn client(
        &self,
        url: String,
        uid: &str,
    ) -> (imgate_client::Client, imgate_client::Events) {
        within(
            WAIT,
            "a TLS client to connect",
            ClientBuilder::new(url, token(uid))
                .device("d")
                .ca(self.ca())
                .connect(),
        )
        .await
        .unwrap_or_else(|e| panic!("{uid} could not connect over TLS: {e}"))
    }

    /// The certificate the gateway's TCP listener presents now, as PEM (Python's `ssl`).
    async fn served_certificate(&self) -> String {
        let out = Command::new(python())
            .args([
                "-c",
                "import ssl,sys; print(ssl.get_server_certificate(('127.0.0.1', int(sys.argv[1]))))",
            ])
            .arg(self.gw.tcp.port().to_string())
            .output()
            .await
            .expect("running python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// PEM without its line breaks, to compare two encodings of one certificate.
fn flat(pem: &str) -> String {
    pem.split_whitespace().collect()
}

#[cfg(feature = "external")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ssl_over_tcp_and_websockets_over_wss_chat_with_our_client() {
    let t = Tls::start().await;
    let (rust, ev) = t.client(t.tls(), "rustuser").await;
    exchange_with(
        rust,
        ev,
        "tcp_msgpack_client.py",
        &[t.gw.tcp.to_string(), t.ca()],
    )
    .await;
    let (rust, ev) = t.client(t.wss(), "rustuser").await;
    exchange_with(rust, ev, "ws_client.py", &[t.wss(), t.ca()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_imgate_send_reach_a_tls_gateway_and_plain_clients_do_not() {
    let t = Tls::start().await;
    let (_bob, mut events) = t.client(t.tls(), "bob").await;
    welcome(&mut events).await;

    let base = format!("https://127.0.0.1:{}", t.gw.http.port());
    let health = curl(&["--cacert", &t.ca(), &format!("{base}/healthz")]).await;
    assert_eq!(health.status, 200, "{}", health.body);
    let sent = curl(&[
        "--cacert",
        &t.ca(),
        "-H",
        &auth("alice"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"id":"c1","to":"bob","body":{"text":"over https"}}"#,
        &format!("{base}/v1/messages"),
    ])
    .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    // Without the CA, curl refuses the certificate.
    let untrusted = curl(&[&format!("{base}/healthz")]).await;
    assert_eq!(
        untrusted.status, 0,
        "curl trusted a test CA it was not given"
    );

    for url in [t.tls(), t.wss()] {
        let out = Command::new(imgate_harness::binaries::imgate().unwrap())
            .args(["send", "--server", &url, "--ca", &t.ca()])
            .args(["--token", &token("carol"), "--to", "bob"])
            .args(["--body", &json!({"text": url}).to_string()])
            .output()
            .await
            .expect("running imgate send");
        assert!(
            out.status.success(),
            "imgate send over {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let got = messages(&mut events, 3).await;
    assert_eq!(text(&got[0]), "over https");
    assert_eq!(got[1].from, "carol");
    assert_eq!(text(&got[1]), t.tls());
    assert_eq!(text(&got[2]), t.wss());

    // A plaintext login on the TLS port is not a TLS handshake: closed, nothing served.
    let mut raw = RawTcp::connect(&t.gw).await;
    raw.send(json!({"type":"login","token":token("mallory"),"device":"d"}))
        .await;
    assert!(
        raw.recv().await.is_none(),
        "a plaintext client got an answer"
    );
    // And plain HTTP on the HTTPS port gets no HTTP answer.
    let plain = curl(&[&format!("http://127.0.0.1:{}/healthz", t.gw.http.port())]).await;
    assert_ne!(plain.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_after_sighup_and_older_connections_stay_up() {
    let t = Tls::start().await;
    let first = std::fs::read_to_string(&t.cert).unwrap();
    assert_eq!(flat(&t.served_certificate().await), flat(&first));
    let (_bob, mut bob_events) = t.client(t.tls(), "bob").await;
    welcome(&mut bob_events).await;
    let (_dave, mut dave_events) = t.client(t.wss(), "dave").await;
    welcome(&mut dave_events).await;

    // A new key and certificate replace the files, as a renewal does, then SIGHUP.
    let (cert2, key2) = t.ca.issue("renewed");
    std::fs::rename(&cert2, &t.cert).unwrap();
    std::fs::rename(&key2, &t.key).unwrap();
    let renewed = std::fs::read_to_string(&t.cert).unwrap();
    assert_ne!(flat(&renewed), flat(&first));
    t.gw.signal("HUP").unwrap();
    within(WAIT, "the renewed certificate to be served", async {
        while flat(&t.served_certificate().await) != flat(&renewed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // The connections opened before the reload still deliver.
    let (alice, _a) = t.client(t.tls(), "alice").await;
    alice
        .send_to("bob", json!({"text": "after"}))
        .await
        .unwrap();
    alice
        .send_to("dave", json!({"text": "after"}))
        .await
        .unwrap();
    assert_eq!(text(&messages(&mut bob_events, 1).await[0]), "after");
    assert_eq!(text(&messages(&mut dave_events, 1).await[0]), "after");

    // A broken file on SIGHUP keeps the certificate in use.
    std::fs::write(&t.cert, "not a certificate").unwrap();
    t.gw.signal("HUP").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(flat(&t.served_certificate().await), flat(&renewed));
    drop(t.dir);
}

#[tokio::test]
async fn a_bad_certificate_or_key_ends_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "bad");
    let (cert, key) = ca.issue("a");
    let (_, other_key) = ca.issue("b");
    let missing = dir.path().join("missing.pem").display().to_string();

    let e = serve_fails(&["--tls-cert", &missing, "--tls-key", &key]).await;
    assert!(
        e.contains("TLS certificate") && e.contains("missing.pem"),
        "{e}"
    );
    let e = serve_fails(&["--tls-cert", &cert, "--tls-key", &cert]).await;
    assert!(e.contains("TLS key"), "{e}");
    let e = serve_fails(&["--tls-cert", &cert, "--tls-key", &other_key]).await;
    assert!(e.contains("does not belong"), "{e}");
    let e = serve_fails(&["--tls-cert", &cert]).await;
    assert!(e.contains("--tls-key"), "{e}");
}

/// With TLS on, `--metrics-listen` still speaks plain HTTP, for a scraper on a private
/// network; the public listener speaks only TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_is_plain_http_with_tls_on() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "gw");
    let (cert, key) = ca.issue("first");
    let gw = Gateway::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await
    .unwrap();
    let private = gw.metrics.expect("the gateway printed its metrics address");
    let scraped = curl(&[&format!("http://{private}/metrics")]).await;
    assert_eq!(scraped.status, 200, "{}", scraped.body);
    assert!(scraped.body.contains("imgate_connections"));
}
