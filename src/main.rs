//! The `imgate` command: `serve` runs a gateway; `token`, `send` and `listen` are small
//! tools around it. All gateway logic lives in `imgate-gateway`; this file parses flags,
//! sets up logging and signals, and prints.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use imgate_client::{ClientBuilder, Encoding, Event};
use imgate_gateway::auth::Auth;
use imgate_gateway::config::{secret_from, LogFormat, Secret};
use imgate_gateway::logging::WithConn;
use imgate_gateway::{Config, Gateway, Listeners};

/// mimalloc instead of glibc's allocator: allocation was about an eighth of a gateway's CPU
/// under W1 (perf), and a gateway allocates per message and per connection.
#[cfg(not(feature = "alloc-stats"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// With `--features alloc-stats` (benchmarks only): the system allocator, counted, the
/// counts in /metrics. What is allocated does not depend on who serves it; the CPU of such
/// a build is not comparable (stats_alloc can wrap mimalloc only in a constant on nightly).
#[cfg(feature = "alloc-stats")]
#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// Calls that hand out memory, reallocations included (a `Vec` that grows is one call per
/// growth), and the bytes newly allocated.
#[cfg(feature = "alloc-stats")]
fn allocations() -> (u64, u64) {
    let s = GLOBAL.stats();
    (
        (s.allocations + s.reallocations) as u64,
        s.bytes_allocated as u64,
    )
}

#[derive(Parser)]
#[command(name = "imgate", version, about = "Instant-messaging delivery gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a gateway (standalone without --nats).
    Serve(Box<Config>),
    /// Print a token signed with the gateway's secret.
    Token(TokenArgs),
    /// Send one message and print the `sent` answer as JSON.
    Send(SendArgs),
    /// Print every message received, one JSON object per line, acking as it goes.
    Listen(ListenArgs),
    /// Exit 0 if the local gateway answers /readyz with 200 (a container health check).
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// The gateway's HTTP listener; an unspecified address (0.0.0.0) means this host.
    #[arg(long, env = "IMGATE_HTTP", default_value = "127.0.0.1:8080")]
    http: std::net::SocketAddr,
}

#[derive(Args)]
struct SecretArgs {
    /// File holding the HS256 secret (as for `serve`).
    #[arg(long, env = "IMGATE_JWT_SECRET_FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// The HS256 secret; without either, the development secret.
    #[arg(long, env = "IMGATE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<Secret>,
}

impl SecretArgs {
    fn auth(&self) -> anyhow::Result<Auth> {
        let secret = secret_from(self.jwt_secret.as_ref(), self.jwt_secret_file.as_ref())?;
        if secret.is_none() {
            eprintln!("imgate: no secret configured, using the development secret");
        }
        Ok(Auth::new(secret.as_ref()))
    }
}

#[derive(Args)]
struct TokenArgs {
    /// The uid the token speaks for.
    uid: String,
    /// Lifetime, e.g. 24h, 30m, 7days.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Add `role: "admin"`.
    #[arg(long)]
    admin: bool,
    #[command(flatten)]
    secret: SecretArgs,
}

#[derive(Args)]
struct ConnArgs {
    /// Gateway address: tcp://host:port or ws://host:port, with TLS tls://host:port or
    /// wss://host:port.
    #[arg(long, env = "IMGATE_SERVER", default_value = "tcp://127.0.0.1:7070")]
    server: String,
    /// Token to log in with.
    #[arg(long, env = "IMGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Without --token: mint a token for this uid with the secret options below.
    #[arg(long = "as", value_name = "UID")]
    as_uid: Option<String>,
    /// Device id.
    #[arg(long, default_value = "cli")]
    device: String,
    /// Use msgpack instead of JSON on a WebSocket.
    #[arg(long)]
    msgpack: bool,
    /// For tls:// and wss://: trust the CA certificates of this PEM file instead of the
    /// system's roots.
    #[arg(long, env = "IMGATE_CA")]
    ca: Option<std::path::PathBuf>,
    #[command(flatten)]
    secret: SecretArgs,
}

impl ConnArgs {
    fn builder(&self, resume: Option<u64>) -> anyhow::Result<ClientBuilder> {
        let token = match (&self.token, &self.as_uid) {
            (Some(t), _) => t.clone(),
            (None, Some(uid)) => self
                .secret
                .auth()?
                .mint(uid, Duration::from_secs(3600), false),
            (None, None) => anyhow::bail!("give --token (or IMGATE_TOKEN), or --as <uid>"),
        };
        let enc = if self.msgpack {
            Encoding::Msgpack
        } else {
            Encoding::Json
        };
        let b = ClientBuilder::new(&self.server, token)
            .device(&self.device)
            .resume(resume)
            .encoding(enc);
        Ok(match &self.ca {
            Some(ca) => b.ca(ca),
            None => b,
        })
    }
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Recipient uid.
    #[arg(long, required_unless_present = "group")]
    to: Option<String>,
    /// Group id (instead of --to).
    #[arg(long, conflicts_with = "to")]
    group: Option<String>,
    /// Body: any JSON value.
    #[arg(long)]
    body: String,
    /// Client message id (made up if absent); re-sending the same id stores nothing new.
    #[arg(long)]
    id: Option<String>,
}

#[derive(Args)]
struct ListenArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Resume after this seq (0 = the whole retained inbox); default: the stored cursor.
    #[arg(long)]
    resume: Option<u64>,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    #[cfg(feature = "alloc-stats")]
    imgate_gateway::metrics::count_allocations(allocations);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Cmd::Serve(cfg) = &cli.cmd {
        if let Some(n) = cfg.worker_threads {
            rt.worker_threads(n.get());
        }
    }
    let rt = rt.build()?;
    match cli.cmd {
        Cmd::Serve(cfg) => rt.block_on(serve(*cfg)),
        Cmd::Token(a) => {
            if !imgate_proto::ids::is_valid_id(&a.uid) {
                anyhow::bail!("uid must match ^[A-Za-z0-9_-]{{1,64}}$");
            }
            println!("{}", a.secret.auth()?.mint(&a.uid, a.ttl, a.admin));
            Ok(())
        }
        Cmd::Send(a) => rt.block_on(send(a)),
        Cmd::Listen(a) => rt.block_on(listen(a)),
        Cmd::Check(a) => check(a),
    }
}

/// A plain HTTP/1.0 GET of /readyz with std's blocking socket: no runtime, no curl needed in
/// a slim container image.
fn check(a: CheckArgs) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut addr = a.http;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let timeout = Duration::from_secs(2);
    let mut sock = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    sock.read_to_string(&mut answer)?;
    let status = answer.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        println!("ready");
        Ok(())
    } else {
        anyhow::bail!("not ready: {status}")
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The disk store's engine logs each step of opening it at info; only its warnings
        // are worth an operator's attention.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    // Colour codes only for a person at a terminal, never into a file or a pipe.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // Each connection's lines name it (imgate_gateway::logging).
    match format {
        LogFormat::Text => b
            .event_format(WithConn {
                inner: tracing_subscriber::fmt::format(),
                json: false,
            })
            .init(),
        LogFormat::Json => b
            .json()
            .event_format(WithConn {
                inner: tracing_subscriber::fmt::format().json(),
                json: true,
            })
            .init(),
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    init_logging(cfg.log_format);
    cfg.validate()?;
    let listeners = Listeners::bind(&cfg).await.context("binding listeners")?;
    let gateway = Gateway::new(cfg).await?;
    let (http, tcp) = listeners.addrs()?;
    tracing::info!(%http, %tcp, "listening");
    // One plain line on stdout, once the gateway can serve, for scripts and tests to find
    // the bound ports.
    match &listeners.metrics {
        Some(m) => println!(
            "imgate listening http={http} tcp={tcp} metrics={}",
            m.local_addr()?
        ),
        None => println!("imgate listening http={http} tcp={tcp}"),
    }
    gateway.serve(listeners, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn send(a: SendArgs) -> anyhow::Result<()> {
    let body: serde_json::Value = serde_json::from_str(&a.body).context("--body is not JSON")?;
    let (client, _events) = a.conn.builder(None)?.reconnect(false).connect().await?;
    let sent = client
        .send(imgate_proto::Send {
            id: a.id,
            to: a.to,
            group: a.group,
            body,
        })
        .await?;
    println!(
        "{}",
        serde_json::json!({"type": "sent", "id": sent.id, "seq": sent.seq, "ts": sent.ts})
    );
    client.close().await;
    Ok(())
}

async fn listen(a: ListenArgs) -> anyhow::Result<()> {
    let (client, mut events) = a.conn.builder(a.resume)?.connect().await?;
    let mut n = 0;
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Msg(m) => {
                let mut v = serde_json::to_value(&m)?;
                v["type"] = "msg".into();
                println!("{v}");
                n += 1;
                if a.count.is_some_and(|c| n >= c) {
                    break;
                }
            }
            Event::Welcome { resume, gap, .. } => {
                eprintln!(
                    "imgate: logged in, resuming after {resume}{}",
                    if gap {
                        " (gap: older messages expired)"
                    } else {
                        ""
                    }
                );
            }
            Event::Refreshed { exp } => eprintln!("imgate: token refreshed, valid until {exp}"),
            Event::Disconnected { reason } => {
                eprintln!("imgate: disconnected ({reason:?}), reconnecting")
            }
            Event::Error { code, message } => eprintln!("imgate: error {code}: {message}"),
            Event::Read { seq } => eprintln!("imgate: read up to {seq} on another device"),
            Event::Room { .. } => {}
        }
    }
    client.close().await;
    Ok(())
}
