//! `imgate-bench`: load generator for the workloads of the project's performance targets
//! (bench/README.md, "Targets").
//!
//! Each scenario starts what it measures (a `nats-server` and N `imgate serve` processes,
//! release build) on free loopback ports, connects users through the client crate, drives a
//! fixed offered rate for a fixed time, and reports delivered rate, latency percentiles
//! (HdrHistogram, microseconds), lost and duplicated messages (reported even when 0), and the
//! CPU seconds and peak RSS of every process it started. `--json` prints one JSON object.
//!
//! Latency is measured from the moment the sender's client is asked to send (a microsecond
//! timestamp carried in the body) to the moment the recipient's client hands the message
//! over: it includes the store write, the bus and both client libraries.

mod common;
mod group;
mod http_user;
mod notify;
mod w1;
mod w2;
mod w3;
mod w4;
mod w7;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use imgate_harness::Gateway;

/// The gateway's allocator here too: the generator shares the machine's cores with what it
/// measures, and glibc's malloc was 5.7% of its samples (perf, W1).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "imgate-bench", about = "Load generator for imgate")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// W1, 1:1 chat: users spread over gateways, each message to a random user on another
    /// gateway, at a fixed offered rate.
    W1(w1::Args),
    /// W2, idle connections: gateways' memory per connection, the connections held by one
    /// child process per gateway, each from its own loopback address.
    W2(w2::Args),
    /// (Used by w2.) Holds connections until stdin closes.
    #[command(hide = true)]
    Hold(w2::HoldArgs),
    /// W3, fanout cost: the same load with G = 1, 2, 4, 8 gateways.
    W3(w3::Args),
    /// W4, a live room: thousands of connections over two gateways in one room.
    W4(w4::Args),
    /// W7, a reconnect storm: devices with messages waiting all reconnect at once.
    W7(w7::Args),
    /// A message to a large group: time to `sent` and to the last member.
    Group(group::Args),
    /// Offline notifications: every recipient offline, each window sends one.
    Notify(notify::Args),
}

/// Where the binaries and configs are.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Setup {
    /// The imgate binary: by default the one cargo built beside this benchmark (a release
    /// build), or `IMGATE_BIN`.
    #[arg(long)]
    pub(crate) imgate: Option<PathBuf>,
    /// NATS configuration to start nats-server with (one server; a cluster of three uses
    /// `nats/cluster.conf`).
    #[arg(long, default_value_os_t = imgate_harness::binaries::nats_config("nats.conf"))]
    pub(crate) nats_config: PathBuf,
    /// JetStream replicas: 1 (one nats-server) or 3 (three clustered nats-servers on this
    /// machine, the gateways with `--replicas 3`).
    #[arg(long, default_value_t = 1)]
    pub(crate) replicas: usize,
    /// Worker threads per gateway (`imgate serve --worker-threads`); 0 keeps the gateway's
    /// default of one per CPU.
    #[arg(long, default_value_t = 0)]
    pub(crate) gateway_threads: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// A standalone gateway's store: `memory`, or `disk` in a fresh temporary directory.
    #[arg(long, default_value = "memory")]
    pub(crate) store: String,
    /// With `--store disk`: this directory instead of a temporary one, kept afterwards (to
    /// fill a store for `bench/store_open.py`).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// With `--store disk`: `imgate serve --fsync`.
    #[arg(long, default_value = "batch")]
    pub(crate) fsync: String,
    /// One more argument for every gateway's `imgate serve` (repeatable, in order), as
    /// `--gateway-arg=--notify-url --gateway-arg=http://…`.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) gateway_arg: Vec<String>,
}

impl Setup {
    /// Starts a gateway measured by this run, logging only errors: `args` as
    /// [`Gateway::start`] takes them, after `--worker-threads` when set.
    pub(crate) async fn gateway(&self, args: &[String]) -> anyhow::Result<Gateway> {
        let binary = match &self.imgate {
            Some(b) => b.clone(),
            None => imgate_harness::binaries::imgate()?,
        };
        // Every generator connects from loopback: no per-address limit.
        let mut all: Vec<String> = [
            "--max-connections",
            "200000",
            "--max-connections-per-ip",
            "0",
        ]
        .map(str::to_owned)
        .into();
        if self.gateway_threads > 0 {
            all.extend(["--worker-threads".into(), self.gateway_threads.to_string()]);
        }
        all.extend_from_slice(args);
        all.extend_from_slice(&self.gateway_arg);
        // Gateways log errors only, unless IMGATE_BENCH_LOG names another filter.
        let log = std::env::var("IMGATE_BENCH_LOG").unwrap_or_else(|_| "error".into());
        Gateway::start_binary(binary, &all, &log).await
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.scenario {
        Scenario::W1(a) => rt.block_on(w1::run(a)),
        Scenario::W2(a) => rt.block_on(w2::run(a)),
        Scenario::Hold(a) => rt.block_on(w2::hold(a)),
        Scenario::W3(a) => rt.block_on(w3::run(a)),
        Scenario::W4(a) => rt.block_on(w4::run(a)),
        Scenario::W7(a) => rt.block_on(w7::run(a)),
        Scenario::Group(a) => rt.block_on(group::run(a)),
        Scenario::Notify(a) => rt.block_on(notify::run(a)),
    }
}

/// Prints a report: pretty JSON for people, one line with `--json`.
pub(crate) fn print(setup: &Setup, report: &serde_json::Value) {
    if setup.json {
        println!("{report}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("a JSON value prints")
        );
    }
}
