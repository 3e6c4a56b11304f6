//! An `imgate serve` process on free loopback ports, read back from the line it prints when
//! it listens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::usage::{usage, Usage};

/// How long a gateway may take to print its listening line.
const LISTENING: Duration = Duration::from_secs(40);

/// A running gateway.
pub struct Gateway {
    /// Its own data directory when the caller named none, removed with the gateway.
    _data: Option<tempfile::TempDir>,
    child: Child,
    pub http: SocketAddr,
    pub tcp: SocketAddr,
    /// The `--metrics-listen` address, when given.
    pub metrics: Option<SocketAddr>,
}

/// Where a gateway's log goes: this process's stderr, or with `IMGATE_TEST_LOG_DIR` a file
/// of its own in that directory (`tests/run` scans those for leaked tokens).
fn log_sink() -> anyhow::Result<Stdio> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let Some(dir) = std::env::var_os("IMGATE_TEST_LOG_DIR") else {
        return Ok(Stdio::inherit());
    };
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::path::Path::new(&dir).join(format!("gateway-{}-{n}.log", std::process::id()));
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(file.into())
}

/// The address after `name` (`http=`, `tcp=`, `metrics=`) in the line a gateway prints
/// once it listens.
fn address(line: &str, name: &str) -> anyhow::Result<SocketAddr> {
    match line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .map(str::parse)
    {
        Some(Ok(addr)) => Ok(addr),
        _ => bail!("no {name}<address> in the gateway's line {line:?}"),
    }
}

impl Gateway {
    /// Starts [`crate::binaries::imgate`] as `imgate serve` with `args` added and logs at
    /// `warn` (`IMGATE_TEST_LOG` overrides it; `IMGATE_TEST_LOG_DIR` sends the log to a
    /// file). Unless `args` name them:
    /// - free loopback ports for `--http` and `--tcp`;
    /// - `--send-rate 0` (no rate limit);
    /// - a standalone gateway keeps its disk store in a temporary directory of its own
    ///   (`--data-dir`, `--store` or `--nats` say otherwise).
    ///
    /// The gateway's `IMGATE_*` settings from the caller's environment are cleared.
    pub async fn start(args: &[impl AsRef<str>]) -> anyhow::Result<Gateway> {
        let log = std::env::var("IMGATE_TEST_LOG").unwrap_or_else(|_| "warn".into());
        Self::start_binary(crate::binaries::imgate()?, args, &log).await
    }

    /// [`Gateway::start`] with another binary and log filter.
    pub async fn start_binary(
        binary: PathBuf,
        args: &[impl AsRef<str>],
        log: &str,
    ) -> anyhow::Result<Gateway> {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let has = |flag: &str| args.contains(&flag);
        let mut cmd = Command::new(&binary);
        cmd.arg("serve");
        if !has("--http") {
            cmd.args(["--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0"]);
        }
        if !has("--send-rate") {
            cmd.args(["--send-rate", "0"]);
        }
        let data = if has("--data-dir") || has("--store") || has("--nats") {
            None
        } else {
            let d = tempfile::tempdir().context("a temporary data directory")?;
            cmd.arg("--data-dir").arg(d.path());
            Some(d)
        };
        cmd.args(&args)
            .env_remove("IMGATE_DATA_DIR")
            .env_remove("IMGATE_STORE")
            .env_remove("IMGATE_JWT_SECRET")
            .env_remove("IMGATE_JWT_SECRET_FILE")
            .env("RUST_LOG", log)
            .stdout(Stdio::piped())
            .stderr(log_sink()?)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(LISTENING, lines.next_line())
            .await
            .with_context(|| format!("the gateway did not listen within {LISTENING:?}"))?
            .context("reading the gateway's stdout")?
            .context("the gateway exited before listening")?;
        let (http, tcp) = (address(&line, "http=")?, address(&line, "tcp=")?);
        let metrics = address(&line, "metrics=").ok();
        // Keep draining stdout so the gateway never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Gateway {
            _data: data,
            child,
            http,
            tcp,
            metrics,
        })
    }

    pub fn tcp_url(&self) -> String {
        format!("tcp://{}", self.tcp)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.http)
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("the gateway exited")
    }

    pub fn usage(&self) -> anyhow::Result<Usage> {
        usage(self.pid()?)
    }

    /// Sends a signal to the gateway process (`"TERM"`, `"KILL"`, …).
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
        Ok(())
    }

    /// Waits up to `d` for the process to exit and returns its status.
    pub async fn wait(&mut self, d: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(d, self.child.wait())
            .await
            .with_context(|| format!("the gateway did not exit within {d:?}"))?
            .context("waiting for the gateway")
    }

    /// A counter or gauge from the gateway's `/metrics` (0 if absent).
    pub async fn metric(&self, name: &str) -> u64 {
        crate::http_get(self.http, "/metrics")
            .await
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            })
            .map_or(0, |v| v as u64)
    }
}
