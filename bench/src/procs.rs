//! Processes a benchmark starts and measures: `nats-server` and `imgate serve` on free
//! loopback ports, with CPU seconds and peak RSS read from `/proc`. Every process is killed
//! when its handle drops.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// CPU time (user + system) and peak RSS of a process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct Usage {
    pub(crate) cpu_seconds: f64,
    pub(crate) peak_rss_kib: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub(crate) fn usage(pid: u32) -> anyhow::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat; after the ")" they are 12th and 13th.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(Usage {
        cpu_seconds: ticks as f64 / clock_ticks() as f64,
        peak_rss_kib: peak,
    })
}

/// Current resident memory (`VmRSS`) of a process.
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc status")
}

fn clock_ticks() -> u64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux this runs on; `getconf` confirms it.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `NATS_SERVER`, else the pinned nats-server (`nats/VERSION`) that `tests/run` installs
/// into its venv, else `nats-server` on `PATH`.
pub(crate) fn nats_binary() -> String {
    if let Ok(b) = std::env::var("NATS_SERVER") {
        return b;
    }
    let venv = format!(
        "{}/.cache/imgate/venv/bin/nats-server",
        std::env::var("HOME").unwrap_or_default()
    );
    if std::path::Path::new(&venv).exists() {
        venv
    } else {
        "nats-server".into()
    }
}

/// A `nats-server` with JetStream in a temporary directory.
pub(crate) struct Nats {
    child: Child,
    pub(crate) port: u16,
    /// The monitoring port (`/varz`, `/jsz`).
    monitor: u16,
    _store: tempfile::TempDir,
}

/// What a nats-server has counted since it started.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct NatsCounts {
    /// Messages received from clients and sent to them (`/varz` in_msgs, out_msgs).
    pub(crate) in_msgs: u64,
    pub(crate) out_msgs: u64,
    /// JetStream API requests (`/jsz` api.total); direct gets are not among them.
    pub(crate) api_requests: u64,
}

impl NatsCounts {
    /// `self - before`, per `per` (delivered messages, logins), as JSON.
    pub(crate) fn per(&self, before: &NatsCounts, per: u64) -> serde_json::Value {
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

impl Nats {
    pub(crate) async fn start(config: &PathBuf) -> anyhow::Result<Nats> {
        let (port, monitor) = (free_port()?, free_port()?);
        let store = tempfile::tempdir()?;
        let bin = nats_binary();
        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(config)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("starting {bin} (tests/run installs the pinned one, or set NATS_SERVER)")
            })?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(l) = lines.next_line().await? {
                if l.contains("Server is ready") {
                    return Ok(());
                }
            }
            bail!("nats-server exited before it was ready")
        })
        .await
        .context("nats-server did not get ready in 20 s")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Nats {
            child,
            port,
            monitor,
            _store: store,
        })
    }

    /// Messages in and out and JetStream API requests, from the monitoring endpoints.
    pub(crate) async fn counts(&self) -> anyhow::Result<NatsCounts> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.monitor));
        let json = |text: String| -> anyhow::Result<serde_json::Value> {
            let body = text.split_once("\r\n\r\n").context("an HTTP answer")?.1;
            Ok(serde_json::from_str(body)?)
        };
        let varz = json(get(addr, "/varz").await?)?;
        let jsz = json(get(addr, "/jsz").await?)?;
        Ok(NatsCounts {
            in_msgs: varz["in_msgs"].as_u64().unwrap_or(0),
            out_msgs: varz["out_msgs"].as_u64().unwrap_or(0),
            api_requests: jsz["api"]["total"].as_u64().unwrap_or(0),
        })
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub(crate) fn usage(&self) -> anyhow::Result<Usage> {
        usage(self.child.id().context("nats-server exited")?)
    }
}

/// An `imgate serve` process.
pub(crate) struct Gateway {
    /// The disk store's temporary directory, removed with the gateway.
    pub(crate) data: Option<tempfile::TempDir>,
    child: Child,
    pub(crate) http: SocketAddr,
    pub(crate) tcp: SocketAddr,
}

impl Gateway {
    pub(crate) async fn start(binary: &PathBuf, args: &[String]) -> anyhow::Result<Gateway> {
        // A standalone gateway measured without a named store keeps it in memory, as every
        // figure before the disk store did; `--store disk` runs name their directory.
        let has = |flag: &str| args.iter().any(|a| a == flag);
        let memory: &[&str] = if has("--nats") || has("--store") {
            &[]
        } else {
            &["--store", "memory"]
        };
        let mut child = Command::new(binary)
            .args(["serve", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0"])
            .args(["--send-rate", "0", "--max-connections", "200000"])
            .args(memory)
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (cargo build --release first)",
                    binary.display()
                )
            })?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let line = tokio::time::timeout(Duration::from_secs(40), lines.next_line())
            .await
            .context("gateway did not start in 40 s")??
            .context("gateway exited before listening")?;
        let field = |name: &str| -> anyhow::Result<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .context("no address in the listening line")?
                .parse()
                .context("bad address")
        };
        let (http, tcp) = (field("http=")?, field("tcp=")?);
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Gateway {
            data: None,
            child,
            http,
            tcp,
        })
    }

    pub(crate) fn usage(&self) -> anyhow::Result<Usage> {
        usage(self.pid()?)
    }

    pub(crate) fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("gateway exited")
    }

    /// A counter from the gateway's `/metrics` (0 if absent).
    pub(crate) async fn metric(&self, name: &str) -> u64 {
        metrics(self.http)
            .await
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            })
            .map_or(0, |v| v as u64)
    }
}

/// `GET /metrics` over a plain socket.
async fn metrics(addr: SocketAddr) -> anyhow::Result<String> {
    get(addr, "/metrics").await
}

/// The whole HTTP/1.0 answer to `GET path` (headers included).
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}
