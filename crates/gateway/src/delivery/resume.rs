//! Where a device resumes (docs/protocol.md, "Messages, seqs and guarantees", rule 4): an
//! explicit seq, else its stored cursor, else the live tail; and when a resume point belongs
//! to another store (a reset), so the device starts over from the retained inbox and is told
//! by a gap. A login ([`resume_point`]) and a poll ([`poll_start`], [`poll_from`]: a poll's
//! `after` also acks) decide it here, in one place.
//!
//! Reads the store and the cursors (and stores the cursor a poll acks); never writes to a
//! client.

use super::cursors::Cursors;
use crate::store::{CursorWrite, Store, StoreError};

/// Where a login resumes.
pub struct ResumePoint {
    /// The seq the backlog starts after (0 after a reset).
    pub resume: u64,
    /// The device's stored cursor, if it has one.
    pub stored: Option<u64>,
    /// The resume point belongs to another store (another epoch, or a seq above anything
    /// this store assigned): the device starts over from the retained inbox, told by a gap.
    pub reset: bool,
}

/// Where a login resumes: the explicit seq, else the device's cursor, else the live tail
/// (stored as the cursor at once, so a device seen once resumes from here even if it never
/// acks). A resume from another epoch, or above every seq the store ever assigned, is a
/// reset: it starts from the beginning of the retained inbox.
pub async fn resume_point(
    store: &dyn Store,
    cursors: &Cursors,
    uid: &str,
    device: &str,
    asked: Option<u64>,
    epoch: Option<&str>,
) -> Result<ResumePoint, StoreError> {
    let stored = cursors.load(uid, device).await?;
    let resume = match (asked, stored) {
        (Some(r), _) => r,
        (None, Some(c)) => c,
        (None, None) => store.live_tail(uid).await?,
    };
    let reset = is_reset(store, uid, resume, asked.and(epoch)).await?;
    let resume = if reset { 0 } else { resume };
    if stored.is_none() {
        store
            .save_cursors(&mut [CursorWrite::new(uid, device, resume)])
            .await?;
    }
    Ok(ResumePoint {
        resume,
        stored,
        reset,
    })
}

/// Where a poll (`GET /v1/messages`) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStart {
    /// After the seq the poll named, which acks everything up to it for the device.
    After(u64),
    /// The named seq belongs to another store: from the beginning of the retained inbox,
    /// told by a gap, acking nothing (the seq means nothing here).
    Reset,
    /// The poll named none: where a login without a resume point starts.
    Resume,
}

/// Where a poll naming `after` (of `epoch`, when named) starts; see [`PollStart`].
pub async fn poll_start(
    store: &dyn Store,
    uid: &str,
    after: Option<u64>,
    epoch: Option<&str>,
) -> Result<PollStart, StoreError> {
    Ok(match after {
        None => PollStart::Resume,
        Some(n) if is_reset(store, uid, n, epoch).await? => PollStart::Reset,
        Some(n) => PollStart::After(n),
    })
}

/// Where a poll that starts at `start` reads from, acking what it must on the way: the
/// seq, and whether a gap must be said.
pub async fn poll_from(
    store: &dyn Store,
    cursors: &Cursors,
    (uid, device): (&str, &str),
    start: PollStart,
) -> Result<(u64, bool), StoreError> {
    Ok(match start {
        PollStart::Reset => (0, true),
        PollStart::After(n) => {
            cursors.ack_now(uid, device, n).await?;
            (n, false)
        }
        PollStart::Resume => {
            let point = resume_point(store, cursors, uid, device, None, None).await?;
            (point.resume, false)
        }
    })
}

/// Whether resuming `uid` after `seq` (of `epoch`, when named) means the store was reset
/// or replaced since the client saw that seq.
pub async fn is_reset(
    store: &dyn Store,
    uid: &str,
    seq: u64,
    epoch: Option<&str>,
) -> Result<bool, StoreError> {
    if epoch.is_some_and(|e| *e != *store.epoch()) {
        return Ok(true);
    }
    // The live tail is the cheap answer (in cluster broadcast, no request); only a resume
    // above it asks the store's highest seq (in cluster mode, a request to the stream).
    Ok(seq > store.live_tail(uid).await? && seq > store.high_seq().await?)
}
