//! Groups (DESIGN section 5b): persistent membership, the rules for changing it, and the
//! HTTP endpoints that create, read and change groups.
//!
//! The rules are pure functions over [`Group`], so both stores apply them the same way
//! inside their own compare-and-set; this module never touches a socket or a store format.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use imgate_proto::ids::is_valid_id;
use imgate_proto::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::{authenticate, ApiError};
use crate::poll::{json_body, TokenQuery};
use crate::session::Shared;
use crate::store::{ChangeError, Group};

/// Why a membership change is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// A new group: the creator is owner and member; ids are checked; at most `max` members.
pub fn new_group(owner: &str, members: &[String], max: usize) -> Result<Group, Refusal> {
    let mut all = vec![owner.to_owned()];
    for m in members {
        if !is_valid_id(m) {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("member {m:?} is not a valid uid"),
            ));
        }
        if !all.contains(m) {
            all.push(m.clone());
        }
    }
    if all.len() > max {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!(
                "a group has at most {max} members (--max-group); this one would have {}",
                all.len()
            ),
        ));
    }
    Ok(Group {
        owner: owner.to_owned(),
        members: all,
    })
}

/// Applies `{"add":[…],"remove":[…]}` asked by `by`: the owner adds and removes anyone but
/// itself; any member may remove itself; nobody else may change anything.
pub fn change(
    g: &Group,
    by: &str,
    add: &[String],
    remove: &[String],
    max: usize,
) -> Result<Group, Refusal> {
    if !g.members.iter().any(|m| m == by) {
        return Err(refuse(
            ErrorCode::NotMember,
            "only members may change a group",
        ));
    }
    let leaving_only = add.is_empty() && remove.iter().all(|r| r == by);
    if by != g.owner && !leaving_only {
        return Err(refuse(
            ErrorCode::NotMember,
            "only the owner adds or removes others; a member may remove itself",
        ));
    }
    if remove.iter().any(|r| r == &g.owner) {
        return Err(refuse(ErrorCode::BadRequest, "the owner cannot be removed"));
    }
    for id in add.iter().chain(remove) {
        if !is_valid_id(id) {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("{id:?} is not a valid uid"),
            ));
        }
    }
    let mut members: Vec<String> = g
        .members
        .iter()
        .filter(|m| !remove.contains(m))
        .cloned()
        .collect();
    for a in add {
        if !members.contains(a) {
            members.push(a.clone());
        }
    }
    if members.len() > max {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!(
                "a group has at most {max} members (--max-group); this change would make {}",
                members.len()
            ),
        ));
    }
    Ok(Group {
        owner: g.owner.clone(),
        members,
    })
}

// --- HTTP ----------------------------------------------------------------------------

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

fn store_err(e: crate::store::StoreError) -> ApiError {
    ApiError::new(e.code(), e.to_string())
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::BadRequest,
            "group id must match ^[A-Za-z0-9_-]{1,64}$",
        ))
    }
}

/// `POST /v1/groups`
pub async fn create(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    b: Result<Json<CreateGroup>, JsonRejection>,
) -> Result<Response, ApiError> {
    let who = authenticate(&shared, q.token.as_deref(), &headers)?;
    let req = json_body(b)?;
    check_id(&req.id)?;
    let group = new_group(&who.uid, &req.members, shared.cfg.max_group)
        .map_err(|r| ApiError::new(r.code, r.message))?;
    if !shared
        .store
        .create_group(&req.id, &group)
        .await
        .map_err(store_err)?
    {
        return Err(
            ApiError::new(ErrorCode::BadRequest, format!("group {:?} exists", req.id))
                .with_status(StatusCode::CONFLICT),
        );
    }
    Ok((StatusCode::CREATED, view(&req.id, &group)).into_response())
}

/// `GET /v1/groups/{id}`: members only.
pub async fn get(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = authenticate(&shared, q.token.as_deref(), &headers)?;
    check_id(&id)?;
    let g = shared
        .store
        .group(&id)
        .await
        .map_err(store_err)?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no group {id:?}")))?;
    if !g.members.contains(&who.uid) {
        return Err(ApiError::new(
            ErrorCode::NotMember,
            "only members may see a group",
        ));
    }
    Ok(view(&id, &g))
}

/// `POST /v1/groups/{id}/members`
pub async fn members(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    Path(id): Path<String>,
    b: Result<Json<ChangeMembers>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = authenticate(&shared, q.token.as_deref(), &headers)?;
    check_id(&id)?;
    let req = json_body(b)?;
    let max = shared.cfg.max_group;
    let apply = |g: &Group| change(g, &who.uid, &req.add, &req.remove, max);
    match shared.store.change_group(&id, &apply).await {
        Ok(g) => Ok(view(&id, &g)),
        Err(ChangeError::NotFound) => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no group {id:?}"),
        )),
        Err(ChangeError::Refused(r)) => Err(ApiError::new(r.code, r.message)),
        Err(ChangeError::Store(e)) => Err(store_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn creation_and_changes_follow_the_rules() {
        let g = new_group("ann", &ids(&["bob", "cat", "bob"]), 10).unwrap();
        assert_eq!(g.members, ids(&["ann", "bob", "cat"]));
        assert_eq!(
            new_group("ann", &ids(&["b.b"]), 10).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert!(
            new_group("ann", &ids(&["a", "b"]), 2).is_err(),
            "owner counts towards the limit"
        );

        let added = change(&g, "ann", &ids(&["dan"]), &[], 10).unwrap();
        assert_eq!(added.members, ids(&["ann", "bob", "cat", "dan"]));
        let left = change(&g, "bob", &[], &ids(&["bob"]), 10).unwrap();
        assert_eq!(left.members, ids(&["ann", "cat"]));
        assert_eq!(
            change(&g, "bob", &[], &ids(&["cat"]), 10).unwrap_err().code,
            ErrorCode::NotMember
        );
        assert_eq!(
            change(&g, "bob", &ids(&["eve"]), &[], 10).unwrap_err().code,
            ErrorCode::NotMember
        );
        assert_eq!(
            change(&g, "eve", &[], &ids(&["eve"]), 10).unwrap_err().code,
            ErrorCode::NotMember
        );
        assert_eq!(
            change(&g, "ann", &[], &ids(&["ann"]), 10).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            change(&g, "ann", &ids(&["x", "y"]), &[], 4)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
    }
}
