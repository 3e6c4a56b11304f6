//! Test support: mint tokens, connect clients (our client crate, or a raw TCP socket
//! speaking msgpack frames), collect messages, and run each test against a standalone
//! gateway and a cluster; send and log in again as a client riding out a failure would.
//! The processes themselves come from `imgate-harness`, shared with the benchmarks.
//!
//! Every wait here has a deadline.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use imgate_client::{Client, ClientBuilder, Encoding, ErrorKind, Event, Events};
use imgate_gateway::auth::Auth;
pub(crate) use imgate_harness::Gateway;
use imgate_harness::NatsServer;
use imgate_proto::{ErrorCode, Message};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

/// Default bound for waiting on one expected thing.
pub(crate) const WAIT: Duration = Duration::from_secs(15);

/// Runs a future with a deadline, failing the test with `what` if it passes.
pub(crate) async fn within<T>(
    d: Duration,
    what: &str,
    f: impl std::future::Future<Output = T>,
) -> T {
    tokio::time::timeout(d, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {d:?}: {what}"))
}

/// A development-mode token for `uid`.
pub(crate) fn token(uid: &str) -> String {
    remember(Auth::new(None).mint(uid, Duration::from_secs(3600), false))
}

/// A development-mode admin token.
pub(crate) fn admin_token(uid: &str) -> String {
    remember(Auth::new(None).mint(uid, Duration::from_secs(3600), true))
}

/// Notes `token` in `IMGATE_TEST_LOG_DIR/tokens-<pid>.txt` (when set), so `tests/run` can
/// check that no gateway log of the run holds a token a test used.
pub(crate) fn remember(token: String) -> String {
    if let Some(dir) = std::env::var_os("IMGATE_TEST_LOG_DIR") {
        use std::io::Write;
        let path = std::path::Path::new(&dir).join(format!("tokens-{}.txt", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        if let Ok(mut f) = file {
            let _ = writeln!(f, "{token}");
        }
    }
    token
}

/// Which transport a client uses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via {
    Tcp,
    WsJson,
    WsMsgpack,
}

pub(crate) fn builder(gw: &Gateway, uid: &str, device: &str, via: Via) -> ClientBuilder {
    let (url, enc) = match via {
        Via::Tcp => (gw.tcp_url(), Encoding::Msgpack),
        Via::WsJson => (gw.ws_url(), Encoding::Json),
        Via::WsMsgpack => (gw.ws_url(), Encoding::Msgpack),
    };
    ClientBuilder::new(url, token(uid))
        .device(device)
        .encoding(enc)
}

pub(crate) async fn connect(gw: &Gateway, uid: &str, device: &str, via: Via) -> (Client, Events) {
    within(
        WAIT,
        "client connect",
        builder(gw, uid, device, via).connect(),
    )
    .await
    .unwrap_or_else(|e| panic!("{uid}/{device} could not connect: {e}"))
}

/// Waits for the next `n` stored messages, skipping other events.
pub(crate) async fn messages(events: &mut Events, n: usize) -> Vec<Message> {
    let mut out = Vec::with_capacity(n);
    within(WAIT, &format!("{n} messages"), async {
        while out.len() < n {
            match events.recv().await {
                Some(Event::Msg(m)) => out.push(m),
                Some(_) => {}
                None => panic!("client ended after {} of {n} messages", out.len()),
            }
        }
    })
    .await;
    out
}

/// Asserts that no stored message arrives within `d`.
pub(crate) async fn no_message(events: &mut Events, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return,
            Ok(Some(Event::Msg(m))) => panic!("unexpected message {m:?}"),
            Ok(Some(_)) => {}
            Ok(None) => return,
        }
    }
}

/// Waits for the first `Welcome` event and returns its resume point and gap flag.
pub(crate) async fn welcome(events: &mut Events) -> (u64, bool) {
    match welcome_event(events).await {
        Event::Welcome { resume, gap, .. } => (resume, gap),
        _ => unreachable!("welcome_event returns a welcome"),
    }
}

/// Waits for the first `Welcome` event, skipping others.
pub(crate) async fn welcome_event(events: &mut Events) -> Event {
    within(WAIT, "welcome", async {
        loop {
            match events.recv().await {
                Some(w @ Event::Welcome { .. }) => return w,
                Some(_) => {}
                None => panic!("client ended before welcome"),
            }
        }
    })
    .await
}

pub(crate) fn text(m: &Message) -> &str {
    m.body["text"].as_str().unwrap_or_default()
}

/// A raw TCP connection speaking length-prefixed msgpack, for malformed-input tests.
pub(crate) struct RawTcp {
    sock: TcpStream,
    buf: BytesMut,
}

impl RawTcp {
    pub(crate) async fn connect(gw: &Gateway) -> RawTcp {
        Self::from_stream(TcpStream::connect(gw.tcp).await.expect("tcp connect"))
    }

    pub(crate) fn from_stream(sock: TcpStream) -> RawTcp {
        RawTcp {
            sock,
            buf: BytesMut::new(),
        }
    }

    /// Writes one frame with the given payload bytes.
    pub(crate) async fn send_raw(&mut self, payload: &[u8]) {
        let mut out = BytesMut::with_capacity(4 + payload.len());
        out.put_u32(payload.len() as u32);
        out.put_slice(payload);
        self.sock.write_all(&out).await.expect("tcp write");
    }

    /// Writes raw bytes with no framing.
    pub(crate) async fn write(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).await.expect("tcp write");
    }

    /// Writes a JSON value as one msgpack frame with named maps.
    pub(crate) async fn send(&mut self, v: Value) {
        let payload = rmp_serde::to_vec_named(&v).expect("msgpack encode");
        self.send_raw(&payload).await;
    }

    pub(crate) async fn login(&mut self, token: &str, device: &str) -> Value {
        self.send(serde_json::json!({"type":"login","token":token,"device":device}))
            .await;
        let w = self.recv().await.expect("an answer to login");
        assert_eq!(w["type"], "welcome", "{w}");
        w
    }

    /// Reads the next frame as JSON; `None` when the server closed the connection.
    pub(crate) async fn recv(&mut self) -> Option<Value> {
        within(WAIT, "a frame from the gateway", async {
            loop {
                if self.buf.len() >= 4 {
                    let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
                    if self.buf.len() >= 4 + len {
                        self.buf.advance(4);
                        let payload = self.buf.split_to(len);
                        return Some(rmp_serde::from_slice(&payload).expect("server msgpack"));
                    }
                }
                match self.sock.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// Reads frames until one of `type` arrives (returned) or the connection closes.
    pub(crate) async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let f = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("closed while waiting for {ty}"));
            if f["type"] == ty {
                return f;
            }
        }
    }

    /// Asserts the server closes the connection, with no stored message before it.
    pub(crate) async fn expect_closed(&mut self) {
        while let Some(f) = self.recv().await {
            assert_ne!(
                f["type"], "msg",
                "unexpected message (seq {}) before close",
                f["seq"]
            );
        }
    }

    /// Reads until the server closes the connection; returns the last frame read.
    pub(crate) async fn drain_until_closed(&mut self) -> Option<Value> {
        let mut last = None;
        while let Some(f) = self.recv().await {
            last = Some(f);
        }
        last
    }
}

/// What `curl` answered: HTTP status and body.
#[derive(Debug)]
pub(crate) struct Curl {
    pub(crate) status: u16,
    pub(crate) body: String,
}

impl Curl {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Runs `curl` (a client this project did not write) with `args` and a 60 s cap.
pub(crate) async fn curl(args: &[&str]) -> Curl {
    let out = within(
        Duration::from_secs(70),
        "curl",
        Command::new("curl")
            .args(["-sS", "--max-time", "60", "-w", "\n%{http_code}"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("running curl (apt-get install curl)");
    let text = String::from_utf8(out.stdout).expect("curl output is UTF-8");
    let (body, status) = text.rsplit_once('\n').expect("curl printed a status line");
    Curl {
        status: status.trim().parse().unwrap_or(0),
        body: body.to_owned(),
    }
}

/// `Authorization: Bearer <token of uid>` as a curl header argument.
pub(crate) fn auth(uid: &str) -> String {
    format!("Authorization: Bearer {}", token(uid))
}

/// Where a test's gateways keep their messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The embedded store, one process.
    Standalone,
    /// JetStream on a `nats-server` of the test's own.
    Cluster,
}

/// Whether cluster gateways route copies by interest: `IMGATE_FANOUT=interest` in the
/// environment reaches every gateway a test starts (`tests/run` runs the cluster tests
/// once more that way); otherwise they broadcast, the default.
pub(crate) fn interest_fanout() -> bool {
    std::env::var("IMGATE_FANOUT").is_ok_and(|m| m == "interest")
}

/// A test's world: in cluster mode, its NATS server.
pub(crate) struct Env {
    pub(crate) nats: Option<NatsServer>,
}

impl Env {
    pub(crate) async fn new(mode: Mode) -> Env {
        let nats = match mode {
            Mode::Standalone => None,
            Mode::Cluster => Some(NatsServer::start().await.expect("nats-server starts")),
        };
        Env { nats }
    }

    /// `n` gateways sharing this world's store: in cluster mode `n` processes on its NATS; in
    /// standalone mode the one gateway there can be.
    pub(crate) async fn gateways(&self, n: usize, args: &[&str]) -> Vec<Gateway> {
        let n = if self.nats.is_some() { n } else { 1 };
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.gateway(args).await);
        }
        v
    }

    /// A gateway of this world (in cluster mode, on the world's NATS).
    pub(crate) async fn gateway(&self, args: &[&str]) -> Gateway {
        match &self.nats {
            None => Gateway::start(args).await.expect("gateway starts"),
            Some(n) => {
                let url = n.url();
                let mut a = args.to_vec();
                a.extend(["--nats", &url]);
                Gateway::start(&a).await.expect("gateway starts")
            }
        }
    }
}

/// Declares tests that run once against a standalone gateway and once against a cluster:
/// `async fn name(env) { … }` becomes `name::standalone` and `name::cluster`.
macro_rules! both_modes {
    ($( $(#[doc = $doc:literal])* async fn $name:ident($env:ident) $body:block )*) => { $(
        $(#[doc = $doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn body($env: $crate::support::Env) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standalone() {
                body($crate::support::Env::new($crate::support::Mode::Standalone).await).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                body($crate::support::Env::new($crate::support::Mode::Cluster).await).await
            }
        }
    )* };
}

/// Two loopback addresses free now (for a gateway restarted on the same ports):
/// `["--http", a, "--tcp", b]`.
pub(crate) fn fixed_ports() -> [String; 4] {
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("its address").to_string()
    };
    ["--http".into(), free(), "--tcp".into(), free()]
}

/// A certificate authority of a test's own, its certificate written to `path`.
pub(crate) struct TestCa {
    dir: std::path::PathBuf,
    name: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub(crate) path: std::path::PathBuf,
}

impl TestCa {
    pub(crate) fn new(dir: &std::path::Path, name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("imgate test CA {name}"));
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, issuer.pem()).unwrap();
        TestCa {
            dir: dir.to_owned(),
            name: name.to_owned(),
            issuer,
            path,
        }
    }

    /// A new key and a certificate for 127.0.0.1 and localhost signed by this CA, written
    /// under the CA's directory; returns the paths of the certificate and the key.
    pub(crate) fn issue(&self, what: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let path = |f: &str| {
            let p = self.dir.join(format!("{}-{what}-{f}", self.name));
            p.display().to_string()
        };
        let (cert_pem, key_pem) = (path("cert.pem"), path("key.pem"));
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        std::fs::write(&key_pem, key.serialize_pem()).unwrap();
        (cert_pem, key_pem)
    }
}

/// `imgate serve` with `args` on free ports and the memory store, expected to exit with a
/// failure within 20 s; its stderr.
pub(crate) async fn serve_fails(args: &[&str]) -> String {
    let mut all = vec!["--store", "memory"];
    all.extend_from_slice(args);
    serve_refused(&all).await
}

/// `imgate serve` with `args` on free ports, expected to exit with a failure within 20 s
/// without ever listening; its stderr.
pub(crate) async fn serve_refused(args: &[&str]) -> String {
    let out = within(
        Duration::from_secs(20),
        "imgate serve to exit",
        tokio::process::Command::new(imgate_harness::binaries::imgate().unwrap())
            .args(["serve", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0"])
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success(), "started with {args:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "never serves"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `http://<gateway>/<path>`.
pub(crate) fn url(gw: &Gateway, path: &str) -> String {
    format!("http://{}{path}", gw.http)
}

/// `POST` of a JSON body with `curl`.
pub(crate) async fn post_json(gw: &Gateway, path: &str, token_header: &str, body: Value) -> Curl {
    curl(&[
        "-X",
        "POST",
        "-H",
        token_header,
        "-H",
        "Content-Type: application/json",
        "-d",
        &body.to_string(),
        &url(gw, path),
    ])
    .await
}

/// Creates group `id` as `owner`, expecting 201.
pub(crate) async fn create_group(gw: &Gateway, owner: &str, id: &str, members: &[String]) {
    let r = post_json(
        gw,
        "/v1/groups",
        &auth(owner),
        json!({"id": id, "members": members}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

/// Runs the Node script `tests/browser/<script>` (playwright-core driving headless
/// Chromium) with `args` and `env`, within `limit`; fails with its output unless it exits
/// cleanly and prints `passed`. Its stdout.
#[cfg(feature = "external")]
pub(crate) async fn browser_script(
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
    passed: &str,
) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(
        std::path::Path::new(&format!("{root}/tests/node_modules/playwright-core")).exists(),
        "playwright-core is missing: run tests/run (it runs npm ci in tests/)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "no Chromium at {chromium}: run tests/run (it installs Debian's chromium) or set CHROMIUM"
    );
    let out = within(
        limit,
        &format!("the browser script {script}"),
        Command::new("node")
            .arg(format!("{root}/tests/browser/{script}"))
            .args(args)
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(passed),
        "{script} {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

/// The Python interpreter: `IMGATE_PYTHON` (the venv `tests/run` makes, with `websockets`
/// and `msgpack`), or `python3` for what needs only the standard library.
pub(crate) fn python() -> String {
    std::env::var("IMGATE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Sends `to` the message `id`, retrying `unavailable` (and `rate_limited`) with the same
/// id until accepted.
pub(crate) async fn send_until_accepted(c: &Client, to: &str, id: String, text: u64) -> u64 {
    loop {
        let r = c
            .send(imgate_proto::Send {
                id: Some(id.clone()),
                to: Some(to.into()),
                group: None,
                body: json!({"text": text}),
            })
            .await;
        match r {
            Ok(s) => return s.seq,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Server(ErrorCode::Unavailable)
                        | ErrorKind::Server(ErrorCode::RateLimited)
                        | ErrorKind::Closed
                        | ErrorKind::Timeout
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("send {id} failed: {e}"),
        }
    }
}

/// Connects, retrying a login refused as `unavailable` (NATS electing a leader, say) or
/// one that timed out or was cut (a balancer still sending to a gateway that died), as a
/// real client would.
pub(crate) async fn connect_retrying(b: imgate_client::ClientBuilder) -> (Client, Events) {
    within(Duration::from_secs(60), "a login to succeed", async {
        loop {
            match b.clone().connect().await {
                Ok(c) => return c,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Server(ErrorCode::Unavailable)
                            | ErrorKind::Timeout
                            | ErrorKind::Closed
                            | ErrorKind::Connect
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("login failed: {e}"),
            }
        }
    })
    .await
}

/// Collects stored messages until every id in `want` arrived; asserts none twice and seqs
/// strictly increasing. Returns the seqs and when the client logged in again, if it did.
pub(crate) async fn receive_all(
    ev: &mut Events,
    want: usize,
    d: Duration,
) -> (Vec<u64>, Vec<Instant>) {
    let mut ids = HashSet::new();
    let mut seqs = Vec::new();
    let mut welcomes = Vec::new();
    within(d, &format!("{want} messages"), async {
        while ids.len() < want {
            match ev.recv().await.expect("client ended") {
                Event::Msg(m) => {
                    assert!(ids.insert(m.id.clone()), "duplicate delivery of {}", m.id);
                    assert!(
                        seqs.last().is_none_or(|l| *l < m.seq),
                        "out of order at {}",
                        m.seq
                    );
                    seqs.push(m.seq);
                }
                Event::Welcome { .. } => welcomes.push(Instant::now()),
                _ => {}
            }
        }
    })
    .await;
    (seqs, welcomes)
}

/// Waits until the gateway's metric `name` (with its labels) is at least `at_least`: a sign
/// that what the test set going has reached the gateway.
pub(crate) async fn until_metric(gw: &Gateway, name: &str, at_least: u64) {
    within(WAIT, &format!("{name} to reach {at_least}"), async {
        while gw.metric(name).await < at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
