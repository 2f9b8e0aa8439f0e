//! Bridge's HTTP API.
//!
//! | route | scope | does |
//! | --- | --- | --- |
//! | `POST /v1/transfers` | `transfers:write` | creates a transfer (`Idempotency-Key` required), 202 with its status URL |
//! | `GET /v1/transfers/{id}` | `transfers:read` | current state and version |
//! | `GET /v1/transfers/{id}/history` | `transfers:read` | every version, in order |
//! | `GET /v1/transfers?investor=&fund=&state=&cursor=&limit=` | `transfers:read` | newest first, cursor pages |
//! | `GET /v1/investors/{id}/balance` | `transfers:read` | balance, held, available |
//! | `GET /v1/funds/{id}` | `transfers:read` | criteria, seats and capacity left, reserved and completed |
//! | `POST /v1/callbacks/{service}` | `callbacks` | a settlement callback from `investor` or `fund` (also signed) |
//! | `GET /v1/admin/dead-letters` | `admin` | every dead-letter topic, records per error class |
//! | `GET /v1/admin/dead-letters/{topic}?partition=&from_offset=&to_offset=` | `admin` | the records (up to 500) |
//! | `POST /v1/admin/dead-letters/{topic}/redrive` `{partition, from_offset, to_offset, dry_run}` | `admin` | back through the normal path |
//! | `GET`/`POST /v1/admin/notifications/subscriptions` | `admin` | list (with delivery counts) / create (a webhook's secret is in the reply, once) |
//! | `POST /v1/admin/notifications/subscriptions/{id}/enable`, `/disable` | `admin` | switch a target |
//! | `POST /v1/admin/notifications/redrive?subscription=` | `admin` | dead-lettered deliveries to the back of their queues |
//! | `GET /v1/reviews` | `operator` | the transfers in manual review, oldest first |
//! | `GET /v1/reviews/{id}` | `operator` | a transfer's story: history with actors, ledger, resolutions |
//! | `POST /v1/reviews/{id}/{retry,fail,refunded,complete}` `{reason, reference, new_attempt}` | `operator` | resolves it (`Idempotency-Key` honoured); 202 when it waits for a second operator |
//! | `POST /v1/reviews/resolutions/{id}/approve`, `/reject` `{reason}` | `operator` | four-eyes: a second operator approves (it runs) or turns it down |
//! | `GET /metrics` | `admin` | OpenMetrics text: the process's metrics, and open transfers per state (manual review among them), pending steps, outbox backlog, callbacks |
//! | `GET /openapi.json` | any | this API described (OpenAPI 3.1, generated from the code) |
//! | `/console/...` | `viewer`, `operator` or `admin` (signed in) | the operator console: HTML pages, a session cookie (`console/mod.rs`) |
//! | `GET /healthz` | none | the process is alive |
//! | `GET /readyz` | none | the database answers and no account service's circuit is open (503 names the service and why) |
//!
//! **Authentication.** `Authorization: Bearer brk_...` API keys (see
//! `auth.rs`), each with scopes and optionally bound to one investor, whose
//! key then sees and creates only that investor's transfers (another
//! investor's transfer reads as not found). Each key is rate limited.
//!
//! **Callbacks.** An account service that accepted a step as pending posts
//! its outcome when it settles, signed per Standard Webhooks with the secret
//! configured for that service (several during a rotation). The endpoint
//! checks the signature and the timestamp (five minutes either way), refuses
//! a `webhook-id` it has already handled (replay), and then runs the step
//! exactly as the settlement runner would: it asks the service for the
//! outcome under the step's idempotency key and applies it in the step's own
//! transaction, under the transfer's row lock. The callback is a signed
//! wake-up, not the source of truth: the service's answer under our key is,
//! so a forged or stale body cannot move money, and a callback racing the
//! runner's poll (or another copy of itself) finds the step applied and
//! changes nothing.
//!
//! Errors are RFC 9457 `application/problem+json` without internal detail.

// Handlers return a ready response as their error (the axum idiom); it is
// built once per failed request, so its size does not matter.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod auth;
pub mod bank_access;
pub mod console;
pub mod openapi;
pub mod responses;
pub mod reviews;
pub mod server;
pub mod transfers;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bridge_domain::Step;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use bridge_pipeline::message::TraceContext;
use bridge_pipeline::runner::StageContext;
use bridge_pipeline::stages::{self, Ask, Outcome, StageError};
use bridge_webhooks::{Secret, SignedHeaders};

/// The services that may call back, and the steps each one settles.
const SERVICES: [(&str, &[Step]); 2] = [("investor", &[Step::Withdrawal, Step::Refund]), ("fund", &[Step::Deposit])];

#[derive(Clone, Debug, Default)]
pub struct ApiConfig {
    /// Signing secrets per service (`investor`, `fund`). A service without
    /// secrets cannot call back.
    pub callback_secrets: HashMap<String, Vec<Secret>>,
    /// How far a callback's timestamp may be from our clock.
    pub callback_tolerance_secs: i64,
    /// Requests per second each API key may make, and the burst above it.
    pub rate_per_second: u32,
    pub rate_burst: u32,
    /// Accept JWT bearer tokens checked this way, besides API keys.
    pub jwt: Option<auth::JwtConfig>,
    /// Seals the signing secrets of webhook subscriptions created here.
    pub keyring: Option<Arc<bridge_secrets::Keyring>>,
    /// Operators a review resolution needs (2: four-eyes).
    pub review_approvals: u8,
    /// Where notification targets may point (public hosts, and the
    /// internal ones the operator lists).
    pub notify_outbound: Arc<bridge_notify::outbound::OutboundPolicy>,
    /// Failed authentications a client address (or a key prefix) may make
    /// per minute before it is refused with 429 for the rest of it.
    pub auth_failures_per_minute: u32,
}

impl ApiConfig {
    pub fn new() -> Self {
        Self {
            callback_secrets: HashMap::new(),
            callback_tolerance_secs: bridge_webhooks::DEFAULT_TOLERANCE_SECS,
            rate_per_second: 100,
            rate_burst: 200,
            jwt: None,
            keyring: None,
            review_approvals: 1,
            notify_outbound: Arc::default(),
            auth_failures_per_minute: 30,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    ctx: Arc<StageContext>,
    config: Arc<ApiConfig>,
    failures: Arc<auth::FailureLimiter>,
    limiter: auth::RateLimiter,
    /// The console's reader of the stages' consumer lag, made on first use.
    console_lag: Arc<std::sync::OnceLock<Result<Arc<bridge_pipeline::lag::LagReader>, String>>>,
}

pub fn router(ctx: Arc<StageContext>, config: ApiConfig) -> Router {
    let limiter = auth::rate_limiter(config.rate_per_second, config.rate_burst);
    let state = AppState {
        failures: Arc::new(auth::FailureLimiter::new(config.auth_failures_per_minute)),
        ctx,
        config: Arc::new(config),
        limiter,
        console_lag: Arc::default(),
    };
    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_document))
        .route("/v1/transfers", post(transfers::create).get(transfers::list))
        .route("/v1/transfers/{id}", get(transfers::get))
        .route("/v1/transfers/{id}/history", get(transfers::history))
        .route("/v1/investors/{id}/balance", get(transfers::balance))
        .route("/v1/funds/{id}", get(transfers::fund))
        .route("/v1/investors/{id}/history", get(transfers::investor_history))
        .route("/v1/investors/{id}/attributes", axum::routing::put(admin::set_investor_attributes))
        .route(
            "/v1/investors/{id}/bank-access",
            axum::routing::put(bank_access::put).get(bank_access::get).delete(bank_access::revoke),
        )
        .route("/v1/funds/{id}/history", get(transfers::fund_history))
        .route("/v1/callbacks/{service}", post(callback))
        .route("/v1/admin/dead-letters", get(admin::dead_letter_topics))
        .route("/v1/admin/dead-letters/{topic}", get(admin::dead_letters_in))
        .route("/v1/admin/dead-letters/{topic}/redrive", post(admin::redrive_dead_letters))
        .route("/v1/admin/notifications/subscriptions", get(admin::subscriptions).post(admin::subscribe))
        .route("/v1/admin/notifications/subscriptions/{id}/enable", post(admin::enable))
        .route("/v1/admin/notifications/subscriptions/{id}/disable", post(admin::disable))
        .route("/v1/admin/notifications/redrive", post(admin::redrive_notifications))
        .route("/v1/admin/audit", get(admin::audit_log))
        .route("/v1/reviews", get(reviews::list))
        .route("/v1/reviews/{id}", get(reviews::show))
        .route("/v1/reviews/{id}/{action}", post(reviews::resolve))
        .route("/v1/reviews/resolutions/{id}/approve", post(reviews::approve))
        .route("/v1/reviews/resolutions/{id}/reject", post(reviews::reject))
        // Requests are small JSON documents; anything larger is refused
        // before it is read.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::from_fn(require_json))
        .layer(axum::middleware::from_fn_with_state(state.clone(), audit))
        .layer(axum::middleware::map_response(as_problem))
        .layer(axum::middleware::map_response(no_store));
    // The console has its own error pages and headers (`console/mod.rs`).
    // A path neither serves is the API's: a problem document.
    api.merge(console::router())
        .fallback(|| async { no_store(problem(StatusCode::NOT_FOUND, "Not Found", "no such resource")).await })
        .with_state(state)
}

/// Liveness, readiness and the process's metrics, for processes that do not
/// serve the API (stages, relay, notifier), so an orchestrator can probe and
/// scrape them the same way.
pub fn health_router(ctx: Arc<StageContext>) -> Router {
    let config = ApiConfig::default();
    let limiter = auth::rate_limiter(config.rate_per_second, config.rate_burst);
    let state = AppState {
        failures: Arc::new(auth::FailureLimiter::new(config.auth_failures_per_minute)),
        ctx,
        config: Arc::new(config),
        limiter,
        console_lag: Arc::default(),
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(ready))
        // The process's own metrics, without credentials: this listener is
        // for the orchestrator and the scraper, not for clients.
        .route(
            "/metrics",
            get(|| async {
                ([("content-type", bridge_pipeline::metrics::CONTENT_TYPE)], bridge_pipeline::metrics::render())
            }),
        )
        .with_state(state)
}

/// Every error leaves as `application/problem+json`, including the ones
/// axum produces itself (malformed JSON or path, unknown route, wrong
/// method), and none carries internal detail.
/// The client's address, as the server loop recorded it (`unknown` for a
/// router served some other way).
pub(crate) fn peer_address(extensions: &axum::http::Extensions) -> String {
    extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |info| info.0.ip().to_string())
}

/// Who a request authenticated as: the audit middleware puts an empty slot
/// in the request, and the `Caller` extractor fills it.
#[derive(Clone, Default)]
pub(crate) struct AuditSlot(pub(crate) Arc<std::sync::Mutex<Option<String>>>);

/// Records every admin and operator action (a request that changes
/// something under `/v1/admin` or `/v1/reviews`, an investor's attributes
/// or bank access), whatever its outcome, in the append-only audit log.
async fn audit(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let audited = path.starts_with("/v1/admin/")
        || path.starts_with("/v1/reviews")
        || (path.starts_with("/v1/investors/") && (path.ends_with("/attributes") || path.ends_with("/bank-access")));
    if !audited || matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD) {
        return next.run(request).await;
    }
    let action = format!("{} {path}", request.method());
    let source = peer_address(request.extensions());
    let slot = AuditSlot::default();
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    // No such endpoint or method: nothing was done.
    if matches!(response.status(), StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED) {
        return response;
    }
    let actor = slot.0.lock().ok().and_then(|actor| actor.clone()).unwrap_or_else(|| "unauthenticated".to_owned());
    let outcome = response.status().as_u16().to_string();
    let recorded = match state.ctx.pool.acquire().await {
        Ok(mut conn) => bridge_store::audit::record(&mut conn, &actor, &action, "", &source, &outcome).await,
        Err(error) => Err(error.into()),
    };
    if let Err(error) = recorded {
        tracing::error!(error = %error, actor, action, outcome, "Could not write the audit record");
    }
    response
}

/// Bodies are JSON and must say so: one declared as anything else (a form,
/// plain text) is refused with 415 rather than parsed as JSON anyway.
async fn require_json(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = request.headers();
    let has_body = headers.contains_key("transfer-encoding")
        || headers
            .get("content-length")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|length| length.trim() != "0");
    let json = headers.get("content-type").and_then(|value| value.to_str().ok()).is_some_and(|value| {
        let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
    });
    if has_body && !json {
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported Media Type",
            "send the body as JSON with Content-Type: application/json",
        );
    }
    next.run(request).await
}

/// Answers carry account data and must not be kept by caches on the way.
async fn no_store(mut response: Response) -> Response {
    response.headers_mut().entry("cache-control").or_insert(axum::http::HeaderValue::from_static("no-store"));
    response
}

async fn as_problem(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get("content-type")
        .is_some_and(|value| value.as_bytes().starts_with(b"application/problem+json"));
    if !status.is_client_error() && !status.is_server_error() || is_problem {
        return response;
    }
    let title = status.canonical_reason().unwrap_or("Error");
    let mut replaced = problem(status, title, "the request could not be processed as sent");
    for name in ["allow", "retry-after", "www-authenticate"] {
        if let Some(value) = response.headers().get(name) {
            replaced.headers_mut().insert(name, value.clone());
        }
    }
    replaced
}

/// Alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Alive", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// The OpenAPI document; any valid credentials may read it.
/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses(
        (status = 200, description = "The OpenAPI document", body = serde_json::Value),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
async fn openapi_document(_caller: auth::Caller) -> Response {
    Json(openapi::document()).into_response()
}

pub(crate) fn unavailable() -> Response {
    problem(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable", "try again later")
}

/// Serves until `shutdown` is cancelled, within the default limits
/// (`server.rs`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    server::serve(listener, router, shutdown, server::ServerLimits::default()).await
}

pub(crate) fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    let body = json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail});
    (status, [("content-type", "application/problem+json")], body.to_string()).into_response()
}

/// Ready when the database answers and no account service's circuit is
/// open (one that refuses our credentials or configuration: the detail
/// says which and why).
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "Ready", body = String, content_type = "text/plain"),
    (status = 503, description = "The database does not answer, or an account service refuses our credentials", body = crate::responses::Problem, content_type = "application/problem+json")))]
async fn ready(State(state): State<AppState>) -> Response {
    if let Err(error) = database_answers(&state).await {
        tracing::warn!(error = %error, "Not ready: database unreachable");
        return problem(StatusCode::SERVICE_UNAVAILABLE, "Not ready", "the database does not answer");
    }
    let services = &state.ctx.services;
    let circuits =
        [("investor", services.investor.unavailable_because()), ("fund", services.fund.unavailable_because())];
    let open: Vec<String> = circuits
        .into_iter()
        .filter_map(|(service, reason)| reason.map(|reason| format!("the {service} account service: {reason}")))
        .collect();
    if !open.is_empty() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "Not ready", &format!("circuit open for {}", open.join("; ")));
    }
    "ready".into_response()
}

async fn database_answers(state: &AppState) -> bridge_store::Result<()> {
    let mut conn = state.ctx.pool.acquire().await?;
    bridge_store::gauges::read(&mut conn).await.map(|_| ())
}

/// The process's metrics and the database's figures, in the OpenMetrics
/// text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
        (status = 200, description = "Metrics", body = String, content_type = "application/openmetrics-text"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
async fn metrics(State(state): State<AppState>, caller: auth::Caller) -> Response {
    if let Err(response) = caller.require("admin") {
        return response;
    }
    let gauges = match state.ctx.pool.acquire().await {
        Ok(mut conn) => bridge_store::gauges::read(&mut conn).await,
        Err(error) => Err(error.into()),
    };
    let gauges = match gauges {
        Ok(gauges) => gauges,
        Err(error) => {
            tracing::warn!(error = %error, "Metrics unavailable");
            return problem(StatusCode::SERVICE_UNAVAILABLE, "Metrics unavailable", "the database does not answer");
        }
    };
    bridge_pipeline::metrics::database_gauges(&gauges);
    ([("content-type", bridge_pipeline::metrics::CONTENT_TYPE)], bridge_pipeline::metrics::render()).into_response()
}

/// The part of a callback body we read: which operation settled. Whatever
/// else it says is not trusted; the service is asked.
#[derive(Deserialize)]
struct CallbackBody {
    idempotency_key: String,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// A settlement callback from an account service (Standard Webhooks signed).
#[utoipa::path(post, path = "/v1/callbacks/{service}", tag = "callbacks",
    params(("service" = String, Path, description = "investor or fund"),
        ("webhook-id" = String, Header), ("webhook-timestamp" = String, Header), ("webhook-signature" = String, Header)),
    request_body(content = serde_json::Value, description = "At least the operation's idempotency_key"),
    responses(
        (status = 200, description = "Handled: applied, already_applied, still_pending or replayed", body = serde_json::Value),
        (status = 404, description = "No such service", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not an operation of ours", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
async fn callback(
    State(state): State<AppState>,
    caller: auth::Caller,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(response) = caller.require("callbacks") {
        return response;
    }
    let Some((service, steps)) = SERVICES.iter().find(|(name, _)| *name == service) else {
        return problem(StatusCode::NOT_FOUND, "Not found", "no such service");
    };
    let secrets = state.config.callback_secrets.get(*service).map(Vec::as_slice).unwrap_or_default();
    let signed = SignedHeaders {
        id: header(&headers, bridge_webhooks::ID_HEADER),
        timestamp: header(&headers, bridge_webhooks::TIMESTAMP_HEADER),
        signature: header(&headers, bridge_webhooks::SIGNATURE_HEADER),
    };
    let now = chrono::Utc::now().timestamp();
    let webhook_id = match bridge_webhooks::verify(secrets, signed, &body, now, state.config.callback_tolerance_secs) {
        Ok(id) => id.to_owned(),
        Err(error) => {
            bridge_pipeline::metrics::callback("refused");
            tracing::warn!(service, error = %error, "Callback refused");
            return problem(StatusCode::UNAUTHORIZED, "Unauthorized", "signature verification failed");
        }
    };
    let Ok(parsed) = serde_json::from_slice::<CallbackBody>(&body) else {
        bridge_pipeline::metrics::callback("refused");
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable", "body must be JSON with idempotency_key");
    };
    let Some((transfer_id, step)) =
        bridge_domain::ids::parse_idempotency_key(&parsed.idempotency_key).filter(|(_, step)| steps.contains(step))
    else {
        bridge_pipeline::metrics::callback("refused");
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable", "not an operation of ours at this service");
    };

    let recorded = match state.ctx.pool.acquire().await {
        Ok(mut conn) => bridge_store::callbacks::record(&mut conn, service, &webhook_id).await,
        Err(error) => Err(error.into()),
    };
    match recorded {
        Ok(true) => {}
        Ok(false) => {
            bridge_pipeline::metrics::callback("replayed");
            return (StatusCode::OK, Json(json!({"result": "replayed"}))).into_response();
        }
        Err(error) => {
            bridge_pipeline::metrics::callback("failed");
            tracing::warn!(error = %error, "Callback receipt not stored");
            return problem(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "try again later");
        }
    }

    let trace = TraceContext::continue_or_start(header(&headers, "traceparent"));
    let actor = bridge_store::transfers::Actor {
        name: format!("settlement callback from the {service} service"),
        note: String::new(),
        external_reference: Some(webhook_id.clone()),
    };
    let result = stages::settle_step(&state.ctx, transfer_id, step, &trace, Ask::Perform, Some(&actor)).await;
    let (status, result) = match result {
        Ok(Outcome::Applied) => {
            bridge_pipeline::metrics::callback("applied");
            (StatusCode::OK, "applied")
        }
        Ok(Outcome::Duplicate | Outcome::DeadLettered) => {
            bridge_pipeline::metrics::callback("already_applied");
            (StatusCode::OK, "already_applied")
        }
        // The service still says pending (the callback outran its own
        // books); the settlement runner keeps asking.
        Ok(Outcome::Deferred) => {
            bridge_pipeline::metrics::callback("still_pending");
            (StatusCode::OK, "still_pending")
        }
        Err(error) => {
            bridge_pipeline::metrics::callback("failed");
            tracing::warn!(transfer_id = %transfer_id, step = step.as_str(), error = %error, "Callback could not be applied now");
            // Forget the receipt so the sender's retry is handled.
            if let Ok(mut conn) = state.ctx.pool.acquire().await {
                let _ = bridge_store::callbacks::forget(&mut conn, service, &webhook_id).await;
            }
            let status = match error {
                StageError::Permanent { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            return problem(status, "Not applied", "the callback could not be applied; retry later");
        }
    };
    tracing::info!(transfer_id = %transfer_id, step = step.as_str(), result, "Settlement callback handled");
    (status, Json(json!({"result": result}))).into_response()
}
