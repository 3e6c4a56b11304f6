//! `POST /v1/admin/kick`: an operator closes a user's connections on every gateway.
//!
//! The handler checks the admin token and the ids, and asks the bus; the bus reaches each
//! gateway's registry. With `"revoke": true` the revocation is stored (durable, so it
//! survives restarts and reaches gateways started later) and raised here before the kick,
//! and the kick carries it to every gateway that answers, before any connection closes.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use imgate_proto::ids::is_valid_id;
use serde::Deserialize;
use serde_json::json;

use super::{json_body, not_admin, Caller};
use crate::auth::unix_now;
use crate::refusal::Refusal;
use crate::state::Shared;

#[derive(Debug, Deserialize)]
pub struct KickBody {
    uid: String,
    device: Option<String>,
    #[serde(default)]
    revoke: bool,
}

/// Closes the connections of `uid` (of one `device` when given) with `bye kicked` on every
/// gateway that answers, and says how many: `{"closed":N,"gateways":G}`.
pub async fn kick(
    State(shared): State<Arc<Shared>>,
    Caller(id): Caller,
    body: Result<Json<KickBody>, JsonRejection>,
) -> Result<Response, Refusal> {
    if !id.admin {
        return Ok(not_admin());
    }
    let k = json_body(body)?;
    if !is_valid_id(&k.uid) || !k.device.as_deref().is_none_or(is_valid_id) {
        return Err(Refusal::bad_id("uid and device"));
    }
    let revoke = match k.revoke {
        true => {
            let before = unix_now();
            shared.store.revoke(&k.uid, before).await?;
            shared.auth.revocations().raise(&k.uid, before);
            Some(before)
        }
        false => None,
    };
    let kicked = shared.bus.kick(&k.uid, k.device.as_deref(), revoke).await?;
    let mut answer = json!({"closed": kicked.closed, "gateways": kicked.gateways});
    if let Some(before) = revoke {
        answer["revoked_before"] = json!(before);
    }
    Ok(Json(answer).into_response())
}
