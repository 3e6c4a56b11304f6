//! `GET /v1/presence?uid=a,b`: which of these users have connections now, and how many,
//! across the cluster.
//!
//! There is no registry to ask: the bus asks every gateway (in cluster mode, one request
//! that every gateway answers within a short window; standalone, this gateway's own
//! counts).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use imgate_proto::ids::{is_valid_id, ID_PATTERN};
use imgate_proto::ErrorCode;
use serde::Deserialize;
use serde_json::json;

use super::{ApiQuery, Caller};
use crate::refusal::Refusal;
use crate::state::Shared;

/// Most uids one query may name.
const MAX_UIDS: usize = 100;

#[derive(Debug, Deserialize)]
pub struct PresenceQuery {
    uid: String,
}

/// The handler.
pub async fn presence(
    State(shared): State<Arc<Shared>>,
    Caller(_): Caller,
    ApiQuery(q): ApiQuery<PresenceQuery>,
) -> Result<Json<serde_json::Value>, Refusal> {
    let uids: Vec<String> = q.uid.split(',').map(str::to_owned).collect();
    if uids.len() > MAX_UIDS || !uids.iter().all(|u| is_valid_id(u)) {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            format!("uid is a comma-separated list of at most {MAX_UIDS} ids {ID_PATTERN}"),
        ));
    }
    let found = shared.bus.presence(&uids).await?;
    let presence: serde_json::Map<String, serde_json::Value> = uids
        .iter()
        .map(|u| {
            let n = found.counts.get(u).copied().unwrap_or(0);
            (u.clone(), json!({"online": n > 0, "connections": n}))
        })
        .collect();
    Ok(Json(
        json!({"presence": presence, "gateways": found.gateways}),
    ))
}
