//! The cluster bus on core NATS (nothing here is stored).
//!
//! - A room message travels once on `<prefix>.room.<rid>`; every gateway follows
//!   `<prefix>.room.*`, reads the room from the subject, and decodes only when someone here
//!   is in that room.
//! - A presence query is one request on `<prefix>.ctl.presence`; every gateway (this one
//!   included) answers with its counts, and the asker sums what arrives within
//!   [`GATHER_WINDOW`]. There is no registry to ask.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{local_counts, Bus, Local, Presence, RoomMessage};
use crate::store::StoreError;
use crate::subjects::Names;

/// How long a presence query waits for gateways to answer.
pub const GATHER_WINDOW: Duration = Duration::from_millis(250);

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    uids: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Answer {
    /// Connections per uid on the answering gateway (uids with none left out).
    counts: BTreeMap<String, usize>,
}

/// The bus of a gateway in a cluster.
pub struct NatsBus {
    client: async_nats::Client,
    names: Names,
    local: Arc<dyn Local>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl NatsBus {
    pub fn new(client: async_nats::Client, names: Names, local: Arc<dyn Local>) -> Self {
        NatsBus {
            client,
            names,
            local,
        }
    }

    /// The messages on `subject` until `stop`; none, logged, if NATS refuses the
    /// subscription (`what` says what is lost).
    async fn until_stopped(
        &self,
        subject: String,
        what: &'static str,
        stop: CancellationToken,
    ) -> impl futures::Stream<Item = async_nats::Message> {
        let sub = match self.client.subscribe(subject.clone()).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, subject, "cannot subscribe: no {what}");
                None
            }
        };
        futures::stream::iter(sub)
            .flatten()
            .take_until(stop.cancelled_owned())
    }

    /// Hands room messages from NATS to local members until `stop`.
    async fn follow_rooms(&self, stop: CancellationToken) {
        let rooms = self.until_stopped(self.names.all_rooms(), "room messages", stop);
        let mut rooms = std::pin::pin!(rooms.await);
        while let Some(m) = rooms.next().await {
            let Some(room) = self.names.room_of(&m.subject) else {
                continue;
            };
            if !self.local.room_is_local(room) {
                continue;
            }
            let Ok(mut msg) = rmp_serde::from_slice::<RoomMessage>(&m.payload) else {
                tracing::debug!(room, "ignoring a room message that does not decode");
                continue;
            };
            msg.room = room.to_owned();
            self.local.deliver_room(msg);
        }
    }

    /// Answers presence queries from other gateways until `stop`.
    async fn answer_presence(&self, stop: CancellationToken) {
        let queries = self.until_stopped(self.names.presence(), "presence answers", stop);
        let mut queries = std::pin::pin!(queries.await);
        while let Some(msg) = queries.next().await {
            let (Some(reply), Ok(req)) =
                (msg.reply, serde_json::from_slice::<Request>(&msg.payload))
            else {
                continue;
            };
            let answer = Answer {
                counts: local_counts(self.local.as_ref(), &req.uids),
            };
            let body = serde_json::to_vec(&answer).expect("counts serialise");
            let _ = self.client.publish(reply, body.into()).await;
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish_room(&self, msg: RoomMessage) -> Result<(), StoreError> {
        if self.client.connection_state() != State::Connected {
            return Err(StoreError::Unavailable("NATS is not connected".into()));
        }
        let wire =
            rmp_serde::to_vec_named(&msg).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.client
            .publish(self.names.room(&msg.room), wire.into())
            .await
            .map_err(unavailable)
    }

    async fn presence(&self, uids: &[String]) -> Result<Presence, StoreError> {
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(unavailable)?;
        let body = serde_json::to_vec(&Request {
            uids: uids.to_vec(),
        })
        .expect("uids serialise");
        self.client
            .publish_with_reply(self.names.presence(), inbox, body.into())
            .await
            .map_err(unavailable)?;
        let mut total = Presence::default();
        let deadline = tokio::time::sleep(GATHER_WINDOW);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                m = answers.next() => {
                    let Some(m) = m else { break };
                    if let Ok(a) = serde_json::from_slice::<Answer>(&m.payload) {
                        total.gateways += 1;
                        for (uid, n) in a.counts {
                            *total.counts.entry(uid).or_insert(0) += n;
                        }
                    }
                }
                _ = &mut deadline => break,
            }
        }
        Ok(total)
    }

    async fn serve(&self, stop: CancellationToken) {
        tokio::join!(self.follow_rooms(stop.clone()), self.answer_presence(stop));
    }
}
