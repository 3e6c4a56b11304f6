//! The extractors every HTTP handler shares, WebSocket upgrade and SSE included: the
//! caller's verified identity from `Authorization: Bearer` or `?token=`, and query strings
//! whose errors answer as JSON. Nothing here knows a route.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use imgate_proto::ErrorCode;
use serde::Deserialize;
use std::sync::Arc;

use crate::auth::{AuthError, Identity};
use crate::refusal::Refusal;
use crate::state::Shared;

/// A query string as the handler's type, or the API error (`bad_request`, JSON) saying
/// what is wrong with it; axum's own `Query` answers such errors in plain text.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Refusal> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| Refusal::new(ErrorCode::BadRequest, e.body_text()))
    }
}

/// The `?token=` of any query; the other parameters are the handler's.
#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    Some(t.trim().to_owned())
}

/// The verified caller of an HTTP endpoint, from `Authorization: Bearer` or `?token=`
/// (the header wins). Every authenticated handler takes it, so a token is checked in one
/// place.
pub struct Caller(pub Identity);

impl FromRequestParts<Arc<Shared>> for Caller {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> Result<Self, Refusal> {
        // A query that does not parse has no token here; the handler's own extractor
        // answers what is wrong with it.
        let query_token = || Query::<TokenQuery>::try_from_uri(&parts.uri).ok()?.0.token;
        let token = bearer(&parts.headers)
            .or_else(query_token)
            .ok_or_else(|| Refusal::new(ErrorCode::Unauthorized, AuthError::Missing.to_string()))?;
        shared
            .auth
            .verify(&token)
            .map(Caller)
            .map_err(|e| Refusal::new(ErrorCode::Unauthorized, e.to_string()))
    }
}
