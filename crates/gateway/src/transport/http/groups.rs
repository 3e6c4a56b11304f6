//! The group endpoints (docs/protocol.md, "Groups"): `POST /v1/groups`,
//! `GET /v1/groups/{id}` and `POST /v1/groups/{id}/members`. The rules are
//! [`crate::delivery::groups`]'s; the store applies them inside its compare-and-set.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use imgate_proto::ids::is_valid_id;
use imgate_proto::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{json_body, with_status, Caller};
use crate::delivery::groups::{change, new_group};
use crate::refusal::Refusal;
use crate::state::Shared;
use crate::store::{ChangeError, Group};

#[derive(Debug, Deserialize)]
pub struct CreateGroup {
    id: String,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChangeMembers {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Serialize)]
struct GroupView<'a> {
    id: &'a str,
    owner: &'a str,
    members: &'a [String],
}

fn view(id: &str, g: &Group) -> Json<serde_json::Value> {
    Json(json!(GroupView {
        id,
        owner: &g.owner,
        members: &g.members
    }))
}

fn check_id(id: &str) -> Result<(), Refusal> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(Refusal::bad_id("group id"))
    }
}

/// `POST /v1/groups`
pub async fn create(
    State(shared): State<Arc<Shared>>,
    Caller(who): Caller,
    b: Result<Json<CreateGroup>, JsonRejection>,
) -> Result<Response, Refusal> {
    let req = json_body(b)?;
    check_id(&req.id)?;
    let group = new_group(&who.uid, &req.members, shared.cfg.limits.max_group)?;
    if !shared.store.create_group(&req.id, &group).await? {
        let exists = Refusal::new(ErrorCode::BadRequest, format!("group {:?} exists", req.id));
        return Ok(with_status(StatusCode::CONFLICT, exists));
    }
    Ok((StatusCode::CREATED, view(&req.id, &group)).into_response())
}

/// `GET /v1/groups/{id}`: members only.
pub async fn get(
    State(shared): State<Arc<Shared>>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Refusal> {
    check_id(&id)?;
    let g = shared
        .store
        .group(&id)
        .await?
        .ok_or_else(|| Refusal::new(ErrorCode::NotFound, format!("no group {id:?}")))?;
    if !g.members.contains(&who.uid) {
        return Err(Refusal::new(
            ErrorCode::NotMember,
            "only members may see a group",
        ));
    }
    Ok(view(&id, &g))
}

/// `POST /v1/groups/{id}/members`
pub async fn members(
    State(shared): State<Arc<Shared>>,
    Caller(who): Caller,
    Path(id): Path<String>,
    b: Result<Json<ChangeMembers>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Refusal> {
    check_id(&id)?;
    let req = json_body(b)?;
    let max = shared.cfg.limits.max_group;
    let apply = |g: &Group| change(g, &who.uid, &req.add, &req.remove, max);
    match shared.store.change_group(&id, &apply).await {
        Ok(g) => Ok(view(&id, &g)),
        Err(ChangeError::NotFound) => Err(Refusal::new(
            ErrorCode::NotFound,
            format!("no group {id:?}"),
        )),
        Err(ChangeError::Refused(r)) => Err(r),
        Err(ChangeError::Store(e)) => Err(e.into()),
    }
}
