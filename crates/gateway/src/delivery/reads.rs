//! Read positions: checking a `read` before the store raises it, and counting what is
//! unread (the messages of an inbox above the read position that the user did not send,
//! up to [`MAX_UNREAD`]).
//!
//! The store keeps the position and tells every connection of the user when it rises;
//! this module neither stores nor tells anyone.

use imgate_proto::{ErrorCode, MAX_UNREAD};

use crate::refusal::Refusal;
use crate::store::{Page, Store, StoreError};

/// Messages read per page while counting.
const COUNT_PAGE: usize = 1000;

/// Refuses a read position beyond `newest`, the newest seq the reader can have seen (the
/// last one sent to its connection, or the store's newest over HTTP).
pub fn check(seq: u64, newest: u64) -> Result<(), Refusal> {
    if seq > newest {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            format!("read {seq} is beyond the newest seq this reader can have seen ({newest})"),
        ));
    }
    Ok(())
}

/// Unread messages of `uid`'s inbox above `read`, counted up to [`MAX_UNREAD`].
pub async fn unread(store: &dyn Store, uid: &str, read: u64) -> Result<u64, StoreError> {
    let mut after = read;
    let mut n = 0;
    loop {
        let page = store.read(uid, after, COUNT_PAGE).await?;
        n += count(&page, uid, read);
        match page.messages.last() {
            Some(m) if page.more && n < MAX_UNREAD => after = m.seq,
            _ => return Ok(n.min(MAX_UNREAD)),
        }
    }
}

/// The unread messages of one page: above `read` and not sent by `uid`.
pub fn count(page: &Page, uid: &str, read: u64) -> u64 {
    page.messages
        .iter()
        .filter(|m| m.seq > read && m.from != uid)
        .count() as u64
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::store::memory::{Keep, MemoryStore};
    use crate::store::{Draft, Fanout};

    struct Nobody;
    impl Fanout for Nobody {
        fn deliver(&self, _: &str, _: &mut dyn FnMut() -> Option<imgate_proto::Message>) {}
        fn read(&self, _: &str, _: u64, _: u64) {}
    }

    fn draft(from: &str, n: usize) -> Draft {
        Draft {
            id: format!("{from}-{n}"),
            from: from.into(),
            to: Some("bob".into()),
            group: None,
            ts: crate::store::now_ms(),
            body: json!({"n": n}).into(),
        }
    }

    #[tokio::test]
    async fn counts_what_others_sent_above_the_read_position_up_to_the_cap() {
        let keep = Keep {
            max_inbox: 5000,
            retention: Duration::from_secs(3600),
        };
        let store = MemoryStore::new(keep, Arc::new(Nobody));
        let bob = ["bob".to_owned()];
        for n in 0..3 {
            store.append(draft("alice", n), &bob).await.unwrap();
        }
        // Bob's own sends are in his inbox too (his other devices get them), never unread.
        store.append(draft("bob", 0), &bob).await.unwrap();
        assert_eq!(unread(&store, "bob", 0).await.unwrap(), 3);
        assert_eq!(unread(&store, "bob", 2).await.unwrap(), 1);
        assert_eq!(unread(&store, "bob", 4).await.unwrap(), 0);
        for n in 3..1200 {
            store.append(draft("alice", n), &bob).await.unwrap();
        }
        assert_eq!(unread(&store, "bob", 0).await.unwrap(), MAX_UNREAD);
        // Seqs 1001 to 1201 are alice's (bob's own send was seq 4).
        assert_eq!(unread(&store, "bob", 1000).await.unwrap(), 201);
    }

    #[test]
    fn a_read_beyond_what_was_seen_is_refused() {
        assert!(check(5, 5).is_ok());
        assert_eq!(check(6, 5).unwrap_err().code, ErrorCode::BadRequest);
    }
}
