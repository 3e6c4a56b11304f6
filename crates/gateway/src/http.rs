//! The HTTP listener's router: WebSocket upgrade, sending and polling, SSE, development
//! tokens, health, metrics, CORS and the chat page.
//!
//! Handlers translate between HTTP and the gateway; API errors are HTTP status plus
//! `{"code":…,"message":…}` with the codes of DESIGN section 4. Tokens in query strings
//! are never logged (there is no request logging of URLs here).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use imgate_proto::ids::is_valid_id;
use imgate_proto::ErrorCode;
use serde::Deserialize;
use serde_json::json;

use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::{AuthError, Identity};
use crate::session::Shared;

/// Lifetime of a token from `POST /v1/dev/token`.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// An API error: an error code and a sentence for people.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    status: Option<StatusCode>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            status: None,
        }
    }

    /// Answers with `status` instead of the code's usual one (409 for an existing group).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
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
        let status = self.status.unwrap_or_else(|| status_of(self.code));
        let mut r = (status, Json(body)).into_response();
        // Read back by `count_errors` for `imgate_errors_total`.
        r.extensions_mut().insert(self.code);
        r
    }
}

/// Counts every API error answer by its code.
async fn count_errors(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    if let Some(code) = r.extensions().get::<ErrorCode>() {
        shared.metrics.error(*code).increment(1);
    }
    r
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    Some(t.trim().to_owned())
}

/// Checks the token of a request: `Authorization: Bearer` or `?token=`.
pub fn authenticate(
    shared: &Shared,
    query_token: Option<&str>,
    headers: &HeaderMap,
) -> Result<Identity, ApiError> {
    let token = bearer(headers)
        .or_else(|| query_token.map(str::to_owned))
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, AuthError::Missing.to_string()))?;
    shared
        .auth
        .verify(&token)
        .map_err(|e| ApiError::new(ErrorCode::Unauthorized, e.to_string()))
}

pub fn router(shared: Arc<Shared>) -> Router {
    let mut r = Router::new()
        .route("/", get(|| async { Html(CHAT_HTML) }))
        .route(
            "/app.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], CHAT_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css")], CHAT_CSS) }),
        )
        .route("/v1/ws", get(crate::ws::upgrade))
        .route(
            "/v1/messages",
            post(crate::poll::post_message).get(crate::poll::poll),
        )
        .route("/v1/events", get(crate::sse::events))
        .route("/v1/presence", get(crate::presence::presence))
        .route("/v1/admin/messages", post(crate::poll::admin_message))
        .route("/v1/rooms/{id}/join", post(crate::rooms::join))
        .route("/v1/rooms/{id}/leave", post(crate::rooms::leave))
        .route("/v1/rooms/{id}/publish", post(crate::rooms::publish_http))
        .route("/v1/groups", post(crate::groups::create))
        .route("/v1/groups/{id}", get(crate::groups::get))
        .route("/v1/groups/{id}/members", post(crate::groups::members))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    if shared.auth.dev_mode() {
        r = r.route("/v1/dev/token", post(dev_token));
    }
    let cors = cors(&shared.cfg.cors_origin);
    let r = r
        .layer(DefaultBodyLimit::max(shared.cfg.max_frame))
        .layer(middleware::from_fn_with_state(shared.clone(), count_errors))
        .with_state(shared);
    match cors {
        Some(c) => r.layer(c),
        None => r,
    }
}

/// The chat page, embedded in the binary: no front-end build step.
const CHAT_HTML: &str = include_str!("../web/index.html");
const CHAT_JS: &str = include_str!("../web/app.js");
const CHAT_CSS: &str = include_str!("../web/style.css");

/// CORS for the configured origins; none (same origin only) by default.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let list: Vec<HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(list))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
            ])
            .max_age(Duration::from_secs(3600)),
    )
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(
            &shared.hub.stats,
            shared.cluster.as_ref().map(|c| &c.tail_stats),
        ),
    )
        .into_response()
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
