//! Operator endpoints (scope `admin`): dead-letter topics, notification
//! subscriptions, and the targets' switches.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use bridge_pipeline::dead_letters;
use bridge_pipeline::reader::{Bound, Range};
use bridge_store::accounts;
use bridge_store::notifications::{self, NewSubscription};

use crate::auth::Caller;
use crate::{problem, unavailable, AppState};

/// How long a partition must stay quiet to count as read to its end.
const IDLE_MS: u64 = 1_500;
/// At most this many records per page of a dead-letter topic.
const SHOW_MAX: usize = 500;

fn admin(caller: &Caller) -> Result<(), Response> {
    caller.require("admin")
}

/// Every dead-letter topic with its records per error class.
#[utoipa::path(get, path = "/v1/admin/dead-letters", tag = "operations", responses(
        (status = 200, body = serde_json::Value),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn dead_letter_topics(State(state): State<AppState>, caller: Caller) -> Response {
    if let Err(response) = admin(&caller) {
        return response;
    }
    match dead_letters::summary(&state.ctx.config, IDLE_MS).await {
        Ok(topics) => Json(json!({"topics": topics})).into_response(),
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "Dead-letter summary failed");
            unavailable()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    partition: Option<i32>,
    from_offset: Option<i64>,
    to_offset: Option<i64>,
    #[serde(default)]
    dry_run: bool,
}

fn range(topic: &str, query: &RangeQuery) -> Range {
    Range {
        topic: topic.to_owned(),
        partitions: query.partition.into_iter().collect(),
        from: query.from_offset.map(Bound::Offset),
        to: query.to_offset.map(Bound::Offset),
        idle_ms: IDLE_MS,
        appended_before: Some(Utc::now()),
    }
}

fn ours(state: &AppState, topic: &str) -> Result<(), Response> {
    dead_letters::original_topic(&state.ctx.config, topic)
        .map(|_| ())
        .map_err(|_| problem(StatusCode::NOT_FOUND, "Not Found", "no such dead-letter topic"))
}

/// Records of one dead-letter topic (up to 500).
#[utoipa::path(get, path = "/v1/admin/dead-letters/{topic}", tag = "operations",
    params(("topic" = String, Path), ("partition" = Option<i32>, Query), ("from_offset" = Option<i64>, Query),
        ("to_offset" = Option<i64>, Query)),
    responses(
        (status = 200, body = serde_json::Value),
        (status = 400, description = "Malformed query", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a dead-letter topic of this pipeline", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn dead_letters_in(
    State(state): State<AppState>,
    caller: Caller,
    Path(topic): Path<String>,
    Query(query): Query<RangeQuery>,
) -> Response {
    if let Err(response) = admin(&caller).and_then(|()| ours(&state, &topic)) {
        return response;
    }
    let mut records = Vec::new();
    let shown = dead_letters::show(&state.ctx.config, &range(&topic, &query), |record| {
        if records.len() < SHOW_MAX {
            records.push(record);
        }
        Ok(())
    })
    .await;
    match shown {
        Ok(total) => Json(json!({"topic": topic, "total": total, "records": records})).into_response(),
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "Dead-letter read failed");
            unavailable()
        }
    }
}

/// Sends a range of dead letters back through the normal path.
#[utoipa::path(post, path = "/v1/admin/dead-letters/{topic}/redrive", tag = "operations",
    params(("topic" = String, Path)), request_body(content = serde_json::Value, description = "partition, from_offset, to_offset, dry_run"),
    responses(
        (status = 200, body = serde_json::Value),
        (status = 404, description = "Not a dead-letter topic of this pipeline", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Malformed range", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn redrive_dead_letters(
    State(state): State<AppState>,
    caller: Caller,
    Path(topic): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(response) = admin(&caller).and_then(|()| ours(&state, &topic)) {
        return response;
    }
    let query: RangeQuery = match serde_json::from_slice(if body.is_empty() { b"{}" } else { &body }) {
        Ok(query) => query,
        Err(error) => return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content", &error.to_string()),
    };
    match dead_letters::redrive(&state.ctx.config, &range(&topic, &query), query.dry_run).await {
        Ok(report) => {
            Json(json!({"topic": topic, "read": report.read, "redriven": report.redriven, "dry_run": report.dry_run}))
                .into_response()
        }
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "Redrive failed");
            unavailable()
        }
    }
}

/// Notification subscriptions with their deliveries per status.
#[utoipa::path(get, path = "/v1/admin/notifications/subscriptions", tag = "operations", responses(
        (status = 200, body = serde_json::Value),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn subscriptions(State(state): State<AppState>, caller: Caller) -> Response {
    if let Err(response) = admin(&caller) {
        return response;
    }
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    let Ok(all) = notifications::subscriptions(&mut conn).await else { return unavailable() };
    let mut items = Vec::new();
    for subscription in all {
        let Ok(counts) = notifications::delivery_counts(&mut conn, Some(subscription.id)).await else {
            return unavailable();
        };
        items.push(json!({
            "id": subscription.id,
            "subscriber_kind": subscription.subscriber_kind,
            "subscriber_id": subscription.subscriber_id,
            "states": subscription.states,
            "channel": subscription.channel,
            "target": subscription.target,
            "enabled": subscription.enabled,
            "disabled_reason": subscription.disabled_reason,
            "deliveries": counts.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        }));
    }
    Json(json!({"items": items})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    subscriber_kind: String,
    #[serde(default)]
    subscriber_id: Option<String>,
    #[serde(default)]
    states: Vec<String>,
    channel: String,
    target: String,
}

/// Subscribes a target; a webhook's signing secret is in this reply only.
#[utoipa::path(post, path = "/v1/admin/notifications/subscriptions", tag = "operations",
    request_body(content = serde_json::Value, description = "subscriber_kind, subscriber_id, states, channel, target"),
    responses(
        (status = 201, body = serde_json::Value),
        (status = 413, description = "Body too large", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid subscription", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn subscribe(State(state): State<AppState>, caller: Caller, body: Bytes) -> Response {
    if let Err(response) = admin(&caller) {
        return response;
    }
    let request: Subscribe = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content", &error.to_string()),
    };
    let invalid = |detail: &str| problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content", detail);
    if !["investor", "fund", "operator"].contains(&request.subscriber_kind.as_str()) {
        return invalid("subscriber_kind must be investor, fund or operator");
    }
    if (request.subscriber_kind == "operator") != request.subscriber_id.is_none() {
        return invalid("subscriber_id names the investor or fund account, and only operators go without");
    }
    if request.states.iter().any(|state| bridge_domain::TransferState::parse(state).is_err()) {
        return invalid("unknown state in states");
    }
    if let Err(reason) =
        bridge_notify::channels::validate_target(&request.channel, &request.target, &state.config.notify_outbound)
    {
        return invalid(&reason);
    }
    let printable = |text: &str| text.len() <= 512 && bridge_domain::text::is_visible(text);
    if !printable(&request.target) || !request.subscriber_id.as_deref().is_none_or(crate::transfers::account_id_ok) {
        return invalid("targets and ids may not contain control characters");
    }
    // A webhook gets its signing secret now, shown in this response only.
    let secret = (request.channel == "webhook").then(|| {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        bridge_webhooks::Secret::from_bytes(bytes).expose()
    });
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    // Kept encrypted; the subscription holds a reference.
    let reference = match (&secret, &state.config.keyring) {
        (None, _) => None,
        (Some(_), None) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "webhook subscriptions need the credentials store's master keys, which are not configured",
            );
        }
        (Some(secret), Some(keyring)) => {
            let value = bridge_secrets::SecretString::from(secret.clone());
            match bridge_secrets::store_new(&mut conn, keyring, "webhook-secret", &value).await {
                Ok(reference) => Some(reference),
                Err(_) => return unavailable(),
            }
        }
    };
    // A webhook or Slack URL can itself be a secret: it is sealed too, and
    // only its redacted form is kept in the clear.
    let (target, sealed_target) = if matches!(request.channel.as_str(), "webhook" | "slack") {
        let Some(keyring) = &state.config.keyring else {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "webhook and Slack targets are stored encrypted and need the master keys, which are not configured",
            );
        };
        match bridge_notify::outbound::seal(&mut conn, keyring, &request.target).await {
            Ok((reference, shown)) => (shown, Some(reference)),
            Err(_) => return unavailable(),
        }
    } else {
        (request.target, None)
    };
    let new = NewSubscription {
        subscriber_kind: request.subscriber_kind,
        subscriber_id: request.subscriber_id,
        states: request.states,
        channel: request.channel,
        target,
        secret: reference,
        sealed_target,
    };
    match notifications::subscribe(&mut conn, &new).await {
        Ok(id) => (StatusCode::CREATED, Json(json!({"id": id, "signing_secret": secret}))).into_response(),
        Err(_) => unavailable(),
    }
}

async fn switch(state: &AppState, id: i64, enabled: bool) -> Response {
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    let reason = (!enabled).then_some("disabled by an operator");
    match notifications::set_enabled(&mut conn, id, enabled, reason).await {
        Ok(true) => Json(json!({"id": id, "enabled": enabled})).into_response(),
        Ok(false) => problem(StatusCode::NOT_FOUND, "Not Found", "no such subscription"),
        Err(_) => unavailable(),
    }
}

/// Enables a target.
#[utoipa::path(post, path = "/v1/admin/notifications/subscriptions/{id}/enable", tag = "operations",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = serde_json::Value),
        (status = 400, description = "Not a subscription id", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn enable(State(state): State<AppState>, caller: Caller, Path(id): Path<i64>) -> Response {
    match admin(&caller) {
        Ok(()) => switch(&state, id, true).await,
        Err(response) => response,
    }
}

/// Disables a target; its deliveries wait.
#[utoipa::path(post, path = "/v1/admin/notifications/subscriptions/{id}/disable", tag = "operations",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = serde_json::Value),
        (status = 400, description = "Not a subscription id", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn disable(State(state): State<AppState>, caller: Caller, Path(id): Path<i64>) -> Response {
    match admin(&caller) {
        Ok(()) => switch(&state, id, false).await,
        Err(response) => response,
    }
}

#[derive(Deserialize)]
pub struct RedriveNotifications {
    subscription: Option<i64>,
}

/// Puts dead-lettered deliveries back at the end of their queues.
#[utoipa::path(post, path = "/v1/admin/notifications/redrive", tag = "operations",
    params(("subscription" = Option<i64>, Query)),
    responses(
        (status = 200, body = serde_json::Value),
        (status = 400, description = "Malformed query", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn redrive_notifications(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<RedriveNotifications>,
) -> Response {
    if let Err(response) = admin(&caller) {
        return response;
    }
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    match notifications::redrive(&mut conn, query.subscription).await {
        Ok(count) => Json(json!({"redriven": count})).into_response(),
        Err(_) => unavailable(),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// At most this many records (1 to 1,000; default 100).
    limit: Option<i64>,
    /// Only records older than this id (the next page).
    before: Option<i64>,
}

/// The audit log, newest first: every admin and operator action through
/// the API or the command line, with who, from where and how it ended.
#[utoipa::path(get, path = "/v1/admin/audit", tag = "operations", params(AuditQuery), responses(
        (status = 200, body = serde_json::Value),
        (status = 400, description = "limit or before is not an integer", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn audit_log(State(state): State<AppState>, caller: Caller, Query(query): Query<AuditQuery>) -> Response {
    if let Err(response) = admin(&caller) {
        return response;
    }
    let Ok(mut conn) = state.ctx.pool.acquire().await else { return unavailable() };
    match bridge_store::audit::list(&mut conn, query.limit.unwrap_or(100), query.before).await {
        Ok(items) => Json(json!({"items": items})).into_response(),
        Err(_) => unavailable(),
    }
}

/// What funds' rules read about an investor.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvestorAttributesBody {
    /// ISO 3166-1 alpha-2 code of the investor's residence, or null for
    /// unknown (an investor resident nowhere known passes no residence rule).
    residence_country: Option<String>,
    accredited: bool,
    /// The account's version this change was made against (as in its
    /// history); if the account has changed since, 409 and nothing changes.
    expected_version: Option<i64>,
}

/// Sets an investor's residence and accreditation (the attributes funds'
/// rules read); recorded in the account's history under the caller's name.
#[utoipa::path(put, path = "/v1/investors/{id}/attributes", tag = "accounts", params(("id" = String, Path)),
    request_body = InvestorAttributesBody,
    responses(
        (status = 200, body = serde_json::Value),
        (status = 400, description = "A body that is not JSON", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 404, body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The account changed since expected_version", body = crate::responses::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a country code", body = crate::responses::Problem, content_type = "application/problem+json"),
        crate::responses::Guarded,
    ), security(("bearer" = [])))]
pub async fn set_investor_attributes(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<InvestorAttributesBody>,
) -> Response {
    if let Err(response) = admin(&caller) {
        return response;
    }
    if !crate::transfers::account_id_ok(&id) {
        return problem(StatusCode::NOT_FOUND, "Not Found", "no such investor account");
    }
    let residence = match body.residence_country.as_deref().map(bridge_domain::CountryCode::parse).transpose() {
        Ok(residence) => residence,
        Err(error) => return problem(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Entity", &error.to_string()),
    };
    let attributes = bridge_domain::InvestorAttributes { residence, accredited: body.accredited };
    let Ok(mut tx) = state.ctx.pool.begin().await else { return unavailable() };
    let actor = format!("key:{} ({})", caller.key_id, caller.name);
    if bridge_store::set_actor(&mut tx, &actor).await.is_err() {
        return unavailable();
    }
    match accounts::set_investor_attributes(&mut tx, &id, attributes, body.expected_version).await {
        Ok(Some(version)) => match tx.commit().await {
            Ok(()) => Json(json!({
                "investor_account_id": id,
                "residence_country": residence.map(|code| code.as_str().to_owned()),
                "accredited": body.accredited,
                "version": version,
            }))
            .into_response(),
            Err(_) => unavailable(),
        },
        Ok(None) => problem(StatusCode::NOT_FOUND, "Not Found", "no such investor account"),
        Err(bridge_store::Error::Conflict { .. }) => problem(
            StatusCode::CONFLICT,
            "Conflict",
            "the account changed since expected_version; read its history and try again",
        ),
        Err(_) => unavailable(),
    }
}
