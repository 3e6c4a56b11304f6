//! The bus: what gateways tell each other that is not stored. Live room messages reach the
//! room's members on every gateway, and presence queries and kicks are answered by every
//! gateway.
//!
//! [`Bus`] has two implementations: [`local::LocalBus`] for a standalone gateway (everything
//! stays in this process) and [`nats::NatsBus`] for a cluster (core NATS, subjects from
//! [`crate::subjects`]). Nothing above the bus branches on the mode or names a subject. The
//! bus reaches this gateway's connections only through [`Local`], which the registry
//! implements, so it imports nothing above it.

pub mod local;
pub mod nats;

use std::collections::BTreeMap;

use async_trait::async_trait;
use imgate_proto::{ErrorCode, ServerFrame};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::refusal::Refusal;

/// A bus failure. `Unavailable`: the other gateways could not be reached, so nothing was
/// published or asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("bus error: {0}")]
    Internal(String),
}

impl From<BusError> for Refusal {
    fn from(e: BusError) -> Self {
        let code = match e {
            BusError::Unavailable(_) => ErrorCode::Unavailable,
            BusError::Internal(_) => ErrorCode::Internal,
        };
        Refusal::new(code, e.to_string())
    }
}

/// A live room message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomMessage {
    #[serde(skip)]
    pub room: String,
    pub from: String,
    /// Unix milliseconds.
    pub ts: u64,
    pub body: Value,
}

impl RoomMessage {
    /// The `room` frame its members get.
    pub fn into_frame(self) -> ServerFrame {
        ServerFrame::Room {
            room: self.room,
            from: self.from,
            ts: self.ts,
            body: self.body,
        }
    }
}

/// Connections per uid over the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presence {
    /// Connections of each uid asked (uids with none left out).
    pub counts: BTreeMap<String, usize>,
    /// Gateways that answered.
    pub gateways: usize,
}

/// This gateway's connections, as the bus sees them.
pub trait Local: Send + Sync + 'static {
    /// Whether any connection here is in `room`: a room message for nobody here is dropped
    /// before it is decoded.
    fn room_is_local(&self, room: &str) -> bool;
    /// Hands a room message to the room's members here.
    fn deliver_room(&self, msg: RoomMessage);
    /// How many connections `uid` has here.
    fn connections_of(&self, uid: &str) -> usize;
    /// Closes `uid`'s connections here (of one device when given) with `bye kicked`; how
    /// many.
    fn kick(&self, uid: &str, device: Option<&str>) -> usize;
}

/// What a kick closed over the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kicked {
    /// Connections closed.
    pub closed: usize,
    /// Gateways that answered.
    pub gateways: usize,
}

/// Counts of `uids` on one gateway, the ones with none left out.
pub fn local_counts(local: &dyn Local, uids: &[String]) -> BTreeMap<String, usize> {
    uids.iter()
        .map(|u| (u.clone(), local.connections_of(u)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// What gateways tell each other. Every method is safe to call concurrently.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Delivers a room message to its members on every gateway, this one included. Nothing is
    /// stored: a member that is not connected now never sees it.
    async fn publish_room(&self, msg: RoomMessage) -> Result<(), BusError>;

    /// Connections of `uids` on every gateway that answers within a short window.
    async fn presence(&self, uids: &[String]) -> Result<Presence, BusError>;

    /// Closes `uid`'s connections (of one device when given) on every gateway that
    /// answers within a short window. With `revoke`, each of those gateways first refuses
    /// `uid`'s tokens issued at or before that time (Unix seconds).
    async fn kick(
        &self,
        uid: &str,
        device: Option<&str>,
        revoke: Option<u64>,
    ) -> Result<Kicked, BusError>;

    /// Until `stop`: hands other gateways' room messages to this one's members and answers
    /// their presence queries and kicks.
    async fn serve(&self, stop: CancellationToken);
}
