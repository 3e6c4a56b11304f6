//! The HTTP listener: its router, and the helpers every handler shares (JSON bodies, the
//! HTTP send rate, refusals as HTTP answers); authentication and query strings are
//! [`crate::transport::extract`]'s, re-exported here.
//!
//! Handlers translate between HTTP and the gateway and decide nothing themselves:
//! [`messages`] (send, poll, history), [`groups`], [`rooms`], [`presence`] and [`reads`], with the
//! WebSocket upgrade and SSE in the sibling transports. A [`Refusal`] answers as the HTTP
//! status of its code plus `{"code":…,"message":…}` (docs/protocol.md, "HTTP API"). Health,
//! metrics, development tokens, CORS and the chat page are here. Tokens in query strings are
//! never logged (there is no request logging of URLs here).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
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

use crate::refusal::Refusal;
use crate::state::Shared;

pub use super::extract::{bearer, ApiQuery, Caller};

pub mod admin;
pub mod groups;
pub mod listener;
pub mod messages;
pub mod presence;
pub mod reads;
pub mod rooms;

/// Lifetime of a token from `POST /v1/dev/token`.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

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

/// A refusal as an HTTP answer: its code's status, and `{"code":…,"message":…}`.
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        with_status(status_of(self.code), self)
    }
}

/// 403 for a token without `role: admin` on an admin endpoint.
pub fn not_admin() -> Response {
    let r = Refusal::new(
        ErrorCode::Unauthorized,
        "an admin token (role: admin) is required",
    );
    with_status(StatusCode::FORBIDDEN, r)
}

/// A refusal answered with another status than its code's (409 for a group that exists,
/// 403 for a non-admin token on an admin endpoint).
pub fn with_status(status: StatusCode, r: Refusal) -> Response {
    let body = json!({"code": r.code, "message": r.message});
    let mut response = (status, Json(body)).into_response();
    // Read back by `count_errors` for `imgate_errors_total`.
    response.extensions_mut().insert(r.code);
    response
}

/// 404 for a path no route has, as every API error: JSON `{code, message}`.
async fn no_route(uri: axum::http::Uri) -> Refusal {
    Refusal::new(ErrorCode::NotFound, format!("no endpoint {}", uri.path()))
}

/// 405 for a method a route does not take.
async fn wrong_method(method: Method, uri: axum::http::Uri) -> Response {
    let r = Refusal::new(
        ErrorCode::BadRequest,
        format!("{} does not take {method}", uri.path()),
    );
    with_status(StatusCode::METHOD_NOT_ALLOWED, r)
}

/// A JSON request body, or the API error for it (413 when above the body limit).
pub fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, Refusal> {
    body.map(|Json(v)| v).map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::TooLarge
        } else {
            ErrorCode::BadRequest
        };
        Refusal::new(code, e.body_text())
    })
}

/// The per-uid send rate of the HTTP API (`--send-rate`, `--send-burst`).
pub fn check_http_rate(shared: &Shared, uid: &str) -> Result<(), Refusal> {
    match &shared.http.limiter {
        Some(l) if l.check_key(&uid.to_owned()).is_err() => Err(Refusal::rate_limited()),
        _ => Ok(()),
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

/// `GET /metrics` alone, for `--metrics-listen`.
pub fn metrics_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(shared)
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
        .route("/v1/sdk/imgate.js", get(sdk))
        .route("/v1/ws", get(super::ws::upgrade))
        .route(
            "/v1/messages",
            post(messages::post_message).get(messages::poll),
        )
        .route("/v1/events", get(super::sse::events))
        .route("/v1/presence", get(presence::presence))
        .route("/v1/read", post(reads::set).get(reads::get))
        .route("/v1/admin/messages", post(messages::admin_message))
        .route("/v1/admin/kick", post(admin::kick))
        .route("/v1/rooms/{id}/join", post(rooms::join))
        .route("/v1/rooms/{id}/leave", post(rooms::leave))
        .route("/v1/rooms/{id}/publish", post(rooms::publish))
        .route("/v1/groups", post(groups::create))
        .route("/v1/groups/{id}", get(groups::get))
        .route("/v1/groups/{id}/members", post(groups::members))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    if shared.cfg.listen.metrics_listen.is_none() {
        r = r.route("/metrics", get(metrics));
    }
    if shared.auth.dev_mode() {
        r = r.route("/v1/dev/token", post(dev_token));
    }
    let cors = cors(&shared.cfg.listen.cors_origin);
    let r = r
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(shared.cfg.limits.max_frame))
        .layer(middleware::from_fn_with_state(shared.clone(), count_errors))
        .with_state(shared);
    match cors {
        Some(c) => r.layer(c),
        None => r,
    }
}

/// The chat page, embedded in the binary: no front-end build step.
const CHAT_HTML: &str = include_str!("../../../web/index.html");
const CHAT_JS: &str = include_str!("../../../web/app.js");
const CHAT_CSS: &str = include_str!("../../../web/style.css");

/// The browser SDK (`sdk/js/imgate.js`), embedded in the binary like the chat page.
const SDK_JS: &str = include_str!("../../../../../sdk/js/imgate.js");

/// `GET /v1/sdk/imgate.js`: the SDK with an `ETag` of its content, so a browser revalidates
/// it cheaply (`304` while it has not changed) and never keeps an old one after an upgrade.
async fn sdk(headers: HeaderMap) -> Response {
    static ETAG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        use std::hash::{Hash, Hasher};
        // Fixed keys: the same content has the same tag on every gateway.
        let mut h = std::hash::DefaultHasher::new();
        SDK_JS.hash(&mut h);
        format!("\"sdk-{:016x}\"", h.finish())
    });
    let etag = ETAG.as_str();
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let common = [
        (header::ETAG, etag),
        (header::CACHE_CONTROL, "no-cache"),
        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
    ];
    if cached {
        (StatusCode::NOT_MODIFIED, common).into_response()
    } else {
        (common, SDK_JS).into_response()
    }
}

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
        shared.metrics.render(&shared.hub.stats),
    )
        .into_response()
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutdown.is_cancelled() {
        return Refusal::new(ErrorCode::Unavailable, "draining").into_response();
    }
    if !shared.store.ready().await {
        return Refusal::new(ErrorCode::Unavailable, "store unreachable").into_response();
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
    body: Result<Json<DevTokenRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Refusal> {
    let req = json_body(body)?;
    if !is_valid_id(&req.uid) {
        return Err(Refusal::bad_id("uid"));
    }
    let token = shared.auth.mint(&req.uid, DEV_TOKEN_TTL, req.admin);
    Ok(Json(json!({ "token": token })))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    /// A router on a memory-store gateway configured by `args`, with a token for alice.
    async fn app(args: &[&str]) -> (Router, Arc<Shared>, String) {
        let mut all = vec!["--store", "memory"];
        all.extend_from_slice(args);
        let cfg = crate::config::parse_for_test(&all);
        let shared = crate::server::Gateway::new(cfg).await.unwrap().shared();
        let token = shared.auth.mint("alice", Duration::from_secs(60), false);
        (router(shared.clone()), shared, token)
    }

    /// Calls `app` once; the status, and the `code` of an error body.
    async fn call(
        app: &Router,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, Option<String>) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Body::from(body.to_owned())).unwrap();
        let r = app.clone().oneshot(req).await.unwrap();
        let status = r.status();
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let code = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned));
        (status, code)
    }

    #[tokio::test]
    async fn the_sdk_is_served_with_an_etag_and_revalidates_to_304() {
        let (app, _, _) = app(&[]).await;
        let get = |etag: Option<String>| {
            let mut req = Request::builder().uri("/v1/sdk/imgate.js");
            if let Some(t) = etag {
                req = req.header(header::IF_NONE_MATCH, t);
            }
            app.clone().oneshot(req.body(Body::empty()).unwrap())
        };
        let r = get(None).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript"));
        let etag = r.headers()[header::ETAG].to_str().unwrap().to_owned();
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        assert!(std::str::from_utf8(&body)
            .unwrap()
            .contains("export class Imgate"));
        let again = get(Some(etag.clone())).await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(again.headers()[header::ETAG], etag.as_str());
        let other = get(Some("\"sdk-0\"".into())).await.unwrap();
        assert_eq!(other.status(), StatusCode::OK);
    }

    #[test]
    fn every_error_code_has_its_status() {
        let want = [
            (ErrorCode::Unauthorized, 401),
            (ErrorCode::BadRequest, 400),
            (ErrorCode::TooLarge, 413),
            (ErrorCode::RateLimited, 429),
            (ErrorCode::NotMember, 403),
            (ErrorCode::NotFound, 404),
            (ErrorCode::Unavailable, 503),
            (ErrorCode::Internal, 500),
        ];
        assert_eq!(
            want.len(),
            ErrorCode::ALL.len(),
            "a code without a status here"
        );
        for (code, status) in want {
            assert_eq!(status_of(code).as_u16(), status, "{code:?}");
            let r = Refusal::new(code, "no").into_response();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.extensions().get::<ErrorCode>(), Some(&code));
        }
    }

    #[tokio::test]
    async fn routes_answer_each_refusal_with_its_status_and_code() {
        let (app, shared, alice) = app(&[
            "--max-body",
            "64",
            "--max-frame",
            "1024",
            "--send-rate",
            "1",
            "--send-burst",
            "1",
        ])
        .await;
        let bob = shared.auth.mint("bob", Duration::from_secs(60), false);
        let post = Method::POST;
        let send = r#"{"to":"bob","body":{"text":"hi"}}"#;
        let code = |s: &str| Some(s.to_owned());

        assert_eq!(
            call(&app, Method::GET, "/healthz", None, "").await.0,
            StatusCode::OK
        );
        assert_eq!(
            call(&app, post.clone(), "/v1/messages", None, send).await,
            (StatusCode::UNAUTHORIZED, code("unauthorized"))
        );
        assert_eq!(
            call(
                &app,
                post.clone(),
                "/v1/messages",
                Some("forged.token.x"),
                send
            )
            .await,
            (StatusCode::UNAUTHORIZED, code("unauthorized"))
        );
        assert_eq!(
            call(
                &app,
                post.clone(),
                "/v1/messages",
                Some(&alice),
                "{not json"
            )
            .await,
            (StatusCode::BAD_REQUEST, code("bad_request"))
        );
        // Above the body limit of a message, and above the request limit (--max-frame).
        let big_body = format!(r#"{{"to":"bob","body":"{}"}}"#, "x".repeat(100));
        assert_eq!(
            call(&app, post.clone(), "/v1/messages", Some(&alice), &big_body).await,
            (StatusCode::PAYLOAD_TOO_LARGE, code("too_large"))
        );
        let big_request = format!(r#"{{"to":"bob","body":"{}"}}"#, "x".repeat(2000));
        assert_eq!(
            call(
                &app,
                post.clone(),
                "/v1/messages",
                Some(&alice),
                &big_request
            )
            .await,
            (StatusCode::PAYLOAD_TOO_LARGE, code("too_large"))
        );
        // The first send uses the burst of one; the next is over the rate.
        assert_eq!(
            call(&app, post.clone(), "/v1/messages", Some(&alice), send)
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            call(&app, post.clone(), "/v1/messages", Some(&alice), send).await,
            (StatusCode::TOO_MANY_REQUESTS, code("rate_limited"))
        );
        assert_eq!(
            call(&app, Method::GET, "/v1/groups/nope", Some(&alice), "").await,
            (StatusCode::NOT_FOUND, code("not_found"))
        );
        let group = r#"{"id":"g1","members":[]}"#;
        assert_eq!(
            call(&app, post.clone(), "/v1/groups", Some(&alice), group)
                .await
                .0,
            StatusCode::CREATED
        );
        assert_eq!(
            call(&app, post.clone(), "/v1/groups", Some(&alice), group).await,
            (StatusCode::CONFLICT, code("bad_request"))
        );
        assert_eq!(
            call(&app, Method::GET, "/v1/groups/g1", Some(&bob), "").await,
            (StatusCode::FORBIDDEN, code("not_member"))
        );
        assert_eq!(
            call(&app, post.clone(), "/v1/admin/messages", Some(&alice), send).await,
            (StatusCode::FORBIDDEN, code("unauthorized"))
        );
        assert_eq!(
            call(
                &app,
                Method::GET,
                "/v1/messages?device=a.b",
                Some(&alice),
                ""
            )
            .await,
            (StatusCode::BAD_REQUEST, code("bad_request"))
        );
        assert_eq!(
            call(&app, Method::GET, "/readyz", None, "").await.0,
            StatusCode::OK
        );
        shared.shutdown.cancel();
        assert_eq!(
            call(&app, Method::GET, "/readyz", None, "").await,
            (StatusCode::SERVICE_UNAVAILABLE, code("unavailable"))
        );
        let metrics = call(&app, Method::GET, "/metrics", None, "").await;
        assert_eq!(metrics.0, StatusCode::OK);
    }

    /// Every API error is JSON `{code, message}`: query strings that do not parse, paths no
    /// route has, methods a route does not take, a zero `limit`, a bad SSE device.
    #[tokio::test]
    async fn query_path_and_method_errors_answer_json() {
        let (app, _, alice) = app(&[]).await;
        let get = Method::GET;
        let bad = Some("bad_request".to_owned());
        for uri in [
            "/v1/messages?after=-1",
            "/v1/messages?wait=abc",
            "/v1/messages?after=1&after=2",
            "/v1/messages?limit=0",
            "/v1/messages?before=&limit=0",
            "/v1/presence",
            "/v1/events?device=a.b",
            "/v1/events?after=x:y:z",
            "/v1/ws?resume=minus",
            "/v1/rooms/r1/join?device=a.b",
        ] {
            let method = if uri.contains("/join") {
                Method::POST
            } else {
                get.clone()
            };
            let (status, code) = call(&app, method, uri, Some(&alice), "").await;
            assert_eq!(
                (status, code),
                (StatusCode::BAD_REQUEST, bad.clone()),
                "{uri}"
            );
        }
        assert_eq!(
            call(&app, get.clone(), "/v1/nothing-here", Some(&alice), "").await,
            (StatusCode::NOT_FOUND, Some("not_found".to_owned()))
        );
        assert_eq!(
            call(&app, Method::DELETE, "/v1/messages", Some(&alice), "").await,
            (StatusCode::METHOD_NOT_ALLOWED, bad.clone())
        );
        // One message is stored, and `limit=1` still returns it.
        let send = r#"{"to":"bob","body":{"text":"hi"}}"#;
        call(&app, Method::POST, "/v1/messages", Some(&alice), send).await;
        assert_eq!(
            call(&app, get, "/v1/messages?after=0&limit=1", Some(&alice), "")
                .await
                .0,
            StatusCode::OK
        );
    }

    /// Publishing to a room over HTTP needs the device to have joined it, as over a
    /// connection.
    #[tokio::test]
    async fn http_room_publish_needs_a_join() {
        let (app, _, alice) = app(&[]).await;
        let body = r#"{"body":{"text":"hi"}}"#;
        let post = |uri: &'static str, body: &'static str| {
            let (app, alice) = (app.clone(), alice.clone());
            async move { call(&app, Method::POST, uri, Some(&alice), body).await }
        };
        let not_member = (StatusCode::FORBIDDEN, Some("not_member".to_owned()));
        assert_eq!(post("/v1/rooms/zz2/publish", body).await, not_member);
        assert_eq!(
            post("/v1/rooms/zz2/join?device=d", "").await.0,
            StatusCode::OK
        );
        assert_eq!(
            post("/v1/rooms/zz2/publish", body).await,
            not_member,
            "another device of the same user has not joined"
        );
        assert_eq!(
            post("/v1/rooms/zz2/publish?device=d", body).await.0,
            StatusCode::OK
        );
        post("/v1/rooms/zz2/leave?device=d", "").await;
        assert_eq!(
            post("/v1/rooms/zz2/publish?device=d", body).await,
            not_member
        );
    }

    /// Presence is any user's to ask (an app shows who is online); docs/security.md says
    /// so. Without a token it is refused.
    #[tokio::test]
    async fn presence_is_for_any_authenticated_user() {
        let (app, _, alice) = app(&[]).await;
        let (status, _) = call(&app, Method::GET, "/v1/presence?uid=bob", Some(&alice), "").await;
        assert_eq!(status, StatusCode::OK);
        let (status, code) = call(&app, Method::GET, "/v1/presence?uid=bob", None, "").await;
        assert_eq!(
            (status, code.as_deref()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized"))
        );
    }
}
