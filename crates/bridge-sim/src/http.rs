//! The simulator over HTTP, shaped like a payment provider's API.
//!
//! | route | does |
//! | --- | --- |
//! | `POST /investor/v1/withdrawals` | debit an investor's account; from an account linked with a consent, only with a valid `Bank-Access` token of that account (else declined `BANK_ACCESS_EXPIRED` or `BANK_ACCESS_INVALID`) |
//! | `POST /investor/v1/refunds` | credit it back |
//! | `POST /fund/v1/remittances` | credit a fund account |
//! | `GET /{service}/v1/operations/{key}` | the result stored under an idempotency key |
//! | `GET /{service}/v1/operations?after={key}&limit={n}` | the service's operations by idempotency key, a page at a time (up to 1,000; pass the last key as `after` for the next page) |
//! | `POST /{service}/v1/operations/{key}/cancel` | void the operation unless it settled (body as for the operation) |
//! | `GET /fund/v1/funds/{id}` | a fund's terms: currency, minimum investment, seats, capacity, rules |
//! | `GET /healthz` | liveness |
//!
//! Money-moving calls need an `Idempotency-Key` header and, when the server
//! has a token, `Authorization: Bearer <token>`. Replies: 201 settled, 202
//! pending (settles later; ask again or look the key up), 402
//! declined (with a code), 409 key reused with another body, 429 rate
//! limited (with `Retry-After`), 503 unavailable, 504 after hanging, and 502
//! when the operation was carried out but the reply was lost on the way.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{Bank, Operation, OperationRequest, Reply, Service};

#[derive(Clone)]
struct AppState {
    bank: Arc<Bank>,
    token: Option<String>,
}

pub fn router(bank: Arc<Bank>, token: Option<String>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/investor/v1/withdrawals", post(withdraw))
        .route("/investor/v1/refunds", post(refund))
        .route("/fund/v1/remittances", post(remit))
        .route("/investor/v1/operations", get(investor_operations))
        .route("/fund/v1/operations", get(fund_operations))
        .route("/investor/v1/operations/{key}", get(lookup))
        .route("/fund/v1/operations/{key}", get(lookup))
        .route("/fund/v1/funds/{id}", get(fund_terms))
        .route("/investor/v1/operations/{key}/cancel", post(cancel_withdrawal))
        .route("/fund/v1/operations/{key}/cancel", post(cancel_remittance))
        .with_state(AppState { bank, token })
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    (
        status,
        [("content-type", "application/problem+json")],
        Json(json!({"status": status.as_u16(), "code": code, "detail": detail})),
    )
        .into_response()
}

fn authorised(state: &AppState, headers: &HeaderMap) -> bool {
    match &state.token {
        None => true,
        Some(token) => headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())),
    }
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len() && left.iter().zip(right).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn execute(state: AppState, operation: Operation, headers: HeaderMap, mut request: OperationRequest) -> Response {
    if !authorised(&state, &headers) {
        return problem(StatusCode::UNAUTHORIZED, "unauthorised", "missing or wrong bearer token");
    }
    let Some(key) = headers.get("idempotency-key").and_then(|value| value.to_str().ok()).filter(|key| !key.is_empty())
    else {
        return problem(StatusCode::BAD_REQUEST, "idempotency_key_required", "Idempotency-Key header is required");
    };
    if request.amount_minor <= 0 {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_amount", "amount_minor must be positive");
    }
    request.bank_access = headers.get("bank-access").and_then(|value| value.to_str().ok()).map(str::to_owned);
    reply(state.bank.execute(operation, key, &request).await)
}

fn reply(reply: Reply) -> Response {
    match reply {
        Reply::Done(record) if record.status == "settled" => (StatusCode::CREATED, Json(record)).into_response(),
        Reply::Done(record) if record.status == "pending" => (StatusCode::ACCEPTED, Json(record)).into_response(),
        Reply::Done(record) => (StatusCode::PAYMENT_REQUIRED, Json(record)).into_response(),
        Reply::IdempotencyConflict => {
            problem(StatusCode::CONFLICT, "idempotency_key_reused", "this key was used with a different request")
        }
        Reply::RateLimited => {
            let mut response = problem(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down");
            response.headers_mut().insert("retry-after", "1".parse().expect("static header"));
            response
        }
        Reply::ServerError => problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "try again later"),
        Reply::TimedOut => problem(StatusCode::GATEWAY_TIMEOUT, "timeout", "upstream timed out"),
        Reply::ReplyLost(_) => problem(StatusCode::BAD_GATEWAY, "bad_gateway", "upstream reply lost"),
        Reply::Unavailable(detail) => problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &detail),
        Reply::UnknownAccount => problem(StatusCode::NOT_FOUND, "unknown_account", "no such account"),
    }
}

async fn cancel(
    state: AppState,
    operation: Operation,
    headers: HeaderMap,
    key: String,
    request: OperationRequest,
) -> Response {
    if !authorised(&state, &headers) {
        return problem(StatusCode::UNAUTHORIZED, "unauthorised", "missing or wrong bearer token");
    }
    reply(state.bank.cancel(operation, &key, &request).await)
}

async fn cancel_withdrawal(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Json(request): Json<OperationRequest>,
) -> Response {
    cancel(state, Operation::Withdrawal, headers, key, request).await
}

async fn cancel_remittance(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Json(request): Json<OperationRequest>,
) -> Response {
    cancel(state, Operation::Deposit, headers, key, request).await
}

async fn withdraw(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(request): Json<OperationRequest>,
) -> Response {
    execute(state, Operation::Withdrawal, headers, request).await
}

async fn refund(State(state): State<AppState>, headers: HeaderMap, Json(request): Json<OperationRequest>) -> Response {
    execute(state, Operation::Refund, headers, request).await
}

async fn remit(State(state): State<AppState>, headers: HeaderMap, Json(request): Json<OperationRequest>) -> Response {
    execute(state, Operation::Deposit, headers, request).await
}

async fn fund_terms(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !authorised(&state, &headers) {
        return problem(StatusCode::UNAUTHORIZED, "unauthorised", "missing or wrong bearer token");
    }
    match state.bank.fund_terms(&id).await {
        Ok(Some(terms)) => Json(json!({
            "fund_id": id,
            "currency": terms.currency,
            "minimum_investment_minor": terms.minimum_investment_minor,
            "seats_max": terms.seats_max,
            "capacity_minor": terms.capacity_minor,
            "rules": terms.rules,
        }))
        .into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "not_found", "no such fund"),
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &error.to_string()),
    }
}

async fn lookup(State(state): State<AppState>, headers: HeaderMap, Path(key): Path<String>) -> Response {
    if !authorised(&state, &headers) {
        return problem(StatusCode::UNAUTHORIZED, "unauthorised", "missing or wrong bearer token");
    }
    match state.bank.lookup(&key).await {
        Ok(Some(record)) => (StatusCode::OK, Json(record)).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "not_found", "no operation under this key"),
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &error.to_string()),
    }
}

/// A page of a service's operations.
#[derive(serde::Deserialize)]
struct Page {
    #[serde(default)]
    after: String,
    limit: Option<usize>,
}

const PAGE_MAX: usize = 1_000;

async fn investor_operations(State(state): State<AppState>, headers: HeaderMap, Query(page): Query<Page>) -> Response {
    operations(state, Service::Investor, headers, page).await
}

async fn fund_operations(State(state): State<AppState>, headers: HeaderMap, Query(page): Query<Page>) -> Response {
    operations(state, Service::Fund, headers, page).await
}

async fn operations(state: AppState, service: Service, headers: HeaderMap, page: Page) -> Response {
    if !authorised(&state, &headers) {
        return problem(StatusCode::UNAUTHORIZED, "unauthorised", "missing or wrong bearer token");
    }
    let limit = page.limit.unwrap_or(PAGE_MAX).clamp(1, PAGE_MAX);
    match state.bank.operations(service, &page.after, limit).await {
        Ok(records) => Json(json!({ "operations": records })).into_response(),
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &error.to_string()),
    }
}
