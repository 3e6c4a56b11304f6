//! The standalone bus: one gateway, so a room message goes straight to the registry, and
//! presence and kicks count this gateway's connections. Nothing leaves the process.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{local_counts, Bus, BusError, Kicked, Local, Presence, RoomMessage};

/// The bus of a standalone gateway.
pub struct LocalBus {
    local: Arc<dyn Local>,
}

impl LocalBus {
    pub fn new(local: Arc<dyn Local>) -> Self {
        LocalBus { local }
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn publish_room(&self, msg: RoomMessage) -> Result<(), BusError> {
        self.local.deliver_room(msg);
        Ok(())
    }

    async fn presence(&self, uids: &[String]) -> Result<Presence, BusError> {
        Ok(Presence {
            counts: local_counts(self.local.as_ref(), uids),
            gateways: 1,
        })
    }

    /// The one gateway's revocation is raised by whoever asks for the kick (the admin
    /// handler), so `revoke` is not needed here.
    async fn kick(
        &self,
        uid: &str,
        device: Option<&str>,
        _revoke: Option<u64>,
    ) -> Result<Kicked, BusError> {
        Ok(Kicked {
            closed: self.local.kick(uid, device),
            gateways: 1,
        })
    }

    async fn serve(&self, stop: CancellationToken) {
        stop.cancelled().await
    }
}
