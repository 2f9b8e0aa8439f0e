//! Operator endpoints for transfers in manual review (scope `operator`):
//! the queue, a transfer's story, and its resolutions (see
//! `bridge_pipeline::stages::resolve`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use bridge_domain::Resolution;
use bridge_pipeline::stages::resolve::{self, ResolutionRequest, Resolved, ReviewError};
use bridge_store::reviews::{self, transfer_json, ActionStatus, Operator};

use crate::auth::Caller;
use crate::{problem, unavailable, AppState};

/// The longest `Idempotency-Key` accepted.
const IDEMPOTENCY_KEY_CHARS_MAX: usize = 200;

/// An operator acts for no investor in particular: a key bound to one is
/// refused, whatever its scopes.
fn operator(caller: &Caller) -> Result<Operator, Response> {
    caller.require("operator")?;
    if caller.investor_account_id.is_some() {
        return Err(problem(StatusCode::FORBIDDEN, "Forbidden", "a key bound to an investor cannot resolve reviews"));
    }
    Ok(Operator { id: format!("key:{}", caller.key_id), name: caller.name.clone() })
}

fn problem_with(status: StatusCode, title: &str, detail: &str, extra: Value) -> Response {
    let mut body = json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail});
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    (status, [("content-type", "application/problem+json")], body.to_string()).into_response()
}

fn refused(error: ReviewError) -> Response {
    let detail = error.to_string();
    match error {
        ReviewError::UnknownTransfer(_) | ReviewError::UnknownAction(_) => {
            problem(StatusCode::NOT_FOUND, "Not Found", &detail)
        }
        ReviewError::Invalid(_) | ReviewError::KeyReused => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Entity", &detail)
        }
        ReviewError::SameOperator(_) => problem(StatusCode::FORBIDDEN, "Forbidden", &detail),
        ReviewError::NotInReview(transfer) => {
            problem_with(StatusCode::CONFLICT, "Conflict", &detail, json!({"transfer": transfer_json(&transfer)}))
        }
        ReviewError::NotApplicable { frozen, .. } => {
            problem_with(StatusCode::CONFLICT, "Conflict", &detail, json!({"frozen_in": frozen.as_str()}))
        }
        ReviewError::Conflict { open, transfer } => problem_with(
            StatusCode::CONFLICT,
            "Conflict",
            &detail,
            json!({"resolution": open, "transfer": transfer_json(&transfer)}),
        ),
        ReviewError::NotAwaiting(action) => {
            problem_with(StatusCode::CONFLICT, "Conflict", &detail, json!({"resolution": action}))
        }
        ReviewError::Store(_) | ReviewError::Stage(_) => {
            tracing::warn!(error = %detail, "Review request failed");
            unavailable()
        }
    }
}

/// What a resolution came to: 202 while it waits for approval, 200 when it
/// ran, 409 when it ran and changed nothing (the outcome says why).
fn resolved(Resolved { action, transfer }: Resolved) -> Response {
    let body = json!({"resolution": action, "transfer": transfer_json(&transfer)});
    match action.status {
        ActionStatus::AwaitingApproval => (StatusCode::ACCEPTED, Json(body)).into_response(),
        ActionStatus::Done | ActionStatus::Running => (StatusCode::OK, Json(body)).into_response(),
        ActionStatus::NotApplied | ActionStatus::Rejected => problem_with(
            StatusCode::CONFLICT,
            "Conflict",
            action.outcome.as_deref().unwrap_or("the resolution changed nothing"),
            body,
        ),
    }
}

/// A JSON body, whatever its content type says; anything else is a 422.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|error| {
        problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Entity", &format!("malformed body: {error}"))
    })
}

/// The transfers waiting for a person, oldest first.
#[utoipa::path(get, path = "/v1/reviews", tag = "reviews", responses(
        (status = 200, body = serde_json::Value),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Response {
    if let Err(response) = operator(&caller) {
        return response;
    }
    let listed = async { reviews::waiting(&mut *state.ctx.pool.acquire().await?, 1_000).await }.await;
    match listed {
        Ok(waiting) => Json(json!({"reviews": waiting})).into_response(),
        Err(error) => refused(error.into()),
    }
}

/// A transfer's story: its state and where it froze, every version with
/// who acted and why, its ledger lines and its resolutions.
#[utoipa::path(get, path = "/v1/reviews/{id}", tag = "reviews", params(("id" = Uuid, Path)), responses(
        (status = 200, body = serde_json::Value),
        (status = 400, description = "Not a transfer id", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such transfer", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn show(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> Response {
    if let Err(response) = operator(&caller) {
        return response;
    }
    let story = async { reviews::story(&mut *state.ctx.pool.acquire().await?, id).await }.await;
    match story {
        Ok(Some(story)) => Json(story).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "Not Found", "no such transfer"),
        Err(error) => refused(error.into()),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// Why, in the operator's words: kept in the transfer's history.
    reason: String,
    /// The outside operation (`refunded`, `complete`: required).
    #[serde(default)]
    reference: Option<String>,
    /// `retry` only: cancel the old operation and, unless it settled, make
    /// a new one under a new idempotency key.
    #[serde(default)]
    new_attempt: bool,
}

fn idempotency_key(headers: &HeaderMap, caller: &Caller) -> Result<Option<String>, Response> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().ok().filter(|key| !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_CHARS_MAX).ok_or_else(
        || problem(StatusCode::BAD_REQUEST, "Bad Request", "Idempotency-Key must be 1 to 200 visible ASCII characters"),
    )?;
    // Each caller's keys are their own.
    Ok(Some(format!("{}:{key}", caller.key_id)))
}

/// Resolves a transfer in manual review: `retry`, `fail`, `refunded`
/// (outside Bridge) or `complete` (confirmed outside Bridge). Idempotent
/// under an `Idempotency-Key`.
#[utoipa::path(post, path = "/v1/reviews/{id}/{action}", tag = "reviews",
    params(("id" = Uuid, Path), ("action" = String, Path, description = "retry, fail, refunded or complete"),
        ("Idempotency-Key" = Option<String>, Header)),
    request_body = ResolveBody,
    responses(
        (status = 200, description = "It ran; the resolution and the transfer as they stand", body = serde_json::Value),
        (status = 202, description = "Waiting for a second operator's approval", body = serde_json::Value),
        (status = 400, description = "Not a transfer id, or a malformed Idempotency-Key", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such transfer or action", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not in manual review, not applicable where it froze, another resolution open, or it ran and changed nothing", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Malformed body, or a missing reason or reference", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn resolve(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((id, action)): Path<(Uuid, String)>,
    body: axum::body::Bytes,
) -> Response {
    let operator = match operator(&caller) {
        Ok(operator) => operator,
        Err(response) => return response,
    };
    let body: ResolveBody = match parse(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let Ok(resolution) = action.parse::<Resolution>() else {
        return problem(StatusCode::NOT_FOUND, "Not Found", "no such action: retry, fail, refunded or complete");
    };
    let key = match idempotency_key(&headers, &caller) {
        Ok(key) => key,
        Err(response) => return response,
    };
    let texts = [Some(body.reason.as_str()), body.reference.as_deref()];
    if texts.into_iter().flatten().any(|text| text.chars().count() > 500 || !bridge_domain::text::is_visible(text)) {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Unprocessable Content",
            "reason and reference must be at most 500 characters without control or invisible formatting characters",
        );
    }
    let asked = ResolutionRequest {
        resolution,
        reason: body.reason,
        reference: body.reference,
        new_attempt: body.new_attempt,
        idempotency_key: key,
    };
    match resolve::request(&state.ctx, id, &asked, &operator, state.config.review_approvals).await {
        Ok(done) => resolved(done),
        Err(error) => refused(error),
    }
}

/// A second operator approves a resolution waiting for it; it runs now.
#[utoipa::path(post, path = "/v1/reviews/resolutions/{id}/approve", tag = "reviews", params(("id" = Uuid, Path)),
    responses(
        (status = 200, body = serde_json::Value),
        (status = 400, description = "Not a resolution id", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such resolution", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not waiting for approval, or it ran and changed nothing", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn approve(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> Response {
    let operator = match operator(&caller) {
        Ok(operator) => operator,
        Err(response) => return response,
    };
    match resolve::approve(&state.ctx, id, &operator).await {
        Ok(done) => resolved(done),
        Err(error) => refused(error),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectBody {
    reason: String,
}

/// Turns down (or, by its requester, withdraws) a resolution waiting for
/// approval.
#[utoipa::path(post, path = "/v1/reviews/resolutions/{id}/reject", tag = "reviews", params(("id" = Uuid, Path)),
    request_body = RejectBody,
    responses(
        (status = 200, body = serde_json::Value),
        (status = 400, description = "Not a resolution id", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such resolution", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not waiting for approval", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Malformed body", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn reject(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: axum::body::Bytes,
) -> Response {
    let operator = match operator(&caller) {
        Ok(operator) => operator,
        Err(response) => return response,
    };
    let body: RejectBody = match parse(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    match resolve::reject(&state.ctx, id, &operator, &body.reason).await {
        Ok(action) => Json(json!({"resolution": action})).into_response(),
        Err(error) => refused(error),
    }
}
