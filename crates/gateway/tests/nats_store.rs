//! The cluster store used as a library against a real nats-server: what the gateway relies on
//! from it that no client can see directly. It must not reach the store through a gateway
//! process: the end-to-end tests in the repository's `tests/` do that.

use std::time::Duration;

use clap::Parser;
use imgate_gateway::config::Config;
use imgate_gateway::store::nats::NatsStore;
use imgate_gateway::store::{CursorWrite, Store};

use imgate_harness::NatsServer;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    cfg: Config,
}

/// One cursor write, as the gateway's flusher makes it; `w.version` is updated in place.
async fn save(store: &NatsStore, w: &mut CursorWrite) {
    store.save_cursors(std::slice::from_mut(w)).await.unwrap();
}

/// Cursor writes go against the revision their writer last wrote, without reading first; a
/// stale revision (another gateway wrote meanwhile) falls back to read-and-compare, so the
/// cursor still never moves back.
#[tokio::test]
async fn cursor_writes_use_their_last_revision_and_never_move_back() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let url = nats.url();
    let cfg = Cli::parse_from(["imgate", "--nats", url.as_str()]).cfg;
    let store = tokio::time::timeout(Duration::from_secs(15), NatsStore::connect(&cfg))
        .await
        .expect("the store connects within 15 s")
        .expect("store connects");
    let kv = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap())
        .get_key_value("imgate_cursors")
        .await
        .unwrap();
    let revision = || async { kv.entry("bob.phone").await.unwrap().unwrap().revision };

    // Gateway A writes 5: no version known yet, so it reads, creates, and learns the revision.
    let mut a = CursorWrite::new("bob", "phone", 5);
    save(&store, &mut a).await;
    assert_eq!(a.version, revision().await);
    let a_first = a.version;

    // A writes 6 against that revision.
    a.seq = 6;
    save(&store, &mut a).await;
    assert!(a.version > a_first);
    assert_eq!(a.version, revision().await);
    assert_eq!(store.cursor("bob", "phone").await.unwrap(), Some(6));

    // Gateway B (no version) raises it to 9.
    let mut b = CursorWrite::new("bob", "phone", 9);
    save(&store, &mut b).await;
    assert_eq!(store.cursor("bob", "phone").await.unwrap(), Some(9));

    // A, with its now stale revision, writes 7: refused by the revision check, then read and
    // compared; 9 stays, and A learns B's revision.
    a.seq = 7;
    save(&store, &mut a).await;
    assert_eq!(store.cursor("bob", "phone").await.unwrap(), Some(9));
    assert_eq!(a.version, b.version);

    // A's next write goes against B's revision.
    a.seq = 12;
    save(&store, &mut a).await;
    assert_eq!(store.cursor("bob", "phone").await.unwrap(), Some(12));
    assert_eq!(a.version, revision().await);
}
