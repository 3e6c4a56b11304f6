//! The gateway's configuration as one tree, filled by clap from flags and `IMGATE_*`
//! environment variables, checked by [`Config::validate`] before anything binds.
//!
//! Every default lives here, in the `default_value` of its field.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Cluster mode: where NATS is and how imgate lays itself out in it.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Cluster (NATS)")]
pub struct NatsArgs {
    /// NATS server URLs (comma-separated). Given: cluster mode over JetStream. Absent:
    /// standalone mode with the embedded store.
    #[arg(long, env = "IMGATE_NATS", value_delimiter = ',')]
    pub nats: Vec<String>,

    /// NATS user (with --nats-password).
    #[arg(long, env = "IMGATE_NATS_USER")]
    pub nats_user: Option<String>,

    /// NATS password.
    #[arg(long, env = "IMGATE_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret>,

    /// NATS token.
    #[arg(long, env = "IMGATE_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<Secret>,

    /// NATS credentials file (JWT + nkey).
    #[arg(long, env = "IMGATE_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// CA certificate for TLS to NATS (turns TLS on).
    #[arg(long, env = "IMGATE_NATS_CA")]
    pub nats_ca: Option<PathBuf>,

    /// Prefix of every NATS name: stream PREFIX on PREFIX.u.*, KV PREFIX_cursors and
    /// PREFIX_groups, core subjects PREFIX.room.* and PREFIX.ctl.*.
    #[arg(long, env = "IMGATE_STREAM_PREFIX", default_value = "imgate")]
    pub stream_prefix: String,

    /// JetStream replicas of the stream and KV buckets (1, or 3 on a 3-node NATS cluster).
    #[arg(long, env = "IMGATE_REPLICAS", default_value_t = 1)]
    pub replicas: usize,

    /// Time allowed for one NATS request or publish acknowledgement.
    #[arg(long, env = "IMGATE_NATS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub nats_timeout: Duration,

    /// At start, how long to keep trying to reach NATS and set up the stream.
    #[arg(long, env = "IMGATE_NATS_STARTUP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub nats_startup_timeout: Duration,

    /// Bytes of recently stored inbox copies each gateway keeps in memory, from its tail,
    /// so a device reconnecting to it (a reconnect storm after another gateway died, a
    /// poll) reads its backlog without asking NATS. 0 turns it off. Default 64 MiB.
    #[arg(long, env = "IMGATE_BACKLOG_CACHE", default_value_t = 64 << 20)]
    pub backlog_cache: usize,

    /// Messages the tail asks NATS for in one pull request. In the benchmarks 64 cost more
    /// CPU and fell behind under load, and 2048 saved nothing over 512 (docs/bench-history.md,
    /// "the tail's batch size").
    #[arg(long, env = "IMGATE_TAIL_BATCH", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub tail_batch: u32,

    /// How a send's inbox copies are published: `atomic` (group commit into JetStream
    /// atomic batches: a send's copies are stored all or nothing), `separate` (one publish
    /// per copy: a NATS failure in the middle of a send can leave some copies stored until
    /// the sender retries it) or `auto`: atomic with --replicas 3, separate with 1, because
    /// nats-server stages every atomic batch of a one-replica stream on disk, which made
    /// sends 20 to 100 times slower in the benchmarks (docs/decisions.md).
    #[arg(long, env = "IMGATE_NATS_PUBLISH", value_enum, default_value_t = NatsPublish::Auto)]
    pub nats_publish: NatsPublish,

    /// How stored copies reach the gateways: `broadcast` (every gateway receives every copy
    /// and drops those for users it holds no connection of) or `interest` (a gateway
    /// subscribes to the live subject of each user it holds a connection of, so NATS
    /// routes each copy only to gateways that want it). docs/architecture.md says which
    /// costs less where.
    #[arg(long, env = "IMGATE_FANOUT", value_enum, default_value_t = Fanout::Broadcast)]
    pub fanout: Fanout,

    /// For tests only: the tail ignores every Nth live copy, as if the bus had lost it, so
    /// the recovery from lost copies can be shown. 0 (the default) ignores none.
    #[arg(long, env = "IMGATE_TEST_DROP_LIVE", default_value_t = 0, hide = true)]
    pub test_drop_live: u64,

    /// For tests only: in interest mode, how long a login waits between subscribing to its
    /// inbox and reading its backlog, so a test can store messages in between. 0 (the
    /// default) waits not at all.
    #[arg(long, env = "IMGATE_TEST_FOLLOW_DELAY", default_value = "0s", value_parser = humantime::parse_duration, hide = true)]
    pub test_follow_delay: Duration,
}

impl NatsArgs {
    /// `--nats-publish` with `auto` resolved for `--replicas`.
    pub fn publish_mode(&self) -> NatsPublish {
        match self.nats_publish {
            NatsPublish::Auto if self.replicas >= 3 => NatsPublish::Atomic,
            NatsPublish::Auto => NatsPublish::Separate,
            mode => mode,
        }
    }
}

/// How the cluster store publishes a send's copies (`--nats-publish`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NatsPublish {
    /// Atomic with three replicas, separate with one.
    Auto,
    /// Group commit into atomic batches: all or nothing.
    Atomic,
    /// One publish per copy, all acknowledged before `sent`.
    Separate,
}

/// How stored copies reach the gateways in cluster mode (`--fanout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fanout {
    /// Every gateway receives every copy on `<prefix>.live.>` and drops what it does not
    /// hold.
    Broadcast,
    /// A gateway subscribes to `<prefix>.live.<uid>` while it holds a connection of uid.
    Interest,
}

/// Which store standalone mode keeps its state in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// On disk in `--data-dir`: survives restarts and SIGKILL.
    Disk,
    /// In process memory: everything is gone when the process ends.
    Memory,
}

/// When the disk store forces its writes to the device (every write reaches the operating
/// system before `sent` in every mode, so a SIGKILL of the gateway loses nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fsync {
    /// Before every `sent`: one fsync per group commit. Survives power loss.
    Always,
    /// In the background, at most 200 ms after the write: a power loss can lose the last
    /// 200 ms of acknowledged sends.
    Batch,
    /// Never by the gateway; the operating system writes back on its own schedule.
    Never,
}

/// Offline notifications: a webhook told of messages no device took in time.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Notifications")]
pub struct NotifyArgs {
    /// Where to POST notifications of stored messages that no device of their user acked
    /// or read within --notify-after. Absent: no notifications.
    #[arg(long, env = "IMGATE_NOTIFY_URL")]
    pub notify_url: Option<reqwest::Url>,

    /// How long after a message is stored it is reported, if still unacked and unread; also
    /// the shortest time between two notifications of one user.
    #[arg(long, env = "IMGATE_NOTIFY_AFTER", default_value = "10s", value_parser = humantime::parse_duration)]
    pub notify_after: Duration,

    /// A file holding the secret that signs each notification (X-Imgate-Signature:
    /// sha256=<hex HMAC-SHA256 of the body>).
    #[arg(long, env = "IMGATE_NOTIFY_SECRET_FILE")]
    pub notify_secret_file: Option<PathBuf>,

    /// List each message's body in notifications (off: bodies stay out of push payloads).
    #[arg(long, env = "IMGATE_NOTIFY_BODY")]
    pub notify_body: bool,

    /// How long a notification the webhook does not take (network error, timeout, 429,
    /// 5xx) is tried again, with jittered exponential backoff from 1 s to 5 min.
    #[arg(long, env = "IMGATE_NOTIFY_RETRY_FOR", default_value = "1h", value_parser = humantime::parse_duration)]
    pub notify_retry_for: Duration,

    /// Also publish each notification on NATS subject <prefix>.notify.<uid> (core NATS, at
    /// most once), with or without --notify-url. Cluster mode only.
    #[arg(long, env = "IMGATE_NOTIFY_NATS")]
    pub notify_nats: bool,
}

/// `imgate serve` flags, grouped by concern (each group is a heading of `--help`). Each
/// flag is also an `IMGATE_*` environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    // These two come before the groups: a group's `--help` heading would otherwise carry
    // over to them.
    /// Threads that run connections (default: one per CPU). Fewer than the CPUs leaves
    /// room for a NATS server or other gateways on the same machine.
    #[arg(long, env = "IMGATE_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,

    /// Log format: text for people, json for machines. Filter with RUST_LOG.
    #[arg(long, env = "IMGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub notify: NotifyArgs,

    #[command(flatten)]
    pub storage: StoreArgs,

    #[command(flatten)]
    pub listen: ListenArgs,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub limits: Limits,

    #[command(flatten)]
    pub timers: Timers,
}

/// What is kept, and where: the standalone store and how long inboxes keep messages (in
/// either mode).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Storage")]
pub struct StoreArgs {
    /// Standalone mode's store: `disk` (in --data-dir) or `memory` (lost at exit).
    #[arg(long = "store", value_name = "STORE", env = "IMGATE_STORE", value_enum, default_value_t = StoreKind::Disk)]
    pub kind: StoreKind,

    /// Directory of the disk store (default: $XDG_DATA_HOME/imgate, else
    /// ~/.local/share/imgate). One gateway at a time may open it.
    #[arg(long, env = "IMGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// When the disk store forces writes to the device.
    #[arg(long, env = "IMGATE_FSYNC", value_enum, default_value_t = Fsync::Batch)]
    pub fsync: Fsync,

    /// Start the disk store under a new epoch: once after it lost acknowledged messages (a
    /// damaged or truncated journal, removed files), which otherwise stops the start, or
    /// after restoring it from a backup. What is left is served, seqs go on above any it
    /// issued, and devices resuming from before are told of a gap. Use it once: every start
    /// with it begins a new epoch.
    #[arg(long, env = "IMGATE_REPAIR")]
    pub repair: bool,

    /// How long messages are kept in an inbox.
    #[arg(long, env = "IMGATE_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub retention: Duration,

    /// Most messages kept per inbox; older ones are dropped first.
    #[arg(long, env = "IMGATE_MAX_INBOX", default_value_t = 10_000)]
    pub max_inbox: usize,
}

/// Where the gateway listens, with or without TLS, and who may call it from a browser.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Listeners")]
pub struct ListenArgs {
    /// HTTP listener: WebSocket (/v1/ws), HTTP API, health and metrics.
    #[arg(long, env = "IMGATE_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,

    /// A plain-HTTP listener of its own for GET /metrics, for a scraper on a private
    /// network; /metrics then leaves the public HTTP listener.
    #[arg(long, env = "IMGATE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// TCP listener for the binary protocol (4-byte length + msgpack frames).
    #[arg(long, env = "IMGATE_TCP", default_value = "127.0.0.1:7070")]
    pub tcp: SocketAddr,

    /// PEM certificate chain (leaf first): with --tls-key, the HTTP listener serves HTTPS and
    /// WSS and the TCP listener speaks TLS. Both files are re-read on SIGHUP.
    #[arg(long, env = "IMGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "IMGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Origin allowed to call the HTTP API from a browser (repeat, or comma-separate in the
    /// environment variable). None by default: same origin only.
    #[arg(long, env = "IMGATE_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
}

/// How login tokens are checked: an HS256 secret, public keys, and the claims required.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Tokens")]
pub struct AuthArgs {
    /// File holding the HS256 JWT secret. Without it (or IMGATE_JWT_SECRET), and without
    /// public keys, the gateway runs with a development secret, serves POST /v1/dev/token
    /// and binds loopback only.
    #[arg(long, env = "IMGATE_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// The HS256 JWT secret itself (prefer the environment variable or the file).
    #[arg(long, env = "IMGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// A PEM public key (RSA, EC P-256 or Ed25519): tokens signed with RS256, ES256 or
    /// EdDSA by its private key are accepted. Re-read on SIGHUP.
    #[arg(long, env = "IMGATE_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// A JWKS document (an identity provider's keys); a token's `kid` picks the key.
    /// Re-read on SIGHUP.
    #[arg(long, env = "IMGATE_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,

    /// Tokens must carry this `iss`.
    #[arg(long, env = "IMGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Tokens must carry this `aud`.
    #[arg(long, env = "IMGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
}

/// What one client, one user or the whole gateway may hold or send.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Limits")]
pub struct Limits {
    /// Largest frame a client may send (TCP length prefix, WebSocket message), in bytes.
    #[arg(long, env = "IMGATE_MAX_FRAME", default_value_t = imgate_proto::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,

    /// Largest message body, JSON-encoded, in bytes.
    #[arg(long, env = "IMGATE_MAX_BODY", default_value_t = 64 * 1024)]
    pub max_body: usize,

    /// Most connections per uid on this gateway; the oldest is replaced beyond it.
    #[arg(long, env = "IMGATE_MAX_DEVICES", default_value_t = 16)]
    pub max_devices: usize,

    /// Sends per second allowed per connection (0 = unlimited).
    #[arg(long, env = "IMGATE_SEND_RATE", default_value_t = 100)]
    pub send_rate: u32,

    /// Burst of sends allowed above the rate per connection.
    #[arg(long, env = "IMGATE_SEND_BURST", default_value_t = 200)]
    pub send_burst: u32,

    /// Stored messages queued per connection before it counts as too slow and is closed.
    #[arg(long, env = "IMGATE_OUTBOX", default_value_t = 1024)]
    pub outbox: usize,

    /// Most members of a group (its owner included).
    #[arg(long, env = "IMGATE_MAX_GROUP", default_value_t = 1_000)]
    pub max_group: usize,

    /// Most rooms one connection (or one device over HTTP) may be in at once.
    #[arg(long, env = "IMGATE_MAX_ROOMS_PER_CONNECTION", default_value_t = 32)]
    pub max_rooms_per_connection: usize,

    /// Most concurrent connections (TCP + WebSocket) this gateway accepts.
    #[arg(long, env = "IMGATE_MAX_CONNECTIONS", default_value_t = 200_000)]
    pub max_connections: usize,

    /// Most connections one IP address may hold at once, TCP and HTTP together (0: no
    /// limit). The default is a twentieth of the 20,000 files a process may open on the
    /// machines imgate is built on, so one address cannot take a gateway's sockets; raise
    /// it for clients behind a shared NAT, or for load generators.
    #[arg(long, env = "IMGATE_MAX_CONNECTIONS_PER_IP", default_value_t = 1_000)]
    pub max_connections_per_ip: usize,
}

/// How long the gateway waits for clients, and how often it writes or pings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Timers")]
pub struct Timers {
    /// How often a connected device's acked position is written to the store; it is also
    /// written when the device disconnects and at shutdown. Longer means fewer store writes
    /// (in cluster mode, fewer KV writes per delivered message) and, after a gateway crash,
    /// at most this much more sent again to devices that resume from their cursor.
    #[arg(long, env = "IMGATE_CURSOR_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub cursor_interval: Duration,

    /// A connection holding messages unacknowledged for longer is closed (bye ack_timeout).
    #[arg(long, env = "IMGATE_ACK_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ack_timeout: Duration,

    /// A connection that sends nothing for this long is closed (bye idle).
    #[arg(long, env = "IMGATE_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Time an HTTP client has to send a request's header, and the longest an idle
    /// keep-alive connection waits for its next request.
    #[arg(long, env = "IMGATE_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Time a TCP (or unauthenticated WebSocket) connection has to send its login frame.
    #[arg(long, env = "IMGATE_LOGIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub login_timeout: Duration,

    /// On SIGTERM/SIGINT, how long to wait for connections to close before exiting.
    #[arg(long, env = "IMGATE_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Interval of the comment line that keeps idle SSE streams open through proxies.
    #[arg(long, env = "IMGATE_SSE_KEEPALIVE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub sse_keepalive: Duration,
}

impl StoreArgs {
    /// `--data-dir`, or the default under the XDG data directory.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("imgate")
    }
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("--max-body ({body}) must not exceed --max-frame ({frame})")]
    BodyAboveFrame { body: usize, frame: usize },
    #[error(
        "refusing to listen on non-loopback address {0} with the development JWT secret: \
         set IMGATE_JWT_SECRET or --jwt-secret-file"
    )]
    DevSecretNotLoopback(SocketAddr),
    #[error("cannot read --jwt-secret-file {path}: {source}")]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the JWT secret is empty")]
    EmptySecret,
    #[error(
        "the HS256 JWT secret is {0} bytes; it must be at least {MIN_SECRET} (RFC 7518: at \
         least the hash's size), for example `openssl rand -hex 32`"
    )]
    ShortSecret(usize),
    #[error("--replicas must be 1 or 3 (NATS JetStream replicas), not {0}")]
    Replicas(usize),
    #[error("--stream-prefix must match ^[A-Za-z0-9_-]{{1,32}}$")]
    Prefix,
}

impl Config {
    /// Checks limits and the dev-secret rule. Call before binding anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("--max-frame", self.limits.max_frame),
            ("--max-body", self.limits.max_body),
            ("--max-inbox", self.storage.max_inbox),
            ("--max-devices", self.limits.max_devices),
            ("--outbox", self.limits.outbox),
            ("--max-connections", self.limits.max_connections),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.limits.max_body > self.limits.max_frame {
            return Err(ConfigError::BodyAboveFrame {
                body: self.limits.max_body,
                frame: self.limits.max_frame,
            });
        }
        if ![1, 3].contains(&self.nats.replicas) {
            return Err(ConfigError::Replicas(self.nats.replicas));
        }
        let p = &self.nats.stream_prefix;
        if p.len() > 32 || !imgate_proto::ids::is_valid_id(p) {
            return Err(ConfigError::Prefix);
        }
        let listen = &self.listen;
        if self.auth.secret()?.is_none() && !self.auth.has_public_keys() {
            for addr in [Some(listen.http), Some(listen.tcp), listen.metrics_listen]
                .into_iter()
                .flatten()
            {
                if !addr.ip().is_loopback() {
                    return Err(ConfigError::DevSecretNotLoopback(addr));
                }
            }
        }
        Ok(())
    }
}

impl AuthArgs {
    /// True when tokens may be signed with public keys (a key file or a JWKS).
    pub fn has_public_keys(&self) -> bool {
        self.jwt_public_key_file.is_some() || self.jwt_jwks_file.is_some()
    }

    /// The configured secret, from the environment/flag or the file; `None` means
    /// development mode.
    pub fn secret(&self) -> Result<Option<Secret>, ConfigError> {
        secret_from(self.jwt_secret.as_ref(), self.jwt_secret_file.as_ref())
    }
}

/// The shortest HS256 secret accepted, in bytes: the size of SHA-256's output.
pub const MIN_SECRET: usize = 32;

/// Resolves the JWT secret from its two sources (shared with `imgate token`).
pub fn secret_from(
    value: Option<&Secret>,
    file: Option<&PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    let s = match (value, file) {
        (Some(s), _) => s.0.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|source| ConfigError::SecretFile {
                path: path.clone(),
                source,
            })?
            .trim()
            .to_owned(),
        (None, None) => return Ok(None),
    };
    if s.is_empty() {
        return Err(ConfigError::EmptySecret);
    }
    if s.len() < MIN_SECRET {
        return Err(ConfigError::ShortSecret(s.len()));
    }
    Ok(Some(Secret(s)))
}

/// A configuration from command-line words, for unit tests.
#[cfg(test)]
pub(crate) fn parse_for_test(args: &[&str]) -> Config {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: Config,
    }
    Cli::parse_from(std::iter::once("imgate").chain(args.iter().copied())).cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_defaults() {
        let cfg = parse_for_test(&[]);
        assert_eq!(cfg.limits.max_frame, 256 * 1024);
        assert_eq!(cfg.limits.max_body, 64 * 1024);
        assert_eq!(cfg.storage.retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(cfg.storage.max_inbox, 10_000);
        assert_eq!(cfg.timers.ack_timeout, Duration::from_secs(30));
        assert_eq!(cfg.timers.cursor_interval, Duration::from_secs(5));
        assert_eq!(cfg.timers.idle_timeout, Duration::from_secs(90));
        assert_eq!(cfg.limits.max_devices, 16);
        assert_eq!(cfg.timers.drain_timeout, Duration::from_secs(10));
        assert_eq!(cfg.worker_threads, None, "tokio's default: one per CPU");
        cfg.validate().unwrap();
        let cfg = parse_for_test(&["--worker-threads", "1"]);
        assert_eq!(cfg.worker_threads.map(|n| n.get()), Some(1));
    }

    #[test]
    fn sends_are_atomic_batches_with_three_replicas_and_separate_publishes_with_one() {
        let mode = |args: &[&str]| parse_for_test(args).nats.publish_mode();
        assert_eq!(mode(&[]), NatsPublish::Separate);
        assert_eq!(mode(&["--replicas", "3"]), NatsPublish::Atomic);
        assert_eq!(mode(&["--nats-publish", "atomic"]), NatsPublish::Atomic);
        let both = ["--replicas", "3", "--nats-publish", "separate"];
        assert_eq!(mode(&both), NatsPublish::Separate);
    }

    #[test]
    fn fanout_defaults_to_broadcast() {
        assert_eq!(parse_for_test(&[]).nats.fanout, Fanout::Broadcast);
        let interest = parse_for_test(&["--fanout", "interest"]);
        assert_eq!(interest.nats.fanout, Fanout::Interest);
    }

    #[test]
    fn the_tail_batch_defaults_to_512_and_must_be_positive() {
        assert_eq!(parse_for_test(&[]).nats.tail_batch, 512);
        assert_eq!(parse_for_test(&["--tail-batch", "64"]).nats.tail_batch, 64);
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            cfg: Config,
        }
        let zero = <Cli as clap::Parser>::try_parse_from(["imgate", "--tail-batch", "0"]);
        let err = zero
            .err()
            .expect("a tail batch of 0 is refused")
            .to_string();
        assert!(err.contains("--tail-batch"), "{err}");
    }

    #[test]
    fn dev_secret_refuses_public_addresses() {
        let cfg = parse_for_test(&["--http", "0.0.0.0:8080"]);
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::DevSecretNotLoopback(_))
        ));
        let cfg = parse_for_test(&["--metrics-listen", "0.0.0.0:9090"]);
        assert!(
            matches!(cfg.validate(), Err(ConfigError::DevSecretNotLoopback(a)) if a.port() == 9090),
            "the metrics listener too"
        );
        let secret = "s3cret-s3cret-s3cret-s3cret-s3cr";
        let cfg = parse_for_test(&["--http", "0.0.0.0:8080", "--jwt-secret", secret]);
        cfg.validate().unwrap();
        assert_eq!(format!("{:?}", cfg.auth.jwt_secret), "Some(Secret(***))");
    }

    #[test]
    fn an_hs256_secret_shorter_than_32_bytes_stops_the_start() {
        for short in ["x", "s3cret-s3cret-s3cret-s3cret-s3c"] {
            let cfg = parse_for_test(&["--jwt-secret", short]);
            let err = cfg.validate().unwrap_err();
            assert!(matches!(err, ConfigError::ShortSecret(n) if n == short.len()));
            assert!(err.to_string().contains("at least 32"), "{err}");
        }
    }
}
