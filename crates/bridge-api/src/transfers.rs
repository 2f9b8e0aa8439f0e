//! Transfers, balances and funds over HTTP.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use bridge_codec::TransferRequested;
use bridge_pipeline::stages::{self, StageError};
use bridge_store::transfers::{self, Transfer};
use bridge_store::{accounts, api};

use crate::auth::Caller;
use crate::{problem, unavailable, AppState};

/// Namespace of transfer ids derived from (API key, Idempotency-Key): the
/// same key pair always names the same transfer.
const API_NAMESPACE: Uuid = Uuid::from_u128(0x7f1e_93b2_44c1_4d0a_8e5f_61a2_0b9c_d3e4);

#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTransfer {
    /// A key bound to an investor may name only that investor.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub investor_account_id: String,
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub fund_account_id: String,
    /// Integer minor units (cents): 1050 is 10.50.
    #[schema(minimum = 1)]
    pub amount_minor: i64,
    /// ISO 4217, e.g. EUR.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// Up to 140 characters, no control characters.
    #[serde(default)]
    #[schema(max_length = 140, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
    pub reference: String,
}

/// Checks the shape of a request; the validator decides the rest (funds,
/// fund criteria) and answers with a rejection reason on the status topic.
/// Account ids are 1 to 128 visible ASCII characters: nothing a database,
/// a log line or a terminal could misread.
pub fn account_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic())
}

pub fn check_shape(request: &CreateTransfer, investor: &str) -> Result<(), String> {
    let id_ok = account_id_ok;
    if !id_ok(investor) {
        return Err("investor_account_id must be 1 to 128 visible ASCII characters".to_owned());
    }
    if !id_ok(&request.fund_account_id) {
        return Err("fund_account_id must be 1 to 128 visible ASCII characters".to_owned());
    }
    if request.amount_minor <= 0 {
        return Err("amount_minor must be a positive integer of minor units".to_owned());
    }
    if bridge_domain::Currency::parse(&request.currency).is_err() {
        return Err("currency must be an ISO 4217 code such as EUR".to_owned());
    }
    if request.reference.chars().count() > 140 || !bridge_domain::text::is_visible(&request.reference) {
        return Err(
            "reference must be at most 140 characters without control or invisible formatting characters".to_owned()
        );
    }
    Ok(())
}

/// The request is recorded; follow it at `status_url`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Accepted {
    transfer_id: Uuid,
    status_url: String,
}

/// A transfer's current state.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TransferView {
    id: Uuid,
    /// requested, validated, withdrawn, deposited, completed, rejected,
    /// failed, reversed or manual_review.
    state: String,
    version: i64,
    reason_code: Option<String>,
    terminal: bool,
    investor_account_id: String,
    fund_account_id: String,
    amount_minor: i64,
    currency: String,
    reference: String,
    requested_at: DateTime<Utc>,
}

/// One version of a transfer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct VersionView {
    version: i64,
    state: String,
    previous_state: Option<String>,
    reason_code: Option<String>,
    event_id: Uuid,
    recorded_at: DateTime<Utc>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct History {
    transfer: TransferView,
    versions: Vec<VersionView>,
}

/// Newest first; pass `next_cursor` back as `cursor` for the next page.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TransferPage {
    items: Vec<TransferView>,
    next_cursor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Balance {
    investor_account_id: String,
    currency: String,
    balance_minor: i64,
    held_minor: i64,
    available_minor: i64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct FundView {
    id: String,
    name: String,
    currency: String,
    minimum_investment_minor: i64,
    seats_max: i32,
    seats_left: i32,
    capacity_minor: i64,
    capacity_left_minor: i64,
    reserved_minor: i64,
    completed_minor: i64,
    /// The fund's own criteria: a list of tagged rules (`residence_in`,
    /// `accredited_only`, `maximum_investment`, `maximum_per_investor`,
    /// `opens_at`, `closes_at`).
    rules: serde_json::Value,
}

fn accepted(transfer_id: Uuid) -> Response {
    let status_url = format!("/v1/transfers/{transfer_id}");
    let mut response =
        (StatusCode::ACCEPTED, Json(Accepted { transfer_id, status_url: status_url.clone() })).into_response();
    response.headers_mut().insert("location", status_url.parse().expect("a path"));
    response
}

/// Create a transfer.
#[utoipa::path(post, path = "/v1/transfers", tag = "transfers", request_body = CreateTransfer,
    params(("Idempotency-Key" = String, Header, min_length = 1, max_length = 255, description = "Your key for this request; a retry with the same key and body gets the same answer")),
    responses(
        (status = 202, description = "Recorded; follow the status URL", body = Accepted),
        (status = 400, description = "Idempotency-Key missing", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 409, description = "This Idempotency-Key was used with another body", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Malformed request", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::GuardedInvestor,
    ), security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(response) = caller.require("transfers:write") {
        return response;
    }
    let request: CreateTransfer = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            // serde's message names the field and the expectation, never
            // anything of ours.
            let detail = format!("the body is not a valid transfer request: {error}");
            return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content", &detail);
        }
    };
    let Some(idempotency_key) = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .filter(|key| !key.is_empty() && key.len() <= 255)
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "an Idempotency-Key header (1 to 255 characters) is required",
        );
    };
    let investor = request.investor_account_id.clone();
    if !caller.may_act_for(&investor) {
        return problem(StatusCode::FORBIDDEN, "Forbidden", "this key acts for another investor");
    }
    if let Err(reason) = check_shape(&request, &investor) {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content", &reason);
    }
    let fingerprint = Sha256::digest(
        json!([investor, request.fund_account_id, request.amount_minor, request.currency, request.reference])
            .to_string()
            .as_bytes(),
    )
    .to_vec();
    let transfer_id = Uuid::new_v5(&API_NAMESPACE, format!("{}/{idempotency_key}", caller.key_id).as_bytes());
    let requested = TransferRequested {
        transfer_id: transfer_id.to_string(),
        investor_account_id: investor,
        fund_account_id: request.fund_account_id,
        amount_minor: request.amount_minor,
        currency: request.currency,
        requested_at: Utc::now().timestamp_millis(),
        reference: request.reference,
        source_system: "api".to_owned(),
    };
    let traceparent = headers.get("traceparent").and_then(|value| value.to_str().ok());
    let created: Result<Option<(Vec<u8>, Uuid)>, StageError> = async {
        let mut tx = state.ctx.pool.begin().await?;
        let earlier =
            api::claim_idempotency(&mut tx, caller.key_id, idempotency_key, &fingerprint, transfer_id).await?;
        if earlier.is_none() {
            stages::record_api_request(&state.ctx, &mut tx, &requested, traceparent).await?;
        }
        tx.commit().await?;
        if earlier.is_none() {
            state.ctx.relay_waker.wake();
        }
        Ok(earlier)
    }
    .await;
    match created {
        Ok(None) => accepted(transfer_id),
        Ok(Some((earlier, id))) if earlier == fingerprint => accepted(id),
        Ok(Some(_)) => problem(
            StatusCode::CONFLICT,
            "Idempotency-Key reused",
            "this Idempotency-Key was used for a different request",
        ),
        Err(error) => {
            tracing::warn!(error = %error, "Transfer not created");
            unavailable()
        }
    }
}

fn view(transfer: &Transfer) -> TransferView {
    TransferView {
        id: transfer.id,
        state: transfer.state.as_str().to_owned(),
        version: transfer.version,
        reason_code: transfer.reason_code.clone(),
        terminal: transfer.state.is_terminal(),
        investor_account_id: transfer.investor_account_id.clone(),
        fund_account_id: transfer.fund_account_id.clone(),
        amount_minor: transfer.amount_minor,
        currency: transfer.currency.clone(),
        reference: transfer.reference.clone(),
        requested_at: transfer.requested_at,
    }
}

/// The transfer, if it exists and the caller may see it. Another investor's
/// transfer reads as absent, so ids cannot be probed.
async fn visible(state: &AppState, caller: &Caller, id: Uuid) -> Result<Transfer, Response> {
    caller.require("transfers:read")?;
    let mut conn = state.ctx.pool.acquire().await.map_err(|_| unavailable())?;
    match transfers::get(&mut conn, id).await {
        Ok(Some(transfer)) if caller.may_act_for(&transfer.investor_account_id) => Ok(transfer),
        Ok(_) => Err(problem(StatusCode::NOT_FOUND, "Not Found", "no such transfer")),
        Err(_) => Err(unavailable()),
    }
}

/// A transfer's current state and version.
#[utoipa::path(get, path = "/v1/transfers/{id}", tag = "transfers", params(("id" = Uuid, Path)),
    responses(
        (status = 200, body = TransferView),
        (status = 400, description = "Not a transfer id", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::GuardedInvestor,
    ), security(("bearer" = [])))]
pub async fn get(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> Response {
    match visible(&state, &caller, id).await {
        Ok(transfer) => Json(view(&transfer)).into_response(),
        Err(response) => response,
    }
}

/// Every version of a transfer, in order.
#[utoipa::path(get, path = "/v1/transfers/{id}/history", tag = "transfers", params(("id" = Uuid, Path)),
    responses(
        (status = 200, body = History),
        (status = 400, description = "Not a transfer id", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::GuardedInvestor,
    ), security(("bearer" = [])))]
pub async fn history(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> Response {
    let transfer = match visible(&state, &caller, id).await {
        Ok(transfer) => transfer,
        Err(response) => return response,
    };
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    match transfers::history(&mut conn, id).await {
        Ok(versions) => Json(History {
            transfer: view(&transfer),
            versions: versions
                .into_iter()
                .map(|version| VersionView {
                    version: version.version,
                    state: version.state.as_str().to_owned(),
                    previous_state: version.previous_state.map(|state| state.as_str().to_owned()),
                    reason_code: version.reason_code,
                    event_id: version.event_id,
                    recorded_at: version.recorded_at,
                })
                .collect(),
        })
        .into_response(),
        Err(_) => unavailable(),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Investor account id.
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    investor: Option<String>,
    /// Fund account id.
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    fund: Option<String>,
    /// A transfer state.
    #[param(pattern = "^(requested|validated|withdrawn|deposited|completed|rejected|failed|reversed|manual_review)$")]
    state: Option<String>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{1,16}_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    cursor: Option<String>,
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

/// A cursor is the last row's creation time (microseconds) and id.
fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (micros, id) = cursor.split_once('_')?;
    if micros.is_empty() || micros.len() > 16 || !micros.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((DateTime::from_timestamp_micros(micros.parse().ok()?)?, Uuid::parse_str(id).ok()?))
}

fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{}", at.timestamp_micros(), id.hyphenated())
}

/// Transfers, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/transfers", tag = "transfers", params(ListQuery),
    responses(
        (status = 200, body = TransferPage),
        (status = 400, description = "Malformed query", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown state or invalid cursor", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::GuardedInvestor,
    ), security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller, Query(query): Query<ListQuery>) -> Response {
    if let Err(response) = caller.require("transfers:read") {
        return response;
    }
    let investor = match (&query.investor, &caller.investor_account_id) {
        (Some(asked), Some(bound)) if asked != bound => {
            return problem(StatusCode::FORBIDDEN, "Forbidden", "this key sees only its own investor's transfers");
        }
        (_, Some(bound)) => Some(bound.clone()),
        (asked, None) => asked.clone(),
    };
    if let Some(wanted) = &query.state {
        if bridge_domain::TransferState::parse(wanted).is_err() {
            return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content", "unknown state");
        }
    }
    if !query.investor.as_deref().is_none_or(account_id_ok) || !query.fund.as_deref().is_none_or(account_id_ok) {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Unprocessable Content",
            "account ids are 1 to 128 visible ASCII characters",
        );
    }
    if query.limit.is_some_and(|limit| !(1..=200).contains(&limit)) {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content", "limit is 1 to 200");
    }
    let cursor = match query.cursor.as_deref().map(decode_cursor) {
        Some(None) => return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content", "invalid cursor"),
        Some(cursor) => cursor,
        None => None,
    };
    let limit = query.limit.unwrap_or(50);
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    let page = match api::list_transfers(
        &mut conn,
        investor.as_deref(),
        query.fund.as_deref(),
        query.state.as_deref(),
        cursor,
        limit + 1,
    )
    .await
    {
        Ok(page) => page,
        Err(_) => return unavailable(),
    };
    let more = page.len() as i64 > limit;
    // One query for the page's rows, put back in the page's order.
    let ids: Vec<Uuid> = page.iter().take(limit as usize).map(|(id, _)| *id).collect();
    let Ok(mut rows) = transfers::get_many(&mut conn, &ids).await else { return unavailable() };
    rows.sort_by_key(|transfer| ids.iter().position(|id| *id == transfer.id));
    let items = rows.iter().map(view).collect();
    let next = if more { page.get(limit as usize - 1).map(|(id, at)| encode_cursor(*at, *id)) } else { None };
    Json(TransferPage { items, next_cursor: next }).into_response()
}

/// An investor's balance, held funds and what is available.
#[utoipa::path(get, path = "/v1/investors/{id}/balance", tag = "accounts", params(("id" = String, Path)),
    responses(
        (status = 200, body = Balance),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::GuardedInvestor,
    ), security(("bearer" = [])))]
pub async fn balance(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    if let Err(response) = caller.require("transfers:read") {
        return response;
    }
    if !account_id_ok(&id) || !caller.may_act_for(&id) {
        return problem(StatusCode::NOT_FOUND, "Not Found", "no such investor account");
    }
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    match accounts::investor(&mut conn, &id).await {
        Ok(Some(account)) => Json(Balance {
            investor_account_id: id,
            currency: account.value.currency.as_str().to_owned(),
            balance_minor: account.value.balance_minor,
            held_minor: account.value.held_minor,
            available_minor: account.value.available_minor(),
        })
        .into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "Not Found", "no such investor account"),
        Err(_) => unavailable(),
    }
}

/// A model's history as the API shows it: newest first.
async fn history_of(state: &AppState, model: &str, key: &str, investor: Option<&str>, missing: &str) -> Response {
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    match bridge_store::history::history(&mut conn, model, key, 100, investor).await {
        Ok(entries) if entries.is_empty() => problem(StatusCode::NOT_FOUND, "Not Found", missing),
        Ok(entries) => Json(serde_json::json!({ "items": entries })).into_response(),
        Err(_) => unavailable(),
    }
}

/// Every change to an investor's account, newest first (at most 100): the
/// row before and after, who made it and when.
#[utoipa::path(get, path = "/v1/investors/{id}/history", tag = "accounts", params(("id" = String, Path)),
    responses(
        (status = 200, body = serde_json::Value),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::GuardedInvestor,
    ), security(("bearer" = [])))]
pub async fn investor_history(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    if let Err(response) = caller.require("transfers:read") {
        return response;
    }
    if !account_id_ok(&id) || !caller.may_act_for(&id) {
        return problem(StatusCode::NOT_FOUND, "Not Found", "no such investor account");
    }
    history_of(&state, "investor_accounts", &id, Some(&id), "no such investor account").await
}

/// Every change to a fund (its terms, seats and capacity taken), newest
/// first (at most 100).
#[utoipa::path(get, path = "/v1/funds/{id}/history", tag = "accounts", params(("id" = String, Path)),
    responses(
        (status = 200, body = serde_json::Value),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::GuardedInvestor,
    ), security(("bearer" = [])))]
pub async fn fund_history(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    if let Err(response) = caller.require("transfers:read") {
        return response;
    }
    if !account_id_ok(&id) {
        return problem(StatusCode::NOT_FOUND, "Not Found", "no such fund");
    }
    // A key bound to an investor sees which of its own transfers changed
    // the fund, not other investors'.
    history_of(&state, "funds", &id, caller.investor_account_id.as_deref(), "no such fund").await
}

/// A fund's criteria (its rules among them), seats and capacity left,
/// reserved and completed allocation.
#[utoipa::path(get, path = "/v1/funds/{id}", tag = "accounts", params(("id" = String, Path)),
    responses(
        (status = 200, body = FundView),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::GuardedInvestor,
    ), security(("bearer" = [])))]
pub async fn fund(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    if let Err(response) = caller.require("transfers:read") {
        return response;
    }
    if !account_id_ok(&id) {
        return problem(StatusCode::NOT_FOUND, "Not Found", "no such fund");
    }
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    match api::fund(&mut conn, &id).await {
        Ok(Some(fund)) => Json(FundView {
            seats_left: fund.seats_max - fund.investors_count,
            capacity_left_minor: fund.capacity_minor - fund.reserved_minor - fund.completed_minor,
            id: fund.id,
            name: fund.name,
            currency: fund.currency,
            minimum_investment_minor: fund.minimum_investment_minor,
            seats_max: fund.seats_max,
            capacity_minor: fund.capacity_minor,
            reserved_minor: fund.reserved_minor,
            completed_minor: fund.completed_minor,
            rules: fund.rules,
        })
        .into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "Not Found", "no such fund"),
        Err(_) => unavailable(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn request(fund: String, amount_minor: i64, currency: String, reference: String) -> CreateTransfer {
        CreateTransfer { investor_account_id: String::new(), fund_account_id: fund, amount_minor, currency, reference }
    }

    proptest! {
        /// Whatever a client sends, the check answers without panicking,
        /// and it accepts exactly the well-formed requests.
        #[test]
        fn the_shape_check_accepts_exactly_well_formed_requests(
            investor in "\\PC{0,140}",
            fund in "\\PC{0,140}",
            amount_minor in any::<i64>(),
            currency in "\\PC{0,5}",
            reference in "\\PC{0,150}",
        ) {
            let verdict = check_shape(&request(fund.clone(), amount_minor, currency.clone(), reference.clone()), &investor);
            let id_ok = |id: &str| !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic());
            let expected = id_ok(&investor)
                && id_ok(&fund)
                && amount_minor > 0
                && bridge_domain::Currency::parse(&currency).is_ok()
                && reference.chars().count() <= 140 && bridge_domain::text::is_visible(&reference);
            prop_assert_eq!(verdict.is_ok(), expected, "{:?}", verdict);
        }

        #[test]
        fn well_formed_requests_pass(
            investor in "[a-z0-9-]{1,64}",
            fund in "[a-z0-9-]{1,64}",
            amount_minor in 1..i64::MAX,
            currency in proptest::sample::select(vec!["EUR", "USD", "GBP", "CHF", "JPY", "SEK"]),
            reference in "[ -~]{0,140}",
        ) {
            let currency = currency.to_owned();
            prop_assert!(check_shape(&request(fund, amount_minor, currency, reference), &investor).is_ok());
        }
    }
}
