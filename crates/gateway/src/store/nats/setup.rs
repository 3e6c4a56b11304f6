//! Connecting to NATS and laying the store out in it: the connection's options and its
//! first attempts, the stream and the KV buckets created or updated (trying again while
//! NATS is not ready), and the server's version checked.
//!
//! Nothing here reads or writes messages; it only builds a [`NatsStore`].

use super::*;

/// The client, connecting in the background, with what a failed start needs.
struct Connecting {
    client: async_nats::Client,
    /// The last error the connection reported (none once connected).
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    /// Woken when live copies may have been lost (a reconnect, a slow-consumer cut).
    resync: Arc<tokio::sync::Notify>,
    servers: Vec<async_nats::ServerAddr>,
}

impl Connecting {
    /// Starts the client: it retries until connected, and reports its events.
    async fn start(n: &crate::config::NatsArgs) -> anyhow::Result<Connecting> {
        // The client connects in the background; its last error is what a failed start
        // reports (an authorization violation would otherwise read as a stream timeout).
        let last_error = Arc::new(std::sync::Mutex::new(None::<String>));
        let slot = last_error.clone();
        let resync = Arc::new(tokio::sync::Notify::new());
        let lost = resync.clone();
        let opts = NatsStore::options(n)
            .await?
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let slot = slot.clone();
                // Live copies are at most once: whatever was published while the connection
                // was down, or dropped from a full subscription, is read back by the tail.
                if matches!(
                    event,
                    async_nats::Event::Connected | async_nats::Event::SlowConsumer(_)
                ) {
                    lost.notify_one();
                }
                async move {
                    let mut last = slot.lock().unwrap_or_else(|p| p.into_inner());
                    match &event {
                        async_nats::Event::Connected => *last = None,
                        async_nats::Event::ClientError(e) => *last = Some(e.to_string()),
                        async_nats::Event::ServerError(e) => *last = Some(e.to_string()),
                        _ => {}
                    }
                    tracing::info!(%event, "nats");
                }
            });
        let servers = n
            .nats
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--nats: {e}"))?;
        let client = opts.connect(servers.clone()).await?;
        Ok(Connecting {
            client,
            last_error,
            resync,
            servers,
        })
    }
}

/// The stream and the buckets, once created or updated.
struct Provisioned {
    stream: stream::Stream,
    cursors: kv::Store,
    groups: kv::Store,
    revocations: kv::Store,
    reads: kv::Store,
}

/// `"2.15.1"` (or `"2.12.0-beta.3"`) as numbers; `None` if it does not start like a version.
fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next()?.parse().ok();
    Some((next()?, next()?, next()?))
}

/// Refuses a server older than [`MIN_SERVER_VERSION`], naming both versions.
pub fn check_server_version(version: &str) -> anyhow::Result<()> {
    let (a, b, c) = MIN_SERVER_VERSION;
    match parse_version(version) {
        Some(v) if v >= MIN_SERVER_VERSION => Ok(()),
        _ => anyhow::bail!(
            "nats-server {version} is too old: imgate needs nats-server {a}.{b}.{c} or newer \
             (batch direct gets, atomic batch publishes with message ids); upgrade the NATS \
             servers"
        ),
    }
}

/// Creates (or updates) a KV bucket with one value per key, and opens it.
pub(super) async fn kv_bucket(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    replicas: usize,
) -> anyhow::Result<kv::Store> {
    js.create_or_update_key_value(kv::Config {
        bucket: bucket.to_owned(),
        description: description.to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating KV bucket {bucket}: {e}"))
}

impl NatsStore {
    /// The connection options every connection of this gateway shares: name, timeout,
    /// credentials and TLS.
    async fn options(n: &crate::config::NatsArgs) -> anyhow::Result<async_nats::ConnectOptions> {
        let mut opts = async_nats::ConnectOptions::new()
            .name("imgate")
            .connection_timeout(n.nats_timeout);
        if let (Some(user), Some(pass)) = (&n.nats_user, &n.nats_password) {
            opts = opts.user_and_password(user.clone(), pass.0.clone());
        }
        if let Some(token) = &n.nats_token {
            opts = opts.token(token.0.clone());
        }
        if let Some(creds) = &n.nats_creds {
            opts = opts.credentials_file(creds).await?;
        }
        if let Some(ca) = &n.nats_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(opts)
    }

    /// Connects, then creates or updates the stream and the buckets (cursors, groups,
    /// revocations, read positions).
    pub async fn connect(cfg: &Config) -> anyhow::Result<Arc<Self>> {
        // Past 60 lines only by the struct it fills at the end, field by field.
        let n = &cfg.nats;
        // A group message is one atomic batch, one copy per member.
        anyhow::ensure!(
            cfg.limits.max_group <= publish::MAX_ATOMIC_BATCH,
            "--max-group {} is above {}, the most copies nats-server stores in one atomic batch",
            cfg.limits.max_group,
            publish::MAX_ATOMIC_BATCH
        );
        let Connecting {
            client,
            last_error,
            resync,
            servers,
        } = Connecting::start(n).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(n.nats_timeout)
            .build(client.clone());
        let names = Names::new(&n.stream_prefix);

        let Provisioned {
            stream,
            cursors,
            groups,
            revocations,
            reads,
        } = Self::provision_when_ready(&client, &js, &names, cfg, &last_error, &servers).await?;
        check_server_version(&client.server_info().version)
            .map_err(|e| e.context(format!("NATS at {}", n.nats.join(","))))?;
        tracing::info!(version = %client.server_info().version, "nats-server version");
        let epoch = epoch_of(stream.cached_info());
        let stats = Arc::new(TailStats::default());
        let mode = n.publish_mode();
        tracing::info!(
            ?mode,
            replicas = n.replicas,
            "sends are published to JetStream this way (--nats-publish)"
        );
        let publisher = Publisher::start(client.clone(), n.nats_timeout, mode, stats.clone());
        Ok(Arc::new_cyclic(|me| NatsStore {
            me: me.clone(),
            epoch: std::sync::RwLock::new(epoch),
            publisher,
            client,
            js,
            stream,
            cursors,
            groups,
            revocations,
            reads,
            instance: crate::store::new_epoch(),
            group_cache: dashmap::DashMap::new(),
            names,
            max_inbox: cfg.storage.max_inbox,
            tail_last: AtomicU64::new(0),
            recent: (n.fanout == FanoutMode::Broadcast).then(|| {
                Recent::new(
                    n.backlog_cache,
                    cfg.storage.max_inbox,
                    cfg.storage.retention,
                )
            }),
            interest: (n.fanout == FanoutMode::Interest)
                .then(|| interest::Interest::new(stats.clone())),
            timeout: n.nats_timeout,
            follow_delay: n.test_follow_delay,
            resync,
            drop_live_every: n.test_drop_live,
            tail_batch: n.tail_batch as usize,
            tail_stats: stats,
        }))
    }

    /// Creates or updates the stream and the buckets, trying again until
    /// `--nats-startup-timeout` while NATS is not ready (compose, a restart); a failure then
    /// names what the connection last reported.
    async fn provision_when_ready(
        client: &async_nats::Client,
        js: &jetstream::Context,
        names: &Names,
        cfg: &Config,
        last_error: &std::sync::Mutex<Option<String>>,
        servers: &[async_nats::ServerAddr],
    ) -> anyhow::Result<Provisioned> {
        let n = &cfg.nats;
        // NATS may still be starting (compose, a restart): keep trying for a while.
        let deadline = tokio::time::Instant::now() + n.nats_startup_timeout;
        loop {
            let connection = || {
                let last = last_error.lock().unwrap_or_else(|p| p.into_inner());
                last.clone()
            };
            // The server's version is known once connected; too old a server is final.
            let at = || format!("NATS at {}", n.nats.join(","));
            // Give the background connect a moment, so the version is checked before any
            // JetStream request (an old server would only time them out).
            let wait = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            while client.connection_state() != State::Connected
                && tokio::time::Instant::now() < wait
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if client.connection_state() == State::Connected {
                check_server_version(&client.server_info().version).map_err(|e| e.context(at()))?;
            }
            match Self::provision(js, names, cfg).await {
                Ok(v) => return Ok(v),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, connection = ?connection(), "NATS not ready yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    let Some(c) = connection() else {
                        return Err(e);
                    };
                    // The background client's events name only the kind of failure ("IO
                    // error"); one direct attempt returns the cause (a TLS refusal, say).
                    let cause = match Self::options(n).await?.connect(servers.to_vec()).await {
                        Err(direct) => direct.to_string(),
                        Ok(_) => c,
                    };
                    return Err(e.context(format!(
                        "NATS at {} refused or dropped the connection: {cause} \
                         (check --nats-user/--nats-password, --nats-token, --nats-creds, --nats-ca)",
                        n.nats.join(",")
                    )));
                }
            }
        }
    }

    // Long only because it is the stream's and the four buckets' configurations.
    async fn provision(
        js: &jetstream::Context,
        names: &Names,
        cfg: &Config,
    ) -> anyhow::Result<Provisioned> {
        let replicas = cfg.nats.replicas;
        js.create_or_update_stream(stream::Config {
            name: names.stream.clone(),
            subjects: vec![names.all_users()],
            storage: stream::StorageType::File,
            max_age: cfg.storage.retention,
            max_messages_per_subject: cfg.storage.max_inbox as i64,
            duplicate_window: DEDUPE_WINDOW,
            num_replicas: replicas,
            allow_direct: true,
            allow_atomic_publish: true,
            // Every stored copy is published again on a core subject: the live delivery.
            republish: Some(stream::Republish {
                source: names.users_source(),
                destination: names.live_all(),
                headers_only: false,
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating or updating stream {}: {e}", names.stream))?;
        let stream = js.get_stream(&names.stream).await?;
        let cursors = kv_bucket(
            js,
            &names.cursors,
            "imgate device cursors: <uid>.<device> -> last acked seq",
            replicas,
        )
        .await?;
        let groups = kv_bucket(
            js,
            &names.groups,
            "imgate groups: <gid> -> msgpack {owner, members}",
            replicas,
        )
        .await?;
        let revocations = kv_bucket(
            js,
            &names.revocations,
            "imgate revoked tokens: <uid> -> tokens issued at or before these Unix seconds are refused",
            replicas,
        )
        .await?;
        let reads = kv_bucket(
            js,
            &names.reads,
            "imgate read positions: <uid> -> JSON {seq, gw, conn} (who raised it last)",
            replicas,
        )
        .await?;
        Ok(Provisioned {
            stream,
            cursors,
            groups,
            revocations,
            reads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_the_minimum_are_refused_naming_both_versions() {
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("2.14.0").is_ok());
        assert!(check_server_version("2.12.3").is_err());
        assert!(check_server_version("3.0.0-beta.1").is_ok());
        let e = check_server_version("2.11.9").unwrap_err().to_string();
        assert!(e.contains("2.11.9") && e.contains("2.14.0"), "{e}");
        assert!(check_server_version("2.9.10").is_err());
        assert!(check_server_version("").is_err());
        assert!(check_server_version("garbage").is_err());
    }
}
