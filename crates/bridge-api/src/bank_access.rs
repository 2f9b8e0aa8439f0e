//! An investor's own bank access (`/v1/investors/{id}/bank-access`):
//! written by the investor's app (a `transfers:write` key bound to that
//! investor) or an admin, never read back: the API shows only that it is
//! there, its consent, scopes, expiry and when it was last used.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use bridge_secrets::SecretString;
use bridge_store::bank_access::{self, NewBankAccess};

use crate::auth::Caller;
use crate::{problem, unavailable, AppState};

/// The investor themselves (through their app's bound key) or an admin.
fn may_manage(caller: &Caller, investor: &str) -> Result<(), Response> {
    if caller.scopes.iter().any(|scope| scope == "admin") {
        return Ok(());
    }
    caller.require("transfers:write")?;
    if caller.investor_account_id.as_deref() != Some(investor) {
        return Err(problem(StatusCode::NOT_FOUND, "Not Found", "no such investor account"));
    }
    Ok(())
}

/// An investor's bank access as an open-banking API issues it.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BankAccessBody {
    /// The access token (or consent token) the investor's bank issued.
    /// Stored encrypted; never returned.
    access_token: String,
    /// The bank's id of the consent.
    consent_id: String,
    #[serde(default)]
    scopes: Vec<String>,
    /// When the bank said the access expires.
    expires_at: Option<DateTime<Utc>>,
}

const TOKEN_BYTES_MAX: usize = 8_192;

/// Stores an investor's bank access, replacing any earlier one; answers
/// with its metadata only.
#[utoipa::path(put, path = "/v1/investors/{id}/bank-access", tag = "accounts", params(("id" = String, Path)),
    request_body = BankAccessBody,
    responses(
        (status = 200, body = serde_json::Value),
        (status = 400, description = "A body that is not JSON", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 422, description = "An empty or oversized token or consent id", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<BankAccessBody>,
) -> Response {
    if let Err(response) = may_manage(&caller, &id) {
        return response;
    }
    if !crate::transfers::account_id_ok(&id) {
        return problem(StatusCode::NOT_FOUND, "Not Found", "no such investor account");
    }
    let printable =
        |text: &str, max: usize| !text.is_empty() && text.len() <= max && text.chars().all(|c| c.is_ascii_graphic());
    if !printable(&body.access_token, TOKEN_BYTES_MAX)
        || !printable(&body.consent_id, 200)
        || body.scopes.len() > 32
        || !body.scopes.iter().all(|scope| printable(scope, 100))
    {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Unprocessable Entity",
            "access_token, consent_id and scopes must be printable ASCII, not empty, and within their sizes",
        );
    }
    let Some(keyring) = &state.config.keyring else {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable", "no master keys are configured");
    };
    let token = SecretString::from(body.access_token);
    let Ok(mut tx) = state.ctx.pool.begin().await else { return unavailable() };
    let set_by = format!("key:{} ({})", caller.key_id, caller.name);
    let access = NewBankAccess {
        consent_id: &body.consent_id,
        scopes: &body.scopes,
        expires_at: body.expires_at,
        set_by: &set_by,
    };
    match bank_access::record(&mut tx, &id, &access).await {
        Ok(true) => {}
        Ok(false) => return problem(StatusCode::NOT_FOUND, "Not Found", "no such investor account"),
        Err(_) => return unavailable(),
    }
    if bridge_secrets::put(&mut tx, keyring, &bank_access::credential_name(&id), &token).await.is_err() {
        return unavailable();
    }
    if tx.commit().await.is_err() {
        return unavailable();
    }
    show(&state, &id).await
}

/// What may be shown of an investor's bank access: never the token.
#[utoipa::path(get, path = "/v1/investors/{id}/bank-access", tag = "accounts", params(("id" = String, Path)),
    responses(
        (status = 200, body = serde_json::Value),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn get(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    if let Err(response) = may_manage(&caller, &id) {
        return response;
    }
    show(&state, &id).await
}

/// Revokes an investor's bank access: the token is deleted; withdrawals
/// carry none until a new one is stored.
#[utoipa::path(delete, path = "/v1/investors/{id}/bank-access", tag = "accounts", params(("id" = String, Path)),
    responses(
        (status = 200, body = serde_json::Value),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn revoke(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Response {
    if let Err(response) = may_manage(&caller, &id) {
        return response;
    }
    let Ok(mut tx) = state.ctx.pool.begin().await else { return unavailable() };
    match bank_access::revoke(&mut tx, &id).await {
        Ok(true) => {}
        Ok(false) => return problem(StatusCode::NOT_FOUND, "Not Found", "no bank access to revoke"),
        Err(_) => return unavailable(),
    }
    if tx.commit().await.is_err() {
        return unavailable();
    }
    show(&state, &id).await
}

async fn show(state: &AppState, id: &str) -> Response {
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    match bank_access::metadata(&mut conn, id).await {
        Ok(Some(metadata)) => Json(serde_json::json!({
            "present": metadata.revoked_at.is_none(),
            "investor_account_id": metadata.investor_account_id,
            "consent_id": metadata.consent_id,
            "scopes": metadata.scopes,
            "expires_at": metadata.expires_at,
            "set_at": metadata.set_at,
            "set_by": metadata.set_by,
            "last_used_at": metadata.last_used_at,
            "revoked_at": metadata.revoked_at,
        }))
        .into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "Not Found", "no bank access for this investor"),
        Err(_) => unavailable(),
    }
}
