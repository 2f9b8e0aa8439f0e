//! Transfers, balances and funds over HTTP.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
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

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTransfer {
    /// Optional for a key bound to an investor (it is filled in).
    #[serde(default)]
    pub investor_account_id: Option<String>,
    pub fund_account_id: String,
    /// Integer minor units (cents): 1050 is 10.50.
    pub amount_minor: i64,
    /// ISO 4217, e.g. EUR.
    pub currency: String,
    #[serde(default)]
    pub reference: String,
}

/// Checks the shape of a request; the validator decides the rest (funds,
/// fund criteria) and answers with a rejection reason on the status topic.
pub fn check_shape(request: &CreateTransfer, investor: &str) -> Result<(), String> {
    let id_ok = |id: &str| !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic());
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
    if request.reference.chars().count() > 140 || request.reference.chars().any(char::is_control) {
        return Err("reference must be at most 140 characters without control characters".to_owned());
    }
    Ok(())
}

#[derive(Serialize)]
struct Accepted {
    transfer_id: Uuid,
    status_url: String,
}

fn accepted(transfer_id: Uuid) -> Response {
    let status_url = format!("/v1/transfers/{transfer_id}");
    let mut response =
        (StatusCode::ACCEPTED, Json(Accepted { transfer_id, status_url: status_url.clone() })).into_response();
    response.headers_mut().insert("location", status_url.parse().expect("a path"));
    response
}

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
    let investor = match (&request.investor_account_id, &caller.investor_account_id) {
        (Some(asked), _) if !caller.may_act_for(asked) => {
            return problem(StatusCode::FORBIDDEN, "Forbidden", "this key acts for another investor");
        }
        (Some(asked), _) => asked.clone(),
        (None, Some(bound)) => bound.clone(),
        (None, None) => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Unprocessable Content",
                "investor_account_id is required",
            );
        }
    };
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
        Ok(earlier)
    }
    .await;
    match created {
        Ok(None) => accepted(transfer_id),
        Ok(Some((earlier, id))) if earlier == fingerprint => accepted(id),
        Ok(Some(_)) => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key reused",
            "this Idempotency-Key was used for a different request",
        ),
        Err(error) => {
            tracing::warn!(error = %error, "Transfer not created");
            unavailable()
        }
    }
}

fn view(transfer: &Transfer) -> serde_json::Value {
    json!({
        "id": transfer.id,
        "state": transfer.state.as_str(),
        "version": transfer.version,
        "reason_code": transfer.reason_code,
        "terminal": transfer.state.is_terminal(),
        "investor_account_id": transfer.investor_account_id,
        "fund_account_id": transfer.fund_account_id,
        "amount_minor": transfer.amount_minor,
        "currency": transfer.currency,
        "reference": transfer.reference,
        "requested_at": transfer.requested_at,
    })
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

pub async fn get(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> Response {
    match visible(&state, &caller, id).await {
        Ok(transfer) => Json(view(&transfer)).into_response(),
        Err(response) => response,
    }
}

pub async fn history(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> Response {
    let transfer = match visible(&state, &caller, id).await {
        Ok(transfer) => transfer,
        Err(response) => return response,
    };
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    match transfers::history(&mut conn, id).await {
        Ok(versions) => Json(json!({
            "transfer": view(&transfer),
            "versions": versions.iter().map(|version| json!({
                "version": version.version,
                "state": version.state.as_str(),
                "previous_state": version.previous_state.map(|state| state.as_str()),
                "reason_code": version.reason_code,
                "event_id": version.event_id,
                "recorded_at": version.recorded_at,
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(_) => unavailable(),
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    investor: Option<String>,
    fund: Option<String>,
    state: Option<String>,
    cursor: Option<String>,
    limit: Option<i64>,
}

fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
    let (micros, id) = text.split_once('/')?;
    Some((DateTime::from_timestamp_micros(micros.parse().ok()?)?, Uuid::parse_str(id).ok()?))
}

fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}/{id}", at.timestamp_micros()))
}

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
    let cursor = match query.cursor.as_deref().map(decode_cursor) {
        Some(None) => return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content", "invalid cursor"),
        Some(cursor) => cursor,
        None => None,
    };
    let limit = query.limit.unwrap_or(50).clamp(1, 200);
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
    let mut items = Vec::new();
    for (id, _) in page.iter().take(limit as usize) {
        match transfers::get(&mut conn, *id).await {
            Ok(Some(transfer)) => items.push(view(&transfer)),
            Ok(None) => {}
            Err(_) => return unavailable(),
        }
    }
    let next = if more { page.get(limit as usize - 1).map(|(id, at)| encode_cursor(*at, *id)) } else { None };
    Json(json!({"items": items, "next_cursor": next})).into_response()
}

pub async fn balance(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    if let Err(response) = caller.require("transfers:read") {
        return response;
    }
    if !caller.may_act_for(&id) {
        return problem(StatusCode::NOT_FOUND, "Not Found", "no such investor account");
    }
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    match accounts::investor(&mut conn, &id).await {
        Ok(Some(account)) => Json(json!({
            "investor_account_id": id,
            "currency": account.value.currency.as_str(),
            "balance_minor": account.value.balance_minor,
            "held_minor": account.value.held_minor,
            "available_minor": account.value.available_minor(),
        }))
        .into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "Not Found", "no such investor account"),
        Err(_) => unavailable(),
    }
}

pub async fn fund(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    if let Err(response) = caller.require("transfers:read") {
        return response;
    }
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    match api::fund(&mut conn, &id).await {
        Ok(Some(fund)) => Json(json!({
            "id": fund.id,
            "name": fund.name,
            "currency": fund.currency,
            "minimum_investment_minor": fund.minimum_investment_minor,
            "seats_max": fund.seats_max,
            "seats_left": fund.seats_max - fund.investors_count,
            "capacity_minor": fund.capacity_minor,
            "capacity_left_minor": fund.capacity_minor - fund.reserved_minor - fund.completed_minor,
            "reserved_minor": fund.reserved_minor,
            "completed_minor": fund.completed_minor,
        }))
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
        CreateTransfer { investor_account_id: None, fund_account_id: fund, amount_minor, currency, reference }
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
                && currency.len() == 3 && currency.chars().all(|c| c.is_ascii_uppercase())
                && reference.chars().count() <= 140 && !reference.chars().any(char::is_control);
            prop_assert_eq!(verdict.is_ok(), expected, "{:?}", verdict);
        }

        #[test]
        fn well_formed_requests_pass(
            investor in "[a-z0-9-]{1,64}",
            fund in "[a-z0-9-]{1,64}",
            amount_minor in 1..i64::MAX,
            currency in "[A-Z]{3}",
            reference in "[ -~]{0,140}",
        ) {
            prop_assert!(check_shape(&request(fund, amount_minor, currency, reference), &investor).is_ok());
        }
    }
}
