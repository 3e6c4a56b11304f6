//! The watchers of the KV buckets this gateway mirrors in memory: revocations (into the
//! auth layer), read positions (to the fanout, so every device hears of a rise) and groups
//! (the group cache). Each runs until shutdown and starts its watch again after a failure.
//!
//! Nothing here writes to NATS.

use super::*;

/// A value of the revocations bucket: the revocation time as decimal Unix seconds.
pub(super) fn revoked_before(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Runs `watch` until `stop`, again half a second after each time it fails or ends.
pub(super) async fn keep_watching<F, Fut>(what: &str, stop: &CancellationToken, mut watch: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    loop {
        let r = tokio::select! {
            r = watch() => r,
            _ = stop.cancelled() => return,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "{what} interrupted; watching again");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The position in a value of the reads bucket (0 if it does not parse).
pub(super) fn read_seq(value: &[u8]) -> u64 {
    serde_json::from_slice::<ReadValue>(value).map_or(0, |v| v.seq)
}

impl NatsStore {
    /// Raises `into` from the revocations bucket until `stop`: every stored value first, then
    /// each change (made by any gateway); re-watches after a failure.
    pub async fn run_revocation_watch(
        self: Arc<Self>,
        into: Arc<crate::auth::Revocations>,
        stop: CancellationToken,
    ) {
        let (this, into) = (&self, &into);
        keep_watching("revocation watch", &stop, || async move {
            this.connected()?;
            let mut watch = this.revocations.watch_with_history(">").await?;
            while let Some(e) = watch.next().await {
                let e = e?;
                if e.operation != kv::Operation::Put {
                    continue;
                }
                match revoked_before(&e.value) {
                    Some(before) => into.raise(&e.key, before),
                    None => {
                        tracing::warn!(key = e.key, "ignoring a revocation that does not parse")
                    }
                }
            }
            anyhow::bail!("revocation watch ended")
        })
        .await
    }

    /// Tells `fanout` of every rise of a read position, made by any gateway, until `stop`;
    /// after a failure it watches again from the revision after the last one seen, so no
    /// rise is missed.
    pub async fn run_read_watch(self: Arc<Self>, fanout: Arc<dyn Fanout>, stop: CancellationToken) {
        let next = AtomicU64::new(0);
        let (this, fanout, next) = (&self, &fanout, &next);
        keep_watching("read watch", &stop, || async move {
            this.connected()?;
            if next.load(Ordering::Relaxed) == 0 {
                // From the bucket's end at the first watch, so a watch made again after
                // an early failure still starts where the first one would have.
                let mut bucket = this.js.get_stream(format!("KV_{}", this.names.reads)).await?;
                let last = bucket.info().await?.state.last_sequence;
                next.store(last + 1, Ordering::Relaxed);
            }
            let from = next.load(Ordering::Relaxed);
            let mut watch = this.reads.watch_all_from_revision(from).await?;
            while let Some(e) = watch.next().await {
                let e = e?;
                next.store(e.revision + 1, Ordering::Relaxed);
                if e.operation != kv::Operation::Put {
                    continue;
                }
                match serde_json::from_slice::<ReadValue>(&e.value) {
                    Ok(v) => {
                        let except = if v.gw == this.instance { v.conn } else { 0 };
                        fanout.read(&e.key, v.seq, except);
                    }
                    Err(err) => {
                        tracing::warn!(key = e.key, error = %err, "ignoring a read position that does not parse")
                    }
                }
            }
            anyhow::bail!("read watch ended")
        })
        .await
    }

    /// Keeps the group cache current from the groups bucket until `stop`; re-watches after a
    /// failure (a watch starts with every current value).
    pub async fn run_group_watch(
        self: Arc<Self>,
        ready: tokio::sync::oneshot::Sender<()>,
        stop: CancellationToken,
    ) {
        let ready = std::sync::Mutex::new(Some(ready));
        keep_watching("group watch", &stop, || self.watch_groups_once(&ready)).await
    }

    async fn watch_groups_once(
        &self,
        ready: &std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    ) -> anyhow::Result<()> {
        self.connected()?;
        // Everything there is now, then every change.
        let mut current = std::collections::HashMap::new();
        let mut keys = self.groups.keys().await?;
        while let Some(k) = keys.next().await {
            let k = k?;
            if let Some(v) = self.groups.get(&k).await? {
                if let Ok(g) = rmp_serde::from_slice::<Group>(&v) {
                    current.insert(k, g);
                }
            }
        }
        // Last value of every key, then every change: anything changed after the listing
        // above arrives here too.
        let mut watch = self.groups.watch_with_history(">").await?;
        self.group_cache.retain(|k, _| current.contains_key(k));
        for (k, g) in current {
            self.group_cache.insert(k, g);
        }
        let first = ready.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(r) = first {
            let _ = r.send(());
        }
        while let Some(e) = watch.next().await {
            let e = e?;
            match e.operation {
                kv::Operation::Put => match rmp_serde::from_slice::<Group>(&e.value) {
                    Ok(g) => {
                        self.group_cache.insert(e.key, g);
                    }
                    Err(err) => {
                        tracing::warn!(key = e.key, error = %err, "ignoring a group that does not decode")
                    }
                },
                kv::Operation::Delete | kv::Operation::Purge => {
                    self.group_cache.remove(&e.key);
                }
            }
        }
        anyhow::bail!("group watch ended")
    }
}
