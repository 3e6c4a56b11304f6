//! The deployment for real: `compose.yaml` run by podman-compose, with images built here
//! without a registry (`tests/deploy/images`: a debootstrap Debian base, this test run's
//! `imgate`, the pinned nats-server, Debian's HAProxy), three NATS nodes with R3 and
//! gateways behind HAProxy. Through the balancer only, it checks every transport, presence
//! from every gateway, a gateway killed and a NATS node killed in the middle of a stream of
//! sends (nothing lost or duplicated), scaling from 3 to 5 gateways under traffic, and
//! `down` then `up` keeping the messages.
//!
//! It needs root, podman, runc, debootstrap and podman-compose; `tests/run` installs them
//! (Debian packages, and podman-compose from PyPI into its venv). Where they are missing it
//! fails, saying what to install.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use imgate_client::{ClientBuilder, Encoding};
use imgate_gateway::auth::Auth;
use imgate_gateway::config::Secret;
use serde_json::{json, Value};

use crate::support::*;

const SECRET: &str = "compose-test-secret-0123456789abcdef";

/// A compose project of this test, torn down (volumes too) when dropped.
struct Stack {
    project: String,
    compose: PathBuf,
    http: u16,
    tcp: u16,
}

fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

/// Runs `cmd` to its end; fails the test, with its stderr, unless it succeeded.
async fn succeed(cmd: &mut tokio::process::Command, what: &str) -> std::process::Output {
    let out = cmd.output().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn containers_conf() -> String {
    format!("{}/tests/deploy/containers.conf", root())
}

/// podman-compose from the venv tests/run makes, or the one on PATH.
fn podman_compose() -> PathBuf {
    let venv = std::env::var("IMGATE_PYTHON")
        .ok()
        .and_then(|p| PathBuf::from(p).parent().map(|d| d.join("podman-compose")));
    match venv {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("podman-compose"),
    }
}

fn require(tool: &str) {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is missing: the container test needs podman, runc and debootstrap (Debian: \
         apt-get install podman runc debootstrap) and podman-compose (pip install \
         podman-compose==1.6.0); tests/run installs all of them"
    );
}

impl Stack {
    fn token(&self, uid: &str) -> String {
        remember(Auth::new(Some(&Secret(SECRET.into()))).mint(
            uid,
            Duration::from_secs(3600),
            false,
        ))
    }

    /// `podman-compose -p <project> <args>`, with the images and ports of this test.
    async fn compose(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(&self.compose);
        cmd.args([
            "-f",
            &format!("{}/compose.yaml", root()),
            "-p",
            &self.project,
        ])
        .args(args)
        .current_dir(root())
        .env("CONTAINERS_CONF", containers_conf())
        .env("IMGATE_IMAGE", "localhost/imgate:test")
        .env("NATS_IMAGE", "localhost/imgate-nats:test")
        .env("HAPROXY_IMAGE", "localhost/imgate-haproxy:test")
        .env("IMGATE_JWT_SECRET", SECRET)
        .env("IMGATE_HTTP_PORT", self.http.to_string())
        .env("IMGATE_TCP_PORT", self.tcp.to_string());
        succeed(&mut cmd, &format!("podman-compose {args:?}")).await
    }

    async fn podman(&self, args: &[&str]) -> String {
        let mut cmd = tokio::process::Command::new("podman");
        cmd.args(args).env("CONTAINERS_CONF", containers_conf());
        let out = succeed(&mut cmd, &format!("podman {args:?}")).await;
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    fn client(&self, uid: &str, device: &str, tcp: bool) -> ClientBuilder {
        let (url, enc) = match tcp {
            true => (format!("tcp://127.0.0.1:{}", self.tcp), Encoding::Msgpack),
            false => (format!("ws://127.0.0.1:{}", self.http), Encoding::Json),
        };
        // Reconnects go through the balancer again, to whichever gateway is up.
        ClientBuilder::new(url.clone(), self.token(uid))
            .fallback(url)
            .device(device)
            .encoding(enc)
    }

    /// Gateways answering a presence query through the balancer (0 while none does).
    async fn gateways(&self) -> u64 {
        let r = curl(&[
            "-H",
            &format!("Authorization: Bearer {}", self.token("ops")),
            &self.http_url("/v1/presence?uid=ops"),
        ])
        .await;
        match r.status {
            200 => r.json()["gateways"].as_u64().unwrap_or(0),
            _ => 0,
        }
    }

    /// Waits until `n` gateways answer through the balancer; how long that took.
    async fn ready(&self, n: u64, started: Instant) -> Duration {
        within(
            Duration::from_secs(120),
            &format!("{n} gateways ready"),
            async {
                while self.gateways().await != n {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            },
        )
        .await;
        started.elapsed()
    }

    /// The container of `service` number `i`.
    fn container(&self, service: &str, i: usize) -> String {
        format!("{}_{service}_{i}", self.project)
    }

    /// TCP connections gateway container `c` holds, from its own /metrics.
    async fn tcp_connections(&self, c: &str) -> u64 {
        let m = self
            .podman(&["exec", c, "wget", "-qO-", "http://127.0.0.1:8080/metrics"])
            .await;
        m.lines()
            .find_map(|l| l.strip_prefix("imgate_connections{transport=\"tcp\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Every container of the project (also replicas a plain `down` does not know),
        // its network and its volumes.
        let conf = containers_conf();
        let label = format!("label=io.podman.compose.project={}", self.project);
        let sh = format!(
            "podman ps -aq --filter {label} | xargs -r podman rm -f; \
             podman network rm -f {p}_default; \
             podman volume ls -q --filter {label} | xargs -r podman volume rm -f",
            p = self.project
        );
        let _ = std::process::Command::new("sh")
            .args(["-c", &sh])
            .env("CONTAINERS_CONF", conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `n` messages from `from` to `to`, each retried with its id until accepted.
async fn stream(from: &imgate_client::Client, to: &str, prefix: &str, n: u64) {
    for i in 0..n {
        send_until_accepted(from, to, format!("{prefix}-{i}"), i).await;
    }
}

/// Every message of `uid`'s inbox, read by a new device from the start: (count, ids seen
/// twice).
async fn audit(stack: &Stack, uid: &str, want: usize) -> usize {
    let (_c, mut ev) = connect_retrying(
        stack
            .client(uid, &format!("audit-{}", rand::random::<u32>()), true)
            .resume(Some(0)),
    )
    .await;
    let (seqs, _) = receive_all(&mut ev, want, Duration::from_secs(60)).await;
    no_message(&mut ev, Duration::from_millis(500)).await;
    seqs.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_serves_scales_and_loses_nothing_when_containers_die() {
    for tool in ["podman", "runc", "debootstrap"] {
        require(tool);
    }
    let compose = podman_compose();
    require(compose.to_str().unwrap());

    // Images, without a registry (the base is cached between runs).
    let built = Instant::now();
    let mut build = tokio::process::Command::new(format!("{}/tests/deploy/images", root()));
    build.arg(env!("CARGO_BIN_EXE_imgate")).env(
        "NATS_SERVER",
        imgate_harness::binaries::nats_server().unwrap(),
    );
    let images = succeed(&mut build, "building the images").await;
    let sizes = String::from_utf8_lossy(&images.stdout).replace('\n', "; ");
    let build_time = built.elapsed();

    let stack = Stack {
        project: format!("imgate-e2e-{}", std::process::id()),
        compose,
        http: free_port(),
        tcp: free_port(),
    };
    let started = Instant::now();
    stack.compose(&["up", "-d", "--scale", "gateway=3"]).await;
    let up_to_ready = stack.ready(3, started).await;

    // Every transport, through the balancer, across gateways.
    let (alice, mut alice_events) = connect_retrying(stack.client("alice", "laptop", true)).await;
    let (_b, mut bob) = connect_retrying(stack.client("bob", "phone", true)).await;
    let (_c, mut carol) = connect_retrying(stack.client("carol", "web", false)).await;
    let sse = tokio::spawn({
        let (url, auth) = (
            stack.http_url("/v1/events?device=tab"),
            format!("Authorization: Bearer {}", stack.token("dave")),
        );
        async move {
            curl(&["-N", "--max-time", "15", "-H", &auth, &url])
                .await
                .body
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let poll = tokio::spawn({
        let (url, auth) = (
            stack.http_url("/v1/messages?device=web&wait=20"),
            format!("Authorization: Bearer {}", stack.token("erin")),
        );
        async move { curl(&["-H", &auth, &url]).await.json() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for to in ["bob", "carol", "dave", "erin"] {
        send_until_accepted(&alice, to, format!("hello-{to}"), 0).await;
    }
    assert_eq!(messages(&mut bob, 1).await[0].from, "alice");
    assert_eq!(messages(&mut carol, 1).await[0].from, "alice");
    let polled: Value = within(WAIT, "the long poll", poll).await.unwrap();
    assert_eq!(polled["messages"][0]["from"], "alice", "{polled}");
    let sse = within(Duration::from_secs(20), "the SSE stream", sse)
        .await
        .unwrap();
    assert!(
        sse.contains("event: msg") && sse.contains("hello-dave"),
        "{sse}"
    );

    // A gateway killed in the middle of a stream: one that holds alice's or bob's TCP
    // connection. The clients reconnect through the balancer; bob gets every message once.
    let mut victim = None;
    for i in 1..=3 {
        let c = stack.container("gateway", i);
        if stack.tcp_connections(&c).await > 0 {
            victim = Some(c);
            break;
        }
    }
    let victim = victim.expect("alice's and bob's connections are on some gateway");
    // alice's logins from here on, with when they happened.
    let alice_logins = tokio::spawn(async move {
        let mut at = Vec::new();
        while let Some(e) = alice_events.recv().await {
            if matches!(e, imgate_client::Event::Welcome { .. }) {
                at.push(Instant::now());
            }
        }
        at
    });
    stream(&alice, "bob", "k", 100).await;
    let killed_at = Instant::now();
    // The rest of the stream, while the gateway dies.
    let kill = ["kill", victim.as_str()];
    // bob reads while the sends go on, so his logins are timed when they happen.
    let (_, stream_done, ((seqs, bob_logins), all_delivered)) = tokio::join!(
        stack.podman(&kill),
        async {
            for i in 100..300 {
                send_until_accepted(&alice, "bob", format!("k-{i}"), i).await;
            }
            killed_at.elapsed()
        },
        async {
            let got = receive_all(&mut bob, 300, Duration::from_secs(60)).await;
            (got, killed_at.elapsed())
        }
    );
    assert_eq!(seqs.len(), 300);
    // Logins up to here are the kill's; later phases (down and up) log alice in again too.
    let kill_phase_end = Instant::now();
    assert_eq!(
        audit(&stack, "bob", 301).await,
        301,
        "bob's inbox: the hello and 300"
    );

    // A NATS node killed (R3): nothing lost.
    let nats_at = Instant::now();
    let nats_kill = {
        let victim = stack.container("nats2", 1);
        async move {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let _ = tokio::process::Command::new("podman")
                .args(["kill", &victim])
                .env("CONTAINERS_CONF", containers_conf())
                .output()
                .await;
        }
    };
    let (_f, mut frank) = connect_retrying(stack.client("frank", "phone", false)).await;
    tokio::join!(nats_kill, stream(&alice, "frank", "n", 300));
    let nats_kill_all_stored = nats_at.elapsed();
    receive_all(&mut frank, 300, Duration::from_secs(60)).await;
    assert_eq!(audit(&stack, "frank", 300).await, 300);

    // 3 -> 5 gateways while traffic flows.
    let (_g, mut grace) = connect_retrying(stack.client("grace", "phone", true)).await;
    let scaled = Instant::now();
    let (_, ()) = tokio::join!(
        stack.compose(&["up", "-d", "--scale", "gateway=5"]),
        stream(&alice, "grace", "s", 200)
    );
    let five_ready = stack.ready(5, scaled).await;
    receive_all(&mut grace, 200, Duration::from_secs(60)).await;
    assert_eq!(audit(&stack, "grace", 200).await, 200);

    // down, then up: the messages are in the volumes.
    stack.compose(&["down", "--remove-orphans"]).await;
    let again = Instant::now();
    stack.compose(&["up", "-d", "--scale", "gateway=3"]).await;
    let up_again_to_ready = stack.ready(3, again).await;
    assert_eq!(
        audit(&stack, "bob", 301).await,
        301,
        "bob's inbox after down and up"
    );
    assert_eq!(audit(&stack, "grace", 200).await, 200);

    drop(alice);
    let alice_logins: Vec<Instant> = alice_logins
        .await
        .unwrap()
        .into_iter()
        .filter(|t| *t > killed_at && *t <= kill_phase_end)
        .collect();
    let again_after = |logins: &[Instant]| {
        logins
            .first()
            .map(|t| t.duration_since(killed_at).as_secs_f64())
    };
    assert!(
        bob_logins.len() + alice_logins.len() > 0,
        "the killed gateway held alice's or bob's connection: one of them logged in again"
    );
    println!(
        "{}",
        json!({
            "images": sizes,
            "images_built_s": build_time.as_secs_f64(),
            "up_to_ready_s": up_to_ready.as_secs_f64(),
            "gateway_kill_to_the_200_sends_after_it_stored_s": stream_done.as_secs_f64(),
            "gateway_kill_to_all_300_delivered_s": all_delivered.as_secs_f64(),
            "gateway_kill_alice_logged_in_again_after_s": again_after(&alice_logins),
            "gateway_kill_alice_logins": alice_logins.len(),
            "gateway_kill_bob_logged_in_again_after_s": again_after(&bob_logins),
            "gateway_kill_bob_logins": bob_logins.len(),
            "nats_kill_run_to_all_300_stored_s": nats_kill_all_stored.as_secs_f64(),
            "scale_3_to_5_ready_s": five_ready.as_secs_f64(),
            "up_again_to_ready_s": up_again_to_ready.as_secs_f64(),
        })
    );
    stack.compose(&["down", "--remove-orphans"]).await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
