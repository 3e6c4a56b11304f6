//! A real `nats-server`: started from the repository's `nats/` configs on free loopback
//! ports with its own temporary JetStream directory, so a caller can stop, kill and restart
//! it, or read its monitoring counters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::binaries::{nats_config, nats_server};
use crate::free_port;
use crate::usage::{usage, Usage};

/// Starts tried before a port taken between choosing and binding it is an error.
const PORT_TRIES: usize = 5;

/// How long a server may take to print "Server is ready".
const READY: Duration = Duration::from_secs(20);

/// One `nats-server` process (or a stopped one that can be restarted on the same ports and
/// store).
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    /// The monitoring port (`/varz`, `/jsz`).
    pub monitor: u16,
    store: tempfile::TempDir,
    /// `(name, cluster port, routes)` for a cluster member.
    cluster: Option<(String, u16, String)>,
    /// More command-line arguments (for example `--user`/`--pass`).
    extra: Vec<String>,
    /// The config file it starts from: `nats/nats.conf` unless named.
    config: PathBuf,
}

/// What a nats-server has counted since it started.
#[derive(Debug, Default, Clone, Copy)]
pub struct NatsCounts {
    /// Messages received from clients and sent to them (`/varz` in_msgs, out_msgs).
    pub in_msgs: u64,
    pub out_msgs: u64,
    /// JetStream API requests (`/jsz` api.total); direct gets are not among them.
    pub api_requests: u64,
    /// Clients cut off as slow consumers (`/varz` slow_consumers).
    pub slow_consumers: u64,
}

impl NatsCounts {
    /// `self - before`, per `per` (delivered messages, logins), as JSON.
    pub fn per(&self, before: &NatsCounts, per: u64) -> serde_json::Value {
        let per = per.max(1) as f64;
        let f = |a: u64, b: u64| ((a - b) as f64 / per * 1000.0).round() / 1000.0;
        serde_json::json!({
            "in_msgs": self.in_msgs - before.in_msgs,
            "out_msgs": self.out_msgs - before.out_msgs,
            "api_requests": self.api_requests - before.api_requests,
            "in_per": f(self.in_msgs, before.in_msgs),
            "out_per": f(self.out_msgs, before.out_msgs),
            "api_requests_per": f(self.api_requests, before.api_requests),
        })
    }
}

impl NatsServer {
    /// One server from `nats/nats.conf`.
    pub async fn start() -> anyhow::Result<NatsServer> {
        Self::start_from(None, &[]).await
    }

    /// One server from `nats/nats.conf` with `extra` command-line arguments.
    pub async fn start_with(extra: &[&str]) -> anyhow::Result<NatsServer> {
        Self::start_from(None, extra).await
    }

    /// One server from the config file `config` (or `nats/nats.conf`), with `extra`
    /// command-line arguments.
    pub async fn start_from(config: Option<PathBuf>, extra: &[&str]) -> anyhow::Result<NatsServer> {
        let config = config.unwrap_or_else(|| nats_config("nats.conf"));
        for _ in 0..PORT_TRIES {
            let mut s = NatsServer::new(config.clone(), None)?;
            s.extra = extra.iter().map(|a| a.to_string()).collect();
            s.spawn()?;
            match s.wait_ready().await {
                Ok(()) => return Ok(s),
                Err(log) if log.contains("address already in use") => continue,
                Err(log) => bail!("nats-server exited before it was ready:\n{log}"),
            }
        }
        bail!("no free port for nats-server in {PORT_TRIES} tries")
    }

    /// `n` servers clustered from `nats/cluster.conf`.
    pub async fn cluster(n: usize) -> anyhow::Result<Vec<NatsServer>> {
        for _ in 0..PORT_TRIES {
            let mut servers = Self::cluster_members(n)?;
            for s in &mut servers {
                s.spawn()?;
            }
            let mut taken = false;
            for s in &mut servers {
                match s.wait_ready().await {
                    Ok(()) => {}
                    Err(log) if log.contains("address already in use") => taken = true,
                    Err(log) => bail!("nats-server exited before it was ready:\n{log}"),
                }
            }
            if !taken {
                return Ok(servers);
            }
        }
        bail!("no free ports for a nats-server cluster in {PORT_TRIES} tries")
    }

    fn new(config: PathBuf, cluster: Option<(String, u16, String)>) -> anyhow::Result<Self> {
        Ok(NatsServer {
            child: None,
            port: free_port()?,
            monitor: free_port()?,
            store: tempfile::tempdir().context("a temporary JetStream directory")?,
            cluster,
            extra: Vec::new(),
            config,
        })
    }

    fn cluster_members(n: usize) -> anyhow::Result<Vec<NatsServer>> {
        let cports = (0..n).map(|_| free_port()).collect::<Result<Vec<_>, _>>()?;
        let routes = cports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        cports
            .iter()
            .enumerate()
            .map(|(i, cport)| {
                let member = (format!("n{}", i + 1), *cport, routes.clone());
                NatsServer::new(nats_config("cluster.conf"), Some(member))
            })
            .collect()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let binary = nats_server()?;
        let mut cmd = Command::new(&binary);
        cmd.arg("-c").arg(&self.config);
        if let Some((name, cport, routes)) = &self.cluster {
            cmd.args(["-n", name])
                .args(["--cluster_name", "imgate"])
                .args(["--cluster", &format!("nats://127.0.0.1:{cport}")])
                .args(["--routes", routes])
                .env("NATS_NAME", name);
        }
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string(), "-sd"])
            .arg(self.store.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().with_context(|| format!("starting {binary}"))?);
        Ok(())
    }

    /// Waits for "Server is ready"; the log so far if the server exits (or stays silent)
    /// first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let child = self.child.as_mut().expect("spawned");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut log = String::new();
        let ready = tokio::time::timeout(READY, async {
            while let Ok(Some(l)) = lines.next_line().await {
                log.push_str(&l);
                log.push('\n');
                if l.contains("Server is ready") {
                    return true;
                }
            }
            false
        })
        .await;
        match ready {
            Ok(true) => {}
            Ok(false) => return Err(log),
            Err(_) => return Err(format!("not ready after {READY:?}:\n{log}")),
        }
        // Keep draining stderr so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(())
    }

    /// Stops the server: SIGTERM (a clean stop), or SIGKILL with `kill`.
    pub async fn stop(&mut self, kill: bool) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let sig = if kill { "-KILL" } else { "-TERM" };
                let _ = std::process::Command::new("kill")
                    .args([sig, &pid.to_string()])
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    /// Starts the server again on the same ports with the same store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "restart a stopped server");
        self.spawn()?;
        self.wait_ready()
            .await
            .map_err(|log| anyhow::anyhow!("nats-server exited before it was ready:\n{log}"))
    }

    pub fn usage(&self) -> anyhow::Result<Usage> {
        let child = self.child.as_ref().context("nats-server is stopped")?;
        usage(child.id().context("nats-server exited")?)
    }

    /// Messages in and out, JetStream API requests and slow consumers, from the monitoring
    /// endpoints.
    pub async fn counts(&self) -> anyhow::Result<NatsCounts> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.monitor));
        let varz: serde_json::Value = serde_json::from_str(&crate::http_get(addr, "/varz").await?)?;
        let jsz: serde_json::Value = serde_json::from_str(&crate::http_get(addr, "/jsz").await?)?;
        Ok(NatsCounts {
            in_msgs: varz["in_msgs"].as_u64().unwrap_or(0),
            out_msgs: varz["out_msgs"].as_u64().unwrap_or(0),
            api_requests: jsz["api"]["total"].as_u64().unwrap_or(0),
            slow_consumers: varz["slow_consumers"].as_u64().unwrap_or(0),
        })
    }
}
