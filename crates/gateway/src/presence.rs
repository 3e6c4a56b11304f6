//! `GET /v1/presence?uid=a,b`: which of these users have connections now, and how many,
//! across the cluster.
//!
//! There is no registry to ask. In cluster mode the gateway publishes one request on
//! `<prefix>.ctl.presence` and sums the answers every gateway (itself included) sends within
//! a short window; in standalone mode it counts its own connections.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use futures::StreamExt;
use imgate_proto::ids::is_valid_id;
use imgate_proto::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::http::{authenticate, ApiError};
use crate::hub::Hub;
use crate::session::Shared;
use crate::store::nats::NatsStore;

/// How long a presence query waits for gateways to answer.
pub const GATHER_WINDOW: Duration = Duration::from_millis(250);
/// Most uids one query may name.
const MAX_UIDS: usize = 100;

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    uids: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Answer {
    /// Connections per uid on the answering gateway (uids with none left out).
    counts: BTreeMap<String, usize>,
}

fn local_counts(hub: &Hub, uids: &[String]) -> Answer {
    Answer {
        counts: uids
            .iter()
            .map(|u| (u.clone(), hub.connections_of(u)))
            .filter(|(_, n)| *n > 0)
            .collect(),
    }
}

/// Answers presence queries from other gateways until `stop`.
pub async fn answer_queries(nats: Arc<NatsStore>, hub: Arc<Hub>, stop: CancellationToken) {
    let subject = format!("{}.ctl.presence", nats.names().prefix);
    let mut sub = match nats.client().subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, subject, "cannot answer presence queries");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = stop.cancelled() => return,
        };
        let Some(msg) = msg else { return };
        let (Some(reply), Ok(req)) = (msg.reply, serde_json::from_slice::<Request>(&msg.payload))
        else {
            continue;
        };
        let answer = local_counts(&hub, &req.uids);
        let body = serde_json::to_vec(&answer).expect("counts serialise");
        let _ = nats.client().publish(reply, body.into()).await;
    }
}

#[derive(Debug, Deserialize)]
pub struct PresenceQuery {
    token: Option<String>,
    uid: String,
}

/// The handler.
pub async fn presence(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<PresenceQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authenticate(&shared, q.token.as_deref(), &headers)?;
    let uids: Vec<String> = q.uid.split(',').map(str::to_owned).collect();
    if uids.len() > MAX_UIDS || !uids.iter().all(|u| is_valid_id(u)) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "uid is a comma-separated list of at most {MAX_UIDS} ids ^[A-Za-z0-9_-]{{1,64}}$"
            ),
        ));
    }
    let (totals, gateways) = match &shared.cluster {
        None => (local_counts(&shared.hub, &uids).counts, 1),
        Some(nats) => gather(nats, &uids).await?,
    };
    let presence: serde_json::Map<String, serde_json::Value> = uids
        .iter()
        .map(|u| {
            let n = totals.get(u).copied().unwrap_or(0);
            (u.clone(), json!({"online": n > 0, "connections": n}))
        })
        .collect();
    Ok(Json(json!({"presence": presence, "gateways": gateways})))
}

/// Asks every gateway and sums what arrives within the window.
async fn gather(
    nats: &NatsStore,
    uids: &[String],
) -> Result<(BTreeMap<String, usize>, usize), ApiError> {
    let unavailable =
        |e: &dyn std::fmt::Display| ApiError::new(ErrorCode::Unavailable, e.to_string());
    let client = nats.client();
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| unavailable(&e))?;
    let body = serde_json::to_vec(&Request {
        uids: uids.to_vec(),
    })
    .expect("uids serialise");
    client
        .publish_with_reply(
            format!("{}.ctl.presence", nats.names().prefix),
            inbox,
            body.into(),
        )
        .await
        .map_err(|e| unavailable(&e))?;
    let mut totals = BTreeMap::new();
    let mut gateways = 0;
    let deadline = tokio::time::sleep(GATHER_WINDOW);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            m = answers.next() => {
                let Some(m) = m else { break };
                if let Ok(a) = serde_json::from_slice::<Answer>(&m.payload) {
                    gateways += 1;
                    for (uid, n) in a.counts {
                        *totals.entry(uid).or_insert(0) += n;
                    }
                }
            }
            _ = &mut deadline => break,
        }
    }
    Ok((totals, gateways))
}
