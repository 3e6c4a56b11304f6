//! The cluster bus on core NATS (nothing here is stored).
//!
//! - A room message travels once on `<prefix>.room.<rid>`; every gateway follows
//!   `<prefix>.room.*`, reads the room from the subject, and decodes only when someone here
//!   is in that room.
//! - A presence query is one request on `<prefix>.ctl.presence`, and a kick one on
//!   `<prefix>.ctl.kick`; every gateway (this one included) answers with its counts, and
//!   the asker sums what arrives within [`GATHER_WINDOW`]. There is no registry to ask.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_trait::async_trait;
use futures::StreamExt;
use imgate_proto::scratch::written;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{local_counts, Bus, BusError, Kicked, Local, Presence, RoomMessage};
use crate::auth::Revocations;
use crate::subjects::Names;

/// How long a presence query or a kick waits for gateways to answer.
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

#[derive(Debug, Serialize, Deserialize)]
struct KickRequest {
    uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// Refuse `uid`'s tokens issued at or before this (Unix seconds) before closing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoke: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct KickAnswer {
    /// Connections the answering gateway closed.
    closed: usize,
}

/// The bus of a gateway in a cluster.
pub struct NatsBus {
    client: async_nats::Client,
    names: Names,
    local: Arc<dyn Local>,
    /// This gateway's revocations, raised by kicks with `revoke` from any gateway.
    revocations: Arc<Revocations>,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl NatsBus {
    pub fn new(
        client: async_nats::Client,
        names: Names,
        local: Arc<dyn Local>,
        revocations: Arc<Revocations>,
    ) -> Self {
        NatsBus {
            client,
            names,
            local,
            revocations,
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

    /// Answers the requests on `subject` with `answer` until `stop`.
    async fn answer<Q, A>(
        &self,
        subject: String,
        what: &'static str,
        stop: CancellationToken,
        answer: impl Fn(Q) -> A,
    ) where
        Q: DeserializeOwned,
        A: Serialize,
    {
        let requests = self.until_stopped(subject, what, stop);
        let mut requests = std::pin::pin!(requests.await);
        while let Some(msg) = requests.next().await {
            let (Some(reply), Ok(req)) = (msg.reply, serde_json::from_slice::<Q>(&msg.payload))
            else {
                continue;
            };
            let body = serde_json::to_vec(&answer(req)).expect("answers serialise");
            let _ = self.client.publish(reply, body.into()).await;
        }
    }

    /// Publishes `request` on `subject` and collects the answers that arrive within
    /// [`GATHER_WINDOW`] (ones that do not decode are left out).
    async fn gather<A: DeserializeOwned>(
        &self,
        subject: String,
        request: &impl Serialize,
    ) -> Result<Vec<A>, BusError> {
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(unavailable)?;
        let body = serde_json::to_vec(request).expect("requests serialise");
        self.client
            .publish_with_reply(subject, inbox, body.into())
            .await
            .map_err(unavailable)?;
        let mut got = Vec::new();
        let deadline = tokio::time::sleep(GATHER_WINDOW);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                m = answers.next() => {
                    let Some(m) = m else { break };
                    if let Ok(a) = serde_json::from_slice::<A>(&m.payload) {
                        got.push(a);
                    }
                }
                _ = &mut deadline => break,
            }
        }
        Ok(got)
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish_room(&self, msg: RoomMessage) -> Result<(), BusError> {
        if self.client.connection_state() != State::Connected {
            return Err(BusError::Unavailable("NATS is not connected".into()));
        }
        let wire = written(|b| rmp_serde::encode::write_named(b, &msg))
            .map_err(|e| BusError::Internal(e.to_string()))?;
        self.client
            .publish(self.names.room(&msg.room), wire.into())
            .await
            .map_err(unavailable)
    }

    async fn presence(&self, uids: &[String]) -> Result<Presence, BusError> {
        let request = Request {
            uids: uids.to_vec(),
        };
        let answers: Vec<Answer> = self.gather(self.names.presence(), &request).await?;
        let mut total = Presence {
            gateways: answers.len(),
            ..Presence::default()
        };
        for (uid, n) in answers.into_iter().flat_map(|a| a.counts) {
            *total.counts.entry(uid).or_insert(0) += n;
        }
        Ok(total)
    }

    async fn kick(
        &self,
        uid: &str,
        device: Option<&str>,
        revoke: Option<u64>,
    ) -> Result<Kicked, BusError> {
        let request = KickRequest {
            uid: uid.to_owned(),
            device: device.map(str::to_owned),
            revoke,
        };
        let answers: Vec<KickAnswer> = self.gather(self.names.kick(), &request).await?;
        Ok(Kicked {
            closed: answers.iter().map(|a| a.closed).sum(),
            gateways: answers.len(),
        })
    }

    async fn serve(&self, stop: CancellationToken) {
        let (local, revocations) = (self.local.clone(), self.revocations.clone());
        let presence = self.answer(
            self.names.presence(),
            "presence answers",
            stop.clone(),
            |q: Request| Answer {
                counts: local_counts(local.as_ref(), &q.uids),
            },
        );
        let kicks = self.answer(
            self.names.kick(),
            "kicks",
            stop.clone(),
            |q: KickRequest| {
                if let Some(before) = q.revoke {
                    revocations.raise(&q.uid, before);
                }
                KickAnswer {
                    closed: local.kick(&q.uid, q.device.as_deref()),
                }
            },
        );
        tokio::join!(self.follow_rooms(stop), presence, kicks);
    }
}
