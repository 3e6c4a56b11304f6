//! The HTTP listener's router: WebSocket upgrade, development tokens, health.
//!
//! Handlers translate between HTTP and the gateway; API errors are HTTP status plus
//! `{"code":…,"message":…}` with the codes of DESIGN section 4. Tokens in query strings
//! are never logged (there is no request logging of URLs here).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use imgate_proto::ids::is_valid_id;
use imgate_proto::ErrorCode;
use serde::Deserialize;
use serde_json::json;

use crate::session::Shared;

/// Lifetime of a token from `POST /v1/dev/token`.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// An API error: an error code and a sentence for people.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// The HTTP status of each error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::NotMember => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"code": self.code, "message": self.message});
        (status_of(self.code), Json(body)).into_response()
    }
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    Some(t.trim().to_owned())
}

pub fn router(shared: Arc<Shared>) -> Router {
    let mut r = Router::new()
        .route("/v1/ws", get(crate::ws::upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    if shared.auth.dev_mode() {
        r = r.route("/v1/dev/token", post(dev_token));
    }
    r.with_state(shared)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutdown.is_cancelled() {
        return ApiError::new(ErrorCode::Unavailable, "draining").into_response();
    }
    if !shared.store.ready().await {
        return ApiError::new(ErrorCode::Unavailable, "store unreachable").into_response();
    }
    "ready".into_response()
}

#[derive(Deserialize)]
struct DevTokenRequest {
    uid: String,
    #[serde(default)]
    admin: bool,
}

async fn dev_token(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<DevTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    if !is_valid_id(&req.uid) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "uid must match ^[A-Za-z0-9_-]{1,64}$",
        ));
    }
    let token = shared.auth.mint(&req.uid, DEV_TOKEN_TTL, req.admin);
    Ok(Json(json!({ "token": token })))
}
